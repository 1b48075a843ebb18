"""Segmentation: polygon labels through every transform (each mask stays on its object), masks in the batch, the
mask loss, and a segmentation run's train / val / predict / export / resume through the same `YOLO` object."""

import importlib.util
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from resume_check import assert_resumes_exactly, read_rows
from yolotrain.cfg import get_cfg
from yolotrain.data.augment import CopyPaste, Format, LetterBox, MixUp, Mosaic, RandomFlip, RandomPerspective
from yolotrain.data.builtin import generate_shapes_seg_dataset
from yolotrain.data.dataset import YOLODataset
from yolotrain.data.data_yaml import check_det_dataset
from yolotrain.data.loader import collate_fn
from yolotrain.engine.model import YOLO
from yolotrain.errors import CfgError
from yolotrain.nn.backends import load_inference_model
from yolotrain.nn.model import SegmentationModel
from yolotrain.tasks.segment.train import SegmentationTrainer
from yolotrain.tasks.segment.val import SegmentationValidator
from yolotrain.utils.checkpoint import load_checkpoint
from yolotrain.utils.masks import polygons_to_masks
from yolotrain.utils.plotting import class_colour

SEGMENT_HEAD = [[4, 6, 8], 1, "Segment", ["nc", 8, 16]]  # 8 prototypes of 16 channels: a tiny mask branch


@pytest.fixture(scope="module")
def tiny_seg_yaml(tiny_yaml_with_head):
    return tiny_yaml_with_head("tinyseg", SEGMENT_HEAD)


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    """The built-in segmentation set, small: shapes with the outline of their visible pixels."""
    return str(generate_shapes_seg_dataset(tmp_path_factory.mktemp("seg-data"), n_train=12, n_val=6, imgsz=96,
                                           seed=3))


@pytest.fixture
def seg_overrides(tiny_seg_yaml, seg_data, tmp_path):
    return dict(model=tiny_seg_yaml, data=seg_data, epochs=2, imgsz=64, batch=4, workers=0, device="cpu",
                project=str(tmp_path / "runs"), name="train", plots=False, seed=0, deterministic=True,
                warmup_epochs=0.5, verbose=False, close_mosaic=1)


# ----------------------------------------------------------------------------------------------------- transforms
COLOURS = [(0, 0, 255), (0, 255, 0), (255, 0, 0)]  # one per object, BGR


def _shapes_sample(size=96, points=None):
    """A sample of three filled polygons, each in its own colour, with their outlines as labels."""
    img = np.full((size, size, 3), 60, np.uint8)
    polygons = [np.array([[10, 10], [40, 12], [30, 40], [8, 30]], np.float32),
                np.array([[55, 20], [85, 20], [85, 50], [55, 50]], np.float32),
                np.array([[20, 60], [50, 88], [12, 86]], np.float32)]
    from yolotrain.utils.masks import stack_polygons

    segments = stack_polygons(polygons, points)
    for outline, colour in zip(segments, COLOURS):
        mask = polygons_to_masks(outline[None], (size, size))[0].astype(bool)
        img[mask] = colour
    boxes = np.concatenate([segments.min(1), segments.max(1)], 1)
    return {"img": img, "cls": np.arange(3, dtype=np.float32)[:, None], "bboxes": boxes, "segments": segments,
            "im_file": "shapes.png", "ori_shape": (size, size), "resized_shape": (size, size),
            "ratio_pad": ((1.0, 1.0), (0.0, 0.0))}


class _OneImage:
    def __len__(self):
        return 1

    def get_image_and_label(self, _):
        return _shapes_sample(points=1000)


def _assert_masks_on_their_objects(out):
    """Every object's mask, drawn from its transformed outline, lies on pixels of that object's colour (its inner
    part: the border pixels are blended by resampling)."""
    img = out["img"]
    masks = polygons_to_masks(out["segments"], img.shape[:2])
    assert len(masks) >= 2
    for mask, cls in zip(masks, out["cls"][:, 0].astype(int)):
        inner = cv2.erode(mask, np.ones((3, 3), np.uint8))
        if inner.sum() < 10:
            continue
        colours = img[inner.astype(bool)].astype(int)
        close = (np.abs(colours - np.array(COLOURS[cls])) < 60).all(1)
        assert close.mean() > 0.97, (cls, close.mean())
        # and the mask covers the object: few of the object's colour pixels are outside its mask (mosaic copies
        # may show other objects of the same colour, so only look inside the box)
        x1, y1, x2, y2 = out["bboxes"][list(out["cls"][:, 0].astype(int)).index(cls)]
        assert x2 > x1 and y2 > y1


