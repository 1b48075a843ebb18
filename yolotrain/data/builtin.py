"""The built-in "shapes" datasets (detection; keypoints of the same shapes for pose; their outlines for segmentation;
crops of them for classification), generated deterministically on first use.

With no `data=` the trainer trains on this dataset: coloured shapes of six kinds on textured backgrounds. The class
of a shape is decided by its geometry only (colour, size, rotation and background are random), so a detector has to
learn shape to score well. Every image is rendered from its own seeded numpy generator, so the files are the same
bytes on every run of the same software stack.

Label boxes are exact: each shape is rasterised into an integer map of object ids, and a box is the pixel extent of
the shape's *visible* pixels (later shapes may hide a little of earlier ones), written as normalised YOLO xywh.

The pose set gives every shape five keypoints in a fixed order: the top-most, right-most, bottom-most and left-most
points of its outline and its centre (`SHAPE_KEYPOINTS`). A horizontal mirror keeps top, bottom and centre and
swaps right and left (`SHAPE_FLIP_IDX`); a keypoint under another shape is labelled occluded (visibility 1).

The segmentation set gives every shape the outline of its visible pixels, traced from the map of object ids (a
shape partly hidden by a later one is labelled as it is seen; a part cut off or a hole is joined into the one
polygon, see `data.convert`), simplified by half a pixel: filled, each label polygon gives back its shape's visible
pixels to about a pixel.

The oriented-box set has scenes of its own: rotated rectangles of three aspect classes (`OBB_NAMES`: about 1:1, 2:1
and 4:1, `OBB_ASPECTS`) at any angle on the same textured backgrounds, solid colours, never overlapping (as objects
seen from above). A label is its rectangle's four corners `cls x1 y1 x2 y2 x3 y3 x4 y4` in continuous pixel
coordinates, normalised: clockwise as seen on the image (x right, y down), the first edge along the long side, as
DOTA labels run. The rectangle's pixels are those whose centres it covers, so the filled label gives them back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from yolotrain.data.convert import SIMPLIFY_EPSILON, mask_outline, polygon_label_line
from yolotrain.data.data_yaml import REQUIRED_SPLITS
from yolotrain.utils.boxes import xyxy2xywhn

logger = logging.getLogger(__name__)

BUILTIN_NAMES = ("circle", "square", "triangle", "star", "cross", "ellipse")
"""Class names of the built-in dataset, in class-index order."""

DATASET_VERSION = "shapes-v1"  # bump when the rendered content changes, so old caches are not reused
CLASSIFY_VERSION = "shapes-cls-v1"  # the classification crops of the same scenes
POSE_VERSION = "shapes-pose-v1"  # the same scenes with five keypoints per shape
SEG_VERSION = "shapes-seg-v1"  # the same scenes with the outline of each shape's visible pixels
OBB_VERSION = "shapes-obb-v1"  # scenes of rotated rectangles with their corners
OBB_NAMES = ("square", "rectangle", "bar")
"""Class names of the oriented-box set, in class-index order: rectangles of the aspect ratios in `OBB_ASPECTS`."""
OBB_ASPECTS = ((1.0, 1.15), (1.8, 2.2), (3.6, 4.4))  # long side / short side of each class, drawn uniformly
OBB_MIN_SHORT_SIDE = 4.0  # pixels: thinner rectangles are lines, too few pixels for an orientation
SHAPE_KEYPOINTS = ("top", "right", "bottom", "left", "centre")
SHAPE_FLIP_IDX = (0, 3, 2, 1, 4)  # a horizontal mirror swaps right and left
VISIBLE, OCCLUDED = 2, 1  # COCO's keypoint visibility flags
CROP_MARGIN = 0.15  # of a shape's larger side, added around it on each side of its crop
CROP_MIN_SIZE = 16  # pixels: smaller shapes are too few pixels to classify
DEFAULT_SEED = 0
DEFAULT_TRAIN_IMAGES = 400
DEFAULT_VAL_IMAGES = 100
DEFAULT_IMGSZ = 224  # longest image side; the other sides vary down to 70% of it
COMPLETE_MARKER = ".complete"
JPEG_QUALITY = 90

MIN_OBJECT_SIZE = 12  # pixels, the smallest shape extent
MAX_OBJECTS_PER_IMAGE = 8
MIN_VISIBLE_FRACTION = 0.7  # occlusion stays mild: every shape keeps at least this share of its pixels
MIN_COLOUR_CONTRAST = 90.0  # L2 distance (0-255 BGR) between a shape's colour and the background under it
PLACEMENT_TRIES = 20
STALE_TEMP_SECONDS = 600  # a temp folder this old belongs to a crashed generation, not a running one


@dataclass
class ShapesScene:
    """One rendered image with its ground truth.

    image: (h, w, 3) uint8 BGR. object_ids: (h, w) int16, the index of the shape visible at each pixel, -1 for
    background. classes: (n,) int64 class indices. boxes: (n, 4) float64 pixel xyxy, the extent of each shape's
    visible pixels (x2, y2 exclusive: a pixel at column x spans [x, x + 1)). outlines: each shape's polygon (k, 2)
    in the same continuous pixel coordinates, hidden parts included.
    """

    image: np.ndarray
    object_ids: np.ndarray
    classes: np.ndarray
    boxes: np.ndarray
    outlines: list


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """The folder the built-in dataset is cached under: `$YOLOTRAIN_CACHE`, else `~/.cache/yolotrain`."""
    env = os.environ.get("YOLOTRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "yolotrain"


def builtin_data_yaml(root: str | Path | None = None) -> Path:
    """Return the data.yaml of the built-in shapes dataset, generating it on first use.

    The dataset lives in `<root>/shapes-v1/` (`root` defaults to `default_cache_dir()`). It is built in a temporary
    sibling folder and renamed into place with a completion marker inside, so a crash or several processes starting
    at once never leave a half-written dataset; later calls reuse the finished one.
    """
    return _generated_once(root, DATASET_VERSION, generate_shapes_dataset) / "data.yaml"


def builtin_pose_data_yaml(root: str | Path | None = None) -> Path:
    """Return the data.yaml of the built-in pose set (the shapes with `SHAPE_KEYPOINTS`), generating it on first
    use in `<root>/shapes-pose-v1/` (as `builtin_data_yaml`)."""
    return _generated_once(root, POSE_VERSION, generate_shapes_pose_dataset) / "data.yaml"


def builtin_seg_data_yaml(root: str | Path | None = None) -> Path:
    """Return the data.yaml of the built-in segmentation set (the shapes with their visible outlines), generating it
    on first use in `<root>/shapes-seg-v1/` (as `builtin_data_yaml`)."""
    return _generated_once(root, SEG_VERSION, generate_shapes_seg_dataset) / "data.yaml"


def builtin_obb_data_yaml(root: str | Path | None = None) -> Path:
    """Return the data.yaml of the built-in oriented-box set (rotated rectangles with their corners), generating it
    on first use in `<root>/shapes-obb-v1/` (as `builtin_data_yaml`)."""
    return _generated_once(root, OBB_VERSION, generate_shapes_obb_dataset) / "data.yaml"


def builtin_data_yaml_for(task: str) -> Path:
    """The built-in data yaml a `task` trains and validates on when no `data=` is given: the shapes with boxes
    (detect), with their keypoints (pose) or with their outlines (segment), or the rotated rectangles (obb)."""
    if task == "pose":
        return builtin_pose_data_yaml()
    if task == "segment":
        return builtin_seg_data_yaml()
    if task == "obb":
        return builtin_obb_data_yaml()
    return builtin_data_yaml()


def builtin_classify_root(root: str | Path | None = None) -> Path:
    """Return the folder of the built-in classification set, generating it on first use (as `builtin_data_yaml`):
    `<root>/shapes-cls-v1/{train,val}/<shape name>/*.jpg`, each image one shape cut from a shapes scene."""
    return _generated_once(root, CLASSIFY_VERSION, generate_shape_crops)


def _generated_once(root, version: str, generate) -> Path:
    """`<root>/<version>`, made by `generate(folder)` in a temporary sibling and renamed into place once complete."""
    cache_root = Path(root).expanduser() if root is not None else default_cache_dir()
    final_dir = cache_root / version
    if _is_complete(final_dir):
        return final_dir

    cache_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(cache_root, version)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=cache_root))
    try:
        logger.info(f"Generating the built-in {version} dataset in {final_dir} (first use, a few seconds)")
        start = time.perf_counter()
        generate(temp_dir)
        (temp_dir / COMPLETE_MARKER).write_text(json.dumps({"version": version}))
        _move_into_place(temp_dir, final_dir)
        logger.info(f"Built-in dataset ready in {time.perf_counter() - start:.1f}s: {final_dir}")
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)  # gone already after a successful rename
    return final_dir


def generate_shapes_dataset(
    out_dir: str | Path,
    n_train: int = DEFAULT_TRAIN_IMAGES,
    n_val: int = DEFAULT_VAL_IMAGES,
    imgsz: int = DEFAULT_IMGSZ,
    seed: int = DEFAULT_SEED,
    label_text=None,
    yaml_extra: dict | None = None,
    version: str = DATASET_VERSION,
    render=None,
    names: tuple[str, ...] = BUILTIN_NAMES,
) -> Path:
    """Write a shapes dataset into `out_dir` (images/{train,val}, labels/{train,val}, data.yaml); return the yaml.

    `render(rng, imgsz)` draws a scene (default: the shapes, `render_scene`) and `label_text(scene)` writes its
    label file (default: boxes, `yolo_label_text`); `names` are the classes and `yaml_extra` adds keys to the data
    yaml, whose header names `version`. Not atomic on its own (see `builtin_data_yaml`). The same arguments always
    produce the same files.
    """
    label_text = label_text or yolo_label_text
    render = render or render_scene
    out_dir = Path(out_dir)
    for split, count in zip(REQUIRED_SPLITS, (n_train, n_val)):
        image_dir, label_dir = out_dir / "images" / split, out_dir / "labels" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            scene = render(image_rng(seed, split, index), imgsz)
            stem = f"{split}_{index:05d}"
            _write_jpeg(image_dir / f"{stem}.jpg", scene.image)
            (label_dir / f"{stem}.txt").write_text(label_text(scene))
    return _write_data_yaml(out_dir, version, yaml_extra, names)


def generate_shapes_pose_dataset(out_dir: str | Path, **kwargs) -> Path:
    """Write the pose set into `out_dir`: the scenes of `generate_shapes_dataset` with keypoint labels
    (`yolo_pose_label_text`) and `kpt_shape`, `flip_idx` in the data yaml."""
    extra = {"kpt_shape": [len(SHAPE_KEYPOINTS), 3], "flip_idx": list(SHAPE_FLIP_IDX)}
    return generate_shapes_dataset(out_dir, label_text=yolo_pose_label_text, yaml_extra=extra, version=POSE_VERSION,
                                   **kwargs)


def generate_shapes_seg_dataset(out_dir: str | Path, **kwargs) -> Path:
    """Write the segmentation set into `out_dir`: the scenes of `generate_shapes_dataset` (the same image files) with
    polygon labels (`yolo_seg_label_text`)."""
    return generate_shapes_dataset(out_dir, label_text=yolo_seg_label_text, version=SEG_VERSION, **kwargs)


def generate_shapes_obb_dataset(out_dir: str | Path, **kwargs) -> Path:
    """Write the oriented-box set into `out_dir`: scenes of rotated rectangles (`render_obb_scene`) with their
    corners (`yolo_obb_label_text`), classes `OBB_NAMES`, in the layout and counts of `generate_shapes_dataset`."""
    return generate_shapes_dataset(out_dir, label_text=yolo_obb_label_text, version=OBB_VERSION,
                                   render=render_obb_scene, names=OBB_NAMES, **kwargs)


def generate_shape_crops(
    out_dir: str | Path,
    n_train: int = DEFAULT_TRAIN_IMAGES,
    n_val: int = DEFAULT_VAL_IMAGES,
    imgsz: int = DEFAULT_IMGSZ,
    seed: int = DEFAULT_SEED,
) -> Path:
    """Write the classification set into `out_dir/{train,val}/<shape name>/`: every shape of the same scenes as
    the detection set, cut out square around its box with a margin; shapes under CROP_MIN_SIZE are left out."""
    out_dir = Path(out_dir)
    for split, count in zip(REQUIRED_SPLITS, (n_train, n_val)):
        for name in BUILTIN_NAMES:
            (out_dir / split / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            scene = render_scene(image_rng(seed, split, index), imgsz)
            for k, (crop, class_id) in enumerate(shape_crops(scene)):
                _write_jpeg(out_dir / split / BUILTIN_NAMES[class_id] / f"{split}_{index:05d}_{k}.jpg", crop)
    return out_dir


def shape_crops(scene: ShapesScene) -> list[tuple[np.ndarray, int]]:
    """(crop, class id) per shape of a scene: the square around its box grown by CROP_MARGIN, inside the image."""
    height, width = scene.image.shape[:2]
    crops = []
    for (x1, y1, x2, y2), class_id in zip(scene.boxes, scene.classes.tolist()):
        side = max(x2 - x1, y2 - y1) * (1 + 2 * CROP_MARGIN)
        if max(x2 - x1, y2 - y1) < CROP_MIN_SIZE:
            continue
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        left, top = int(max(cx - side / 2, 0)), int(max(cy - side / 2, 0))
        right, bottom = int(min(cx + side / 2, width)), int(min(cy + side / 2, height))
        crops.append((scene.image[top:bottom, left:right], class_id))
    return crops


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator that renders image `index` of `split`: each image is reproducible on its own."""
    return np.random.default_rng([seed, REQUIRED_SPLITS.index(split), index])


