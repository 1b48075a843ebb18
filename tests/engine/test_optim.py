"""Parameter groups, optimizer construction, the auto choice and OptimizerStepper (accumulation, clipping, state)."""

import pytest
import torch
from torch import nn

from yolotrain.engine.ema import ModelEMA
from yolotrain.engine.optim import (
    OptimizerStepper,
    build_param_groups,
    make_optimizer,
    resolve_auto_optimizer,
    scaled_weight_decay,
)
from yolotrain.errors import CfgError


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TinyNet(nn.Module):
    """conv (no bias, frozen) + bn + group norm + a Linear whose name contains 'bn' + linear + layer norm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.bn_named_linear = nn.Linear(4, 4)  # a name must not make a layer "normalisation"
        self.head = nn.Linear(4, 2)
        self.ln = nn.LayerNorm(2)
        self.conv.weight.requires_grad_(False)

    def forward(self, x):
        x = self.gn(self.bn(self.conv(x))).mean((2, 3))
        return self.ln(self.head(self.bn_named_linear(x)))


def _ids(params):
    return {id(p) for p in params}


def test_param_groups_membership_and_order():
    model = TinyNet()
    groups = build_param_groups(model, weight_decay=0.0005)
    assert [g["name"] for g in groups] == ["weights", "norm", "bias"]
    assert [g["bias_group"] for g in groups] == [False, False, True]
    assert [g["weight_decay"] for g in groups] == [0.0005, 0.0, 0.0]
    assert _ids(groups[0]["params"]) == _ids([model.conv.weight, model.bn_named_linear.weight, model.head.weight])
    assert _ids(groups[1]["params"]) == _ids([model.bn.weight, model.gn.weight, model.ln.weight])
    assert _ids(groups[2]["params"]) == _ids(
        [model.bn.bias, model.gn.bias, model.bn_named_linear.bias, model.head.bias, model.ln.bias]
    )


def test_every_parameter_exactly_once_including_frozen_and_tied():
    model = TinyNet()
    model.tied = nn.Linear(4, 4)
    model.tied.weight = model.bn_named_linear.weight  # tied weights: one parameter, two modules
    grouped = [p for g in build_param_groups(model, 0.1) for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert _ids(grouped) == _ids(model.parameters())
    assert id(model.conv.weight) in _ids(grouped)  # frozen, still grouped


@pytest.mark.parametrize(
    "name, expected_type",
    [
        ("SGD", torch.optim.SGD),
        ("Adam", torch.optim.Adam),
        ("Adamax", torch.optim.Adamax),
        ("AdamW", torch.optim.AdamW),
        ("NAdam", torch.optim.NAdam),
        ("RAdam", torch.optim.RAdam),
        ("RMSProp", torch.optim.RMSprop),
        ("sgd", torch.optim.SGD),
        ("ADAMW", torch.optim.AdamW),
        ("rmsprop", torch.optim.RMSprop),
    ],
)
def test_make_optimizer_every_name(name, expected_type):
    groups = build_param_groups(TinyNet(), weight_decay=0.01)
    optimizer = make_optimizer(name, groups, lr=0.003, momentum=0.85)
    assert type(optimizer) is expected_type
    assert len(optimizer.param_groups) == 3
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0, 0.0]
    for group in optimizer.param_groups:
        assert group["lr"] == 0.003
        assert group["initial_lr"] == 0.003
        if expected_type is torch.optim.SGD:
            assert group["momentum"] == 0.85 and group["nesterov"] is True
        elif expected_type is torch.optim.RMSprop:
            assert group["momentum"] == 0.85
        else:
            assert group["betas"] == (0.85, 0.999)
        if name.lower() in ("sgd", "adam", "adamw"):  # torch's fused step: one kernel per parameter, no Python loop
            assert group["fused"] is True


def test_the_fused_step_makes_the_update_of_the_per_tensor_step():
    torch.manual_seed(0)
    models = [TinyNet(), TinyNet()]
    models[1].load_state_dict(models[0].state_dict())
    fused = make_optimizer("AdamW", build_param_groups(models[0], weight_decay=0.01), lr=0.01, momentum=0.9)
    looped = torch.optim.AdamW(build_param_groups(models[1], weight_decay=0.01), lr=0.01, betas=(0.9, 0.999))
    assert fused.param_groups[0]["fused"] and not looped.param_groups[0]["fused"]
    for _ in range(3):
        for model, optimizer in zip(models, (fused, looped)):
            model(torch.ones(2, 3, 8, 8)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_make_optimizer_unknown_name_is_one_line_with_suggestion():
    with pytest.raises(CfgError) as info:
        make_optimizer("adamww", build_param_groups(TinyNet(), 0.0), lr=0.01, momentum=0.9)
    message = str(info.value)
    assert "\n" not in message
    assert "adamww" in message and "Did you mean 'AdamW'" in message and "RMSProp" in message


def test_auto_optimizer_choice():
    assert resolve_auto_optimizer(10_001, 80) == ("MuSGD", 0.01, 0.9)
    assert resolve_auto_optimizer(10_000, 80) == ("AdamW", 0.000119, 0.9)  # 0.01 / 84 rounded to 6 places
    assert resolve_auto_optimizer(500, 1) == ("AdamW", 0.002, 0.9)  # 0.01 / 5


def test_scaled_weight_decay():
    assert scaled_weight_decay(0.0005, 16, 4, 64) == pytest.approx(0.0005)
    assert scaled_weight_decay(0.0005, 8, 2, 64) == pytest.approx(0.000125)
    assert scaled_weight_decay(0.0005, 32, 4, 64) == pytest.approx(0.001)


# ----------------------------------------------------------------------------------------------------- stepper
def _linear_setup(lr=0.1, max_norm=None):
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return model, optimizer, OptimizerStepper(optimizer, amp_dtype=None, device_type="cpu", max_norm=max_norm)


def test_stepper_steps_every_accumulate_batches_with_summed_gradients():
    model, _, stepper = _linear_setup(lr=0.1)
    inputs = torch.randn(12, 3)
    captured = []
    stepped = []
    for step in range(12):
        weight_before_step = model.weight.detach().clone()
        stepper.backward((model(inputs[step : step + 1]) ** 2).sum())
        did_step = stepper.step_if_due(
            model, None, accumulate=4, step=step, after_step=lambda: captured.append(model.weight.grad.clone())
        )
        stepped.append(did_step)
        if did_step:
            start = step - 3
            reference = weight_before_step.clone().requires_grad_(True)
            summed = sum(((inputs[i : i + 1] @ reference.T) ** 2).sum() for i in range(start, step + 1))
            (expected_grad,) = torch.autograd.grad(summed, reference)
            torch.testing.assert_close(captured[-1], expected_grad)
            torch.testing.assert_close(model.weight.detach(), weight_before_step - 0.1 * expected_grad)
            assert model.weight.grad is None  # zeroed (set to None) after the step
        else:
            torch.testing.assert_close(model.weight.detach(), weight_before_step)
    assert stepped == [False, False, False, True] * 3
    assert stepper.last_opt_step == 11


def test_stepper_clips_gradient_norm_to_max_norm():
    model = nn.Linear(4, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    stepper = OptimizerStepper(optimizer, amp_dtype=None, device_type="cpu", max_norm=10.0)
    clipped = []
    stepper.backward((model.weight * 100).sum())  # gradient 100 per element -> norm 200
    assert stepper.step_if_due(model, None, 1, 0, after_step=lambda: clipped.append(model.weight.grad.clone()))
    assert float(stepper.last_grad_norm) == pytest.approx(200.0)
    torch.testing.assert_close(clipped[0], torch.full((1, 4), 5.0))  # scaled by 10/200
    assert float(clipped[0].norm()) == pytest.approx(10.0)


def test_stepper_hook_order_and_ema_update():
    model, _, stepper = _linear_setup()
    ema = ModelEMA(model)
    events = []
    stepper.backward(model(torch.ones(1, 3)).sum())
    stepper.step_if_due(
        model,
        ema,
        accumulate=1,
        step=0,
        before_zero_grad=lambda: events.append(("before_zero_grad", model.weight.grad is not None)),
        after_step=lambda: events.append(("after_step", model.weight.grad is not None)),
    )
    assert events == [("after_step", True), ("before_zero_grad", True)]
    assert ema.updates == 1
    assert not stepper.step_if_due(model, ema, accumulate=2, step=1)
    assert ema.updates == 1


def test_stepper_state_round_trip():
    model, _, stepper = _linear_setup()
    for step in range(8):
        stepper.backward(model(torch.ones(1, 3)).sum())
        stepper.step_if_due(model, None, accumulate=4, step=step)
    state = stepper.state_dict()
    assert state["last_opt_step"] == 7

    _, _, resumed = _linear_setup()
    resumed.load_state_dict(state)
    assert resumed.last_opt_step == 7
    assert not resumed.step_if_due(model, None, accumulate=4, step=10)
    assert resumed.step_if_due(model, None, accumulate=4, step=11)


def test_stepper_autocast_dtype():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    bf16 = OptimizerStepper(optimizer, amp_dtype=torch.bfloat16, device_type="cpu")
    full = OptimizerStepper(optimizer, amp_dtype=None, device_type="cpu")
    with bf16.autocast():
        assert model(torch.ones(1, 3)).dtype == torch.bfloat16
    with full.autocast():
        assert model(torch.ones(1, 3)).dtype == torch.float32
    assert not bf16.scaler.is_enabled() and not full.scaler.is_enabled()  # scaling is for float16 only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 GradScaler needs CUDA")
def test_stepper_fp16_scaler_state_round_trip_on_cuda():
    model = nn.Linear(3, 1).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = OptimizerStepper(optimizer, amp_dtype=torch.float16, device_type="cuda")
    assert stepper.scaler.is_enabled()
    with stepper.autocast():
        loss = model(torch.ones(2, 3, device="cuda")).float().sum()
    stepper.backward(loss)
    assert stepper.step_if_due(model, None, accumulate=1, step=0)
    resumed = OptimizerStepper(optimizer, amp_dtype=torch.float16, device_type="cuda")
    resumed.load_state_dict(stepper.state_dict())
    assert resumed.scaler.get_scale() == stepper.scaler.get_scale()
    assert resumed.last_opt_step == 0
