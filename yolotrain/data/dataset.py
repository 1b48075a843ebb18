"""YOLODataset: images and YOLO labels of one split, verified once, optionally cached, served as samples.

A sample (see docs/architecture.md, data contract) is the image resized so its long side equals `imgsz`, with
pixel xyxy boxes in that resized image; the transforms (yolotrain.data.augment) letterbox or augment it and
`Format` turns it into tensors.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import psutil
from torch.utils.data import Dataset

from yolotrain.cfg import format_value, get_cfg
from yolotrain.data.data_yaml import list_image_files, single_class_names
from yolotrain.data.instances import keep_objects
from yolotrain.data.label_rows import LabelLayout
from yolotrain.data.samplers import seeded_index
from yolotrain.data.scan import ScanReport, img2label_paths, label_cache_path, scan_labels
from yolotrain.errors import CfgError, DatasetError
from yolotrain.utils.boxes import xywhn2xyxy
from yolotrain.utils.files import write_atomic_stream
from yolotrain.utils.masks import TRAIN_POLYGON_POINTS, stack_polygons
from yolotrain.utils.threads import available_cpus

LOGGER = logging.getLogger(__name__)

RAM_CACHE_MAX_FRACTION = 0.5  # of the memory available when the cache is built
# Recently read training images each process keeps without cache=ram (~500 COCO images at imgsz 320, ~130 at 640)
RECENT_IMAGES_BYTES = 128 * 2**20
OFFENDERS_LOGGED = 5
NO_CLASS_LIMIT = 2**31 - 1  # class-id bound when no data dict gives `nc`
# JPEG decodes at a fraction of the size, largest first (the DCT's scaling: less work than decoding and resizing)
JPEG_REDUCTIONS = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2}


class YOLODataset(Dataset):
    """A YOLO-format detection split.

    Args:
        img_path: folder(s) of images, .txt list(s) of images, or a list of these (see `list_image_files`).
        imgsz: the long side images are resized to.
        augment: training augmentation (mosaic, perspective, ...) instead of a plain letterbox.
        hyp: augmentation gains (an `Args` or a dict with the keys of default.yaml); defaults when None.
        rect: rectangular batches: images sorted by aspect ratio, each batch letterboxed to its own shape (`batch`
            gives each image's batch group, `batch_shapes` the group's shape; training then has no mosaic/mixup).
        batch_size, stride, pad: batch shape computation for `rect` (shape = ceil(size / stride + pad) * stride).
        single_cls: every class becomes class 0.
        classes: keep only boxes of these class ids (one id or a list; None keeps all); ids stay as they are.
        fraction: use the first images of the sorted list: a share in (0, 1] (round(n * fraction), at least one),
            or a count >= 1 (1 keeps all, like 1.0).
        cache: False, True/'ram' (decoded, resized images in memory) or 'disk' (`<stem>.npy` beside each image).
        data: the dict from `check_det_dataset` (gives `names`, `nc` and the `path` root for .txt lists).
        prefix: a name for messages, e.g. 'train'.
        workers: threads used to verify labels and fill caches.
        task: what the label rows hold (see `data.label_rows`): "detect" (boxes or polygons), "segment" (polygons,
            carried through every transform as `segments` and drawn as `masks` by `Format`), "pose" (boxes and the
            data yaml's `kpt_shape` keypoints, carried through every transform as `keypoints`), "obb" (the 4 corners
            of each rotated box, carried as `corners`).
        augment_hook: a user augmentation run in training after mosaic/affine/mixup (a callable or an
            Albumentations Compose, see yolotrain.data.augment_hook); tried once on the first image when built.
    """

    def __init__(
        self,
        img_path: str | Path | Sequence[str | Path],
        imgsz: int = 640,
        augment: bool = False,
        hyp=None,
        rect: bool = False,
        batch_size: int = 16,
        stride: int = 32,
        pad: float = 0.5,
        single_cls: bool = False,
        classes: Sequence[int] | None = None,
        fraction: float | int = 1.0,
        cache: bool | str = False,
        data: dict | None = None,
        prefix: str = "",
        workers: int = 8,
        augment_hook=None,
        task: str = "detect",
    ):
        super().__init__()
        self.img_path = img_path
        self.imgsz = int(imgsz)
        self.augment = augment
        self.hyp = hyp
        self.rect = rect
        self.batch_size = int(batch_size)
        self.stride = int(stride)
        self.pad = pad
        self.single_cls = single_cls
        self.data = data or {}
        self.task = task
        self.prefix = prefix.rstrip(": ")  # callers may pass 'train: '; messages add their own separator
        self.workers = workers
        self.augment_hook = augment_hook
        cache_mode = _cache_mode(cache)  # checked before the (slow) scan
        classes = self._checked_classes(classes)

        self.im_files = self._list_images(img_path, fraction)
        self.labels, report = self._scan(self.im_files)
        self.im_files = [r["im_file"] for r in self.labels]  # without the skipped ones
        self.label_files = img2label_paths(self.im_files)
        if classes is not None:
            dropped = self._keep_classes(classes)
            report.boxes -= dropped
            report.notes.append(f"{dropped} labels of other classes dropped (classes={format_value(classes)})")
        if single_cls:  # after the class filter, which names real class ids
            self._merge_classes()
        self._log_scan(report)
        self.bad_entries_file = report.bad_entries_file  # the scan's list of every bad entry, None without any
        self.names = self._names()
        self.nc = len(self.names)

        self.batch_shapes, self.batch = None, None
        if rect:
            self._set_rect_shapes()

        self.ims = [None] * len(self.labels)  # RAM cache of resized images
        self.cache = None  # set before filling: load_image reads it
        self.recent = RecentImages(0)
        self.cache = self._cache_images(cache_mode)
        if augment and self.cache is None:  # mosaic and mixup read each image again and again
            self.recent = RecentImages(RECENT_IMAGES_BYTES)
        self.transforms = self.build_transforms(hyp)
        if augment and augment_hook is not None:
            self._try_augment_hook()

    # ----------------------------------------------------------------------------------------------- building
    def _list_images(self, img_path, fraction: float | int) -> list[str]:
        files = list_image_files(img_path, root=self.data.get("path"))
        if not files:
            raise DatasetError(f"{self.prefix or 'dataset'}: no images found in {img_path}")
        return files[: images_kept(len(files), fraction, self.prefix)]

    def label_layout(self) -> LabelLayout:
        """What the label rows of `task` hold: boxes (or polygons) for detect, boxes and keypoints for pose."""
        if self.task == "pose":
            from yolotrain.data.data_yaml import require_kpt_shape

            return LabelLayout.for_task("pose", require_kpt_shape(self.data))
        return LabelLayout.for_task(self.task)

    def _scan(self, im_files: list[str]) -> tuple[list[dict], ScanReport]:
        nc = int(self.data["nc"]) if "nc" in self.data else NO_CLASS_LIMIT
        cache_path = label_cache_path(img2label_paths(im_files))
        return scan_labels(im_files, nc, cache_path, workers=self.workers, prefix=self.prefix,
                           source=str(self.img_path), layout=self.label_layout())

    def _log_scan(self, report: ScanReport) -> None:
        LOGGER.info(report.summary_with_bad_entries_file())
        for line in report.offender_lines(OFFENDERS_LOGGED):
            LOGGER.warning("%s", line)
        if report.boxes == 0:
            LOGGER.warning("%s: no labelled objects found; a detector cannot learn from backgrounds only",
                           self.prefix or str(self.img_path))

    def _checked_classes(self, classes) -> list[int] | None:
        """`classes` as a list of ints; an id outside the dataset's classes is a user error, caught before the scan."""
        if classes is None:
            return None
        ids = [int(c) for c in np.atleast_1d(classes)]
        nc = int(self.data["nc"]) if "nc" in self.data else NO_CLASS_LIMIT
        for class_id in ids:
            if not 0 <= class_id < nc:
                raise CfgError(f"classes={format_value(classes)} is invalid: class id {class_id} is not below "
                               f"nc={nc} of the dataset (class ids 0 to {nc - 1})")
        return ids

    def _keep_classes(self, classes: list[int]) -> int:
        """Drop the boxes of other classes, one mask per image's label array; returns how many were dropped."""
        wanted = np.asarray(classes, np.float32)
        dropped = 0
        for r in self.labels:
            keep = np.isin(r["cls"][:, 0], wanted)
            dropped += len(keep) - int(keep.sum())
            keep_objects(r, keep)  # every per-object array of the label, not only boxes
        return dropped

    def _merge_classes(self) -> None:
        for r in self.labels:
            r["cls"][:] = 0

    def _names(self) -> dict[int, str]:
        if self.single_cls:
            return single_class_names(self.data.get("names"))
        if "names" in self.data:
            return dict(self.data["names"])
        largest = max((int(r["cls"].max()) for r in self.labels if len(r["cls"])), default=0)
        return {i: f"class{i}" for i in range(largest + 1)}

    def _set_rect_shapes(self) -> None:
        """Sort images by aspect ratio and give each batch the smallest stride-multiple shape that fits it."""
        shapes = np.array([r["shape"] for r in self.labels], np.float64)  # (n, 2) h, w
        aspect = shapes[:, 0] / shapes[:, 1]
        order = np.argsort(aspect, kind="stable")
        self.labels = [self.labels[i] for i in order]
        self.im_files = [self.im_files[i] for i in order]
        self.label_files = [self.label_files[i] for i in order]
        aspect = aspect[order]

        starts = np.arange(0, len(aspect), self.batch_size)
        smallest, largest = np.minimum.reduceat(aspect, starts), np.maximum.reduceat(aspect, starts)
        self.batch_shapes = rect_shapes(smallest, largest, self.imgsz, self.stride, self.pad)
        self.batch = np.arange(len(aspect)) // self.batch_size

    def build_transforms(self, hyp=None):
        """The transform pipeline (yolotrain.data.augment): augmenting for training, letterbox + Format else."""
        from yolotrain.data.augment import build_transforms  # the dataset is usable for scanning without it

        hyp = hyp if hyp is not None else (self.hyp if self.hyp is not None else get_cfg())
        return build_transforms(self, self.imgsz, hyp, self.augment)

    def _try_augment_hook(self) -> None:
        """Run the pipeline once on image 0, so a hook that breaks its contract stops the run before training
        (with one line) rather than in a loader worker; the RNG states are put back."""
        states = random.getstate(), np.random.get_state()
        try:
            self[(0, 0)]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])

    def close_mosaic(self, hyp=None) -> None:
        """Turn mosaic, mixup and copy-paste off for the final epochs.

        DataLoader workers hold their own copy of the dataset: recreate them afterwards
        (`yolotrain.data.loader.reset_loader_workers`).
        """
        if hasattr(self.transforms, "close_mosaic"):
            self.transforms.close_mosaic()
            return
        closed = dict(vars(hyp) if hasattr(hyp, "__dict__") else (hyp or {}))
        closed.update(mosaic=0.0, mixup=0.0, copy_paste=0.0)
        self.transforms = self.build_transforms(closed)

    # ----------------------------------------------------------------------------------------------- caching
    def _cache_images(self, mode: str | None) -> str | None:
        if mode == "ram":
            return self._cache_in_ram()
        if mode == "disk":
            return self._cache_on_disk()
        return None

    def _cache_in_ram(self) -> str | None:
        needed = self._ram_cache_bytes()
        available = psutil.virtual_memory().available
        if needed > available * RAM_CACHE_MAX_FRACTION:
            LOGGER.warning(
                "%s: cache=ram refused: the images need %.1f GB but only %.1f GB of RAM is available "
                "(at most %.0f%% is used); continuing without a cache (cache=disk is an alternative)",
                self.prefix or "dataset", needed / 1e9, available / 1e9, RAM_CACHE_MAX_FRACTION * 100,
            )
            return None
        with ThreadPool(self._cache_threads()) as pool:
            for i, (img, _, _) in enumerate(pool.imap(self.load_image, range(len(self)))):
                self.ims[i] = img
        LOGGER.info("%s: cached %d images in RAM (%.2f GB)", self.prefix or "dataset", len(self), needed / 1e9)
        return "ram"

    def _ram_cache_bytes(self) -> int:
        """Bytes the resized images will take, computed from the scanned shapes (no decoding needed)."""
        shapes = np.array([r["shape"] for r in self.labels], np.float64)  # (n, 2) h, w
        ratio = self.imgsz / shapes.max(1, keepdims=True)
        resized = np.maximum(np.round(shapes * ratio), 1)
        return int((resized[:, 0] * resized[:, 1] * 3).sum())

    def _cache_on_disk(self) -> str | None:
        def write_one(i):
            return _write_npy(self.im_files[i], self._decode(i))

        stale = [i for i, f in enumerate(self.im_files) if not _npy_is_fresh(f)]
        with ThreadPool(self._cache_threads()) as pool:
            failures = [msg for msg in pool.imap(write_one, stale) if msg]
        if failures:
            LOGGER.warning("%s: cache=disk could not write %d .npy files (first: %s); continuing without a cache",
                           self.prefix or "dataset", len(failures), failures[0])
            return None
        return "disk"

    def _cache_threads(self) -> int:
        return max(1, min(self.workers or 1, available_cpus()))

    # ------------------------------------------------------------------------------------------------ samples
    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> dict:
        """The transformed sample of `index`; an `(index, seed)` pair (from the loader's sampler) first seeds the
        augmentation so the sample is reproducible whatever worker makes it."""
        return self.transforms(self.get_image_and_label(seeded_index(index)))

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """Return (BGR image resized so its long side is imgsz, (h0, w0) original, (h, w) resized)."""
        cached = self.ims[i] if self.ims[i] is not None else self.recent.get(i)
        if cached is not None:
            h0, w0 = self.labels[i]["shape"]
            return cached.copy(), (h0, w0), cached.shape[:2]  # a copy: transforms may work in place
        reduced = self._read_reduced(i) if self.augment and self.cache != "disk" else None
        if reduced is not None:
            img, (h0, w0) = reduced
        else:
            img = self._read_original(i)
            h0, w0 = img.shape[:2]
        img = resize_long_side(img, self.imgsz, self.augment, original_hw=(h0, w0))
        self.recent.put(i, img)
        return img.copy() if self.recent.max_bytes else img, (h0, w0), img.shape[:2]

    def get_image_and_label(self, index: int) -> dict:
        """The sample of image `index` before transforms: resized image and pixel xyxy boxes in it."""
        label = self.labels[index]
        img, (h0, w0), (h, w) = self.load_image(index)
        sample = {
            "img": img,
            "cls": label["cls"].copy(),
            "bboxes": xywhn2xyxy(label["bboxes"], w, h).astype(np.float32),
            "im_file": label["im_file"],
            "ori_shape": (h0, w0),
            "resized_shape": (h, w),
            "ratio_pad": ((h / h0, w / w0), (0, 0)),
        }
        if "segments" in label:  # normalised polygons -> one stacked array in pixels of the resized image
            count = TRAIN_POLYGON_POINTS if self.augment else None  # training clips warped outlines: dense points
            sample["segments"] = stack_polygons(label["segments"], count) * np.array([w, h], np.float32)
        if "corners" in label:  # a rotated box's 4 normalised corners -> pixels of the resized image
            sample["corners"] = label["corners"] * np.array([w, h], np.float32)
        if "keypoints" in label:  # normalised x, y -> pixels of the resized image; visibility as it is
            sample["keypoints"] = label["keypoints"] * np.array([w, h, 1][: label["keypoints"].shape[-1]], np.float32)
        if self.rect:
            sample["rect_shape"] = tuple(int(s) for s in self.batch_shapes[self.batch[index]])
        return sample

    def class_counts(self) -> np.ndarray:
        """Number of boxes per class id, shape (nc,)."""
        cls = np.concatenate([r["cls"][:, 0] for r in self.labels]).astype(np.int64) if self.labels else []
        return np.bincount(cls, minlength=self.nc)[: self.nc]

    def _read_original(self, i: int) -> np.ndarray:
        if self.cache == "disk":
            try:
                return np.load(_npy_path(self.im_files[i]), allow_pickle=False)
            except (OSError, ValueError) as e:
                LOGGER.debug("disk cache miss for %s (%s)", self.im_files[i], e)
        return self._decode(i)

    def _decode(self, i: int) -> np.ndarray:
        path = self.im_files[i]
        img = _imdecode(path, cv2.IMREAD_COLOR)
        if img is None:
            raise DatasetError(f"image could not be read (changed since the label scan?): {path}")
        return img

    def _read_reduced(self, i: int) -> tuple[np.ndarray, tuple[int, int]] | None:
        """A JPEG decoded at 1/2, 1/4 or 1/8 of its size (the decoder skips the finer detail: 1.5-3x less time),
        the smallest fraction whose long side still reaches imgsz, with the original (h, w); None where no fraction
        fits or the image is no JPEG. For training only: the pixels differ slightly from a full decode resized,
        validation reads the full image as the reference does."""
        path, (h0, w0) = self.im_files[i], self.labels[i]["shape"]
        factor = next((f for f in JPEG_REDUCTIONS if max(h0, w0) >= f * self.imgsz), None)
        if factor is None or Path(path).suffix.lower() not in (".jpg", ".jpeg"):
            return None
        img = _imdecode(path, JPEG_REDUCTIONS[factor])
        if img is None or abs(img.shape[0] * factor - h0) >= factor or abs(img.shape[1] * factor - w0) >= factor:
            return None  # not the scanned image (changed since?): the full read reports it
        return img, (h0, w0)


