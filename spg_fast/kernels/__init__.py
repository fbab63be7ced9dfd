"""spg-fast's native code: the Triton kernels (``spg_fast.kernels.triton``) and the C optimizer
steps for CPU tensors (``spg_fast.kernels.cpu``), whose sources live in the repository's top-level
``kernels/`` folder (see its README). That folder has no ``__init__.py`` of its own, so it never
shadows PyPI's ``kernels`` package."""
