"""HAT and EWC against literal references of their updates on tiny networks: EWC's Fisher diagonal,
its running mean over tasks and its penalty's gradient; HAT's slope schedule, attention regulariser,
keep factors (also across a flatten), and one step's masked, compensated and clipped gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spg_fast.harness.config import ConfigError
from spg_fast.harness.methods import Batch, MethodOptions, TaskData, make
from spg_fast.harness.methods import ewc as ewc_module
from spg_fast.harness.methods.hat import HatNet
from spg_fast.harness.models import MultiHeadNet, build_model


def _data(x: torch.Tensor, y: torch.Tensor, task: int = 0) -> TaskData:
    def batches(size: int):
        for i in range(0, len(y), size):
            yield x[i : i + size], y[i : i + size], float(len(y[i : i + size]))

    return TaskData(task, len(y), 64, batches)


# ---------------------------------------------------------------------------------------- EWC


def test_ewc_fisher_diagonal_by_hand():
    """A linear head on the raw inputs (logits = A x + c): per sample dCE/dA = (p - onehot) x^T,
    dCE/dc = p - onehot. 25 samples make batches of 20 and 5; the Fisher diagonal is
    (20 * mean_1^2 + 5 * mean_2^2) / 25 of the batches' mean gradients."""
    torch.manual_seed(0)
    net = MultiHeadNet(nn.Flatten(), 2, [3]).double()
    x = torch.randn(25, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (25,))
    fisher = ewc_module.fisher_diagonal(net, _data(x, y))
    a, c = net.heads[0].weight.detach(), net.heads[0].bias.detach()
    want_a, want_c = torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for lo, hi in ((0, 20), (20, 25)):
        err = torch.softmax(x[lo:hi] @ a.T + c, 1) - F.one_hot(y[lo:hi], 3)
        want_a += (hi - lo) * (err.T @ x[lo:hi] / (hi - lo)) ** 2
        want_c += (hi - lo) * err.mean(0) ** 2
    torch.testing.assert_close(fisher["heads.0.weight"], want_a / 25, rtol=1e-12, atol=0)
    torch.testing.assert_close(fisher["heads.0.bias"], want_c / 25, rtol=1e-12, atol=0)


def test_ewc_fisher_is_a_running_mean_over_tasks_with_the_last_anchor(monkeypatch):
    net = MultiHeadNet(nn.Flatten(), 1, [1]).double()
    method = make("ewc", MethodOptions())
    method.bind(net)
    fishers = iter([torch.tensor([[4.0]]), torch.tensor([[1.0]]), torch.tensor([[7.0]])])
    monkeypatch.setattr(
        ewc_module,
        "fisher_diagonal",
        lambda *a: {"heads.0.weight": next(fishers), "heads.0.bias": torch.zeros(1)},
    )
    seen = []
    for weight in (0.5, -1.0, 2.0):
        with torch.no_grad():
            net.heads[0].weight.fill_(weight)
        method.end_task(net, _data(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)), None)
        seen.append(
            (method.fisher["heads.0.weight"].item(), method.anchor["heads.0.weight"].item())
        )
    # F_0 = 4; F_1 = (1 + 1 * 4) / 2 = 2.5; F_2 = (7 + 2 * 2.5) / 3 = 4; anchors: the last weights
    assert seen == [(4.0, 0.5), (2.5, -1.0), (4.0, 2.0)]


