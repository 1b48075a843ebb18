"""User customisation of the training engine, written the way user code writes it: a `DetectionTrainer` subclass
passed as `YOLO(...).train(..., trainer=MyTrainer)`, or a callback. Each test checks that the customisation
really takes effect (metrics logged, checkpoint chosen, loss weighted, layers frozen/unfrozen, LR ratios kept)."""

import copy
import csv
import logging
import math

import numpy as np
import pytest
import torch

from yolotrain import YOLO, DetectionModel, DetectionTrainer, DetectionValidator
from yolotrain.engine.schedule import lr_factor
from yolotrain.utils.boxes import xywhn2xyxy
from yolotrain.utils.checkpoint import load_checkpoint

BACKBONE_LAYERS = range(10)  # layers 0-9 of the YOLOv8 layout (the conftest tiny model keeps the indices)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def layer_index(name):
    """`model.12.cv1.conv.weight` -> 12."""
    return int(name.split(".")[1])


def is_backbone(name):
    return layer_index(name) in BACKBONE_LAYERS


def run_args(train_overrides, **extra):
    """`YOLO(model).train(**kwargs)` arguments from the conftest overrides (model goes to YOLO itself)."""
    args = {k: v for k, v in train_overrides.items() if k != "model"}
    args.update(extra)
    return args


# ---------------------------------------------------------------------------------------------------------- (a) F1
class OracleValidator(DetectionValidator):
    """Predicts the ground truth with every third box given the wrong class, so P and R are neither 0 nor 1.

    A tiny model trained for two epochs detects nothing (all metrics 0); this makes the F1 numbers meaningful.
    """

    def update(self, preds, batch):
        height, width = batch["img"].shape[2:]
        boxes = xywhn2xyxy(batch["bboxes"].detach().float().cpu(), width, height)
        cls = batch["cls"].detach().reshape(-1).cpu()
        index = torch.arange(len(cls))
        conf = 0.9 - 0.8 * index / max(len(cls), 1)  # distinct scores, so the PR curve has steps
        wrong = index % 3 == 0
        pred_cls = torch.where(wrong, (cls + 1) % self.nc, cls)
        detections = torch.cat([boxes, conf[:, None], pred_cls[:, None]], 1)
        batch_idx = batch["batch_idx"].detach().cpu()
        per_image = [detections[batch_idx == i] for i in range(batch["img"].shape[0])]
        super().update(per_image, batch)


class OracleTrainer(DetectionTrainer):
    def get_validator(self):
        return OracleValidator(
            self.test_loader, save_dir=self.save_dir, args=copy.copy(self.args), _callbacks=self.callbacks
        )


class F1Trainer(OracleTrainer):
    """User code: report the mean and per-class F1 after each validation."""

    def validate(self):
        metrics, fitness = super().validate()
        box = self.validator.metrics.box
        f1 = 2 * box.p * box.r / np.maximum(box.p + box.r, 1e-16)
        names = self.data["names"]
        self.f1_per_class = {names[int(c)]: float(v) for c, v in zip(box.ap_class_index, f1)}
        metrics["metrics/F1(B)"] = float(f1.mean()) if len(f1) else 0.0
        logging.getLogger("yolotrain.user").info(f"F1 {metrics['metrics/F1(B)']:.4f} per class {self.f1_per_class}")
        return metrics, fitness


def test_validate_override_logs_mean_and_per_class_f1(train_overrides, yolotrain_log):
    checked = []

    def check_against_the_same_metrics_object(trainer):
        box = trainer.validator.metrics.box
        names = trainer.data["names"]
        expected = {names[int(c)]: 2 * p * r / (p + r) for c, p, r in zip(box.ap_class_index, box.p, box.r)}
        assert trainer.f1_per_class == pytest.approx(expected)
        assert dict(zip(expected, box.f1)) == pytest.approx(expected)  # the engine's own f1 agrees
        assert trainer.metrics["metrics/F1(B)"] == pytest.approx(np.mean(list(expected.values())))
        checked.append(trainer.metrics["metrics/F1(B)"])

    model = YOLO(train_overrides["model"])
    model.add_callback("on_fit_epoch_end", check_against_the_same_metrics_object)
    model.train(**run_args(train_overrides, epochs=2, verbose=True), trainer=F1Trainer)
    assert len(checked) == 2
    assert all(0 < f1 < 1 for f1 in checked)  # wrong classes on a third of the boxes: imperfect but not zero
    # The logged line and the results.csv column hold the same numbers.
    f1_lines = [m for m in yolotrain_log if m.startswith("F1 ")]
    assert len(f1_lines) == 2 and f1_lines[0].startswith(f"F1 {checked[0]:.4f} per class {{'circle'")
    rows = read_rows(model.trainer.csv)
    assert [float(r["metrics/F1(B)"]) for r in rows] == pytest.approx(checked, rel=1e-5)


