"""Classification speed: yolotrain's training and validation images/s against the compute floor of the model
(forward + backward + optimizer step on random images already in memory: no decoding, no augmentation), and the
reference trainer's where it runs (its classification needs torchvision's datasets and transforms).

    python benchmarks/classify_speed.py                                  # built-in shape crops, yolo11n-cls, imgsz 64
    python benchmarks/classify_speed.py --data path/to/folder --imgsz 224 --epochs 2 --batch 32

Printed: train images/s (epoch time only: over every epoch, and over the fastest epoch after the first, once the
data workers run), val images/s (every validation), the floor's images/s at the same batch, image size, autocast
and memory layout (measured before and after the run, averaged: this machine's speed drifts), and train/floor.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time

DEFAULT_REFERENCE_PYTHON = "/work/shared/anchor/ultralytics-python"


def measure_floor(model_name, nc, batch, imgsz, amp, steps=60, warmup=10):
    """Images/s of training steps on random in-memory images, with the trainer's autocast and layout."""
    import torch

    from yolotrain.engine.amp import resolve_amp, resolve_channels_last
    from yolotrain.nn.model import ClassificationModel

    device = torch.device("cpu")
    torch.manual_seed(0)
    model = ClassificationModel(model_name, nc=nc, verbose=False).train()
    amp_dtype = resolve_amp(amp, device, model)
    channels_last = resolve_channels_last(None, device)
    images = torch.rand(batch, 3, imgsz, imgsz)
    labels = torch.randint(0, nc, (batch,))
    if channels_last:
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - began), str(amp_dtype), channels_last


def measure_training(overrides):
    """(train images/s over all epochs, over its fastest epoch after the first (data workers running), val
    images/s, final top-1, the trainer) of a yolotrain classification run."""
    from yolotrain.tasks.classify.train import ClassificationTrainer

    marks = {"train": 0.0, "val": 0.0, "val_runs": 0, "t": {}, "epochs": []}

    def start(kind):
        return lambda _: marks["t"].__setitem__(kind, time.perf_counter())

    def stop(kind):
        def fn(_):
            seconds = time.perf_counter() - marks["t"].pop(kind)
            marks[kind] += seconds
            marks["val_runs"] += kind == "val"
            if kind == "train":
                marks["epochs"].append(seconds)
        return fn

    trainer = ClassificationTrainer(overrides=overrides)
    for event, fn in (("on_train_epoch_start", start("train")), ("on_train_epoch_end", stop("train")),
                      ("on_val_start", start("val")), ("on_val_end", stop("val"))):
        trainer.add_callback(event, fn)
    trainer.train()
    train_images = len(trainer.train_loader.dataset) * trainer.epochs
    val_images = len(trainer.test_loader.dataset) * marks["val_runs"]
    steady = len(trainer.train_loader.dataset) / min(marks["epochs"][1:] or marks["epochs"])  # workers started
    return (train_images / marks["train"], steady, val_images / max(marks["val"], 1e-9),
            trainer.validator.metrics.top1, trainer)


REFERENCE_CHILD = textwrap.dedent(
    """
    import json, sys
    from ultralytics import YOLO
    overrides = json.loads(sys.argv[1])
    YOLO(overrides.pop("model")).train(**overrides)
    """
)


def try_reference(python, overrides):
    """The reference's own run of the same settings, or the reason it cannot run here (its last error line)."""
    result = subprocess.run([python, "-c", REFERENCE_CHILD, json.dumps(overrides)], capture_output=True, text=True)
    if result.returncode == 0:
        return "ran (time it with benchmarks/train_speed.py's method)"
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
    return f"cannot run here: {errors[-1].strip() if errors else 'exit code ' + str(result.returncode)}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="class-folder dataset (default: the built-in shape crops)")
    parser.add_argument("--model", default="yolo11n-cls.yaml")
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8, help="data workers (the trainer caps them by the CPUs)")
    parser.add_argument("--amp", default="true", help="true, false or bf16 (as the trainer's amp argument)")
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE_PYTHON)
    args = parser.parse_args()
    from yolotrain.data.builtin import builtin_classify_root
    from yolotrain.data.loader import reset_loader_workers
    from yolotrain.tasks.classify.dataset import check_cls_dataset

    amp = {"true": True, "false": False}.get(args.amp, args.amp)

    with tempfile.TemporaryDirectory() as project:
        overrides = dict(model=args.model, data=args.data, imgsz=args.imgsz, batch=args.batch, epochs=args.epochs,
                         amp=amp, project=project, name="speed", plots=False, verbose=False, device="cpu",
                         workers=args.workers)
        nc = len(check_cls_dataset(args.data or builtin_classify_root())["names"])
        # The floor before and after the run (its data workers shut down), averaged: this machine's speed drifts.
        before, amp_dtype, channels_last = measure_floor(args.model, nc, args.batch, args.imgsz, amp)
        train_ips, steady_ips, val_ips, top1, trainer = measure_training(overrides)
        workers = trainer.train_loader.num_workers
        for loader in (trainer.train_loader, trainer.test_loader):
            reset_loader_workers(loader)
        after, _, _ = measure_floor(args.model, nc, args.batch, args.imgsz, amp)
        floor_ips = (before + after) / 2
        data = trainer.data["path"]
        reference = try_reference(args.reference_python, {**overrides, "data": data, "project": project + "/ref"})
    print(f"data {data}, {args.model}, imgsz {args.imgsz}, batch {args.batch}, {args.epochs} epochs, "
          f"autocast {amp_dtype}, channels_last {channels_last}, workers {workers}")
    print(f"yolotrain train {train_ips:8.1f} images/s (steady epoch {steady_ips:.1f})   val {val_ips:8.1f} images/s   "
          f"top-1 {top1:.3f}")
    print(f"compute floor   {floor_ips:8.1f} images/s   (before {before:.1f}, after {after:.1f})   "
          f"train / floor = {train_ips / floor_ips:.2f} (steady {steady_ips / floor_ips:.2f})")
    print(f"reference: {reference}")


if __name__ == "__main__":
    sys.exit(main())
