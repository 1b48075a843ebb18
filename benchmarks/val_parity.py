"""Same weights, both validators: mAP and speed of yolotrain's validation against the reference trainer's.

    python benchmarks/val_parity.py --weights REF.pt [--data DATA.yaml] [--imgsz 224] [--batch 16]
    python benchmarks/val_parity.py --train-reference 15 [--data DATA.yaml] [--imgsz 224]   # make REF.pt first

REF.pt is a YOLOv8n detection checkpoint written by the reference trainer (Ultralytics, set up with
`../shared/anchor/setup-ultralytics.sh`; `--train-reference N` trains one for N epochs from yolov8n.yaml). The
reference side runs in its own virtualenv through `../shared/anchor/ultralytics-python`: it validates REF.pt and
writes the EMA weights as a plain state dict. yolotrain loads those weights key for key into yolo-n.yaml, saves a
yolotrain checkpoint and validates it with `YOLO(checkpoint).val()` on the same data and settings (conf 0.001, IoU 0.7,
save_json), each timed over its whole `val()` call. Both predictions.json files are then scored by pycocotools against the labels. Prints mAP50 and
mAP50-95 of each validator, pycocotools' figures for both, validation wall time and images/s, and the ratios.
Default data: the built-in shapes dataset.
"""

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ANCHOR = Path(__file__).resolve().parents[2] / "shared" / "anchor"

# Runs inside the reference trainer's virtualenv: validate, then dump the weights as plain tensors.
REFERENCE_VAL = r"""
import json, sys, time
import torch
from ultralytics import YOLO
weights, data, imgsz, batch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
model = YOLO(weights)
started = time.perf_counter()
metrics = model.val(data=data, imgsz=imgsz, batch=batch, conf=0.001, iou=0.7, device="cpu", workers=2,
                    save_json=True, plots=False, project=out, name="val", exist_ok=True, verbose=False)
seconds = time.perf_counter() - started
checkpoint = torch.load(weights, map_location="cpu", weights_only=False)
network = (checkpoint.get("ema") or checkpoint["model"]).float()
torch.save({k: v.clone() for k, v in network.state_dict().items()}, f"{out}/state_dict.pt")
print("RESULT " + json.dumps({
    "map50": float(metrics.box.map50), "map": float(metrics.box.map), "seconds": seconds,
    "names": {int(k): v for k, v in network.names.items()}, "json": f"{out}/val/predictions.json",
}))
"""

REFERENCE_TRAIN = r"""
import sys
from ultralytics import YOLO
data, epochs, imgsz, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
YOLO("yolov8n.yaml").train(data=data, epochs=epochs, imgsz=imgsz, batch=16, workers=2, device="cpu", amp=False,
                           plots=False, seed=0, project=out, name="train", exist_ok=True, verbose=False)
"""


def reference(script, *args):
    """Run `script` with the reference trainer's python; return its stdout."""
    command = [str(ANCHOR / "ultralytics-python"), "-c", script, *map(str, args)]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def label_rows(label_file):
    """(n, 5) cls, cx, cy, w, h normalised; empty when the file is missing or empty."""
    if not label_file.exists() or not label_file.read_text().strip():
        return np.zeros((0, 5))
    return np.loadtxt(label_file, ndmin=2)


