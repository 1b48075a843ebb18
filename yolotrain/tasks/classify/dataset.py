"""Classification data: a folder per split, a folder per class inside it, images at any depth below that.

    root/train/<class>/.../*.jpg     root/val/<class>/...     (root/test/<class>/... optional)

Class names are the train split's folder names, sorted; class ids follow that order. Every image is verified once
(as detection's scan does: unreadable, truncated, undecodable or tiny images are skipped with a reason, listed in
`<split folder>.bad.txt`) and the result is cached in `<split folder>.yolotrain.cache`, keyed by every file's path,
size and modification time. Files that are not images are ignored.

Training transforms (OpenCV and numpy; torchvision only for `auto_augment` policies): random resized crop to
`imgsz` over a share of the image area in [1 - scale, 1], horizontal / vertical flips, HSV jitter, random erasing.
Validation: the short side resized to `imgsz`, then the centre crop.
"""

from __future__ import annotations

import logging
import math
import random
from multiprocessing.pool import ThreadPool
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from yolotrain.data.augment import RandomHSV
from yolotrain.data.data_yaml import has_image_suffix
from yolotrain.data.samplers import seeded_index
from yolotrain.data.scan import LABEL_CACHE_SUFFIX, ScanReport, files_hash, verify_image, write_bad_entries
from yolotrain.errors import CfgError, DatasetError
from yolotrain.utils.files import write_atomic_stream

LOGGER = logging.getLogger(__name__)

CACHE_VERSION = "yolotrain-classify-1"
SPLITS = ("train", "val", "test")
CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratios a random resized crop may take
CROP_TRIES = 10
ERASE_AREA = (0.02, 0.33)  # share of the image one erased rectangle covers
ERASE_RATIO = (0.3, 3.3)


# ---------------------------------------------------------------------------------------------------------------
# the dataset folder
# ---------------------------------------------------------------------------------------------------------------