@pytest.mark.parametrize("transform", ["letterbox", "perspective", "flip", "mosaic", "mixup", "copy_paste"])
def test_every_transform_keeps_each_mask_on_its_object(transform):
    random.seed(5)
    np.random.seed(5)
    sample = _shapes_sample(points=1000)
    if transform == "letterbox":
        out = LetterBox((128, 160))(sample)
    elif transform == "perspective":
        out = RandomPerspective(degrees=30, translate=0.1, scale=0.3, shear=5, perspective=0.0005)(sample)
    elif transform == "flip":
        out = RandomFlip(p=1.0, direction="vertical")(RandomFlip(p=1.0, direction="horizontal")(sample))
    elif transform == "mosaic":
        out = RandomPerspective(border=(-48, -48), scale=0.2, translate=0.1, degrees=10)(Mosaic(_OneImage(), 96)(sample))
    elif transform == "mixup":
        out = MixUp(_OneImage(), p=1.0)(sample)
        assert len(out["segments"]) == 6
        return  # blended pixels: the outlines are the two samples' own (checked by the concatenation)
    else:
        shifted = _shapes_sample(points=1000)
        out = CopyPaste(p=1.0)(shifted)
        assert len(out["segments"]) > 3  # pasted copies: their pixels come with them
    _assert_masks_on_their_objects(out)


def test_copy_paste_pastes_the_object_not_its_box():
    random.seed(0)
    sample = _shapes_sample(points=1000)
    out = CopyPaste(p=1.0)(sample)
    triangle = np.flatnonzero(out["cls"][:, 0] == 2)[-1]  # the mirrored copy of the triangle
    (mask,) = polygons_to_masks(out["segments"][triangle][None], (96, 96))
    x1, y1, x2, y2 = out["bboxes"][triangle].astype(int)
    box = np.zeros((96, 96), bool)
    box[y1:y2, x1:x2] = True
    outside = box & ~mask.astype(bool)  # in the copy's box, not in its mask: the background stays
    assert (out["img"][outside] == 60).all(1).mean() > 0.9


def test_format_draws_index_masks_with_small_objects_on_top():
    sample = _shapes_sample()
    big = np.array([[[0, 0], [96, 0], [96, 96], [0, 96]]], np.float32)
    sample["segments"] = np.concatenate([sample["segments"], big])
    sample["cls"] = np.concatenate([sample["cls"], [[1.0]]]).astype(np.float32)
    sample["bboxes"] = np.concatenate([sample["bboxes"], [[0, 0, 96, 96]]]).astype(np.float32)
    out = Format(mask_ratio=4, overlap=True)(sample)
    masks = out["masks"]
    assert masks.shape == (24, 24) and int(masks.max()) == 4
    assert out["bboxes"][0].tolist() == pytest.approx([0.5, 0.5, 1.0, 1.0])  # the big one first now
    assert int(masks[20, 2]) == 1 and int(masks[6, 17]) != 1  # background of the big one, another object on it
    per_object = Format(mask_ratio=2, overlap=False)(_shapes_sample())["masks"]
    assert per_object.shape == (3, 48, 48) and per_object.amax((1, 2)).tolist() == [1, 1, 1]


def test_a_segmentation_batch_has_masks_and_the_labels_in_their_order(seg_data):
    data = check_det_dataset(seg_data)
    dataset = YOLODataset(data["train"], imgsz=64, augment=True, hyp=get_cfg(), data=data, task="segment",
                          workers=0)
    batch = collate_fn([dataset[(i, 7)] for i in range(4)])
    assert batch["masks"].shape == (4, 16, 16) and "segments" not in batch  # training keeps only the masks
    counts = torch.bincount(batch["batch_idx"].long(), minlength=4)
    assert all(int(batch["masks"][i].max()) <= int(counts[i]) for i in range(4))
    validation = YOLODataset(data["val"], imgsz=64, augment=False, data=data, task="segment", workers=0)
    batch = collate_fn([validation[i] for i in range(3)])
    assert batch["segments"].shape[0] == len(batch["cls"]) and batch["masks"].shape[0] == 3


def test_augment_device_auto_falls_back_for_masks_and_device_is_a_one_line_error():
    from yolotrain.data.device_augment import check_device_augment

    assert check_device_augment(get_cfg(overrides={"task": "segment", "augment_device": "auto"}),
                                torch.device("cuda")) is False
    with pytest.raises(CfgError, match="augment_device=device cannot be combined with task=segment"):
        check_device_augment(get_cfg(overrides={"task": "segment", "augment_device": "device"}), torch.device("cpu"))


