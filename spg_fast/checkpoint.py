"""SPG in ``torch.distributed.checkpoint`` (DCP), the way FSDP2 models are checkpointed.

DCP loads in place: it asks each entry for its ``state_dict()``, reads the saved values into those
tensors, then hands them to ``load_state_dict``. ``SPG.state_dict()`` cannot serve that directly:
before the first task it has no keep-factor tensors to read into, and after it they are SPG's live
ones, which a checkpoint that then fails validation would already have overwritten. ``SPGState``
offers DCP a copy of the stored keep factors (keep factors of 1 before the first task), laid out as
the parameters (DTensor shards on an FSDP2 model, so DCP reshards across different world sizes),
and installs what DCP read through ``SPG.load_state_dict``, which validates it on every rank before
anything changes::

    state = {"model": get_model_state_dict(model), "spg": SPGState(spg)}
    dcp.save(state, checkpoint_id=path)
    ...
    dcp.load(state, checkpoint_id=path)   # then set_model_state_dict(model, state["model"])
"""

from __future__ import annotations

from typing import Any

from spg_fast.spg import SPG


class SPGState:
    """A ``torch.distributed.checkpoint.stateful.Stateful`` for ``spg``; see the module docstring.
    Holds a copy of the keep factors only while DCP works with its ``state_dict()``.

    Args:
        spg: the SPG object whose state goes into the checkpoint.

    Raises:
        TypeError: ``spg`` is not an ``spg_fast.SPG``.
    """

    def __init__(self, spg: SPG) -> None:
        if not isinstance(spg, SPG):
            raise TypeError(f"SPGState wraps an SPG, got {type(spg).__name__}")
        self.spg = spg

    def state_dict(self) -> dict[str, Any]:
        """``SPG.state_dict()`` with a copy of every shared parameter's stored keep factors (keep
        factors of 1, no importance, before the first task).

        Returns:
            ``{"format", "tasks_finished", "keep": {name: tensor}}``, the tensors DTensors on an
                FSDP2 model (each rank's shard).
        """
        state = self.spg.state_dict()
        keep = {
            name: self.spg._stored_like(name, param).clone()
            for name, param in self.spg.shared_parameters.items()
        }
        return {**state, "keep": keep}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Install what DCP read (``SPG.load_state_dict``; the keep factors of a checkpoint taken
        before the first task are dropped).

        Args:
            state_dict: ``state_dict()``'s structure, filled by ``torch.distributed.checkpoint``.
        """
        tasks = state_dict.get("tasks_finished")
        self.spg.load_state_dict({**state_dict, "keep": state_dict.get("keep") if tasks else {}})
