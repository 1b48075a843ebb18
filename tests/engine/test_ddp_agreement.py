"""Two gloo processes take every stop-or-continue decision together: a signal to one rank, a time budget seen
through clocks that disagree, a non-finite loss on one rank. Each run ends without a hang, with a loadable
checkpoint and the same weights on both ranks.

The trainer classes are module-level so the workers (started with `spawn`) import them by name.
"""

import hashlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

import yolotrain
from test_ddp import run_args, worker_env
from yolotrain import DetectionTrainer
from yolotrain.utils import dist
from yolotrain.utils.checkpoint import load_checkpoint
from yolotrain.utils.torch_utils import de_parallel

DIGESTS_ENV = "YOLOTRAIN_TEST_DIGESTS_DIR"
PACKAGE_DIR = Path(yolotrain.__file__).parent


def weights_digest(trainer):
    """sha256 of every parameter, in order: equal on two ranks only if their weights are equal. (BatchNorm's
    running statistics are each rank's own between forwards: DDP sends rank 0's at the start of each one.)"""
    digest = hashlib.sha256()
    for parameter in de_parallel(trainer.model).parameters():
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class DigestingTrainer(DetectionTrainer):
    """Writes this rank's weights digest and epoch count when training ends, however it ends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback("teardown", self._write_digest)

    @staticmethod
    def _write_digest(trainer):
        if trainer.model is not None:
            path = Path(os.environ[DIGESTS_ENV]) / f"rank{max(dist.rank(), 0)}.txt"
            path.write_text(f"{weights_digest(trainer)} {trainer.epochs} {trainer.epoch}\n")


class SignalToRankOne(DigestingTrainer):
    """Rank 1 alone receives SIGTERM as its third batch of the second epoch starts."""

    def preprocess_batch(self, batch):
        if dist.rank() == 1 and self.epoch == 1 and self.batches_in_epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().preprocess_batch(batch)


class FastClockOnRankOne(DigestingTrainer):
    """Rank 1's clock runs 20x fast: on its own it would stop (and re-plan) far earlier than rank 0."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if dist.rank() == 1:
            origin = time.time()
            self.time_budget.clock = lambda: origin + 20 * (time.time() - origin)


class NonFiniteLossOnRankOne(DigestingTrainer):
    """Rank 1's loss is NaN once, at the second batch of the second epoch."""

    def compute_loss(self, batch):
        loss, items = super().compute_loss(batch)
        if dist.rank() == 1 and self.epoch == 1 and self.batches_in_epoch == 1 and not getattr(self, "_fired", 0):
            self._fired = 1
            loss = loss * float("nan")
        return loss, items


