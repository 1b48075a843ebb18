"""Time our matching + AP against pycocotools' evaluate() + accumulate() on the same synthetic detections.

    python benchmarks/metrics_vs_pycocotools.py [--images 5000] [--dets 100] [--classes 80] [--chunk 256]

Ours: images padded into chunks, IoU and greedy matching computed batched per chunk (as the validator does per
batch), then one `ap_per_class` over everything. Prints both times, the ratio and both mAP values.
"""

import argparse
import contextlib
import io
import time

import numpy as np
import torch

from yolotrain.utils.boxes import box_area
from yolotrain.utils.metrics import ap_per_class, coco_iou_thresholds, match_predictions


def make_data(num_images, dets_per_image, num_classes, seed=0, image_size=640):
    """Padded arrays: gt (I, Mmax, 5) cls+xyxy with cls -1 padding, preds (I, D, 6) xyxy+conf+cls, gt counts."""
    rng = np.random.default_rng(seed)
    gt_counts = rng.integers(5, 16, num_images)  # ~10 per image
    max_gt = gt_counts.max()
    top_left = rng.uniform(0, image_size * 0.75, (num_images, max_gt, 2))
    size = rng.uniform(10, image_size * 0.25, (num_images, max_gt, 2))
    gt = np.concatenate([rng.integers(0, num_classes, (num_images, max_gt, 1)), top_left, top_left + size], 2)
    gt[np.arange(max_gt)[None, :] >= gt_counts[:, None], 0] = -1
    # Detections: 60% jittered copies of random gts of the image (some with a wrong class), 40% random boxes.
    source = (rng.random((num_images, dets_per_image)) * gt_counts[:, None]).astype(int)
    copied = np.take_along_axis(gt, source[..., None], 1)
    jitter = rng.normal(0, 0.1, (num_images, dets_per_image, 4)) * np.tile(copied[..., 3:5] - copied[..., 1:3], 2)
    boxes = copied[..., 1:] + jitter
    cls = np.where(rng.random((num_images, dets_per_image)) < 0.9, copied[..., 0], rng.integers(0, num_classes))
    random_det = rng.random((num_images, dets_per_image)) < 0.4
    random_top_left = rng.uniform(0, image_size * 0.8, (num_images, dets_per_image, 2))
    random_boxes = np.concatenate([random_top_left, random_top_left + rng.uniform(8, 120, random_top_left.shape)], 2)
    boxes = np.where(random_det[..., None], random_boxes, boxes)
    cls = np.where(random_det, rng.integers(0, num_classes, random_det.shape), cls)
    boxes[..., 2:] = np.maximum(boxes[..., 2:], boxes[..., :2] + 1)
    conf = rng.uniform(0.001, 1.0, (num_images, dets_per_image))
    order = np.argsort(-conf, 1, kind="stable")  # NMS output order: descending confidence per image
    preds = np.concatenate([boxes, conf[..., None], cls[..., None]], 2)
    return gt, np.take_along_axis(preds, order[..., None], 1), gt_counts


def padded_box_iou(boxes1, boxes2, eps=1e-7):
    """(B, M, 4) x (B, N, 4) xyxy -> (B, M, N), same formula as utils.boxes.box_iou."""
    top_left = torch.max(boxes1[:, :, None, :2], boxes2[:, None, :, :2])
    bottom_right = torch.min(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])
    inter = (bottom_right - top_left).clamp(0).prod(-1)
    union = box_area(boxes1)[:, :, None] + box_area(boxes2)[:, None, :] - inter
    return inter / (union + eps)


def ours(gt, preds, chunk):
    """(mAP50, mAP50-95) with batched matching over chunks of images."""
    gt, preds = torch.as_tensor(gt, dtype=torch.float32), torch.as_tensor(preds, dtype=torch.float32)
    iouv = coco_iou_thresholds()
    tps = []
    for start in range(0, len(gt), chunk):  # one chunk ~ one validation batch
        gt_chunk, pred_chunk = gt[start : start + chunk], preds[start : start + chunk]
        iou = padded_box_iou(gt_chunk[..., 1:], pred_chunk[..., :4])
        tps.append(match_predictions(pred_chunk[..., 5], gt_chunk[..., 0], iou, iouv).reshape(-1, len(iouv)))
    target_cls = gt[..., 0][gt[..., 0] >= 0]
    result = ap_per_class(torch.cat(tps), preds[..., 4].reshape(-1), preds[..., 5].reshape(-1), target_cls)
    return result.all_ap[:, 0].mean(), result.all_ap.mean()


def pycocotools_inputs(gt, preds, gt_counts):
    """COCO ground-truth dict and detection list (1-based ids, xywh boxes)."""
    annotations, detections = [], []
    for image in range(len(gt)):
        for cls, x1, y1, x2, y2 in gt[image, : gt_counts[image]].tolist():
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image + 1, "category_id": int(cls) + 1,
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            )  # fmt: skip
        for x1, y1, x2, y2, conf, cls in preds[image].tolist():
            detections.append(
                {"image_id": image + 1, "category_id": int(cls) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": conf}
            )
    num_classes = int(max(gt[..., 0].max(), preds[..., 5].max())) + 1
    dataset = {
        "images": [{"id": i + 1, "width": 640, "height": 640} for i in range(len(gt))],
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
    }
    return dataset, detections


def run_pycocotools(dataset, detections):
    """(mAP50, mAP50-95, seconds of evaluate() + accumulate())."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.maxDets = [1, 10, 100]
        start = time.perf_counter()
        evaluator.evaluate()
        evaluator.accumulate()
        seconds = time.perf_counter() - start
        evaluator.summarize()
    return evaluator.stats[1], evaluator.stats[0], seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--chunk", type=int, default=256, help="images matched per batched call")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for our side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gt, preds, gt_counts = make_data(args.images, args.dets, args.classes)
    print(f"{args.images} images, {args.dets} detections each, {gt_counts.sum()} ground truths, {args.classes} classes")

    start = time.perf_counter()
    ours50, ours5095 = ours(gt, preds, args.chunk)
    ours_seconds = time.perf_counter() - start
    coco50, coco5095, coco_seconds = run_pycocotools(*pycocotools_inputs(gt, preds, gt_counts))

    print(f"ours        match + ap_per_class : {ours_seconds:8.2f} s   mAP50 {ours50:.6f}  mAP50-95 {ours5095:.6f}")
    print(f"pycocotools evaluate + accumulate: {coco_seconds:8.2f} s   mAP50 {coco50:.6f}  mAP50-95 {coco5095:.6f}")
    print(f"speed-up {coco_seconds / ours_seconds:.1f}x   |d mAP50| {abs(ours50 - coco50):.2e}   "
          f"|d mAP50-95| {abs(ours5095 - coco5095):.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
