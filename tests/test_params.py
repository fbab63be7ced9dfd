"""Splitting a model into shared and head parameters, and the errors for bad head specifications."""

from __future__ import annotations

import pytest
from torch import nn

from spg_fast._params import partition
from tests.helpers import MultiHeadNet


@pytest.mark.parametrize("heads", ["heads", "heads.", ["heads.0", "heads.1", "heads.2"]])
def test_prefixes_and_modules_agree(heads):
    model = MultiHeadNet()
    by_prefix = partition(model, heads)
    by_module = partition(model, model.heads)
    assert (
        list(by_prefix.heads)
        == list(by_module.heads)
        == [f"heads.{i}.{w}" for i in range(3) for w in ("weight", "bias")]
    )
    assert list(by_prefix.shared) == [
        "trunk.0.weight",
        "trunk.0.bias",
        "trunk.3.weight",
        "trunk.3.bias",
    ]


def test_prefix_matches_whole_name_components():
    model = nn.ModuleDict({"head": nn.Linear(2, 2), "headless": nn.Linear(2, 2)})
    assert list(partition(model, "head").shared) == ["headless.weight", "headless.bias"]


def test_frozen_parameters_are_neither_shared_nor_heads():
    model = MultiHeadNet()
    model.trunk[0].weight.requires_grad_(False)
    parts = partition(model, model.heads)
    assert "trunk.0.weight" not in parts.shared


@pytest.mark.parametrize(
    "heads, message",
    [
        ([], "heads is empty"),
        ("decoder", "prefix 'decoder' matches no trainable parameter"),
        (nn.Linear(2, 2), "not a submodule"),
        ("", "prefix '' matches no trainable parameter"),
        ([3], "must be nn.Module or str"),
    ],
)
def test_bad_head_specs(heads, message):
    with pytest.raises((ValueError, TypeError), match=message):
        partition(MultiHeadNet(), heads)


def test_heads_covering_everything_leave_nothing_to_protect():
    model = MultiHeadNet()
    with pytest.raises(ValueError, match="covers every trainable parameter"):
        partition(model, [model.trunk, model.heads])


def test_frozen_head_module_names_nothing():
    model = MultiHeadNet()
    model.heads[1].requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        partition(model, [model.heads[0], model.heads[1]])


def test_head_tied_to_a_shared_parameter_is_an_error():
    model = MultiHeadNet(hidden=3, n_classes=3)
    model.heads[0].weight = model.trunk[3].weight
    with pytest.raises(
        ValueError,
        match=r"'heads.0.weight' is the same tensor as shared parameter 'trunk.3.weight'",
    ):
        partition(model, "heads")
