"""Training in a real subprocess that is killed (SIGKILL) or preempted (SIGTERM), then resumed through the CLI.

Checks: checkpoints and results.csv are never half-written; a resumed run ends with the same results.csv values
and bit-identical weights as an uninterrupted one (epoch-boundary SIGKILL and mid-epoch SIGTERM, 0 and 2 workers);
SIGTERM exits with code 130 and one line; a second signal exits at once.
"""

import csv
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from yolotrain import DetectionTrainer
from yolotrain.utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

# A fork server: it imports torch and yolotrain once, then for each JSON line {"argv", "env", "stderr"} on stdin
# forks a child that runs `yolotrain.cli.main(argv)` (stderr to the given file), prints "pid N", waits for the child
# and prints "exit CODE" (-9 when SIGKILLed). Forking skips the import cost, so 20 kill/resume cycles stay quick.
# Test hooks, chosen by the child's environment:
#   YT_PAUSE_AT="epoch,batches_done": in that batch, touch YT_MARKER and wait for a signal from the test
#     (YT_HOLD=1: keep waiting after it, until a second signal ends the process)
#   YT_KILL_AFTER_EPOCH=k: SIGKILL itself right after epoch k's checkpoint is saved
#   YT_STARTED: touched when training starts; YT_SAVES: one line appended per torch.save, which then lingers
#     (a slow disk) before the file is renamed into place, so that kills land inside saves
DRIVER = r"""
import json, os, signal, sys, time
import torch
torch.set_num_threads(1)
from yolotrain import cli
from yolotrain.engine.trainer import BaseTrainer
from yolotrain.tasks.detect.train import DetectionTrainer


def touch(path):
    with open(path, "a") as f:
        f.write("x\n")


def wait_for(condition, seconds=120):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.005)


def install_hooks(env):
    if env.get("YT_PAUSE_AT"):
        pause_epoch, pause_batch = map(int, env["YT_PAUSE_AT"].split(","))
        preprocess = DetectionTrainer.preprocess_batch

        def preprocess_and_pause(self, batch):
            if (self.epoch, self.batches_in_epoch) == (pause_epoch, pause_batch) and not self.interrupt.received:
                touch(env["YT_MARKER"])
                wait_for(lambda: self.interrupt.received)
                if env.get("YT_HOLD"):
                    touch(env["YT_MARKER"] + ".got-first")
                    wait_for(lambda: False)
            return preprocess(self, batch)

        DetectionTrainer.preprocess_batch = preprocess_and_pause
    if env.get("YT_KILL_AFTER_EPOCH"):
        save_if_due = BaseTrainer._save_if_due

        def save_then_die(self, epoch):
            save_if_due(self, epoch)
            if epoch + 1 == int(env["YT_KILL_AFTER_EPOCH"]):
                os.kill(os.getpid(), signal.SIGKILL)

        BaseTrainer._save_if_due = save_then_die
    if env.get("YT_STARTED"):
        fit = BaseTrainer._fit

        def fit_and_announce(self):
            touch(env["YT_STARTED"])
            return fit(self)

        BaseTrainer._fit = fit_and_announce
    if env.get("YT_SAVES"):
        torch_save = torch.save

        def slow_save(obj, f, *args, **kwargs):
            touch(env["YT_SAVES"])
            torch_save(obj, f, *args, **kwargs)
            time.sleep(0.15)

        torch.save = slow_save


def run_child(command):
    fd = os.open(command["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    install_hooks(command["env"])
    try:
        code = cli.main(command["argv"])
    except SystemExit as exit:
        code = exit.code
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


for line in sys.stdin:
    command = json.loads(line)
    pid = os.fork()
    if pid == 0:
        run_child(command)
    print(f"pid {pid}", flush=True)
    print(f"exit {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}", flush=True)
"""

RUN_ARGS = dict(
    epochs=3, imgsz=64, batch=4, device="cpu", plots=False, seed=0, deterministic=True,
    warmup_epochs=0, close_mosaic=0, verbose=False, nbs=8,  # no warmup: 2 batches per optimizer step throughout
    threads=1,  # every run alike; on a 2-CPU machine it leaves a CPU to `workers=2` (2 threads load in-process)
)  # fmt: skip
COMPARED_COLUMNS_SKIP = ("epoch", "time")


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cli_args(args):
    return [f"{k}={v}" for k, v in args.items()]