def render_scene(rng: np.random.Generator, imgsz: int = DEFAULT_IMGSZ) -> ShapesScene:
    """Render one image of shapes on a textured background, with exact visible-extent boxes."""
    height, width = (int(rng.integers(round(0.7 * imgsz), imgsz + 1)) for _ in range(2))
    image = _textured_background(rng, height, width)
    object_ids = np.full((height, width), -1, dtype=np.int16)
    full_areas, classes, outlines = [], [], []
    for _ in range(int(rng.integers(1, MAX_OBJECTS_PER_IMAGE + 1))):
        placed = _place_shape(rng, image, object_ids, full_areas)
        if placed is not None:
            classes.append(placed[0])
            outlines.append(placed[1] + 0.5)  # OpenCV draws vertex v at pixel centre v, continuous v + 0.5
    image = _add_sensor_noise(rng, image)
    boxes = _visible_boxes(object_ids, len(classes))
    return ShapesScene(image, object_ids, np.asarray(classes, dtype=np.int64), boxes, outlines)


def render_obb_scene(rng: np.random.Generator, imgsz: int = DEFAULT_IMGSZ) -> ShapesScene:
    """Render one image of rotated rectangles (`OBB_NAMES`) on a textured background; `outlines` are their corners
    (see the module docstring for their order), no rectangle hides another."""
    height, width = (int(rng.integers(round(0.7 * imgsz), imgsz + 1)) for _ in range(2))
    image = _textured_background(rng, height, width)
    object_ids = np.full((height, width), -1, dtype=np.int16)
    classes, corners = [], []
    for _ in range(int(rng.integers(1, MAX_OBJECTS_PER_IMAGE + 1))):
        placed = _place_rectangle(rng, image, object_ids, len(classes))
        if placed is not None:
            classes.append(placed[0])
            corners.append(placed[1])
    image = _add_sensor_noise(rng, image)
    boxes = _visible_boxes(object_ids, len(classes))
    return ShapesScene(image, object_ids, np.asarray(classes, dtype=np.int64), boxes, corners)


