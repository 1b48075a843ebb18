"""batch=-1 / batch=0.7: the measured batch (fit from memory figures, CPU fallback, rank 0 measures for all ranks)
and the checks of the batch argument."""

import os
from pathlib import Path

import pytest
import torch

from yolotrain import YOLO, DetectionTrainer
from yolotrain.cfg import get_cfg, parse_cli_args
from yolotrain.engine import autobatch
from yolotrain.engine.autobatch import FALLBACK_BATCH, fit_batch_size, is_auto_batch, target_fraction
from yolotrain.errors import CfgError
from yolotrain.utils import dist

GIB = 2**30


def line(fixed_gib, per_image_gib, batches):
    """Peak memory of a step that grows linearly: fixed + per_image x batch (in bytes)."""
    return [int((fixed_gib + per_image_gib * b) * GIB) for b in batches]


# ---------------------------------------------------------------------------------------- selection (pure)
def test_the_largest_batch_on_the_fitted_line_within_the_budget():
    batches = [1, 2, 4, 8, 16]
    # 1 GiB fixed + 0.5 GiB per image; a 48.2 GiB target -> (48.2 - 1) / 0.5 = 94.4 -> 94 images.
    assert fit_batch_size(batches, line(1.0, 0.5, batches), 48.2 * GIB) == 94
    assert fit_batch_size(batches, line(1.0, 0.5, batches), 56.2 * GIB) == 110


def test_noisy_figures_are_fitted_by_least_squares():
    batches = [1, 2, 4, 8]
    peaks = [2.6 * GIB, 3.0 * GIB, 4.1 * GIB, 5.9 * GIB]  # about 2.1 GiB + 0.48 GiB per image
    slope = (4 * sum(b * p for b, p in zip(batches, peaks)) - sum(batches) * sum(peaks)) / (
        4 * sum(b * b for b in batches) - sum(batches) ** 2
    )
    intercept = (sum(peaks) - slope * sum(batches)) / 4
    assert fit_batch_size(batches, peaks, 20 * GIB) == int((20 * GIB - intercept) // slope)


def test_a_batch_that_ran_out_of_memory_caps_the_answer_at_the_largest_that_ran():
    batches = [1, 2, 4, 8]
    assert fit_batch_size(batches, line(1.0, 0.5, batches), 48 * GIB, failed_at=16) == 8


def test_answer_stays_between_one_and_the_maximum():
    batches = [1, 2, 4]
    assert fit_batch_size(batches, line(10.0, 1.0, batches), 5 * GIB) == 1  # even one image is over the target
    assert fit_batch_size(batches, line(0.0, 0.001, batches), 80 * GIB, max_batch=256) == 256


@pytest.mark.parametrize(
    "batches, peaks",
    [([1], [GIB]), ([1, 2], [2 * GIB, 2 * GIB]), ([1, 2, 4], [3 * GIB, 2 * GIB, GIB]), ([], [])],
)
def test_figures_that_allow_no_fit(batches, peaks):
    assert fit_batch_size(batches, peaks, 40 * GIB) is None


def test_which_batch_values_ask_for_a_measurement():
    assert is_auto_batch(-1) and is_auto_batch(0.7) and is_auto_batch(0.05)
    assert not any(is_auto_batch(v) for v in (16, 1, True, 1.0))
    assert target_fraction(-1) == autobatch.DEFAULT_FRACTION == 0.6
    assert target_fraction(0.7) == 0.7


def test_memory_of_other_processes_comes_off_the_target(monkeypatch, yolotrain_log):
    """The CUDA path with its device queries replaced: 80 GiB device, 9.9 GiB held elsewhere, 2 GiB by us."""
    batches = [1, 2, 4, 8, 16]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(68.1 * GIB), 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2 * GIB)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Test GPU")
    measured = []

    def fake_measure(model, imgsz, device, amp_dtype=None, make_batch=None):
        measured.append((imgsz, device.type, amp_dtype))
        return batches, line(1.0, 0.5, batches), None

    monkeypatch.setattr(autobatch, "measure_peak_memory", fake_measure)
    batch = autobatch.auto_batch_size(torch.nn.Linear(1, 1), 320, "cuda:0", 0.7, amp=True)
    # 0.7 x 80 = 56 GiB, minus the 9.9 GiB others hold: (46.1 - 1) / 0.5 = 90.2 -> 90.
    assert batch == 90
    assert measured == [(320, "cuda", torch.float16)]
    assert any(m.startswith("autobatch: batch 90 per device for 70% of Test GPU's 80.0 GiB") for m in yolotrain_log)


# ---------------------------------------------------------------------------------------- the argument
@pytest.mark.parametrize("value", [-1, 0.7, 0.05, 16, 1])
def test_accepted_batch_values(value):
    assert get_cfg({"batch": value}).batch == value


@pytest.mark.parametrize("value", [1.0, 1.5, 0.0, -0.5, 0, -2, 32.0])
def test_a_batch_outside_the_accepted_values_is_a_one_line_error(value):
    with pytest.raises(CfgError) as info:
        get_cfg({"batch": value})
    message = str(info.value)
    assert message == (
        f"'batch={value}' is invalid: expected int >= 1 or -1 or float in (0, 1), e.g. batch=16"
    )


