"""Classification: class folders, the classifier and its reference layout, top-k metrics, training, resume, val and
predict through the same engine and the same `YOLO` object."""

import csv
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from resume_check import assert_resumes_exactly
from yolotrain.engine.model import YOLO
from yolotrain.errors import CfgError, DatasetError
from yolotrain.nn.model import ClassificationModel, DetectionModel
from yolotrain.tasks.classify.dataset import ClassificationDataset, check_cls_dataset, list_samples
from yolotrain.tasks.classify.train import ClassificationTrainer
from yolotrain.utils.checkpoint import load_checkpoint
from yolotrain.utils.metrics import ClassifyMetrics, top_k_accuracy

TINY_CLASSIFIER = {
    "nc": 6,
    "scales": {"t": [0.33, 0.0625, 256]},
    "backbone": [
        [-1, 1, "Conv", [64, 3, 2]],
        [-1, 1, "Conv", [128, 3, 2]],
        [-1, 1, "C2f", [128, True]],
        [-1, 1, "Conv", [256, 3, 2]],
        [-1, 1, "C2f", [256, True]],
        [-1, 1, "Conv", [512, 3, 2]],
        [-1, 1, "C2f", [512, True]],
        [-1, 1, "Conv", [1024, 3, 2]],
        [-1, 1, "C2f", [1024, True]],
    ],
    "head": [[-1, 1, "Classify", ["nc"]]],
}


@pytest.fixture(scope="module")
def tiny_classifier_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("cls-models") / "tinycls-t.yaml"
    path.write_text(yaml.safe_dump(TINY_CLASSIFIER, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """A class-folder dataset of shape crops: train and val folders of the six shape classes."""
    from yolotrain.data.builtin import generate_shape_crops

    return str(generate_shape_crops(tmp_path_factory.mktemp("crops"), n_train=12, n_val=6, imgsz=96, seed=5))


@pytest.fixture
def cls_overrides(tiny_classifier_yaml, crops, tmp_path):
    return dict(model=tiny_classifier_yaml, data=crops, epochs=2, imgsz=32, batch=8, workers=0, device="cpu",
                project=str(tmp_path / "runs"), name="train", plots=False, seed=0, deterministic=True,
                warmup_epochs=0.5, verbose=False)


def write_image(path: Path, size=24, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((size, size, 3), value, np.uint8))


# ---------------------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("name, parameters, entries, head", [
    ("yolo11n-cls.yaml", 2_812_104, 236, "model.10"),  # the reference's own figures for its models at nc=1000
    ("yolov8n-cls.yaml", 2_719_288, 158, "model.9"),
])
def test_classifiers_have_the_reference_layout(name, parameters, entries, head):
    model = ClassificationModel(name, verbose=False)
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == parameters and len(state) == entries
    assert list(state)[-2:] == [f"{head}.linear.weight", f"{head}.linear.bias"]
    assert model.task == "classify" and model.stride.tolist() == [32.0]


def test_a_classifier_outputs_logits_in_training_and_probabilities_in_eval(tiny_classifier_yaml):
    model = ClassificationModel(tiny_classifier_yaml, nc=4, verbose=False)
    images = torch.rand(3, 3, 32, 32)
    assert model.train()(images).shape == (3, 4)
    probabilities, logits = model.eval()(images)
    torch.testing.assert_close(probabilities, logits.softmax(1))


def test_a_detection_backbone_starts_a_classifier(tiny_classifier_yaml):
    detector = DetectionModel({**TINY_CLASSIFIER, "scale": "t", "head": [[[4, 6, 8], 1, "Detect", ["nc"]]]},
                              verbose=False)
    classifier = ClassificationModel(tiny_classifier_yaml, verbose=False)
    transferred = classifier.load(detector.state_dict(), verbose=False)
    backbone = [k for k in classifier.state_dict() if not k.startswith("model.9.")]
    assert transferred == len(backbone)  # every backbone tensor, none of the head
    assert torch.equal(classifier.state_dict()["model.4.cv1.conv.weight"], detector.state_dict()["model.4.cv1.conv.weight"])


def test_a_model_yaml_names_its_task_by_its_head(tiny_classifier_yaml):
    assert YOLO(tiny_classifier_yaml).task == "classify"
    assert YOLO("yolo-n.yaml").task == "detect"


