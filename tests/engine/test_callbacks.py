"""Callbacks: order, user errors, integration errors, unknown events, state and copies."""

import logging

import pytest
import torch

from yolotrain.engine.callbacks import EVENTS, Callbacks
from yolotrain.errors import CfgError


def test_events_run_in_registration_order_with_the_owner():
    callbacks = Callbacks()
    calls = []
    owner = object()
    callbacks.add("on_train_epoch_end", lambda o: calls.append(("first", o)))
    callbacks.add("on_train_epoch_end", lambda o: calls.append(("integration", o)), integration="tensorboard")
    callbacks.add("on_train_epoch_end", lambda o: calls.append(("last", o)))
    callbacks.run("on_train_epoch_end", owner)
    assert calls == [("first", owner), ("integration", owner), ("last", owner)]
    callbacks.run("on_train_start", owner)  # an event without callbacks does nothing
    assert len(calls) == 3


def test_every_event_is_known():
    callbacks = Callbacks()
    for event in EVENTS:
        assert callbacks.get(event) == []
        callbacks.run(event, None)
    assert len(EVENTS) == 18 and "optimizer_step" in EVENTS and "on_val_end" in EVENTS


def test_user_callback_error_propagates_unchanged():
    callbacks = Callbacks()
    error = RuntimeError("user bug")
    after = []

    def broken(_owner):
        raise error

    callbacks.add("on_fit_epoch_end", broken)
    callbacks.add("on_fit_epoch_end", after.append)
    with pytest.raises(RuntimeError) as info:
        callbacks.run("on_fit_epoch_end", "trainer")
    assert info.value is error
    assert after == []  # the run stops at the failing callback


def test_integration_error_is_reported_once_and_then_skipped(caplog):
    callbacks = Callbacks()
    attempts = []
    survivors = []

    def flaky_logger(owner):
        attempts.append(owner)
        raise ConnectionError("server down")

    callbacks.add("on_fit_epoch_end", flaky_logger, integration="mlflow")
    callbacks.add("on_fit_epoch_end", survivors.append)
    with caplog.at_level(logging.WARNING, logger="yolotrain.engine.callbacks"):
        for epoch in range(3):
            callbacks.run("on_fit_epoch_end", epoch)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "mlflow" in warnings[0].getMessage() and "server down" in warnings[0].getMessage()
    assert attempts == [0]
    assert survivors == [0, 1, 2]


def test_integration_name_defaults_to_the_module_name():
    callbacks = Callbacks()

    def fails(_owner):
        raise ValueError("x")

    fails.__module__ = "yolotrain.integrations.tensorboard"
    callbacks.add("teardown", fails, integration=True)
    callbacks.run("teardown", None)  # does not raise
    assert callbacks.get("teardown") == [fails]


def test_unknown_event_raises_with_suggestion():
    callbacks = Callbacks()
    with pytest.raises(ValueError) as info:
        callbacks.add("on_train_epoch_ends", print)
    message = str(info.value)
    assert "Did you mean 'on_train_epoch_end'" in message and "on_val_end" in message and "\n" not in message
    assert isinstance(info.value, CfgError)
    with pytest.raises(ValueError):
        callbacks.run("nope", None)
    with pytest.raises(ValueError):
        callbacks.get("nope")


def test_set_replaces_user_callbacks_but_keeps_integrations():
    callbacks = Callbacks()
    user_a, user_b, integration, replacement = (lambda o: None for _ in range(4))
    callbacks.add("on_train_end", user_a)
    callbacks.add("on_train_end", integration, integration="remote")
    callbacks.add("on_train_end", user_b)
    callbacks.set("on_train_end", replacement)
    assert callbacks.get("on_train_end") == [integration, replacement]


class Counter:
    state_key = "counter"

    def __init__(self):
        self.count = 0

    def __call__(self, _owner):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


class BestTracker:
    state_key = "best_tracker"

    def __init__(self):
        self.best = 0.0

    def on_epoch(self, owner):
        self.best = max(self.best, owner)

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        self.best = state["best"]


def test_state_dict_collects_stateful_callbacks_once_and_restores_them():
    counter, tracker = Counter(), BestTracker()
    callbacks = Callbacks()
    callbacks.add("on_train_epoch_end", counter)
    callbacks.add("on_fit_epoch_end", counter)  # same object on two events: saved once
    callbacks.add("on_fit_epoch_end", tracker.on_epoch)
    callbacks.add("on_fit_epoch_end", lambda o: None)  # stateless: not saved
    model = torch.nn.Linear(1, 1)
    callbacks.add("on_fit_epoch_end", model.zero_grad)  # owner has state_dict but no state_key: not saved
    callbacks.run("on_train_epoch_end", 0.5)
    callbacks.run("on_fit_epoch_end", 0.7)
    state = callbacks.state_dict()
    assert state == {"counter": {"count": 2}, "best_tracker": {"best": 0.7}}

    fresh_counter, fresh_tracker = Counter(), BestTracker()
    resumed = Callbacks()
    resumed.add("on_train_epoch_end", fresh_counter)
    resumed.add("on_fit_epoch_end", fresh_tracker.on_epoch)
    resumed.load_state_dict(state)
    assert fresh_counter.count == 2 and fresh_tracker.best == 0.7


def test_copy_is_independent():
    callbacks = Callbacks()
    first = lambda o: None  # noqa: E731
    callbacks.add("on_val_start", first)
    copied = callbacks.copy()
    copied.add("on_val_start", print)
    assert callbacks.get("on_val_start") == [first]
    assert copied.get("on_val_start") == [first, print]