# ------------------------------------------------------------------------------------------ (b) fitness = mAP50
class ScriptedMetrics(DetectionTrainer):
    """Real validation, then mAP50 / mAP50-95 replaced by a script chosen so that the best mAP50 (epoch 2) and the
    best default fitness 0.1 * mAP50 + 0.9 * mAP50-95 (epoch 3) fall on different epochs."""

    map50 = [0.30, 0.50, 0.40]
    map50_95 = [0.10, 0.05, 0.20]

    def validate(self):
        metrics, _ = super().validate()
        metrics["metrics/mAP50(B)"] = self.map50[self.epoch]
        metrics["metrics/mAP50-95(B)"] = self.map50_95[self.epoch]
        return metrics, 0.1 * self.map50[self.epoch] + 0.9 * self.map50_95[self.epoch]


class MAP50Trainer(ScriptedMetrics):
    """User code: keep the checkpoint with the best mAP50."""

    def validate(self):
        metrics, _ = super().validate()
        return metrics, metrics["metrics/mAP50(B)"]


def test_validate_override_makes_best_pt_follow_map50(train_overrides):
    model = YOLO(train_overrides["model"])
    model.train(**run_args(train_overrides, epochs=3), trainer=MAP50Trainer)
    trainer = model.trainer
    rows = read_rows(trainer.csv)
    map50 = [float(r["metrics/mAP50(B)"]) for r in rows]
    default_fitness = [0.1 * float(r["metrics/mAP50(B)"]) + 0.9 * float(r["metrics/mAP50-95(B)"]) for r in rows]
    best_by_map50, best_by_default = int(np.argmax(map50)), int(np.argmax(default_fitness))
    assert best_by_map50 != best_by_default  # the test would not tell the two fitnesses apart otherwise
    assert load_checkpoint(trainer.best)["epoch"] == best_by_map50
    assert load_checkpoint(trainer.best)["best_fitness"] == max(map50)
    assert trainer.best_fitness == max(map50)
    assert load_checkpoint(trainer.last)["epoch"] == 2


# --------------------------------------------------------------------------------------------- (c) class weights
CLASS_WEIGHTS = torch.linspace(0.25, 2.0, 6)  # the shapes dataset has 6 classes


class WeightedDetectionModel(DetectionModel):
    """User code: a detector whose classification loss weighs classes by a fixed vector."""

    def __init__(self, cfg, nc=None, class_weights=None, verbose=False):
        super().__init__(cfg, nc=nc, verbose=verbose)
        self.class_weights = class_weights


class WeightedTrainer(DetectionTrainer):
    def get_model(self, cfg=None, weights=None, verbose=True):
        return WeightedDetectionModel(cfg, nc=self.data["nc"], class_weights=CLASS_WEIGHTS.clone())


def first_batch_losses(train_overrides, trainer_class):
    losses = []
    model = YOLO(train_overrides["model"])
    model.add_callback("on_train_batch_end", lambda t: losses.append(t.loss_items.detach().cpu().tolist()))
    model.train(**run_args(train_overrides, epochs=1, val=False), trainer=trainer_class)
    return model.trainer, losses[0]


def test_get_model_with_class_weights_weighs_the_training_loss(train_overrides):
    weighted, weighted_loss = first_batch_losses(train_overrides, WeightedTrainer)
    assert isinstance(weighted.model, WeightedDetectionModel)
    assert torch.equal(weighted.model.criterion.class_weights.cpu(), CLASS_WEIGHTS)
    plain, plain_loss = first_batch_losses(train_overrides, DetectionTrainer)
    assert plain.model.criterion.class_weights is None
    # Same seed, same first batch and weights: the box and DFL losses agree, the class loss is reweighted.
    assert weighted_loss[0] == pytest.approx(plain_loss[0], rel=1e-5)
    assert weighted_loss[2] == pytest.approx(plain_loss[2], rel=1e-5)
    assert abs(weighted_loss[1] - plain_loss[1]) > 1e-3 * plain_loss[1]


# ---------------------------------------------------------------------------------------- (d) freeze, then unfreeze
UNFREEZE_AT_EPOCH = 1


def unfreeze_all_after_n_epochs(trainer):
    """User callback: train the whole model from epoch UNFREEZE_AT_EPOCH (0-based) on."""
    if trainer.epoch >= UNFREEZE_AT_EPOCH:
        for param in trainer.model.parameters():
            param.requires_grad = True


def changed_entries(before, after, select):
    return {k for k in before if select(k) and not torch.equal(before[k], after[k])}


def assert_head_trained(before, after, head_params):
    """Every head parameter changed, save the BatchNorm scales of a box branch: a level that had no positive in the
    epoch gives them no gradient, and they take no weight decay. The class branch trains on every anchor."""
    trained = changed_entries(before, after, lambda k: k in head_params)
    assert head_params - trained <= {k for k in head_params if ".cv2." in k and k.endswith("bn.weight")}
    assert {k for k in head_params if ".cv3." in k} <= trained


