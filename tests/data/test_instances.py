"""Every per-object array stays on its object through every transform and through collate.

Each object is a filled rectangle of its class's colour; its polygon traces the rectangle and its three keypoints
sit inside it (centre, a left point, a right point, with flip_idx swapping left and right). After a transform the
pixel under every visible keypoint must still have its object's colour, every polygon point must lie in its box,
and the left keypoint must still be left of the right one (a horizontal flip without the swap would break that).
"""

import random

import numpy as np
import pytest
import torch

from yolotrain.data.augment import (
    Compose,
    CopyPaste,
    Format,
    LetterBox,
    MixUp,
    Mosaic,
    RandomFlip,
    RandomPerspective,
    build_transforms,
)
from yolotrain.data.instances import PER_OBJECT_KEYS, Instances, concatenated_objects, keep_objects
from yolotrain.data.loader import collate_fn
from yolotrain.errors import CfgError

COLOURS_BGR = np.array([(40, 40, 230), (230, 160, 30), (40, 200, 40)], np.uint8)
FLIP_IDX = [0, 2, 1]  # centre stays, left and right swap
IMGSZ = 96


def make_sample(layout, height=80, width=128, seed=0):
    """`layout`: [(cls, x1, y1, x2, y2)] rectangles. Returns the sample with cls, bboxes, segments, keypoints and
    corners (each rectangle's 4 corners, as a rotated box's would be)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
    rows = np.array(layout, np.float32).reshape(-1, 5)
    cls, boxes = rows[:, :1], rows[:, 1:]
    for c, (x1, y1, x2, y2) in zip(cls[:, 0].astype(int), boxes.astype(int)):
        img[y1:y2, x1:x2] = COLOURS_BGR[c]
    x1, y1, x2, y2 = boxes.T
    fractions = np.linspace(0, 1, 5)[:-1]  # 4 points per side, around the rectangle
    top = np.stack([x1[:, None] + fractions * (x2 - x1)[:, None], np.repeat(y1[:, None], 4, 1)], -1)
    right = np.stack([np.repeat(x2[:, None], 4, 1), y1[:, None] + fractions * (y2 - y1)[:, None]], -1)
    bottom = np.stack([x2[:, None] - fractions * (x2 - x1)[:, None], np.repeat(y2[:, None], 4, 1)], -1)
    left = np.stack([np.repeat(x1[:, None], 4, 1), y2[:, None] - fractions * (y2 - y1)[:, None]], -1)
    segments = np.concatenate([top, right, bottom, left], 1).astype(np.float32)  # (n, 16, 2)
    cy = (y1 + y2) / 2
    keypoints = np.stack([
        np.stack([(x1 + x2) / 2, cy, np.full_like(cy, 2)], -1),
        np.stack([x1 + (x2 - x1) / 3, cy, np.full_like(cy, 2)], -1),
        np.stack([x1 + 2 * (x2 - x1) / 3, cy, np.full_like(cy, 2)], -1),
    ], 1).astype(np.float32)  # (n, 3, 3): centre, left, right
    corners = boxes[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2).copy()
    return {"img": img, "cls": cls, "bboxes": boxes.copy(), "segments": segments, "keypoints": keypoints,
            "corners": corners, "im_file": f"scene{seed}.jpg", "ori_shape": (height, width), "resized_shape": (height, width),
            "ratio_pad": ((1.0, 1.0), (0.0, 0.0))}


LAYOUTS = [
    [(0, 8, 10, 52, 50), (1, 70, 20, 118, 70)],
    [(2, 20, 8, 80, 44), (0, 60, 46, 110, 78)],
    [(1, 4, 4, 44, 40), (2, 50, 30, 100, 76), (0, 100, 4, 126, 30)],
]


class Scenes:
    """What Mosaic and MixUp draw other samples from."""

    rect = False
    data = {"flip_idx": FLIP_IDX}

    def __len__(self):
        return len(LAYOUTS)

    def get_image_and_label(self, index):
        return make_sample(LAYOUTS[index], seed=index)


def assert_objects_aligned(sample, check_pixels=True):
    img, cls = sample["img"], sample["cls"][:, 0].astype(int)
    boxes, segments, keypoints = sample["bboxes"], sample["segments"], sample["keypoints"]
    assert len(cls) == len(boxes) == len(segments) == len(keypoints) > 0
    inside_box = (segments[..., :2] >= boxes[:, None, :2] - 0.5) & (segments[..., :2] <= boxes[:, None, 2:] + 0.5)
    assert inside_box.all(), "a polygon point left its object's box"
    h, w = img.shape[:2]
    corners = sample["corners"]
    extent = np.concatenate([corners.min(1), corners.max(1)], 1).clip(0, [w, h, w, h])  # boxes are clipped
    # A warp's rotated box is refitted to the smallest rectangle around the warped corners: it encloses the
    # object's box and reaches at most a little past it (a slightly sheared rectangle's enclosing rectangle).
    assert (extent[:, :2] <= boxes[:, :2] + 0.5).all() and (extent[:, 2:] >= boxes[:, 2:] - 0.5).all(), \
        "rotated corners left their object's box"
    np.testing.assert_allclose(extent, boxes, atol=3.0, err_msg="rotated corners strayed from their object's box")
    visible = keypoints[..., 2] > 0
    assert (keypoints[:, 1, 0] < keypoints[:, 2, 0])[visible[:, 1] & visible[:, 2]].all(), "left is right of right"
    if not check_pixels:
        return
    for c, points, seen in zip(cls, keypoints, visible):  # a test helper: a few objects
        for x, y, _ in points[seen]:
            if 0 <= x < w and 0 <= y < h:
                pixel = img[int(y), int(x)].astype(int)
                assert np.abs(pixel - COLOURS_BGR[c]).max() <= 40, (c, (x, y), pixel)


def test_the_scene_itself_is_aligned():
    assert_objects_aligned(make_sample(LAYOUTS[0]))


@pytest.mark.parametrize("transform", [
    LetterBox((IMGSZ, IMGSZ)),
    RandomPerspective(degrees=10, translate=0.1, scale=0.3, shear=2, perspective=0.0005,
                      pre_transform=LetterBox((IMGSZ, IMGSZ))),
    RandomFlip(p=1.0, direction="horizontal", flip_idx=FLIP_IDX),
    RandomFlip(p=1.0, direction="vertical"),
    CopyPaste(p=1.0, flip_idx=FLIP_IDX),
    Compose([Mosaic(Scenes(), IMGSZ, p=1.0), RandomPerspective(degrees=5, scale=0.2)]),
], ids=["letterbox", "perspective", "fliplr", "flipud", "copy_paste", "mosaic"])
@pytest.mark.parametrize("seed", range(4))
def test_each_transform_keeps_every_label_on_its_object(transform, seed):
    random.seed(seed)
    layout = LAYOUTS[seed % len(LAYOUTS)]
    sample = transform(make_sample(layout, seed=seed))
    assert_objects_aligned(sample)


def test_copy_paste_adds_each_mirrored_object_with_its_polygon_and_swapped_keypoints():
    random.seed(0)
    original = make_sample([(0, 8, 10, 40, 50)])
    sample = CopyPaste(p=1.0, flip_idx=FLIP_IDX)(make_sample([(0, 8, 10, 40, 50)]))
    assert len(sample["cls"]) == 2
    mirrored = Instances.from_sample(original).flip("horizontal", 128, FLIP_IDX)
    np.testing.assert_allclose(sample["keypoints"][1], mirrored.keypoints[0])
    np.testing.assert_allclose(sample["segments"][1], mirrored.segments[0])


class LastScene(Scenes):
    def get_image_and_label(self, index):
        return make_sample(LAYOUTS[-1], seed=9)


def test_mixup_appends_the_other_samples_objects_in_step():
    random.seed(0)
    mixup = MixUp(LastScene(), pre_transform=LetterBox((IMGSZ, IMGSZ)), p=1.0)
    sample = mixup(LetterBox((IMGSZ, IMGSZ))(make_sample(LAYOUTS[0])))
    assert_objects_aligned(sample, check_pixels=False)  # blended pixels are no longer one colour
    other = LetterBox((IMGSZ, IMGSZ))(make_sample(LAYOUTS[-1], seed=9))
    assert len(sample["cls"]) == len(LAYOUTS[0]) + len(LAYOUTS[-1])
    np.testing.assert_allclose(sample["keypoints"][len(LAYOUTS[0]):], other["keypoints"])
    np.testing.assert_allclose(sample["segments"][len(LAYOUTS[0]):], other["segments"])


def test_the_training_pipeline_and_collate_keep_objects_with_their_images():
    random.seed(1)
    hyp = {"mosaic": 1.0, "mixup": 0.0, "copy_paste": 0.5, "degrees": 10.0, "translate": 0.1, "scale": 0.3,
           "shear": 2.0, "perspective": 0.0, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0, "flipud": 0.5, "fliplr": 0.5}
    pipeline = build_transforms(Scenes(), IMGSZ, hyp, augment=True)
    without_format = Compose(pipeline.transforms[:-1])
    for index in range(len(LAYOUTS)):
        assert_objects_aligned(without_format(Scenes().get_image_and_label(index)))
    batch = collate_fn([pipeline(Scenes().get_image_and_label(i)) for i in range(len(LAYOUTS))])
    n = len(batch["cls"])
    assert batch["bboxes"].shape == (n, 4) and batch["segments"].shape == (n, 16, 2)
    assert batch["keypoints"].shape == (n, 3, 3) and batch["batch_idx"].shape == (n,)
    # Normalised: every visible keypoint of object i lies in box i (xywhn), which belongs to image batch_idx[i].
    centre, size = batch["bboxes"][:, :2], batch["bboxes"][:, 2:]
    points, visible = batch["keypoints"][..., :2], batch["keypoints"][..., 2] > 0
    inside = ((points - centre[:, None]).abs() <= size[:, None] / 2 + 1e-3).all(-1)
    assert inside[visible].all()
    assert torch.equal(batch["batch_idx"].unique(), torch.arange(len(LAYOUTS)).float())


def test_keep_and_join_act_on_every_per_object_array():
    a, b = make_sample(LAYOUTS[0]), make_sample(LAYOUTS[2], seed=2)
    joined = concatenated_objects([a, b])
    assert {k: len(v) for k, v in joined.items()} == dict.fromkeys(PER_OBJECT_KEYS, 5)
    kept = keep_objects(dict(joined), np.array([False, True, True, False, True]))
    np.testing.assert_array_equal(kept["keypoints"], joined["keypoints"][[1, 2, 4]])
    del b["keypoints"]
    with pytest.raises(ValueError, match="disagree on 'keypoints'"):
        concatenated_objects([a, b])


def test_a_horizontal_flip_of_keypoints_without_flip_idx_is_a_clear_error():
    with pytest.raises(CfgError, match="needs flip_idx"):
        RandomFlip(p=1.0, direction="horizontal")(make_sample(LAYOUTS[0]))


def test_keypoints_pushed_out_of_the_image_become_invisible():
    instances = Instances(np.array([[0, 0, 10, 10]], np.float32),
                          keypoints=np.array([[[5, 5, 2], [-3, 5, 2], [5, 12, 1]]], np.float32))
    clipped = instances.clip(10, 10)
    np.testing.assert_array_equal(clipped.keypoints[0, :, 2], [2, 0, 0])


def test_format_normalises_points_by_the_image_size():
    sample = Format()(LetterBox((IMGSZ, IMGSZ))(make_sample(LAYOUTS[0])))
    assert sample["keypoints"].dtype == torch.float32 and float(sample["keypoints"][..., :2].max()) <= 1.0
    np.testing.assert_allclose(sample["keypoints"][..., 2].numpy(), 2.0)  # visibility is not a coordinate
