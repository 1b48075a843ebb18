"""Oriented boxes: rotated-box labels through every transform (each box stays on its object), the rotated
assignment and loss, and an OBB run's train / val / predict / export / resume through the same `YOLO` object."""

import importlib.util
import math
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from resume_check import assert_resumes_exactly, read_rows
from yolotrain.cfg import get_cfg
from yolotrain.data.augment import LetterBox, MixUp, Mosaic, RandomFlip, RandomPerspective
from yolotrain.data.builtin import generate_shapes_obb_dataset
from yolotrain.data.dataset import YOLODataset
from yolotrain.engine.model import YOLO
from yolotrain.errors import CfgError
from yolotrain.nn.backends import load_inference_model
from yolotrain.nn.model import OBBModel
from yolotrain.tasks.obb.train import OBBTrainer
from yolotrain.utils.checkpoint import load_checkpoint
from yolotrain.utils.obb import corners_to_xywhr, xywhr_to_corners

OBB_HEAD = [[4, 6, 8], 1, "OBB", ["nc", 1]]


@pytest.fixture(scope="module")
def tiny_obb_yaml(tiny_yaml_with_head):
    return tiny_yaml_with_head("tinyobb", OBB_HEAD)


@pytest.fixture(scope="module")
def obb_data(tmp_path_factory):
    """The built-in oriented-box set, small."""
    return str(generate_shapes_obb_dataset(tmp_path_factory.mktemp("obb-data"), n_train=12, n_val=6, imgsz=96, seed=3))


@pytest.fixture
def obb_overrides(tiny_obb_yaml, obb_data, tmp_path):
    return dict(model=tiny_obb_yaml, data=obb_data, epochs=2, imgsz=64, batch=4, workers=0, device="cpu",
                project=str(tmp_path / "runs"), name="train", plots=False, seed=0, deterministic=True,
                warmup_epochs=0.5, verbose=False, close_mosaic=1)


# ----------------------------------------------------------------------------------------------------- transforms
COLOURS = [(0, 0, 255), (0, 255, 0), (255, 0, 0)]  # one per object, BGR


def _rotated_sample(size=96):
    """Three filled rotated rectangles, each in its own colour, labelled by their corners."""
    img = np.full((size, size, 3), 60, np.uint8)
    boxes = np.array([[25, 25, 30, 12, 0.4], [68, 30, 24, 10, 1.2], [40, 70, 36, 14, -0.3]], np.float32)
    corners = xywhr_to_corners(boxes).astype(np.float32)
    for outline, colour in zip(corners, COLOURS):
        cv2.fillPoly(img, [np.round((outline - 0.5) * 16).astype(np.int32)], colour, shift=4)
    extent = np.concatenate([corners.min(1), corners.max(1)], 1)
    return {"img": img, "cls": np.arange(3, dtype=np.float32)[:, None], "bboxes": extent, "corners": corners,
            "im_file": "boxes.png", "ori_shape": (size, size), "resized_shape": (size, size),
            "ratio_pad": ((1.0, 1.0), (0.0, 0.0))}


class _OneImage:
    def __len__(self):
        return 1

    def get_image_and_label(self, _):
        return _rotated_sample()


def _assert_boxes_on_their_objects(out):
    """Each transformed box's inner part lies on pixels of its object's colour, and its corners are a rectangle."""
    img = out["img"]
    kept = 0
    for corners, cls in zip(out["corners"], out["cls"][:, 0].astype(int)):
        xywhr = corners_to_xywhr(corners[None].astype(np.float64))[0]
        inner = xywhr_to_corners(np.array([[*xywhr[:2], xywhr[2] * 0.6, xywhr[3] * 0.6, xywhr[4]]]))[0]
        mask = np.zeros(img.shape[:2], np.uint8)
        cv2.fillPoly(mask, [np.round(inner - 0.5).astype(np.int32)], 1)
        pixels = img[mask.astype(bool)].astype(int)
        if len(pixels) < 5:
            continue
        close = (np.abs(pixels - np.array(COLOURS[cls])) < 60).all(1)
        assert close.mean() > 0.9, (cls, close.mean())
        sides = np.linalg.norm(np.roll(corners, -1, 0) - corners, axis=1)
        assert abs(sides[0] - sides[2]) < 1e-3 * max(sides.max(), 1) + 1e-3  # a rectangle
        kept += 1
    assert kept >= 2