def test_batch_from_the_command_line():
    assert get_cfg(parse_cli_args(["train", "batch=0.7"])[1]).batch == 0.7
    assert get_cfg(parse_cli_args(["train", "batch=-1"])[1]).batch == -1


# ---------------------------------------------------------------------------------------- in the trainer
@pytest.mark.parametrize("value", [-1, 0.7])
def test_auto_batch_on_the_cpu_trains_with_16_and_says_so(train_overrides, yolotrain_log, value):
    trainer = DetectionTrainer(overrides={**train_overrides, "batch": value, "epochs": 1, "val": False})
    trainer.train()
    assert trainer.batch_size == FALLBACK_BATCH
    assert trainer.train_loader.batch_size == FALLBACK_BATCH
    assert trainer.resolved.batch_per_rank == FALLBACK_BATCH
    lines = [m for m in yolotrain_log if m.startswith("autobatch:")]
    assert lines == [f"autobatch: batch={value} measures CUDA memory, none on cpu; training with batch 16"]
    assert trainer.args.batch == value  # the argument stays as given


def test_rank_zero_measures_and_every_rank_takes_its_figure(monkeypatch, train_overrides):
    trainer = DetectionTrainer(overrides={**train_overrides, "batch": -1})
    calls, sent = [], []
    monkeypatch.setattr(autobatch, "auto_batch_size", lambda *a, **k: calls.append(k) or 24)

    def broadcast(obj, src=0, group=None):
        sent.append(obj)
        return 24 if obj is None else obj  # what rank 0 sent

    monkeypatch.setattr(dist, "broadcast_object", broadcast)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "is_main", lambda: False)
    trainer._resolve_batch()  # another rank: measures nothing, takes rank 0's figure
    assert (calls, sent, trainer.batch_size) == ([], [None], 24)
    monkeypatch.setattr(dist, "is_main", lambda: True)
    trainer._resolve_batch()  # rank 0: measures once, sends its figure
    assert (len(calls), sent[-1], trainer.batch_size) == (1, 24, 24)
    assert calls[0]["make_batch"] == trainer.autobatch_batch  # the task's batch is what is measured


# ---------------------------------------------------------------------------------------- the measurement
@pytest.fixture
def cpu_stand_in_for_cuda_memory(monkeypatch):
    """The CUDA memory calls of a measurement, answered on the CPU: the peak is the largest batch of images seen."""
    peaks = {"now": 0}
    real_synthetic_batch = autobatch.synthetic_batch

    def synthetic_batch(batch_size, imgsz, device):
        peaks["now"] = batch_size * GIB
        return real_synthetic_batch(batch_size, imgsz, device)

    monkeypatch.setattr(autobatch, "synthetic_batch", synthetic_batch)
    for name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: peaks["now"])


@pytest.mark.parametrize("family", ["yolo", "yolo26"])
def test_the_real_model_runs_training_steps_and_is_left_as_it_was(cpu_stand_in_for_cuda_memory, tiny_family_yaml,
                                                                  family):
    from yolotrain.nn.model import DetectionModel

    model = DetectionModel(tiny_family_yaml(family), nc=3, verbose=False).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches, peaks, failed_at = autobatch.measure_peak_memory(model, 64, torch.device("cpu"), batches=(1, 2, 3))
    assert (batches, peaks, failed_at) == ([1, 2, 3], [GIB, 2 * GIB, 3 * GIB], None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics included
    assert all(p.grad is None for p in model.parameters())


def test_a_batch_that_runs_out_of_memory_ends_the_measurement(monkeypatch, cpu_stand_in_for_cuda_memory,
                                                              tiny_model_yaml):
    from yolotrain.nn.model import DetectionModel

    def step(model, batch, device, amp_dtype):
        batch_size = len(batch["img"])
        if batch_size >= 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return batch_size * GIB

    monkeypatch.setattr(autobatch, "_step_peak_memory", step)
    model = DetectionModel(tiny_model_yaml, nc=3, verbose=False)
    assert autobatch.measure_peak_memory(model, 64, torch.device("cpu")) == ([1, 2], [GIB, 2 * GIB], 4)


# ---------------------------------------------------------------------------------------- two processes
BATCH_DIR_ENV = "YOLOTRAIN_TEST_BATCH_DIR"


def fallback_differs_by_rank(trainer):
    """Run on every rank before set-up: were each rank to choose, rank 0 would pick 3 and rank 1 would pick 5."""
    autobatch.FALLBACK_BATCH = 3 if dist.rank() == 0 else 5


def record_batch_size(trainer):
    (Path(os.environ[BATCH_DIR_ENV]) / f"rank{dist.rank()}.txt").write_text(str(trainer.batch_size))


@pytest.mark.slow
def test_two_processes_train_with_the_batch_rank_zero_chose(train_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv(BATCH_DIR_ENV, str(tmp_path))
    model = YOLO(train_overrides["model"])
    model.add_callback("on_pretrain_routine_start", fallback_differs_by_rank)
    model.add_callback("on_train_start", record_batch_size)
    model.train(nprocs=2, **{**train_overrides, "batch": -1, "epochs": 1, "val": False, "dist_timeout": 60})
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["3", "3"]
