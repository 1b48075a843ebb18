"""Warmup, LR factor, momentum and accumulation schedules, checked against hand-computed values."""

import pytest
import torch

from yolotrain.engine.schedule import TrainSchedule, lr_factor, warmup_iterations

# 10 epochs of 50 batches, 3 warmup epochs -> 150 warmup iterations; groups: weights, norm, bias.
SETTINGS = dict(
    initial_lrs=[0.01, 0.01, 0.01],
    bias_groups=[False, False, True],
    epochs=10,
    num_batches=50,
    warmup_epochs=3.0,
    warmup_bias_lr=0.1,
    warmup_momentum=0.8,
    momentum=0.937,
    lrf=0.01,
    cos_lr=False,
    nominal_batch=64,
    batch_size=16,
)


def make_schedule(**changes):
    return TrainSchedule(**{**SETTINGS, **changes})


def test_warmup_iterations_has_a_floor_of_100_and_zero_disables():
    assert warmup_iterations(3, 50) == 150
    assert warmup_iterations(3, 1000) == 3000
    assert warmup_iterations(0.5, 50) == 100
    assert warmup_iterations(0, 50) == 0
    assert make_schedule().warmup_iters == 150


def test_linear_lr_factor_by_hand():
    assert lr_factor(0, 10, 0.01, cos=False) == pytest.approx(1.0)
    assert lr_factor(5, 10, 0.01, cos=False) == pytest.approx(0.505)  # 0.5 * 0.99 + 0.01
    assert lr_factor(9, 10, 0.01, cos=False) == pytest.approx(0.109)  # 0.1 * 0.99 + 0.01


def test_cosine_lr_factor_by_hand():
    assert lr_factor(0, 10, 0.01, cos=True) == pytest.approx(1.0)
    assert lr_factor(5, 10, 0.01, cos=True) == pytest.approx(0.505)  # cos(pi/2) = 0
    # cos(0.9 pi) = -0.9510565163: (1.9510565163 / 2) * -0.99 + 1
    assert lr_factor(9, 10, 0.01, cos=True) == pytest.approx(0.0342270244, abs=1e-9)


def test_lrs_at_warmup_start():
    assert make_schedule().lrs(0, 0) == pytest.approx([0.0, 0.0, 0.1])


def test_lrs_inside_warmup_epoch_0():
    # step 30 of 150 (0.2 of warmup), factor 1 -> target 0.01
    assert make_schedule().lrs(0, 30) == pytest.approx([0.002, 0.002, 0.1 - 0.2 * 0.09])


def test_lrs_inside_warmup_later_epoch_uses_that_epochs_factor():
    # epoch 2, iteration 0 -> step 100 (2/3 of warmup); factor(2) = 0.8*0.99 + 0.01 = 0.802 -> target 0.00802
    lrs = make_schedule().lrs(2, 0)
    assert lrs == pytest.approx([0.00802 * 2 / 3, 0.00802 * 2 / 3, 0.1 + (0.00802 - 0.1) * 2 / 3])


def test_lrs_at_end_of_and_after_warmup():
    schedule = make_schedule()
    # step 150 = epoch 3 iteration 0 is the last warmup step: exactly the target, factor(3) = 0.703
    assert schedule.lrs(3, 0) == pytest.approx([0.00703] * 3)
    assert schedule.lrs(3, 10) == pytest.approx([0.00703] * 3)
    assert schedule.lrs(9, 49) == pytest.approx([0.01 * 0.109] * 3)


def test_cosine_schedule_after_warmup():
    assert make_schedule(cos_lr=True).lrs(9, 0) == pytest.approx([0.01 * 0.0342270244] * 3)


def test_momentum_ramp():
    schedule = make_schedule()
    assert schedule.momentum(0, 0) == pytest.approx(0.8)
    assert schedule.momentum(2, 0) == pytest.approx(0.8 + 0.137 * 2 / 3)
    assert schedule.momentum(3, 0) == pytest.approx(0.937)
    assert schedule.momentum(7, 3) == pytest.approx(0.937)


def test_accumulate_ramp():
    schedule = make_schedule()  # nominal 64 / batch 16 -> 4
    assert schedule.accumulate(0, 0) == 1
    assert schedule.accumulate(0, 30) == 2  # 1 + 0.2 * 3 = 1.6
    assert schedule.accumulate(2, 0) == 3  # 1 + 2/3 * 3 = 3
    assert schedule.accumulate(3, 0) == 4
    assert schedule.accumulate(5, 5) == 4
    assert make_schedule(batch_size=128).accumulate(5, 5) == 1  # batch above nominal never drops below 1


def test_no_warmup_when_warmup_epochs_is_zero():
    schedule = make_schedule(warmup_epochs=0)
    assert schedule.warmup_iters == 0
    assert schedule.lrs(0, 0) == pytest.approx([0.01] * 3)
    assert schedule.momentum(0, 0) == pytest.approx(0.937)
    assert schedule.accumulate(0, 0) == 4


def _three_group_params():
    return [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(3)]


def test_apply_sets_sgd_lr_and_momentum():
    optimizer = torch.optim.SGD(_three_group_params(), lr=0.5, momentum=0.5)
    make_schedule().apply(optimizer, 0, 30)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.002, 0.002, 0.082])
    assert [g["momentum"] for g in optimizer.param_groups] == pytest.approx([0.8 + 0.2 * 0.137] * 3)


def test_apply_sets_adam_beta1_and_keeps_beta2():
    optimizer = torch.optim.AdamW(_three_group_params(), lr=0.5, betas=(0.5, 0.999))
    make_schedule().apply(optimizer, 4, 0)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.01 * 0.604)
        assert group["betas"][0] == pytest.approx(0.937)
        assert group["betas"][1] == 0.999


def test_apply_rejects_group_count_mismatch():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="param groups"):
        make_schedule().apply(optimizer, 0, 0)


def test_set_epochs_replans_the_factor():
    schedule = make_schedule()
    schedule.set_epochs(20)
    assert schedule.lrs(10, 0) == pytest.approx([0.01 * 0.505] * 3)


def test_state_round_trip_restores_the_schedule_exactly(tmp_path):
    original = make_schedule(cos_lr=True, initial_lrs=[0.02, 0.01, 0.03])
    original.set_epochs(7)
    path = tmp_path / "schedule.pt"
    torch.save(original.state_dict(), path)
    restored = make_schedule()
    restored.load_state_dict(torch.load(path, weights_only=True))
    for epoch, iteration in [(0, 0), (1, 20), (3, 0), (6, 49)]:
        assert restored.lrs(epoch, iteration) == original.lrs(epoch, iteration)
        assert restored.momentum(epoch, iteration) == original.momentum(epoch, iteration)
        assert restored.accumulate(epoch, iteration) == original.accumulate(epoch, iteration)
    assert restored.epochs == 7
