"""BaseTrainer/DetectionTrainer behaviour on tiny CPU runs: outputs, schedule, accumulation, stopping, recovery,
resume equivalence and callback order."""

import csv
import os

import pytest
import torch

from yolotrain import YOLO, DetectionTrainer
from yolotrain.engine.callbacks import EVENTS
from yolotrain.errors import YoloTrainError
from yolotrain.utils.checkpoint import load_checkpoint

RESULTS_COLUMNS = [
    "epoch", "time", "train/box_loss", "train/cls_loss", "train/dfl_loss",
    "metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)",
    "val/box_loss", "val/cls_loss", "val/dfl_loss", "lr/pg0", "lr/pg1", "lr/pg2",
]  # fmt: skip


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def train(overrides, trainer_class=DetectionTrainer, callbacks=None, **extra):
    trainer = trainer_class(overrides={**overrides, **extra})
    for event, fn in callbacks or []:
        trainer.add_callback(event, fn)
    trainer.train()
    return trainer


def test_outputs_of_a_run(train_overrides):
    trainer = train(train_overrides, plots=True, save_period=1)
    save_dir = trainer.save_dir
    assert save_dir.name == "train"
    rows = read_rows(save_dir / "results.csv")
    assert list(rows[0].keys()) == RESULTS_COLUMNS
    assert [int(float(r["epoch"])) for r in rows] == [1, 2]
    for name in ("last.pt", "best.pt", "epoch1.pt", "epoch2.pt"):
        assert (save_dir / "weights" / name).exists(), name
    for name in ("args.yaml", "results.png", "labels.jpg", "train_batch0.jpg"):
        assert (save_dir / name).exists(), name
    checkpoint = load_checkpoint(save_dir / "weights" / "last.pt")
    for key in ("epoch", "best_fitness", "model", "ema", "optimizer", "train_args", "train_metrics"):
        assert key in checkpoint
    assert "optimizer" not in load_checkpoint(save_dir / "weights" / "best.pt")  # stripped for release
    assert set(trainer.metrics) >= {"metrics/mAP50(B)", "metrics/mAP50-95(B)"}
    # The next run in the same project gets a new numbered folder.
    assert train(train_overrides, epochs=1, val=False).save_dir.name == "train2"


def test_validation_during_training_computes_without_the_ema_batchnorms_and_to_the_same_metrics(train_overrides):
    trainer = train(train_overrides, amp=False)  # two epochs: the EMA moved after the fused copy was made
    calls = []
    for module in trainer.ema.module.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(lambda *args: calls.append(1))
    folded = trainer.validator(trainer=trainer)
    assert not calls
    trainer.validator._network = lambda model: model  # the EMA itself
    unfolded = trainer.validator(trainer=trainer)
    assert calls
    assert folded == pytest.approx(unfolded, rel=1e-5, abs=1e-6)


def test_best_pt_is_validated_in_the_precision_of_the_epochs_validations(train_overrides):
    precisions = []  # (during training, autocast dtype) of each validation
    record = ("on_val_end", lambda validator: precisions.append((validator.training, validator.amp_dtype)))
    train(train_overrides, epochs=1, amp="bf16", callbacks=[record])
    assert precisions == [(True, torch.bfloat16), (False, torch.bfloat16)]  # epoch 1, then best.pt


def test_args_yaml_holds_the_user_arguments_as_given(train_overrides):
    import yaml

    trainer = train(train_overrides, epochs=1)
    saved = yaml.safe_load((trainer.save_dir / "args.yaml").read_text())
    assert saved["batch"] == 4 and saved["optimizer"] == "auto" and saved["lr0"] == 0.01


@pytest.mark.parametrize("deterministic", [None, True])
def test_deterministic_algorithms_follow_the_argument(train_overrides, deterministic):
    """Off by default (they cost a few percent of every step), on with deterministic=True."""
    overrides = {k: v for k, v in train_overrides.items() if k != "deterministic"}
    if deterministic is not None:
        overrides["deterministic"] = deterministic
    seen = []
    try:
        train(overrides, epochs=1, val=False,
              callbacks=[("on_train_batch_start", lambda t: seen.append(torch.are_deterministic_algorithms_enabled()))])
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen and set(seen) == {bool(deterministic)}


def test_parameter_groups(train_overrides):
    trainer = train(train_overrides, epochs=1, val=False)
    groups = trainer.optimizer.param_groups
    assert len(groups) == 3
    model_params = list(trainer.model.parameters())
    assert sum(len(g["params"]) for g in groups) == len(model_params)
    norm = sum(isinstance(m, torch.nn.BatchNorm2d) for m in trainer.model.modules())
    assert len(groups[1]["params"]) == norm
    assert groups[0]["weight_decay"] > 0 and groups[1]["weight_decay"] == 0 and groups[2]["weight_decay"] == 0