def yolo_label_text(scene: ShapesScene) -> str:
    """YOLO label file content for a scene: one `cls cx cy w h` line per shape, normalised by the image size."""
    rows = _normalised_boxes(scene)
    return "".join(f"{c} {r[0]:.6f} {r[1]:.6f} {r[2]:.6f} {r[3]:.6f}\n" for c, r in zip(scene.classes, rows))


def yolo_pose_label_text(scene: ShapesScene) -> str:
    """YOLO pose label file content: `cls cx cy w h` then the five `x y visibility` keypoints of each shape."""
    height, width = scene.image.shape[:2]
    keypoints = shape_keypoints(scene) / np.array([width, height, 1.0])  # (n, 5, 3)
    rows = np.concatenate([_normalised_boxes(scene), keypoints.reshape(len(keypoints), -1)], 1)
    return "".join(f"{c} " + " ".join(f"{v:.6f}" for v in r) + "\n" for c, r in zip(scene.classes, rows))


def yolo_seg_label_text(scene: ShapesScene) -> str:
    """YOLO segmentation label file content: `cls x1 y1 x2 y2 ...` per shape, the outline of its visible pixels
    (`shape_visible_polygons`) normalised by the image size."""
    height, width = scene.object_ids.shape
    size = np.array([width, height], dtype=np.float64)
    return "".join(polygon_label_line(int(c), polygon / size) + "\n"
                   for c, polygon in zip(scene.classes, shape_visible_polygons(scene)))


