"""MuSGD: Newton-Schulz, the two updates of a muon group, SGD equivalence, state round-trip, groups and auto."""

import copy

import pytest
import torch
from torch import nn

from yolotrain.engine.optim import (
    AUTO_MUSGD_MIN_ITERATIONS,
    MuSGD,
    build_param_groups,
    class_branch_prefixes,
    make_optimizer,
    newton_schulz_orthogonalise,
    resolve_auto_optimizer,
)
from yolotrain.engine.schedule import TrainSchedule


class SmallNet(nn.Module):
    """conv (4-D weight, no bias) + batch norm + linear (2-D weight and a bias), on (B, 2, 6, 6) inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).flatten(1))


class TinyHead(nn.Module):
    """Names like a detection head: box branch `cv2`, class branches `cv3` and `one2one_cv3`."""

    def __init__(self):
        super().__init__()
        self.cv2 = nn.ModuleList([nn.Conv2d(4, 4, 1)])
        self.cv3 = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))])
        self.one2one_cv3 = copy.deepcopy(self.cv3)


class TinyDetector(nn.Module):
    """`model.0` conv, `model.1` batch norm, `model.2` the head, reachable as `.head` like DetectionModel."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), TinyHead())

    @property
    def head(self):
        return self.model[-1]


def _quadratic_loss(model, inputs, target):
    return (model(inputs) - target).pow(2).mean()


def _train(model, optimizer, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(16, 2, 6, 6, generator=generator)
    target = torch.randn(16, 3, generator=generator)
    losses = []
    for _ in range(steps):
        loss = _quadratic_loss(model, inputs, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _matrix_with_singular_values(rows, cols, singular_values, seed):
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, len(singular_values), generator=generator))
    right, _ = torch.linalg.qr(torch.randn(cols, len(singular_values), generator=generator))
    return left @ torch.diag(singular_values) @ right.T


def _ids(params):
    return {id(p) for p in params}


@pytest.mark.numeric
@pytest.mark.parametrize("rows, cols", [(8, 16), (16, 8)])
def test_newton_schulz_pushes_singular_values_near_one(rows, cols):
    matrix = _matrix_with_singular_values(rows, cols, torch.logspace(-1, 1, min(rows, cols)), seed=rows)
    before = torch.linalg.svdvals(matrix)
    assert before.max() / before.min() > 50  # a wide spread to begin with
    orthogonal = newton_schulz_orthogonalise(matrix)
    assert orthogonal.shape == matrix.shape and orthogonal.dtype == matrix.dtype
    after = torch.linalg.svdvals(orthogonal)
    assert after.min() > 0.6 and after.max() < 1.2
    # Batched call: each matrix is orthogonalised on its own.
    batch = torch.stack([matrix, 100 * matrix.flip(0)])
    assert torch.allclose(newton_schulz_orthogonalise(batch)[0], orthogonal)


def test_musgd_decreases_quadratic_loss():
    torch.manual_seed(0)
    model = SmallNet()
    optimizer = make_optimizer("MuSGD", build_param_groups(model, 0.0, muon=True), lr=0.01, momentum=0.9)
    assert isinstance(optimizer, MuSGD)
    losses = _train(model, optimizer, steps=50)
    assert losses[-1] < losses[0] / 100


def test_muon_update_alone_decreases_quadratic_loss():
    torch.manual_seed(0)
    model = SmallNet()
    muon_only = [{"params": [model.conv.weight, model.fc.weight], "muon": True}]
    optimizer = MuSGD(muon_only, lr=0.05, momentum=0.9, muon_scale=1.0, sgd_scale=0.0)
    losses = _train(model, optimizer, steps=50)
    assert losses[-1] < losses[0] / 10


@pytest.mark.numeric
def test_muon_group_first_step_is_muon_then_sgd():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(6, 2, 3, 3))  # as a matrix 6 x 18: wide, scale 1
    linear = nn.Parameter(torch.randn(12, 3))  # tall: scale (12 / 3) ** 0.5 = 2
    start = [weight.detach().clone(), linear.detach().clone()]
    grads = [torch.randn_like(weight), torch.randn_like(linear)]
    weight.grad, linear.grad = grads[0].clone(), grads[1].clone()
    lr, beta, decay, muon_scale, sgd_scale = 0.1, 0.9, 0.01, 0.2, 0.5
    group = {"params": [weight, linear], "muon": True, "weight_decay": decay}
    MuSGD([group], lr=lr, momentum=beta, muon_scale=muon_scale, sgd_scale=sgd_scale).step()
    for param, initial, grad, shape_scale in zip([weight, linear], start, grads, [1.0, 2.0]):
        # Zero buffers: the Nesterov step is a multiple of the gradient, which Newton-Schulz normalises away.
        orthogonal = newton_schulz_orthogonalise(grad.reshape(grad.shape[0], -1)).reshape(grad.shape)
        after_muon = initial - lr * muon_scale * shape_scale * orthogonal
        decayed_grad = grad + decay * after_muon
        expected = after_muon - lr * sgd_scale * (decayed_grad + beta * decayed_grad)
        assert torch.allclose(param, expected, atol=1e-6)


