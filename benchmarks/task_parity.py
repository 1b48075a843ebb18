"""Same pose, segmentation or oriented-box weights, both validators: box and keypoint (or mask) mAP of yolotrain's
validation against the reference's.

    python benchmarks/task_parity.py --task pose --weights REF.pt [--data DATA.yaml] [--imgsz 160] [--batch 16]
    python benchmarks/task_parity.py --task segment --weights REF.pt [--imgsz 160]
    python benchmarks/task_parity.py --task obb --weights REF.pt [--imgsz 160]

REF.pt is a checkpoint of the task written by the reference trainer (Ultralytics, set up with
`../shared/anchor/setup-ultralytics.sh`; `benchmarks/train_speed.py --task pose --keep DIR` leaves one in
DIR/reference/train/weights/best.pt). The reference validates it in its own virtualenv; yolotrain imports the same
file (read without running its pickle code) and validates it with the same settings (conf 0.001, IoU 0.7,
save_json). Both predictions.json files are then scored by pycocotools against the labels: pose by its
`keypoints` evaluation (object area = 0.53 x box area, sigmas 1/K or COCO's for 17 person keypoints, as both
validators use), segmentation by its `segm` evaluation (each label polygon drawn at its image's original size);
pycocotools has no rotated-box evaluation, so oriented boxes are compared by the two validators' own figures (the
reference matches by ProbIoU, yolotrain by the exact IoU).
Prints box and keypoint (mask) mAP50-95 of each validator, pycocotools' figures for both, validation time and
images/s. Default data: the built-in set of the task.
"""

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from val_parity import pycocotools_map  # this folder's scripts: run as `python benchmarks/task_parity.py`

ANCHOR = Path(__file__).resolve().parents[2] / "shared" / "anchor"

REFERENCE_VAL = r"""
import json, sys, time
from ultralytics import YOLO
weights, data, imgsz, batch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
started = time.perf_counter()
metrics = YOLO(weights).val(data=data, imgsz=imgsz, batch=batch, conf=0.001, iou=0.7, device="cpu", workers=2,
                            save_json=True, plots=False, project=out, name="val", exist_ok=True, verbose=False)
part = metrics.pose if hasattr(metrics, "pose") else getattr(metrics, "seg", metrics.box)
print("RESULT " + json.dumps({"box": float(metrics.box.map), "part": float(part.map),
                              "seconds": time.perf_counter() - started, "json": f"{out}/val/predictions.json"}))
"""


def reference_val(weights, data, imgsz, batch, out):
    command = [str(ANCHOR / "ultralytics-python"), "-c", REFERENCE_VAL, str(weights), str(data), str(imgsz),
               str(batch), str(out)]
    answer = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(next(line for line in answer.splitlines() if line.startswith("RESULT "))[7:])


def yolotrain_val(weights, data, imgsz, batch, out, **overrides):
    from yolotrain import YOLO

    started = time.perf_counter()
    metrics = YOLO(str(weights)).val(data=str(data), imgsz=imgsz, batch=batch, conf=0.001, iou=0.7, device="cpu",
                                     workers=2, save_json=True, plots=False, project=str(out), name="val",
                                     exist_ok=True, **overrides)
    part = metrics.pose if hasattr(metrics, "pose") else getattr(metrics, "seg", metrics.box)
    return {"box": metrics.box.map, "part": part.map, "seconds": time.perf_counter() - started,
            "json": str(Path(out) / "val" / "predictions.json")}


def labelled_images(image_files):
    """Per val image: its COCO image entry (the id both validators write) and its label rows (arrays of values)."""
    for image_file in image_files:
        height, width = cv2.imread(str(image_file)).shape[:2]
        image_id = int(image_file.stem) if image_file.stem.isnumeric() else image_file.stem
        label_file = Path(str(image_file.with_suffix(".txt")).replace("/images/", "/labels/"))
        lines = label_file.read_text().split("\n") if label_file.exists() else []
        rows = [np.array(line.split(), np.float64) for line in lines if line.strip()]
        yield {"id": image_id, "width": width, "height": height}, rows


def keypoint_ground_truth(image_files, kpt_shape, nc):
    """The val labels as a COCO keypoint ground truth."""
    count, dims = kpt_shape
    images, annotations = [], []
    for image, rows in labelled_images(image_files):
        images.append(image)
        width, height = image["width"], image["height"]
        for row in rows:
            cls, cx, cy, w, h = row[:5]
            points = row[5:].reshape(count, dims) * ([width, height, 1][:dims])
            if dims == 2:
                points = np.concatenate([points, np.full((count, 1), 2.0)], 1)
            box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": int(cls),
                                "bbox": box, "area": box[2] * box[3] * 0.53, "iscrowd": 0,
                                "keypoints": points.reshape(-1).tolist(),
                                "num_keypoints": int((points[:, 2] > 0).sum())})
    return {"images": images, "annotations": annotations, "categories": [{"id": i} for i in range(nc)]}


