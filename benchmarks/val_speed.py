"""Validation speed of yolotrain against the reference trainer on the same weights and images.

    python benchmarks/val_speed.py --weights REF.pt [--data DATA.yaml] [--imgsz 320] [--batch 16] [--repeats 3]
                                   [--half] [--workers 2]

REF.pt is a detection checkpoint written by the reference trainer (Ultralytics, set up with
`../shared/anchor/setup-ultralytics.sh`); yolotrain reads it directly (`yolotrain.utils.foreign`). Each repeat runs
the reference's `model.val(...)` in its own virtualenv (through `../shared/anchor/ultralytics-python`), then
yolotrain's `DetectionValidator(...)(model=REF.pt)` in this process, both with conf 0.001, IoU 0.7, no plots, on
the CPU, each timed over its whole call (data set, model loading and fusing, every batch, metrics). The best time of
`--repeats` is kept on each side, so that a burst of other work on the machine does not decide the ratio.
Prints images/s of both validators, the ratio, their mAP50 / mAP50-95 and per-stage milliseconds per image.
The reference runs inference on (CPUs - 1) threads, yolotrain on torch's default (one per core) unless
`--threads` says otherwise: on a machine shared with other work, compare both with `--threads` equal to the
reference's count too.
`--half` asks both for half-precision inference (the reference ignores it on the CPU; yolotrain runs bf16 there
when the CPU computes bf16 natively). Default data: COCO128 from ../shared/datasets, else the built-in dataset.
"""

import argparse
import json
import subprocess
import time
from pathlib import Path

ANCHOR = Path(__file__).resolve().parents[2] / "shared" / "anchor"
COCO128 = ANCHOR.parent / "datasets" / "coco128" / "data.yaml"

# Runs inside the reference trainer's virtualenv: one timed validation, its figures as one JSON line.
REFERENCE_VAL = r"""
import json, sys, time
from ultralytics import YOLO
weights, data, imgsz, batch, workers, half = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
model = YOLO(weights)
started = time.perf_counter()
metrics = model.val(data=data, imgsz=imgsz, batch=batch, conf=0.001, iou=0.7, device="cpu", workers=workers, half=half,
                    plots=False, save_json=False, verbose=False, project="/tmp/yolotrain-val-speed", name="ref", exist_ok=True)
seconds = time.perf_counter() - started
print("RESULT " + json.dumps({"seconds": seconds, "map50": float(metrics.box.map50), "map": float(metrics.box.map),
                              "speed": {k: float(v) for k, v in metrics.speed.items()}, "images": int(metrics.seen) if hasattr(metrics, "seen") else None}))
"""


def reference_run(weights, data, options):
    command = [str(ANCHOR / "ultralytics-python"), "-c", REFERENCE_VAL, str(weights), str(data), str(options.imgsz),
               str(options.batch), str(options.workers), "1" if options.half else "0"]  # fmt: skip
    answer = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(next(line for line in answer.splitlines() if line.startswith("RESULT "))[7:])


def yolotrain_run(weights, data, options):
    from yolotrain.tasks.detect.val import DetectionValidator

    args = {"data": str(data), "imgsz": options.imgsz, "batch": options.batch, "conf": 0.001, "iou": 0.7,
            "device": "cpu", "workers": options.workers, "half": options.half, "plots": False}  # fmt: skip
    validator = DetectionValidator(save_dir="/tmp/yolotrain-val-speed/ours", args=args)
    started = time.perf_counter()
    metrics = validator(model=str(weights))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "map50": metrics["metrics/mAP50(B)"], "map": metrics["metrics/mAP50-95(B)"],
            "speed": dict(validator.speed), "images": validator.seen}  # fmt: skip


def torch_threads():
    import torch

    return torch.get_num_threads()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="a detection checkpoint written by the reference trainer")
    parser.add_argument("--data", help="data yaml (default: COCO128 when present, else the built-in dataset)")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--half", action="store_true")
    parser.add_argument("--threads", type=int, help="torch intra-op threads of yolotrain (default: torch's own; "
                        "the reference uses CPUs - 1)")
    options = parser.parse_args()
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    if options.data:
        data = Path(options.data).resolve()
    elif COCO128.is_file():
        data = COCO128
    else:
        from yolotrain.data.builtin import builtin_data_yaml

        data = Path(builtin_data_yaml())
    weights = Path(options.weights).resolve()

    runs = {"reference": [], "yolotrain": []}
    for repeat in range(options.repeats):  # interleaved, so both sides see the same background load
        runs["reference"].append(reference_run(weights, data, options))
        runs["yolotrain"].append(yolotrain_run(weights, data, options))
        print(f"repeat {repeat + 1}: reference {runs['reference'][-1]['seconds']:.2f} s, "
              f"yolotrain {runs['yolotrain'][-1]['seconds']:.2f} s", flush=True)
    best = {side: min(results, key=lambda r: r["seconds"]) for side, results in runs.items()}
    images = best["yolotrain"]["images"]

    print(f"data {data} ({images} images), imgsz {options.imgsz}, batch {options.batch}, workers {options.workers}, "
          f"half {options.half}, threads {torch_threads()}, weights {weights}, best of {options.repeats}")
    print(f"{'':10s} {'val s':>7s} {'img/s':>7s} {'mAP50':>8s} {'mAP50-95':>9s}   ms/image per stage")
    for side, result in best.items():
        stages = ", ".join(f"{stage} {ms:.1f}" for stage, ms in result["speed"].items() if stage != "loss")
        print(f"{side:10s} {result['seconds']:7.2f} {images / result['seconds']:7.1f} {result['map50']:8.4f} "
              f"{result['map']:9.4f}   {stages}")
    ratio = best["reference"]["seconds"] / best["yolotrain"]["seconds"]
    print(f"validation speed yolotrain / reference: {ratio:.2f}x; "
          f"mAP50-95 yolotrain - reference: {best['yolotrain']['map'] - best['reference']['map']:+.4f}")


if __name__ == "__main__":
    main()
