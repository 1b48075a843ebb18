"""Sample orders for the training loader, each a pure function of (seed, epoch, salt) and resumable mid-epoch.

- `EpochSampler`: a permutation of the images (or their order), sharded over ranks index by index.
- `GroupBatchSampler`: rectangular batches. The dataset cut its aspect-ratio-sorted images into groups of one batch
  shape each; the sampler yields whole groups, shuffled as groups, and shards them over ranks group by group.
- `ImageWeightSampler`: images drawn with replacement, with probabilities from the classes they hold and the
  per-class mAP of the last validation (`image_weights=True`); every rank takes its share of one global draw.
  `ClassMapsFeed` is the trainer callback that hands it each validation's per-class mAP and keeps them as state.

Each yields `(index, sample_seed)` pairs (lists of them for whole batches): the dataset seeds its augmentation from
the seed, so every augmented sample is a function of (seed, epoch, salt, index or draw position) only.
`yolotrain.data.loader.set_loader_epoch` picks the epoch, the salt and the batches to skip.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler

from yolotrain.utils import dist


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    """One integer seed per (seed, epoch, salt); distinct for any realistic epoch and salt counts."""
    return ((int(seed) * 1_000_003 + int(epoch)) * 10_007 + int(salt)) % 2**63


def sample_seed(base: int, index: int) -> int:
    """The 32-bit seed of sample `index` in the pass seeded by `base` (a Knuth multiplicative hash)."""
    return (base + int(index) * 2654435761) % 2**32


def shard(order: Sequence, rank: int, num_replicas: int) -> list:
    """Rank `rank`'s share of `order`: padded by repeating from its start to a multiple of `num_replicas` (so every
    rank gets the same count), then every num_replicas-th item from position `rank`."""
    order = list(order)
    total = math.ceil(len(order) / num_replicas) * num_replicas
    padding = total - len(order)
    if padding > 0 and order:
        order += (order * math.ceil(padding / len(order)))[:padding]
    return order[rank:total:num_replicas]


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
        indices = shard(indices, self.rank, self.num_replicas)
        skip, self.skip = self.skip, 0
        base = epoch_seed(self.seed, self.epoch, self.salt)
        self.epoch += 1
        return iter([(i, sample_seed(base, i)) for i in indices[skip:]])


class GroupBatchSampler(Sampler):
    """Whole rectangular batches: `group_ids[i]` is the batch group of image i (one letterbox shape per group).

    Each epoch the groups are permuted (when `shuffle`) by a generator seeded from (seed, epoch, salt), and rank r
    takes every num_replicas-th group of that order (`shard`), so each rank's batches are whole groups and all ranks
    get the same number of batches. Yields one list of `(index, sample_seed)` pairs per batch; the seeds are those
    `EpochSampler` gives (a function of the image index). `skip` drops the first batches of the next pass only.
    """

    def __init__(self, group_ids, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        group_ids = np.asarray(group_ids, np.int64)
        order = np.argsort(group_ids, kind="stable")
        boundaries = np.flatnonzero(np.diff(group_ids[order])) + 1
        self.groups = [chunk.tolist() for chunk in np.split(order, boundaries)] if len(order) else []
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.shuffle, self.seed = shuffle, int(seed)
        self.epoch = self.salt = self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def group_order(self) -> list[int]:
        """The order of all groups in the current epoch (before sharding)."""
        if not self.shuffle:
            return list(range(len(self.groups)))
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.salt))
        return torch.randperm(len(self.groups), generator=generator).tolist()

    def __iter__(self):
        mine = shard(self.group_order(), self.rank, self.num_replicas)
        skip, self.skip = self.skip, 0
        base = epoch_seed(self.seed, self.epoch, self.salt)
        self.epoch += 1
        return iter([[(i, sample_seed(base, i)) for i in self.groups[g]] for g in mine[skip:]])

    def __len__(self) -> int:
        return math.ceil(len(self.groups) / self.num_replicas)


def image_class_counts(labels: Sequence[dict], nc: int) -> np.ndarray:
    """(n_images, nc) number of boxes of each class in each image, from the dataset's label records."""
    classes = [np.asarray(r["cls"]).reshape(-1).astype(np.int64) for r in labels]
    per_image = np.array([len(c) for c in classes], np.int64)
    if per_image.sum() == 0:
        return np.zeros((len(labels), nc), np.int64)
    image_index = np.repeat(np.arange(len(labels)), per_image)
    flat = image_index * nc + np.concatenate(classes)
    return np.bincount(flat, minlength=len(labels) * nc).reshape(len(labels), nc)


def image_weights(class_counts: np.ndarray, class_maps: np.ndarray) -> np.ndarray:
    """(n_images,) sampling probabilities: an image weighs the sum over its boxes of its class's weight
    (1 - mAP)^2 / boxes of that class, so rare classes and classes the model still gets wrong are drawn more.
    Images without any weight (backgrounds) get the smallest weight of the others, so they are still seen."""
    counts = np.asarray(class_counts, np.float64)  # (n, nc)
    maps = np.clip(np.asarray(class_maps, np.float64), 0.0, 1.0)  # (nc,)
    class_weight = (1.0 - maps) ** 2 / np.maximum(counts.sum(0), 1.0)  # (nc,)
    weights = counts @ class_weight  # (n,)
    positive = weights > 0
    if not positive.any():
        return np.full(len(weights), 1.0 / max(len(weights), 1))
    weights[~positive] = weights[positive].min()
    return weights / weights.sum()


