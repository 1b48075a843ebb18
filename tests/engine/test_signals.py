"""In-process SIGTERM/SIGINT handling: position saved mid-epoch, a signal during validation stops after the
epoch, NaN recovery after a mid-epoch resume, handlers restored. (Subprocess versions: test_crash_safety.py.)"""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from yolotrain import DetectionTrainer
from yolotrain.engine.trainer import TrainingInterrupted
from yolotrain.utils.checkpoint import load_checkpoint


def epochs_in(path):
    with open(path, newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def send_at_batch(signum, epoch, batches_done):
    def send(trainer):
        if (trainer.epoch, trainer.batches_in_epoch) == (epoch, batches_done):
            os.kill(os.getpid(), signum)

    return send


def interrupted_run(overrides, event, fn):
    trainer = DetectionTrainer(overrides=overrides)
    trainer.add_callback(event, fn)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.train()
    return trainer, info.value


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_epoch_saves_the_position(train_overrides, signum):
    before = signal.getsignal(signum)
    # Sent as the second batch starts: that batch's verdict sees it, so the run stops after it (2 batches done).
    trainer, error = interrupted_run(
        {**train_overrides, "epochs": 3}, "on_train_batch_start", send_at_batch(signum, epoch=1, batches_done=1)
    )
    assert error.exit_code == 130
    assert str(error).startswith("training interrupted at epoch 2, batch 2;")
    checkpoint = load_checkpoint(trainer.last)
    assert (checkpoint["epoch"], checkpoint["batch_index"], checkpoint["batches_in_epoch"]) == (1, 2, 2)
    assert len(checkpoint["tloss"]) == 3
    assert epochs_in(trainer.csv) == [1]
    assert signal.getsignal(signum) == before  # the trainer's handler is gone after train()


def test_signal_during_validation_stops_after_that_epoch(train_overrides):
    def send_once(validator):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    sent = []
    trainer, error = interrupted_run({**train_overrides, "epochs": 3}, "on_val_start", send_once)
    assert str(error).startswith("training interrupted after epoch 1;")
    checkpoint = load_checkpoint(trainer.last)
    assert checkpoint["epoch"] == 0 and "batch_index" not in checkpoint
    resumed = DetectionTrainer(overrides={"resume": str(trainer.last)})
    resumed.train()
    assert epochs_in(resumed.csv) == [1, 2, 3]


class NaNAtStep(DetectionTrainer):
    """A NaN loss once, at global step 7 (epoch 2, batch index 3)."""

    nan_step = 7

    def compute_loss(self, batch):
        loss, items = super().compute_loss(batch)
        if self.epoch * self.num_batches + self.batches_in_epoch == self.nan_step:
            NaNAtStep.nan_step = -1
            loss = loss * float("nan")
        return loss, items


def test_nan_after_a_mid_epoch_resume_rolls_back_to_the_resumed_weights(train_overrides):
    trainer, _ = interrupted_run(
        {**train_overrides, "epochs": 3}, "on_train_batch_end", send_at_batch(signal.SIGTERM, 1, 1)
    )
    resumed = NaNAtStep(overrides={"resume": str(trainer.last)})
    resumed.train()
    assert resumed.nan_recovery.count == 1
    assert epochs_in(resumed.csv) == [1, 2, 3]
    assert "batch_index" not in load_checkpoint(resumed.last)


@pytest.mark.slow
def test_ctrl_c_with_data_workers_is_reported_once(tiny_model_yaml, tiny_data, tmp_path):
    """Ctrl-C reaches the whole process group (the data-loader workers too, which inherit the handler): the run
    says so once, saves and exits 130."""
    log = tmp_path / "train.log"
    args = dict(model=tiny_model_yaml, data=tiny_data, epochs=50, imgsz=64, batch=4, workers=2, device="cpu",
                project=str(tmp_path / "runs"), name="train", plots=False, val=False)
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "yolotrain", "train", *(f"{k}={v}" for k, v in args.items())],
                                   stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while " 1/50 " not in log.read_text() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert process.wait(timeout=120) == 130
    text = log.read_text()
    assert text.count("SIGINT received") == 1, text[-2000:]
    assert "Traceback" not in text
    assert (tmp_path / "runs" / "train" / "weights" / "last.pt").is_file()