def test_ewc_penalty_and_its_gradient_by_hand():
    """lambda 2; trunk W (2x2) with W* and F literal, heads with F = 0: penalty = lambda/2 *
    sum F (W - W*)^2 = 1 * (0.5 * 1 + 1 * 0 + 0.25 * 4 + 2 * 1) = 3.5; its gradient
    lambda * F * (W - W*) = [[1, 0], [1, -4]], added to the cross-entropy's."""
    net = MultiHeadNet(nn.Sequential(nn.Linear(2, 2, bias=False)), 2, [2]).double()
    with torch.no_grad():
        net.trunk[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    method = make("ewc", MethodOptions(ewc_lambda=2.0))
    method.bind(net)
    method.tasks = 1
    method.anchor = {n: p.detach().clone() for n, p in net.named_parameters()}
    method.anchor["trunk.0.weight"] = torch.tensor([[0.0, 2.0], [1.0, 5.0]], dtype=torch.float64)
    method.fisher = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    method.fisher["trunk.0.weight"] = torch.tensor([[0.5, 1.0], [0.25, 2.0]], dtype=torch.float64)
    assert method.penalty().item() == 3.5
    x = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    batch = Batch(x, y, 0, 2.0, 0.0)
    method.loss(net, batch).backward()
    with_penalty = net.trunk[0].weight.grad.clone()
    net.zero_grad()
    F.cross_entropy(net(x, 0), y).backward()
    penalty_grad = with_penalty - net.trunk[0].weight.grad
    want = torch.tensor([[1.0, 0.0], [1.0, -4.0]], dtype=torch.float64)
    torch.testing.assert_close(penalty_grad, want, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------- HAT


def _hat_net() -> HatNet:
    """x (2) -> Linear(2, 2) -> ReLU -> Linear(2, 2) -> ReLU -> head (2 classes), two tasks,
    float64, literal weights and embeddings."""
    base = MultiHeadNet(
        nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU()), 2, [2, 2]
    )
    net = HatNet(base, s_max=400.0).double()
    values = {
        "trunk.0.weight": [[0.5, -0.3], [0.8, 0.2]],
        "trunk.0.bias": [0.1, 0.05],
        "trunk.2.weight": [[0.7, 0.4], [-0.6, 0.9]],
        "trunk.2.bias": [0.02, 0.1],
        "heads.1.weight": [[0.3, -0.5], [-0.2, 0.6]],
        "heads.1.bias": [0.0, 0.1],
        "embeddings.0.weight": [[3.0, -3.0], [0.004, -0.002]],
        "embeddings.1.weight": [[-3.0, 3.0], [0.003, 0.001]],
    }
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name in values:
                p.copy_(torch.tensor(values[name]))
    return net


def _hat(net: HatNet, **options) -> object:
    method = make("hat", MethodOptions(**options))
    method.bind(net)
    return method


def test_hat_slope_rises_linearly_within_an_epoch():
    method = _hat(_hat_net())
    assert method.slope(0.0) == 1 / 400
    assert method.slope(0.5) == pytest.approx((400 - 1 / 400) * 0.5 + 1 / 400, rel=1e-15)
    assert method.slope(1.0) == pytest.approx(400, rel=1e-15)


def test_hat_keep_factors_and_regulariser_by_hand():
    net = _hat_net()
    method = _hat(net, hat_c=0.75)
    gates = [torch.tensor([0.2, 0.6]), torch.tensor([0.9, 0.4])]
    assert method.regulariser(gates).item() == pytest.approx((0.2 + 0.6 + 0.9 + 0.4) / 4)
    # task 0 claimed unit 0 of layer 1 and unit 1 of layer 2
    method._set_mask([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
    assert method.keep["trunk.0.weight"].tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert method.keep["trunk.0.bias"].tolist() == [0.0, 1.0]
    # 1 - min(post, pre): post (rows) 0, 1; pre (columns) 1, 0
    assert method.keep["trunk.2.weight"].tolist() == [[1.0, 1.0], [0.0, 1.0]]
    assert method.keep["trunk.2.bias"].tolist() == [1.0, 0.0]
    # the free units are unit 1 of layer 1 and unit 0 of layer 2
    assert method.regulariser(gates).item() == pytest.approx((0.6 + 0.9) / 2)


def test_hat_keep_factors_across_a_flatten():
    """A Linear layer after a Conv2d one: each input feature belongs to its channel's pixels."""
    base = MultiHeadNet(
        nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(8, 3)), 3, [2]
    )  # 2 channels of 2x2 pixels
    net = HatNet(base, 400.0)
    keep = net.keep_factors([torch.tensor([1.0, 0.25]), torch.tensor([0.5, 0.0, 1.0])])
    assert keep["trunk.0.weight"].flatten().tolist() == [0.0, 0.75]
    assert keep["trunk.2.weight"].tolist() == [
        [0.5] * 4 + [0.75] * 4,
        [1.0] * 8,
        [0.0] * 4 + [0.75] * 4,
    ]


def _reference_loss(net: HatNet, x, y, task: int, s: float, c: float, mask) -> torch.Tensor:
    """HAT's loss written out: gates sigmoid(s e), each layer's ReLU output times its gates,
    cross-entropy plus c * sum g (1 - m) / sum (1 - m)."""
    p = dict(net.named_parameters())
    g1 = torch.sigmoid(s * p["embeddings.0.weight"][task])
    g2 = torch.sigmoid(s * p["embeddings.1.weight"][task])
    h = torch.relu(x @ p["trunk.0.weight"].T + p["trunk.0.bias"]) * g1
    h = torch.relu(h @ p["trunk.2.weight"].T + p["trunk.2.bias"]) * g2
    logits = h @ p[f"heads.{task}.weight"].T + p[f"heads.{task}.bias"]
    free = [1 - m for m in mask]
    reg = ((g1 * free[0]).sum() + (g2 * free[1]).sum()) / (free[0].sum() + free[1].sum())
    return F.cross_entropy(logits, y) + c * reg


@pytest.mark.parametrize("clipgrad", [10_000.0, 1e-3])
def test_hat_one_step_of_masked_compensated_clipped_gradient_by_hand(clipgrad):
    net = _hat_net()
    mask = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0]).double()]
    method = _hat(net, hat_c=0.75, hat_clipgrad=clipgrad)
    method._set_mask(mask)
    x = torch.tensor([[0.5, 1.0], [-0.4, 0.8], [1.2, -0.1]], dtype=torch.float64)
    y = torch.tensor([1, 0, 1])
    batch = Batch(x, y, 1, 3.0, 0.25)
    s = (400 - 1 / 400) * 0.25 + 1 / 400

    reference = _hat_net()
    _reference_loss(reference, x, y, 1, s, 0.75, mask).backward()
    want = {n: q.grad.clone() for n, q in reference.named_parameters() if q.grad is not None}
    keep = {
        "trunk.0.weight": [[0.0, 0.0], [1.0, 1.0]],
        "trunk.0.bias": [0.0, 1.0],
        "trunk.2.weight": [[1.0, 1.0], [0.0, 1.0]],
        "trunk.2.bias": [1.0, 0.0],
    }
    for name, factor in keep.items():
        want[name] *= torch.tensor(factor, dtype=torch.float64)
    for name in ("embeddings.0.weight", "embeddings.1.weight"):
        e = dict(reference.named_parameters())[name].detach()
        want[name] *= 400 / s * (torch.cosh(torch.clamp(s * e, -50, 50)) + 1) / (torch.cosh(e) + 1)
    norm = math.sqrt(sum(g.square().sum().item() for g in want.values()))
    if norm > clipgrad:
        want = {n: g * clipgrad / (norm + 1e-6) for n, g in want.items()}

    method.loss(net, batch).backward()
    method.before_step(net, batch)
    got = {n: q.grad for n, q in net.named_parameters() if q.grad is not None}
    assert got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-12, atol=1e-15, msg=name)
    assert got["embeddings.0.weight"][0].abs().sum() == 0  # task 0's embeddings are untouched
    if clipgrad < 1:
        total = math.sqrt(sum(g.square().sum().item() for g in got.values()))
        assert total == pytest.approx(clipgrad, rel=1e-5)


