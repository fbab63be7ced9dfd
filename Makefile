# Quick start: `make run` (install, then the main job) and `make test` (install, then the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch; override (e.g. TORCH=torch) to let pip choose a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install run test test-slow test-avalanche test-deepspeed docs lint gpu clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/spg-fast run

test: install
	$(PY) -m pytest -q
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The long checks (`@pytest.mark.slow`): CI runs them after `make test`.
test-slow: install
	$(PY) -m pytest -q -m slow

# The Avalanche plugin against the real avalanche-lib, in an environment of its own: Avalanche needs
# torchvision, whose registry wheels are built against torch's CUDA build and fail to import with the
# CPU build in $(VENV); the CUDA build (about 5.5 GB with its libraries) runs on the CPU.
AVALANCHE_VENV ?= build/venv-avalanche
AVALANCHE_TORCH ?= torch==2.14.1 torchvision==0.29.1

$(AVALANCHE_VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(AVALANCHE_VENV)
	$(AVALANCHE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AVALANCHE_VENV)/bin/python -m pip install --quiet $(AVALANCHE_TORCH)
	$(AVALANCHE_VENV)/bin/python -m pip install --quiet -e ".[avalanche]" "pytest>=8"
	touch $@

test-avalanche: $(AVALANCHE_VENV)/.installed
	$(AVALANCHE_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/integrations/test_avalanche.py
	OMP_NUM_THREADS=1 $(AVALANCHE_VENV)/bin/python examples/avalanche_continual.py

# The Trainer callback's refusal of DeepSpeed ZeRO 1 and 2, with the real deepspeed (its CPU
# accelerator and gloo; its communication op is compiled on first use), in an environment of its own.
DEEPSPEED_VENV ?= build/venv-deepspeed
DEEPSPEED ?= deepspeed==0.19.8

$(DEEPSPEED_VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(DEEPSPEED_VENV)
	$(DEEPSPEED_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DEEPSPEED_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(DEEPSPEED_VENV)/bin/python -m pip install --quiet "$(DEEPSPEED)" -e ".[transformers]" "pytest>=8"
	touch $@

test-deepspeed: $(DEEPSPEED_VENV)/.installed
	$(DEEPSPEED_VENV)/bin/python -m pytest -q -p no:cacheprovider -m slow tests/integrations/test_deepspeed.py

# The documentation site into site/: mkdocs --strict fails on a broken link, a missing page or an API object it
# cannot find; then every public name must have its entry in the API reference.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
	$(PY) docs/tools/check_api.py site

# On a machine with a CUDA GPU and its own CUDA build of torch and triton (not the CPU-only .venv): the whole test
# suite compiled, the GPU-only tests, the harness on the GPU and every benchmark, into bench/results/<gpu>-<date>/.
gpu:
	bash bench/gpu.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache site
