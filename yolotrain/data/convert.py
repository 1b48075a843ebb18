"""Convert annotations into a YOLO dataset folder: a COCO detection, keypoint or segmentation file
(`yolotrain convert coco`), a folder of mask images whose pixel values are classes (`yolotrain convert masks`), or
DOTA's oriented-box label files (`yolotrain convert dota`).

Output layout, for `instances_val2017.json`:

    out_dir/images/val2017/<file_name>   symlinks to the source images (copies where links are not possible)
    out_dir/labels/val2017/<stem>.txt    `cls cx cy w h` per box, normalised by the image size in the JSON; for a
                                         keypoint file (person_keypoints_val2017.json) followed by the K keypoints
                                         `x y visibility` of the object; with `segments=True` instead the object's
                                         outline `cls x1 y1 x2 y2 ...` (a YOLO segmentation row)
    out_dir/data.yaml                    train and val both point at images/val2017; names from the categories;
                                         `coco_json` (the annotation file, absolute) and `coco_category_ids` (the
                                         COCO category id of each class), so that validation with save_json=True
                                         writes COCO's own ids and scores predictions.json with pycocotools;
                                         for keypoints also `kpt_shape` [K, 3] and `flip_idx` (each `left_*`
                                         keypoint's `right_*` twin, from the category's keypoint names)

Polygons are in continuous pixel coordinates: pixel column x spans [x, x + 1), so an outline traced through the
centres of a mask's boundary pixels lies at `contour + 0.5`. An object of several parts (COCO's multi-polygon
objects, a mask region with holes, a region split in two) is written as one polygon: each part is linked to the next
by the shortest segment between their points, walked there and back, so the outline stays one closed path and
filling it with the even-odd rule (as `cv2.fillPoly` does) gives back every part and every hole.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from yolotrain.data.data_yaml import has_image_suffix
from yolotrain.data.tiles import cut_to_rectangles, inside_shares
from yolotrain.errors import CfgError, DatasetError, one_line

logger = logging.getLogger(__name__)

REQUIRED_TOP_KEYS = ("images", "annotations", "categories")
REQUIRED_IMAGE_KEYS = ("id", "file_name", "width", "height")
REQUIRED_ANNOTATION_KEYS = ("image_id", "category_id", "bbox")
REQUIRED_CATEGORY_KEYS = ("id", "name")
SPLIT_PREFIXES = ("instances_", "person_keypoints_")  # COCO's file names: instances_train2017.json -> "train2017"
MIN_POLYGON_POINTS = 3
SIMPLIFY_EPSILON = 0.5  # pixels: outlines traced from masks are simplified this far, so masks stay exact to ~1 px
DEFAULT_MIN_AREA = 16  # pixels: mask regions smaller than this are noise, not objects
VOID_PIXEL = 255  # in multi-class masks (PASCAL VOC's convention): object borders and unlabelled pixels
BACKGROUND, UNEXPECTED = -1, -2  # the "class" of a mask value that is no object, and of one that no rule covers
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")  # lossless formats only: JPEG mixes neighbouring class values
CLOSEST_PAIR_BLOCK = 1 << 20  # point pairs compared at once when linking two parts (bounds the memory used)
RLE_MAX_CHARS_PER_COUNT = 12  # 5 bits each: 60 bits, more than any count of a real mask
# DOTA's classes in the order DOTA models are trained with (class 0 is plane); each version adds to the one before.
DOTA_V1_CLASSES = ("plane", "ship", "storage-tank", "baseball-diamond", "tennis-court", "basketball-court",
                   "ground-track-field", "harbor", "bridge", "large-vehicle", "small-vehicle", "helicopter",
                   "roundabout", "soccer-ball-field", "swimming-pool")
DOTA_CLASSES = {
    "1.0": DOTA_V1_CLASSES,
    "1.5": DOTA_V1_CLASSES + ("container-crane",),
    "2.0": DOTA_V1_CLASSES + ("container-crane", "airport", "helipad"),
}
DOTA_HEADER_KEYS = ("imagesource:", "gsd:")  # the header lines that may open a DOTA label file
DOTA_ROW = "x1 y1 x2 y2 x3 y3 x4 y4 class_name difficulty"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class CocoBoxes:
    """Every annotation of a COCO file as arrays, one row per annotation.

    image_row: (n,) index into the JSON's `images` list. class_index: (n,) contiguous class. xyxy: (n, 4) pixel
    corners. crowd: (n,) bool. keypoints: (n, K, 3) pixel x, y, visibility, or None for a file without keypoints.
    """

    image_row: np.ndarray
    class_index: np.ndarray
    xyxy: np.ndarray
    crowd: np.ndarray
    keypoints: np.ndarray | None = None


def convert_coco(
    src_json: str | Path, images_dir: str | Path, out_dir: str | Path, segments: bool = False,
    include_crowd: bool = False,
) -> Path:
    """Convert a COCO detection JSON and its images into YOLO format under `out_dir`; return the data.yaml path.

    Crowd annotations (`iscrowd: 1`) are skipped unless `include_crowd`; boxes are clipped to the image and dropped
    when empty; category ids become contiguous classes in ascending id order, keeping the category names. Every image
    in the JSON gets a label file (empty when it has no objects). Images missing from `images_dir` are skipped with a
    warning. Raises `DatasetError` for a missing or malformed JSON file.

    With `segments`, each object's row is its outline `cls x1 y1 x2 y2 ...` (normalised, clipped to the image) taken
    from its `segmentation`: several polygons are joined into one (`join_polygons`), an RLE mask, compressed or not,
    is traced (`mask_outline`); keypoints are not written. A polygon part of fewer than 3 points is left out and an
    object left with none is skipped, counted and named in a warning; a malformed segmentation (an odd coordinate
    count, an RLE that does not cover its image) raises `DatasetError` naming the annotation.
    """
    src_json, images_dir, out_dir = Path(src_json), Path(images_dir), Path(out_dir)
    coco = _load_coco_json(src_json)
    images, categories = coco["images"], sorted(coco["categories"], key=lambda c: c["id"])
    widths, heights = _image_sizes(images, src_json)
    boxes = _annotation_arrays(coco["annotations"], images, categories, src_json)

    keep = np.ones_like(boxes.crowd) if include_crowd else ~boxes.crowd
    xyxy = _clip_to_images(boxes.xyxy[keep], widths[boxes.image_row[keep]], heights[boxes.image_row[keep]])
    non_empty = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    kept = np.flatnonzero(keep)[non_empty]  # positions of the annotations that become objects
    if segments:
        kept, lines = _polygon_lines(coco["annotations"], kept, boxes, widths, heights, src_json)
    else:
        lines = _box_lines(boxes, kept, xyxy[non_empty], widths, heights)

    split = _split_name(src_json)
    present = _link_images(images, images_dir, out_dir / "images" / split, src_json)
    _write_labels(images, present, boxes.image_row[kept], lines, out_dir / "labels" / split)
    kpt_shape = None if boxes.keypoints is None or segments else [int(boxes.keypoints.shape[1]), 3]
    yaml_path = _write_coco_data_yaml(out_dir, split, categories, src_json, kpt_shape)
    logger.info(
        f"Converted {src_json.name}: {int(present.sum())} images, {len(lines)} {'polygons' if segments else 'boxes'} "
        f"({int(boxes.crowd.sum())} crowd {'kept' if include_crowd else 'skipped'}, "
        f"{int((~non_empty).sum())} empty after clipping dropped), {len(categories)} classes -> {yaml_path}"
    )
    return yaml_path


def convert_masks(
    masks_dir: str | Path, images_dir: str | Path, out_dir: str | Path, names: list[str] | tuple[str, ...],
    pixel_classes: dict[int, int] | None = None, min_area: int = DEFAULT_MIN_AREA, split_regions: bool = True,
) -> Path:
    """Trace a folder of mask images into YOLO segmentation labels under `out_dir`; return the data.yaml path.

    Each mask (`MASK_SUFFIXES`, single channel, 8 or 16 bit) pairs with the image of the same relative path and stem
    under `images_dir`; outlines are normalised by the mask's own size, which should be its image's. Its pixel values
    are classes (`names` in class order):

    - one class: every non-zero pixel is the class (binary masks, 0/1 or 0/255)
    - several classes: value v in 1..nc is class v - 1, 0 is background and 255 (`VOID_PIXEL`) is ignored; any
      other value raises `DatasetError` naming the mask and the value
    - `pixel_classes` {value: class} replaces these rules: the values it lists are those classes, all others are
      background

    Each connected region of a class becomes one object (with `split_regions=False`, all the regions of a class in a
    mask become one object); regions of fewer than `min_area` pixels are noise, dropped and counted. Holes are kept
    (see the module's note on joined outlines). The layout follows `convert_coco`: the split is the masks folder's
    name, images are linked, masks without an image are skipped with a warning, and `data.yaml` names that split as
    both train and val. Nothing is written before every mask has been read.
    """
    masks_dir, images_dir, out_dir = Path(masks_dir), Path(images_dir), Path(out_dir)
    names = _checked_names(names)
    class_of_value = _class_lookup(pixel_classes, len(names))
    if not _is_int(min_area) or min_area < 1:
        raise CfgError(f"min_area must be a pixel count of at least 1, got {min_area!r}")
    masks = _mask_files(masks_dir)
    image_of_mask = _images_for(masks, masks_dir, images_dir)
    labels, dropped = {}, 0
    for mask_path in image_of_mask:
        labels[mask_path], dropped_here = _mask_label_lines(mask_path, class_of_value, len(names), min_area,
                                                            split_regions)
        dropped += dropped_here

    split = masks_dir.name
    for mask_path, lines in labels.items():
        relative = mask_path.relative_to(masks_dir)
        image_path = image_of_mask[mask_path]
        _link_or_copy(image_path, out_dir / "images" / split / relative.parent / image_path.name)
        _write_label_file((out_dir / "labels" / split / relative).with_suffix(".txt"), lines)
    yaml_path = _write_data_yaml(out_dir, split, names)
    objects = sum(len(lines) for lines in labels.values())
    logger.info(f"Converted {masks_dir}: {len(labels)} masks, {objects} polygons ({dropped} regions under {min_area} "
                f"pixels dropped), {len(names)} classes -> {yaml_path}")
    return yaml_path


def convert_dota(
    labels_dir: str | Path, images_dir: str | Path, out_dir: str | Path, version: str = "1.0",
    names: list[str] | tuple[str, ...] | None = None, include_difficult: bool = True, split: str | None = None,
) -> Path:
    """Convert DOTA label files and their images into YOLO oriented-box labels under `out_dir`; return the
    data.yaml path.

    Each label file `labels_dir/**/<stem>.txt` pairs with the image of the same relative path and stem under
    `images_dir` (label files without an image are skipped with a warning). Its lines are
    `x1 y1 x2 y2 x3 y3 x4 y4 class_name difficulty`: the corners in pixels, in the order annotated (DOTA's is
    clockwise as seen, from the object's head), after optional header lines `imagesource:...` and `gsd:...`;
    difficulty 0 is a normal object and any other whole number a difficult one, kept unless `include_difficult` is
    False (a missing difficulty is 0). Classes are those of DOTA `version` in `DOTA_CLASSES` ("1.0": 15; "1.5": 16,
    adding container-crane; "2.0": 18, adding airport and helipad), or `names` in class order.

    Each object becomes `cls x1 y1 x2 y2 x3 y3 x4 y4`, its corners in their order normalised by the image size. An
    object that sticks out of its image is cut to it as a tile cuts it (`tiles.cut_to_rectangles`); one with no
    area inside is dropped and counted. The layout follows `convert_masks`: images are linked into
    `out_dir/images/<split>`, labels written to `out_dir/labels/<split>`; `split` defaults to the images folder's
    name, or its parent's when that is `images` (DOTA's own `train/images`). data.yaml names `images/train` as train
    and `images/val` as val where those folders are in `out_dir` (so DOTA's train and val converted into one folder
    make one dataset), and this split otherwise. Every label file and every image's size are read before anything is
    written: a malformed line or an unknown class raises `DatasetError` naming the file and the line.
    """
    labels_dir, images_dir, out_dir = Path(labels_dir), Path(images_dir), Path(out_dir)
    names, source = (_checked_names(names), "names=") if names is not None else _dota_classes(version)
    class_of_name = {name: index for index, name in enumerate(names)}
    label_files = _dota_label_files(labels_dir)
    image_of_file = _images_for(label_files, labels_dir, images_dir, kind="label files")
    objects = {path: _read_dota_file(path, class_of_name, source) for path in image_of_file}
    sizes = {path: _image_size(image) for path, image in image_of_file.items()}

    split = split or _dota_split_name(images_dir)
    counts = {"objects": 0, "difficult": 0, "cut": 0, "outside": 0}
    for path, image in image_of_file.items():
        lines = _dota_label_lines(*objects[path], sizes[path], include_difficult, counts)
        relative = path.relative_to(labels_dir)
        _link_or_copy(image, out_dir / "images" / split / relative.parent / image.name)
        _write_label_file(out_dir / "labels" / split / relative, lines)
    present = [name for name in ("train", "val") if (out_dir / "images" / name).is_dir()]
    yaml_path = _write_data_yaml(out_dir, "train" if "train" in present else split, list(names),
                                 val_split="val" if "val" in present else split)
    logger.info(f"Converted DOTA labels in {labels_dir}: {len(image_of_file)} images, {counts['objects']} objects "
                f"({counts['difficult']} difficult {'kept' if include_difficult else 'dropped'}, {counts['cut']} cut "
                f"at the image edge, {counts['outside']} outside their image dropped), {len(names)} classes -> "
                f"{yaml_path}")
    return yaml_path


# ---------------------------------------------------------------------------------------------------------------
# Reading and checking the JSON
# ---------------------------------------------------------------------------------------------------------------


def _load_coco_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"COCO annotation file {path} not found")
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"COCO annotation file {path} is not valid JSON: {one_line(error)}") from None
    if not isinstance(coco, dict):
        raise DatasetError(f"COCO annotation file {path} must hold a JSON object, got {type(coco).__name__}")
    missing = [key for key in REQUIRED_TOP_KEYS if not isinstance(coco.get(key), list)]
    if missing:
        raise DatasetError(f"COCO annotation file {path} needs list(s) {', '.join(map(repr, missing))}")
    _check_entries(coco["images"], "images", REQUIRED_IMAGE_KEYS, path)
    _check_entries(coco["annotations"], "annotations", REQUIRED_ANNOTATION_KEYS, path)
    _check_entries(coco["categories"], "categories", REQUIRED_CATEGORY_KEYS, path)
    if not coco["categories"]:
        raise DatasetError(f"COCO annotation file {path} has no categories")
    return coco


def _check_entries(entries: list, section: str, required: tuple[str, ...], path: Path) -> None:
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DatasetError(f"COCO annotation file {path}: {section}[{position}] is not an object")
        absent = [key for key in required if key not in entry]
        if absent:
            raise DatasetError(f"COCO annotation file {path}: {section}[{position}] lacks key '{absent[0]}'")



def _image_sizes(images: list[dict], path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        widths = np.asarray([image["width"] for image in images], dtype=np.float64)
        heights = np.asarray([image["height"] for image in images], dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetError(f"COCO annotation file {path}: image width/height must be numbers") from None
    bad = np.flatnonzero((widths <= 0) | (heights <= 0))
    if bad.size:
        raise DatasetError(f"COCO annotation file {path}: images[{bad[0]}] has a non-positive width or height")
    return widths, heights


def _annotation_arrays(annotations: list[dict], images: list[dict], categories: list[dict], path: Path) -> CocoBoxes:
    """One pass over the annotations into arrays; ids are mapped to image rows and contiguous classes."""
    row_of_image = {image["id"]: row for row, image in enumerate(images)}
    class_of_category = {category["id"]: index for index, category in enumerate(categories)}
    image_row = np.fromiter((row_of_image.get(a["image_id"], -1) for a in annotations), np.int64, len(annotations))
    class_index = np.fromiter(
        (class_of_category.get(a["category_id"], -1) for a in annotations), np.int64, len(annotations)
    )
    crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in annotations), bool, len(annotations))
    try:
        xywh = np.asarray([a["bbox"] for a in annotations], dtype=np.float64).reshape(len(annotations), 4)
    except (TypeError, ValueError):
        raise DatasetError(
            f"COCO annotation file {path}: every annotation 'bbox' must be [x, y, width, height]"
        ) from None
    _check_references(annotations, image_row, "image_id", "images", path)
    _check_references(annotations, class_index, "category_id", "categories", path)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    return CocoBoxes(image_row, class_index, xyxy, crowd, _keypoint_array(annotations, path))


def _keypoint_array(annotations: list[dict], path: Path) -> np.ndarray | None:
    """(n, K, 3) keypoints of every annotation (zeros, unlabelled, for one without), None when none has any."""
    lengths = {len(a["keypoints"]) for a in annotations if "keypoints" in a}
    if not lengths:
        return None
    if len(lengths) > 1 or next(iter(lengths)) % 3:
        raise DatasetError(f"COCO annotation file {path}: every annotation's 'keypoints' must list the same number "
                           f"of x, y, visibility triples, got lengths {sorted(lengths)}")
    count = next(iter(lengths)) // 3
    empty = [0.0] * (3 * count)
    try:
        flat = np.asarray([a.get("keypoints", empty) for a in annotations], dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetError(f"COCO annotation file {path}: 'keypoints' must be numbers") from None
    return flat.reshape(len(annotations), count, 3)


def _check_references(annotations: list[dict], mapped: np.ndarray, key: str, section: str, path: Path) -> None:
    unknown = np.flatnonzero(mapped < 0)
    if unknown.size:
        first = int(unknown[0])
        raise DatasetError(
            f"COCO annotation file {path}: annotations[{first}] has {key} {annotations[first][key]!r}, "
            f"not found in '{section}'"
        )


# ---------------------------------------------------------------------------------------------------------------
# Box maths (vectorised over all annotations)
# ---------------------------------------------------------------------------------------------------------------


def _clip_to_images(xyxy: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """Clip (n, 4) pixel boxes to their own image's (width, height), given per box."""
    clipped = np.empty_like(xyxy)
    clipped[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, widths[:, None])
    clipped[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, heights[:, None])
    return clipped


def _normalised_keypoints(keypoints: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """(n, K, 3) pixel keypoints -> x, y normalised by each object's image size (clipped into it), visibility kept;
    an unlabelled keypoint (visibility 0) is written as 0 0 0."""
    normalised = keypoints.copy()
    normalised[..., 0] = np.clip(keypoints[..., 0] / widths[:, None], 0, 1)
    normalised[..., 1] = np.clip(keypoints[..., 1] / heights[:, None], 0, 1)
    return np.where(keypoints[..., 2:] > 0, normalised, 0.0)


def flip_idx_from_names(names: list[str]) -> list[int] | None:
    """Each keypoint's mirror image from its name: `left_x` <-> `right_x`, others (nose) map to themselves; None
    when a left or right keypoint has no twin of that name."""
    index = {name: k for k, name in enumerate(names)}
    mirror = []
    for name in names:
        twin = name.replace("left", "right") if "left" in name else name.replace("right", "left")
        if twin not in index:
            return None
        mirror.append(index[twin])
    return mirror


def _yolo_rows(class_index: np.ndarray, xyxy: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """(n, 5) rows of class, cx, cy, w, h normalised by each box's image size."""
    centre_x = (xyxy[:, 0] + xyxy[:, 2]) / 2 / widths
    centre_y = (xyxy[:, 1] + xyxy[:, 3]) / 2 / heights
    box_w = (xyxy[:, 2] - xyxy[:, 0]) / widths
    box_h = (xyxy[:, 3] - xyxy[:, 1]) / heights
    return np.stack([class_index.astype(np.float64), centre_x, centre_y, box_w, box_h], 1)


def _box_lines(boxes: CocoBoxes, kept: np.ndarray, xyxy: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> list:
    """Label lines of the kept annotations: their clipped boxes `xyxy`, followed by the keypoints of a keypoint file."""
    image_row = boxes.image_row[kept]
    rows = _yolo_rows(boxes.class_index[kept], xyxy, widths[image_row], heights[image_row])  # (m, 5)
    if boxes.keypoints is not None:
        keypoints = _normalised_keypoints(boxes.keypoints[kept], widths[image_row], heights[image_row])
        rows = np.concatenate([rows, keypoints.reshape(len(rows), -1)], 1)  # (m, 5 + 3K)
    line_format = "%d" + " %.6f" * 4 + " %.6f %.6f %d" * ((rows.shape[1] - 5) // 3)
    return [line_format % tuple(row) for row in rows]


# ---------------------------------------------------------------------------------------------------------------
# COCO segmentations: polygons and run-length encoded masks
# ---------------------------------------------------------------------------------------------------------------


def _polygon_lines(
    annotations: list[dict], kept: np.ndarray, boxes: CocoBoxes, widths: np.ndarray, heights: np.ndarray,
    src_json: Path,
) -> tuple[np.ndarray, list]:
    """The label line of each kept annotation's outline; returns the positions of the annotations that have one and
    their lines. Those without (no segmentation, no polygon of 3 points) are counted and the first named."""
    with_outline, lines, without = [], [], []
    for position in kept.tolist():  # one outline per object, each of its own length
        row = boxes.image_row[position]
        size = np.array([widths[row], heights[row]])  # (2,) width, height
        polygon = _annotation_polygon(annotations[position], position, size, src_json)
        if polygon is None:
            without.append(position)
            continue
        with_outline.append(position)
        lines.append(polygon_label_line(int(boxes.class_index[position]), polygon / size))
    if without:
        logger.warning(f"{len(without)} annotations of {src_json.name} have no polygon of {MIN_POLYGON_POINTS} or "
                       f"more points inside their image: skipped (first: "
                       f"{_annotation_name(annotations[without[0]], without[0])})")
    return np.asarray(with_outline, dtype=np.int64), lines


def _annotation_name(annotation: dict, position: int) -> str:
    return f"annotation id {annotation['id']!r}" if "id" in annotation else f"annotations[{position}]"


def _annotation_polygon(annotation: dict, position: int, size: np.ndarray, src_json: Path) -> np.ndarray | None:
    """(k, 2) pixel outline of an annotation's `segmentation`, clipped to its image of `size` (width, height); None
    when it has no polygon of 3 points or none with an extent inside the image."""
    where = f"COCO annotation file {src_json}: {_annotation_name(annotation, position)}"
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, dict):
        mask = rle_to_mask(segmentation, where)
        if mask.shape != (int(size[1]), int(size[0])):
            raise DatasetError(f"{where}: its RLE 'size' {list(mask.shape)} is not its image's [height, width] "
                               f"[{int(size[1])}, {int(size[0])}]")
        polygon = mask_outline(mask)
    elif isinstance(segmentation, list):
        if segmentation and all(isinstance(value, (int, float)) for value in segmentation):
            segmentation = [segmentation]  # one polygon written without the outer list
        parts = [_polygon_part(part, where) for part in segmentation]
        parts = [part for part in parts if len(part) >= MIN_POLYGON_POINTS]
        polygon = join_polygons(parts) if parts else None
    elif segmentation is None:
        polygon = None
    else:
        raise DatasetError(f"{where}: 'segmentation' must be a list of polygons or an RLE object, got "
                           f"{type(segmentation).__name__}")
    if polygon is None:
        return None
    polygon = np.clip(polygon, 0, size)
    return polygon if np.all(np.ptp(polygon, 0) > 0) else None


def _polygon_part(part, where: str) -> np.ndarray:
    """One polygon of a `segmentation` list, [x1, y1, x2, y2, ...] -> (k, 2)."""
    try:
        flat = np.asarray(part, dtype=np.float64)
    except (TypeError, ValueError):
        flat = None
    if flat is None or flat.ndim != 1 or not np.isfinite(flat).all():
        raise DatasetError(f"{where}: each 'segmentation' polygon must be a list of numbers [x1, y1, x2, y2, ...], "
                           f"got {one_line(repr(part))[:60]}")
    if flat.size % 2:
        raise DatasetError(f"{where}: a 'segmentation' polygon has {flat.size} coordinates, an odd count: expected "
                           f"x, y pairs")
    return flat.reshape(-1, 2)


def rle_to_mask(rle: dict, source: str = "RLE") -> np.ndarray:
    """(h, w) bool mask of a COCO run-length encoding `{"counts": ..., "size": [h, w]}`.

    `counts` is a list of run lengths (uncompressed RLE) or COCO's compressed string (`rle_counts_from_string`);
    runs alternate background and object, starting with background, down each column in turn (column-major order).
    Raises `DatasetError`, its message starting with `source`, for a malformed encoding.
    """
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
        raise DatasetError(f"{source}: RLE 'size' must be [height, width], got {size!r}")
    height, width = int(size[0]), int(size[1])
    if isinstance(counts, (str, bytes)):
        runs = rle_counts_from_string(counts, source)
    else:
        try:
            runs = np.asarray(counts, dtype=np.float64)
        except (TypeError, ValueError):
            runs = np.empty((0, 0))
        if runs.ndim != 1 or not np.all(runs == np.round(runs)):
            raise DatasetError(f"{source}: RLE 'counts' must be a list of whole run lengths or a compressed string")
        runs = runs.astype(np.int64)
    if runs.size and runs.min() < 0:
        raise DatasetError(f"{source}: RLE 'counts' has a negative run length {int(runs.min())}")
    if runs.sum() != height * width:
        raise DatasetError(f"{source}: RLE 'counts' add up to {int(runs.sum())} pixels, its size {height}x{width} "
                           f"has {height * width}")
    is_object = np.arange(len(runs)) % 2 == 1
    return np.repeat(is_object, runs).reshape(width, height).T


def rle_counts_from_string(text: str | bytes, source: str = "RLE") -> np.ndarray:
    """The run lengths (int64) of COCO's compressed RLE string.

    Each count is written in 5-bit groups, lowest first, one character per group (the group's value + 48); bit 0x20
    of a character says another group follows, bit 0x10 of a count's last character is its sign. From the fourth
    count on, what is written is the difference from the count two places before.
    """
    try:
        codes = np.frombuffer(text.encode("ascii") if isinstance(text, str) else bytes(text), dtype=np.uint8)
    except UnicodeEncodeError:
        codes = np.full(1, 255, dtype=np.uint8)  # reported below as a character outside the code
    groups = codes.astype(np.int64) - 48
    if groups.size == 0:
        return groups
    if np.any((groups < 0) | (groups > 63)):
        raise DatasetError(f"{source}: compressed RLE 'counts' holds characters outside '0'..'o'")
    ends = np.flatnonzero((groups & 0x20) == 0)  # the last group of each count
    if ends.size == 0 or ends[-1] != groups.size - 1:
        raise DatasetError(f"{source}: compressed RLE 'counts' ends in the middle of a count")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > RLE_MAX_CHARS_PER_COUNT:
        raise DatasetError(f"{source}: compressed RLE 'counts' has a count of {lengths.max()} characters, more than "
                           f"any mask needs")
    shifts = 5 * (np.arange(groups.size) - np.repeat(starts, lengths))  # each group's place within its count
    values = np.add.reduceat((groups & 0x1F) << shifts, starts)
    values = np.where(groups[ends] & 0x10, values - (1 << (5 * lengths)), values)  # sign-extend negative counts
    counts = values.copy()
    counts[1::2] = np.cumsum(values[1::2])  # count i >= 3 was written as count i - count (i - 2)
    counts[2::2] = np.cumsum(values[2::2])
    return counts


# ---------------------------------------------------------------------------------------------------------------
# Outlines: joining parts, tracing masks
# ---------------------------------------------------------------------------------------------------------------


def polygon_label_line(class_index: int, polygon: np.ndarray) -> str:
    """A YOLO segmentation label line: the class, then the x y pairs of the (k, 2) normalised polygon."""
    return f"{class_index} " + " ".join(f"{value:.6f}" for value in polygon.ravel().tolist())


def join_polygons(parts: list) -> np.ndarray:
    """One closed (k, 2) outline through all the (k_i, 2) `parts`, in their order.

    Part i is linked to part i + 1 by the shortest segment between their points. The outline goes out along one side
    of each part to its link, round the whole of the last part, and back along the other sides, so every link is
    walked there and back: filled with the even-odd rule it covers exactly what the parts cover (a part inside
    another is a hole).
    """
    if len(parts) == 1:
        return np.asarray(parts[0], dtype=np.float64)
    links = [_closest_points(a, b) for a, b in zip(parts[:-1], parts[1:])]  # (point of part i, point of part i + 1)
    outward, back = [], []
    for i, part in enumerate(parts):
        entry = links[i - 1][1] if i else links[0][0]
        ring = np.roll(np.asarray(part, dtype=np.float64), -entry, axis=0)  # starts where the path arrives
        if i == len(parts) - 1:
            outward.append(np.concatenate([ring, ring[:1]]))
            continue
        exit_at = (links[i][0] - entry) % len(ring)
        outward.append(ring[: exit_at + 1])
        back.append(np.concatenate([ring[exit_at:], ring[:1]]))
    path = np.concatenate(outward + back[::-1])
    path = path[np.concatenate([[True], np.any(np.diff(path, axis=0) != 0, axis=1)])]  # links of length zero
    return path[:-1] if len(path) > 1 and np.array_equal(path[0], path[-1]) else path


def _closest_points(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Indices (i, j) of the closest pair a[i], b[j] of two (k, 2) point sets, compared in bounded blocks."""
    best, best_i, best_j = np.inf, 0, 0
    rows = max(1, CLOSEST_PAIR_BLOCK // len(b))
    for start in range(0, len(a), rows):
        squared = ((a[start : start + rows, None, :] - b[None, :, :]) ** 2).sum(-1)  # (rows, k_b)
        flat = int(squared.argmin())
        if squared.flat[flat] < best:
            best = squared.flat[flat]
            best_i, best_j = divmod(flat, len(b))
            best_i += start
    return best_i, best_j


def mask_polygons(mask: np.ndarray, min_area: int = 1, epsilon: float = SIMPLIFY_EPSILON) -> list:
    """One (k, 2) outline per connected (8-connected) region of a mask's non-zero pixels, joined with the outlines of
    the region's holes, in continuous pixel coordinates; regions and holes of fewer than about `min_area` pixels are
    left out. Outlines are simplified by up to `epsilon` pixels (cv2.approxPolyDP)."""
    return _region_outlines(mask, min_area, epsilon)[0]


def _region_outlines(mask: np.ndarray, min_area: int, epsilon: float) -> tuple[list, int]:
    """`mask_polygons`, and how many regions were left out as smaller than `min_area` pixels."""
    cleaned, dropped = _without_small_regions(mask, min_area)
    contours, hierarchy = cv2.findContours(cleaned, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return [], dropped
    parent = hierarchy[0][:, 3]  # (c,) -1 for a region's outer outline, else the region whose hole it bounds
    outlines = [cv2.approxPolyDP(contour, epsilon, True).reshape(-1, 2) + 0.5 for contour in contours]
    polygons = []
    for region in np.flatnonzero(parent < 0).tolist():
        holes = [outlines[h] for h in np.flatnonzero(parent == region) if cv2.contourArea(contours[h]) >= min_area]
        polygons.append(join_polygons([outlines[region], *holes]))
    return polygons, dropped


def mask_outline(mask: np.ndarray, min_area: int = 1, epsilon: float = SIMPLIFY_EPSILON) -> np.ndarray | None:
    """All of a mask as one (k, 2) outline: the `mask_polygons` of its regions joined (`join_polygons`); None when
    that has fewer than 3 points (a mask of one or two pixels, or none)."""
    parts = mask_polygons(mask, min_area, epsilon)
    polygon = join_polygons(parts) if parts else None
    return polygon if polygon is not None and len(polygon) >= MIN_POLYGON_POINTS else None


def _without_small_regions(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, int]:
    """The mask as uint8 0/1 without its regions of fewer than `min_area` pixels, and how many those were."""
    mask = np.ascontiguousarray(mask != 0, dtype=np.uint8)
    if min_area <= 1:
        return mask, 0
    _, regions, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    large = stats[:, cv2.CC_STAT_AREA] >= min_area
    large[0] = False  # the background
    return large[regions].astype(np.uint8), int((~large[1:]).sum())


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------------
# Mask images
# ---------------------------------------------------------------------------------------------------------------

def _checked_names(names) -> list:
    names = [names] if isinstance(names, str) else list(names or [])
    if not names or not all(isinstance(name, str) and name for name in names):
        raise CfgError(f"names must list the class names in class order, e.g. ['cat', 'dog'], got {names!r}")
    return names


def _class_lookup(pixel_classes: dict | None, nc: int) -> np.ndarray:
    """(65536,) the class of every 8 or 16 bit pixel value (see `convert_masks`): BACKGROUND for a value that is no
    object, UNEXPECTED for one that the default rule for `nc` classes does not cover."""
    lookup = np.full(1 << 16, BACKGROUND, dtype=np.int64)
    if pixel_classes is not None:
        for value, class_index in dict(pixel_classes).items():
            if not (_is_int(value) and 0 <= value < len(lookup)):
                raise CfgError(f"pixel_classes: {value!r} is not a pixel value (0 to {len(lookup) - 1})")
            if not (_is_int(class_index) and 0 <= class_index < nc):
                raise CfgError(f"pixel_classes: pixel value {value} maps to {class_index!r}, not a class 0 to {nc - 1}")
            lookup[value] = class_index
    elif nc == 1:
        lookup[1:] = 0
    else:
        lookup[nc + 1 :] = UNEXPECTED
        lookup[1 : nc + 1] = np.arange(nc)
        if VOID_PIXEL > nc:
            lookup[VOID_PIXEL] = BACKGROUND
    return lookup


def _mask_files(masks_dir: Path) -> list:
    if not masks_dir.is_dir():
        raise DatasetError(f"masks folder {masks_dir} not found")
    masks = sorted(path for path in masks_dir.rglob("*") if path.suffix.lower() in MASK_SUFFIXES and path.is_file())
    if not masks:
        raise DatasetError(f"no mask images ({', '.join(MASK_SUFFIXES)}) in {masks_dir}")
    return masks


def _images_for(files: list, files_dir: Path, images_dir: Path, kind: str = "masks") -> dict:
    """{file path: absolute image path} for every file (a mask, a label file) with an image of the same relative
    path and stem; `kind` names the files in the messages."""
    root = images_dir.resolve()  # links must not depend on the current directory
    own_paths = {file.resolve() for file in files}  # masks may share a folder with their images
    image_of_stem = {}
    for path in sorted(root.rglob("*")):
        if has_image_suffix(path) and path not in own_paths and path.is_file():
            image_of_stem.setdefault(path.relative_to(root).with_suffix(""), path)
    pairs = {}
    for file in files:
        image = image_of_stem.get(file.relative_to(files_dir).with_suffix(""))
        if image is not None:
            pairs[file] = image
    missing = [file for file in files if file not in pairs]
    if len(missing) == len(files):
        raise DatasetError(f"None of the {len(files)} {kind} in {files_dir} has an image of the same name in "
                           f"{images_dir} (first: {files[0].name})")
    if missing:
        logger.warning(f"{len(missing)} {kind} in {files_dir} have no image in {images_dir}: skipped "
                       f"(first: {missing[0]})")
    return pairs


def _mask_label_lines(
    path: Path, class_of_value: np.ndarray, nc: int, min_area: int, split_regions: bool
) -> tuple[list, int]:
    """The label lines of one mask image, and how many regions under `min_area` pixels it dropped."""
    mask = _read_mask(path)
    classes = class_of_value[mask]  # (h, w) class of each pixel
    unexpected = classes == UNEXPECTED
    if unexpected.any():
        raise DatasetError(f"mask {path} has pixel value {int(mask[unexpected][0])}, not a class: with {nc} names "
                           f"0 is background, 1 to {nc} are the classes and {VOID_PIXEL} is ignored (give "
                           f"pixel_classes for other values)")
    size = np.array(mask.shape[::-1], dtype=np.float64)  # (2,) width, height
    lines, dropped = [], 0
    for class_index in np.flatnonzero(np.bincount(classes[classes >= 0], minlength=nc)).tolist():
        polygons, dropped_here = _region_outlines(classes == class_index, min_area, SIMPLIFY_EPSILON)
        dropped += dropped_here
        if polygons and not split_regions:
            polygons = [join_polygons(polygons)]
        lines += [polygon_label_line(class_index, polygon / size) for polygon in polygons
                  if len(polygon) >= MIN_POLYGON_POINTS]
    return lines, dropped


def _read_mask(path: Path) -> np.ndarray:
    """(h, w) uint8 or uint16 pixel values of a mask image; a colour image is accepted when its channels are equal."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DatasetError(f"mask {path} cannot be read as an image")
    if mask.ndim == 3:
        colour = mask[..., :3]
        if not (np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])):
            raise DatasetError(f"mask {path} is a colour image: expected one channel whose pixel values are classes "
                               f"(OpenCV reads a palette PNG as colours: save its indices as a greyscale PNG)")
        mask = colour[..., 0]
    if mask.dtype not in (np.uint8, np.uint16):
        raise DatasetError(f"mask {path} has {mask.dtype} pixels: expected 8 or 16 bit pixel values")
    return mask


# ---------------------------------------------------------------------------------------------------------------
# DOTA label files
# ---------------------------------------------------------------------------------------------------------------


def _dota_classes(version) -> tuple[tuple[str, ...], str]:
    """(class names, how messages name them) of a DOTA version given as "1.5", 1.5 or "v1.5"."""
    text = str(version).strip().lower().removeprefix("v")
    try:
        key = f"{float(text):.1f}" if not isinstance(version, bool) else text
    except ValueError:
        key = text
    if key not in DOTA_CLASSES:
        raise CfgError(f"version must be a DOTA version ({', '.join(DOTA_CLASSES)}), got {version!r}")
    return DOTA_CLASSES[key], f"DOTA v{key}"


def _dota_label_files(labels_dir: Path) -> list:
    if not labels_dir.is_dir():
        raise DatasetError(f"DOTA labels folder {labels_dir} not found")
    files = sorted(path for path in labels_dir.rglob("*.txt") if path.is_file())
    if not files:
        raise DatasetError(f"no DOTA label files (.txt) in {labels_dir}")
    return files


def _dota_split_name(images_dir: Path) -> str:
    folder = images_dir.resolve()
    while folder.name == "images" and folder.parent != folder:
        folder = folder.parent
    return folder.name or "train"


def _read_dota_file(path: Path, class_of_name: dict, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes (n,) int64, corners (n, 4, 2) pixels, difficult (n,) bool) of one DOTA label file, in line order."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"DOTA label file {path} cannot be read: {one_line(error)}") from None
    classes, corners, difficult = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens or tokens[0].lower().startswith(DOTA_HEADER_KEYS):
            continue
        where = f"DOTA label file {path}, line {number}"
        if len(tokens) not in (9, 10):
            raise DatasetError(f"{where}: expected '{DOTA_ROW}', got {len(tokens)} values")
        try:
            points = [float(token) for token in tokens[:8]]
        except ValueError:
            points = [math.nan]
        if not all(math.isfinite(value) for value in points):
            raise DatasetError(f"{where}: the corners must be 8 numbers (pixels), got '{' '.join(tokens[:8])}'")
        if tokens[8] not in class_of_name:
            raise DatasetError(f"{where}: class '{tokens[8]}' is not one of the {len(class_of_name)} {source} "
                               f"classes ({', '.join(class_of_name)}); give names= for other classes")
        difficulty = tokens[9] if len(tokens) == 10 else "0"
        if not difficulty.isdigit():
            raise DatasetError(f"{where}: difficulty must be a whole number (0, or 1 for a difficult object), got "
                               f"'{difficulty}'")
        classes.append(class_of_name[tokens[8]])
        corners.append(points)
        difficult.append(int(difficulty) != 0)
    return (np.asarray(classes, dtype=np.int64), np.asarray(corners, dtype=np.float64).reshape(-1, 4, 2),
            np.asarray(difficult, dtype=bool))


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image: read from a PNG's header (DOTA's images are PNGs of thousands of pixels, slow
    to decode), else from the decoded image (EXIF orientation applied, as training reads it)."""
    try:
        with open(path, "rb") as file:
            head = file.read(24)
    except OSError as error:
        raise DatasetError(f"image {path} cannot be read: {one_line(error)}") from None
    if head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise DatasetError(f"image {path} cannot be read as an image")
    return image.shape[1], image.shape[0]


def _dota_label_lines(classes: np.ndarray, corners: np.ndarray, difficult: np.ndarray, size: tuple[int, int],
                      include_difficult: bool, counts: dict) -> list:
    """YOLO oriented-box lines of one image's objects (see `convert_dota`); adds to `counts`."""
    counts["difficult"] += int(difficult.sum())
    keep = np.ones(len(classes), bool) if include_difficult else ~difficult
    image_rectangle = np.array([[0.0, 0.0, size[0], size[1]]])
    inside = inside_shares(corners[keep], image_rectangle)[:, 0] > 0  # (k,) some area in the image
    counts["outside"] += int((~inside).sum())
    classes, corners = classes[keep][inside], corners[keep][inside]
    fitted = cut_to_rectangles(corners, np.repeat(image_rectangle, len(corners), 0))
    counts["cut"] += int((fitted != corners).any((1, 2)).sum())
    counts["objects"] += len(classes)
    line_format = "%d" + " %.6f" * 8
    return [line_format % (class_index, *points) for class_index, points in
            zip(classes.tolist(), (fitted / size).reshape(-1, 8).tolist())]


# ---------------------------------------------------------------------------------------------------------------
# Writing the YOLO folder
# ---------------------------------------------------------------------------------------------------------------


def _split_name(src_json: Path) -> str:
    stem = src_json.stem
    for prefix in SPLIT_PREFIXES:
        if stem.startswith(prefix) and len(stem) > len(prefix):
            return stem[len(prefix) :]
    return stem


def _link_images(images: list[dict], images_dir: Path, dest_dir: Path, src_json: Path) -> np.ndarray:
    """Symlink (or copy) every listed image that exists into `dest_dir`; return a bool array of those found."""
    present = np.zeros(len(images), dtype=bool)
    absolute_dir = images_dir.resolve()  # links must not depend on the current directory
    for row, image in enumerate(images):
        source = absolute_dir / image["file_name"]
        if source.is_file():
            _link_or_copy(source, dest_dir / image["file_name"])
            present[row] = True
    missing = np.flatnonzero(~present)
    if missing.size == len(images) and images:
        raise DatasetError(
            f"None of the {len(images)} images listed in {src_json} is in {images_dir} "
            f"(first expected: {images_dir / images[0]['file_name']})"
        )
    if missing.size:
        first = images_dir / images[missing[0]]["file_name"]
        logger.warning(f"{missing.size} images of {src_json.name} are not in {images_dir}: skipped (first: {first})")
    return present


def _link_or_copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.is_symlink() or destination.exists():
        destination.unlink()  # converting again replaces the previous output
    try:
        os.symlink(source, destination)
    except (OSError, NotImplementedError):  # e.g. Windows without the privilege, or filesystems without links
        shutil.copy2(source, destination)


def _write_labels(
    images: list[dict], present: np.ndarray, image_row: np.ndarray, lines: list, label_dir: Path
) -> None:
    """One label file per present image; objects keep their annotation order within an image."""
    order = np.argsort(image_row, kind="stable")
    ends = np.cumsum(np.bincount(image_row, minlength=len(images))).tolist()
    for image, start, end, is_present in zip(images, [0] + ends[:-1], ends, present):
        if not is_present:
            continue
        _write_label_file((label_dir / image["file_name"]).with_suffix(".txt"), [lines[i] for i in order[start:end]])


def _write_label_file(path: Path, lines: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def _write_coco_data_yaml(out_dir: Path, split: str, categories: list[dict], src_json: Path, kpt_shape=None) -> Path:
    extra = {"coco_json": str(src_json.resolve()), "coco_category_ids": [int(c["id"]) for c in categories]}
    if kpt_shape is not None:
        extra["kpt_shape"] = kpt_shape
        keypoint_names = next((c["keypoints"] for c in categories if len(c.get("keypoints") or []) == kpt_shape[0]),
                              None)
        flip_idx = flip_idx_from_names(keypoint_names) if keypoint_names else None
        if flip_idx is not None:
            extra["flip_idx"] = flip_idx
        else:
            logger.warning(f"{src_json.name}: the keypoints' mirror images are not known from their names; add "
                           f"flip_idx to {out_dir / 'data.yaml'} (or train with fliplr=0)")
    return _write_data_yaml(out_dir, split, [c["name"] for c in categories], extra)


def _write_data_yaml(out_dir: Path, split: str, names: list, extra: dict | None = None,
                     val_split: str | None = None) -> Path:
    """data.yaml naming images/<split> as train and images/<val_split> (default: the same) as val."""
    # No `path:` key: split folders resolve relative to this file's folder, so the output can be moved.
    content = {"train": f"images/{split}", "val": f"images/{val_split or split}", "nc": len(names), "names": names,
               **(extra or {})}
    yaml_path = out_dir / "data.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    yaml_path.write_text(yaml.safe_dump(content, sort_keys=False))
    return yaml_path
