"""collate_fn, worker seeding and the (seed, epoch)-determined order of build_dataloader."""

import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from yolotrain.data.loader import (
    build_dataloader,
    collate_fn,
    resolve_workers,
    set_loader_epoch,
)
from yolotrain.utils import threads


class RandomDataset(Dataset):
    """Formatted samples whose content also draws from numpy and torch RNGs, like augmentation does."""

    def __init__(self, n=12):
        self.n = n
        self.rect = False

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(i, tuple):  # (index, per-sample seed) from the loader's sampler, as YOLODataset takes it
            i, seed = i
            np.random.seed(seed)
        num_boxes = i % 3
        jitter = int(np.random.randint(0, 10**9))  # numpy, as augmentation draws from it
        return {
            "img": torch.full((3, 4, 4), i, dtype=torch.uint8),
            "cls": torch.full((num_boxes, 1), float(i)),
            "bboxes": torch.rand(num_boxes, 4),
            "im_file": f"{i}.jpg",
            "jitter": jitter,
        }


def formatted(num_boxes, fill):
    return {"img": torch.full((3, 2, 2), fill, dtype=torch.uint8), "cls": torch.ones(num_boxes, 1),
            "bboxes": torch.full((num_boxes, 4), 0.5), "im_file": f"{fill}.jpg", "ori_shape": (2, 2)}


def test_collate_handles_images_without_boxes():
    batch = collate_fn([formatted(0, 0), formatted(2, 1), formatted(0, 2), formatted(1, 3)])
    assert batch["img"].shape == (4, 3, 2, 2) and batch["img"].dtype == torch.uint8
    assert batch["cls"].shape == (3, 1) and batch["bboxes"].shape == (3, 4)
    assert batch["batch_idx"].tolist() == [1.0, 1.0, 3.0] and batch["batch_idx"].dtype == torch.float32
    assert batch["im_file"] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"] and batch["ori_shape"] == [(2, 2)] * 4


def test_collate_of_only_backgrounds_gives_empty_targets():
    batch = collate_fn([formatted(0, 0), formatted(0, 1)])
    assert batch["cls"].shape == (0, 1) and batch["bboxes"].shape == (0, 4) and batch["batch_idx"].shape == (0,)


def epoch_batches(loader, epoch):
    set_loader_epoch(loader, epoch)
    return [(b["img"][:, 0, 0, 0].tolist(), b["jitter"], b["bboxes"]) for b in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (order_a, jitter_a, boxes_a), (order_b, jitter_b, boxes_b) in zip(a, b):
        assert order_a == order_b and jitter_a == jitter_b
        torch.testing.assert_close(boxes_a, boxes_b)


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_gives_same_order_and_batches(workers):
    loaders = [build_dataloader(RandomDataset(), batch=4, workers=workers, shuffle=True, seed=7) for _ in range(2)]
    runs = []
    for loader in loaders:
        torch.manual_seed(1), np.random.seed(1), random.seed(1)  # what workers=0 draws from
        runs.append(epoch_batches(loader, 0))
    assert_same_batches(*runs)
    assert sorted(i for order, _, _ in runs[0] for i in order) == list(range(12))


def test_workers_seed_numpy_from_the_loader_seed():
    def jitters(seed):
        np.random.seed(1)  # forked workers inherit this state: the loader seed must decide theirs instead
        loader = build_dataloader(RandomDataset(8), batch=4, workers=2, shuffle=False, seed=seed)
        set_loader_epoch(loader, 0)
        return [j for batch in loader for j in batch["jitter"]]

    assert jitters(7) == jitters(7)
    assert jitters(7) != jitters(8)


def test_different_seeds_and_epochs_change_the_order():
    def order(seed, epoch):
        loader = build_dataloader(RandomDataset(), batch=4, workers=0, shuffle=True, seed=seed)
        set_loader_epoch(loader, epoch)
        return flat_order(loader)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != order(0, 1)


def flat_order(loader):
    return [i for batch in loader for i in batch["img"][:, 0, 0, 0].tolist()]


def test_epoch_order_is_a_function_of_seed_and_epoch_for_resume():
    straight = build_dataloader(RandomDataset(), batch=4, workers=0, shuffle=True, seed=3)
    orders = []
    for epoch in range(3):
        set_loader_epoch(straight, epoch)
        orders.append(flat_order(straight))
    resumed = build_dataloader(RandomDataset(), batch=4, workers=0, shuffle=True, seed=3)
    set_loader_epoch(resumed, 2)
    assert flat_order(resumed) == orders[2]
    unset = build_dataloader(RandomDataset(), batch=4, workers=0, shuffle=True, seed=3)
    assert [flat_order(unset), flat_order(unset)] == orders[:2]  # without set_loader_epoch epochs still advance


def test_unshuffled_loader_is_sequential_and_rect_shuffles_whole_groups():
    dataset = RandomDataset(6)
    assert [i for b in build_dataloader(dataset, 4, 0, shuffle=False) for i in b["img"][:, 0, 0, 0].tolist()] == [
        0, 1, 2, 3, 4, 5]
    dataset.rect, dataset.batch = True, np.arange(6) // 2  # groups {0, 1}, {2, 3}, {4, 5}
    loader = build_dataloader(dataset, batch=2, workers=0, shuffle=True, seed=1)
    orders = []
    for epoch in range(4):
        set_loader_epoch(loader, epoch)
        batches = [b["img"][:, 0, 0, 0].tolist() for b in loader]
        assert sorted(batches) == [[0, 1], [2, 3], [4, 5]]  # every batch is one whole group
        orders.append(batches)
    assert len({str(order) for order in orders}) > 1  # the groups are shuffled


def test_distributed_sampler_splits_the_dataset_between_ranks():
    loaders = [build_dataloader(RandomDataset(), 2, 0, True, rank=r, seed=5, world_size=2) for r in range(2)]
    assert all(isinstance(loader.sampler, DistributedSampler) for loader in loaders)
    for loader in loaders:
        set_loader_epoch(loader, 1)
    per_rank = [flat_order(loader) for loader in loaders]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(12)) and len(per_rank[0]) == 6
    odd = [build_dataloader(RandomDataset(5), 2, 0, False, rank=r, world_size=2) for r in range(2)]
    assert [flat_order(loader) for loader in odd] == [[0, 2, 4], [1, 3, 0]]  # padded so ranks stay in step