class RecentImages:
    """The resized images a training process read last, up to `max_bytes` (the least recently used go first).

    Mosaic and mixup add three or four images drawn at random to every sample, so each image is read several times
    an epoch: on a dataset of a few hundred images nearly every read after the first is served from here instead of
    decoding the file again. A served image is the one a read gives, pixel for pixel, so a sample stays the same
    whichever worker makes it (what an exact resume needs). Each dataloader worker holds its own.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.images: OrderedDict[int, np.ndarray] = OrderedDict()
        self.nbytes = 0

    def get(self, index: int) -> np.ndarray | None:
        image = self.images.get(index)
        if image is not None:
            self.images.move_to_end(index)
        return image

    def put(self, index: int, image: np.ndarray) -> None:
        if image.nbytes > self.max_bytes or index in self.images:
            return
        self.images[index] = image
        self.nbytes += image.nbytes
        while self.nbytes > self.max_bytes:
            _, dropped = self.images.popitem(last=False)
            self.nbytes -= dropped.nbytes


def rect_shapes(smallest_aspect, largest_aspect, imgsz, stride, pad):
    """(n, 2) h, w: the smallest stride-multiple shapes that hold images of aspect ratios (h / w) in
    [smallest, largest] once their long side is imgsz; `pad` adds that many strides of margin. Validation batches
    and predict (one image each) use the same shapes, so both feed the network the same pixels."""
    smallest, largest = np.atleast_1d(smallest_aspect), np.atleast_1d(largest_aspect)
    relative = np.ones((len(smallest), 2))  # (n, 2) h, w as fractions of imgsz
    wide, tall = largest < 1, smallest > 1
    relative[wide, 0] = largest[wide]
    relative[tall, 1] = 1 / smallest[tall]
    return np.ceil(relative * imgsz / stride + pad).astype(int) * stride


def images_kept(num_images: int, fraction: float | int, prefix: str = "") -> int:
    """How many of `num_images` sorted images `fraction` keeps: a share in (0, 1] keeps round(n * share), at least
    one; an int count keeps that many. 1 keeps all, as 1.0 does: `fraction=1` has always meant every image."""
    is_count = isinstance(fraction, (int, np.integer)) and not isinstance(fraction, bool)
    if is_count and fraction >= 1:
        if fraction == 1:
            return num_images
        if fraction > num_images:
            LOGGER.warning("%s: fraction=%d asks for more images than the %d found; using all of them",
                           prefix or "dataset", fraction, num_images)
        return min(int(fraction), num_images)
    if isinstance(fraction, (float, np.floating)) and 0 < fraction <= 1:
        return max(1, round(num_images * fraction))
    raise CfgError(f"fraction={format_value(fraction)} is invalid: expected a share of the images in (0, 1] "
                   f"or an image count (int >= 1), e.g. fraction=0.5 or fraction=50")


def resize_long_side(img: np.ndarray, imgsz: int, augment: bool = False, original_hw=None) -> np.ndarray:
    """`img` resized so its long side is `imgsz` (unchanged when it already is). `original_hw`: the size of the image
    `img` was decoded from at a fraction of it; the result takes the size the original would have been given."""
    h0, w0 = original_hw or img.shape[:2]
    ratio = imgsz / max(h0, w0)
    size = (max(1, round(w0 * ratio)), max(1, round(h0 * ratio)))  # cv2 wants (w, h)
    if size == (img.shape[1], img.shape[0]):
        return img
    # INTER_AREA gives cleaner downscales for evaluation; training favours the faster INTER_LINEAR.
    interpolation = cv2.INTER_LINEAR if (augment or ratio > 1) else cv2.INTER_AREA
    return cv2.resize(img, size, interpolation=interpolation)


def _cache_mode(cache) -> str | None:
    if cache in (False, None, "", "false", "False"):
        return None
    if cache is True or cache in ("ram", "true", "True"):
        return "ram"
    if cache == "disk":
        return "disk"
    raise CfgError(f"cache={cache!r} is invalid: expected true/ram, disk or false")


def _imdecode(path: str, flag: int) -> np.ndarray | None:
    """The image file decoded by OpenCV with `flag` (EXIF orientation applied), or None where it cannot be read."""
    try:
        return cv2.imdecode(np.fromfile(path, np.uint8), flag)
    except OSError:
        return None


def _npy_path(im_file: str) -> Path:
    return Path(im_file).with_suffix(".npy")


def _npy_is_fresh(im_file: str) -> bool:
    npy = _npy_path(im_file)
    try:
        return npy.stat().st_mtime_ns >= Path(im_file).stat().st_mtime_ns
    except OSError:
        return False


def _write_npy(im_file: str, img: np.ndarray) -> str | None:
    """Save the decoded original beside the image atomically; returns an error message or None."""
    npy = _npy_path(im_file)
    try:  # not durable: a lost cache file is only decoded again
        write_atomic_stream(npy, lambda f: np.save(f, img, allow_pickle=False), durable=False)
        return None
    except OSError as e:
        return f"{npy}: {e.strerror or e}"