def mask_ground_truth(image_files, nc):
    """The val labels as a COCO segmentation ground truth: each polygon drawn at its image's size, as RLE."""
    from yolotrain.utils.masks import mask_to_rle, polygons_to_masks, stack_polygons

    images, annotations = [], []
    for image, rows in labelled_images(image_files):
        images.append(image)
        width, height = image["width"], image["height"]
        for values in rows:
            outline = values[1:].reshape(-1, 2) * (width, height)
            (mask,) = polygons_to_masks(stack_polygons([outline]), (height, width))
            ys, xs = np.nonzero(mask)
            box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": int(values[0]),
                                "segmentation": mask_to_rle(mask), "area": float(mask.sum()), "bbox": box,
                                "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": [{"id": i} for i in range(nc)]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="pose", choices=("pose", "segment", "obb"))
    parser.add_argument("--weights", required=True, help="a checkpoint of the task written by the reference trainer")
    parser.add_argument("--data", help="data yaml (default: the built-in set of the task)")
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--batch", type=int, default=16)
    options = parser.parse_args()
    from yolotrain.data.builtin import builtin_data_yaml_for
    from yolotrain.data.data_yaml import check_det_dataset
    from yolotrain.utils.metrics import keypoint_sigmas

    data = Path(options.data or builtin_data_yaml_for(options.task)).resolve()
    work = Path(tempfile.mkdtemp(prefix=f"yolotrain-{options.task}-parity-"))
    ref = reference_val(Path(options.weights).resolve(), data, options.imgsz, options.batch, work / "ref")
    ours = yolotrain_val(options.weights, data, options.imgsz, options.batch, work / "ours")

    dataset = check_det_dataset(data)
    image_files = sorted(p for p in Path(dataset["val"]).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    ref_coco = our_coco = float("nan")
    if options.task != "obb":
        if options.task == "pose":
            truth = keypoint_ground_truth(image_files, dataset["kpt_shape"], dataset["nc"])
            scoring = ("keypoints", keypoint_sigmas(dataset["kpt_shape"], dataset.get("kpt_sigmas")))
        else:
            truth, scoring = mask_ground_truth(image_files, dataset["nc"]), ("segm", None)
        ref_predictions = json.loads(Path(ref["json"]).read_text())
        if min((p["category_id"] for p in ref_predictions), default=0) >= 1:  # the reference counts classes from 1
            ref_predictions = [{**p, "category_id": p["category_id"] - 1} for p in ref_predictions]
        ref_coco = pycocotools_map(truth, ref_predictions, *scoring)[1]
        our_coco = pycocotools_map(truth, json.loads(Path(ours["json"]).read_text()), *scoring)[1]

    part = {"pose": "pose", "segment": "mask", "obb": "rotated"}[options.task]
    count = len(image_files)
    print(f"data {data} ({count} val images), imgsz {options.imgsz}, batch {options.batch}, weights {options.weights}")
    print(f"{'':15s} {'box mAP50-95':>10s} {part + ' mAP50-95':>14s} {'pycocotools':>12s} {'val s':>7s} {'img/s':>7s}")
    rows = [("reference", ref, ref_coco), ("yolotrain", ours, our_coco)]
    if options.task == "obb":  # matched as the reference matches, to tell the IoU apart from everything else
        matched_as_reference = yolotrain_val(options.weights, data, options.imgsz, options.batch, work / "probiou",
                                             obb_iou="probiou")
        rows.append(("obb_iou=probiou", matched_as_reference, float("nan")))
    for name, result, coco in rows:
        print(f"{name:15s} {result['box']:10.4f} {result['part']:14.4f} {coco:12.4f} {result['seconds']:7.2f} "
              f"{count / result['seconds']:7.1f}")
    goal = 0.02 if options.task == "obb" else 0.01  # the two validators' rotated IoUs differ
    print(f"{part} mAP50-95 yolotrain - reference: {ours['part'] - ref['part']:+.4f} (goal within {goal}); "
          f"validation speed yolotrain / reference: {ref['seconds'] / ours['seconds']:.2f}x")


if __name__ == "__main__":
    main()