@pytest.mark.parametrize("value, message", [(2.5, "expected int"), (0, "mask_ratio=0")])
def test_a_bad_mask_ratio_is_a_one_line_error(value, message):
    with pytest.raises(CfgError, match=message):
        get_cfg(overrides={"mask_ratio": value})
    with pytest.raises(CfgError, match=f"mask_ratio={value:g} is invalid"):  # a dataset given a dict of gains
        Format_for_segment = __import__("yolotrain.data.augment", fromlist=["_format_for"])._format_for
        Format_for_segment(type("Data", (), {"task": "segment"})(), {"mask_ratio": value}, keep_segments=True)


def test_bad_polygon_rows_are_named_in_the_report(tmp_path):
    image_dir, label_dir = tmp_path / "images", tmp_path / "labels"
    image_dir.mkdir(), label_dir.mkdir()
    cv2.imwrite(str(image_dir / "a.png"), np.zeros((32, 32, 3), np.uint8))
    (label_dir / "a.txt").write_text("0 0.1 0.1 0.9 0.1 0.5 0.9\n"  # fine
                                     "0 0.1 0.1 0.9 0.1\n"  # two points
                                     "0 0.1 0.1 0.9 0.1 0.5 0.9 0.2\n"  # an odd coordinate count
                                     "0 0.1 0.1 1.9 0.1 0.5 0.9\n")  # a point outside the image
    dataset = YOLODataset(str(image_dir), imgsz=32, data={"names": {0: "a"}, "nc": 1}, task="segment", workers=1)
    assert len(dataset.labels[0]["segments"]) == 1
    report = Path(dataset.bad_entries_file).read_text()
    assert ("line 2: expected a polygon (class and at least 3 x y points: an odd count of at least 7 values), got 5 "
            "(+1 more rows)") in report  # the odd count of line 3 too
    assert "line 4: coordinates" in report and "outside [0, 1]" in report


# ----------------------------------------------------------------------------------------------------------- loss
def test_the_mask_loss_is_small_for_the_right_masks_and_large_for_wrong_ones(tiny_seg_yaml):
    """With prototypes that spell out the labels' masks and coefficients that pick them, the mask loss is far below
    that of coefficients picking the wrong mask."""
    from yolotrain.loss.segment import SegmentationLoss

    model = SegmentationModel(tiny_seg_yaml, nc=2, verbose=False)
    model.args = get_cfg()
    loss = SegmentationLoss(model)
    masks = torch.zeros(1, 16, 16, dtype=torch.uint8)
    masks[0, 2:8, 2:8] = 1
    masks[0, 9:15, 8:15] = 2
    batch = {"img": torch.zeros(1, 3, 64, 64), "batch_idx": torch.zeros(2), "cls": torch.tensor([[0.0], [1.0]]),
             "bboxes": torch.tensor([[5 / 16, 5 / 16, 6 / 16, 6 / 16], [11.5 / 16, 12 / 16, 7 / 16, 6 / 16]]),
             "masks": masks, "max_boxes": 2}
    maps, coefficients, _ = model.train()(torch.zeros(1, 3, 64, 64))
    protos = torch.stack([(masks[0] == 1).float(), (masks[0] == 2).float()] + [torch.zeros(16, 16)] * 6)[None]
    protos = protos * 20 - 10  # logits +10 on the mask, -10 off it
    assigned = loss.assign(list(maps), batch)
    fg_object = assigned.target_gt_idx  # (1, A): the object of each anchor
    right = torch.nn.functional.one_hot(fg_object, 8).float().transpose(1, 2)  # (1, 8, A)
    wrong = torch.nn.functional.one_hot(1 - fg_object, 8).float().transpose(1, 2)
    good = loss.mask_term(assigned, right, protos, batch)
    bad = loss.mask_term(assigned, wrong, protos, batch)
    assert good < 0.01 and bad > 100 * good


