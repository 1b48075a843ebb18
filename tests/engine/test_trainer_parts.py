"""The trainer's stateful parts on their own: checkpointer, graceful interrupt, NaN recovery, resume position."""

import os
import signal

import pytest
import torch

from yolotrain.engine.checkpointer import (
    CHECKPOINT_FORMAT_VERSION,
    Checkpointer,
    EMAState,
    Stored,
    check_format_version,
)
from yolotrain.engine.ema import ModelEMA
from yolotrain.engine.interrupt import GracefulInterrupt
from yolotrain.engine.nan_recovery import NanRecovery
from yolotrain.engine.resume import MidEpochPosition
from yolotrain.engine.time_budget import TimeBudget
from yolotrain.errors import CheckpointError, YoloTrainError
from yolotrain.utils.checkpoint import save_checkpoint


def _parts():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = ModelEMA(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    budget = TimeBudget(1.0, clock=lambda: 100.0)
    recovery = NanRecovery()
    checkpointer = Checkpointer([Stored("model", model), EMAState(ema), Stored("optimizer", optimizer)],
                                [budget, recovery])
    return model, ema, optimizer, budget, recovery, checkpointer


def _step(model, optimizer, ema):
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    ema.update(model)


def test_checkpointer_round_trip_restores_every_component():
    model, ema, optimizer, budget, recovery, checkpointer = _parts()
    _step(model, optimizer, ema)
    budget.start(0)
    budget.planned_epochs = 7
    recovery.count = 2
    state = checkpointer.state_dict()
    assert {"model", "ema", "ema_updates", "optimizer", "train_time", "planned_epochs", "nan_recoveries",
            "format_version", "rng"} <= state.keys()
    assert state["format_version"] == CHECKPOINT_FORMAT_VERSION and state["ema_updates"] == 1

    model2, ema2, optimizer2, budget2, recovery2, checkpointer2 = _parts()
    checkpointer2.load_state_dict(state)
    assert torch.equal(model2.weight, model.weight) and torch.equal(ema2.module.weight, ema.module.weight)
    assert ema2.updates == 1 and budget2.planned_epochs == 7 and recovery2.count == 2
    momentum = [o.state_dict()["state"][0]["momentum_buffer"] for o in (optimizer, optimizer2)]
    assert torch.equal(*momentum)


def test_load_weights_keeps_progress_and_snapshot_is_a_cpu_copy():
    model, ema, optimizer, budget, recovery, checkpointer = _parts()
    snapshot = checkpointer.snapshot()
    before = model.weight.detach().clone()
    _step(model, optimizer, ema)
    assert torch.equal(snapshot["model"]["weight"], before)  # a copy, not a view of the live weights
    assert snapshot["model"]["weight"].device.type == "cpu" and "nan_recoveries" not in snapshot
    recovery.count = 1
    checkpointer.load_weights(snapshot)
    assert torch.equal(model.weight, before) and ema.updates == 0 and recovery.count == 1


def test_two_components_claiming_one_key_is_refused():
    model = torch.nn.Linear(2, 2)
    checkpointer = Checkpointer([Stored("model", model), Stored("model", model)], [])
    with pytest.raises(RuntimeError, match="claimed by two components"):
        checkpointer.state_dict()


def test_format_version_mismatch_names_both_versions():
    with pytest.raises(CheckpointError, match=r"'x.pt' has checkpoint format version 7, this yolotrain reads version"):
        check_format_version({"format_version": 7}, "x.pt")
    check_format_version({"format_version": CHECKPOINT_FORMAT_VERSION}, "x.pt")


def test_graceful_interrupt_counts_a_signal_and_restores_the_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    interrupt = GracefulInterrupt()
    with interrupt:
        assert not interrupt.requested
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread before the next bytecode
        assert interrupt.requested and interrupt.received == 1
        with pytest.raises(SystemExit) as info:
            os.kill(os.getpid(), signal.SIGTERM)
        assert info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous


def test_nan_recovery_rolls_back_to_a_completed_epoch_else_to_the_start(tmp_path):
    recovery = NanRecovery(max_recoveries=2)
    recovery.remember_start({"model": "start"}, 3, "the initial weights")
    last = tmp_path / "last.pt"
    assert recovery.last_good_state(last)["next_epoch"] == 3  # no checkpoint yet
    save_checkpoint({"epoch": 4, "batch_index": 2}, last)
    assert recovery.last_good_state(last)["source"] == "the initial weights"  # mid-epoch: not a good state
    save_checkpoint({"epoch": 4}, last)
    good = recovery.last_good_state(last)
    assert good["next_epoch"] == 5 and good["source"] == str(last)
    recovery.begin("nan")
    recovery.begin("nan")
    assert recovery.salt == 2
    with pytest.raises(YoloTrainError, match="training diverged: nan; gave up after 2 recoveries"):
        recovery.begin("nan")


def test_mid_epoch_position_puts_back_gradients_and_running_loss():
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    entries = MidEpochPosition.entries(5, model, torch.tensor([1.0, 2.0]), batches_in_epoch=5)
    checkpoint = {"epoch": 2, "rng": {}, **entries}
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    position = MidEpochPosition(checkpoint)
    tloss, done = position.apply(model, torch.device("cpu"))
    assert (position.epoch, position.next_batch, done) == (2, 5, 5)
    assert tloss.tolist() == [1.0, 2.0]
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
