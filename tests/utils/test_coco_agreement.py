"""Our mAP against pycocotools on a synthetic labelled set, plus hand-computed cases."""

import contextlib
import io

import numpy as np
import pytest
import torch

from yolotrain.utils.boxes import box_iou
from yolotrain.utils.metrics import ap_per_class, coco_iou_thresholds, match_predictions

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402


def make_dataset(seed, num_images=30, num_classes=4, image_size=320):
    """Per image: gt (m, 5) class + xyxy, preds (n, 6) xyxy + conf + class; imperfect on purpose."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num_images):
        num_gt = rng.integers(0, 9)
        top_left = rng.uniform(0, image_size * 0.7, (num_gt, 2))
        size = rng.uniform(8, image_size * 0.3, (num_gt, 2))
        gt_boxes = np.concatenate([top_left, top_left + size], 1)
        gt_cls = rng.integers(0, num_classes, num_gt)
        found = rng.random(num_gt) < 0.8  # some ground truths are missed
        jitter = rng.normal(0, 0.08, (num_gt, 4)) * np.concatenate([size, size], 1)
        pred_boxes = (gt_boxes + jitter)[found]
        pred_cls = np.where(rng.random(num_gt) < 0.85, gt_cls, rng.integers(0, num_classes, num_gt))[found]
        duplicates = rng.integers(0, max(len(pred_boxes), 1), rng.integers(0, 3)) if len(pred_boxes) else []
        dup_boxes = pred_boxes[duplicates] + rng.normal(0, 4, (len(duplicates), 4))
        num_fp = rng.integers(0, 6)
        fp_top_left = rng.uniform(0, image_size * 0.8, (num_fp, 2))
        fp_boxes = np.concatenate([fp_top_left, fp_top_left + rng.uniform(6, 60, (num_fp, 2))], 1)
        boxes = np.concatenate([pred_boxes, dup_boxes, fp_boxes])
        classes = np.concatenate([pred_cls, pred_cls[duplicates], rng.integers(0, num_classes, num_fp)])
        conf = rng.uniform(0.01, 1.0, len(boxes))
        # Boxes must stay valid (positive size) for both implementations.
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        gt = np.concatenate([gt_cls[:, None], gt_boxes], 1)
        images.append((gt, np.concatenate([boxes, conf[:, None], classes[:, None]], 1)))
    return images


def ours_map(images):
    """(mAP50, mAP50-95) from match_predictions + ap_per_class, images processed in order."""
    iouv = coco_iou_thresholds()
    stats = []
    for gt, preds in images:
        gt, preds = torch.as_tensor(gt, dtype=torch.float32), torch.as_tensor(preds, dtype=torch.float32)
        iou = box_iou(gt[:, 1:], preds[:, :4])  # (M, N)
        tp = match_predictions(preds[:, 5], gt[:, 0], iou, iouv, pred_conf=preds[:, 4])
        stats.append((tp, preds[:, 4], preds[:, 5], gt[:, 0]))
    tp, conf, pred_cls, target_cls = (torch.cat(column) for column in zip(*stats))
    result = ap_per_class(tp, conf, pred_cls, target_cls)
    return result.all_ap[:, 0].mean(), result.all_ap.mean()


def pycocotools_map(images, max_dets=(1, 10, 100)):
    """(mAP50, mAP50-95) from COCOeval for area range "all" and the largest maxDets."""
    categories, annotations, detections = set(), [], []
    for image_id, (gt, preds) in enumerate(images, start=1):
        for cls, x1, y1, x2, y2 in gt.tolist():
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cls) + 1,
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            )  # fmt: skip
            categories.add(int(cls) + 1)
        for x1, y1, x2, y2, conf, cls in preds.tolist():
            detections.append(
                {"image_id": image_id, "category_id": int(cls) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": conf}
            )
            categories.add(int(cls) + 1)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": [{"id": i, "width": 640, "height": 640} for i in range(1, len(images) + 1)],
            "annotations": annotations,
            "categories": [{"id": c, "name": str(c)} for c in sorted(categories)],
        }
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections) if detections else COCO()
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.maxDets = list(max_dets)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[1], evaluator.stats[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_agrees_with_pycocotools(seed):
    images = make_dataset(seed)
    assert max(len(preds) for _, preds in images) <= 100  # pycocotools' per-image cap never binds
    ours50, ours = ours_map(images)
    coco50, coco = pycocotools_map(images)
    assert 0.05 < coco < 0.95  # a discriminating case, not a trivial 0 or 1
    # Same matching and accumulation as pycocotools, so they agree to float rounding (the brief's bound is 0.002;
    # a tighter one catches off-by-one recall sampling, which moves mAP by only ~1e-4).
    assert ours50 == pytest.approx(coco50, abs=1e-6)
    assert ours == pytest.approx(coco, abs=1e-6)


def test_perfect_predictions_give_map_one():
    images = [(gt, np.concatenate([gt[:, 1:], np.full((len(gt), 1), 0.9), gt[:, :1]], 1)) for gt, _ in make_dataset(3)]
    assert ours_map(images) == pytest.approx((1.0, 1.0))


def test_no_predictions_give_map_zero():
    images = [(gt, np.zeros((0, 6))) for gt, _ in make_dataset(4)]
    assert ours_map(images) == (0.0, 0.0)


def test_two_class_hand_example():
    # Class 0, two gts, three predictions in confidence order: hit (IoU 1), miss, hit (IoU 1).
    #   recall 0.5, 0.5, 1.0; precision 1, 1/2, 2/3; envelope 1, 2/3, 2/3.
    #   101-point AP: recall thresholds 0.00..0.50 (51 points) read 1, 0.51..1.00 (50 points) read 2/3
    #   -> AP = (51 + 50 * 2/3) / 101 = 0.834983 at every IoU threshold.
    # Class 1, one gt, one prediction with IoU 0.62: a hit at thresholds 0.50, 0.55, 0.60 only
    #   -> AP50 = 1, AP50-95 = 3/10.
    # mAP50 = (0.834983 + 1) / 2 = 0.917492; mAP50-95 = (0.834983 + 0.3) / 2 = 0.567492.
    gt_image1 = np.array([[0, 0, 0, 10, 10], [1, 50, 50, 60, 60]], dtype=np.float64)
    preds_image1 = np.array([[0, 0, 10, 10, 0.9, 0], [100, 100, 110, 110, 0.8, 0], [50, 50, 60, 56.2, 0.95, 1]])
    gt_image2 = np.array([[0, 20, 20, 40, 40]], dtype=np.float64)
    preds_image2 = np.array([[20, 20, 40, 40, 0.7, 0]])
    images = [(gt_image1, preds_image1), (gt_image2, preds_image2)]
    class0_ap = (51 + 50 * 2 / 3) / 101
    expected = ((class0_ap + 1) / 2, (class0_ap + 0.3) / 2)
    assert ours_map(images) == pytest.approx(expected, abs=1e-6)
    assert pycocotools_map(images) == pytest.approx(expected, abs=1e-6)