@pytest.mark.parametrize("transform", ["letterbox", "perspective", "flip", "mosaic", "mixup"])
def test_every_transform_keeps_each_rotated_box_on_its_object(transform):
    random.seed(2)
    sample = _rotated_sample()
    if transform == "letterbox":
        out = LetterBox((128, 160))(sample)
    elif transform == "perspective":
        out = RandomPerspective(degrees=40, translate=0.05, scale=0.2, shear=3)(sample)
    elif transform == "flip":
        out = RandomFlip(p=1.0, direction="vertical")(RandomFlip(p=1.0, direction="horizontal")(sample))
    elif transform == "mosaic":
        out = RandomPerspective(border=(-48, -48), scale=0.2, degrees=20)(Mosaic(_OneImage(), 96)(sample))
    else:
        out = MixUp(_OneImage(), p=1.0)(sample)
        assert len(out["corners"]) == 6
        return
    _assert_boxes_on_their_objects(out)


def test_augment_device_auto_falls_back_for_rotated_boxes_and_device_is_a_one_line_error():
    from yolotrain.data.device_augment import check_device_augment

    assert check_device_augment(get_cfg(overrides={"task": "obb", "augment_device": "auto"}),
                                torch.device("cuda")) is False
    with pytest.raises(CfgError, match="augment_device=device cannot be combined with task=obb"):
        check_device_augment(get_cfg(overrides={"task": "obb", "augment_device": "device"}), torch.device("cpu"))


def test_bad_rotated_box_rows_are_named_in_the_report(tmp_path):
    image_dir, label_dir = tmp_path / "images", tmp_path / "labels"
    image_dir.mkdir(), label_dir.mkdir()
    cv2.imwrite(str(image_dir / "a.png"), np.zeros((32, 32, 3), np.uint8))
    (label_dir / "a.txt").write_text("0 0.1 0.1 0.9 0.1 0.9 0.9 0.1 0.9\n"  # fine
                                     "0 0.1 0.1 0.9 0.1 0.9 0.9\n"  # three corners
                                     "0 0.1 0.1 1.9 0.1 0.9 0.9 0.1 0.9\n")  # a corner outside the image
    dataset = YOLODataset(str(image_dir), imgsz=32, data={"names": {0: "a"}, "nc": 1}, task="obb", workers=1)
    assert dataset.labels[0]["corners"].shape == (1, 4, 2)
    report = Path(dataset.bad_entries_file).read_text()
    assert "line 2: expected 9 values (class and 4 corners x y), got 7" in report
    assert "line 3: coordinates" in report and "outside [0, 1]" in report


# ----------------------------------------------------------------------------------------------------------- loss
def test_the_rotated_assigner_takes_anchors_inside_the_turned_box_only():
    from yolotrain.loss.obb import RotatedTaskAlignedAssigner

    assigner = RotatedTaskAlignedAssigner(topk=100, num_classes=1)
    box = torch.tensor([[[16.0, 16.0, 20.0, 4.0, math.pi / 4]]])  # a thin box along the diagonal
    anchors = torch.stack(torch.meshgrid(torch.arange(32.0) + 0.5, torch.arange(32.0) + 0.5, indexing="xy"), -1)
    inside = assigner._anchors_inside_boxes(anchors.view(-1, 2), box).view(32, 32)
    assert inside[15, 15] and inside[20, 20] and inside[11, 11]  # on the diagonal
    assert not inside[11, 20] and not inside[20, 11] and not inside[2, 2]  # off it, or past its end


def test_the_angle_loss_is_zero_for_the_right_angle_and_large_for_a_wrong_one(tiny_obb_yaml):
    """Predictions equal to the target: the angle loss is zero; turned by an eighth of a turn off a long box (the
    angle error the loss weighs most: it repeats every quarter turn, where w and h swap), it is large."""
    from yolotrain.loss.obb import OBBLoss

    model = OBBModel(tiny_obb_yaml, nc=2, verbose=False)
    model.args = get_cfg()
    loss = OBBLoss(model)
    maps, angles = model.train()(torch.zeros(1, 3, 64, 64))
    target = torch.tensor([[32.0, 32.0, 40.0, 10.0, 0.3]])  # pixels
    corners = xywhr_to_corners(target) / 64
    batch = {"img": torch.zeros(1, 3, 64, 64), "batch_idx": torch.zeros(1), "cls": torch.zeros(1, 1),
             "corners": corners, "bboxes": torch.zeros(1, 4), "max_boxes": 1}
    assigned = loss.assign_rotated(list(maps), angles, batch)
    assert assigned.fg_mask.any()
    aligned = assigned.pred_bboxes.detach().clone()
    fg = assigned.fg_mask
    truth = torch.cat((target[0, :4] / assigned.stride_tensor.expand(-1, 4).unsqueeze(0)[0], target[0, 4:].expand(
        aligned.shape[1], 1)), -1)[None].expand_as(aligned)
    assigned.pred_bboxes = torch.where(fg[..., None], truth, aligned)
    assert loss._angle_loss(assigned) < 1e-6
    assigned.pred_bboxes = torch.where(fg[..., None], truth + torch.tensor([0, 0, 0, 0, math.pi / 4]), aligned)
    assert loss._angle_loss(assigned) > 0.1


