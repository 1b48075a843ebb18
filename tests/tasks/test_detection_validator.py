"""DetectionValidator on tiny on-disk datasets: exact metrics for known predictions, original-pixel mapping through
rect batches, plots, predictions.json, callbacks, training mode and checkpoint loading."""

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

from yolotrain.cfg import get_cfg
from yolotrain.data.data_yaml import check_det_dataset
from yolotrain.data.dataset import YOLODataset
from yolotrain.data.loader import build_dataloader
from yolotrain.errors import CheckpointError, DatasetError
from yolotrain.nn.model import DetectionModel
from yolotrain.tasks.detect.val import DetectionValidator
from yolotrain.utils.boxes import xywhn2xyxy, xyxy2xywh

IMGSZ = 64
# Different sizes and aspect ratios (h, w): with batch=4 the rect loader puts four of them, all of a different
# original size, in one 96x96 batch and the tall one alone in a 96x64 batch.
IMAGES = [
    ("000001", 96, 128, [(0, 10, 12, 50, 60), (1, 70, 30, 120, 90)]),
    ("000002", 128, 80, [(1, 8, 8, 40, 70), (0, 30, 80, 76, 124)]),
    ("000003", 64, 64, [(0, 16, 16, 48, 40)]),
    ("cat_a", 60, 100, [(1, 20, 10, 80, 50)]),
    ("000005", 80, 80, [(0, 5, 5, 35, 35), (0, 40, 40, 75, 78)]),
]
METRIC_KEYS = ["metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)"]


class OracleModel(nn.Module):
    """A stand-in detector whose eval output encodes the labels of the batch being validated.

    `watch` (an on_val_batch_start callback) hands it the collated batch; `forward` returns y (B, 4 + nc, A): each
    ground-truth box in input (letterboxed) pixels as xywh with score 0.9 for its class, then zero-score padding.
    `edit(boxes_xyxy, slot, scores) -> (boxes, scores)` may alter them (slot = the box's index within its image).
    """

    def __init__(self, nc=2, edit=None):
        super().__init__()
        self.nc = nc
        self.names = {i: f"class{i}" for i in range(nc)}
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.edit = edit
        self.batch = None
        self.padding_anchors = 7

    def watch(self, validator):
        self.batch = validator.batch

    def forward(self, img):
        batch_size, _, height, width = img.shape
        image_index = self.batch["batch_idx"].long()  # sorted: collate concatenates image by image
        cls = self.batch["cls"].reshape(-1).long()
        boxes = xywhn2xyxy(self.batch["bboxes"].float(), width, height)
        slot = torch.arange(len(image_index)) - torch.searchsorted(image_index, image_index)
        scores = torch.full((len(image_index),), 0.9)
        if self.edit is not None:
            boxes, scores = self.edit(boxes, slot, scores)
        anchors = (int(slot.max()) + 1 if len(slot) else 0) + self.padding_anchors
        y = torch.zeros(batch_size, 4 + self.nc, anchors)
        y[image_index, :4, slot] = xyxy2xywh(boxes)
        y[image_index, 4 + cls, slot] = scores
        return y, []


def _validator(data_yaml, save_dir, callbacks=(), **overrides):
    args = {"data": str(data_yaml), "imgsz": IMGSZ, "batch": 4, "device": "cpu", "workers": 0, "plots": False}
    validator = DetectionValidator(save_dir=save_dir, args={**args, **overrides})
    for event, fn in callbacks:
        validator.add_callback(event, fn)
    return validator


def _run_oracle(data_yaml, save_dir, edit=None, **overrides):
    model = OracleModel(edit=edit)
    validator = _validator(data_yaml, save_dir, [("on_val_batch_start", model.watch)], **overrides)
    return validator, validator(model=model)


def _original_gt_boxes(data_yaml):
    """{stem: (cls (n,), xyxy (n, 4))} in original pixels, read back from the label files."""
    root = Path(data_yaml).parent
    out = {}
    for stem, height, width, _ in IMAGES:
        rows = np.loadtxt(root / "labels" / "val" / f"{stem}.txt", ndmin=2)
        out[stem] = rows[:, 0].astype(int), xywhn2xyxy(rows[:, 1:], width, height)
    return out


@pytest.fixture
def data_yaml(tmp_path, make_dataset):
    return make_dataset(tmp_path / "data", IMAGES)


def test_perfect_predictions_score_one_through_rect_batches_of_mixed_sizes(data_yaml, tmp_path):
    seen_batches = []
    model = OracleModel()

    def record(validator):
        seen_batches.append((tuple(validator.batch["img"].shape[2:]), list(validator.batch["ori_shape"])))

    callbacks = [("on_val_batch_start", model.watch), ("on_val_batch_start", record)]
    validator = _validator(data_yaml, tmp_path / "val", callbacks)
    results = validator(model=model)

    assert seen_batches[0][0] == (96, 96) and len(set(seen_batches[0][1])) == 4  # 4 different original sizes
    assert seen_batches[1][0] == (96, 64)  # the tall image's own rect shape
    assert list(results) == [*METRIC_KEYS, "fitness"]
    assert all(results[k] == pytest.approx(1.0) for k in METRIC_KEYS)
    box = validator.metrics.box
    assert box.ap_class_index.tolist() == [0, 1]
    np.testing.assert_allclose(box.ap50, 1.0)
    np.testing.assert_allclose(box.ap, 1.0)
    assert box.mp == pytest.approx(1.0) and box.mr == pytest.approx(1.0)
    assert validator.seen == len(IMAGES)
    assert validator.nt_per_class.tolist() == [5, 3] and validator.nt_per_image.tolist() == [4, 3]
    assert set(validator.speed) >= {"preprocess", "inference", "postprocess"}


