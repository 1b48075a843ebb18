"""rect=True in training: batches of one rectangular shape each, shuffled as whole groups by (seed, epoch),
resumable mid-epoch, sharded over ranks by whole groups, with the boxes on their objects' pixels."""

import logging

import numpy as np
import pytest
import torch


from yolotrain import DetectionTrainer
from yolotrain.data.dataset import YOLODataset
from yolotrain.data.loader import build_dataloader, set_loader_epoch
from yolotrain.data.samplers import GroupBatchSampler, shard
from yolotrain.errors import CfgError
from yolotrain.utils.boxes import xywhn2xyxy

IMGSZ = 128
# Saturated BGR colours, one per class; every pair differs by >= 255 in some channel.
COLOURS = np.array([[0, 0, 255], [0, 255, 0], [255, 0, 0], [0, 255, 255], [255, 0, 255], [255, 255, 0]])
COLOUR_TOL = 40
# (h, w) of the originals: wide, tall and square ones, so rect groups have several shapes.
SHAPES = [(100, 200), (104, 200), (200, 100), (200, 96), (150, 150), (120, 200), (200, 120), (100, 200)]


def hyp(**overrides):
    values = dict(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, degrees=0.0, translate=0.1, scale=0.25, shear=0.0,
                  perspective=0.0, flipud=0.0, fliplr=0.5, mosaic=0.5, mixup=0.5, copy_paste=0.0)
    values.update(overrides)
    return values


@pytest.fixture
def coloured_split(tmp_path, write_coloured_split):
    """PNG images (black, with two solid rectangles of the class colours) and their labels; returns the folder."""
    return write_coloured_split(tmp_path / "ds", SHAPES, [(0.1, 0.15, 0.4, 0.6), (0.55, 0.4, 0.9, 0.85)], COLOURS)


def rect_dataset(folder, batch=2, **hyp_overrides):
    return YOLODataset(folder, imgsz=IMGSZ, augment=True, hyp=hyp(**hyp_overrides), rect=True, batch_size=batch,
                       stride=32, pad=0.0, data={"nc": len(COLOURS), "names": dict(enumerate("abcdef"))}, workers=1)


def epoch_batches(loader, epoch, **kwargs):
    set_loader_epoch(loader, epoch, **kwargs)
    return list(loader)


def files(batches):
    return [tuple(b["im_file"]) for b in batches]


def test_rect_batches_have_one_rectangular_shape_each_and_mosaic_is_off(coloured_split, caplog):
    with caplog.at_level(logging.WARNING, logger="yolotrain.data.augment"):
        dataset = rect_dataset(coloured_split)  # 0 < mosaic < 1 and mixup: once a crash, now both off
    assert "rect=True: mosaic and mixup are off" in caplog.text and len(caplog.records) == 1
    loader = build_dataloader(dataset, batch=2, workers=0, shuffle=True, seed=0)
    assert len(loader) == 4
    non_square = 0
    for epoch in range(3):
        for batch in epoch_batches(loader, epoch):
            group = {int(dataset.batch[dataset.im_files.index(f)]) for f in batch["im_file"]}
            assert len(group) == 1  # a whole group per batch...
            expected = tuple(int(s) for s in dataset.batch_shapes[group.pop()])
            assert tuple(batch["img"].shape[2:]) == expected  # ...letterboxed to its own shape
            non_square += expected[0] != expected[1]
    assert non_square >= 6  # the wide and tall groups are not square


def colour_extent(img, colour):
    """xyxy of the pixels within COLOUR_TOL of `colour`, or None."""
    ys, xs = np.nonzero(np.abs(img.astype(np.int64) - colour).max(-1) <= COLOUR_TOL)
    return None if len(xs) == 0 else np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def test_boxes_stay_on_their_pixels_in_rect_batches(coloured_split):
    dataset = rect_dataset(coloured_split, batch=2)
    loader = build_dataloader(dataset, batch=2, workers=0, shuffle=True, seed=3)
    checked = 0
    for epoch in range(3):
        for batch in epoch_batches(loader, epoch):
            height, width = batch["img"].shape[2:]
            for j in range(len(batch["img"])):
                img = batch["img"][j].numpy().transpose(1, 2, 0)[..., ::-1]  # RGB CHW -> BGR HWC
                mine = batch["batch_idx"] == j
                boxes = xywhn2xyxy(batch["bboxes"][mine].numpy(), width, height)
                for c, box in zip(batch["cls"][mine].view(-1).int().tolist(), boxes):
                    # Each class colour appears once per image; crop to the box's window so another image's
                    # object of that class cannot be matched.
                    x1, y1, x2, y2 = np.round(box).astype(int)
                    window = img[max(y1 - 3, 0): y2 + 3, max(x1 - 3, 0): x2 + 3]
                    extent = colour_extent(window, COLOURS[c])
                    assert extent is not None, (c, box)
                    extent += [max(x1 - 3, 0), max(y1 - 3, 0)] * 2
                    np.testing.assert_allclose(extent, box, atol=1.5, err_msg=f"class {c}")
                    checked += 1
    assert checked >= 40


