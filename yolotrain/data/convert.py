"""Convert a COCO detection or keypoint annotation file into a YOLO dataset folder (`yolotrain convert`).

Output layout, for `instances_val2017.json`:

    out_dir/images/val2017/<file_name>   symlinks to the source images (copies where links are not possible)
    out_dir/labels/val2017/<stem>.txt    `cls cx cy w h` per box, normalised by the image size in the JSON; for a
                                         keypoint file (person_keypoints_val2017.json) followed by the K keypoints
                                         `x y visibility` of the object
    out_dir/data.yaml                    train and val both point at images/val2017; names from the categories;
                                         `coco_json` (the annotation file, absolute) and `coco_category_ids` (the
                                         COCO category id of each class), so that validation with save_json=True
                                         writes COCO's own ids and scores predictions.json with pycocotools;
                                         for keypoints also `kpt_shape` [K, 3] and `flip_idx` (each `left_*`
                                         keypoint's `right_*` twin, from the category's keypoint names)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from yolotrain.errors import DatasetError, one_line

logger = logging.getLogger(__name__)

REQUIRED_TOP_KEYS = ("images", "annotations", "categories")
REQUIRED_IMAGE_KEYS = ("id", "file_name", "width", "height")
REQUIRED_ANNOTATION_KEYS = ("image_id", "category_id", "bbox")
REQUIRED_CATEGORY_KEYS = ("id", "name")
SPLIT_PREFIXES = ("instances_", "person_keypoints_")  # COCO's file names: instances_train2017.json -> "train2017"


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


def convert_coco(src_json: str | Path, images_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a COCO detection JSON and its images into YOLO format under `out_dir`; return the data.yaml path.

    Crowd annotations (`iscrowd: 1`) are skipped; boxes are clipped to the image and dropped when empty; category
    ids become contiguous classes in ascending id order, keeping the category names. Every image in the JSON gets
    a label file (empty when it has no boxes). Images missing from `images_dir` are skipped with a warning.
    Raises `DatasetError` for a missing or malformed JSON file.
    """
    src_json, images_dir, out_dir = Path(src_json), Path(images_dir), Path(out_dir)
    coco = _load_coco_json(src_json)
    images, categories = coco["images"], sorted(coco["categories"], key=lambda c: c["id"])
    widths, heights = _image_sizes(images, src_json)
    boxes = _annotation_arrays(coco["annotations"], images, categories, src_json)

    keep = ~boxes.crowd
    xyxy = _clip_to_images(boxes.xyxy[keep], widths[boxes.image_row[keep]], heights[boxes.image_row[keep]])
    non_empty = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    image_row, class_index = boxes.image_row[keep][non_empty], boxes.class_index[keep][non_empty]
    rows = _yolo_rows(class_index, xyxy[non_empty], widths[image_row], heights[image_row])  # (m, 5)
    if boxes.keypoints is not None:
        keypoints = _normalised_keypoints(boxes.keypoints[keep][non_empty], widths[image_row], heights[image_row])
        rows = np.concatenate([rows, keypoints.reshape(len(rows), -1)], 1)  # (m, 5 + 3K)

    split = _split_name(src_json)
    present = _link_images(images, images_dir, out_dir / "images" / split, src_json)
    _write_labels(images, present, image_row, rows, out_dir / "labels" / split)
    kpt_shape = None if boxes.keypoints is None else [int(boxes.keypoints.shape[1]), 3]
    yaml_path = _write_data_yaml(out_dir, split, categories, src_json, kpt_shape)
    logger.info(
        f"Converted {src_json.name}: {int(present.sum())} images, {len(rows)} boxes "
        f"({int(boxes.crowd.sum())} crowd skipped, {int((~non_empty).sum())} empty after clipping dropped), "
        f"{len(categories)} classes -> {yaml_path}"
    )
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
    images: list[dict], present: np.ndarray, image_row: np.ndarray, rows: np.ndarray, label_dir: Path
) -> None:
    """One label file per present image; boxes keep their annotation order within an image."""
    order = np.argsort(image_row, kind="stable")
    rows_per_image = np.split(rows[order], np.cumsum(np.bincount(image_row, minlength=len(images)))[:-1])
    for image, image_rows, is_present in zip(images, rows_per_image, present):
        if not is_present:
            continue
        label_path = (label_dir / image["file_name"]).with_suffix(".txt")
        label_path.parent.mkdir(parents=True, exist_ok=True)
        with open(label_path, "w") as handle:
            np.savetxt(handle, image_rows, fmt="%d" + " %.6f" * 4 + " %.6f %.6f %d" * ((rows.shape[1] - 5) // 3))


def _write_data_yaml(out_dir: Path, split: str, categories: list[dict], src_json: Path, kpt_shape=None) -> Path:
    # No `path:` key: split folders resolve relative to this file's folder, so the output can be moved.
    names = [c["name"] for c in categories]
    content = {"train": f"images/{split}", "val": f"images/{split}", "nc": len(names), "names": names,
               "coco_json": str(src_json.resolve()), "coco_category_ids": [int(c["id"]) for c in categories]}
    if kpt_shape is not None:
        content["kpt_shape"] = kpt_shape
        keypoint_names = next((c["keypoints"] for c in categories if len(c.get("keypoints") or []) == kpt_shape[0]),
                              None)
        flip_idx = flip_idx_from_names(keypoint_names) if keypoint_names else None
        if flip_idx is not None:
            content["flip_idx"] = flip_idx
        else:
            logger.warning(f"{src_json.name}: the keypoints' mirror images are not known from their names; add "
                           f"flip_idx to {out_dir / 'data.yaml'} (or train with fliplr=0)")
    yaml_path = out_dir / "data.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    yaml_path.write_text(yaml.safe_dump(content, sort_keys=False))
    return yaml_path
