"""Transforms keep boxes and pixels together.

Every synthetic image is black with solid, saturated, uniquely coloured rectangles (one colour per box of the whole
fake dataset, colour index == class id), so after any transform the pixels inside each output box must still be
that box's colour and the coloured region must end where the box ends.
"""

import colorsys
import random
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from yolotrain.data.augment import (
    PAD_VALUE,
    Compose,
    CopyPaste,
    Format,
    LetterBox,
    MixUp,
    Mosaic,
    RandomFlip,
    RandomHSV,
    RandomPerspective,
    build_transforms,
)
from yolotrain.errors import CfgError
from yolotrain.utils.boxes import scale_boxes_to_original, xywhn2xyxy

IMGSZ = 128
BOXES_PER_IMAGE = 3
NUM_IMAGES = 6
# 18 fully saturated hues 20 degrees apart: any two differ by >= 85 in some channel, none is near black or gray
PALETTE = np.array(
    [[round(c * 255) for c in colorsys.hsv_to_rgb(i / 18, 1.0, 1.0)] for i in range(18)], dtype=np.int64
)
COLOUR_TOL = 25


# ---------------------------------------------------------------------------------------------------------------
# fake dataset with the YOLODataset sample API
# ---------------------------------------------------------------------------------------------------------------


def _random_boxes(rng, h, w):
    """3 boxes, one per column third of the image, >= 4 px from the borders and from each other."""
    cell_w = w / BOXES_PER_IMAGE
    boxes = []
    for column in range(BOXES_PER_IMAGE):
        box_w = rng.uniform(0.45, 0.8) * cell_w
        box_h = float(np.clip(box_w * rng.uniform(0.7, 1.5), 10, h - 8))
        x1 = column * cell_w + rng.uniform(4, cell_w - 4 - box_w)
        y1 = rng.uniform(4, h - 4 - box_h)
        boxes.append([x1, y1, x1 + box_w, y1 + box_h])
    return np.round(np.array(boxes))  # integer corners: crisp edges in the original


class FakeDataset:
    """Images whose long side is `imgsz * original_scale` on disk, returned resized to long side `imgsz`."""

    def __init__(self, imgsz=IMGSZ, num_images=NUM_IMAGES, original_scale=1.0, seed=0, indices=None):
        rng = np.random.default_rng(seed)
        self.imgsz = imgsz
        self.records = []
        for i in range(num_images):
            long_side = round(imgsz * original_scale)
            short_side = round(long_side * rng.uniform(0.6, 1.0))
            shape = (short_side, long_side)
            boxes = _random_boxes(rng, *shape)
            classes = np.arange(i * BOXES_PER_IMAGE, (i + 1) * BOXES_PER_IMAGE)
            self.records.append((shape, boxes, classes))
        self.indices = list(range(num_images)) if indices is None else list(indices)
        self.calls = 0

    def subset(self, indices):
        view = FakeDataset.__new__(FakeDataset)
        view.__dict__.update(self.__dict__, indices=list(indices), calls=0)
        return view

    def __len__(self):
        return len(self.indices)

    def original(self, i):
        """(original image, original boxes, classes) of record i."""
        (h0, w0), boxes, classes = self.records[self.indices[i]]
        img = np.zeros((h0, w0, 3), np.uint8)
        for (x1, y1, x2, y2), c in zip(boxes.astype(int), classes):
            img[y1:y2, x1:x2] = PALETTE[c]
        return img, boxes.astype(np.float32), classes

    def get_image_and_label(self, i):
        self.calls += 1
        img0, boxes0, classes = self.original(i)
        h0, w0 = img0.shape[:2]
        ratio = self.imgsz / max(h0, w0)
        h, w = round(h0 * ratio), round(w0 * ratio)
        img = img0 if (h, w) == (h0, w0) else cv2.resize(img0, (w, h), interpolation=cv2.INTER_LINEAR)
        bboxes = boxes0 * np.array([w / w0, h / h0] * 2, np.float32)
        return {
            "img": img,
            "cls": classes.astype(np.float32)[:, None],
            "bboxes": bboxes.astype(np.float32),
            "im_file": f"img{i}.jpg",
            "ori_shape": (h0, w0),
            "resized_shape": (h, w),
            "ratio_pad": ((h / h0, w / w0), (0.0, 0.0)),
        }


