"""DataLoader construction: batching (collate), worker seeding and a sample order that is a pure function of
(seed, epoch), so that a resumed run sees the same batches as an uninterrupted one.

Call `set_loader_epoch(loader, epoch, start_batch, salt)` before each epoch; it also skips the finished batches
of an epoch resumed in the middle.
The sampler hands each index to the dataset together with a per-sample seed derived from (seed, epoch, salt,
index), and the dataset seeds its augmentation from it. So every augmented sample is a pure function of those
four numbers, whatever the number of workers, whether they persist, or how many ranks share the data: resume,
mid-epoch resume and DDP replay the exact same images.
"""

from __future__ import annotations

import logging
import math
import os
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

LOGGER = logging.getLogger(__name__)

CONCATENATED_KEYS = ("cls", "bboxes")


def collate_fn(samples: list[dict]) -> dict:
    """Batch formatted samples: `img` stacked (B, 3, H, W) uint8, `cls`/`bboxes` concatenated (N, 1)/(N, 4),
    `batch_idx` (N,) float giving each box's image index, `max_boxes` (int) the most boxes in one image (the loss
    pads to it without reading the device); every other key becomes a list."""
    batch = {"img": torch.stack([torch.as_tensor(s["img"]) for s in samples])}
    for key in CONCATENATED_KEYS:
        batch[key] = torch.cat([torch.as_tensor(s[key]).float() for s in samples])
    boxes_per_image = torch.tensor([len(s["cls"]) for s in samples])
    batch["batch_idx"] = torch.repeat_interleave(torch.arange(len(samples)), boxes_per_image).float()
    batch["max_boxes"] = int(boxes_per_image.max()) if len(samples) else 0
    for key in samples[0]:
        if key not in batch:
            batch[key] = [s[key] for s in samples]
    return batch


def seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` in a DataLoader worker from its torch seed (base seed + worker id), which the
    loader's generator makes deterministic."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    """One integer seed per (seed, epoch, salt); distinct for any realistic epoch and salt counts."""
    return ((int(seed) * 1_000_003 + int(epoch)) * 10_007 + int(salt)) % 2**63


def sample_seed(base: int, index: int) -> int:
    """The 32-bit seed of sample `index` in the pass seeded by `base` (a Knuth multiplicative hash)."""
    return (base + int(index) * 2654435761) % 2**32


class EpochSampler(DistributedSampler):
    """Indices for one replica whose order depends only on (seed, epoch, salt), resumable mid-epoch.

    With `num_replicas=1, rank=0` it is a plain (shuffled or sequential) sampler; no process group is needed.
    It yields `(index, sample_seed)` pairs (see the module docstring).
    `set_epoch(epoch)` picks the permutation, `salt` varies it (e.g. after a NaN rollback), `skip` drops the first
    indices of the next pass only (a resumed epoch's finished batches). Each pass advances the epoch by one, so
    a loader whose epoch is never set still reshuffles every epoch. `len()` is the full epoch, skip or not.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.salt = 0
        self.skip = 0

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.salt))
            indices = torch.randperm(n, generator=generator).tolist()
        else:
            indices = list(range(n))
        indices = self._shard(indices)
        skip, self.skip = self.skip, 0
        base = epoch_seed(self.seed, self.epoch, self.salt)
        self.epoch += 1
        return iter([(i, sample_seed(base, i)) for i in indices[skip:]])

    def _shard(self, indices: list) -> list:
        """Pad by repeating (so every replica gets the same count), then take every num_replicas-th index."""
        padding = self.total_size - len(indices)
        if padding > 0:
            indices += (indices * math.ceil(padding / len(indices)))[:padding]
        return indices[: self.total_size][self.rank : self.total_size : self.num_replicas]


def resolve_workers(batch: int, workers: int, world_size: int = 1) -> int:
    """Worker processes per rank: no more than the CPUs per rank, none for batch 1, at most `workers`."""
    cpus_per_rank = (os.cpu_count() or 1) // max(world_size, 1)
    return max(0, min(cpus_per_rank, batch if batch > 1 else 0, workers))


def build_dataloader(
    dataset: Dataset,
    batch: int,
    workers: int,
    shuffle: bool,
    rank: int = -1,
    seed: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader with `collate_fn`, seeded workers and a (seed, epoch)-determined order.

    rank != -1 shards the data over `world_size` replicas (no process group needed to build the loader).
    Rectangular-batch datasets are never shuffled (each batch shape is computed for consecutive images).
    """
    if shuffle and getattr(dataset, "rect", False):
        LOGGER.warning("rect=True keeps images in aspect-ratio order: shuffle disabled for this loader")
        shuffle = False
    num_workers = resolve_workers(batch, workers, world_size)
    replicas, replica = (max(world_size, 1), rank) if rank != -1 else (1, 0)
    sampler = EpochSampler(dataset, num_replicas=replicas, rank=replica, shuffle=shuffle, seed=seed)
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=False,  # the sampler decides the order
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        worker_init_fn=seed_worker,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(int(seed)),  # worker base seeds
    )
    loader.seed = int(seed)  # read by set_loader_epoch
    return loader


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0, salt: int = 0) -> None:
    """Make the coming pass over `loader` epoch `epoch` of a run: its order is a function of (seed, epoch, salt),
    the first `start_batch` batches are skipped (resume mid-epoch), and the loader's generator (worker seeds of
    non-persistent workers) is re-seeded to match."""
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if isinstance(sampler, EpochSampler):
        sampler.salt = int(salt)
        sampler.skip = int(start_batch) * (loader.batch_size or 1)
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