def test_warmup_and_schedule_values_at_chosen_iterations(train_overrides):
    seen = []

    def record(trainer):
        seen.append((trainer.epoch, [g["lr"] for g in trainer.optimizer.param_groups]))

    trainer = train(
        train_overrides,
        callbacks=[("on_train_batch_end", record)],
        epochs=3,
        optimizer="SGD",
        lr0=0.02,
        lrf=0.1,
        warmup_epochs=2,
        warmup_bias_lr=0.1,
        val=False,
    )
    num_batches = trainer.num_batches
    warmup = max(round(2 * num_batches), 100)
    assert trainer.schedule.warmup_iters == warmup
    # First step: biases start at warmup_bias_lr, the others at 0 (all 12 steps lie inside the warmup).
    _, lrs = seen[0]
    assert lrs[2] == pytest.approx(0.1 + (0.02 - 0.1) * 0 / warmup)
    assert lrs[0] == pytest.approx(0.0)
    # Step 5 (epoch 1, batch 1) interpolates towards lr0 * linear factor of epoch 1.
    epoch, lrs = seen[num_batches + 1]
    step = num_batches + 1
    target = 0.02 * ((1 - epoch / 3) * (1 - 0.1) + 0.1)
    assert lrs[0] == pytest.approx(target * step / warmup)
    assert lrs[2] == pytest.approx(0.1 + (target - 0.1) * step / warmup)


def test_accumulation_steps_the_optimizer_every_nbs_images(train_overrides):
    steps = []
    trainer = train(
        train_overrides,
        callbacks=[("optimizer_step", lambda t: steps.append(t.epoch))],
        epochs=2,
        nbs=8,
        warmup_epochs=0,
        val=False,
    )
    # batch 4, nominal batch 8 -> one optimizer step per 2 batches; 4 batches per epoch -> 2 steps per epoch.
    assert trainer.num_batches == 4
    assert steps == [0, 0, 1, 1]


def test_callback_order(train_overrides):
    events = []
    model = YOLO(train_overrides["model"])
    for event in EVENTS:
        if not event.startswith("on_val"):
            model.add_callback(event, lambda t, e=event: events.append(e))
    model.train(**{**train_overrides, "epochs": 1, "nbs": 8, "warmup_epochs": 0})
    assert events[:4] == ["on_pretrain_routine_start", "on_params_update", "on_pretrain_routine_end", "on_train_start"]
    first_batch = events.index("on_train_batch_start")
    assert events[first_batch - 1] == "on_train_epoch_start"
    # Batch 0 accumulates; batch 1 steps the optimizer (8 images).
    assert events[first_batch : first_batch + 6] == [
        "on_train_batch_start", "on_train_batch_end",
        "on_train_batch_start", "optimizer_step", "on_before_zero_grad", "on_train_batch_end",
    ]  # fmt: skip
    tail = events[events.index("on_train_epoch_end") :]
    assert tail == ["on_train_epoch_end", "on_model_save", "on_fit_epoch_end", "on_train_end", "teardown"]


def test_a_callback_can_stop_training(train_overrides):
    def stop_after_first_epoch(trainer):
        trainer.stop = True

    trainer = train(train_overrides, callbacks=[("on_fit_epoch_end", stop_after_first_epoch)], epochs=5, val=False)
    assert len(read_rows(trainer.csv)) == 1


def test_user_callback_error_stops_the_run(train_overrides):
    def broken(trainer):
        raise KeyError("user bug")

    with pytest.raises(KeyError, match="user bug"):
        train(train_overrides, callbacks=[("on_train_epoch_end", broken)])


class FitnessScript(DetectionTrainer):
    """Validation replaced by a scripted fitness sequence."""

    script = [0.5, 0.4, 0.3, 0.2, 0.1]

    def validate(self):
        fitness = self.script[self.epoch]
        return {"metrics/mAP50(B)": fitness}, fitness


def test_early_stopping_after_patience_epochs(train_overrides):
    trainer = train(train_overrides, trainer_class=FitnessScript, epochs=5, patience=2)
    rows = read_rows(trainer.csv)
    assert len(rows) == 3  # best at epoch 1, no improvement for epochs 2 and 3 -> stop
    assert trainer.best_fitness == 0.5


