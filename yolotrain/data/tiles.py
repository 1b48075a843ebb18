"""Large images cut into overlapping tiles with their oriented-box labels (`yolotrain convert tiles`), and the
geometry of an oriented box cut by a rectangle (shared with the DOTA converter, which cuts boxes at the image edge).

Aerial images (DOTA's are 4000 px and more) are far larger than a network's input, so a model trains on tiles cut
from them. `tile_dataset` writes every image of an oriented-box dataset (label rows `cls x1 y1 x2 y2 x3 y3 x4 y4`)
as tiles with their labels, in a new dataset folder:

    out_dir/images/<split>/<stem>__<side>__<x>___<y><suffix>   the tile of that side whose top-left pixel is (x, y)
                                                                 in the image, in the image's format (PNG stays
                                                                 lossless; formats not in TILE_SUFFIXES become PNG)
    out_dir/labels/<split>/<same name>.txt                      its objects, `cls x1 y1 ... x4 y4` normalised by the
                                                                 tile; written where the image had a label file
    out_dir/data.yaml                                           the source's class names, each split as tiled; a
                                                                 header comment names the source and the settings

Windows (`tile_windows`), placed as the reference's DOTA splitter places them: for each rate r, square windows of
side `int(size / r)` that step by that side less `int(gap / r)` from the image's top-left; the last window of a row
(and of a column) is moved back to end at the image's edge. An image no larger than a window in a direction gets one
window there, at 0, and the tile is only the image's part of it (not padded). A window holding no more than
`MIN_IMAGE_SHARE` of image (a large window of another rate over a small image) is left out, unless every window of
the image is (then those holding the most image are kept). Windows are listed column by column: all the windows at
the first x, from the top, then the next x.

Objects. An object is labelled in a tile when at least `min_inside` (default 0.7) of its area lies inside the tile,
computed exactly (its quadrilateral clipped to the tile's rectangle, `inside_shares`); a smaller part of it in a tile
stays there as unlabelled pixels, as in the reference. An object wholly inside keeps its four corners as written. A
cut object (inside enough, but not wholly) is written as `cut_to_rectangles` makes it: the rectangle of the object's
own orientation (that of its minimum-area rectangle) that bounds its part inside the tile, running the same way
round as the object's corners and starting at the corner nearest its first corner, with each corner then clipped
into the tile (where the tile's edge crosses that rectangle at a slant, a corner sticks out). Training fits a rotated
box to the four written corners (their minimum-area rectangle): with one corner clipped, the other three pin it,
and it is exactly that rectangle; with two or more (an object across a tile's corner) it is close to it. The
reference writes a cut object's original corners, outside the tile, and fits that same rectangle only when its
loader reads them; the label scan here refuses coordinates more than 1% outside an image, so the fit is made when
the labels are written.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml

from yolotrain.data.data_yaml import SPLITS, check_det_dataset, list_image_files
from yolotrain.errors import CfgError, DatasetError

logger = logging.getLogger(__name__)

DEFAULT_SIZE = 1024
DEFAULT_GAP = 200
DEFAULT_RATES = (1.0,)
DEFAULT_MIN_INSIDE = 0.7
MIN_IMAGE_SHARE = 0.6  # a window holding no more image than this share of itself is left out (see the docstring)
TILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # kept; others are written as .png
MAX_WORKERS = 4  # threads cutting images at once: each holds a whole decoded image (DOTA v2 has 20000 px ones)
AREA_EPSILON = 1e-6  # px^2: the area an object is divided by at least (a degenerate one is never inside enough)


@dataclass(frozen=True)
class TileSettings:
    """How images are cut: windows of `size` px overlapping by `gap` at each of `rates`, objects labelled where at
    least `min_inside` of them is."""

    size: int = DEFAULT_SIZE
    gap: int = DEFAULT_GAP
    rates: tuple = DEFAULT_RATES
    min_inside: float = DEFAULT_MIN_INSIDE

    def windows(self, height: int, width: int) -> np.ndarray:
        """(m, 4) the windows over an image of that size (`tile_windows`)."""
        return tile_windows(height, width, self.size, self.gap, self.rates)

    def describe(self) -> str:
        rates = ",".join(f"{rate:g}" for rate in self.rates)
        return f"size={self.size} gap={self.gap} rates={rates} min_inside={self.min_inside:g}"


@dataclass
class TileCounts:
    """What tiling one split did, for its report line."""

    images: int = 0
    tiles: int = 0
    labels: int = 0
    cut: int = 0  # labels of objects cut by their tile's edge
    unreadable: list = field(default_factory=list)  # images that could not be decoded, skipped


# ---------------------------------------------------------------------------------------------------------------
# Geometry: quadrilaterals against axis-aligned rectangles (numpy, vectorised)
# ---------------------------------------------------------------------------------------------------------------


def polygon_areas(polygons: np.ndarray) -> np.ndarray:
    """(..., k, 2) polygons -> (...,) their areas (shoelace, either way round; taken relative to the first vertex,
    so that large pixel coordinates do not cancel)."""
    return np.abs(_signed_areas(polygons))


def _signed_areas(polygons: np.ndarray) -> np.ndarray:
    """(..., k, 2) -> (...,) shoelace area, positive for clockwise on screen (x right, y down)."""
    local = polygons - polygons[..., :1, :]
    x, y = local[..., 0], local[..., 1]
    return (x * np.roll(y, -1, -1) - np.roll(x, -1, -1) * y).sum(-1) / 2


def quad_outlines(quads: np.ndarray) -> np.ndarray:
    """(n, 4, 2) corners -> the outline each quadrilateral's area is measured on: its corners as written, or, for
    one written in a crossing order (a "bow tie", two opposite sides crossing), its corners ordered by angle around
    their mean."""
    crossing = _segments_cross(quads[:, 0], quads[:, 1], quads[:, 2], quads[:, 3]) | _segments_cross(
        quads[:, 1], quads[:, 2], quads[:, 3], quads[:, 0])  # (n,)
    relative = quads - quads.mean(-2, keepdims=True)
    order = np.argsort(np.arctan2(relative[..., 1], relative[..., 0]), -1)  # (n, 4)
    return np.where(crossing[:, None, None], np.take_along_axis(quads, order[..., None], -2), quads)


def _segments_cross(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(n, 2) each -> (n,) does segment ab cross segment cd at a point inside both?"""

    def side(p, q, r):  # which side of the line pq the point r is on
        return np.sign((q[:, 0] - p[:, 0]) * (r[:, 1] - p[:, 1]) - (q[:, 1] - p[:, 1]) * (r[:, 0] - p[:, 0]))

    return (side(a, b, c) * side(a, b, d) < 0) & (side(c, d, a) * side(c, d, b) < 0)