# ---------------------------------------------------------------------------------------------------------- metrics
def test_top_k_accuracy_by_hand():
    targets = [0, 1, 2, 3]
    ranked = [[0, 1, 2], [2, 1, 0], [0, 1, 3], [3, 0, 1]]  # hits: top-1 at 0 and 3; top-3 also at 1
    assert top_k_accuracy(targets, ranked) == (0.5, 0.75)
    metrics = ClassifyMetrics()
    metrics.process(torch.tensor(targets), torch.tensor(ranked))
    assert (metrics.top1, metrics.top5, metrics.fitness) == (0.5, 0.75, 0.625)
    assert dict(metrics) == {"metrics/accuracy_top1": 0.5, "metrics/accuracy_top5": 0.75, "fitness": 0.625}


# ---------------------------------------------------------------------------------------------------------- folders
def test_folders_nested_images_empty_classes_and_other_files(tmp_path, yolotrain_log):
    root = tmp_path / "set"
    write_image(root / "train" / "cat" / "a.jpg")
    write_image(root / "train" / "cat" / "deeper" / "b.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    write_image(root / "train" / "dog" / "c.jpg")
    (root / "train" / "emu").mkdir()
    for name in ("cat", "dog", "emu"):
        (root / "val" / name).mkdir(parents=True)
    write_image(root / "val" / "dog" / "d.jpg")
    data = check_cls_dataset(root)
    assert data["names"] == {0: "cat", 1: "dog", 2: "emu"} and data["nc"] == 3
    samples = list_samples(Path(data["train"]), ["cat", "dog", "emu"])
    assert [(Path(p).name, c) for p, c in samples] == [("a.jpg", 0), ("b.png", 0), ("c.jpg", 1)]
    dataset = ClassificationDataset(data["train"], ["cat", "dog", "emu"], imgsz=16, prefix="train")
    assert dataset.class_counts().tolist() == [2, 1, 0]
    assert any("no images of class emu" in m for m in yolotrain_log)
    sample = dataset[0]
    assert sample["img"].shape == (3, 16, 16) and sample["img"].dtype == torch.uint8 and sample["cls"] == 0


def test_a_split_with_other_classes_is_a_one_line_error(tmp_path):
    write_image(tmp_path / "train" / "cat" / "a.jpg")
    write_image(tmp_path / "train" / "dog" / "b.jpg")
    write_image(tmp_path / "val" / "cat" / "c.jpg")
    write_image(tmp_path / "val" / "eel" / "d.jpg")
    with pytest.raises(DatasetError) as info:
        check_cls_dataset(tmp_path)
    assert str(info.value) == (f"data={tmp_path}: val/ and train/ must have the same class folders: val/ lacks dog; "
                               f"has eel that train lacks")


def test_a_data_yaml_for_classification_is_a_one_line_error(tmp_path):
    with pytest.raises(CfgError, match="a classification dataset is a folder with train/ and val/"):
        check_cls_dataset(tmp_path / "data.yaml")


def test_unreadable_images_are_skipped_and_listed(tmp_path):
    write_image(tmp_path / "train" / "cat" / "good.jpg")
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    dataset = ClassificationDataset(tmp_path / "train", ["cat"], imgsz=16, prefix="train")
    assert [Path(f).name for f in dataset.im_files] == ["good.jpg"]
    listed = (tmp_path / "train.bad.txt").read_text()
    assert "broken.jpg\ttruncated JPEG" in listed


def test_training_transforms_crop_flip_and_erase_to_the_size(tmp_path, cls_overrides):
    from yolotrain.cfg import get_cfg
    from yolotrain.tasks.classify.dataset import ClassifyTransforms

    hyp = get_cfg({"erasing": 1.0, "fliplr": 1.0})
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :30] = 255  # white left half
    out = ClassifyTransforms(32, augment=True, args=hyp)(image)
    assert out.shape == (3, 32, 32)
    plain = ClassifyTransforms(32, augment=False)(image)
    assert plain[:, :, 0].float().mean() > 200 and plain[:, :, -1].float().mean() < 50  # centre crop, no flip


# ---------------------------------------------------------------------------------------------------------- training
def read_rows(path):
    with open(path, newline="") as f:
        return [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(f)]