def class_folders(split_dir: Path) -> list[str]:
    """The class folder names of a split, sorted."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_cls_dataset(data) -> dict:
    """Resolve a classification dataset folder to {"path", "train", "val", ("test"), "names", "nc"}.

    The val split may be named `val` or `test` (the other is then the test split). A val split whose class folders
    differ from train's is a one-line error: its class ids would not mean what the model's do.
    """
    root = Path(str(data)).expanduser()
    if root.suffix in (".yaml", ".yml") or not root.is_dir():
        raise CfgError(f"data={data}: a classification dataset is a folder with train/ and val/ folders of class "
                       f"folders (root/train/<class>/*.jpg)")
    splits = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if "train" not in splits:
        raise DatasetError(f"data={data}: no train/ folder in {root} (expected root/train/<class>/*.jpg)")
    if "val" not in splits and "test" not in splits:
        raise DatasetError(f"data={data}: no val/ (or test/) folder in {root} (expected root/val/<class>/*.jpg)")
    names = class_folders(splits["train"])
    if not names:
        raise DatasetError(f"data={data}: {splits['train']} has no class folders (expected train/<class>/*.jpg)")
    for split, folder in splits.items():
        if split == "train":
            continue
        theirs = class_folders(folder)
        if theirs != names:
            lacks = sorted(set(names) - set(theirs))
            extra = sorted(set(theirs) - set(names))
            difference = "; ".join(part for part in (f"lacks {', '.join(lacks)}" if lacks else "",
                                                     f"has {', '.join(extra)} that train lacks" if extra else "")
                                   if part)
            raise DatasetError(f"data={data}: {split}/ and train/ must have the same class folders: {split}/ "
                               f"{difference}")
    resolved = {"path": str(root), "train": str(splits["train"]), "val": str(splits.get("val", splits.get("test"))),
                "names": dict(enumerate(names)), "nc": len(names)}
    if "val" in splits and "test" in splits:
        resolved["test"] = str(splits["test"])
    return resolved


def list_samples(split_dir: Path, names: list[str]) -> list[tuple[str, int]]:
    """(image path, class id) of every image file below each class folder, nested folders included, sorted."""
    samples = []
    for class_id, name in enumerate(names):
        folder = split_dir / name
        if folder.is_dir():
            samples += [(str(p), class_id) for p in sorted(folder.rglob("*")) if p.is_file() and has_image_suffix(p)]
    return samples


def scan_split(split_dir: Path, names: list[str], workers: int = 8, prefix: str = "") -> tuple[list, ScanReport]:
    """Verified (image path, class id) samples of a split, from its cache when still valid, and the scan report."""
    samples = list_samples(split_dir, names)
    cache_path = split_dir.with_name(split_dir.name + LABEL_CACHE_SUFFIX)  # another trainer's .cache is left alone
    key = files_hash([path for path, _ in samples], extra=f"names={names}")
    cached = _load_cache(cache_path, key, prefix)
    if cached is not None:
        kept, report = cached
    else:
        kept, report = _verify(samples, workers, prefix)
        _save_cache(cache_path, key, kept, report)
    write_bad_entries(report, split_dir.with_suffix(".bad.txt"))
    if not kept:
        first = f"; first problem: {report.offender_lines(1)[0]}" if report.offenders else ""
        raise DatasetError(f"{prefix or 'dataset'}: no usable images in {split_dir} ({len(samples)} found){first}")
    return kept, report


def _verify(samples, workers, prefix):
    workers = max(1, min(workers, len(samples) or 1))
    with ThreadPool(workers) as pool:  # decoding releases the GIL
        checked = pool.map(lambda sample: verify_image(sample[0])[1], samples, chunksize=16)
    report = ScanReport(prefix)
    kept = []
    for (path, class_id), problem in zip(samples, checked):
        if problem:
            report.add("corrupt", file=path, reason=problem)
        else:
            kept.append((path, class_id))
    report.images = len(kept)
    report.boxes = len(kept)  # one label per image
    return kept, report


def _load_cache(cache_path: Path, key: str, prefix: str):
    if not cache_path.is_file():
        return None
    try:
        with np.load(cache_path, allow_pickle=False) as z:
            if str(z["version"]) != CACHE_VERSION or str(z["hash"]) != key:
                return None
            kept = list(zip(z["files"].tolist(), z["classes"].tolist()))
            return kept, ScanReport.from_json(str(z["report"]), prefix)
    except Exception as e:  # a damaged cache is only a lost speed-up
        LOGGER.debug("%s: cache %s unreadable (%s), re-scanning", prefix, cache_path, e)
        return None


def _save_cache(cache_path: Path, key: str, kept: list, report: ScanReport) -> None:
    arrays = {"version": np.array(CACHE_VERSION), "hash": np.array(key),
              "files": np.array([path for path, _ in kept], dtype=str),
              "classes": np.array([class_id for _, class_id in kept], np.int64), "report": np.array(report.to_json())}
    try:
        write_atomic_stream(cache_path, lambda f: np.savez(f, **arrays))
    except OSError as e:
        LOGGER.warning("%s: cannot write cache %s (%s); images will be verified again next run", report.prefix,
                       cache_path, e.strerror or e)


# ---------------------------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------------------------


def random_resized_crop(img: np.ndarray, size: int, area: tuple[float, float]) -> np.ndarray:
    """A random crop covering a share in `area` of the image with an aspect ratio in CROP_RATIO, resized to
    size x size; after CROP_TRIES misses, the centre crop of the nearest allowed ratio."""
    h, w = img.shape[:2]
    for _ in range(CROP_TRIES):
        target = h * w * random.uniform(*area)
        ratio = math.exp(random.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = random.randint(0, w - cw), random.randint(0, h - ch)
            return cv2.resize(img[y:y + ch, x:x + cw], (size, size), interpolation=cv2.INTER_LINEAR)
    ratio = min(max(w / h, CROP_RATIO[0]), CROP_RATIO[1])
    cw, ch = (w, round(w / ratio)) if w / h < ratio else (round(h * ratio), h)
    cw, ch = min(cw, w), min(ch, h)
    x, y = (w - cw) // 2, (h - ch) // 2
    return cv2.resize(img[y:y + ch, x:x + cw], (size, size), interpolation=cv2.INTER_LINEAR)


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The short side resized to `size`, then the central size x size square (what validation and predict see)."""
    h, w = img.shape[:2]
    scale = size / min(h, w)
    resized = cv2.resize(img, (max(size, round(w * scale)), max(size, round(h * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    rh, rw = resized.shape[:2]
    y, x = (rh - size) // 2, (rw - size) // 2
    return resized[y:y + size, x:x + size]


def random_erase(img: np.ndarray, p: float) -> np.ndarray:
    """With probability `p`, black out one random rectangle covering a share in ERASE_AREA of the image."""
    if p <= 0 or random.random() >= p:
        return img
    h, w = img.shape[:2]
    for _ in range(CROP_TRIES):
        target = h * w * random.uniform(*ERASE_AREA)
        ratio = math.exp(random.uniform(math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])))
        ew, eh = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < ew < w and 0 < eh < h:
            x, y = random.randint(0, w - ew), random.randint(0, h - eh)
            img[y:y + eh, x:x + ew] = 0
            return img
    return img


def torchvision_policy(name: str):
    """The torchvision augmentation policy `name` (randaugment, autoaugment, augmix), or a one-line error when
    torchvision is not installed: policies are its, never hand-written copies."""
    try:
        from torchvision.transforms import v2
    except Exception:  # not installed, or a build that cannot load against this torch
        raise CfgError(f"auto_augment={name} needs torchvision's augmentation policies, and torchvision does not "
                       f"import here; install it or leave auto_augment empty") from None
    return {"randaugment": v2.RandAugment, "autoaugment": v2.AutoAugment, "augmix": v2.AugMix}[name]()


class ClassifyTransforms:
    """BGR uint8 image -> RGB (3, imgsz, imgsz) uint8 tensor, augmented for training (see the module docstring)."""

    def __init__(self, imgsz: int, augment: bool, args=None):
        self.imgsz = imgsz
        self.augment = augment and args is not None
        if self.augment:
            self.area = (max(1.0 - float(args.scale), 0.01), 1.0)
            self.fliplr, self.flipud, self.erasing = float(args.fliplr), float(args.flipud), float(args.erasing)
            self.hsv = RandomHSV(args.hsv_h, args.hsv_s, args.hsv_v)
            self.policy = torchvision_policy(args.auto_augment) if args.auto_augment else None

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        if not self.augment:
            return _to_tensor(centre_crop(img, self.imgsz))
        img = random_resized_crop(img, self.imgsz, self.area)
        if random.random() < self.fliplr:
            img = img[:, ::-1]
        if random.random() < self.flipud:
            img = img[::-1]
        img = np.ascontiguousarray(img)
        if self.policy is not None:
            img = self.policy(_to_tensor(img)).numpy().transpose(1, 2, 0)[..., ::-1].copy()
        else:
            img = self.hsv({"img": img})["img"]
        return _to_tensor(random_erase(img, self.erasing))


def _to_tensor(bgr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1].transpose(2, 0, 1)))