# ------------------------------------------------------------------------------------------------------------ runs
def test_a_segmentation_run_writes_what_users_read(seg_overrides, tmp_path):
    model = YOLO(seg_overrides["model"])
    metrics = model.train(**{k: v for k, v in seg_overrides.items() if k != "model"})
    save_dir = Path(seg_overrides["project"]) / "train"
    rows = read_rows(save_dir / "results.csv")
    assert list(rows[0])[2:14] == [
        "train/box_loss", "train/seg_loss", "train/cls_loss", "train/dfl_loss",
        "metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)",
        "metrics/precision(M)", "metrics/recall(M)", "metrics/mAP50(M)", "metrics/mAP50-95(M)"]  # fmt: skip
    assert float(rows[-1]["train/seg_loss"]) > 0 and metrics.seg.map == metrics["metrics/mAP50-95(M)"]
    checkpoint = load_checkpoint(save_dir / "weights" / "best.pt")
    assert checkpoint["task"] == "segment"

    trained = YOLO(save_dir / "weights" / "best.pt")
    assert trained.task == "segment"
    validated = trained.val(data=seg_overrides["data"], imgsz=64, batch=4, plots=False, conf=0.001, save_json=True,
                            project=str(tmp_path), name="val")
    assert validated.seg.map == pytest.approx(metrics.seg.map, abs=1e-6)
    predictions = __import__("json").loads((Path(validated.save_dir) / "predictions.json").read_text())
    assert predictions and all("counts" in p["segmentation"] for p in predictions)

    image = next(Path(seg_overrides["data"]).parent.glob("images/val/*.jpg"))
    height, width = cv2.imread(str(image)).shape[:2]
    for retina in (False, True):
        (result,) = trained.predict(str(image), imgsz=64, conf=0.0, max_det=5, save=False, retina_masks=retina)
        assert result.masks.data.shape == (5, height, width) and len(result.boxes) == 5
    assert all(len(xy) == 0 or xy.shape[1] == 2 for xy in result.masks.xy)
    txt = tmp_path / "labels.txt"
    result.save_txt(txt)
    lines = txt.read_text().splitlines() if txt.exists() else []
    assert all(len(line.split()) % 2 == 1 and len(line.split()) >= 7 for line in lines)
    assert cv2.imread(result.save(tmp_path / "a.jpg")).shape[:2] == (height, width)

    formats = ["torchscript"] + (["onnx"] if importlib.util.find_spec("onnxruntime") else [])
    for file_format in formats:
        exported = YOLO(trained.export(format=file_format, imgsz=64, dynamic=True))
        assert exported.task == "segment"
        from_export = exported.val(data=seg_overrides["data"], imgsz=64, batch=4, plots=False, conf=0.001)
        assert from_export.seg.map == pytest.approx(metrics.seg.map, abs=2e-3)
        (exported_result,) = exported.predict(str(image), imgsz=64, conf=0.0, max_det=5, save=False)
        assert exported_result.masks.data.shape == result.masks.data.shape
        # the same raw outputs (detections with their coefficients, and the prototypes) as the checkpoint
        images = torch.rand(1, 3, 64, 48)
        detections, (_, _, protos) = load_inference_model(save_dir / "weights" / "best.pt").eval()(images)
        exported_detections, exported_protos = load_inference_model(exported.model_path)(images)
        assert torch.allclose(exported_detections, detections, atol=1e-3)
        assert torch.allclose(exported_protos, protos, atol=1e-3)


def test_a_segmentation_run_resumes_exactly(seg_overrides):
    assert_resumes_exactly(SegmentationTrainer, seg_overrides, "train/seg_loss")


def test_the_semantic_target_is_each_pixels_object_class(tiny_seg_yaml):
    from yolotrain.loss.segment import SegmentationLoss

    model = SegmentationModel(tiny_seg_yaml, nc=2, verbose=False)
    masks = torch.zeros(2, 4, 4, dtype=torch.uint8)
    masks[0, :2] = 1  # image 0, its object 0 (class 1)
    masks[0, 3, 3] = 2  # image 0, its object 1 (class 0)
    masks[1, :, :1] = 1  # image 1, its object 0 (class 0)
    batch = {"masks": masks, "cls": torch.tensor([[1.0], [0.0], [0.0]]), "batch_idx": torch.tensor([0.0, 0, 1])}
    for overlap in (True, False):
        model.args = get_cfg(overrides={"overlap_mask": overlap})
        loss = SegmentationLoss(model)
        if not overlap:  # one mask per object
            batch = {**batch, "masks": torch.stack([masks[0] == 1, masks[0] == 2, masks[1] == 1]).to(torch.uint8)}
        maps = loss._class_maps(batch, 2)
        assert maps.shape == (2, 2, 4, 4)
        assert maps[0, 1, :2].all() and maps[0, 0, 3, 3] == 1 and maps[0].sum() == 9
        assert maps[1, 0, :, 0].all() and maps[1].sum() == 4
        good = loss.semantic_term(maps * 20 - 10, batch)
        assert good < 0.05 and loss.semantic_term(-(maps * 20 - 10), batch) > 10 * good