def make_hyp(**overrides):
    values = dict(
        hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, degrees=0.0, translate=0.1, scale=0.5, shear=0.0, perspective=0.0,
        flipud=0.0, fliplr=0.5, mosaic=1.0, mixup=0.0, copy_paste=0.0,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# pixel checks
# ---------------------------------------------------------------------------------------------------------------


def colour_mask(pixels, colour):
    return np.abs(pixels.astype(np.int64) - colour).max(-1) <= COLOUR_TOL


def centre_fraction(img, box, colour, shrink=0.25):
    """Fraction of the central part of `box` (each side moved in by `shrink` of the size) with `colour`."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx1, cx2 = int(np.floor(x1 + shrink * w)), int(np.ceil(x2 - shrink * w))
    cy1, cy2 = int(np.floor(y1 + shrink * h)), int(np.ceil(y2 - shrink * h))
    region = img[max(cy1, 0): max(cy2, cy1 + 1), max(cx1, 0): max(cx2, cx1 + 1)]
    return colour_mask(region, colour).mean()


def coloured_extent(img, box, colour, margin=4):
    """xyxy extent of the `colour` pixels in a window around `box` (None when there are none)."""
    h, w = img.shape[:2]
    x1, y1, x2, y2 = box
    wx1, wy1 = max(int(x1) - margin, 0), max(int(y1) - margin, 0)
    wx2, wy2 = min(int(np.ceil(x2)) + margin, w), min(int(np.ceil(y2)) + margin, h)
    ys, xs = np.nonzero(colour_mask(img[wy1:wy2, wx1:wx2], colour))
    if len(xs) == 0:
        return None
    return np.array([xs.min() + wx1, ys.min() + wy1, xs.max() + 1 + wx1, ys.max() + 1 + wy1], np.float64)


def touches_border(box, shape, eps=0.5):
    h, w = shape[:2]
    return box[0] <= eps or box[1] <= eps or box[2] >= w - eps or box[3] >= h - eps


def assert_boxes_on_colours(img, cls, bboxes, min_fraction=0.9, position_tol=1.5, border_boxes="strict"):
    """Every box's centre has its class colour and the coloured region ends at the box edges.

    border_boxes: "strict" checks boxes clipped by the image border like the others (right for axis-aligned
    transforms); "loose" only asks that boxes touching the border show their colour somewhere (a rotated box cut
    by the border encloses background the check cannot predict).
    """
    assert len(cls) == len(bboxes)
    for c, box in zip(cls.reshape(-1).astype(int), bboxes):
        colour = PALETTE[c]
        if border_boxes == "loose" and touches_border(box, img.shape):
            assert centre_fraction(img, box, colour, shrink=0.0) > 0.15, (c, box)
            continue
        fraction = centre_fraction(img, box, colour)
        assert fraction >= min_fraction, f"class {c} box {box}: only {fraction:.2f} of its centre has its colour"
        extent = coloured_extent(img, box, colour)
        assert extent is not None, (c, box)
        np.testing.assert_allclose(extent, box, atol=position_tol, err_msg=f"class {c}")


def assert_boxes_valid(bboxes, shape, min_size):
    h, w = shape[:2]
    assert bboxes.dtype == np.float32
    assert np.all(bboxes[:, [0, 2]] >= 0) and np.all(bboxes[:, [0, 2]] <= w)
    assert np.all(bboxes[:, [1, 3]] >= 0) and np.all(bboxes[:, [1, 3]] <= h)
    widths, heights = bboxes[:, 2] - bboxes[:, 0], bboxes[:, 3] - bboxes[:, 1]
    assert np.all(widths >= min_size) and np.all(heights >= min_size)


def assert_visible_objects_kept(img, cls, candidate_classes, area_of):
    """A class whose colour still covers a good part of its original area must have a box."""
    kept = set(cls.reshape(-1).astype(int).tolist())
    for c in candidate_classes:
        visible = colour_mask(img, PALETTE[c]).sum()
        if visible >= 0.25 * area_of[c]:
            assert c in kept, f"class {c} is {visible} px visible but its box was dropped"


def image_and_pixel_boxes(formatted):
    """Undo Format: BGR HWC uint8 image and pixel xyxy boxes."""
    img = formatted["img"].numpy().transpose(1, 2, 0)[..., ::-1]
    h, w = img.shape[:2]
    bboxes = xywhn2xyxy(formatted["bboxes"].numpy(), w, h)
    return np.ascontiguousarray(img), formatted["cls"].numpy(), bboxes


def box_areas(dataset):
    areas = {}
    for i in range(len(dataset)):
        sample = dataset.get_image_and_label(i)
        b = sample["bboxes"]
        for c, area in zip(sample["cls"].reshape(-1).astype(int), (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])):
            areas[c] = area
    return areas


# ---------------------------------------------------------------------------------------------------------------
# the fake dataset itself
# ---------------------------------------------------------------------------------------------------------------


def test_fake_dataset_boxes_match_pixels():
    dataset = FakeDataset(original_scale=1.6)
    for i in range(len(dataset)):
        sample = dataset.get_image_and_label(i)
        assert max(sample["img"].shape[:2]) == IMGSZ
        assert_boxes_on_colours(sample["img"], sample["cls"], sample["bboxes"])


# ---------------------------------------------------------------------------------------------------------------
# LetterBox
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, rect_shape",
    [
        (dict(new_shape=(IMGSZ, IMGSZ)), None),
        (dict(new_shape=(IMGSZ, IMGSZ), scaleup=False), None),
        (dict(new_shape=(IMGSZ, IMGSZ), center=False), None),
        (dict(new_shape=(IMGSZ, IMGSZ), auto=True, stride=32), None),
        (dict(new_shape=(IMGSZ, IMGSZ), scale_fill=True), None),
        (dict(new_shape=(160, 224)), None),  # upscales
        (dict(new_shape=(IMGSZ, IMGSZ), scaleup=False), (96, 128)),  # rectangular validation batch
    ],
)
def test_letterbox_pixels_and_ratio_pad_map_back_to_original(kwargs, rect_shape):
    dataset = FakeDataset(original_scale=1.37)
    letterbox = LetterBox(**kwargs)
    for i in range(len(dataset)):
        sample = dataset.get_image_and_label(i)
        if rect_shape is not None:
            sample["rect_shape"] = rect_shape
        sample_shape = sample["img"].shape[:2]
        out = letterbox(sample)
        expected_shape = rect_shape or kwargs["new_shape"]
        if kwargs.get("auto"):
            assert out["img"].shape[0] % 32 == 0 and out["img"].shape[1] % 32 == 0
            assert out["img"].shape[0] <= expected_shape[0] and out["img"].shape[1] <= expected_shape[1]
        else:
            assert out["img"].shape[:2] == tuple(expected_shape)
        assert out["resized_shape"] == out["img"].shape[:2]
        assert "rect_shape" not in out
        upscale = max(out["img"].shape[0] / sample_shape[0], out["img"].shape[1] / sample_shape[1], 1.0)
        assert_boxes_on_colours(out["img"], out["cls"], out["bboxes"], position_tol=1.0 * upscale + 0.5)  # blur

        _, boxes0, _ = dataset.original(i)
        back = scale_boxes_to_original(out["bboxes"].astype(np.float64), out["ratio_pad"], out["ori_shape"])
        np.testing.assert_allclose(back, boxes0, atol=1e-3)


def test_letterbox_pads_with_gray_around_the_resized_image():
    dataset = FakeDataset()
    sample = dataset.get_image_and_label(0)
    h, w = sample["img"].shape[:2]
    assert h < IMGSZ  # landscape: padding goes above and below
    out = LetterBox((IMGSZ, IMGSZ))(sample)
    (_, _), (pad_w, pad_h) = out["ratio_pad"]
    top = int(pad_h)
    assert pad_w == 0 and top == (IMGSZ - h) // 2
    assert np.all(out["img"][:top] == PAD_VALUE)
    assert np.all(out["img"][top + h:] == PAD_VALUE)
    assert np.array_equal(out["img"][top: top + h], dataset.get_image_and_label(0)["img"])


def test_letterbox_composes_an_existing_pad():
    """ratio_pad chains: letterboxing twice still maps back to the original image."""
    dataset = FakeDataset(original_scale=2.0)
    sample = LetterBox((IMGSZ, IMGSZ))(dataset.get_image_and_label(1))
    out = LetterBox((200, 300))(sample)
    _, boxes0, _ = dataset.original(1)
    back = scale_boxes_to_original(out["bboxes"].astype(np.float64), out["ratio_pad"], out["ori_shape"])
    np.testing.assert_allclose(back, boxes0, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Mosaic
# ---------------------------------------------------------------------------------------------------------------


def test_mosaic_places_images_and_boxes_together():
    dataset = FakeDataset()
    areas = box_areas(dataset)
    mosaic = Mosaic(dataset, IMGSZ, p=1.0)
    for seed in range(25):
        seed_all(seed)
        sample = dataset.get_image_and_label(seed % len(dataset))
        sample["rect_shape"] = (64, 128)  # a rect batch shape means nothing for a square mosaic
        out = mosaic(sample)
        assert out["img"].shape == (2 * IMGSZ, 2 * IMGSZ, 3) and "rect_shape" not in out
        assert out["mosaic_border"] == (-IMGSZ // 2, -IMGSZ // 2)
        assert out["resized_shape"] == (2 * IMGSZ, 2 * IMGSZ)
        assert_boxes_valid(out["bboxes"], out["img"].shape, min_size=1.0)
        assert_boxes_on_colours(out["img"], out["cls"], out["bboxes"])
        assert_visible_objects_kept(out["img"], out["cls"], areas, areas)


def test_mosaic_boxes_stay_inside_canvas_over_many_seeds():
    dataset = FakeDataset(num_images=4, seed=3)
    mosaic = Mosaic(dataset, IMGSZ)
    for seed in range(100):
        seed_all(seed)
        out = mosaic(dataset.get_image_and_label(seed % 4))
        assert_boxes_valid(out["bboxes"], out["img"].shape, min_size=1.0)
        assert out["cls"].shape == (len(out["bboxes"]), 1)


def test_mosaic_off_returns_the_sample_untouched():
    dataset = FakeDataset()
    sample = dataset.get_image_and_label(0)
    out = Mosaic(dataset, IMGSZ, p=0.0)(sample)
    assert out is sample and "mosaic_border" not in out and dataset.calls == 1


# ---------------------------------------------------------------------------------------------------------------
# RandomPerspective
# ---------------------------------------------------------------------------------------------------------------


def letterboxed(dataset, i):
    return LetterBox((IMGSZ, IMGSZ))(dataset.get_image_and_label(i))


def test_perspective_without_gains_is_identity():
    dataset = FakeDataset()
    sample = letterboxed(dataset, 2)
    before_img, before_boxes = sample["img"].copy(), sample["bboxes"].copy()
    out = RandomPerspective(degrees=0, translate=0, scale=0, shear=0, perspective=0)(sample)
    assert np.array_equal(out["img"], before_img)
    np.testing.assert_allclose(out["bboxes"], before_boxes, atol=1e-4)


def test_perspective_scale_and_translate_keep_axis_aligned_boxes_exact():
    dataset = FakeDataset()
    transform = RandomPerspective(degrees=0, translate=0.25, scale=0.5, shear=0, perspective=0)
    for seed in range(30):
        seed_all(seed)
        out = transform(letterboxed(dataset, seed % len(dataset)))
        assert out["img"].shape == (IMGSZ, IMGSZ, 3)
        assert_boxes_valid(out["bboxes"], out["img"].shape, min_size=2.0)
        assert_boxes_on_colours(out["img"], out["cls"], out["bboxes"], position_tol=1.5)


@pytest.mark.parametrize(
    "gains",
    [
        dict(degrees=10.0, translate=0.1, scale=0.0, shear=0.0, perspective=0.0),
        dict(degrees=0.0, translate=0.1, scale=0.0, shear=6.0, perspective=0.0),
        dict(degrees=8.0, translate=0.2, scale=0.4, shear=3.0, perspective=0.0),
        dict(degrees=5.0, translate=0.1, scale=0.3, shear=2.0, perspective=0.0008),
    ],
)
def test_perspective_rotation_shear_keeps_boxes_on_objects(gains):
    dataset = FakeDataset()
    areas = box_areas(dataset)
    transform = RandomPerspective(**gains)
    for seed in range(20):
        seed_all(seed)
        sample = letterboxed(dataset, seed % len(dataset))
        classes = sample["cls"].reshape(-1).astype(int).tolist()
        out = transform(sample)
        assert_boxes_valid(out["bboxes"], out["img"].shape, min_size=2.0)
        assert_boxes_on_colours(
            out["img"], out["cls"], out["bboxes"], min_fraction=0.85, position_tol=2.5, border_boxes="loose"
        )
        if gains["scale"] == 0 and gains["perspective"] == 0:  # object sizes unchanged: visible ones must stay
            assert_visible_objects_kept(out["img"], out["cls"], classes, areas)


def test_perspective_after_mosaic_crops_to_imgsz_and_never_emits_bad_boxes():
    dataset = FakeDataset()
    pipeline = Compose(
        [Mosaic(dataset, IMGSZ), RandomPerspective(degrees=45, translate=0.3, scale=0.9, shear=15, perspective=0.001)]
    )
    for seed in range(60):
        seed_all(seed)
        out = pipeline(dataset.get_image_and_label(seed % len(dataset)))
        assert out["img"].shape == (IMGSZ, IMGSZ, 3)
        assert "mosaic_border" not in out
        assert_boxes_valid(out["bboxes"], out["img"].shape, min_size=2.0)
        widths, heights = out["bboxes"][:, 2] - out["bboxes"][:, 0], out["bboxes"][:, 3] - out["bboxes"][:, 1]
        assert np.all(np.maximum(widths / heights, heights / widths) < 100)


def test_perspective_after_mosaic_keeps_boxes_on_objects():
    dataset = FakeDataset()
    pipeline = Compose([Mosaic(dataset, IMGSZ), RandomPerspective(degrees=0, translate=0.1, scale=0.5)])
    for seed in range(20):
        seed_all(seed)
        out = pipeline(dataset.get_image_and_label(seed % len(dataset)))
        assert_boxes_on_colours(out["img"], out["cls"], out["bboxes"])


def test_perspective_letterboxes_samples_without_mosaic_border():
    dataset = FakeDataset()
    transform = RandomPerspective(translate=0.0, scale=0.0, pre_transform=LetterBox((IMGSZ, IMGSZ)))
    out = transform(dataset.get_image_and_label(0))
    expected = letterboxed(dataset, 0)
    assert np.array_equal(out["img"], expected["img"])
    np.testing.assert_allclose(out["bboxes"], expected["bboxes"], atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# flips, HSV
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
def test_flip_moves_boxes_with_pixels(direction):
    dataset = FakeDataset()
    sample = dataset.get_image_and_label(4)
    h, w = sample["img"].shape[:2]
    boxes = sample["bboxes"].copy()
    out = RandomFlip(p=1.0, direction=direction)(sample)
    assert out["img"].flags["C_CONTIGUOUS"]
    assert_boxes_on_colours(out["img"], out["cls"], out["bboxes"])
    if direction == "horizontal":
        np.testing.assert_allclose(out["bboxes"][:, [0, 2]], w - boxes[:, [2, 0]])
        np.testing.assert_allclose(out["bboxes"][:, [1, 3]], boxes[:, [1, 3]])
    else:
        np.testing.assert_allclose(out["bboxes"][:, [1, 3]], h - boxes[:, [3, 1]])
        np.testing.assert_allclose(out["bboxes"][:, [0, 2]], boxes[:, [0, 2]])


def test_flip_with_zero_probability_changes_nothing():
    dataset = FakeDataset()
    sample = dataset.get_image_and_label(0)
    img, boxes = sample["img"].copy(), sample["bboxes"].copy()
    out = RandomFlip(p=0.0)(sample)
    assert np.array_equal(out["img"], img) and np.array_equal(out["bboxes"], boxes)


def test_flip_rejects_unknown_direction():
    with pytest.raises(ValueError, match="diagonal"):
        RandomFlip(direction="diagonal")


def test_hsv_maps_each_colour_consistently_and_keeps_boxes():
    dataset = FakeDataset()
    sample = letterboxed(dataset, 0)
    boxes = sample["bboxes"].copy()
    palette_img = PALETTE[None].astype(np.uint8).copy()  # (1, 18, 3): every colour once
    changed = False
    for seed in range(5):
        seed_all(seed)
        out = RandomHSV(0.1, 0.7, 0.4)({**sample, "img": sample["img"].copy()})
        seed_all(seed)
        expected_palette = RandomHSV(0.1, 0.7, 0.4)({"img": palette_img.copy()})["img"][0]
        np.testing.assert_array_equal(out["bboxes"], boxes)
        for c, (x1, y1, x2, y2) in zip(out["cls"].reshape(-1).astype(int), boxes.astype(int)):
            inner = out["img"][y1 + 2: y2 - 2, x1 + 2: x2 - 2].reshape(-1, 3).astype(np.int64)
            # OpenCV's vectorised and scalar colour conversions may differ by one level
            assert np.abs(inner - expected_palette[c]).max() <= 1, c
        changed |= not np.array_equal(out["img"], sample["img"])
    assert changed


def test_hsv_without_gains_changes_nothing():
    sample = letterboxed(FakeDataset(), 0)
    img = sample["img"].copy()
    assert np.array_equal(RandomHSV(0, 0, 0)(sample)["img"], img)


# ---------------------------------------------------------------------------------------------------------------
# MixUp, CopyPaste
# ---------------------------------------------------------------------------------------------------------------


def test_mixup_blends_two_images_and_concatenates_boxes():
    dataset = FakeDataset()
    other_only = dataset.subset([1])
    mixup = MixUp(other_only, pre_transform=LetterBox((IMGSZ, IMGSZ)), p=1.0)
    first, second = letterboxed(dataset, 0), letterboxed(dataset, 1)
    seed_all(0)
    out = mixup(letterboxed(dataset, 0))
    np.testing.assert_array_equal(out["cls"], np.concatenate([first["cls"], second["cls"]]))
    np.testing.assert_allclose(out["bboxes"], np.concatenate([first["bboxes"], second["bboxes"]]))

    a, b, mixed = (x.astype(np.float64) for x in (first["img"], second["img"], out["img"]))
    ratio = ((mixed - b) * (a - b)).sum() / ((a - b) ** 2).sum()
    assert 0.25 < ratio < 0.75  # Beta(32, 32) stays close to 0.5
    assert np.abs(mixed - (ratio * a + (1 - ratio) * b)).max() <= 1.0  # one ratio for every pixel
    for c, box in zip(out["cls"].reshape(-1).astype(int), out["bboxes"]):
        x1, y1, x2, y2 = box.astype(int)
        own = first if c in first["cls"] else second
        weight = ratio if own is first else 1 - ratio
        centre = mixed[(y1 + y2) // 2, (x1 + x2) // 2]
        other_pixel = (b if own is first else a)[(y1 + y2) // 2, (x1 + x2) // 2]
        np.testing.assert_allclose(centre, weight * PALETTE[c] + (1 - weight) * other_pixel, atol=1.5)


def test_mixup_off_does_not_load_another_image():
    dataset = FakeDataset()
    sample = letterboxed(dataset, 0)
    calls = dataset.calls
    assert MixUp(dataset, p=0.0)(sample) is sample and dataset.calls == calls


def _sample_from_boxes(boxes, classes, shape=(IMGSZ, IMGSZ)):
    img = np.zeros((*shape, 3), np.uint8)
    for (x1, y1, x2, y2), c in zip(np.array(boxes, int), classes):
        img[y1:y2, x1:x2] = PALETTE[c]
    return {
        "img": img,
        "cls": np.array(classes, np.float32)[:, None],
        "bboxes": np.array(boxes, np.float32),
        "im_file": "x.jpg",
        "ori_shape": shape,
        "resized_shape": shape,
        "ratio_pad": ((1.0, 1.0), (0.0, 0.0)),
    }


def test_copy_paste_pastes_mirrored_boxes_that_land_on_free_space():
    left_boxes = [[5, 10, 30, 40], [10, 60, 40, 100], [20, 105, 45, 125]]
    centre_box = [54, 20, 74, 50]  # its mirror overlaps itself: must not be pasted
    sample = _sample_from_boxes([*left_boxes, centre_box], [0, 1, 2, 3])
    seed_all(0)
    out = CopyPaste(p=1.0)(sample)
    assert len(out["bboxes"]) == 7
    np.testing.assert_array_equal(out["cls"].reshape(-1), [0, 1, 2, 3, 0, 1, 2])
    expected_new = np.array(left_boxes, np.float32)
    expected_new[:, [0, 2]] = IMGSZ - expected_new[:, [2, 0]]
    np.testing.assert_allclose(out["bboxes"][4:], expected_new)
    assert_boxes_on_colours(out["img"], out["cls"], out["bboxes"])


def test_copy_paste_skips_mirrors_covering_existing_boxes():
    boxes = [[5, 10, 40, 60], [90, 12, 122, 58]]  # each one's mirror covers the other almost entirely
    sample = _sample_from_boxes(boxes, [0, 1])
    img = sample["img"].copy()
    out = CopyPaste(p=1.0)(sample)
    assert len(out["bboxes"]) == 2 and np.array_equal(out["img"], img)


# ---------------------------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------------------------


def test_format_outputs_rgb_chw_tensor_and_normalised_xywh():
    sample = _sample_from_boxes([[10, 20, 50, 40], [0, 0, 128, 96]], [0, 12], shape=(96, 128))
    bgr = sample["img"].copy()
    out = Format()(sample)
    assert out["img"].dtype == torch.uint8 and out["img"].shape == (3, 96, 128) and out["img"].is_contiguous()
    assert torch.equal(out["img"], torch.from_numpy(bgr[..., ::-1].transpose(2, 0, 1).copy()))
    assert out["cls"].dtype == torch.float32 and out["cls"].shape == (2, 1)
    assert out["bboxes"].dtype == torch.float32 and out["bboxes"].shape == (2, 4)
    expected = torch.tensor([[30 / 128, 30 / 96, 40 / 128, 20 / 96], [0.5, 0.5, 1.0, 1.0]])
    torch.testing.assert_close(out["bboxes"], expected)
    assert out["im_file"] == "x.jpg" and out["ori_shape"] == (96, 128)


def test_format_handles_images_without_labels():
    sample = _sample_from_boxes(np.zeros((0, 4)), [])
    out = Format()(sample)
    assert out["bboxes"].shape == (0, 4) and out["cls"].shape == (0, 1)


# ---------------------------------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------------------------------


def test_train_pipeline_keeps_boxes_on_objects():
    dataset = FakeDataset()
    transforms = build_transforms(dataset, IMGSZ, make_hyp(degrees=5.0, shear=2.0, flipud=0.5), augment=True)
    for seed in range(20):
        seed_all(seed)
        out = transforms(dataset.get_image_and_label(seed % len(dataset)))
        assert out["img"].shape == (3, IMGSZ, IMGSZ)
        img, cls, bboxes = image_and_pixel_boxes(out)
        assert_boxes_valid(bboxes, img.shape, min_size=2.0 - 1e-3)
        assert_boxes_on_colours(img, cls, bboxes, min_fraction=0.85, position_tol=2.5, border_boxes="loose")


def test_train_pipeline_with_every_augmentation_gives_valid_outputs():
    dataset = FakeDataset()
    hyp = make_hyp(hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, degrees=10, shear=5, perspective=0.0005, flipud=0.5,
                   mixup=0.5, copy_paste=0.5)
    transforms = build_transforms(dataset, IMGSZ, hyp, augment=True)
    for seed in range(20):
        seed_all(seed)
        out = transforms(dataset.get_image_and_label(seed % len(dataset)))
        assert out["img"].shape == (3, IMGSZ, IMGSZ) and out["img"].dtype == torch.uint8
        boxes = out["bboxes"]
        assert boxes.shape == (len(out["cls"]), 4)
        assert torch.all((boxes >= 0) & (boxes <= 1)) and torch.all(boxes[:, 2:] > 0)
        assert torch.all(boxes[:, :2] - boxes[:, 2:] / 2 >= -1e-5)
        assert torch.all(boxes[:, :2] + boxes[:, 2:] / 2 <= 1 + 1e-5)


def test_train_pipeline_without_mosaic_letterboxes_first():
    dataset = FakeDataset()
    transforms = build_transforms(dataset, IMGSZ, make_hyp(mosaic=0.0, fliplr=0.0), augment=True)
    for seed in range(10):
        seed_all(seed)
        out = transforms(dataset.get_image_and_label(seed % len(dataset)))
        img, cls, bboxes = image_and_pixel_boxes(out)
        assert img.shape == (IMGSZ, IMGSZ, 3)
        assert_boxes_on_colours(img, cls, bboxes)
    assert dataset.calls == 10  # no other image was loaded


def test_val_pipeline_letterboxes_and_honours_rect_shape():
    dataset = FakeDataset(original_scale=1.5)
    transforms = build_transforms(dataset, IMGSZ, make_hyp(), augment=False)
    for i, rect_shape in [(0, None), (1, (96, 128))]:
        sample = dataset.get_image_and_label(i)
        if rect_shape:
            sample["rect_shape"] = rect_shape
        out = transforms(sample)
        assert tuple(out["img"].shape[1:]) == (rect_shape or (IMGSZ, IMGSZ))
        img, cls, bboxes = image_and_pixel_boxes(out)
        assert_boxes_on_colours(img, cls, bboxes)
        back = scale_boxes_to_original(bboxes.astype(np.float64), out["ratio_pad"], out["ori_shape"])
        np.testing.assert_allclose(back, dataset.original(i)[1], atol=1e-3)
    assert dataset.calls == 2


def test_close_mosaic_switches_mosaic_mixup_and_copy_paste_off():
    dataset = FakeDataset()
    hyp = make_hyp(translate=0.0, scale=0.0, fliplr=0.0, mixup=1.0, copy_paste=1.0)
    transforms = build_transforms(dataset, IMGSZ, hyp, augment=True)
    seed_all(0)
    transforms(dataset.get_image_and_label(0))
    assert dataset.calls > 4  # mosaic and mixup loaded other images

    transforms.close_mosaic()
    for transform in transforms.transforms:
        if isinstance(transform, (Mosaic, MixUp, CopyPaste)):
            assert transform.p == 0
        if isinstance(transform, RandomPerspective):
            assert transform.border == (0, 0)
    dataset.calls = 0
    out = transforms(dataset.get_image_and_label(3))
    assert dataset.calls == 1  # only the sample itself
    expected = letterboxed(dataset, 3)
    img, cls, bboxes = image_and_pixel_boxes(out)
    assert np.array_equal(img, expected["img"])  # no gains left: exactly the letterboxed image
    np.testing.assert_allclose(bboxes, expected["bboxes"], atol=1e-3)


def test_train_pipeline_is_deterministic_for_a_seed():
    dataset = FakeDataset()
    hyp = make_hyp(hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, degrees=10, shear=2, mixup=0.5, copy_paste=0.5)
    transforms = build_transforms(dataset, IMGSZ, hyp, augment=True)

    def run(seed):
        seed_all(seed)
        return transforms(dataset.get_image_and_label(2))

    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first["img"], again["img"]) and torch.equal(first["bboxes"], again["bboxes"])
    assert torch.equal(first["cls"], again["cls"])
    assert not torch.equal(first["img"], other["img"])


@pytest.mark.parametrize("hyp_kind", ["object", "dict"])
def test_build_transforms_accepts_objects_and_dicts(hyp_kind):
    hyp = make_hyp()
    hyp = vars(hyp) if hyp_kind == "dict" else hyp
    transforms = build_transforms(FakeDataset(), IMGSZ, hyp, augment=True)
    assert [type(t).__name__ for t in transforms.transforms] == [
        "Mosaic", "CopyPaste", "RandomPerspective", "MixUp", "RandomHSV", "RandomFlip", "RandomFlip", "Format",
    ]


@pytest.mark.parametrize(
    "key, value, message",
    [("mosaic", 1.5, "'mosaic'=1.5"), ("scale", 1.0, "'scale'=1.0"), ("degrees", "ten", "'degrees'='ten'"),
     ("mixup", None, "'mixup'=None")],
)
def test_build_transforms_rejects_bad_gains_with_one_line(key, value, message):
    hyp = vars(make_hyp())
    if value is None:
        del hyp[key]
    else:
        hyp[key] = value
    with pytest.raises(CfgError, match=message) as info:
        build_transforms(FakeDataset(), IMGSZ, hyp, augment=True)
    assert "\n" not in str(info.value)