def coco_ground_truth(image_files, names):
    """The val split's labels as a COCO ground-truth dict (image ids as the validators write them)."""
    images, annotations = [], []
    for image_file in image_files:
        height, width = cv2.imread(str(image_file)).shape[:2]
        stem = image_file.stem
        image_id = int(stem) if stem.isnumeric() else stem
        images.append({"id": image_id, "width": width, "height": height})
        label_file = Path(str(image_file.with_suffix(".txt")).replace("/images/", "/labels/"))
        for cls, cx, cy, w, h in label_rows(label_file):
            box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cls),
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    categories = [{"id": i, "name": name} for i, name in names.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def pycocotools_map(ground_truth, predictions, iou_type="bbox", keypoint_sigmas=None):
    """(mAP50, mAP50-95) of a COCO results list against a COCO ground-truth dict, by `iou_type` ("bbox", or
    "keypoints" with the per-keypoint OKS `keypoint_sigmas`)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(predictions), iou_type)
        if keypoint_sigmas is not None:
            evaluation.params.kpt_oks_sigmas = keypoint_sigmas
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[1]), float(evaluation.stats[0])


def yolotrain_checkpoint(state_dict, names, path):
    """The reference's weights in yolo-n.yaml, key for key, saved as a yolotrain checkpoint."""
    from yolotrain.nn.model import DetectionModel, load_model_yaml
    from yolotrain.utils.checkpoint import save_checkpoint

    model_yaml = load_model_yaml("yolo-n.yaml")
    model = DetectionModel.from_yaml_and_state(model_yaml, state_dict, nc=len(names))  # raises on any mismatch
    save_checkpoint({"epoch": -1, "model": model.state_dict(), "ema": None, "model_yaml": model.yaml,
                     "names": names, "nc": len(names)}, path)


def yolotrain_val(checkpoint, data, imgsz, batch, out):
    """(mAP50, mAP50-95, seconds, predictions.json) of yolotrain's validation of the checkpoint, timed like the
    reference's: the whole `val()` call, in process."""
    from yolotrain import YOLO

    started = time.perf_counter()
    metrics = YOLO(str(checkpoint)).val(data=str(data), imgsz=imgsz, batch=batch, conf=0.001, iou=0.7, device="cpu",
                                        workers=2, save_json=True, plots=False, project=str(out), name="val",
                                        exist_ok=True)
    seconds = time.perf_counter() - started
    predictions = Path(out) / "val" / "predictions.json"
    return metrics["metrics/mAP50(B)"], metrics["metrics/mAP50-95(B)"], seconds, predictions


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", help="a detection checkpoint written by the reference trainer")
    parser.add_argument("--train-reference", type=int, metavar="EPOCHS", help="train REF.pt first")
    parser.add_argument("--data", help="data yaml (default: the built-in shapes dataset)")
    parser.add_argument("--imgsz", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    options = parser.parse_args()
    from yolotrain.data.builtin import builtin_data_yaml
    from yolotrain.data.data_yaml import check_det_dataset

    data = Path(options.data or builtin_data_yaml()).resolve()
    work = Path(tempfile.mkdtemp(prefix="yolotrain-parity-"))
    weights = options.weights
    if options.train_reference:
        reference(REFERENCE_TRAIN, data, options.train_reference, options.imgsz, work / "ref-train")
        weights = work / "ref-train" / "train" / "weights" / "best.pt"
        print(f"reference checkpoint: {weights}")
    if not weights:
        parser.error("give --weights REF.pt or --train-reference EPOCHS")

    answer = reference(REFERENCE_VAL, Path(weights).resolve(), data, options.imgsz, options.batch, work / "ref")
    ref = json.loads(next(line for line in answer.splitlines() if line.startswith("RESULT "))[7:])
    names = {int(k): v for k, v in ref["names"].items()}
    state_dict = torch.load(work / "ref" / "state_dict.pt", weights_only=True)
    yolotrain_checkpoint(state_dict, names, work / "weights.pt")
    ours = yolotrain_val(work / "weights.pt", data, options.imgsz, options.batch, work / "ours")

    dataset = check_det_dataset(data)
    image_files = sorted(p for p in Path(dataset["val"]).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    ground_truth = coco_ground_truth(image_files, names)
    ref_json = Path(ref["json"])  # not written when the reference found nothing to save
    ref_predictions = json.loads(ref_json.read_text()) if ref_json.exists() else []
    if min((p["category_id"] for p in ref_predictions), default=0) >= 1:  # the reference counts classes from 1
        ref_predictions = [{**p, "category_id": p["category_id"] - 1} for p in ref_predictions]
    ref_coco = pycocotools_map(ground_truth, ref_predictions)
    our_coco = pycocotools_map(ground_truth, json.loads(ours[3].read_text()))

    count = len(image_files)
    print(f"data {data} ({count} val images), imgsz {options.imgsz}, batch {options.batch}, weights {weights}")
    print(f"{'':22s} {'mAP50':>8s} {'mAP50-95':>9s} {'coco mAP50':>11s} {'coco mAP50-95':>14s} {'val s':>7s} {'img/s':>7s}")
    print(f"{'reference':22s} {ref['map50']:8.4f} {ref['map']:9.4f} {ref_coco[0]:11.4f} {ref_coco[1]:14.4f} "
          f"{ref['seconds']:7.2f} {count / ref['seconds']:7.1f}")
    print(f"{'yolotrain':22s} {ours[0]:8.4f} {ours[1]:9.4f} {our_coco[0]:11.4f} {our_coco[1]:14.4f} "
          f"{ours[2]:7.2f} {count / ours[2]:7.1f}")
    print(f"mAP50-95 yolotrain - reference: {ours[1] - ref['map']:+.4f} (goal >= -0.002); "
          f"validation speed yolotrain / reference: {ref['seconds'] / ours[2]:.2f}x")


if __name__ == "__main__":
    main()