def test_hat_clamps_embeddings_and_accumulates_its_gates_at_s_max():
    net = _hat_net()
    method = _hat(net, hat_thres_emb=6.0)
    with torch.no_grad():
        net.embeddings[0].weight[1] = torch.tensor([7.5, -9.0])
    method.after_step(net, Batch(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), 1, 1, 0))
    assert net.embeddings[0].weight[1].tolist() == [6.0, -6.0]
    method.end_task(net, _data(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), 0), None)
    first = [m.clone() for m in method.mask]
    torch.testing.assert_close(first[0], torch.sigmoid(400 * net.embeddings[0].weight[0].detach()))
    method.end_task(net, _data(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), 1), None)
    for m, before, e in zip(method.mask, first, net.embeddings, strict=True):
        torch.testing.assert_close(m, torch.maximum(before, torch.sigmoid(400 * e.weight[1])))
    usage = method.usage()
    units = torch.cat(method.mask)
    assert usage["of"] == "units" and usage["head_scale"] is None
    assert usage["above_0.5"] == (units > 0.5).double().mean().item()


def test_hat_evaluates_with_the_gates_at_s_max():
    net = _hat_net()
    x = torch.tensor([[0.5, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(net(x, 1), net.gated_forward(x, 1, 400.0)[0])


def test_hat_needs_a_trunk_of_linear_and_conv_layers():
    net = build_model("resnet18", (3, 8, 8), [2])
    with pytest.raises(ConfigError, match="hat gates the units of Linear and Conv2d layers"):
        HatNet(net, 400.0)