@pytest.mark.numeric
def test_muon_update_uses_nesterov_momentum_over_two_steps():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 2, 3, 3))
    initial = weight.detach().clone()
    lr, beta = 0.1, 0.9
    optimizer = MuSGD([{"params": [weight], "muon": True}], lr=lr, momentum=beta, muon_scale=1.0, sgd_scale=0.0)
    momentum = torch.zeros_like(weight)
    expected = initial.clone()
    for _ in range(2):
        grad = torch.randn_like(weight)
        weight.grad = grad.clone()
        optimizer.step()
        momentum = beta * momentum + (1 - beta) * grad
        nesterov = beta * momentum + (1 - beta) * grad
        expected -= lr * newton_schulz_orthogonalise(nesterov.reshape(4, -1)).reshape(weight.shape)
    assert torch.allclose(weight, expected, atol=1e-6)


@pytest.mark.numeric
def test_non_muon_group_matches_torch_sgd_nesterov():
    torch.manual_seed(0)
    model = SmallNet()
    reference = copy.deepcopy(model)
    ours = MuSGD([{"params": model.parameters(), "muon": False}], lr=0.02, momentum=0.8, weight_decay=0.01)
    theirs = torch.optim.SGD(reference.parameters(), lr=0.02, momentum=0.8, weight_decay=0.01, nesterov=True)
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        inputs, target = torch.randn(8, 2, 6, 6, generator=generator), torch.randn(8, 3, generator=generator)
        for net, optimizer in ((model, ours), (reference, theirs)):
            optimizer.zero_grad()
            _quadratic_loss(net, inputs, target).backward()
            optimizer.step()
        for mine, torch_param in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(mine, torch_param, atol=1e-6)
    assert not any(torch.equal(a, b) for a, b in zip(model.parameters(), SmallNet().parameters()))


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = SmallNet()
    optimizer = make_optimizer("MuSGD", build_param_groups(model, 0.001, muon=True), lr=0.01, momentum=0.9)
    _train(model, optimizer, steps=5)
    assert set(optimizer.state[model.conv.weight]) == {"momentum_buffer", "muon_momentum_buffer"}
    assert set(optimizer.state[model.fc.bias]) == {"momentum_buffer"}

    restored_model = copy.deepcopy(model)
    restored = make_optimizer("MuSGD", build_param_groups(restored_model, 0.001, muon=True), lr=0.5, momentum=0.5)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert [g["lr"] for g in restored.param_groups] == [g["lr"] for g in optimizer.param_groups]

    _train(model, optimizer, steps=5, seed=1)
    _train(restored_model, restored, steps=5, seed=1)
    for original, copied in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(original, copied)


def test_param_groups_for_musgd_and_boosted_class_branch_lr():
    model = TinyDetector()
    prefixes = class_branch_prefixes(model)
    assert prefixes == ("model.2.cv3.", "model.2.one2one_cv3.")
    groups = build_param_groups(model, 0.0005, muon=True, boosted_prefixes=prefixes)
    by_name = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == [
        "weights", "norm", "bias", "muon", "norm_boosted", "bias_boosted", "muon_boosted"
    ]  # fmt: skip
    assert [g["muon"] for g in groups] == [False, False, False, True, False, False, True]
    assert [g["bias_group"] for g in groups] == [False, False, True, False, False, True, False]
    assert [g["weight_decay"] for g in groups] == [0.0005, 0.0, 0.0, 0.0005, 0.0, 0.0, 0.0005]

    head = model.head
    assert _ids(by_name["muon"]["params"]) == _ids([model.model[0].weight, head.cv2[0].weight])
    assert _ids(by_name["muon_boosted"]["params"]) == _ids([head.cv3[0][0].weight, head.one2one_cv3[0][0].weight])
    assert _ids(by_name["norm"]["params"]) == _ids([model.model[1].weight])
    assert _ids(by_name["norm_boosted"]["params"]) == _ids([head.cv3[0][1].weight, head.one2one_cv3[0][1].weight])
    assert by_name["weights"]["params"] == []
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(_ids(grouped)) and _ids(grouped) == _ids(model.parameters())

    optimizer = make_optimizer("MuSGD", groups, lr=0.01, momentum=0.9)
    for group in optimizer.param_groups:
        expected = 0.03 if group["name"].endswith("_boosted") else 0.01
        assert group["lr"] == pytest.approx(expected) and group["initial_lr"] == pytest.approx(expected)
        assert group["momentum"] == 0.9

    # The schedule scales every group by the same factor, so the class branch keeps its 3x after warmup.
    schedule = TrainSchedule(
        initial_lrs=[g["initial_lr"] for g in optimizer.param_groups],
        bias_groups=[g["bias_group"] for g in optimizer.param_groups],
        epochs=10, num_batches=50, warmup_epochs=1, warmup_bias_lr=0.1, warmup_momentum=0.8,
        momentum=0.9, lrf=0.01, cos_lr=False, nominal_batch=64, batch_size=16,
    )  # fmt: skip
    lrs = dict(zip([g["name"] for g in groups], schedule.apply(optimizer, epoch=5, iteration=0)))
    assert lrs["muon_boosted"] == pytest.approx(3 * lrs["muon"])
    assert lrs["bias_boosted"] == pytest.approx(3 * lrs["bias"])


def test_default_param_groups_are_unchanged_without_muon():
    groups = build_param_groups(TinyDetector(), 0.0005)
    assert [g["name"] for g in groups] == ["weights", "norm", "bias"]
    assert all("muon" not in g and "lr_scale" not in g for g in groups)


def test_auto_picks_musgd_for_long_runs():
    assert resolve_auto_optimizer(AUTO_MUSGD_MIN_ITERATIONS + 1, 80) == ("MuSGD", 0.01, 0.9)
    assert resolve_auto_optimizer(AUTO_MUSGD_MIN_ITERATIONS, 80)[0] == "AdamW"
