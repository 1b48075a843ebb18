"""Load and check a detection data yaml, and list the image files of a split.

A data yaml names a dataset root (`path`, optional), the splits (`train`, `val`, optional `test`) and the class
names. Each split is a folder of images (searched recursively), a .txt file listing image paths, or a list of
these. Relative split paths resolve against `path`; a relative `path` resolves against the yaml's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Union

import yaml

from yolotrain.errors import DatasetError, one_line

IMG_FORMATS = frozenset({"bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm"})
SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "val")

MAX_CLASS_NAME_CHARS = 200  # a name is shown in tables and plots; longer is a mistake (or an expanded YAML alias)
SplitSpec = Union[str, Path, Iterable[Union[str, Path]]]


def check_det_dataset(data: str | Path | dict) -> dict:
    """Load a detection data yaml (path or already-parsed dict) and return it resolved and checked.

    Returns the yaml's keys plus: `path` (absolute root), `train`/`val`/`test` (absolute str, or list of str;
    `test` is None when absent), `names` ({int: str}), `nc` (int) and `yaml_file` (str, or None for a dict).
    Raises DatasetError naming the yaml and the key or path at fault.
    """
    yaml_file, raw = _read_data_yaml(data)
    where = yaml_file or "data dict"
    base_dir = Path(yaml_file).parent if yaml_file else Path.cwd()
    root = _resolve_root(raw.get("path"), base_dir, where)

    checked = dict(raw)
    for split in SPLITS:
        spec = raw.get(split)
        if spec in (None, "", []):
            if split in REQUIRED_SPLITS:
                raise DatasetError(
                    f"{where}: missing key '{split}' (a folder of images, a .txt list or a list of these)"
                )
            checked[split] = None
            continue
        checked[split] = _resolve_split(spec, root, where, split)

    checked["names"] = _check_names(raw.get("names"), raw.get("nc"), where)
    checked["nc"] = len(checked["names"])
    if raw.get("kpt_shape") is not None:
        checked.update(_check_keypoint_keys(raw, where))
    checked["path"] = str(root)
    checked["yaml_file"] = yaml_file
    return checked


def require_kpt_shape(data: dict) -> tuple[int, int]:
    """The (K, D) `kpt_shape` of a pose dataset; a data yaml without one is a one-line error."""
    if data.get("kpt_shape") is None:
        where = data.get("yaml_file") or "data dict"
        raise DatasetError(f"{where}: a pose dataset needs 'kpt_shape: [keypoints, 2 or 3]' (and 'flip_idx' to mirror "
                           f"them), e.g. kpt_shape: [17, 3]")
    return data["kpt_shape"]


def _check_keypoint_keys(raw: dict, where: str) -> dict:
    """`kpt_shape` [K, 2 | 3], `flip_idx` a permutation of range(K) that is its own inverse (a left point's mirror
    is a right point whose mirror is that left point), `kpt_sigmas` K positive numbers; returned normalised."""
    shape = raw.get("kpt_shape")
    if (not isinstance(shape, (list, tuple)) or len(shape) != 2 or not all(_is_int(v) for v in shape)
            or shape[0] < 1 or shape[1] not in (2, 3)):
        raise DatasetError(f"{where}: kpt_shape={shape!r} is invalid: expected [keypoints, 2 or 3], e.g. [17, 3] "
                           f"(x, y, visibility per keypoint) or [4, 2] (x, y)")
    count = int(shape[0])
    checked = {"kpt_shape": (count, int(shape[1]))}
    flip_idx = raw.get("flip_idx")
    if flip_idx is not None:
        if (not isinstance(flip_idx, (list, tuple)) or not all(_is_int(v) for v in flip_idx)
                or sorted(flip_idx) != list(range(count))):
            raise DatasetError(f"{where}: flip_idx={flip_idx!r} is invalid: expected a permutation of 0..{count - 1} "
                               f"giving each keypoint's mirror image (e.g. left eye <-> right eye)")
        if any(flip_idx[flip_idx[k]] != k for k in range(count)):
            raise DatasetError(f"{where}: flip_idx={flip_idx!r} is invalid: mirroring twice must give every keypoint "
                               f"back (if k maps to j, j must map to k)")
        checked["flip_idx"] = [int(v) for v in flip_idx]
    sigmas = raw.get("kpt_sigmas")
    if sigmas is not None:
        if (not isinstance(sigmas, (list, tuple)) or len(sigmas) != count
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in sigmas)):
            raise DatasetError(f"{where}: kpt_sigmas={sigmas!r} is invalid: expected {count} positive numbers, one "
                               f"OKS sigma per keypoint")
        checked["kpt_sigmas"] = [float(v) for v in sigmas]
    return checked


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_data_yaml(data: str | Path | dict) -> tuple[str | None, dict]:
    if isinstance(data, dict):
        return None, data
    yaml_path = Path(data).expanduser()
    if not yaml_path.is_file():
        raise DatasetError(f"data yaml not found: {data} (expected a path to a .yaml file)")
    try:
        raw = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DatasetError(f"{yaml_path}: not valid YAML ({one_line(e)})") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{yaml_path}: expected a mapping with keys path/train/val/names, got {type(raw).__name__}")
    return str(yaml_path.resolve()), raw


def _resolve_root(path_value, base_dir: Path, where: str) -> Path:
    if path_value in (None, ""):
        return base_dir.resolve()
    root = Path(str(path_value)).expanduser()
    root = (root if root.is_absolute() else base_dir / root).resolve()
    if not root.is_dir():
        raise DatasetError(f"{where}: key 'path' points to a missing folder: {root}")
    return root


def _resolve_split(spec, root: Path, where: str, split: str) -> str | list[str]:
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    resolved = []
    for item in items:
        p = Path(str(item)).expanduser()
        p = (p if p.is_absolute() else root / p).resolve()
        if not p.exists():
            raise DatasetError(f"{where}: '{split}' path does not exist: {p}")
        if p.is_file() and p.suffix.lower() != ".txt":
            raise DatasetError(f"{where}: '{split}' must be a folder of images or a .txt list, got file {p}")
        resolved.append(str(p))
    return resolved if isinstance(spec, (list, tuple)) else resolved[0]


SINGLE_CLASS_NAME = "item"


def single_class_names(names: dict) -> dict[int, str]:
    """The class names of a `single_cls=True` run on a dataset with `names`: the dataset's own name when it has one
    class, else {0: "item"} (the classes merged into one)."""
    names = dict(names or {})
    return {0: str(names[0])} if len(names) == 1 else {0: SINGLE_CLASS_NAME}


def _check_names(names, nc, where: str) -> dict[int, str]:
    if names is None:
        if nc is None:
            raise DatasetError(f"{where}: missing key 'names' (a list of class names or a {{index: name}} mapping)")
        if not isinstance(nc, int) or nc < 1:
            raise DatasetError(f"{where}: 'nc' must be a positive integer, got {nc!r}")
        return {i: f"class{i}" for i in range(nc)}
    if isinstance(names, (list, tuple)):
        mapping = dict(enumerate(names))
    elif isinstance(names, dict):
        mapping = _int_keyed(names, where)
    else:
        raise DatasetError(f"{where}: 'names' must be a list or a {{index: name}} mapping, got {type(names).__name__}")
    if not mapping:
        raise DatasetError(f"{where}: 'names' is empty; at least one class is needed")
    if sorted(mapping) != list(range(len(mapping))):
        expected = f"0..{len(mapping) - 1}"
        raise DatasetError(f"{where}: 'names' indices must be {expected} without gaps, got {sorted(mapping)}")
    if nc is not None and nc != len(mapping):
        raise DatasetError(f"{where}: 'nc' is {nc} but 'names' lists {len(mapping)} classes")
    for index, name in mapping.items():
        _check_class_name(index, name, where)
    return {i: str(mapping[i]) for i in range(len(mapping))}


def _check_class_name(index, name, where: str) -> None:
    """A class name is a short text (a number is read as its text): not a list, a mapping, null or a yes/no."""
    if isinstance(name, bool) or not isinstance(name, (str, int, float)):
        shown = repr(name)[:60]
        raise DatasetError(f"{where}: class {index} name {shown} is not a text; expected a name such as 'person'")
    if len(str(name)) > MAX_CLASS_NAME_CHARS:
        raise DatasetError(f"{where}: class {index} name is {len(str(name)):,} characters long; expected at most "
                           f"{MAX_CLASS_NAME_CHARS}")


def _int_keyed(names: dict, where: str) -> dict[int, str]:
    mapping = {}
    for key, value in names.items():
        try:
            mapping[int(key)] = value
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: 'names' keys must be class indices (integers), got {key!r}") from None
    return mapping


def list_image_files(source: SplitSpec, root: str | Path | None = None) -> list[str]:
    """All image files of a split: folders are searched recursively, .txt files list one image per line.

    A relative line of a .txt file is taken relative to the .txt's folder when that file exists, otherwise
    relative to `root` (the dataset's `path`). Listed files that do not exist are kept so that the label scan
    reports them. Returns sorted, de-duplicated absolute paths with a supported image suffix.
    """
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    files: set[str] = set()
    for item in items:
        p = Path(str(item)).expanduser().resolve()
        if p.is_dir():
            files.update(str(f) for f in p.rglob("*") if has_image_suffix(f) and f.is_file())
        elif p.is_file() and p.suffix.lower() == ".txt":
            files.update(read_image_list(p, root))
        elif has_image_suffix(p):
            files.add(str(p))
        else:
            raise DatasetError(f"image source does not exist or is not a folder/.txt list/image: {p}")
    return sorted(files)


def read_image_list(txt: Path, root: str | Path | None = None) -> list[str]:
    """The paths a .txt list names, one per line (# comments skipped); relative ones beside the .txt, else
    relative to `root`."""
    listed = []
    for line in txt.read_text(encoding="utf-8-sig").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line).expanduser()
        if not p.is_absolute():
            beside_txt = txt.parent / p
            p = beside_txt if beside_txt.exists() or root is None else Path(root) / p
        listed.append(str(p.resolve()))
    # Unsupported suffixes are kept: the scan reports them instead of silently shrinking the split.
    return listed


def has_image_suffix(path: str | Path) -> bool:
    """True when the file name ends with a supported image suffix (case-insensitive)."""
    return Path(path).suffix[1:].lower() in IMG_FORMATS

