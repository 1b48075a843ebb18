"""Training speed: yolotrain against the reference trainer (Ultralytics) on the same data and settings, and both
against the compute floor of the model (forward + backward + optimizer step on random input, no data, no loss).

    python benchmarks/train_speed.py --epochs 3 --imgsz 320              # COCO128, yolo-n vs yolov8n, CPU
    python benchmarks/train_speed.py --device 0 --amp --batch 64         # on a GPU, mixed precision
    python benchmarks/train_speed.py --skip-reference                    # yolotrain and the floor only
    python benchmarks/train_speed.py --keep runs/speed                   # keep both runs (last.pt, results.csv)
    python benchmarks/train_speed.py --set nbs=8 --set mosaic=0          # more arguments, the same for both
    python benchmarks/train_speed.py --task pose --model yolo11n-pose.yaml --reference-model yolo11n-pose.yaml \
        --imgsz 160 --batch 8          # pose, on the built-in pose set unless --data names one
    python benchmarks/train_speed.py --task segment --model yolo11n-seg.yaml --reference-model yolo11n-seg.yaml \
        --imgsz 160 --batch 8          # segmentation, on the built-in segmentation set unless --data names one
    python benchmarks/train_speed.py --task obb --model yolo11n-obb.yaml --reference-model yolo11n-obb.yaml \
        --imgsz 160 --batch 8          # oriented boxes (the box figures are the rotated boxes')

Each trainer runs in its own subprocess, one after the other, with run folders in a temporary directory; the
reference twice: at its default (it sets OMP_NUM_THREADS=1 for itself) and with as many threads as yolotrain's
budget, and the ratios are against the faster of the two. Printed:
train images/s (epoch time only), validation images/s (every validation, the final one included), wall time,
peak RSS (main process plus its data workers), final mAP50 and mAP50-95 (of the boxes; for pose also of the
keypoints, for segmentation of the masks), and the ratios. The reference runs with
`/work/shared/anchor/ultralytics-python` (see setup-ultralytics.sh there) or `--reference-python`.
The compute floor is measured in its own process before the trainers and after them (the faster is taken), and in
yolotrain's process before and after each epoch (the data workers idle), each epoch's speed then compared with the
mean of the two (a shared machine's speed drifts by a third within minutes). yolotrain's wall time leaves those
floor steps out.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

DEFAULT_DATA = "/work/shared/datasets/coco128/data.yaml"
DEFAULT_REFERENCE_PYTHON = "/work/shared/anchor/ultralytics-python"
RESULT_PREFIX = "RESULT "

# Shared by both child scripts: timing callbacks on the trainer (the validator shares its callbacks) and the
# peak RSS of the process and its finished children (the data workers).
_TIMING = textwrap.dedent(
    """
    import json, resource, sys, time
    marks = {"train": 0.0, "val": 0.0, "val_runs": 0, "t": {}}
    def start(kind):
        return lambda obj: marks["t"].__setitem__(kind, time.perf_counter())
    def stop(kind):
        def fn(obj):
            marks[kind] += time.perf_counter() - marks["t"].pop(kind, time.perf_counter())
            if kind == "val":
                marks["val_runs"] += 1
        return fn
    def peak_rss_mb():
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return (own + children) / 1024
    def report(wall, trainer, metrics, extra=None):
        train_images = len(trainer.train_loader.dataset) * trainer.epochs
        val_images = len(trainer.test_loader.dataset) * marks["val_runs"]
        print("RESULT " + json.dumps({**(extra or {}),
            "wall_s": wall, "train_s": marks["train"], "val_s": marks["val"],
            "train_images": train_images, "val_images": val_images, "peak_rss_mb": peak_rss_mb(),
            "map50": float(metrics.get("metrics/mAP50(B)", float("nan"))),
            "map50_95": float(metrics.get("metrics/mAP50-95(B)", float("nan"))),
            "part_map50_95": float(metrics.get("metrics/mAP50-95(P)", metrics.get("metrics/mAP50-95(M)", float("nan")))),
        }), flush=True)
    """
)

# The compute floor: forward + backward + optimizer step of the model on random input (no data, no loss, no
# assignment). Shared by the floor's own child and the yolotrain child, which measures it again before and after
# each epoch (the data workers are idle then), so that each epoch is compared with the machine as it was at that
# moment: a shared machine's speed drifts by a third and more within minutes.
_FLOOR = textwrap.dedent(
    """
    import json, sys, time, torch
    def make_floor(args):
        from yolotrain.engine.amp import resolve_amp, resolve_channels_last
        from yolotrain.tasks import task_classes
        from yolotrain.utils.torch_utils import select_device
        device = select_device(args["device"])
        torch.manual_seed(0)
        extra = {"data_kpt_shape": args["kpt_shape"]} if args["kpt_shape"] else {}
        model = task_classes(args["task"]).model(args["model"], nc=args["nc"], verbose=False, **extra).to(device)
        model.train()
        amp_dtype = resolve_amp(args["amp"], device, model)
        channels_last = resolve_channels_last(None, device)
        images = torch.rand(args["batch"], 3, args["imgsz"], args["imgsz"], device=device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, nesterov=True)
        def tensors_of(output):  # every tensor of a training output: maps, keypoints, masks, end-to-end branches
            if isinstance(output, torch.Tensor):
                return [output]
            parts = output.values() if isinstance(output, dict) else output
            return [t for part in parts for t in tensors_of(part)]
        def step():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = model(images)
            loss = sum(t.float().square().mean() for t in tensors_of(output))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        warmed = []
        def images_per_s(steps):
            for _ in range(0 if warmed else args["warmup"]):
                step()
            warmed.append(True)
            began = time.perf_counter()
            for _ in range(steps):
                step()
            return args["batch"] * steps / (time.perf_counter() - began)
        return images_per_s, str(amp_dtype), channels_last
    """
)

_YOLOTRAIN_CHILD = _TIMING + _FLOOR + textwrap.dedent(
    """
    from yolotrain.tasks import task_classes
    payload = json.loads(sys.argv[1])
    overrides, floor_args = payload["trainer"], payload["floor"]
    floor_images_per_s = make_floor(floor_args)[0]
    epochs = {"floor": [], "train_s": [], "floor_s": 0.0}
    def measure_floor(trainer):
        began = time.perf_counter()
        epochs["floor"].append(floor_images_per_s(floor_args["steps"]))
        epochs["floor_s"] += time.perf_counter() - began
    def epoch_time(trainer):
        epochs["train_s"].append(time.perf_counter() - marks["t"]["train"])
    trainer = task_classes(overrides["task"]).trainer(overrides=overrides)
    # The floor is measured outside the epoch's clock, before and after it; the epoch's time is read before `stop`
    # clears it.
    for event, fn in (("on_train_epoch_start", measure_floor), ("on_train_epoch_start", start("train")),
                      ("on_train_epoch_end", epoch_time), ("on_train_epoch_end", stop("train")),
                      ("on_train_epoch_end", measure_floor),
                      ("on_val_start", start("val")), ("on_val_end", stop("val"))):
        trainer.add_callback(event, fn)
    began = time.perf_counter()
    metrics = trainer.train() or {}
    epoch_images = len(trainer.train_loader.dataset)
    around = [sum(epochs["floor"][i : i + 2]) / 2 for i in range(0, len(epochs["floor"]) - 1, 2)]  # before, after
    extra = {"epoch_images_per_s": [epoch_images / s for s in epochs["train_s"]], "epoch_floor": around}
    report(time.perf_counter() - began - epochs["floor_s"], trainer, metrics, extra)
    """
)

_REFERENCE_CHILD = _TIMING + textwrap.dedent(
    """
    from ultralytics import YOLO
    overrides = json.loads(sys.argv[1])
    model = YOLO(overrides.pop("model"))
    for event, fn in (("on_train_epoch_start", start("train")), ("on_train_epoch_end", stop("train")),
                      ("on_val_start", start("val")), ("on_val_end", stop("val"))):
        model.add_callback(event, fn)
    began = time.perf_counter()
    model.train(**overrides)
    report(time.perf_counter() - began, model.trainer, model.trainer.metrics or {})
    """
)

_FLOOR_CHILD = _FLOOR + textwrap.dedent(
    """
    args = json.loads(sys.argv[1])
    images_per_s, amp, channels_last = make_floor(args)
    print("RESULT " + json.dumps({"images_per_s": images_per_s(args["steps"]), "amp": amp,
                                  "channels_last": channels_last}), flush=True)
    """
)


def run_child(python, code, payload, label, env=None):
    """Run `code` with `python` in a subprocess; return its RESULT dict (None, with its output tail, on failure)."""
    print(f"running {label} ...", flush=True)
    result = subprocess.run([*python, "-c", code, json.dumps(payload)], capture_output=True, text=True, env=env)
    for line in result.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (result.stdout + result.stderr)[-2000:]
    print(f"{label} failed (exit code {result.returncode}):\n{tail}", file=sys.stderr)
    return None


def data_classes(data_yaml):
    """(class count, kpt_shape or None) of a data yaml."""
    import yaml

    data = yaml.safe_load(Path(data_yaml).read_text())
    return len(data["names"]), data.get("kpt_shape")


def trainer_settings(args, run_root):
    common = dict(data=args.data, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, workers=args.workers,
                  device=args.device, amp=args.amp, seed=0, plots=False, exist_ok=True, **dict(args.set))
    ours = dict(common, model=args.model, project=str(run_root / "yolotrain"), name="train", task=args.task)
    reference = dict(common, model=args.reference_model, project=str(run_root / "reference"), name="train")
    return ours, reference


def throughput(result, key_images, key_seconds):
    return result[key_images] / result[key_seconds] if result and result[key_seconds] > 0 else float("nan")


def print_report(results, floor, args):
    print(f"\n{args.model} vs {args.reference_model}, {Path(args.data).parent.name}, device={args.device}, "
          f"amp={args.amp}, imgsz={args.imgsz}, batch={args.batch}, epochs={args.epochs}, workers={args.workers}"
          + "".join(f", {key}={value}" for key, value in args.set))
    header = f"{'trainer':<12}{'train img/s':>12}{'val img/s':>11}{'wall s':>9}{'peak RSS MB':>13}{'mAP50':>8}{'mAP50-95':>10}"
    part = {"pose": "pose", "segment": "mask"}.get(args.task)
    print(header + (f"{part + ' mAP50-95':>16}" if part else ""))
    for name, result in results.items():
        if result is None:
            print(f"{name:<12}{'failed':>12}")
            continue
        print(f"{name:<12}{throughput(result, 'train_images', 'train_s'):>12.2f}"
              f"{throughput(result, 'val_images', 'val_s'):>11.2f}{result['wall_s']:>9.1f}"
              f"{result['peak_rss_mb']:>13.0f}{result['map50']:>8.4f}{result['map50_95']:>10.4f}"
              + (f"{result['part_map50_95']:>16.4f}" if part else ""))
    if floor:
        print(f"{'floor':<12}{floor['images_per_s']:>12.2f}  (forward+backward+step on random input, amp="
              f"{floor['amp']}, channels_last={floor['channels_last']})")
    ours = results.get("yolotrain")
    references = [r for name, r in results.items() if name.startswith("reference") and r]
    # Against the faster of the reference's own default (1 thread) and the same threads as ours.
    reference = max(references, key=lambda r: throughput(r, "train_images", "train_s"), default=None)
    if ours and reference:
        print(f"yolotrain / faster reference: train img/s x{throughput(ours, 'train_images', 'train_s') / throughput(reference, 'train_images', 'train_s'):.2f}, "
              f"val img/s x{throughput(ours, 'val_images', 'val_s') / throughput(reference, 'val_images', 'val_s'):.2f}, "
              f"wall x{reference['wall_s'] / ours['wall_s']:.2f} faster, peak RSS x{ours['peak_rss_mb'] / reference['peak_rss_mb']:.2f}")
    if floor:
        for name, result in results.items():
            if result:
                share = throughput(result, "train_images", "train_s") / floor["images_per_s"]
                print(f"{name}: training runs at {share:.0%} of the compute floor")
    if ours and ours.get("epoch_floor"):
        shares = [speed / floor for speed, floor in zip(ours["epoch_images_per_s"], ours["epoch_floor"])]
        print("yolotrain, each epoch against the floor measured in its process around it (mean of before and after): "
              + ", ".join(f"{share:.0%} ({floor:.2f} img/s)" for share, floor in zip(shares, ours["epoch_floor"]))
              + f"; median {statistics.median(shares):.0%}")


def _key_value(text):
    """'nbs=8' -> ('nbs', 8): the value read as YAML reads it (numbers, booleans, strings)."""
    import yaml

    key, _, value = text.partition("=")
    return key, yaml.safe_load(value)


def main():
    from yolotrain.utils.threads import budget_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or a GPU index (0)")
    parser.add_argument("--task", default="detect", choices=("detect", "segment", "pose", "obb"))
    parser.add_argument("--amp", action="store_true", help="mixed precision for both trainers (and the floor)")
    parser.add_argument("--model", default="yolo-n.yaml", help="yolotrain model yaml")
    parser.add_argument("--reference-model", default="yolov8n.yaml", help="the reference's model of the same layout")
    parser.add_argument("--data", default="", help="data yaml (default: COCO128; for pose and segment the built-in "
                        "set of the task)")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--floor-steps", type=int, default=5, help="timed steps of the compute floor (after 2 warmup)")
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE_PYTHON)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--keep", help="write both runs under this folder and keep them (weights for val_speed.py)")
    parser.add_argument("--set", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                        help="another training argument for both trainers, e.g. --set nbs=8 --set mosaic=0")
    args = parser.parse_args()
    if not args.data:
        from yolotrain.data.builtin import builtin_data_yaml_for

        args.data = str(builtin_data_yaml_for(args.task)) if args.task != "detect" else DEFAULT_DATA

    nc, kpt_shape = data_classes(args.data)
    floor_args = dict(model=args.model, nc=nc, kpt_shape=kpt_shape, task=args.task, device=args.device,
                      amp=args.amp, imgsz=args.imgsz, batch=args.batch, warmup=2, steps=args.floor_steps)
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        floors = [run_child([sys.executable], _FLOOR_CHILD, floor_args, "compute floor")]
        ours, reference = trainer_settings(args, Path(args.keep or tmp))
        results = {"yolotrain": run_child([sys.executable], _YOLOTRAIN_CHILD, {"trainer": ours, "floor": floor_args},
                                          "yolotrain")}
        if not args.skip_reference:
            # The reference sets OMP_NUM_THREADS=1 for itself unless the environment sets it: run it both ways.
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            env["YOLO_OFFLINE"] = "1"
            results["reference"] = run_child([args.reference_python], _REFERENCE_CHILD, reference, "reference", env)
            threads = budget_threads()
            equal = dict(env, OMP_NUM_THREADS=str(threads))
            results[f"reference@{threads}"] = run_child([args.reference_python], _REFERENCE_CHILD, reference,
                                                        f"reference with {threads} threads", equal)
        floors.append(run_child([sys.executable], _FLOOR_CHILD, floor_args, "compute floor again"))
    # The faster of the floor before and after the runs: the machine at its least disturbed.
    floor = max((f for f in floors if f), key=lambda f: f["images_per_s"], default=None)
    print_report(results, floor, args)


if __name__ == "__main__":
    main()