def yolo_obb_label_text(scene: ShapesScene) -> str:
    """YOLO oriented-box label file content: `cls x1 y1 x2 y2 x3 y3 x4 y4` per rectangle, its corners normalised by
    the image size."""
    height, width = scene.object_ids.shape
    size = np.array([width, height], dtype=np.float64)
    return "".join(polygon_label_line(int(c), corners / size) + "\n"
                   for c, corners in zip(scene.classes, scene.outlines))


def shape_visible_polygons(scene: ShapesScene) -> list:
    """(k, 2) continuous pixel outline of each shape's visible pixels in `scene.object_ids`, simplified by
    SIMPLIFY_EPSILON; parts and holes left by occlusion are joined into the one polygon. A shape left with fewer
    than 3 outline points (never, with MIN_OBJECT_SIZE and mild occlusion) keeps its drawn outline."""
    polygons = []
    for i, outline in enumerate(scene.outlines):  # a handful of shapes per scene, generated once
        polygon = mask_outline(scene.object_ids == i, epsilon=SIMPLIFY_EPSILON)
        polygons.append(outline if polygon is None else polygon)
    return polygons


def shape_keypoints(scene: ShapesScene) -> np.ndarray:
    """(n, 5, 3) pixel x, y and visibility of each shape's `SHAPE_KEYPOINTS`: the extreme points of its outline
    and its centre (every shape is symmetric about the mean of its vertices). A point whose pixel shows another
    shape is occluded."""
    height, width = scene.object_ids.shape
    keypoints = np.zeros((len(scene.outlines), len(SHAPE_KEYPOINTS), 3))
    for i, outline in enumerate(scene.outlines):  # a handful of shapes per scene, generated once
        x, y = outline[:, 0], outline[:, 1]
        extremes = outline[[y.argmin(), x.argmax(), y.argmax(), x.argmin()]]
        keypoints[i, :, :2] = np.concatenate([extremes, outline.mean(0, keepdims=True)])
    columns = np.clip(keypoints[..., 0].astype(np.int64), 0, width - 1)
    rows = np.clip(keypoints[..., 1].astype(np.int64), 0, height - 1)
    shown = scene.object_ids[rows, columns]  # (n, 5) the shape visible at each point, -1 for background
    hidden = (shown >= 0) & (shown != np.arange(len(scene.outlines))[:, None])
    keypoints[..., 2] = np.where(hidden, OCCLUDED, VISIBLE)
    return keypoints