def test_group_order_is_a_function_of_seed_and_epoch():
    group_ids = np.repeat(np.arange(10), 3)

    def order(seed, epoch):
        sampler = GroupBatchSampler(group_ids, seed=seed)
        sampler.set_epoch(epoch)
        return [tuple(i for i, _ in batch) for batch in sampler]

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)
    assert sorted(order(0, 1)) == [tuple(range(g * 3, g * 3 + 3)) for g in range(10)]


def test_resume_mid_epoch_yields_the_same_remaining_batches(coloured_split):
    straight = build_dataloader(rect_dataset(coloured_split), batch=2, workers=0, shuffle=True, seed=5)
    epoch_batches(straight, 0)
    full = epoch_batches(straight, 1)
    resumed = build_dataloader(rect_dataset(coloured_split), batch=2, workers=0, shuffle=True, seed=5)
    rest = epoch_batches(resumed, 1, start_batch=2)
    assert len(rest) == len(full) - 2 and files(rest) == files(full[2:])
    for a, b in zip(rest, full[2:]):
        assert torch.equal(a["img"], b["img"]) and torch.equal(a["bboxes"], b["bboxes"])  # same augmentation
    assert files(epoch_batches(resumed, 1)) == files(full)  # the skip applies to one pass only
    assert files(epoch_batches(resumed, 1, salt=1)) != files(full)


def test_ranks_take_disjoint_whole_groups_covering_the_epoch():
    group_ids = np.repeat(np.arange(6), 4)
    samplers = [GroupBatchSampler(group_ids, num_replicas=2, rank=r, seed=2) for r in range(2)]
    for sampler in samplers:
        sampler.set_epoch(3)
    per_rank = [[frozenset(i for i, _ in batch) for batch in sampler] for sampler in samplers]
    groups = {frozenset(range(g * 4, g * 4 + 4)) for g in range(6)}
    assert set(per_rank[0]) | set(per_rank[1]) == groups and not set(per_rank[0]) & set(per_rank[1])
    assert len(per_rank[0]) == len(per_rank[1]) == len(samplers[0]) == 3
    single = GroupBatchSampler(group_ids, seed=2)
    single.set_epoch(3)
    order = [frozenset(i for i, _ in batch) for batch in single]
    assert per_rank[0] == order[0::2] and per_rank[1] == order[1::2]  # each rank's share of one global order
    assert shard([0, 1, 2, 3, 4], 1, 2) == [1, 3, 0] and shard([0, 1, 2, 3, 4], 0, 2) == [0, 2, 4]  # equal counts


def test_rect_loader_shards_whole_batches_over_ranks(coloured_split):
    dataset = rect_dataset(coloured_split)
    loaders = [build_dataloader(dataset, 2, 0, True, rank=r, seed=1, world_size=2) for r in range(2)]
    per_rank = [files(epoch_batches(loader, 0)) for loader in loaders]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    groups = {tuple(f for f, g in zip(dataset.im_files, dataset.batch) if g == group) for group in range(4)}
    assert set(per_rank[0]) | set(per_rank[1]) == groups and not set(per_rank[0]) & set(per_rank[1])


def test_rect_and_image_weights_cannot_be_combined(coloured_split):
    with pytest.raises(CfgError, match="image_weights=True cannot be combined with rect=True") as info:
        build_dataloader(rect_dataset(coloured_split), 2, 0, True, image_weights=True)
    assert "\n" not in str(info.value)


def test_rect_training_run_with_partial_mosaic(train_overrides):
    """The tiny dataset is 64x48 and 48x64 images; at 128 px its rect batches are 96x128 and 128x96."""
    shapes = []
    trainer = DetectionTrainer(overrides={**train_overrides, "rect": True, "mosaic": 0.5, "imgsz": 128,
                                          "batch": 2, "epochs": 1, "val": False})
    trainer.add_callback("on_train_batch_end", lambda t: shapes.append(t.last_batch_shape[2:]))
    trainer.train()
    assert len(shapes) == 2 and set(shapes) == {(96, 128), (128, 96)}
