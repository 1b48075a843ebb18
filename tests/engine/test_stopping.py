"""EarlyStopping: patience, ties, NaN/inf fitness, disabling and state."""

import logging
import math

import torch

from yolotrain.engine.stopping import EarlyStopping


def test_stops_after_patience_epochs_without_improvement():
    stopper = EarlyStopping(patience=3)
    decisions = [stopper.update(epoch, fit) for epoch, fit in enumerate([0.1, 0.3, 0.2, 0.25, 0.29])]
    assert decisions == [False, False, False, False, True]
    assert stopper.should_stop
    assert stopper.best_fitness == 0.3 and stopper.best_epoch == 1


def test_equal_fitness_counts_as_improvement():
    stopper = EarlyStopping(patience=2)
    for epoch in range(6):
        assert not stopper.update(epoch, 0.5)
    assert stopper.best_epoch == 5


def test_nan_and_inf_never_improve():
    stopper = EarlyStopping(patience=3)
    assert not stopper.update(0, 0.2)
    assert not stopper.update(1, float("nan"))
    assert not stopper.update(2, float("inf"))
    assert stopper.possible_stop and not stopper.should_stop
    assert stopper.update(3, float("nan"))
    assert stopper.best_fitness == 0.2 and stopper.best_epoch == 0


def test_possible_stop_flags_the_last_chance_epoch():
    stopper = EarlyStopping(patience=3)
    stopper.update(0, 0.5)
    assert not stopper.possible_stop
    stopper.update(1, 0.4)
    assert not stopper.possible_stop
    stopper.update(2, 0.4)
    assert stopper.possible_stop
    stopper.update(3, 0.6)
    assert not stopper.possible_stop


def test_patience_zero_or_negative_disables_stopping():
    for patience in (0, -1):
        stopper = EarlyStopping(patience=patience)
        assert stopper.patience == math.inf
        assert not any(stopper.update(epoch, 1.0 / (epoch + 1)) for epoch in range(500))


def test_stop_is_logged_with_the_best_epoch(caplog):
    stopper = EarlyStopping(patience=1)
    stopper.update(0, 0.9)
    with caplog.at_level(logging.INFO, logger="yolotrain.engine.stopping"):
        assert stopper.update(1, 0.1)
    assert "stopping early" in caplog.text and "epoch 1" in caplog.text


def test_state_round_trip_continues_the_count(tmp_path):
    stopper = EarlyStopping(patience=3)
    for epoch, fit in enumerate([0.4, 0.6, 0.5]):
        stopper.update(epoch, fit)
    path = tmp_path / "stopper.pt"
    torch.save(stopper.state_dict(), path)
    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    assert (resumed.best_fitness, resumed.best_epoch) == (0.6, 1)
    assert not resumed.update(3, 0.5)
    assert resumed.update(4, 0.5)
