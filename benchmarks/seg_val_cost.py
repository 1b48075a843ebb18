"""What comparing masks at each image's original size costs a segmentation validation.

    python benchmarks/seg_val_cost.py [--weights best.pt] [--imgsz 640] [--batch 16] [--images 128]

Validates on COCO128's val images (real 640-pixel photographs, 0-60 objects each) with polygon labels made from
their boxes (the ellipse inscribed in each box: COCO128 ships boxes only), at conf 0.001 (0 for an untrained model, whose scores
are all below that) so every image keeps up to 300 detections, each with a mask. Times the whole validation and the part spent making the detections' and labels'
masks at the original size and matching them (`SegmentationValidator.part_stats`), and prints that share: the
most a comparison at a reduced size could save. Without --weights an untrained yolo11n-seg runs (its 300 low-score
detections an image are the worst case for the mask work).
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

COCO128 = Path("/work/shared/datasets/coco128")
ELLIPSE_POINTS = 32


def ellipse_dataset(out, images):
    """COCO128 val images (linked) with each box's inscribed ellipse as its polygon label; returns the data yaml."""
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    angles = np.linspace(0, 2 * np.pi, ELLIPSE_POINTS, endpoint=False)
    for image in sorted((COCO128 / "images" / "val2017").glob("*.jpg"))[:images]:
        (out / "images" / image.name).symlink_to(image)
        label = COCO128 / "labels" / "val2017" / f"{image.stem}.txt"
        rows = np.loadtxt(label, ndmin=2) if label.exists() and label.read_text().strip() else np.zeros((0, 5))
        cx, cy, w, h = (rows[:, i : i + 1] for i in range(1, 5))
        xs, ys = cx + w / 2 * np.cos(angles), cy + h / 2 * np.sin(angles)  # (n, P) each
        outline = np.stack([xs, ys], -1).clip(0, 1).reshape(len(rows), -1)
        lines = [f"{int(c)} " + " ".join(f"{v:.5f}" for v in points) for c, points in zip(rows[:, 0], outline)]
        (out / "labels" / f"{image.stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    names = (COCO128 / "data.yaml").read_text().split("names:", 1)[1]
    (out / "data.yaml").write_text(f"path: {out}\ntrain: images\nval: images\nnames:{names}")
    return out / "data.yaml"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="yolo11n-seg.yaml", help="a segmentation checkpoint (or model yaml)")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=128)
    options = parser.parse_args()
    from yolotrain import YOLO
    from yolotrain.tasks.segment.val import SegmentationValidator

    conf = 0.0 if options.weights.endswith(".yaml") else 0.001  # an untrained model scores everything below 0.001
    spent = {"masks": 0.0, "detections": 0}
    original = SegmentationValidator.part_stats

    def timed(self, labels, batch):
        started = time.perf_counter()
        result = original(self, labels, batch)
        spent["masks"] += time.perf_counter() - started
        spent["detections"] += len(labels.detections)
        return result

    SegmentationValidator.part_stats = timed
    with tempfile.TemporaryDirectory(prefix="seg_val_cost_") as tmp:
        data = ellipse_dataset(Path(tmp) / "data", options.images)
        model = YOLO(options.weights)
        model.val(data=str(data), imgsz=options.imgsz, batch=options.batch, conf=conf, plots=False, device="cpu",
                  workers=2, project=tmp, name="warmup", max_det=300, fraction=min(options.batch, options.images))
        spent.update(masks=0.0, detections=0)
        started = time.perf_counter()
        model.val(data=str(data), imgsz=options.imgsz, batch=options.batch, conf=conf, plots=False, device="cpu",
                  workers=2, project=tmp, name="val", max_det=300)
        total = time.perf_counter() - started
    print(f"{options.weights}, {options.images} COCO128 val images at imgsz {options.imgsz}, batch {options.batch}: "
          f"{spent['detections']} detections")
    print(f"validation {total:.1f} s ({options.images / total:.1f} img/s); masks at original size and their "
          f"matching {spent['masks']:.1f} s = {spent['masks'] / total:.0%} of it")


if __name__ == "__main__":
    main()