class Child:
    """One training process forked by the server: signal it, then `finish()` for (exit code, stderr)."""

    def __init__(self, server, stderr_path):
        self.server, self.stderr_path = server, stderr_path
        self.pid = int(server.stdout.readline().split()[1])
        self.returncode = None

    def poll(self):
        """None while the child runs, else its exit code."""
        if self.returncode is None:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:  # the server has reaped it
                self.finish()
        return self.returncode

    def send_signal(self, signum):
        os.kill(self.pid, signum)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def finish(self):
        line = self.server.stdout.readline()
        assert line.startswith("exit "), f"fork server died: {line!r}"
        self.returncode = int(line.split()[1])
        return self.returncode, self.stderr_path.read_text()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    driver = tmp_path_factory.mktemp("driver") / "driver.py"
    driver.write_text(DRIVER)
    process = subprocess.Popen(
        [sys.executable, str(driver)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    yield process
    process.stdin.close()
    process.wait(timeout=60)


def start(server, tmp_path, mode_and_args, **env):
    stderr_path = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
    command = {"argv": list(mode_and_args), "env": {k: str(v) for k, v in env.items()}, "stderr": str(stderr_path)}
    server.stdin.write(json.dumps(command) + "\n")
    server.stdin.flush()
    return Child(server, stderr_path)


def run(server, tmp_path, mode_and_args, **env):
    return start(server, tmp_path, mode_and_args, **env).finish()


def wait_for_file(path, process, lines=1, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError(f"{path} did not appear")


@pytest.fixture(scope="module")
def reference(tiny_model_yaml, tiny_data, tmp_path_factory):
    """The uninterrupted 3-epoch run every interrupted one must reproduce exactly."""
    project = tmp_path_factory.mktemp("reference")
    overrides = {**RUN_ARGS, "model": tiny_model_yaml, "data": tiny_data, "workers": 0, "project": str(project)}
    trainer = DetectionTrainer(overrides=overrides)
    threads = torch.get_num_threads()
    trainer.train()
    torch.set_num_threads(threads)  # the run fixed its own count in this process: later tests get theirs back
    return trainer


def assert_same_run(reference, save_dir):
    rows, expected_rows = read_rows(save_dir / "results.csv"), read_rows(reference.csv)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    for expected, row in zip(expected_rows, rows):
        for column in expected:
            if column not in COMPARED_COLUMNS_SKIP:
                assert float(row[column]) == pytest.approx(float(expected[column]), abs=1e-6, nan_ok=True), column
    a, b = load_checkpoint(reference.last), load_checkpoint(save_dir / "weights" / "last.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    assert a["ema_updates"] == b["ema_updates"]
    assert a["scaler"] == b["scaler"] and a["schedule"] == b["schedule"] and a["stopper"] == b["stopper"]
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(server, reference, tiny_model_yaml, tiny_data, tmp_path, workers):
    project = tmp_path / "runs"
    args = {**RUN_ARGS, "model": tiny_model_yaml, "data": tiny_data, "workers": workers, "project": project}
    marker = tmp_path / "paused"
    # Batch index 2 of epoch 2: with nbs=8 (2 batches per optimizer step) its gradients are still accumulating.
    process = start(server, tmp_path, ["train", *cli_args(args)], YT_PAUSE_AT="1,2", YT_MARKER=marker)
    assert wait_for_file(marker, process), process.finish()[1]
    process.send_signal(signal.SIGTERM)
    _, err = process.finish()

    assert process.returncode == 130, err
    errors = [line for line in err.splitlines() if line.startswith("yolotrain: error:")]
    last_pt = project / "train" / "weights" / "last.pt"
    assert errors == [f"yolotrain: error: training interrupted at epoch 2, batch 3; state saved to {last_pt}, "
                      f"continue with resume={last_pt}"]  # fmt: skip
    assert "Traceback" not in err
    checkpoint = load_checkpoint(last_pt)
    assert (checkpoint["epoch"], checkpoint["batch_index"]) == (1, 3)
    assert any(g is not None and g.abs().sum() > 0 for g in checkpoint["grads"])  # not-yet-stepped gradients
    assert [r["epoch"] for r in read_rows(project / "train" / "results.csv")] == ["1"]

    code, err = run(server, tmp_path, ["train", "resume=True", f"project={project}"])
    assert code == 0, err
    assert_same_run(reference, project / "train")


def test_sigkill_after_epoch_then_resume_equals_uninterrupted(server, reference, tiny_model_yaml, tiny_data, tmp_path):
    project = tmp_path / "runs"
    args = {**RUN_ARGS, "model": tiny_model_yaml, "data": tiny_data, "workers": 2, "project": project}
    code, _ = run(server, tmp_path, ["train", *cli_args(args)], YT_KILL_AFTER_EPOCH=2)
    assert code == -signal.SIGKILL
    last_pt = project / "train" / "weights" / "last.pt"
    assert load_checkpoint(last_pt)["epoch"] == 1 and "batch_index" not in load_checkpoint(last_pt)

    code, err = run(server, tmp_path, ["train", f"resume={last_pt}"])
    assert code == 0, err
    assert_same_run(reference, project / "train")


def test_second_signal_exits_at_once(server, tiny_model_yaml, tiny_data, tmp_path):
    project = tmp_path / "runs"
    args = {**RUN_ARGS, "model": tiny_model_yaml, "data": tiny_data, "workers": 0, "project": project}
    marker = tmp_path / "paused"
    # The paused batch never finishes on its own: only the second signal can end the process.
    process = start(server, tmp_path, ["train", *cli_args(args)], YT_PAUSE_AT="1,1", YT_MARKER=marker, YT_HOLD=1)
    assert wait_for_file(marker, process), process.finish()[1]
    process.send_signal(signal.SIGTERM)
    assert wait_for_file(Path(f"{marker}.got-first"), process)
    process.send_signal(signal.SIGTERM)
    _, err = process.finish()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "second signal received" in err
    checkpoint = load_checkpoint(project / "train" / "weights" / "last.pt")
    assert checkpoint["epoch"] == 0 and "batch_index" not in checkpoint  # nothing was saved after the signals


def assert_intact(weights_dir):
    """last.pt and best.pt (when present) load and hold finite weights; no temp file passes for one."""
    for name in ("last.pt", "best.pt"):
        path = weights_dir / name
        if path.exists():
            checkpoint = load_checkpoint(path)
            for key in ("model", "ema"):
                for tensor in (checkpoint.get(key) or {}).values():
                    assert torch.isfinite(tensor.float()).all(), (name, key)


def test_sigkill_at_random_moments_never_breaks_checkpoints(server, tiny_model_yaml, tmp_path):
    """20 SIGKILLs, half of them inside a save; after each, the files load and the run resumes to the end."""
    from yolotrain.data.builtin import generate_shapes_dataset

    data = generate_shapes_dataset(tmp_path / "shapes", n_train=8, n_val=4, imgsz=64, seed=5)
    project = tmp_path / "runs"
    args = {**RUN_ARGS, "model": tiny_model_yaml, "data": data, "workers": 0, "project": project, "epochs": 100}
    args.update(name="train", exist_ok=True)
    weights = project / "train" / "weights"
    started, saves = tmp_path / "started", tmp_path / "saves"
    chooser = random.Random(0)
    kills = killed_in_save = 0
    while kills < 20:
        for path in (started, saves):
            path.unlink(missing_ok=True)
        resume = ["resume=True", f"project={project}"] if (weights / "last.pt").exists() else cli_args(args)
        process = start(server, tmp_path, ["train", *resume], YT_STARTED=started, YT_SAVES=saves)
        assert wait_for_file(started, process), process.finish()[1]
        in_save = kills % 2 == 0
        if in_save:  # the 1st, 2nd or 3rd save after training started: last.pt or best.pt
            assert wait_for_file(saves, process, lines=chooser.randint(1, 3))
        else:
            time.sleep(chooser.uniform(0.0, 1.5))
        process.kill()
        _, err = process.finish()
        assert process.returncode == -signal.SIGKILL, err
        kills += 1
        killed_in_save += in_save
        assert_intact(weights)
        assert_consecutive_epochs(project / "train" / "results.csv")

    # Finish the run two epochs after the last completed one (resume may change epochs).
    epochs = load_checkpoint(weights / "last.pt")["epoch"] + 3
    code, err = run(server, tmp_path, ["train", "resume=True", f"project={project}", f"epochs={epochs}"])
    assert code == 0, err
    rows = read_rows(project / "train" / "results.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert all(math.isfinite(float(r["train/box_loss"])) for r in rows)
    assert_intact(weights)
    # Proof that kills landed inside saves: temp files written but never renamed over last.pt/best.pt.
    assert any(p.name.startswith(".") and p.name.endswith(".tmp") for p in weights.iterdir())


def assert_consecutive_epochs(csv_path):
    """results.csv parses and holds epochs 1..n once each (a killed run's extra row is dropped on resume)."""
    rows = read_rows(csv_path) if csv_path.exists() else []
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
