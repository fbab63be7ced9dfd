"""The fewest bytes each benchmarked op must move per parameter element: every input read once,
every output written once. ``p`` is the parameter/gradient dtype's size, ``k`` the stored keep
factor's (``spg_fast.storage``: float32 4, bfloat16 2, uint8 1)."""

from __future__ import annotations

# Bytes per element of each stored keep format.
KEEP_BYTES = {"float32": 4, "bfloat16": 2, "uint8": 1}

# op -> reads and writes of parameter-sized streams, and of the stored keep factors.
STREAMS = {
    "mask": dict(param_reads=1, param_writes=1, keep_reads=1, keep_writes=0),  # g, k -> g
    # the update mask around an optimizer step: p, p before the step, k -> p
    "update_mask": dict(param_reads=2, param_writes=1, keep_reads=1, keep_writes=0),
    "sgd_momentum": dict(param_reads=3, param_writes=2, keep_reads=0, keep_writes=0),  # p, g, buf
    # fused masked steps, either mask mode (the update mask reads nothing more)
    "sgd_momentum_masked": dict(param_reads=3, param_writes=2, keep_reads=1, keep_writes=0),
    "adamw": dict(param_reads=4, param_writes=3, keep_reads=0, keep_writes=0),  # p, g, m, v
    "adamw_masked": dict(param_reads=4, param_writes=3, keep_reads=1, keep_writes=0),
    # h, k -> k; the design's two passes read h twice (statistics, then the update): 16 B per
    # float32 element with float32 keep factors, 10 B with uint8 ones.
    "importance": dict(param_reads=2, param_writes=0, keep_reads=1, keep_writes=1),
    # The two passes of the fused importance kernel: statistics read h; the update reads h and k,
    # writes k.
    "importance_stats": dict(param_reads=1, param_writes=0, keep_reads=0, keep_writes=0),
    "importance_update": dict(param_reads=1, param_writes=0, keep_reads=1, keep_writes=1),
    "copy": dict(param_reads=1, param_writes=1, keep_reads=0, keep_writes=0),
}


def bytes_per_element(op: str, param_bytes: int = 4, keep_bytes: int = 4) -> int:
    """Bytes ``op`` moves per parameter element with ``param_bytes``-byte parameters and
    ``keep_bytes``-byte stored keep factors (``KEEP_BYTES``)."""
    s = STREAMS[op]
    return (s["param_reads"] + s["param_writes"]) * param_bytes + (
        s["keep_reads"] + s["keep_writes"]
    ) * keep_bytes


def table() -> str:
    """Markdown: bytes per element for each op, parameter dtype and keep storage format."""
    formats = list(KEEP_BYTES)
    header = " | ".join(f"{p} / {k} keep" for p in ("fp32", "bf16") for k in formats)
    lines = [f"| op | {header} |", "|---|" + "---|" * (2 * len(formats))]
    for op in STREAMS:
        cells = " | ".join(
            str(bytes_per_element(op, param, KEEP_BYTES[k])) for param in (4, 2) for k in formats
        )
        lines.append(f"| {op} | {cells} |")
    return "\n".join(lines)
