"""Images per second of the training augmentation: the CPU pipeline (per image, as one dataloader worker runs it)
against the device path (`augment_device=device`: the worker only pads, the batch is augmented by torch on the
training device).

    python benchmarks/augment_speed.py [--data path/data.yaml] [--images 64] [--batch 16] [--device cpu|cuda]
                                       [--decode]

Images are decoded once into the RAM cache first, so the figures are augmentation only (decoding costs the same in
both paths); `--decode` reads each image from disk as it is used instead (`cache=False`, training's default).
Default hyperparameters (mosaic, scale 0.5, translate 0.1, HSV, fliplr). Per image size it prints:
- cpu pipeline: one process making augmented samples (a dataloader worker's rate; W workers give at most W x);
- device path, loader side: one process making padded samples (what the workers are left with);
- device path, augment: batches augmented on `--device` (CUDA timings are synchronised).
"""

import argparse
import time
from pathlib import Path

import torch

from yolotrain.cfg import get_cfg
from yolotrain.data.data_yaml import check_det_dataset
from yolotrain.data.dataset import YOLODataset
from yolotrain.data.device_augment import DeviceAugmentDataset
from yolotrain.data.loader import collate_fn

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "coco128" / "data.yaml"
SIZES = (640, 320)


def default_data() -> str:
    if COCO128.exists():
        return str(COCO128)
    from yolotrain.data.builtin import builtin_data_yaml

    return str(builtin_data_yaml())


def rate(count, fn, synchronize=lambda: None):
    """Images per second of `fn()`, which makes `count` images (after one warm-up call)."""
    fn()
    synchronize()
    started = time.perf_counter()
    fn()
    synchronize()
    return count / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="data yaml (default: COCO128 when present, else built-in)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--decode", action="store_true", help="decode images as they are used (no RAM cache)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options = parser.parse_args()
    device = torch.device(options.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    data = check_det_dataset(options.data or default_data())
    hyp = get_cfg()
    count = options.images - options.images % options.batch
    print(f"data {data['train']}, {count} images, batch {options.batch}, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    for imgsz in SIZES:
        kwargs = dict(imgsz=imgsz, augment=True, hyp=hyp, data=data, fraction=count,
                      cache=False if options.decode else "ram", workers=2)
        cpu_dataset = YOLODataset(data["train"], **kwargs)
        device_dataset = DeviceAugmentDataset(data["train"], **kwargs)
        cpu_rate = rate(count, lambda: [cpu_dataset[(i, i)] for i in range(count)])
        samples = []

        def pad_samples():
            samples[:] = [device_dataset[(i, i)] for i in range(count)]

        loader_rate = rate(count, pad_samples)
        batches = [collate_fn(samples[s: s + options.batch]) for s in range(0, count, options.batch)]
        for batch in batches:  # pinned, as the DataLoader pins them when CUDA is present
            if device.type == "cuda":
                batch["img"] = batch["img"].pin_memory()
        augment = device_dataset.device_augment
        device_rate = rate(count, lambda: [augment.preprocess(dict(b), device) for b in batches], synchronize)
        print(f"imgsz {imgsz:4d}  cpu pipeline {cpu_rate:8.1f} img/s (1 process)   device path: loader side "
              f"{loader_rate:8.1f} img/s (1 process), augment {device_rate:8.1f} img/s on {device.type}")


if __name__ == "__main__":
    main()
