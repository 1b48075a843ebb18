"""Resume and schedule rules: close_mosaic past its boundary, a time budget's planned epochs, fitness that touches
0 early, the checkpoint format version, and a loss that reduces over ranks only inside the training step."""

import os
import signal

import pytest
import torch

from yolotrain import DetectionTrainer
from yolotrain.cli import main as cli_main
from yolotrain.engine.trainer import TrainingInterrupted
from yolotrain.errors import CheckpointError
from yolotrain.loss.detection import DetectionLoss
from yolotrain.nn.model import DetectionModel
from yolotrain.utils import dist
from yolotrain.utils.checkpoint import load_checkpoint, save_checkpoint
from yolotrain.utils.torch_utils import cpu_copy


def interrupt_after_validation_of(epoch):
    def send(validator_or_trainer):
        trainer = validator_or_trainer
        if trainer.epoch == epoch:
            os.kill(os.getpid(), signal.SIGTERM)

    return send


def test_close_mosaic_fires_on_a_resume_that_starts_past_its_boundary(train_overrides, yolotrain_log):
    # 4 epochs, close_mosaic=2: mosaic goes off from epoch index 2. Stop after epoch index 2, resume at index 3.
    overrides = {**train_overrides, "epochs": 4, "close_mosaic": 2}
    first = DetectionTrainer(overrides=overrides)
    first.add_callback("on_fit_epoch_end", interrupt_after_validation_of(2))
    with pytest.raises(TrainingInterrupted):
        first.train()
    assert load_checkpoint(first.last)["epoch"] == 2
    yolotrain_log.clear()
    resumed = DetectionTrainer(overrides={"resume": str(first.last)})
    mosaic_probability = []
    resumed.add_callback("on_train_epoch_start", lambda t: mosaic_probability.append(_mosaic_p(t)))
    resumed.train()
    assert any("close_mosaic: mosaic off" in m for m in yolotrain_log)
    assert mosaic_probability == [0.0]  # the resumed epoch (index 3) trains without mosaic


def _mosaic_p(trainer):
    from yolotrain.data.augment import Mosaic

    return next(t.p for t in trainer.train_loader.dataset.transforms.transforms if isinstance(t, Mosaic))


class StopAtStart(Exception):
    pass


def test_a_time_budget_run_resumes_with_its_planned_epochs(train_overrides):
    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 2, "val": False})
    trainer.train()
    checkpoint = load_checkpoint(trainer.last)
    # As if a time=1 run had re-planned its 2 epochs into 5 and stopped after the first.
    checkpoint.update(planned_epochs=5, epoch=0, train_args={**checkpoint["train_args"], "time": 1.0})
    save_checkpoint(checkpoint, trainer.last)
    resumed = DetectionTrainer(overrides={"resume": str(trainer.last)})
    epochs_at_start = []

    def record_and_stop(t):
        epochs_at_start.append(t.epochs)
        raise StopAtStart

    resumed.add_callback("on_train_start", record_and_stop)
    with pytest.raises(StopAtStart):
        resumed.train()
    assert epochs_at_start == [5]


class FitnessSequence(DetectionTrainer):
    """Validation reports the given fitness values in turn, one per validation (the real validator still runs)."""

    sequence = ()

    def validate(self):
        metrics, _ = super().validate()
        self.validations = getattr(self, "validations", 0) + 1
        return metrics, self.sequence[self.validations - 1]


@pytest.mark.parametrize("sequence, collapses", [((0.001, 0.0, 0.002), False), ((0.4, 0.0, 0.4), True)])
def test_fitness_of_exactly_zero_is_a_collapse_only_after_the_run_learnt_something(train_overrides, yolotrain_log,
                                                                                   sequence, collapses):
    trainer_class = type("Trainer", (FitnessSequence,), {"sequence": sequence + (0.4,) * 4})
    trainer = trainer_class(overrides={**train_overrides, "epochs": 3})
    trainer.train()
    recovered = any("NaN recovery" in m and "fitness collapsed" in m for m in yolotrain_log)
    assert recovered == collapses


def test_resuming_a_checkpoint_of_another_format_version_is_one_line(train_overrides, capsys):
    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 2})
    trainer.train()
    checkpoint = load_checkpoint(trainer.last)
    checkpoint.update(format_version=99, epoch=0)
    save_checkpoint(checkpoint, trainer.last)
    with pytest.raises(CheckpointError, match="format version 99, this yolotrain reads version 1"):
        DetectionTrainer(overrides={"resume": str(trainer.last)})
    assert cli_main(["train", f"resume={trainer.last}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "format version 99" in err[0]


def test_snapshots_are_copies_in_cpu_memory():
    state = {"model": {"w": torch.ones(2)}, "groups": [{"lr": 0.1, "params": [0, 1]}], "step": (torch.zeros(1),)}
    copied = cpu_copy(state)
    state["model"]["w"].add_(1)
    assert torch.equal(copied["model"]["w"], torch.ones(2)) and copied["model"]["w"].device.type == "cpu"
    assert copied["groups"] == [{"lr": 0.1, "params": [0, 1]}] and isinstance(copied["step"], tuple)


def test_a_loss_reduces_over_ranks_only_inside_the_training_step(tiny_model_yaml, monkeypatch):
    """A callback or a custom validator computing a loss with gradients on one rank must not wait on the others."""
    model = DetectionModel(tiny_model_yaml, nc=2, verbose=False)
    model.args = None
    batch = {"img": torch.rand(1, 3, 64, 64), "batch_idx": torch.zeros(1), "cls": torch.zeros(1, 1),
             "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}
    reductions = []
    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *a, **k: reductions.append(tensor))
    loss = DetectionLoss(model)
    loss(model.train()(batch["img"]), batch)  # gradients on, outside the step
    assert reductions == []
    with dist.training_step_scope():
        loss(model(batch["img"]), batch)
    assert len(reductions) == 1
