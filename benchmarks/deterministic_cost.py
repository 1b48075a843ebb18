"""What `deterministic=True` costs a training step: seconds per step with it on and off, interleaved.

    python benchmarks/deterministic_cost.py [--imgsz 224] [--batch 8] [--rounds 6] [--steps 3] [--amp]

Each round times `--steps` training steps of yolo-n on a fixed random batch (forward, loss, backward, SGD step)
with deterministic algorithms on, then off (the order alternates between rounds, so drift in the machine's load
falls on both). Prints the median seconds per step of each and their ratio. `--amp` runs the forward and loss under
the autocast a training run with amp=True would use on this device (bf16 on CPUs that compute it natively).
"""

import argparse
import statistics
import time

import torch

from yolotrain.engine.amp import resolve_amp
from yolotrain.nn.model import DetectionModel
from yolotrain.utils.torch_utils import init_seeds


def make_batch(imgsz, batch):
    generator = torch.Generator().manual_seed(0)
    boxes_per_image = 4
    count = batch * boxes_per_image
    centres = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(count, 2, generator=generator) * 0.2 + 0.1
    return {
        "img": torch.rand(batch, 3, imgsz, imgsz, generator=generator),
        "cls": torch.randint(0, 6, (count, 1), generator=generator).float(),
        "bboxes": torch.cat([centres, sizes], 1),
        "batch_idx": torch.arange(batch).repeat_interleave(boxes_per_image).float(),
    }


def seconds_per_step(model, optimizer, batch, steps, deterministic, amp_dtype=None):
    init_seeds(0, deterministic)
    started = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, _ = model.loss(batch, model(batch["img"]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--imgsz", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="autocast as amp=True trains on this CPU")
    args = parser.parse_args()
    amp_dtype = resolve_amp(args.amp, torch.device("cpu"))

    model = DetectionModel("yolo-n.yaml", nc=6, verbose=False).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batch = make_batch(args.imgsz, args.batch)
    seconds_per_step(model, optimizer, batch, 1, False, amp_dtype)  # warm-up: allocator, oneDNN kernels
    timings = {True: [], False: []}
    for round_index in range(args.rounds):
        order = (True, False) if round_index % 2 == 0 else (False, True)
        for deterministic in order:
            seconds = seconds_per_step(model, optimizer, batch, args.steps, deterministic, amp_dtype)
            timings[deterministic].append(seconds)
    on, off = statistics.median(timings[True]), statistics.median(timings[False])
    print(f"yolo-n imgsz {args.imgsz} batch {args.batch}, autocast {amp_dtype}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds of {args.steps} steps")
    print(f"deterministic=True : {on:.3f} s/step (median)")
    print(f"deterministic=False: {off:.3f} s/step (median)")
    print(f"ratio True/False: {on / off:.3f}")


if __name__ == "__main__":
    main()
