"""The fewest bytes each benchmarked op must move per parameter element: every input read once,
every output written once. ``p`` is the parameter/gradient dtype's size, ``a`` the importance
dtype's (float32: 4)."""

from __future__ import annotations

# op -> (reads, writes) as multiples of the parameter size, plus importance reads and writes.
STREAMS = {
    "mask": dict(
        param_reads=1, param_writes=1, importance_reads=1, importance_writes=0
    ),  # g, A -> g
    "sgd_momentum": dict(
        param_reads=3, param_writes=2, importance_reads=0, importance_writes=0
    ),  # p, g, buf
    "sgd_momentum_masked": dict(
        param_reads=3, param_writes=2, importance_reads=1, importance_writes=0
    ),
    "adamw": dict(
        param_reads=4, param_writes=3, importance_reads=0, importance_writes=0
    ),  # p, g, m, v
    "adamw_masked": dict(param_reads=4, param_writes=3, importance_reads=1, importance_writes=0),
    # h, A -> A; the design's two passes read h twice (statistics, then the update): 16 B per
    # float32 element.
    "importance": dict(param_reads=2, param_writes=0, importance_reads=1, importance_writes=1),
    # The two passes of the fused importance kernel: statistics read h; the update reads h and A,
    # writes A.
    "importance_stats": dict(
        param_reads=1, param_writes=0, importance_reads=0, importance_writes=0
    ),
    "importance_update": dict(
        param_reads=1, param_writes=0, importance_reads=1, importance_writes=1
    ),
    "copy": dict(param_reads=1, param_writes=1, importance_reads=0, importance_writes=0),
}


def bytes_per_element(op: str, param_bytes: int = 4, importance_bytes: int = 4) -> int:
    s = STREAMS[op]
    return (s["param_reads"] + s["param_writes"]) * param_bytes + (
        s["importance_reads"] + s["importance_writes"]
    ) * importance_bytes


def table() -> str:
    """Markdown: bytes per element for each op and parameter dtype (float32 importance)."""
    lines = ["| op | fp32 | bf16 / fp16 |", "|---|---|---|"]
    for op in STREAMS:
        lines.append(f"| {op} | {bytes_per_element(op, 4)} | {bytes_per_element(op, 2)} |")
    return "\n".join(lines)