def test_freeze_then_unfreeze_by_callback(train_overrides):
    snapshots = []

    def snapshot(trainer):
        snapshots.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})

    model = YOLO(train_overrides["model"])
    model.add_callback("on_pretrain_routine_end", snapshot)
    model.add_callback("on_train_epoch_start", unfreeze_all_after_n_epochs)
    model.add_callback("on_train_epoch_end", snapshot)
    model.train(**run_args(train_overrides, epochs=2, val=False, freeze=10))
    initial, after_frozen_epoch, after_unfrozen_epoch = snapshots
    backbone_keys = {k for k in initial if is_backbone(k)}
    assert any(k.endswith("running_mean") for k in backbone_keys)
    head_params = {name for name, _ in model.trainer.model.named_parameters() if not is_backbone(name)}
    head_params -= {name for name in head_params if ".dfl." in name}  # the fixed DFL projection never trains

    # Epoch 1 (frozen): every backbone weight AND BatchNorm running statistic is untouched; the head trains.
    assert changed_entries(initial, after_frozen_epoch, is_backbone) == set()
    assert_head_trained(initial, after_frozen_epoch, head_params)
    # Epoch 2 (unfrozen by the callback): every backbone layer trains, running statistics included.
    changed = changed_entries(after_frozen_epoch, after_unfrozen_epoch, is_backbone)
    assert {layer_index(k) for k in changed} == set(BACKBONE_LAYERS)
    assert any(k.endswith("running_mean") for k in changed)
    assert_head_trained(after_frozen_epoch, after_unfrozen_epoch, head_params)
    dfl = [k for k in initial if ".dfl." in k]
    assert dfl and changed_entries(initial, after_unfrozen_epoch, lambda k: k in dfl) == set()


# ------------------------------------------------------------------------------------ (e) two-group AdamW optimizer
BACKBONE_LR_RATIO = 0.1


class TwoGroupAdamW(DetectionTrainer):
    """User code: the backbone learns at a tenth of the head's learning rate."""

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        backbone = [p for n, p in model.named_parameters() if is_backbone(n)]
        head = [p for n, p in model.named_parameters() if not is_backbone(n)]
        groups = [{"params": backbone, "lr": lr * BACKBONE_LR_RATIO}, {"params": head, "lr": lr}]
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), weight_decay=decay)


def record_group_lrs(train_overrides, **extra):
    seen = []
    model = YOLO(train_overrides["model"])
    def record(trainer):
        seen.append((trainer.epoch, [group["lr"] for group in trainer.optimizer.param_groups]))

    model.add_callback("on_train_batch_end", record)
    model.train(**run_args(train_overrides, val=False, optimizer="AdamW", **extra), trainer=TwoGroupAdamW)
    return model.trainer, seen


def test_two_group_optimizer_keeps_its_lr_ratio_through_warmup_and_schedule(train_overrides):
    lr0, lrf, epochs = 0.02, 0.2, 3
    # Warmup (at least 100 iterations) covers this whole short run: both groups ramp up from 0 together.
    trainer, seen = record_group_lrs(train_overrides, epochs=epochs, lr0=lr0, lrf=lrf, warmup_epochs=1)
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and len(trainer.optimizer.param_groups) == 2
    warmup = trainer.schedule.warmup_iters
    assert len(seen) == epochs * trainer.num_batches < warmup
    for step, (epoch, (backbone_lr, head_lr)) in enumerate(seen):
        assert head_lr == pytest.approx(lr0 * lr_factor(epoch, epochs, lrf, False) * step / warmup, rel=1e-9, abs=0)
        assert backbone_lr == pytest.approx(BACKBONE_LR_RATIO * head_lr, rel=1e-9, abs=0)
    assert seen[-1][1][1] > 0

    # Without warmup the scheduled values hold from the first step; the final epoch runs at lr0 * its factor.
    trainer, seen = record_group_lrs(train_overrides, epochs=epochs, lr0=lr0, lrf=lrf, warmup_epochs=0)
    for epoch, (backbone_lr, head_lr) in seen:
        assert head_lr == pytest.approx(lr0 * lr_factor(epoch, epochs, lrf, False), rel=1e-12)
        assert backbone_lr == pytest.approx(BACKBONE_LR_RATIO * head_lr, rel=1e-12)
    final = [lrs for epoch, lrs in seen if epoch == epochs - 1]
    final_head_lr = lr0 * (1 + 2 * lrf) / 3  # linear schedule at epoch 2 of 3: (1 - 2/3) * (1 - lrf) + lrf
    assert final and all(lrs == pytest.approx([BACKBONE_LR_RATIO * final_head_lr, final_head_lr]) for lrs in final)
    assert math.isclose(trainer.lr["lr/pg1"], lr0 * lr_factor(epochs - 1, epochs, lrf, False))