# ------------------------------------------------------------------------------------------------------------ runs
def test_an_obb_run_writes_what_users_read(obb_overrides, tmp_path):
    model = YOLO(obb_overrides["model"])
    metrics = model.train(**{k: v for k, v in obb_overrides.items() if k != "model"})
    save_dir = Path(obb_overrides["project"]) / "train"
    rows = read_rows(save_dir / "results.csv")
    assert list(rows[0])[2:10] == [
        "train/box_loss", "train/cls_loss", "train/dfl_loss", "train/angle_loss",
        "metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)"]  # fmt: skip
    assert float(rows[-1]["train/angle_loss"]) >= 0 and metrics.box.map == metrics["metrics/mAP50-95(B)"]
    assert load_checkpoint(save_dir / "weights" / "best.pt")["task"] == "obb"

    trained = YOLO(save_dir / "weights" / "best.pt")
    assert trained.task == "obb"
    validated = trained.val(data=obb_overrides["data"], imgsz=64, batch=4, plots=False, conf=0.001, save_json=True,
                            project=str(tmp_path), name="val")
    assert validated.box.map == pytest.approx(metrics.box.map, abs=1e-6)
    predictions = __import__("json").loads((Path(validated.save_dir) / "predictions.json").read_text())
    assert predictions and all(len(p["rbox"]) == 5 and len(p["poly"]) == 8 for p in predictions)

    image = next(Path(obb_overrides["data"]).parent.glob("images/val/*.jpg"))
    height, width = cv2.imread(str(image)).shape[:2]
    (result,) = trained.predict(str(image), imgsz=64, conf=0.0, max_det=5, save=False)
    assert result.boxes is None and result.obb.data.shape == (5, 7)
    assert result.obb.xyxyxyxy.shape == (5, 4, 2) and result.obb.xyxy.shape == (5, 4)
    assert torch.allclose(result.obb.xyxyxyxyn[..., 0] * width, result.obb.xyxyxyxy[..., 0], atol=1e-3)
    txt = tmp_path / "labels.txt"
    result.save_txt(txt)
    assert all(len(line.split()) == 9 for line in txt.read_text().splitlines())
    assert set(result.summary()[0]["box"]) == {"x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4"}
    assert cv2.imread(result.save(tmp_path / "a.jpg")).shape[:2] == (height, width)

    formats = ["torchscript"] + (["onnx"] if importlib.util.find_spec("onnxruntime") else [])
    for file_format in formats:
        exported = YOLO(trained.export(format=file_format, imgsz=64, dynamic=True))
        assert exported.task == "obb"
        from_export = exported.val(data=obb_overrides["data"], imgsz=64, batch=4, plots=False, conf=0.001)
        assert from_export.box.map == pytest.approx(metrics.box.map, abs=2e-3)
        images = torch.rand(1, 3, 64, 48)
        expected = load_inference_model(save_dir / "weights" / "best.pt").eval()(images)[0]
        assert torch.allclose(load_inference_model(exported.model_path)(images), expected, atol=1e-3)


def test_an_obb_run_resumes_exactly(obb_overrides):
    assert_resumes_exactly(OBBTrainer, obb_overrides, "train/angle_loss")


def test_an_end_to_end_obb_model_trains_and_predicts(obb_overrides, tiny_yaml_with_head):
    head = [[4, 6, 8], 1, "OBB26" if "OBB26" in dir(__import__("yolotrain.nn.modules", fromlist=["x"])) else "OBB",
            ["nc", 1]]
    model = YOLO(tiny_yaml_with_head("tinyobb26", head, end2end=True, reg_max=1))
    model.train(**{**{k: v for k, v in obb_overrides.items() if k != "model"}, "epochs": 1})
    rows = read_rows(Path(obb_overrides["project"]) / "train" / "results.csv")
    assert "train/l1_loss" in rows[0] and float(rows[0]["train/box_loss"]) > 0
    (result,) = YOLO(Path(obb_overrides["project"]) / "train" / "weights" / "best.pt").predict(
        next(Path(obb_overrides["data"]).parent.glob("images/val/*.jpg")), imgsz=64, conf=0.0, max_det=4, save=False)
    assert len(result.obb) == 4