def test_no_detections_score_zero(data_yaml, tmp_path):
    def drop_all(boxes, slot, scores):
        return boxes, torch.zeros_like(scores)

    validator, results = _run_oracle(data_yaml, tmp_path / "val", edit=drop_all)
    assert all(results[k] == 0.0 for k in METRIC_KEYS) and results["fitness"] == 0.0
    np.testing.assert_array_equal(validator.metrics.box.ap, 0.0)


class RunnerUpClassModel(OracleModel):
    """Every ground-truth box is scored 0.9 for the *other* class and 0.5 for its own: its right class is only
    the runner-up of its anchor."""

    def forward(self, img):
        y, feats = super().forward(img)
        own = y[:, 4:] > 0  # (B, nc, A) the oracle's 0.9 marks each box's own class
        y[:, 4:] = torch.where(own, 0.5, own.flip(1).float() * 0.9)
        return y, feats


def test_multi_label_validation_counts_a_box_whose_right_class_is_the_runner_up(data_yaml, tmp_path):
    def validate(**overrides):
        model = RunnerUpClassModel()
        validator = _validator(data_yaml, tmp_path / "val", [("on_val_batch_start", model.watch)], **overrides)
        return validator(model=model)

    # Per class c: the n_other boxes of the other class are false positives at 0.9, ranked before c's n_c true
    # positives at 0.5, so the precision envelope is n_c / (n_c + n_other) at every recall: AP = 5/8 and 3/8.
    counts = {0: 5, 1: 3}
    expected_ap = {c: n / sum(counts.values()) for c, n in counts.items()}
    multi = validate()  # validation default: multi-label
    assert multi["metrics/mAP50(B)"] == pytest.approx(np.mean(list(expected_ap.values())))
    assert multi["metrics/mAP50-95(B)"] == pytest.approx(multi["metrics/mAP50(B)"])
    single = validate(multi_label=False)  # only the top class of each anchor: every box has the wrong class
    assert single["metrics/mAP50(B)"] == 0.0


def test_one_box_matched_only_at_iou_050_gives_the_hand_computed_ap(tmp_path, make_dataset):
    # Image a: two class-0 boxes; the prediction for the second is shifted 6 px right, IoU = 14*20 / (26*20) = 0.538.
    # Image b: one class-1 box predicted exactly. Both images are 64x64 = imgsz, so only padding is added.
    data = make_dataset(
        tmp_path / "data",
        [("a", 64, 64, [(0, 4, 4, 24, 24), (0, 34, 34, 54, 54)]), ("b", 64, 64, [(1, 10, 10, 40, 50)])],
    )

    def shift_second(boxes, slot, scores):
        boxes = boxes.clone()
        boxes[slot == 1, 0::2] += 6
        return boxes, scores - 0.1 * slot  # the exact box of image a ranks first

    validator, results = _run_oracle(data, tmp_path / "val", edit=shift_second)
    # Class 0 at IoU >= 0.55: TP then FP, recall 0.5 at precision 1 -> 51 of COCO's 101 recall points, AP = 51/101.
    ap_class0 = (1.0 + 9 * 51 / 101) / 10
    box = validator.metrics.box
    np.testing.assert_allclose(box.ap50, [1.0, 1.0])
    np.testing.assert_allclose(box.all_ap[0], [1.0] + [51 / 101] * 9)
    np.testing.assert_allclose(box.ap, [ap_class0, 1.0])
    assert results["metrics/mAP50(B)"] == pytest.approx(1.0)
    assert results["metrics/mAP50-95(B)"] == pytest.approx((ap_class0 + 1.0) / 2)
    assert results["fitness"] == pytest.approx(0.1 + 0.9 * (ap_class0 + 1.0) / 2)
    assert results["metrics/precision(B)"] == pytest.approx(1.0) and results["metrics/recall(B)"] == pytest.approx(1.0)