def clip_to_rectangles(polygons: np.ndarray, rectangles: np.ndarray) -> np.ndarray:
    """(p, k, 2) polygons x (p, 4) rectangles `x1 y1 x2 y2` -> (p, k', 2): the part of each polygon inside its
    rectangle.

    The polygon is clipped by the rectangle's four sides in turn (Sutherland-Hodgman), every pair at once: each
    vertex is kept when it lies inside the side, and where an edge crosses the side the crossing is added. Exact for
    convex polygons; for a concave one the outline may run along the side and back, which adds no area. The results
    have different vertex counts: each is padded to the longest (k', at most k + 4 for convex polygons) by repeating
    its first vertex, so the padding only adds edges of zero length; a polygon wholly outside becomes copies of one
    point (area 0).
    """
    points = np.asarray(polygons, dtype=np.float64)
    rectangles = np.asarray(rectangles, dtype=np.float64)
    for axis, bound, keep_greater in ((0, 0, True), (0, 2, False), (1, 1, True), (1, 3, False)):
        limit = rectangles[:, bound, None]  # (p, 1)
        offset = points[..., axis] - limit if keep_greater else limit - points[..., axis]  # (p, k) >= 0 inside
        following = np.roll(points, -1, 1)
        following_offset = np.roll(offset, -1, 1)
        inside, following_inside = offset >= 0, following_offset >= 0
        crosses = inside != following_inside  # the edge from this vertex to the next crosses the side
        share = offset / np.where(crosses, offset - following_offset, 1.0)  # where along the edge it crosses
        crossing = points + share[..., None] * (following - points)  # (p, k, 2)
        crossing[..., axis] = np.broadcast_to(limit, offset.shape)  # exactly on the side
        slots = np.stack([points, crossing], 2).reshape(len(points), -1, 2)  # (p, 2k, 2): vertex i, then crossing i
        valid = np.stack([inside, crosses], 2).reshape(len(points), -1)
        points = _compacted(slots, valid)
    return points


