"""DataLoader construction: batching (collate), worker seeding and a sample order that is a pure function of
(seed, epoch), so that a resumed run sees the same batches as an uninterrupted one.

Call `set_loader_epoch(loader, epoch, start_batch, salt)` before each epoch; it also skips the finished batches
of an epoch resumed in the middle. The orders themselves live in yolotrain.data.samplers: an image permutation
(`EpochSampler`), whole rectangular batches shuffled as groups (`GroupBatchSampler`, for a shuffled or sharded rect
dataset) or a weighted draw (`ImageWeightSampler`, `image_weights=True`).
The sampler hands each index to the dataset together with a per-sample seed derived from (seed, epoch, salt,
index), and the dataset seeds its augmentation from it. So every augmented sample is a pure function of those
four numbers, whatever the number of workers, whether they persist, or how many ranks share the data: resume,
mid-epoch resume and DDP replay the exact same images.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from yolotrain.data.instances import PER_OBJECT_KEYS
from yolotrain.data.samplers import (
    EpochSampler,
    ExactShardBatchSampler,
    GroupBatchSampler,
    ImageWeightSampler,
    epoch_seed,
)
from yolotrain.errors import CfgError

LOGGER = logging.getLogger(__name__)

def collate_fn(samples: list[dict]) -> dict:
    """Batch formatted samples: `img` stacked (B, 3, H, W) uint8, every per-object array concatenated in object
    order (`cls` (N, 1), `bboxes` (N, 4), and `segments` (N, S, 2) / `keypoints` (N, K, 2 | 3) / `corners`
    (N, 4, 2) where the samples have them; outlines padded to one point count), segmentation `masks` ((B, h, w)
    index masks or (N, h, w) object masks), `batch_idx` (N,) float giving each object's image index, `max_boxes`
    (int) the most boxes in one image (the loss pads to it without reading the device); every other key becomes
    a list."""
    batch = {"img": torch.stack([torch.as_tensor(s["img"]) for s in samples])}
    for key in PER_OBJECT_KEYS:
        if key in samples[0]:
            arrays = [torch.as_tensor(s[key]).float() for s in samples]
            batch[key] = torch.cat(_same_point_count(arrays) if key == "segments" else arrays)
    if "masks" in samples[0]:  # one index mask per image (stacked) or one mask per object (joined)
        masks = [s["masks"] for s in samples]
        batch["masks"] = torch.stack(masks) if masks[0].ndim == 2 else torch.cat(masks)
    boxes_per_image = torch.tensor([len(s["cls"]) for s in samples])
    batch["batch_idx"] = torch.repeat_interleave(torch.arange(len(samples)), boxes_per_image).float()
    batch["max_boxes"] = int(boxes_per_image.max()) if len(samples) else 0
    for key in samples[0]:
        if key not in batch:
            batch[key] = [s[key] for s in samples]
    return batch


def _same_point_count(outlines: list) -> list:
    """(n_i, S_i, 2) outlines brought to the largest S by repeating each outline's last point (same outline)."""
    points = max(o.shape[1] for o in outlines)

    def padded(o):
        if not len(o):
            return o.new_zeros((0, points, 2))
        return torch.cat((o, o[:, -1:].expand(-1, points - o.shape[1], -1)), 1)

    return [padded(o) for o in outlines]


def seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` in a DataLoader worker from its torch seed (base seed + worker id), which the
    loader's generator makes deterministic."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def resolve_workers(batch: int, workers: int, world_size: int = 1, compute_threads: int | None = None) -> int:
    """Worker processes per rank: no more than the CPUs they may take (`utils.threads.data_worker_cpus`: the
    rank's share of the CPUs this process may use, less the `compute_threads` of a rank computing on the CPU of a
    small machine), none for batch 1, at most `workers`."""
    from yolotrain.utils.threads import data_worker_cpus

    cpus = data_worker_cpus(world_size, compute_threads)
    return max(0, min(cpus, batch if batch > 1 else 0, workers))


def build_dataloader(
    dataset: Dataset,
    batch: int,
    workers: int,
    shuffle: bool,
    rank: int = -1,
    seed: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    image_weights: bool = False,
    exact_shard: bool = False,
    collate=None,
    compute_threads: int | None = None,
) -> DataLoader:
    """A DataLoader with `collate_fn`, seeded workers and a (seed, epoch)-determined order.

    rank != -1 shards the data over `world_size` replicas (no process group needed to build the loader).
    A rectangular-batch dataset (`dataset.rect`) that is shuffled or sharded is served as whole batch groups
    (`GroupBatchSampler`: `dataset.batch` gives each image's group, so the dataset's batch size sets the batches);
    unshuffled and unsharded, consecutive images already form its groups. `image_weights` draws the images by the
    classes they hold (`ImageWeightSampler`, the dataset needs `labels` and `nc`); it cannot be combined with rect.
    `exact_shard` (evaluation, unshuffled): each rank takes whole consecutive batches in turn with nothing padded or
    repeated (`ExactShardBatchSampler`), so the ranks together see every image exactly once. `collate` batches the
    samples (`collate_fn`, the detection layout, when None). `compute_threads`: the threads of a model computing on
    the CPU beside the loader (None: it computes elsewhere), which the workers leave their CPUs (`resolve_workers`).
    """
    num_workers = resolve_workers(batch, workers, world_size, compute_threads)
    replicas, replica = (max(world_size, 1), rank) if rank != -1 else (1, 0)
    if exact_shard and replicas > 1 and not shuffle:
        batching = {"batch_sampler": ExactShardBatchSampler(len(dataset), batch, replicas, replica)}
    else:
        batching = _batching(dataset, batch, shuffle, replicas, replica, seed, drop_last, image_weights)
    loader = DataLoader(
        dataset,
        shuffle=False,  # the sampler decides the order
        **batching,
        num_workers=num_workers,
        collate_fn=collate or collate_fn,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=seed_worker,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(int(seed)),  # worker base seeds
    )
    loader.seed = int(seed)  # read by set_loader_epoch
    return loader


def _batching(dataset, batch, shuffle, replicas, replica, seed, drop_last, image_weights) -> dict:
    """The DataLoader's batching arguments: a batch sampler of whole rect groups, or a sampler and a batch size."""
    rect = getattr(dataset, "rect", False)
    if image_weights and rect:
        raise CfgError("image_weights=True cannot be combined with rect=True: rectangular batches are fixed groups "
                       "of images of one shape; set one of them to false")
    if rect and (shuffle or replicas > 1):
        group_ids = getattr(dataset, "batch", None)
        group_ids = np.arange(len(dataset)) // batch if group_ids is None else group_ids
        sampler = GroupBatchSampler(group_ids, num_replicas=replicas, rank=replica, shuffle=shuffle, seed=seed)
        return {"batch_sampler": sampler}
    if image_weights:
        sampler = ImageWeightSampler(dataset, num_replicas=replicas, rank=replica, seed=seed)
    else:
        sampler = EpochSampler(dataset, num_replicas=replicas, rank=replica, shuffle=shuffle, seed=seed)
    return {"batch_size": batch, "sampler": sampler, "drop_last": drop_last}


def is_exact_shard(loader) -> bool:
    """True when `loader` serves one rank's share of an evaluation set (`exact_shard`) in a multi-rank run."""
    sampler = getattr(loader, "batch_sampler", None)
    return isinstance(sampler, ExactShardBatchSampler) and sampler.num_replicas > 1


def unsharded(loader: DataLoader) -> DataLoader:
    """`loader` itself, or for an `exact_shard` loader one over its whole dataset with the same batches."""
    if not is_exact_shard(loader):
        return loader
    return build_dataloader(loader.dataset, loader.batch_sampler.batch_size, loader.num_workers, shuffle=False,
                            seed=getattr(loader, "seed", 0), collate=loader.collate_fn)


def epoch_order(loader: DataLoader):
    """The object that orders `loader`'s epochs: its `GroupBatchSampler`, else its sampler."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    return batch_sampler if isinstance(batch_sampler, GroupBatchSampler) else loader.sampler


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0, salt: int = 0) -> None:
    """Make the coming pass over `loader` epoch `epoch` of a run: its order is a function of (seed, epoch, salt),
    the first `start_batch` batches are skipped (resume mid-epoch), and the loader's generator (worker seeds of
    non-persistent workers) is re-seeded to match."""
    order = epoch_order(loader)
    if hasattr(order, "set_epoch"):
        order.set_epoch(epoch)
    if isinstance(order, GroupBatchSampler):
        order.salt, order.skip = int(salt), int(start_batch)
    elif isinstance(order, EpochSampler):
        order.salt = int(salt)
        order.skip = int(start_batch) * (loader.batch_size or 1)
    elif start_batch:
        raise ValueError("start_batch needs a loader built by build_dataloader (EpochSampler)")
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed(getattr(loader, "seed", 0), epoch, salt))


def reset_loader_workers(loader: DataLoader) -> None:
    """Shut persistent workers down so the next epoch starts fresh ones with the dataset's current state
    (needed after `dataset.close_mosaic()`, since each worker holds its own copy of the dataset)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None
