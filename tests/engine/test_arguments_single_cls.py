"""single_cls=True: a one-class model whose checkpoint says so, validated later the same way without the flag."""

import pytest
import torch

from yolotrain import DetectionTrainer
from yolotrain.data.data_yaml import single_class_names
from yolotrain.nn.backends import load_checkpoint_model
from yolotrain.tasks.detect.val import DetectionValidator
from yolotrain.utils.checkpoint import load_checkpoint


def test_single_class_names():
    assert single_class_names({0: "circle", 1: "square"}) == {0: "item"}
    assert single_class_names({0: "person"}) == {0: "person"}  # a one-class dataset keeps its name


def test_single_cls_model_checkpoint_and_a_later_val_without_the_flag(train_overrides):
    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 1, "single_cls": True})
    trainer.train()
    assert trainer.data["nc"] == 6  # the dataset keeps its classes; the model learns one
    assert (trainer.model.nc, trainer.model.names, trainer.model.head.nc) == (1, {0: "item"}, 1)
    labels = torch.cat([torch.from_numpy(r["cls"]).reshape(-1) for r in trainer.train_loader.dataset.labels])
    assert len(labels) and labels.eq(0).all()

    checkpoint = load_checkpoint(trainer.best)
    assert (checkpoint["names"], checkpoint["nc"], checkpoint["train_args"]["single_cls"]) == ({0: "item"}, 1, True)
    assert load_checkpoint_model(trainer.best).head.nc == 1

    # A later `yolotrain val model=best.pt` on the same data, without single_cls: the batch of the training run's
    # val loader (twice the training batch), so both see the same rect batches, and its precision.
    validator = DetectionValidator(args={
        "data": train_overrides["data"], "imgsz": 64, "batch": 2 * train_overrides["batch"], "workers": 0,
        "device": "cpu", "plots": False, "project": train_overrides["project"], "mode": "val",
        "half": trainer.amp_dtype is not None,
    })  # fmt: skip
    metrics = validator(model=str(trainer.best))
    metrics.pop("fitness")
    assert metrics == pytest.approx(trainer.metrics)
    assert validator.names == {0: "item"} and validator.nc == 1
    during_training = trainer.validator
    val_boxes = sum(len(r["cls"]) for r in validator.dataloader.dataset.labels)
    assert validator.nt_per_class.tolist() == during_training.nt_per_class.tolist() == [val_boxes]  # all as one
    confidences = torch.cat([batch["conf"] for batch in validator.stats])
    assert len(confidences) > 0  # the same predictions, not two empty runs
    assert torch.equal(confidences, torch.cat([batch["conf"] for batch in during_training.stats]))


def test_single_cls_with_a_class_filter_trains_and_validates(train_overrides):
    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 1, "single_cls": True, "classes": [2, 3]})
    trainer.train()
    assert trainer.model.nc == 1
    assert trainer.validator.nms_classes is None  # the filter chose labels; the model's one class is class 0
    assert set(trainer.metrics) >= {"metrics/mAP50(B)", "metrics/mAP50-95(B)"}