def test_a_classification_run_writes_what_users_read(cls_overrides):
    model = YOLO(cls_overrides["model"])
    metrics = model.train(**{k: v for k, v in cls_overrides.items() if k != "model"})
    save_dir = Path(cls_overrides["project"]) / "train"
    rows = read_rows(save_dir / "results.csv")
    assert list(rows[0])[:7] == ["epoch", "time", "train/loss", "metrics/accuracy_top1", "metrics/accuracy_top5",
                                 "val/loss", "lr/pg0"]
    assert 0 <= metrics.top1 <= metrics.top5 <= 1 and metrics["metrics/accuracy_top1"] == metrics.top1
    checkpoint = load_checkpoint(save_dir / "weights" / "best.pt")
    assert checkpoint["task"] == "classify" and checkpoint["train_args"]["task"] == "classify"
    trained = YOLO(save_dir / "weights" / "best.pt")
    assert trained.task == "classify" and trained.names == {i: n for i, n in enumerate(
        ["circle", "cross", "ellipse", "square", "star", "triangle"])}
    validated = trained.val(data=cls_overrides["data"], batch=8, plots=False)
    assert validated.top1 == pytest.approx(metrics.top1) and validated.top5 == pytest.approx(metrics.top5)
    image = next(Path(cls_overrides["data"], "val", "star").iterdir())
    (result,) = trained.predict(str(image), save=False)
    probs = result.probs
    assert result.boxes is None and len(probs.data) == 6 and float(probs.data.sum()) == pytest.approx(1, abs=1e-5)
    assert probs.top5[0] == probs.top1 and float(probs.top1conf) == pytest.approx(float(probs.data.max()))
    assert result.verbose().startswith(trained.names[probs.top1])
    saved = result.save(Path(cls_overrides["project"]) / "annotated.jpg")
    assert cv2.imread(saved).shape == result.orig_img.shape
    formats = ["torchscript"] + (["onnx"] if importlib.util.find_spec("onnxruntime") else [])
    for file_format in formats:
        exported = YOLO(trained.export(format=file_format))
        assert exported.task == "classify"
        from_export = exported.val(data=cls_overrides["data"], batch=8, plots=False)
        assert from_export.top1 == pytest.approx(metrics.top1) and from_export.top5 == pytest.approx(metrics.top5)
        assert exported.predict(str(image), save=False)[0].probs.top1 == probs.top1


def test_a_classification_run_resumes_exactly(cls_overrides):
    assert_resumes_exactly(ClassificationTrainer, cls_overrides, "train/loss")


def test_auto_augment_without_torchvision_is_a_one_line_error(cls_overrides):
    pytest.importorskip("numpy")
    try:
        import torchvision  # noqa: F401

        pytest.skip("torchvision imports here: its policies are used")
    except Exception:
        pass
    trainer = ClassificationTrainer(overrides={**cls_overrides, "auto_augment": "randaugment"})
    with pytest.raises(CfgError, match="auto_augment=randaugment needs torchvision"):
        trainer.train()


@pytest.mark.slow
def test_two_cpu_processes_train_a_classifier_and_validate_every_image(cls_overrides, crops):
    """torchrun with 2 ranks: one run folder, both epochs; each rank validates its share and the gathered top-1
    is that of the whole val split (a standalone val of the same weights agrees within one image)."""
    import os
    import subprocess
    import sys

    args = {**cls_overrides, "amp": False, "dist_timeout": 60, "imgsz": 64}  # a 2x2 last map: BN takes 1-image batches
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "yolotrain", "classify", "train", *(f"{k}={v}" for k, v in args.items())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    save_dir = Path(cls_overrides["project"]) / "train"
    assert [p.name for p in Path(cls_overrides["project"]).iterdir()] == ["train"]
    rows = read_rows(save_dir / "results.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    val_images = sum(1 for p in Path(crops, "val").rglob("*.jpg"))
    checkpoint = load_checkpoint(save_dir / "weights" / "last.pt")
    assert checkpoint["task"] == "classify"
    standalone = YOLO(save_dir / "weights" / "last.pt").val(data=crops, batch=8, plots=False)
    assert float(rows[-1]["metrics/accuracy_top1"]) == pytest.approx(standalone.top1, abs=1 / val_images + 1e-9)
