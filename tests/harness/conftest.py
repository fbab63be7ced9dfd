"""The harness's tests train tiny networks, which run fastest on one thread; on a loaded machine
torch's default (every core) made them several times slower (see spg_fast.harness.threads)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