class CountingGradientReductions(DigestingTrainer):
    """Counts DDP's gradient all-reduces (one call per gradient bucket) and writes, after each batch, the count so
    far and whether the optimizer stepped."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reductions, self.stepped, self.log = 0, False, []
        self.add_callback("on_pretrain_routine_end", self._count_reductions)
        self.add_callback("optimizer_step", lambda t: setattr(t, "stepped", True))
        self.add_callback("on_train_batch_end", self._log_batch)

    @staticmethod
    def _count_reductions(trainer):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            trainer.reductions += 1
            return allreduce_hook(state, bucket)

        trainer.train_model.register_comm_hook(None, counting_hook)

    @staticmethod
    def _log_batch(trainer):
        trainer.log.append(f"{trainer.reductions} {int(trainer.stepped)}")
        trainer.stepped = False
        path = Path(os.environ[DIGESTS_ENV]) / f"reductions{max(dist.rank(), 0)}.txt"
        path.write_text("\n".join(trainer.log))


def run_two_ranks(trainer_name, args, digests, timeout=180):
    script = textwrap.dedent(
        f"""
        from test_ddp_agreement import {trainer_name}
        from yolotrain import YOLO
        YOLO({args["model"]!r}).train(trainer={trainer_name}, nprocs=2, **{args!r})
        """
    )
    env = {**worker_env(), DIGESTS_ENV: str(digests)}
    # The timeout is the bound: a hang fails the test instead of blocking the suite.
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)


def rank_records(digests):
    return [(digests / f"rank{rank}.txt").read_text().split() for rank in (0, 1)]


@pytest.fixture
def digests(tmp_path):
    folder = tmp_path / "digests"
    folder.mkdir()
    return folder


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_at_the_same_batch_with_a_checkpoint(tiny_model_yaml, tiny_data, tmp_path,
                                                                             digests):
    args = run_args(tiny_model_yaml, tiny_data, tmp_path / "runs", epochs=3)
    result = run_two_ranks("SignalToRankOne", args, digests)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "training interrupted at epoch 2, batch 3" in output, output[-3000:]
    rank0, rank1 = rank_records(digests)
    assert rank0 == rank1  # same weights, same epoch
    checkpoint = load_checkpoint(tmp_path / "runs" / "train" / "weights" / "last.pt")
    assert (checkpoint["epoch"], checkpoint["batch_index"]) == (1, 3)


def torchrun_worker_of_rank(launcher: psutil.Process, rank: int, timeout: float = 60) -> psutil.Process:
    """The worker process that torchrun (`launcher`) started for `rank`, found by its RANK environment variable."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in launcher.children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "yolotrain" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:  # a process that ended or changed between the listing and the look
                continue
        time.sleep(0.2)
    raise AssertionError(f"no torchrun worker of rank {rank} within {timeout} s")


@pytest.mark.slow
def test_sigterm_to_one_torchrun_worker_ends_every_worker_with_one_line_and_exit_130(tiny_model_yaml, tiny_data,
                                                                                     tmp_path):
    """What a preempted node sees: the signal stops both ranks with a checkpoint, and each worker ends as a single
    process does (one line, exit 130), so torchrun's report holds no Python traceback of yolotrain's code."""
    args = run_args(tiny_model_yaml, tiny_data, tmp_path / "runs", epochs=100)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "yolotrain", "train", *(f"{k}={v}" for k, v in args.items())]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=worker_env())
    try:
        worker = torchrun_worker_of_rank(psutil.Process(launcher.pid), rank=1)
        last = tmp_path / "runs" / "train" / "weights" / "last.pt"
        deadline = time.monotonic() + 120
        while not last.exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # signal once an epoch has been saved: well inside the 100 planned
        worker.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode != 0, output[-3000:]
    # torchrun's own report (its ChildFailedError traceback) may stay; no traceback goes through yolotrain's code.
    assert "TrainingInterrupted" not in output and f'File "{PACKAGE_DIR}' not in output, output
    # Mid-epoch ("at epoch N, batch B") or, when the signal lands while the epoch is being validated or saved,
    # at its end ("after epoch N"): either way one line from each worker.
    lines = re.findall(r"yolotrain: error: training interrupted (?:at|after) epoch", output)
    assert len(lines) == 2, output[-3000:]
    exit_codes = re.findall(r"exitcode\s*:\s*(-?\d+)", output)
    assert exit_codes and set(exit_codes) == {"130"}, output[-3000:]  # no worker died by torchrun's SIGTERM
    checkpoint = load_checkpoint(last)
    assert 0 < checkpoint["epoch"] < 99