def test_nan_fitness_is_never_an_improvement_and_rolls_back(train_overrides):
    class NaNOnce(DetectionTrainer):
        calls = []

        def validate(self):
            fitness = [0.2, float("nan"), 0.1, 0.1, 0.1][len(self.calls)]
            self.calls.append(self.epoch)
            return {"metrics/mAP50(B)": fitness}, fitness

    trainer = train(train_overrides, trainer_class=NaNOnce, epochs=3, patience=10)
    assert trainer.best_fitness == 0.2
    assert trainer.nan_recovery.count == 1
    assert NaNOnce.calls[:3] == [0, 1, 1]  # epoch 2 (index 1) replayed from epoch 1's checkpoint


def test_time_budget_replans_epochs(train_overrides):
    trainer = train(train_overrides, epochs=1000, time=2 / 3600, val=False)
    rows = read_rows(trainer.csv)
    assert 1 <= len(rows) < 1000
    assert trainer.epochs == len(rows)
    assert float(rows[-1]["time"]) < 2 + 10  # ends within the budget plus one epoch


class InjectNaN(DetectionTrainer):
    """Returns a NaN loss at chosen global steps (once each)."""

    nan_steps = {5}

    def compute_loss(self, batch):
        loss, items = super().compute_loss(batch)
        step = self.epoch * self.num_batches + self.batches_in_epoch
        if step in self.nan_steps:
            self.nan_steps = self.nan_steps - {step}
            loss = loss * float("nan")
        return loss, items


def test_nan_recovery_reloads_last_good_checkpoint(train_overrides, caplog):
    trainer = train(train_overrides, trainer_class=InjectNaN, epochs=3)
    assert trainer.nan_recovery.count == 1
    rows = read_rows(trainer.csv)
    assert [int(float(r["epoch"])) for r in rows] == [1, 2, 3]
    state = load_checkpoint(trainer.last)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_recovery_gives_up_after_three(train_overrides):
    class AlwaysNaN(InjectNaN):
        nan_steps = set(range(100))

    with pytest.raises(YoloTrainError, match="gave up after 3"):
        train(train_overrides, trainer_class=AlwaysNaN, epochs=3)


def state_equal(a, b, atol=0.0):
    return all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


class Crash(Exception):
    pass


def crash_after_epoch(n):
    def crash(trainer):
        if trainer.epoch + 1 == n:
            raise Crash(f"simulated crash after epoch {n}")

    return crash


def test_resume_equivalence(train_overrides):
    """3 epochs straight == 2 epochs, crash, resume, 1 epoch: same results.csv rows and weights."""
    straight = train(train_overrides, epochs=3, name="straight")
    with pytest.raises(Crash):
        train(train_overrides, epochs=3, name="resumed", callbacks=[("on_fit_epoch_end", crash_after_epoch(2))])
    last = straight.save_dir.parent / "resumed" / "weights" / "last.pt"
    resumed = train({"resume": str(last)})
    assert resumed.save_dir == last.parent.parent
    rows_a, rows_b = read_rows(straight.csv), read_rows(resumed.csv)
    assert [r["epoch"] for r in rows_b] == ["1", "2", "3"]
    for a, b in zip(rows_a, rows_b):
        for column in RESULTS_COLUMNS[2:]:
            assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-6, nan_ok=True), column
    a, b = load_checkpoint(straight.last), load_checkpoint(resumed.last)
    assert state_equal(a["model"], b["model"]) and state_equal(a["ema"], b["ema"])
    assert a["ema_updates"] == b["ema_updates"]
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


def test_resuming_a_finished_run_says_so(train_overrides):
    trainer = train(train_overrides, epochs=1, val=False)
    with pytest.raises(YoloTrainError, match="already finished"):
        DetectionTrainer(overrides={"resume": str(trainer.last)})
    more = train({"resume": str(trainer.last), "epochs": 2})
    assert len(read_rows(more.csv)) == 2


def test_resume_true_takes_the_newest_last_pt(train_overrides):
    trainer = train(train_overrides, epochs=2, val=False)
    checkpoint = load_checkpoint(trainer.last)
    assert checkpoint["epoch"] == 1
    resumed = DetectionTrainer(overrides={"resume": True, "project": train_overrides["project"], "epochs": 3})
    assert resumed.resume_path == trainer.last


def test_a_log_without_a_terminal_has_column_names_progress_and_classes_once(train_overrides, yolotrain_log,
                                                                             monkeypatch):
    """What `nohup`/`tee`/CI logs show: the header above every epoch's line, progress lines with an ETA within an
    epoch (here at every batch), and the per-class table only after the final validation of best.pt."""
    from yolotrain.engine import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "PROGRESS_LOG_INTERVAL_S", 0.0)
    trainer = train(train_overrides, epochs=2, verbose=True)
    header = trainer.progress_string()
    lines = [m for m in yolotrain_log]
    epoch_lines = [i for i, m in enumerate(lines) if m.lstrip().startswith(("1/2", "2/2")) and "ETA" not in m]
    assert len(epoch_lines) == 2 and lines.count(header) == 2
    assert all(header in lines[:i] for i in epoch_lines)
    eta_lines = [m for m in lines if "batches, ETA " in m]
    assert eta_lines and all(m.lstrip().startswith(("1/2", "2/2")) for m in eta_lines)
    final = next(i for i, m in enumerate(lines) if m.strip().startswith("Validating"))
    names = set(trainer.data["names"].values())
    class_rows = [i for i, m in enumerate(lines) if m.split() and m.split()[0] in names]
    assert class_rows and min(class_rows) > final