def _normalised_boxes(scene: ShapesScene) -> np.ndarray:
    """(n, 4) normalised xywh of the scene's boxes."""
    height, width = scene.image.shape[:2]
    return xyxy2xywhn(scene.boxes, width, height)


# ---------------------------------------------------------------------------------------------------------------
# Cache folder handling
# ---------------------------------------------------------------------------------------------------------------


def _is_complete(dataset_dir: Path) -> bool:
    return (dataset_dir / COMPLETE_MARKER).is_file()  # written last, once everything else is in place


def _move_into_place(temp_dir: Path, final_dir: Path) -> None:
    """Rename the finished temp folder to its final name; if another process won the race, keep theirs."""
    try:
        os.rename(temp_dir, final_dir)
        return
    except OSError:
        if _is_complete(final_dir):
            return  # a concurrent process finished first; our copy is identical and is discarded
    # A final folder without its marker is debris (for example a copy interrupted by hand): replace it.
    shutil.rmtree(final_dir, ignore_errors=True)
    os.rename(temp_dir, final_dir)


def _remove_stale_temp_dirs(cache_root: Path, version: str) -> None:
    """Delete temp folders left by crashed generations; recent ones may belong to a process still running."""
    now = time.time()
    for leftover in cache_root.glob(f".{version}.tmp-*"):
        try:
            if now - leftover.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass  # removed by another process meanwhile


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise OSError(f"could not encode {path} as JPEG")
    path.write_bytes(encoded.tobytes())