@pytest.mark.slow
def test_two_cpu_processes_train_an_obb_model_and_validate_every_image(obb_overrides, obb_data):
    """torchrun with 2 ranks: both epochs in one run folder; the gathered mAP of the final epoch's validation is
    that of a standalone validation of the same weights."""
    import os
    import subprocess
    import sys

    args = {**obb_overrides, "amp": False, "dist_timeout": 60}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "yolotrain", "obb", "train", *(f"{k}={v}" for k, v in args.items())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    save_dir = Path(obb_overrides["project"]) / "train"
    rows = read_rows(save_dir / "results.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    standalone = YOLO(save_dir / "weights" / "last.pt").val(data=obb_data, imgsz=64, batch=4, plots=False)
    assert float(rows[-1]["metrics/mAP50-95(B)"]) == pytest.approx(standalone.box.map, abs=1e-4)


class ShiftedBoxesModel(torch.nn.Module):
    """A stand-in OBB model whose eval output is each label's rotated box moved along its own width axis by
    `shift` of its width, at score 0.9 for its class (`watch`, an on_val_batch_start callback, hands it the batch)."""

    def __init__(self, nc, shift, across=0.0):
        super().__init__()
        self.nc, self.shift, self.across = nc, shift, across  # along the width (of it), across it (of the height)
        self.names = {i: f"class{i}" for i in range(nc)}
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.batch = None

    def watch(self, validator):
        self.batch = validator.batch

    def forward(self, img):
        from yolotrain.utils.obb import corners_to_xywhr

        batch_size, _, height, width = img.shape
        image_index = self.batch["batch_idx"].long()
        boxes = corners_to_xywhr(self.batch["corners"].float().view(-1, 4, 2) * torch.tensor([width, height]))
        angle = boxes[:, 4]
        boxes[:, 0] += self.shift * boxes[:, 2] * torch.cos(angle) - self.across * boxes[:, 3] * torch.sin(angle)
        boxes[:, 1] += self.shift * boxes[:, 2] * torch.sin(angle) + self.across * boxes[:, 3] * torch.cos(angle)
        slot = torch.arange(len(image_index)) - torch.searchsorted(image_index, image_index)
        y = torch.zeros(batch_size, 4 + self.nc + 1, int(slot.max()) + 2)
        y[image_index, :4, slot] = boxes[:, :4]
        y[image_index, 4 + self.batch["cls"].view(-1).long(), slot] = 0.9
        y[image_index, -1, slot] = angle
        return y, []


@pytest.mark.parametrize("obb_iou, expected_map", [
    # Moved by a fifth of its width along its width: exact IoU (1 - 0.2) / (1 + 0.2) = 0.667 passes 4 of the 10
    # thresholds; ProbIoU 1 - sqrt(1 - exp(-1.5 * 0.2^2)) = 0.759 (any aspect: the Gaussians differ by the move
    # alone) passes 6.
    ("exact", 0.4),
    ("probiou", 0.6),
])  # fmt: skip
def test_obb_iou_chooses_how_validation_matches_rotated_boxes(obb_data, tmp_path, obb_iou, expected_map):
    from yolotrain.tasks.obb.val import OBBValidator

    model = ShiftedBoxesModel(nc=3, shift=0.2)
    args = {"data": obb_data, "imgsz": 96, "batch": 4, "device": "cpu", "workers": 0, "plots": False,
            "obb_iou": obb_iou}
    validator = OBBValidator(save_dir=tmp_path / "val", args=args)
    validator.add_callback("on_val_batch_start", model.watch)
    metrics = validator(model=model)
    assert metrics["metrics/mAP50(B)"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["metrics/mAP50-95(B)"] == pytest.approx(expected_map, abs=1e-6)


@pytest.mark.parametrize("across, matched", [(0.0, True), (1.05, False)])
def test_the_confusion_matrix_compares_rotated_boxes(obb_data, tmp_path, across, matched):
    """Each prediction on its label, or moved across it by a little more than its height: then the rotated boxes
    do not meet (their axis-aligned extents mostly would, for boxes at an angle)."""
    from yolotrain.tasks.obb.val import OBBValidator

    model = ShiftedBoxesModel(nc=3, shift=0.0, across=across)
    args = {"data": obb_data, "imgsz": 96, "batch": 4, "device": "cpu", "workers": 0, "plots": True}
    validator = OBBValidator(save_dir=tmp_path / "val", args=args)
    validator.add_callback("on_val_batch_start", model.watch)
    validator(model=model)
    matrix = validator.confusion_matrix.matrix  # rows predicted class, columns true class; the last: background
    labels = int(matrix[:, :3].sum())
    assert labels > 0 and int(matrix[:3, :3].trace()) == (labels if matched else 0)
    assert int(matrix[3, :3].sum()) == (0 if matched else labels)  # labels nothing matched


def test_obb_iou_is_checked():
    from yolotrain.cfg import get_cfg

    with pytest.raises(CfgError, match="obb_iou"):
        get_cfg(overrides={"obb_iou": "polygon"})
