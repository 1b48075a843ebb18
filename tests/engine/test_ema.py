"""ModelEMA: decay ramp, update maths, buffers, unwrapping and state dict."""

import pytest
import torch
from torch import nn

from yolotrain.engine.ema import ModelEMA
from yolotrain.utils.torch_utils import de_parallel


def _set_weight(linear, values):
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([values]))


def test_decay_ramp_values():
    ema = ModelEMA(nn.Linear(2, 1), decay=0.9999, tau=2000)
    assert ema.decay_at(0) == 0.0
    assert ema.decay_at(2000) == pytest.approx(0.6320573468, abs=1e-9)  # 0.9999 * (1 - e^-1)
    assert ema.decay_at(20000) == pytest.approx(0.9999 * (1 - 4.539993e-05), abs=1e-9)  # e^-10 = 4.54e-5
    assert ema.decay_at(10**7) == pytest.approx(0.9999)


def test_update_blends_weights_with_the_step_decay():
    model = nn.Linear(2, 1, bias=False)
    _set_weight(model, [1.0, 2.0])
    ema = ModelEMA(model, decay=0.5, tau=1e-9)  # tiny tau: the ramp is already at 0.5 on the first update
    _set_weight(model, [3.0, 6.0])
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, torch.tensor([[2.0, 4.0]]))  # 0.5*[1,2] + 0.5*[3,6]
    _set_weight(model, [5.0, 10.0])
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, torch.tensor([[3.5, 7.0]]))  # 0.5*[2,4] + 0.5*[5,10]
    assert ema.updates == 2


def test_first_update_uses_the_ramp_not_the_final_decay():
    model = nn.Linear(1, 1, bias=False)
    _set_weight(model, [0.0])
    ema = ModelEMA(model, decay=0.9, tau=1.0)
    _set_weight(model, [1.0])
    ema.update(model)
    # updates=1: d = 0.9 * (1 - e^-1) = 0.568909 -> ema = 1 - d
    assert float(ema.module.weight) == pytest.approx(1 - 0.5689085, abs=1e-6)


def test_float_buffers_are_averaged_and_integer_buffers_copied():
    model = nn.BatchNorm1d(2)
    ema = ModelEMA(model, decay=0.5, tau=1e-9)
    with torch.no_grad():
        model.running_mean.fill_(4.0)
        model.num_batches_tracked.fill_(7)
    ema.update(model)
    torch.testing.assert_close(ema.module.running_mean, torch.tensor([2.0, 2.0]))
    assert int(ema.module.num_batches_tracked) == 7


def test_copy_is_frozen_in_eval_mode_and_independent():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    ema = ModelEMA(model)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(ema.module[0].weight, model[0].weight)


def test_state_dict_has_the_models_keys_only_and_round_trips():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, updates=5)
    assert list(ema.state_dict()) == list(model.state_dict())
    other = ModelEMA(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    other.load_state_dict(ema.state_dict())
    for key, value in ema.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value)
    assert ema.updates == 5 and isinstance(ema.updates, int)


class CompiledLike(nn.Module):
    """Stands in for torch.compile's wrapper, which keeps the original model as ``_orig_mod``."""

    def __init__(self, model):
        super().__init__()
        self._orig_mod = model


def test_wrapped_models_are_unwrapped():
    model = nn.Linear(2, 1)
    assert de_parallel(nn.DataParallel(model)) is model
    assert de_parallel(CompiledLike(nn.DataParallel(model))) is model
    ema = ModelEMA(CompiledLike(model), decay=0.5, tau=1e-9)
    assert list(ema.state_dict()) == ["weight", "bias"]
    ema.update(nn.DataParallel(model))  # updating from a wrapped model reads the same keys
    assert ema.updates == 1