# ---------------------------------------------------------------------------------------------------------------
# the dataset
# ---------------------------------------------------------------------------------------------------------------


class ClassificationDataset(Dataset):
    """One split of a classification folder: samples are {"img": (3, imgsz, imgsz) uint8 RGB, "cls": class id,
    "im_file": path}.

    Args:
        split_dir: the split's folder (`root/train`, ...).
        names: the class names, in class-id order (the train split's folders).
        imgsz: the square side images are cropped to.
        augment: training transforms (random resized crop, flips, HSV, erasing) instead of the centre crop.
        hyp: the augmentation arguments (`scale`, `fliplr`, `flipud`, `hsv_*`, `erasing`, `auto_augment`).
        cache: False, True/'ram' (decoded images kept in memory, short side at most 2x imgsz) or 'disk'.
        fraction: the share (or count) of images used, as for detection.
    """

    def __init__(self, split_dir, names, imgsz=224, augment=False, hyp=None, cache=False, fraction=1.0, prefix="",
                 workers=8):
        from yolotrain.data.dataset import images_kept

        self.split_dir = Path(split_dir)
        self.names = dict(enumerate(names))
        self.imgsz = int(imgsz)
        self.prefix = prefix.rstrip(": ")
        samples, report = scan_split(self.split_dir, list(names), workers, self.prefix)
        if fraction != 1.0:  # a fraction draws from every class, the same images on every run
            random.Random(0).shuffle(samples)
        self.samples = samples[: images_kept(len(samples), fraction, self.prefix)]
        self.im_files = [path for path, _ in self.samples]
        self.labels = [{"cls": np.array([[class_id]], np.float32), "im_file": path} for path, class_id in self.samples]
        LOGGER.info(report.summary_with_bad_entries_file().replace(" boxes", " labels", 1))
        for line in report.offender_lines(5):
            LOGGER.warning("%s", line)
        self._warn_empty_classes()
        self.bad_entries_file = report.bad_entries_file
        self.transforms = ClassifyTransforms(self.imgsz, augment, args=hyp)
        self.cache = _cache_mode(cache)
        self.ims = [None] * len(self.samples)
        if self.cache == "ram":
            self._cache_in_ram(workers)

    def _warn_empty_classes(self):
        counts = self.class_counts()
        empty = [self.names[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            LOGGER.warning(f"{self.prefix or 'dataset'}: no images of class {', '.join(empty)} in {self.split_dir}")

    def class_counts(self) -> np.ndarray:
        return np.bincount([class_id for _, class_id in self.samples], minlength=len(self.names))

    def _cache_in_ram(self, workers):
        with ThreadPool(max(1, workers)) as pool:
            self.ims = pool.map(self._read_reduced, range(len(self.samples)))

    def _read_reduced(self, i):
        """The image with its short side at most 2 x imgsz: enough for any crop training takes, and it keeps a
        RAM cache of large photos small."""
        img = self._read(i)
        scale = 2 * self.imgsz / min(img.shape[:2])
        if scale < 1:
            img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                             interpolation=cv2.INTER_AREA)
        return img

    def _read(self, i):
        path = self.samples[i][0]
        if self.cache == "disk":
            npy = Path(path).with_suffix(".npy")
            if npy.is_file():
                return np.load(npy)
            img = _imread(path)
            try:
                np.save(npy, img)
            except OSError:  # a read-only dataset only loses the speed-up
                pass
            return img
        return _imread(path)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        """The transformed sample of `index`; an `(index, seed)` pair from the loader's sampler seeds it first."""
        index = seeded_index(index)
        path, class_id = self.samples[index]
        img = self.ims[index] if self.ims[index] is not None else self._read(index)
        return {"img": self.transforms(img.copy() if self.ims[index] is not None else img), "cls": class_id,
                "im_file": path}


def _imread(path: str) -> np.ndarray:
    img = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"cannot decode image {path} (it was readable when the dataset was scanned)")
    return img


def _cache_mode(cache):
    if cache in (True, "ram"):
        return "ram"
    return "disk" if cache == "disk" else None


def collate_classify(samples: list[dict]) -> dict:
    """`img` (B, 3, H, W) uint8, `cls` (B,) int64 class ids, `im_file` a list."""
    return {"img": torch.stack([s["img"] for s in samples]),
            "cls": torch.tensor([s["cls"] for s in samples], dtype=torch.int64),
            "im_file": [s["im_file"] for s in samples]}