def test_resume_names_only_the_arguments_it_really_ignores(train_overrides, yolotrain_log):
    from yolotrain.engine.resume import args_for_resume

    with pytest.raises(Crash):
        train(train_overrides, epochs=2, val=False, callbacks=[("on_fit_epoch_end", crash_after_epoch(1))])
    last = os.path.join(train_overrides["project"], "train", "weights", "last.pt")
    args_for_resume(last, {"resume": str(last), "mode": "train", "task": "detect"})  # what the YOLO object passes
    assert not [m for m in yolotrain_log if m.startswith("resume: ignoring")]
    args_for_resume(last, {"resume": str(last), "mode": "train", "lr0": 0.5})
    assert [m for m in yolotrain_log if m.startswith("resume: ignoring")] == [
        "resume: ignoring ['lr0']; these come from the checkpoint when resuming"]


def test_the_log_names_the_run_folder_when_training_starts_and_when_it_ends(train_overrides, yolotrain_log):
    """Someone reading a log file (nohup, CI, a cluster job) learns where the run writes before the first epoch and
    where its results are at the end."""
    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 1})
    trainer.train()
    starts = [i for i, m in enumerate(yolotrain_log) if m.startswith(f"run folder: {trainer.save_dir}")]
    ends = [i for i, m in enumerate(yolotrain_log) if m == f"Results saved to {trainer.save_dir}"]
    assert len(starts) == 1 and len(ends) == 1 and starts[0] < ends[0]
    assert ends[0] > max(i for i, m in enumerate(yolotrain_log) if "all" in m.split())  # after the final table


def test_a_resume_rebuilds_the_saved_network_and_takes_a_moved_dataset(train_overrides, tmp_path, yolotrain_log):
    """The model yaml edited after the run started (a wider layer) does not change what a resume builds: the
    checkpoint's own network is rebuilt. A dataset moved to another folder is given again with data=."""
    import shutil

    import yaml

    model_file = tmp_path / "mine-t.yaml"
    shutil.copy(train_overrides["model"], model_file)
    data_dir = tmp_path / "data"
    shutil.copytree(os.path.dirname(train_overrides["data"]), data_dir)
    first = DetectionTrainer(overrides={**train_overrides, "model": str(model_file), "epochs": 1,
                                        "data": str(data_dir / "data.yaml")})
    first.train()
    edited = yaml.safe_load(model_file.read_text())
    edited["backbone"][0][3][0] *= 16  # a much wider first conv: its weights no longer fit the checkpoint
    model_file.write_text(yaml.safe_dump(edited))
    moved = tmp_path / "moved"
    shutil.move(data_dir, moved)
    resumed = DetectionTrainer(overrides={"resume": str(first.last), "epochs": 2, "data": str(moved / "data.yaml")})
    resumed.train()
    saved, trained = load_checkpoint(first.last)["model"], load_checkpoint(resumed.last)["model"]
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in trained.items()}
    assert resumed.args.data == str(moved / "data.yaml") and load_checkpoint(resumed.last)["epoch"] == 1
    assert any("resume: using the new values" in m and "data" in m for m in yolotrain_log)


def test_a_resume_from_another_folder_says_how_to_point_at_a_relative_dataset(train_overrides, tmp_path, monkeypatch):
    import shutil

    from yolotrain.errors import DatasetError

    start = tmp_path / "start"
    shutil.copytree(os.path.dirname(train_overrides["data"]), start / "data")
    monkeypatch.chdir(start)
    first = DetectionTrainer(overrides={**train_overrides, "epochs": 1, "data": "data/data.yaml",
                                        "project": str(tmp_path / "runs")})
    first.train()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=r"resume: the dataset 'data/data.yaml' saved in .* is not found from .*; "
                                           r"give data=<its path now>"):
        DetectionTrainer(overrides={"resume": str(first.last), "epochs": 2})
    resumed = DetectionTrainer(overrides={"resume": str(first.last), "epochs": 2, "data": "start/data/data.yaml"})
    resumed.train()
    assert load_checkpoint(resumed.last)["epoch"] == 1
