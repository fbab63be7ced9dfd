"""SPG names parameters by the inner module: the same names, importance and checkpoints with or
without a ``torch.compile`` or DataParallel wrapper (DDP: tests/distributed/test_ddp.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from spg_fast import SPG
from tests.helpers import MultiHeadNet, make_tasks

WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "compile": torch.compile,
    "data_parallel": nn.DataParallel,
}


@pytest.mark.parametrize("wrap", WRAPPERS.values(), ids=WRAPPERS.keys())
def test_wrapped_model_has_the_plain_models_names_and_importance(
    wrap: Callable[[nn.Module], nn.Module],
) -> None:
    tasks = make_tasks(n_tasks=2)
    torch.manual_seed(0)
    net = MultiHeadNet(n_tasks=2)
    plain = MultiHeadNet(n_tasks=2)
    plain.load_state_dict(net.state_dict())
    wrapped = SPG(wrap(net), heads="heads", backend="torch")
    single = SPG(plain, heads="heads", backend="torch")
    assert list(wrapped.shared_parameters) == list(single.shared_parameters)
    assert list(wrapped.head_parameters) == list(single.head_parameters)
    for task, batches in enumerate(tasks):
        wrapped.end_task(task, batches)
        single.end_task(task, batches)
    for name, a in single.importance.items():
        assert torch.equal(wrapped.importance[name], a), name
    # Checkpoints cross both ways.
    into_plain = SPG(MultiHeadNet(n_tasks=2), heads="heads", backend="torch")
    into_plain.load_state_dict(wrapped.state_dict())
    into_wrapped = SPG(wrap(MultiHeadNet(n_tasks=2)), heads="heads", backend="torch")
    into_wrapped.load_state_dict(single.state_dict())
    for name, a in single.importance.items():
        assert torch.equal(into_plain.importance[name], a) and torch.equal(
            into_wrapped.importance[name], a
        ), name


def test_head_module_of_the_inner_model_is_accepted_through_the_wrapper() -> None:
    net = MultiHeadNet()
    spg = SPG(nn.DataParallel(net), heads=net.heads)
    assert set(spg.head_parameters) == {
        n for n, _ in net.named_parameters() if n.startswith("heads.")
    }
