"""Disk trouble and failing side effects never cost a run: an unwritable folder is a clear error before training,
a failed save (disk full) keeps the previous last.pt and is retried next epoch, results.csv rows survive a failed
write, and failing plots/integrations are reported once while training ends with identical weights."""

import errno
import logging

import pytest
import torch

from yolotrain import DetectionTrainer
from yolotrain.cli import main as cli_main
from yolotrain.engine.results import ResultsCSV
from yolotrain.errors import YoloTrainError
from yolotrain.utils import checkpoint as checkpoint_io
from yolotrain.utils.checkpoint import load_checkpoint


def epochs_in(path):
    return [int(row["epoch"]) for row in ResultsCSV(path).read()]


def same_weights(a, b):
    a, b = load_checkpoint(a), load_checkpoint(b)
    return all(torch.equal(a[k][n], b[k][n]) for k in ("model", "ema") for n in a[k])


@pytest.fixture
def warnings_seen():
    """Warning messages of the yolotrain loggers (caught on the package logger: an earlier CLI or YOLO call may
    have turned its propagation to the root logger off)."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    package_logger = logging.getLogger("yolotrain")
    package_logger.addHandler(handler)
    yield messages
    package_logger.removeHandler(handler)


@pytest.fixture(scope="module")
def reference(tiny_model_yaml, tiny_data, tmp_path_factory):
    """A 3-epoch run with nothing failing."""
    overrides = dict(
        model=tiny_model_yaml, data=tiny_data, epochs=3, imgsz=64, batch=4, workers=0, device="cpu", plots=False,
        seed=0, deterministic=True, warmup_epochs=0.5, close_mosaic=0, verbose=False,
        project=str(tmp_path_factory.mktemp("reference")),
    )  # fmt: skip
    trainer = DetectionTrainer(overrides=overrides)
    trainer.train()
    return trainer


def test_unwritable_project_fails_before_training(train_overrides, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("a regular file cannot hold folders, even for root")
    started = []
    trainer = DetectionTrainer(overrides={**train_overrides, "project": str(blocker / "sub")})
    trainer.add_callback("on_train_start", lambda t: started.append(True))
    with pytest.raises(YoloTrainError, match="cannot write to the run folder .*afile/sub"):
        trainer.train()
    assert started == []


def test_read_only_project_fails_before_training(train_overrides, monkeypatch):
    """A read-only file system (monkeypatched: chmod does not stop root) is refused the same way."""
    def read_only(self, data):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("pathlib.Path.write_bytes", read_only)
    with pytest.raises(YoloTrainError, match="cannot write to the run folder .*Read-only file system"):
        DetectionTrainer(overrides=train_overrides).train()


def test_cli_reports_unwritable_project_in_one_line(tiny_model_yaml, tiny_data, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    argv = ["train", f"model={tiny_model_yaml}", f"data={tiny_data}", "imgsz=64", f"project={tmp_path}/afile/x"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("yolotrain: error: cannot write to the run folder") and "Traceback" not in "".join(err)


def test_disk_full_during_a_save_keeps_last_pt_and_retries(reference, train_overrides, monkeypatch, warnings_seen):
    real_save = torch.save
    fail = {"armed": False, "failed": 0}

    def disk_full_once(obj, file, *args, **kwargs):
        if fail["armed"]:
            fail["armed"], fail["failed"] = False, fail["failed"] + 1
            file.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, file, *args, **kwargs)

    seen_after_failure = {}

    def arm_in_epoch_2(trainer):
        fail["armed"] = trainer.epoch == 1

    def inspect_after_failed_save(trainer):
        if trainer.epoch == 1:
            seen_after_failure["epoch"] = load_checkpoint(trainer.last)["epoch"]
            seen_after_failure["files"] = sorted(p.name for p in trainer.wdir.iterdir())

    monkeypatch.setattr(checkpoint_io.torch, "save", disk_full_once)
    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 3})
    trainer.add_callback("on_train_epoch_end", arm_in_epoch_2)
    trainer.add_callback("on_fit_epoch_end", inspect_after_failed_save)
    trainer.train()
    assert fail["failed"] == 1
    assert seen_after_failure == {"epoch": 0, "files": ["best.pt", "last.pt"]}  # old last.pt, no temp file left
    failures = [m for m in warnings_seen if "checkpoint save failed" in m]
    assert len(failures) == 1 and "retrying next epoch" in failures[0]
    assert load_checkpoint(trainer.last)["epoch"] == 2  # the next epoch saved again
    assert epochs_in(trainer.csv) == [1, 2, 3]
    assert same_weights(reference.last, trainer.last)


def test_results_rows_survive_a_failed_write(tmp_path, monkeypatch):
    results = ResultsCSV(tmp_path / "results.csv")
    results.append({"epoch": 1, "loss": 0.5})
    real_write = checkpoint_io.save_atomic_text

    def disk_full(text, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("yolotrain.engine.results.save_atomic_text", disk_full)
    with pytest.raises(OSError):
        results.append({"epoch": 2, "loss": 0.25})
    assert [r["epoch"] for r in ResultsCSV(results.path).read()] == [1]  # the file on disk is still whole
    monkeypatch.setattr("yolotrain.engine.results.save_atomic_text", real_write)
    results.append({"epoch": 3, "loss": 0.125})
    assert [r["epoch"] for r in ResultsCSV(results.path).read()] == [1, 2, 3]


def test_failing_plots_and_integrations_never_change_the_run(reference, train_overrides, monkeypatch, warnings_seen):
    def broken(*args, **kwargs):
        raise RuntimeError("renderer exploded")

    for name in ("plot_results", "plot_images", "plot_labels"):
        monkeypatch.setattr(f"yolotrain.utils.plotting.{name}", broken)

    def tracker_down(trainer):
        raise ConnectionError("tracking server unreachable")

    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 3, "plots": True})
    trainer.callbacks.add("on_fit_epoch_end", tracker_down, integration="tracker")
    trainer.train()
    messages = warnings_seen
    for expected in ("results plot failed", "training batch plot failed", "label statistics plot failed",
                     "integration 'tracker' failed"):  # fmt: skip
        assert sum(expected in m for m in messages) == 1, expected
    assert epochs_in(trainer.csv) == [1, 2, 3]
    assert same_weights(reference.last, trainer.last)