def test_plots_are_written_and_json_boxes_equal_the_ground_truth_in_original_pixels(data_yaml, tmp_path):
    save_dir = tmp_path / "val"
    _run_oracle(data_yaml, save_dir, plots=True, save_json=True)

    images = ["val_batch0_labels.jpg", "val_batch0_pred.jpg", "val_batch1_labels.jpg", "val_batch1_pred.jpg"]
    curves = ["PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png", "confusion_matrix.png",
              "confusion_matrix_normalized.png"]  # the matrix as counts and normalised per true class
    for name in images + curves:
        path = save_dir / name
        assert path.is_file() and path.stat().st_size > 0, name
        assert cv2.imread(str(path)) is not None, name

    records = json.loads((save_dir / "predictions.json").read_text())
    gt = _original_gt_boxes(data_yaml)
    assert len(records) == sum(len(boxes) for _, _, _, boxes in IMAGES)
    for stem, (classes, xyxy) in gt.items():
        image_id = int(stem) if stem.isnumeric() else stem
        mine = [r for r in records if r["image_id"] == image_id]
        assert sorted(r["category_id"] for r in mine) == sorted(classes.tolist())
        expected = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1)  # COCO x, y, w, h
        got = np.array(sorted(r["bbox"] for r in mine))
        np.testing.assert_allclose(got, expected[np.lexsort(expected.T[::-1])], atol=2e-3)
        assert all(r["score"] == pytest.approx(0.9) for r in mine)
    assert any(isinstance(r["image_id"], str) for r in records)  # "cat_a" keeps its stem


def test_callbacks_fire_in_order_with_the_validator(data_yaml, tmp_path):
    events = []
    model = OracleModel()

    def recorder(event):
        return lambda validator: events.append((event, validator.batch_i if "batch" in event else None, validator))

    callbacks = [("on_val_batch_start", model.watch)]
    callbacks += [(e, recorder(e)) for e in ("on_val_start", "on_val_batch_start", "on_val_batch_end", "on_val_end")]
    validator = _validator(data_yaml, tmp_path / "val", callbacks)
    validator(model=model)

    assert [(e, i) for e, i, _ in events] == [
        ("on_val_start", None),
        ("on_val_batch_start", 0),
        ("on_val_batch_end", 0),
        ("on_val_batch_start", 1),
        ("on_val_batch_end", 1),
        ("on_val_end", None),
    ]
    assert all(v is validator for _, _, v in events)


def _tiny_model(tiny_model_yaml):
    torch.manual_seed(0)
    model = DetectionModel(tiny_model_yaml, nc=2, verbose=False)
    model.args = get_cfg()
    return model


def _val_loader(data_yaml, batch=4):
    data = check_det_dataset(data_yaml)
    dataset = YOLODataset(
        data["val"], imgsz=IMGSZ, rect=True, batch_size=batch, stride=32, pad=0.5, data=data, workers=0
    )
    return build_dataloader(dataset, batch, 0, shuffle=False)


def test_training_mode_uses_the_ema_and_reports_metrics_then_losses_then_fitness(data_yaml, tmp_path, tiny_model_yaml):
    ema_model = _tiny_model(tiny_model_yaml).train()

    def must_not_run(*args):
        raise AssertionError("the trainer's raw model must not be validated when an EMA exists")

    raw_model = nn.Module()
    raw_model.forward = must_not_run
    trainer = SimpleNamespace(
        ema=SimpleNamespace(module=ema_model),
        model=raw_model,
        device=torch.device("cpu"),
        test_loader=_val_loader(data_yaml),
        amp_dtype=None,
        save_dir=tmp_path / "train",
        epoch=0,
        epochs=5,
        label_loss_items=lambda items, prefix="train": {
            f"{prefix}/{n}": float(v) for n, v in zip(("box_loss", "cls_loss", "dfl_loss"), items)
        },
    )
    args = get_cfg({"plots": True, "workers": 0})
    validator = DetectionValidator(save_dir=None, args=args)
    results = validator(trainer=trainer)

    assert list(results) == [*METRIC_KEYS, "val/box_loss", "val/cls_loss", "val/dfl_loss", "fitness"]
    assert validator.metric_keys() == list(results)[:-1]
    assert all(np.isfinite(v) for v in results.values())
    assert results["val/box_loss"] > 0 and results["val/dfl_loss"] > 0 and results["val/cls_loss"] > 0
    assert ema_model.training  # put back in train mode
    assert not (tmp_path / "train").exists()  # plots only on the final epoch
    assert vars(args) == vars(get_cfg({"plots": True, "workers": 0}))  # the given Args are not mutated


def test_standalone_validation_of_a_checkpoint_path(data_yaml, tmp_path, tiny_model_yaml):
    model = _tiny_model(tiny_model_yaml)
    checkpoint = tmp_path / "best.pt"
    torch.save(
        {"model_yaml": model.yaml, "names": {0: "class0", 1: "class1"}, "ema": model.state_dict(), "model": None},
        checkpoint,
    )
    validator = _validator(data_yaml, tmp_path / "val")
    results = validator(model=str(checkpoint))
    assert list(results) == [*METRIC_KEYS, "fitness"]
    assert validator.model.is_fused() and validator.names == {0: "class0", 1: "class1"}

    torch.save({"ema": model.state_dict()}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="model_yaml"):
        _validator(data_yaml, tmp_path / "val")(model=str(tmp_path / "foreign.pt"))


def test_a_missing_split_is_a_one_line_dataset_error(data_yaml, tmp_path):
    with pytest.raises(DatasetError, match="split='test'"):
        _validator(data_yaml, tmp_path / "val", split="test")(model=OracleModel())