class ImageWeightSampler(EpochSampler):
    """`image_weights=True`: each epoch draws `total_size` images with replacement from `image_weights`
    probabilities, with a generator seeded from (seed, epoch, salt), so the draw is a function of
    (seed, epoch, salt, class mAPs). Rank r takes draw positions r, r + num_replicas, ... of that one global draw.
    A sample's seed comes from its draw position (an image drawn twice gets two different augmentations).

    `class_maps` (nc,) starts at 0 (weights from the class frequencies alone); `set_class_maps` sets the per-class
    mAP of a validation for the following epochs.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.class_counts = image_class_counts(dataset.labels, int(dataset.nc))  # (n, nc)
        self.class_maps = np.zeros(int(dataset.nc))

    def set_class_maps(self, class_maps) -> None:
        maps = np.asarray(class_maps, np.float64).reshape(-1)
        if maps.shape != self.class_maps.shape:
            raise ValueError(f"class mAPs for {maps.size} classes given to a sampler of {self.class_maps.size}")
        self.class_maps = maps

    def global_draw(self) -> list[int]:
        """The image indices drawn for the current epoch, for all ranks together (`total_size` of them)."""
        probabilities = torch.as_tensor(image_weights(self.class_counts, self.class_maps))
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.salt))
        return torch.multinomial(probabilities, self.total_size, replacement=True, generator=generator).tolist()

    def __iter__(self):
        draw = self.global_draw()
        positions = range(self.rank, self.total_size, self.num_replicas)
        skip, self.skip = self.skip, 0
        base = epoch_seed(self.seed, self.epoch, self.salt)
        self.epoch += 1
        return iter([(draw[p], sample_seed(base, p)) for p in positions[skip:]])


class ClassMapsFeed:
    """Hands each training validation's per-class mAP to an `ImageWeightSampler`; a stateful trainer callback.

    `on_val_end` (rank 0, where validation runs) keeps the validator's `metrics.maps`; `on_fit_epoch_end` (every
    rank) gives rank 0's values to every rank's sampler, so all ranks draw from the same weights. The state (saved
    with the trainer's callbacks in every checkpoint, between those two events) is what the next epoch draws with,
    so a resumed run draws exactly as an uninterrupted one.
    """

    state_key = "image_weights"

    def __init__(self, sampler: ImageWeightSampler):
        self.sampler = sampler
        self.pending = None  # the last validation's class mAPs, not yet handed to the sampler

    def on_val_end(self, validator) -> None:
        if getattr(validator, "training", False):
            self.pending = np.asarray(validator.metrics.maps, np.float64).tolist()

    def on_fit_epoch_end(self, trainer) -> None:
        if trainer.metrics is None:  # not validated this epoch (the same on every rank: metrics are broadcast)
            return
        maps = dist.broadcast_object(self.pending, group=getattr(trainer, "_wait_group", None))
        if maps is not None:
            self.sampler.set_class_maps(maps)
        self.pending = None

    def state_dict(self) -> dict:
        maps = self.pending if self.pending is not None else self.sampler.class_maps.tolist()
        return {"class_maps": [float(m) for m in maps]}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.set_class_maps(state["class_maps"])
        self.pending = None


class ExactShardBatchSampler(Sampler):
    """Evaluation batches shared out over ranks with nothing padded or repeated.

    The images are cut into consecutive batches of `batch_size` (the batches an unsharded loader of the same
    batch size makes, so a rect dataset's batch shapes hold); rank r takes batches r, r + num_replicas, ... Every
    image is seen by exactly one rank, once: statistics gathered over the ranks equal those of one process. Ranks
    may get one batch fewer than others (or none), so this is for evaluation, never for a training step that
    synchronises gradients. `batch_positions()` gives the global position of each batch this rank yields.
    """

    def __init__(self, num_images: int, batch_size: int, num_replicas: int = 1, rank: int = 0):
        self.num_images, self.batch_size = int(num_images), max(int(batch_size), 1)
        self.num_replicas, self.rank = max(int(num_replicas), 1), int(rank)

    def batch_positions(self) -> range:
        return range(self.rank, math.ceil(self.num_images / self.batch_size), self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Evaluation order never changes with the epoch."""

    def __iter__(self):
        size = self.batch_size
        return iter([list(range(b * size, min((b + 1) * size, self.num_images))) for b in self.batch_positions()])

    def __len__(self) -> int:
        return len(self.batch_positions())


def seeded_index(index) -> int:
    """The dataset index of a sampler item: an `(index, sample_seed)` pair first seeds `random` and NumPy, so the
    sample's augmentation is the same whatever worker makes it; a plain index is returned as it is."""
    if isinstance(index, tuple):
        index, seed = index
        random.seed(seed)
        np.random.seed(seed)
    return index
