"""The public API and command line end to end, plus the engine flags that only show in a full run: multi_scale,
compile, optimizer=auto, cls_pw, save_period, val=False and val_period."""

import csv
import io
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from yolotrain import YOLO, DetectionTrainer
from yolotrain.utils.checkpoint import load_checkpoint

METRIC_KEYS = ["metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)"]
VALIDATED_COLUMNS = [*METRIC_KEYS, "val/box_loss", "val/cls_loss", "val/dfl_loss"]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def validated_epochs(rows):
    """1-based epochs whose results.csv row holds validation metrics (the others are NaN)."""
    validated = []
    for row in rows:
        values = [float(row[c]) for c in VALIDATED_COLUMNS]
        assert all(math.isnan(v) for v in values) or not any(math.isnan(v) for v in values), row
        if not math.isnan(values[0]):
            validated.append(int(float(row["epoch"])))
    return validated


def train(overrides, callbacks=(), **extra):
    trainer = DetectionTrainer(overrides={**overrides, **extra})
    for event, fn in callbacks:
        trainer.add_callback(event, fn)
    trainer.train()
    return trainer


def count_calls(event_log, event):
    return lambda obj: event_log.append((event, obj))


# ------------------------------------------------------------------------------------------------ Python API
def test_public_names_import():
    import yolotrain
    from yolotrain import BaseTrainer, DetectionModel, DetectionTrainer, DetectionValidator, YOLO  # noqa: F401

    assert issubclass(DetectionTrainer, BaseTrainer)
    assert set(yolotrain.__all__) >= {"YOLO", "BaseTrainer", "DetectionTrainer", "DetectionValidator", "DetectionModel"}
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        yolotrain.Nope  # noqa: B018


@pytest.fixture(scope="module")
def facade_run(tiny_model_yaml, tiny_data, tmp_path_factory):
    """One YOLO(yaml).train(...) with callbacks registered on the facade."""
    project = tmp_path_factory.mktemp("facade")
    calls = []
    model = YOLO(tiny_model_yaml)
    model.add_callback("on_train_epoch_end", count_calls(calls, "on_train_epoch_end"))
    model.add_callback("on_val_end", count_calls(calls, "on_val_end"))
    metrics = model.train(
        data=tiny_data, epochs=2, imgsz=64, batch=4, workers=0, device="cpu", project=str(project), name="train",
        plots=False, seed=0, deterministic=True, warmup_epochs=0.5, close_mosaic=0, verbose=False,
    )  # fmt: skip
    return model, metrics, calls, project


def test_train_returns_the_final_metrics_of_best_pt(facade_run):
    model, metrics, _, _ = facade_run
    assert list(metrics) == [*METRIC_KEYS, "fitness"] and metrics is model.trainer.validator.metrics
    assert all(isinstance(metrics[k], float) and 0 <= metrics[k] <= 1 for k in METRIC_KEYS)
    assert {k: metrics[k] for k in METRIC_KEYS} == model.trainer.metrics  # best.pt's final validation
    assert model.model_path == str(model.trainer.best)  # the facade now points at the trained weights


def test_facade_callbacks_reach_the_trainer_and_its_validator(facade_run):
    model, _, calls, _ = facade_run
    epoch_ends = [obj for event, obj in calls if event == "on_train_epoch_end"]
    val_ends = [obj for event, obj in calls if event == "on_val_end"]
    assert len(epoch_ends) == 2 and all(obj is model.trainer for obj in epoch_ends)
    assert len(val_ends) == 3 and all(obj is model.trainer.validator for obj in val_ends)  # 2 epochs + best.pt