def _write_data_yaml(out_dir: Path, version: str, extra: dict | None = None,
                     names: tuple[str, ...] = BUILTIN_NAMES) -> Path:
    # No `path:` key: split folders resolve relative to this file's folder, so the cache can be moved.
    content = {
        "train": "images/train",
        "val": "images/val",
        "nc": len(names),
        "names": list(names),
        **(extra or {}),
    }
    yaml_path = out_dir / "data.yaml"
    header = f"# yolotrain built-in {version} dataset (generated); paths are relative to this file\n"
    yaml_path.write_text(header + yaml.safe_dump(content, sort_keys=False))
    return yaml_path


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def _textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A gradient with low-frequency colour blobs, sometimes stripes, and a few random lines (float BGR)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = xs * np.cos(angle) + ys * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    colour_a, colour_b = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    image = colour_a + ramp[..., None] * (colour_b - colour_a)  # (h, w, 3)

    blob_grid = rng.normal(0, 1, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3)).astype(np.float32)
    image += cv2.resize(blob_grid, (width, height), interpolation=cv2.INTER_CUBIC) * rng.uniform(10, 40)

    if rng.random() < 0.4:
        period, phase, stripe_angle = rng.uniform(6, 30), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
        wave = np.sin(2 * np.pi * (xs * np.cos(stripe_angle) + ys * np.sin(stripe_angle)) / period + phase)
        image += wave[..., None] * rng.uniform(-40, 40, 3).astype(np.float32)

    for _ in range(int(rng.integers(0, 7))):
        start, end = rng.integers(0, (width, height), (2, 2))
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cv2.line(image, tuple(int(v) for v in start), tuple(int(v) for v in end), colour, int(rng.integers(1, 3)))
    return image