def _compacted(slots: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(p, s, 2) points with a (p, s) validity mask -> the valid points first, in order, padded by repeating the
    first one, cut to the longest count."""
    order = np.argsort(~valid, axis=1, kind="stable")
    counts = valid.sum(1)  # (p,)
    length = max(int(counts.max(initial=0)), 1)
    points = np.take_along_axis(slots, order[:, :length, None], 1)
    padding = np.arange(length)[None] >= counts[:, None]  # (p, length)
    return np.where(padding[..., None], points[:, :1], points)


def inside_shares(quads: np.ndarray, rectangles: np.ndarray) -> np.ndarray:
    """(n, 4, 2) quadrilaterals x (m, 4) rectangles `x1 y1 x2 y2` -> (n, m): the share of each quadrilateral's area
    inside each rectangle (intersection over its own area; 0 for a degenerate one unless it lies wholly inside).

    Only pairs whose extents overlap without the quadrilateral lying wholly inside are clipped exactly
    (`clip_to_rectangles`): those inside are 1, those apart 0.
    """
    quads = np.asarray(quads, dtype=np.float64)
    rectangles = np.asarray(rectangles, dtype=np.float64)
    low, high = quads.min(1)[:, None], quads.max(1)[:, None]  # (n, 1, 2)
    overlapping = (np.minimum(high, rectangles[None, :, 2:]) > np.maximum(low, rectangles[None, :, :2])).all(-1)
    within = (low >= rectangles[None, :, :2]).all(-1) & (high <= rectangles[None, :, 2:]).all(-1)  # (n, m)
    shares = within.astype(np.float64)
    rows, columns = np.nonzero(overlapping & ~within)
    if len(rows):
        outlines = quad_outlines(quads[rows])
        inside = polygon_areas(clip_to_rectangles(outlines, rectangles[columns]))
        shares[rows, columns] = inside / np.maximum(polygon_areas(outlines), AREA_EPSILON)
    return shares


def cut_to_rectangles(quads: np.ndarray, rectangles: np.ndarray) -> np.ndarray:
    """(p, 4, 2) quadrilaterals x (p, 4) rectangles `x1 y1 x2 y2` -> (p, 4, 2): what each object's label becomes in
    its rectangle (a tile, or the image).

    A quadrilateral wholly inside comes back as it is. One that sticks out becomes the rectangle of its own
    orientation (the long side's direction of its minimum-area rectangle) that bounds its part inside, running the
    same way round as its corners and starting at the corner nearest its first corner; each corner is then clipped
    into the rectangle (see the module's docstring for what training makes of that). Meant for objects with some
    area inside.
    """
    quads = np.asarray(quads, dtype=np.float64)
    rectangles = np.asarray(rectangles, dtype=np.float64)
    within = (quads.min(1) >= rectangles[:, :2]).all(1) & (quads.max(1) <= rectangles[:, 2:]).all(1)
    result = quads.copy()
    cut = np.flatnonzero(~within)
    if len(cut):
        fitted = _fitted_rectangles(quads[cut], rectangles[cut])
        result[cut] = np.clip(fitted, rectangles[cut, None, :2], rectangles[cut, None, 2:])
    return result


def _fitted_rectangles(quads: np.ndarray, rectangles: np.ndarray) -> np.ndarray:
    """(p, 4, 2) -> (p, 4, 2) the rectangle of each quadrilateral's orientation around its part inside its
    rectangle, ordered as `cut_to_rectangles` says."""
    from yolotrain.utils.obb import corners_to_xywhr  # imports torch: only objects that stick out need it

    angle = corners_to_xywhr(quads)[:, 4]  # (p,) the long side's direction
    along = np.stack([np.cos(angle), np.sin(angle)], -1)[:, None]  # (p, 1, 2)
    across = np.stack([-np.sin(angle), np.cos(angle)], -1)[:, None]  # along turned a quarter, clockwise on screen
    visible = clip_to_rectangles(quad_outlines(quads), rectangles)  # (p, k, 2)
    u, v = (visible * along).sum(-1), (visible * across).sum(-1)  # (p, k) coordinates in the object's axes
    corner_u = np.stack([u.min(1), u.max(1), u.max(1), u.min(1)], 1)[..., None]  # (p, 4, 1)
    corner_v = np.stack([v.min(1), v.min(1), v.max(1), v.max(1)], 1)[..., None]
    fitted = corner_u * along + corner_v * across  # (p, 4, 2) clockwise on screen
    anticlockwise = _signed_areas(quads) < 0
    fitted[anticlockwise] = fitted[anticlockwise][:, ::-1]
    start = ((fitted - quads[:, :1]) ** 2).sum(-1).argmin(1)  # (p,) the corner nearest the object's first
    order = (start[:, None] + np.arange(4)) % 4
    return np.take_along_axis(fitted, order[..., None], 1)


# ---------------------------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------------------------


def tile_windows(
    height: int, width: int, size: int = DEFAULT_SIZE, gap: int = DEFAULT_GAP, rates=DEFAULT_RATES
) -> np.ndarray:
    """(m, 4) int64 windows `x1 y1 x2 y2` over an image of `height` x `width` pixels, placed as the module's
    docstring says (a window may reach past the image's right or bottom edge when the image is smaller than it)."""
    windows = []
    for side, overlap in _window_sides(size, gap, rates):
        step = side - overlap
        xs, ys = _window_starts(width, side, step), _window_starts(height, side, step)
        starts = np.stack(np.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)  # column by column
        windows.append(np.concatenate([starts, starts + side], 1))
    windows = np.concatenate(windows)
    in_image = np.minimum(windows[:, 2:], (width, height)) - windows[:, :2]  # (m, 2) the image's part of each
    image_share = in_image.prod(1) / (windows[:, 2:] - windows[:, :2]).prod(1)
    keep = image_share > MIN_IMAGE_SHARE
    if not keep.any():
        keep = np.abs(image_share - image_share.max()) < 0.01
    return windows[keep]


def _window_sides(size: int, gap: int, rates) -> list[tuple[int, int]]:
    """(side, overlap) in pixels of the windows of each rate."""
    sides = [(int(size / rate), int(gap / rate)) for rate in rates]
    for rate, (side, overlap) in zip(rates, sides):
        if side < 1 or overlap >= side:
            raise CfgError(f"rate {rate:g} makes windows of {side} px overlapping by {overlap} px: the overlap must "
                           f"be smaller than the window (size={size}, gap={gap})")
    return sides


def _window_starts(length: int, side: int, step: int) -> np.ndarray:
    """Where windows of `side` start along an image side of `length` pixels."""
    count = 1 if length <= side else 1 + -(-(length - side) // step)  # ceil((length - side) / step) + 1
    starts = step * np.arange(count, dtype=np.int64)
    if count > 1 and starts[-1] + side > length:
        starts[-1] = length - side
    return starts


# ---------------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------------


def tile_dataset(
    data: str | Path | dict,
    out_dir: str | Path,
    size: int = DEFAULT_SIZE,
    gap: int = DEFAULT_GAP,
    rates=DEFAULT_RATES,
    min_inside: float = DEFAULT_MIN_INSIDE,
    workers: int | None = None,
) -> Path:
    """Cut every image of the oriented-box dataset `data` (a data yaml, or its dict) into tiles under `out_dir`;
    return the new data.yaml.

    Windows of `size` pixels overlap by `gap`; each of `rates` adds windows of `size / rate` (rates 0.5, 1.0, 1.5
    cut tiles covering 2x, 1x and 2/3 as much of the image, for training at several scales: resized to the network
    input, their objects appear at half, the same and 1.5 times their size). Objects are labelled in a tile when at
    least `min_inside` of their area lies inside it, cut objects fitted to it (see the module's docstring). Each
    split of the yaml (train, val, test) is tiled once (splits naming the same images share their tiles); label
    rows the label scan would refuse are left out and reported as the scan reports them. Every label file of a split
    is read before any tile of it is written. `workers` threads cut images at once (default: up to 4, as CPUs allow).

    Raises `CfgError` for bad settings and `DatasetError` for a bad yaml, a split without images or an output split
    folder that already holds files (give a new or empty `out_dir`: tiles of other settings would mix in).
    """
    _check_settings(size, gap, rates, min_inside)
    settings = TileSettings(size, gap, tuple(rates), min_inside)
    dataset = check_det_dataset(data)
    names = [dataset["names"][i] for i in range(dataset["nc"])]
    out_dir = Path(out_dir)
    tiled: dict[str, str] = {}  # the split's image source -> the folder its tiles went to
    folders: dict[str, str] = {}  # split -> its folder in the data yaml
    for split in SPLITS:
        source = dataset.get(split)
        if source is None:
            continue
        key = repr(source)
        if key not in tiled:
            images = list_image_files(source, dataset["path"])
            if not images:
                raise DatasetError(f"{dataset['yaml_file'] or 'data dict'}: split '{split}' has no images")
            _check_empty(out_dir, split)
            counts = _tile_split(images, out_dir, split, settings, len(names), workers)
            _log_split(split, counts, settings)
            tiled[key] = f"images/{split}"
        folders[split] = tiled[key]
    return _write_tiles_yaml(out_dir, folders, names, dataset.get("yaml_file"), settings)


def _check_settings(size, gap, rates, min_inside) -> None:
    if not _is_int(size) or size < 1:
        raise CfgError(f"size must be a whole number of pixels of at least 1, got {size!r}")
    if not _is_int(gap) or not 0 <= gap < size:
        raise CfgError(f"gap must be a whole number of pixels from 0 to size - 1 ({size - 1}), got {gap!r}")
    if not isinstance(rates, (list, tuple)) or not rates or not all(
        isinstance(rate, numbers.Real) and not isinstance(rate, bool) and 0 < rate < math.inf for rate in rates
    ):
        raise CfgError(f"rates must list positive numbers, e.g. [0.5, 1.0, 1.5], got {rates!r}")
    if not isinstance(min_inside, numbers.Real) or isinstance(min_inside, bool) or not 0 < min_inside <= 1:
        raise CfgError(f"min_inside must be a share of an object's area above 0 and at most 1, got {min_inside!r}")
    _window_sides(size, gap, rates)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_empty(out_dir: Path, split: str) -> None:
    for kind in ("images", "labels"):
        folder = out_dir / kind / split
        if folder.is_dir() and any(folder.iterdir()):
            raise DatasetError(f"{folder} already holds files: tile into a new or empty folder (tiles of other "
                               f"settings would mix with these)")


def _tile_split(images: list, out_dir: Path, split: str, settings: TileSettings, nc: int,
                workers: int | None) -> TileCounts:
    """Read every label file of a split, then cut its images (in threads) into `out_dir/{images,labels}/split`."""
    # imports torch: only tiling reads labels, the converters that share this module's geometry stay light
    from yolotrain.data.label_rows import LabelLayout
    from yolotrain.data.scan import ScanReport, img2label_paths, read_label_file

    label_files = img2label_paths(images)
    report, layout = ScanReport(prefix=split), LabelLayout.for_task("obb")
    objects = [read_label_file(label_file, nc, report, layout) for label_file in label_files]
    has_labels = [Path(label_file).is_file() for label_file in label_files]
    if report.offenders:
        report.images, report.boxes = len(images), sum(len(o["cls"]) for o in objects if o is not None)
        logger.warning(report.summary() + "; first: " + " | ".join(report.offender_lines(3)))
    root = Path(os.path.commonpath([str(Path(image).parent) for image in images]))
    jobs = [(Path(image), image_objects, labelled, Path(image).parent.relative_to(root))
            for image, image_objects, labelled in zip(images, objects, has_labels)
            if image_objects is not None]  # a label file the scan refuses whole: training would skip its image
    image_dir, label_dir = out_dir / "images" / split, out_dir / "labels" / split

    def cut(job):
        path, image_objects, labelled, relative = job
        return _tile_image(path, image_objects if labelled else None, settings, image_dir / relative,
                           label_dir / relative)

    counts = TileCounts()
    workers = workers or min(MAX_WORKERS, _usable_cpus())
    with ThreadPoolExecutor(max_workers=workers) as pool:  # OpenCV's decoding and encoding run outside the GIL
        for job, result in zip(jobs, pool.map(cut, jobs)):
            if result is None:
                counts.unreadable.append(str(job[0]))
                continue
            tiles, labels, cut_labels = result
            counts.images += 1
            counts.tiles += tiles
            counts.labels += labels
            counts.cut += cut_labels
    return counts


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the system says it), not all the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _tile_image(path: Path, objects: dict | None, settings: TileSettings, image_dir: Path,
                label_dir: Path) -> tuple[int, int, int] | None:
    """Write one image's tiles and (when `objects` is not None) their label files; returns (tiles, labels, cut
    labels), or None for an image that cannot be decoded."""
    try:
        image = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_COLOR)  # as training reads it
    except OSError:  # listed by a .txt but missing, or unreadable
        image = None
    if image is None:
        return None
    height, width = image.shape[:2]
    windows = settings.windows(height, width)
    tiles = np.minimum(windows, (width, height, width, height))  # (m, 4) each window's part of the image
    suffix = path.suffix.lower() if path.suffix.lower() in TILE_SUFFIXES else ".png"
    image_dir.mkdir(parents=True, exist_ok=True)
    lines, cut = _tile_label_lines(objects, tiles, width, height, settings.min_inside)
    for (x1, y1, x2, y2), side, tile_lines in zip(tiles.tolist(), (windows[:, 2] - windows[:, 0]).tolist(), lines):
        name = f"{path.stem}__{side}__{x1}___{y1}"
        ok, encoded = cv2.imencode(suffix, image[y1:y2, x1:x2])
        if not ok:
            raise OSError(f"could not encode the tile {name}{suffix} of {path}")
        (image_dir / f"{name}{suffix}").write_bytes(encoded.tobytes())
        if objects is not None:
            label_dir.mkdir(parents=True, exist_ok=True)
            (label_dir / f"{name}.txt").write_text("".join(line + "\n" for line in tile_lines))
    return len(tiles), sum(len(tile_lines) for tile_lines in lines), cut


def _tile_label_lines(objects: dict | None, tiles: np.ndarray, width: int, height: int,
                      min_inside: float) -> tuple[list, int]:
    """The label lines of each tile (a list per tile, objects in file order) and how many are of cut objects."""
    if objects is None or not len(objects["cls"]):
        return [[] for _ in tiles], 0
    corners = objects["corners"].astype(np.float64) * (width, height)  # (n, 4, 2) pixels
    kept = inside_shares(corners, tiles) >= min_inside  # (n, m)
    tile_of_pair, object_of_pair = np.nonzero(kept.T)  # (p,) each: tile by tile, objects in file order
    pair_tiles = tiles[tile_of_pair].astype(np.float64)  # (p, 4)
    fitted = cut_to_rectangles(corners[object_of_pair], pair_tiles)  # (p, 4, 2)
    normalised = (fitted - pair_tiles[:, None, :2]) / (pair_tiles[:, None, 2:] - pair_tiles[:, None, :2])
    classes = objects["cls"][object_of_pair, 0].astype(np.int64)
    line_format = "%d" + " %.6f" * 8
    lines = [[] for _ in tiles]
    for tile, class_index, points in zip(tile_of_pair.tolist(), classes.tolist(), normalised.reshape(-1, 8)):
        lines[tile].append(line_format % (class_index, *points))
    cut = int((fitted != corners[object_of_pair]).any((1, 2)).sum())
    return lines, cut


def _log_split(split: str, counts: TileCounts, settings: TileSettings) -> None:
    logger.info(f"Tiled {split}: {counts.images} images -> {counts.tiles} tiles ({settings.describe()}), "
                f"{counts.labels} labels ({counts.cut} of objects cut by the tile's edge)")
    if counts.unreadable:
        logger.warning(f"{len(counts.unreadable)} images of {split} cannot be decoded: skipped (first: "
                       f"{counts.unreadable[0]})")


def _write_tiles_yaml(out_dir: Path, folders: dict, names: list, source, settings: TileSettings) -> Path:
    # No `path:` key: split folders resolve relative to this file's folder, so the output can be moved.
    content = {**folders, "nc": len(names), "names": names}
    header = f"# tiles of {source or 'a data dict'} ({settings.describe()})\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    yaml_path = out_dir / "data.yaml"
    yaml_path.write_text(header + yaml.safe_dump(content, sort_keys=False))
    return yaml_path