def test_val_of_best_pt_returns_the_validator_metrics_and_writes_its_folder(facade_run, tiny_data, tmp_path):
    model, train_metrics, _, _ = facade_run
    best = YOLO(model.trainer.best)
    val_args = dict(data=tiny_data, imgsz=64, batch=8, workers=0, device="cpu", project=str(tmp_path), plots=False)
    # best.pt on the same val set with the training run's settings (its precision: half=True when it trained with
    # amp): the numbers of the run's final evaluation.
    metrics = best.val(**val_args, save_json=True, half=model.trainer.amp_dtype is not None)
    assert list(metrics) == [*METRIC_KEYS, "fitness"]
    assert {k: metrics[k] for k in METRIC_KEYS} == pytest.approx({k: train_metrics[k] for k in METRIC_KEYS})
    assert metrics["fitness"] == pytest.approx(0.1 * metrics["metrics/mAP50(B)"] + 0.9 * metrics["metrics/mAP50-95(B)"])
    assert (tmp_path / "val" / "predictions.json").is_file()
    best.val(**val_args, save_json=True)
    assert (tmp_path / "val2" / "predictions.json").is_file()  # a second validation gets its own folder


# ---------------------------------------------------------------------------------------------- command line
def cli(*args, cwd):
    """Run `yolotrain ARGS` (the installed console script, else `python -m yolotrain`); return the process."""
    script = shutil.which("yolotrain")
    command = [script] if script else [sys.executable, "-m", "yolotrain"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_run(tiny_model_yaml, tiny_data, tmp_path_factory):
    """`python -m yolotrain train ...` for 2 epochs with stdout/stderr captured (not a terminal)."""
    project = tmp_path_factory.mktemp("cli")
    args = [
        "-m", "yolotrain", "train", f"model={tiny_model_yaml}", f"data={tiny_data}", "epochs=2", "imgsz=64", "batch=4",
        "workers=0", "device=cpu", f"project={project}", "name=train", "plots=False", "warmup_epochs=0.5",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, *args], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    return process, project / "train"


def test_cli_train_writes_results_csv(cli_run):
    _, save_dir = cli_run
    rows = read_rows(save_dir / "results.csv")
    assert [int(float(r["epoch"])) for r in rows] == [1, 2]
    assert (save_dir / "weights" / "best.pt").is_file() and (save_dir / "weights" / "last.pt").is_file()


def test_cli_progress_is_one_clean_line_per_epoch_when_not_a_terminal(cli_run):
    process, _ = cli_run
    output = process.stdout + process.stderr
    assert "\r" not in output  # no tqdm redraws in logs
    epoch_lines = [line for line in output.splitlines() if re.match(r"^\s*\d+/2\s", line)]
    assert [line.split()[0] for line in epoch_lines] == ["1/2", "2/2"]
    for line in epoch_lines:  # Epoch, Mem, 3 losses, Instances, Size
        fields = line.split()
        assert len(fields) == 7 and all(math.isfinite(float(x)) for x in fields[2:5]) and fields[-1] == "64"


def test_cli_val_of_best_pt(cli_run, tiny_data, tmp_path):
    _, save_dir = cli_run
    best = save_dir / "weights" / "best.pt"
    process = cli(
        "val", f"model={best}", f"data={tiny_data}", "imgsz=64", "batch=8", "workers=0", "device=cpu",
        f"project={tmp_path}", "save_json=True", "plots=False", cwd=tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-2000:]
    output = process.stdout + process.stderr
    assert re.search(r"^\s+all\s+8\s+\d+\s", output, re.M)  # the metrics table's "all" row over the 8 val images
    assert (tmp_path / "val" / "predictions.json").is_file()


class Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize(
    "stdout_tty, stderr_tty, bar", [(True, True, True), (True, False, False), (False, True, False)]
)
def test_progress_bar_only_when_both_streams_are_terminals(
    train_overrides, monkeypatch, yolotrain_log, stdout_tty, stderr_tty, bar
):
    """tqdm redraws go to stderr; `yolotrain train ... 2> train.log` from a terminal must log plain epoch lines."""
    stderr = Stream(stderr_tty)
    monkeypatch.setattr(sys, "stdout", Stream(stdout_tty))
    monkeypatch.setattr(sys, "stderr", stderr)
    train(train_overrides, epochs=1, val=False)
    epoch_lines = [m for m in yolotrain_log if re.match(r"^\s*1/1\s", m)]
    assert len(epoch_lines) == (0 if bar else 1)
    if bar:
        assert "\r" in stderr.getvalue()


# ------------------------------------------------------------------------------------------------ engine flags
def test_multi_scale_varies_the_batch_image_size(train_overrides):
    shapes = []
    trainer = train(train_overrides, [("on_train_batch_end", lambda t: shapes.append(t.last_batch_shape))],
                    multi_scale=True, val=False)  # fmt: skip
    sizes = {shape[2:] for shape in shapes}
    assert len(shapes) == 2 * trainer.num_batches
    assert all(h == w and h % 32 == 0 and 32 <= h <= 96 for h, w in sizes)  # 64 px +/- 50%, stride multiples
    assert len(sizes) > 1
    assert torch.isfinite(trainer.tloss).all()


def test_multi_scale_off_keeps_imgsz(train_overrides):
    shapes = []
    train(train_overrides, [("on_train_batch_end", lambda t: shapes.append(t.last_batch_shape))], epochs=1, val=False)
    assert {shape[2:] for shape in shapes} == {(64, 64)}


class LazilyFailingCompile(torch.nn.Module):
    """Stands in for torch.compile's wrapper on a machine whose compiler fails at the first forward."""

    def __init__(self, model):
        super().__init__()
        self._orig_mod = model

    def forward(self, *args, **kwargs):
        raise RuntimeError("backend compiler failed: no working C++ compiler")


def test_compile_unavailable_falls_back_with_a_message(train_overrides, monkeypatch, yolotrain_log):
    def unavailable(model, *args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unavailable)
    trainer = train(train_overrides, epochs=1, val=False, compile=True)
    assert any("torch.compile is not available here (Dynamo is not supported" in m for m in yolotrain_log)
    assert trainer.train_model is trainer.model
    assert len(read_rows(trainer.csv)) == 1


def test_compile_failing_at_the_first_batch_falls_back_with_a_message(train_overrides, monkeypatch, yolotrain_log):
    monkeypatch.setattr(torch, "compile", lambda model, *args, **kwargs: LazilyFailingCompile(model))
    trainer = train(train_overrides, epochs=1, val=False, compile=True)
    warnings = [m for m in yolotrain_log if "torch.compile failed when running the model" in m]
    assert len(warnings) == 1 and "no working C++ compiler" in warnings[0] and "training uncompiled" in warnings[0]
    assert trainer.train_model.module is trainer.model  # every later batch runs eagerly
    assert len(read_rows(trainer.csv)) == 1 and torch.isfinite(trainer.tloss).all()


def test_compile_that_works_is_used(train_overrides, monkeypatch, yolotrain_log):
    compiled = []

    def fake_compile(model, *args, **kwargs):
        compiled.append(model)
        return model  # runs eagerly, which is all a CPU test can afford

    monkeypatch.setattr(torch, "compile", fake_compile)
    trainer = train(train_overrides, epochs=1, val=False, compile=True)
    assert compiled == [trainer.model]
    assert "compile: torch.compile enabled" in yolotrain_log
    assert not any("training uncompiled" in m for m in yolotrain_log)


def test_optimizer_auto_logs_its_pick_and_ignores_lr0_and_momentum(train_overrides, yolotrain_log):
    trainer = train(train_overrides, epochs=1, val=False, optimizer="auto", lr0=0.05, momentum=0.5)
    # A short run on 6 classes: AdamW with lr = 0.002 * 5 / (4 + nc) and beta1 0.9.
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == [0.001] * 3
    assert trainer.schedule.momentum_value == 0.9
    picks = [m for m in yolotrain_log if "'optimizer=auto' picked" in m]
    assert len(picks) == 1 and "AdamW(lr=0.001, momentum=0.9)" in picks[0] and "ignoring lr0 and momentum" in picks[0]
    assert trainer.args.lr0 == 0.05 and trainer.args.momentum == 0.5  # the user's arguments stay as given
    assert trainer.resolved.optimizer == "AdamW(lr=0.001, momentum=0.9)"


def test_explicit_optimizer_uses_lr0_and_momentum(train_overrides):
    trainer = train(train_overrides, epochs=1, val=False, optimizer="SGD", lr0=0.05, momentum=0.8)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == [0.05] * 3
    assert trainer.schedule.momentum_value == 0.8


def label_class_counts(data_dir, nc):
    classes = [int(line.split()[0]) for f in sorted(Path(data_dir, "labels", "train").glob("*.txt"))
               for line in f.read_text().splitlines() if line.strip()]  # fmt: skip
    return np.bincount(classes, minlength=nc)


def test_cls_pw_sets_class_weights_from_label_frequencies(train_overrides, tiny_data):
    trainer = train(train_overrides, epochs=1, val=False, cls_pw=1.0)
    counts = label_class_counts(Path(tiny_data).parent, 6)
    assert (counts > 0).all() and len(set(counts.tolist())) > 1  # imbalanced, so the weights are not all 1
    expected = (1 / counts) / (1 / counts).mean()
    assert trainer.model.class_weights.cpu().numpy() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(trainer.model.criterion.class_weights, trainer.model.class_weights)  # the loss uses them
    rarest, commonest = counts.argmin(), counts.argmax()
    assert trainer.model.class_weights[rarest] > 1 > trainer.model.class_weights[commonest]


def test_cls_pw_zero_leaves_the_loss_unweighted(train_overrides):
    trainer = train(train_overrides, epochs=1, val=False)
    assert trainer.model.class_weights is None and trainer.model.criterion.class_weights is None


def test_save_period_writes_every_nth_epoch(train_overrides):
    trainer = train(train_overrides, epochs=3, val=False, save_period=2)
    weights = sorted(p.name for p in trainer.wdir.glob("*.pt"))
    assert weights == ["best.pt", "epoch2.pt", "last.pt"]
    assert load_checkpoint(trainer.wdir / "epoch2.pt")["epoch"] == 1


def test_val_false_validates_only_after_the_final_epoch(train_overrides):
    """val=False: no validation during training; the final epoch is still validated (it picks best.pt), then
    best.pt is evaluated once more for the returned metrics. Rows of unvalidated epochs hold NaN metrics."""
    calls = []
    trainer = train(train_overrides, [("on_val_start", count_calls(calls, "val"))], epochs=3, val=False)
    assert validated_epochs(read_rows(trainer.csv)) == [3]
    assert len(calls) == 2  # epoch 3, then best.pt
    assert load_checkpoint(trainer.best)["epoch"] == 2
    assert set(trainer.metrics) == set(METRIC_KEYS)


def test_val_period_validates_every_nth_epoch_and_the_last(train_overrides):
    calls = []
    trainer = train(train_overrides, [("on_val_start", count_calls(calls, "val"))], epochs=3, val_period=2)
    assert validated_epochs(read_rows(trainer.csv)) == [2, 3]  # epoch 2 by the period, epoch 3 as the last
    assert len(calls) == 3


def test_help_into_a_closed_pipe_ends_quietly():
    """`yolotrain help | head`: the reader leaves before the help is written; no traceback, the SIGPIPE status."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "yolotrain", "help"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # before the child has written a byte (it is still importing)
    errors = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141 and "Traceback" not in errors and "BrokenPipe" not in errors


def test_a_run_that_fails_before_training_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    """A mistake found while setting up (a missing data yaml, missing weights) stops with one line and no
    runs/detect/trainN, so the folder numbers of the next runs stay as README says."""
    from yolotrain.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    assert cli_main(["train", "data=does_not_exist.yaml", "epochs=1"]) != 0
    assert cli_main(["train", "model=missing.pt", "epochs=1", "imgsz=32"]) != 0
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "detect" / "train").mkdir(parents=True)  # an earlier run's folder stays as it was
    assert cli_main(["train", "data=does_not_exist.yaml", "epochs=1"]) != 0
    assert sorted(p.name for p in (tmp_path / "runs" / "detect").iterdir()) == ["train"]
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("yolotrain: error:")]
    assert len(errors) == 3
