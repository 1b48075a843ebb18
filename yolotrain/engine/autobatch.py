"""Automatic batch size: the largest per-device batch whose training step fits a share of the GPU's memory.

`batch=-1` aims at 60% of the device's memory, `batch=0.70` at 70%. A copy of the real model runs full training
steps (forward, loss on synthetic labels, backward) at a few batch sizes at the training image size; a straight line
through (batch, peak memory) then gives the largest batch that stays within the target. Memory that other processes
hold on the device is taken off the target first. Without CUDA there is nothing to measure and the batch is 16.

`fit_batch_size` is the pure selection step (figures in, batch out); `auto_batch_size` measures and selects.
"""

import copy
import logging
import math

import numpy as np
import torch

from yolotrain.utils.torch_utils import de_parallel

LOGGER = logging.getLogger(__name__)

DEFAULT_FRACTION = 0.60  # the share of device memory batch=-1 aims at
FALLBACK_BATCH = 16  # without CUDA (or when the figures allow no fit): the default batch
PROBE_BATCHES = (1, 2, 4, 8, 16)
MAX_BATCH = 1024
MIN_RELATIVE_SLOPE = 1e-4  # memory per image below this share of the peak counts as no growth
BOXES_PER_IMAGE = 8  # synthetic labels, so the loss and its assigner run as in training


def is_auto_batch(batch) -> bool:
    """True for the batch values that ask for a measured batch: -1, or a float share in (0, 1)."""
    if isinstance(batch, bool):
        return False
    return batch == -1 or (isinstance(batch, float) and 0.0 < batch < 1.0)


def target_fraction(batch) -> float:
    """The share of device memory a batch value asks for: 0.6 for -1, else the float itself."""
    return DEFAULT_FRACTION if batch == -1 else float(batch)


def fit_batch_size(batches, peak_bytes, budget_bytes, failed_at=None, max_batch=MAX_BATCH):
    """The largest batch whose predicted memory stays within `budget_bytes`, or None when the figures allow no fit.

    Args:
        batches: the batch sizes that ran.
        peak_bytes: the peak device memory of each of them (same order).
        budget_bytes: the memory the training step may reach.
        failed_at: the smallest batch size that ran out of memory while measuring, if any.
        max_batch: upper limit of the answer.

    The memory of a training step grows linearly with the batch (activations and gradients of activations per image,
    plus a fixed part: weights, their gradients, the CUDA workspace), so a least-squares line through the points
    extrapolates. A batch that ran out of memory proves the line optimistic: the answer is then no larger than the
    largest batch that ran. None when fewer than two sizes ran or memory does not grow with the batch.
    """
    batches = np.asarray(batches, dtype=np.float64)
    peaks = np.asarray(peak_bytes, dtype=np.float64)
    if len(np.unique(batches)) < 2:
        return None
    slope, intercept = np.polyfit(batches, peaks, 1)
    if not slope > MIN_RELATIVE_SLOPE * peaks.max():  # flat (within rounding) or falling: nothing to extrapolate
        return None
    batch = math.floor((budget_bytes - intercept) / slope)
    if failed_at is not None:
        batch = min(batch, int(batches.max()))
    return int(min(max(batch, 1), max_batch))


def auto_batch_size(model, imgsz, device, batch_arg, amp=False, make_batch=None):
    """The per-device batch for `batch_arg` (-1 or a share in (0, 1)), measured with `model` at `imgsz` on `device`.

    `amp` is the `amp` argument: the steps run under the autocast training asks for (fp16 for true, bf16), so the
    figures are those of training. `model` is left as it was (a copy is measured). `make_batch(batch_size, imgsz,
    device)` gives the task's training batch (the trainer's `autobatch_batch`; a detection batch when None). Logs
    the chosen batch and the figures behind it in one line.
    """
    fraction = target_fraction(batch_arg)
    device = torch.device(device)
    if device.type != "cuda":
        LOGGER.info(f"autobatch: batch={batch_arg} measures CUDA memory, none on {device}; training with batch "
                    f"{FALLBACK_BATCH}")
        return FALLBACK_BATCH
    free, total = torch.cuda.mem_get_info(device)
    held_by_others = max(total - free - torch.cuda.memory_reserved(device), 0)  # other processes, the CUDA context
    budget = fraction * total - held_by_others
    amp_dtype = (torch.bfloat16 if amp == "bf16" else torch.float16) if amp else None
    batches, peaks, failed_at = measure_peak_memory(model, imgsz, device, amp_dtype=amp_dtype, make_batch=make_batch)
    batch = fit_batch_size(batches, peaks, budget, failed_at)
    if batch is None:
        LOGGER.warning(f"autobatch: memory figures {list(zip(batches, peaks))} allow no fit; training with batch "
                       f"{FALLBACK_BATCH}")
        return FALLBACK_BATCH
    name = torch.cuda.get_device_name(device)
    LOGGER.info(
        f"autobatch: batch {batch} per device for {fraction:.0%} of {name}'s {total / 2**30:.1f} GiB at "
        f"imgsz={imgsz} (measured batches {list(batches)})"
    )
    return batch


def measure_peak_memory(model, imgsz, device, batches=PROBE_BATCHES, amp_dtype=None, make_batch=None):
    """Peak reserved CUDA memory of one training step of a copy of `model` at each batch size, smallest first; the
    step is the model's loss on `make_batch(batch_size, imgsz, device)` (a detection batch when None).

    Returns (batches that ran, their peaks in bytes, the first batch that ran out of memory or None).
    """
    probe = copy.deepcopy(de_parallel(model)).to(device).train()
    probe.criterion = None  # built afresh on the copy, from its own attributes
    stride = max(int(probe.stride.max()), 32) if hasattr(probe, "stride") else 32
    imgsz = math.ceil(int(imgsz) / stride) * stride
    ran, peaks, failed_at = [], [], None
    try:
        for batch_size in batches:
            try:
                batch = (make_batch or synthetic_batch)(batch_size, imgsz, device)
                peaks.append(_step_peak_memory(probe, batch, device, amp_dtype))
                ran.append(batch_size)
            except torch.cuda.OutOfMemoryError:
                failed_at = batch_size
                break
    finally:
        del probe
        torch.cuda.empty_cache()
    return ran, peaks, failed_at


def _step_peak_memory(model, batch, device, amp_dtype):
    """Peak memory of the loss (a model called with a batch returns (loss, items)) and its backward pass."""
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with torch.autocast("cuda", dtype=amp_dtype or torch.float16, enabled=amp_dtype is not None):
        loss, _ = model(batch)
    loss.sum().backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_reserved(device)
    model.zero_grad(set_to_none=True)
    return int(peak)


def synthetic_batch(batch_size, imgsz, device, boxes_per_image=BOXES_PER_IMAGE):
    """A collated training batch of random images with `boxes_per_image` random class-0 boxes each."""
    count = batch_size * boxes_per_image
    centres = torch.rand(count, 2, device=device) * 0.6 + 0.2
    sizes = torch.rand(count, 2, device=device) * 0.3 + 0.05
    return {
        "img": torch.rand(batch_size, 3, imgsz, imgsz, device=device),
        "cls": torch.zeros(count, 1, device=device),
        "bboxes": torch.cat([centres, sizes], 1),  # (N, 4) normalised xywh
        "batch_idx": torch.arange(batch_size, device=device).repeat_interleave(boxes_per_image).float(),
        "max_boxes": boxes_per_image,
    }
