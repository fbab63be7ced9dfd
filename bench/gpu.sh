#!/usr/bin/env bash
# `make gpu`: on a machine with a CUDA GPU, the whole test suite compiled (no Triton interpreter), the GPU-only
# tests included, the harness's digits run on the GPU, then every benchmark with --e2e. Everything lands in
# bench/results/<gpu>-<date>/ (or $RESULTS).
# PY picks the interpreter (default python3: the machine's CUDA build of torch, not the CPU-only .venv);
# PYTEST_ARGS and BENCH_ARGS are passed through.
set -uo pipefail
PY=${PY:-python3}
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || exit 1
out=${RESULTS:-bench/results/$gpu-$(date -u +%F)}
mkdir -p "$out"
{ date -u; nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    >"$out/environment.txt" 2>&1
# shellcheck disable=SC2086
env -u TRITON_INTERPRET $PY -m pytest -q -rfEs --durations=25 -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 \
    | tee "$out/pytest.txt"
tests=${PIPESTATUS[0]}
# The harness: SPG on the embedded digits sequence (results and time per task in results.json) on the GPU, then
# on this machine's CPU for the time per task.
for device in cuda cpu; do
    $PY -m spg_fast.cli run --device $device --out "$out/harness-digits-$device" 2>&1 \
        | tee "$out/harness-digits-$device.txt"
done
# shellcheck disable=SC2086
$PY -m bench.run --out "$out" --e2e ${BENCH_ARGS:-} 2>&1 | tee "$out/raw-output.txt"
bench=${PIPESTATUS[0]}
# Each step as a training loop sees it: synchronised, pipelined, kernels alone, host alone, CUDA graph.
$PY -m bench.call_modes --out "$out/call-modes" 2>&1 | tee "$out/call-modes.txt"
bench=$((bench || PIPESTATUS[0]))
# The host's share with the launches stubbed (CPU tensors, Triton's interpreter), in the real loop.
TRITON_INTERPRET=1 $PY -m bench.host_overhead --out "$out/host-overhead" 2>&1 | tee "$out/host-overhead.txt"
echo "tests exit $tests, benchmarks exit $bench"
exit $((tests || bench))