@pytest.mark.slow
def test_clocks_that_disagree_give_one_time_budget_decision(tiny_model_yaml, tiny_data, tmp_path, digests):
    """Rank 1's fast clock runs out of the budget inside the first epoch; both ranks stop at that batch, and rank
    0's clock (which had time left) re-plans the epoch count for both."""
    args = run_args(tiny_model_yaml, tiny_data, tmp_path / "runs", epochs=50, time=30 / 3600, val=False)
    result = run_two_ranks("FastClockOnRankOne", args, digests)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rank0, rank1 = rank_records(digests)
    assert rank0 == rank1  # same weights, the same planned epochs and last epoch on both ranks
    checkpoint = load_checkpoint(tmp_path / "runs" / "train" / "weights" / "last.pt")
    assert checkpoint["epoch"] + 1 < 50 and int(rank0[1]) == checkpoint["planned_epochs"]


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_rolls_both_back_to_rank_zeros_checkpoint(tiny_model_yaml, tiny_data,
                                                                                tmp_path, digests):
    args = run_args(tiny_model_yaml, tiny_data, tmp_path / "runs", epochs=3)
    result = run_two_ranks("NonFiniteLossOnRankOne", args, digests)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "NaN recovery 1/3" in output and "continuing from epoch 2" in output
    rank0, rank1 = rank_records(digests)
    assert rank0 == rank1
    checkpoint = load_checkpoint(tmp_path / "runs" / "train" / "weights" / "last.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["nan_recoveries"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_accumulation_micro_steps_skip_the_gradient_all_reduce(tiny_model_yaml, tiny_data, tmp_path, digests):
    """Global batch 4 and nbs 16: the optimizer steps every 4th batch, and only those batches all-reduce."""
    args = run_args(tiny_model_yaml, tiny_data, tmp_path / "runs", epochs=2, nbs=16, warmup_epochs=0, val=False)
    result = run_two_ranks("CountingGradientReductions", args, digests)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for rank in (0, 1):
        lines = (digests / f"reductions{rank}.txt").read_text().splitlines()
        rows = [tuple(int(x) for x in line.split()) for line in lines]  # (all-reduces so far, stepped)
        counts, stepped = [r[0] for r in rows], [r[1] for r in rows]
        assert stepped == [0, 0, 0, 1] * 2
        increments = [b - a for a, b in zip([0, *counts], counts)]
        assert all(inc == 0 for inc, step in zip(increments, stepped) if not step)
        assert all(inc > 0 for inc, step in zip(increments, stepped) if step)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_group_torchrun_restarts_after_a_killed_worker_continues_the_same_run(tiny_model_yaml, tiny_data, tmp_path,
                                                                              victim):
    """Preemption: kill -9 of one worker (rank 1, or rank 0, the one that saves) once epoch 1 is saved. torchrun
    restarts the group (--max-restarts), the restarted workers find the run by the job's id and resume its last.pt:
    exit 0, one run folder, one results.csv row per epoch, and the weights of an uninterrupted run."""
    from test_ddp import torchrun

    args = run_args(tiny_model_yaml, tiny_data, tmp_path / "runs", epochs=3)
    straight = torchrun({**args, "project": str(tmp_path / "straight")})
    assert straight.returncode == 0, straight.stderr[-3000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--max-restarts=2", "-m", "yolotrain", "train", *(f"{k}={v}" for k, v in args.items())]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=worker_env())
    try:
        worker = torchrun_worker_of_rank(psutil.Process(launcher.pid), rank=victim)
        last = tmp_path / "runs" / "train" / "weights" / "last.pt"
        deadline = time.monotonic() + 120
        while not last.exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        worker.send_signal(signal.SIGKILL)
        output, _ = launcher.communicate(timeout=240)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, output[-3000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["train"]
    rows = (tmp_path / "runs" / "train" / "results.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == [1, 2, 3]
    resumed = load_checkpoint(last)["model"]
    expected = load_checkpoint(tmp_path / "straight" / "train" / "weights" / "last.pt")["model"]
    assert all(torch.allclose(resumed[k].float(), expected[k].float(), atol=1e-5) for k in expected)


def test_a_first_start_never_continues_an_older_run_of_the_same_job_id(train_overrides, monkeypatch):
    """Only a restart (TORCHELASTIC_RESTART_COUNT > 0) looks for the job's run folder."""
    from yolotrain.engine.resume import elastic_restart_folder, mark_elastic_run

    first = DetectionTrainer(overrides={**train_overrides, "epochs": 1})
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-42")
    first.save_dir.mkdir(parents=True)
    mark_elastic_run(first.save_dir)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert elastic_restart_folder(first.args) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert elastic_restart_folder(first.args) == first.save_dir
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another-job")
    assert elastic_restart_folder(first.args) is None