def _shape_outline(rng: np.random.Generator, class_index: int, radius: float) -> np.ndarray:
    """Polygon vertices (k, 2) of a shape around the origin, randomly rotated; `radius` ~ half its extent."""
    name = BUILTIN_NAMES[class_index]
    if name == "circle":
        points = _ellipse_points(radius, radius)
    elif name == "ellipse":
        points = _ellipse_points(radius, radius * rng.uniform(0.35, 0.6))
    elif name == "square":
        points = _regular_polygon_points(4, radius)
    elif name == "triangle":
        points = _regular_polygon_points(3, radius)
    elif name == "star":
        outer = _regular_polygon_points(5, radius)
        inner = _regular_polygon_points(5, radius * 0.42, offset=np.pi / 5)
        points = np.stack([outer, inner], 1).reshape(-1, 2)  # alternate outer and inner vertices
    else:  # cross: a plus sign with arms 0.6 * radius wide
        arm, end = 0.3 * radius, radius
        points = np.array(
            [(-arm, -end), (arm, -end), (arm, -arm), (end, -arm), (end, arm), (arm, arm),
             (arm, end), (-arm, end), (-arm, arm), (-end, arm), (-end, -arm), (-arm, -arm)]
        )  # fmt: skip
    angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return points @ rotation.T


def _ellipse_points(semi_major: float, semi_minor: float, count: int = 48) -> np.ndarray:
    theta = np.linspace(0, 2 * np.pi, count, endpoint=False)
    return np.stack([semi_major * np.cos(theta), semi_minor * np.sin(theta)], 1)


def _regular_polygon_points(sides: int, radius: float, offset: float = 0.0) -> np.ndarray:
    theta = offset - np.pi / 2 + np.arange(sides) * 2 * np.pi / sides
    return np.stack([radius * np.cos(theta), radius * np.sin(theta)], 1)


def _place_shape(
    rng: np.random.Generator, image: np.ndarray, object_ids: np.ndarray, full_areas: list[int]
) -> tuple[int, np.ndarray] | None:
    """Draw one random shape where it hides at most a little of the others; return (its class, its polygon in
    OpenCV pixel coordinates) or None.

    Updates `image` (float BGR), `object_ids` and `full_areas` (pixel count of every placed shape) in place.
    """
    height, width = object_ids.shape
    class_index = int(rng.integers(len(BUILTIN_NAMES)))
    max_size = max(MIN_OBJECT_SIZE, 0.5 * min(height, width))
    size = float(np.exp(rng.uniform(np.log(MIN_OBJECT_SIZE), np.log(max_size))))  # log-uniform: many small ones
    outline = _shape_outline(rng, class_index, size / 2)
    low, high = outline.min(0), outline.max(0)
    for _ in range(PLACEMENT_TRIES):
        centre = rng.uniform(-low, (width - 1, height - 1) - high)  # keep the whole shape inside the image
        mask = _rasterise(outline + centre, height, width)
        if mask.any() and _occlusion_is_mild(object_ids, mask, full_areas):
            break
    else:
        return None
    image[mask] = _contrasting_colour(rng, image, mask)
    object_ids[mask] = len(full_areas)
    full_areas.append(int(mask.sum()))
    return class_index, outline + centre


def _rectangle_corners(rng: np.random.Generator, class_index: int, max_long_side: float) -> np.ndarray:
    """(4, 2) corners of a random rectangle of the class's aspect around the origin, at any angle: clockwise as
    seen (y down), the first edge along the long side."""
    low_aspect, high_aspect = OBB_ASPECTS[class_index]
    aspect = rng.uniform(low_aspect, high_aspect)
    shortest = max(MIN_OBJECT_SIZE, OBB_MIN_SHORT_SIDE * aspect)
    long_side = float(np.exp(rng.uniform(np.log(shortest), np.log(max(shortest, max_long_side)))))
    half_long, half_short = long_side / 2, long_side / aspect / 2
    angle = rng.uniform(0, np.pi)  # a rectangle turned by pi is the same rectangle
    along = np.array([np.cos(angle), np.sin(angle)])
    across = np.array([-np.sin(angle), np.cos(angle)])  # along turned a quarter, clockwise as seen
    signs = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64)  # (along, across) of each corner
    return signs[:, :1] * half_long * along + signs[:, 1:] * half_short * across


