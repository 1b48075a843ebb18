"""The trackers' background worker: training events cost a queue put, calls keep their order, the end is bounded,
and a failing tracker is reported once."""

import logging
import threading

import pytest

from yolotrain.integrations.common import BackgroundWorker, Tracker

from .conftest import expected_metrics, fake_epoch, make_fake_trainer


GATE_TIMEOUT_S = 10.0  # a gate never opened (a broken test) ends the wait instead of hanging the suite


class GatedTracker(Tracker):
    """Records its calls; `open` waits for `gate`, as a tracker waiting on a slow store or server would."""

    name = "gated"

    def __init__(self, gate, fail_at_step=None):
        super().__init__()
        self.gate, self.fail_at_step, self.calls = gate, fail_at_step, []

    def open(self, start):
        self.gate.wait(GATE_TIMEOUT_S)
        self.calls.append(("open", start.run_name))

    def log_epoch(self, metrics, step):
        if step == self.fail_at_step:
            raise ConnectionError("store unreachable")
        self.calls.append(("epoch", step, metrics["metrics/mAP50(B)"]))

    def finish(self, end):
        self.calls.append(("finish", end.step, tuple(w.name for w in end.weights)))

    def fail(self):
        self.calls.append(("fail",))


def gated_trainer(tmp_path, tracker):
    trainer = make_fake_trainer(tmp_path / "runs" / "gated", epochs=3)
    trainer.callbacks.extend(tracker.callbacks(), integration="gated")
    trainer.run_callbacks("on_pretrain_routine_end")
    return trainer


def test_a_tracker_stuck_on_its_store_never_holds_up_training_and_keeps_the_order(tmp_path):
    gate = threading.Event()
    tracker = GatedTracker(gate)
    trainer = gated_trainer(tmp_path, tracker)
    for epoch in range(3):  # each event returns while the tracker is still stuck in open()
        fake_epoch(trainer, epoch)
    assert tracker.calls == []
    gate.set()
    trainer.run_callbacks("on_train_end")  # the bounded flush: everything queued runs, in order
    assert tracker.calls == [
        ("open", "gated"),
        *[("epoch", e + 1, pytest.approx(expected_metrics(e)["metrics/mAP50(B)"])) for e in range(3)],
        ("finish", 3, ("best.pt", "last.pt")),
    ]


def test_the_final_flush_gives_up_after_its_timeout(caplog):
    gate = threading.Event()
    worker = BackgroundWorker("stuck")
    worker.submit(gate.wait, GATE_TIMEOUT_S)
    with caplog.at_level(logging.WARNING, logger="yolotrain"):
        assert worker.close(timeout=0.2) is False
    assert "stuck: still writing after 0.2 s at the end of training" in caplog.text
    gate.set()


def test_a_failing_tracker_is_reported_once_and_skipped(tmp_path, caplog):
    gate = threading.Event()
    gate.set()
    tracker = GatedTracker(gate, fail_at_step=2)
    with caplog.at_level(logging.WARNING, logger="yolotrain"):
        trainer = gated_trainer(tmp_path, tracker)
        for epoch in range(3):
            fake_epoch(trainer, epoch)
        trainer.run_callbacks("on_train_end")
    assert [call[0] for call in tracker.calls] == ["open", "epoch"]  # nothing after the failure
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failures == ["integration 'gated' failed in log_epoch (ConnectionError: store unreachable); "
                        "it is skipped for the rest of the run"]