def test_an_end_to_end_segmentation_model_trains_with_a_semantic_loss(seg_overrides, tiny_yaml_with_head):
    model = YOLO(tiny_yaml_with_head("tinyseg26", [[4, 6, 8], 1, "Segment26", ["nc", 8, 16]], end2end=True))
    model.train(**{**{k: v for k, v in seg_overrides.items() if k != "model"}, "epochs": 1})
    rows = read_rows(Path(seg_overrides["project"]) / "train" / "results.csv")
    assert float(rows[0]["train/sem_loss"]) > 0 and float(rows[0]["train/seg_loss"]) > 0
    (result,) = YOLO(Path(seg_overrides["project"]) / "train" / "weights" / "best.pt").predict(
        next(Path(seg_overrides["data"]).parent.glob("images/val/*.jpg")), imgsz=64, conf=0.0, max_det=4, save=False)
    assert len(result.masks.data) == 4


@pytest.mark.slow
def test_two_cpu_processes_train_a_segmentation_model_and_validate_every_image(seg_overrides, seg_data):
    """torchrun with 2 ranks: one run folder, both epochs; the gathered mask mAP of the final epoch's validation is
    that of a standalone validation of the same weights, and predictions.json has every image's masks."""
    import json
    import os
    import subprocess
    import sys

    args = {**seg_overrides, "amp": False, "dist_timeout": 60, "save_json": True}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "yolotrain", "segment", "train", *(f"{k}={v}" for k, v in args.items())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    save_dir = Path(seg_overrides["project"]) / "train"
    rows = read_rows(save_dir / "results.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    standalone = YOLO(save_dir / "weights" / "last.pt").val(data=seg_data, imgsz=64, batch=4, plots=False,
                                                             save_json=True, project=seg_overrides["project"],
                                                             name="standalone")
    assert float(rows[-1]["metrics/mAP50-95(M)"]) == pytest.approx(standalone.seg.map, abs=1e-4)
    gathered = json.loads((save_dir / "predictions.json").read_text())
    alone = json.loads((Path(standalone.save_dir) / "predictions.json").read_text())
    assert {p["image_id"] for p in gathered} == {p["image_id"] for p in alone}
    assert all(p["segmentation"]["size"] for p in gathered)


def test_validation_plots_draw_each_predicted_mask_by_its_outline(tmp_path):
    """A disc-shaped prototype: the plotted outline of a detection using it runs along the disc (in batch-image
    pixels), and a detection whose mask is empty is drawn as its box's centre."""
    validator = SegmentationValidator(save_dir=tmp_path, args={"plots": True})
    ys, xs = torch.meshgrid(torch.arange(16) + 0.5, torch.arange(16) + 0.5, indexing="ij")
    disc = ((xs - 8) ** 2 + (ys - 8) ** 2).sqrt() <= 5  # radius 5 prototype pixels = 20 input pixels
    validator._protos = torch.stack((torch.where(disc, 1.0, -1.0), torch.full((16, 16), -1.0)))[None]
    detections = torch.tensor([[4.0, 4.0, 60.0, 60.0, 0.9, 1.0, 1.0, 0.0],  # the disc
                               [10.0, 20.0, 30.0, 40.0, 0.8, 0.0, 0.0, 1.0]])  # an empty mask
    batch = {"img": torch.zeros(1, 3, 64, 64)}
    outlines = validator.predicted_outlines(detections, torch.zeros(2, dtype=torch.long), batch)
    distances = (outlines[0] - 32.0).norm(dim=-1)  # the disc's centre: 8 prototype pixels = 32 input pixels
    assert outlines.shape[0] == 2 and float(distances.min()) > 16 and float(distances.max()) < 24
    assert torch.equal(outlines[1], torch.tensor([20.0, 30.0]).expand_as(outlines[1]))

    names = {0: "square", 1: "disc"}
    validator.names = names
    validator.plot_batch({**batch, "batch_idx": torch.zeros(0), "cls": torch.zeros(0, 1), "bboxes": torch.zeros(0, 4),
                          "segments": torch.zeros(0, 4, 2)}, [detections], 0)
    plotted = cv2.imread(str(tmp_path / "val_batch0_pred.jpg")).astype(np.float64)  # (64, 64, 3), as the batch
    # The disc's lowest point (32, 52) lies 8 px inside the box's bottom edge: only the mask outline passes there.
    near_bottom = plotted[48:56, 30:35] - np.array(class_colour(1, bgr=True), np.float64)
    assert np.linalg.norm(near_bottom, axis=-1).min() < 100