def _place_rectangle(
    rng: np.random.Generator, image: np.ndarray, object_ids: np.ndarray, placed: int
) -> tuple[int, np.ndarray] | None:
    """Draw one random rectangle wholly inside the image, a pixel or more from any other; return (its class, its corners
    in continuous pixel coordinates) or None. Updates `image` (float BGR) and `object_ids` in place."""
    height, width = object_ids.shape
    class_index = int(rng.integers(len(OBB_NAMES)))
    corners = _rectangle_corners(rng, class_index, 0.5 * min(height, width))
    low, high = corners.min(0), corners.max(0)
    for _ in range(PLACEMENT_TRIES):
        centre = rng.uniform(-low, (width, height) - high)  # continuous coordinates: the image spans [0, width]
        mask = _rasterise(corners + centre - 0.5, height, width)  # pixel centres sit at continuous x + 0.5
        near = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)  # a pixel apart at least
        if mask.any() and not (object_ids[near] >= 0).any():
            break
    else:
        return None
    image[mask] = _contrasting_colour(rng, image, mask)
    object_ids[mask] = placed
    return class_index, corners + centre


def _rasterise(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """Boolean mask of a filled polygon; no anti-aliasing, so the mask is exactly the shape's pixels."""
    mask = np.zeros((height, width), dtype=np.uint8)
    fractional_bits = 4  # sub-pixel vertex precision for smooth small shapes
    vertices = np.round(polygon * (1 << fractional_bits)).astype(np.int32)
    cv2.fillPoly(mask, [vertices], 1, lineType=cv2.LINE_8, shift=fractional_bits)
    return mask.astype(bool)


def _occlusion_is_mild(object_ids: np.ndarray, mask: np.ndarray, full_areas: list[int]) -> bool:
    if not full_areas:
        return True
    covered_ids = object_ids[mask]
    hidden = np.bincount(covered_ids[covered_ids >= 0], minlength=len(full_areas))  # pixels each shape would lose
    visible = np.bincount(object_ids[object_ids >= 0], minlength=len(full_areas))
    return bool(np.all(visible - hidden >= MIN_VISIBLE_FRACTION * np.asarray(full_areas)))


def _contrasting_colour(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A random colour that stands out from the background under the shape (a shape must be visible)."""
    background = image[mask].mean(0)
    colour = rng.uniform(0, 255, 3)
    for _ in range(10):
        if np.linalg.norm(colour - background) >= MIN_COLOUR_CONTRAST:
            break
        colour = rng.uniform(0, 255, 3)
    else:
        colour = np.where(background > 127, 0.0, 255.0)  # the farthest corner of the colour cube
    return colour.astype(np.float32)


def _add_sensor_noise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Per-pixel noise over everything, then the uint8 image."""
    noisy = image + rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(2, 8)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _visible_boxes(object_ids: np.ndarray, count: int) -> np.ndarray:
    """(count, 4) pixel xyxy extent of each id's pixels in `object_ids` (x2, y2 exclusive)."""
    per_object = object_ids[None] == np.arange(count, dtype=object_ids.dtype)[:, None, None]  # (n, h, w)
    rows, cols = per_object.any(2), per_object.any(1)  # (n, h), (n, w)
    height, width = object_ids.shape
    x1, y1 = cols.argmax(1), rows.argmax(1)
    x2, y2 = width - cols[:, ::-1].argmax(1), height - rows[:, ::-1].argmax(1)
    return np.stack([x1, y1, x2, y2], 1).astype(np.float64)