def test_resume_mid_epoch_skips_finished_batches_and_salt_changes_the_order():
    loader = build_dataloader(RandomDataset(), batch=4, workers=0, shuffle=True, seed=3)
    set_loader_epoch(loader, 4)
    full = flat_order(loader)
    set_loader_epoch(loader, 4, start_batch=2)
    assert flat_order(loader) == full[8:] and len(loader) == 3  # length stays the full epoch
    set_loader_epoch(loader, 4)
    assert flat_order(loader) == full  # the skip applies to one pass only
    set_loader_epoch(loader, 4, salt=1)
    assert flat_order(loader) != full


def test_worker_count_is_capped(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 6)
    assert resolve_workers(batch=1, workers=8) == 0
    assert resolve_workers(batch=16, workers=8) == 6
    assert resolve_workers(batch=16, workers=8, world_size=12) == 0
    assert resolve_workers(batch=16, workers=8, world_size=2) == 3
    assert resolve_workers(batch=4, workers=64) == 4
    assert resolve_workers(batch=16, workers=8, compute_threads=6) == 6  # a bigger machine keeps its workers


def test_small_machine_computing_on_the_cpu_loads_in_process(monkeypatch):
    """Two CPUs held by the compute threads leave the workers none; what the threads leave free, they take."""
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    assert resolve_workers(batch=16, workers=8) == 2  # the model computes elsewhere (a GPU)
    assert resolve_workers(batch=16, workers=8, compute_threads=2) == 0
    assert resolve_workers(batch=16, workers=8, compute_threads=1) == 1
    assert resolve_workers(batch=16, workers=8, world_size=2, compute_threads=1) == 0  # one CPU per rank
    assert build_dataloader(RandomDataset(), batch=4, workers=2, shuffle=True, compute_threads=2).num_workers == 0
    assert build_dataloader(RandomDataset(), batch=4, workers=2, shuffle=True, compute_threads=1).num_workers == 1


def test_augmentation_draws_are_a_function_of_seed_epoch_and_index():
    """Epoch 1 straight after epoch 0, or alone as after a resume, with 0 or 2 workers: identical samples."""
    def jitters(loader):
        return [b["jitter"] for b in loader]

    straight = build_dataloader(RandomDataset(), batch=4, workers=2, shuffle=True, seed=5)
    set_loader_epoch(straight, 0)
    jitters(straight)
    set_loader_epoch(straight, 1)
    after_epoch0 = jitters(straight)

    resumed = build_dataloader(RandomDataset(), batch=4, workers=0, shuffle=True, seed=5)
    set_loader_epoch(resumed, 1)
    assert jitters(resumed) == after_epoch0

    mid_epoch = build_dataloader(RandomDataset(), batch=4, workers=0, shuffle=True, seed=5)
    set_loader_epoch(mid_epoch, 1, start_batch=1)
    assert jitters(mid_epoch) == after_epoch0[1:]
