"""Triton kernels of SPG's ops, one module per op (``soft_mask`` with ``scale_updates_``,
``accumulate``, ``sgd_step``, ``adam_step``), each a ``torch.library`` custom op; the shared
launch machinery is in ``multi_tensor``, ``tiles``, ``rounding``, ``keep_codec``, ``masked_step``
and ``custom_ops``. Importing this package does not import Triton (``dtypes`` is Triton-free)."""
