"""What `predict` reads: images and video frames from paths, folders, globs, lists and in-memory arrays.

`iter_frames(source, vid_stride)` yields `Frame`s one at a time, so a long video is never held in memory. Bad input
is a `SourceError` naming it (one line); inside a folder, glob or list an unreadable image is skipped and the
other files go on: the first few skips are named, the rest counted in one line at the end, and a source none of
whose files could be read is a `SourceError`.
"""

import glob
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np

from yolotrain.data.data_yaml import IMG_FORMATS, has_image_suffix, read_image_list
from yolotrain.errors import YoloTrainError

LOGGER = logging.getLogger(__name__)

SKIPS_NAMED = 5  # unreadable files of a source named one per line; the rest are counted in one line
VID_FORMATS = frozenset({"asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv", "webm"})


class SourceError(YoloTrainError):
    """A predict source that does not exist, cannot be read or has an unsupported type."""

    exit_code = 2


@dataclass
class Frame:
    """One image to predict on: BGR uint8 (h, w, 3) and where it came from."""

    image: np.ndarray
    path: str  # the file, or "image0", "image1", ... for in-memory images
    video: Optional["VideoInfo"] = None  # set for video frames
    frame_index: int = 0  # 0-based index of the frame in its video


@dataclass(frozen=True)
class VideoInfo:
    path: str
    fps: float
    frame_count: int  # as the container reports it (0 when unknown)
    width: int
    height: int


def _suffix(path):
    return Path(path).suffix[1:].lower()


def is_video_file(path):
    return _suffix(path) in VID_FORMATS


class _Skips:
    """The unreadable files of one source: the first SKIPS_NAMED logged by name, all counted."""

    def __init__(self):
        self.count, self.first = 0, None

    def add(self, error):
        self.count += 1
        self.first = self.first or str(error)
        if self.count <= SKIPS_NAMED:
            LOGGER.warning(f"predict: skipped {error}")

    def log_total(self):
        if self.count > SKIPS_NAMED:
            LOGGER.warning(f"predict: skipped {self.count} unreadable files in all ({self.count - SKIPS_NAMED} not "
                           f"named above)")


def iter_frames(source, vid_stride=1) -> Iterator[Frame]:
    """Frames of `source`: an image or video path, a folder, a glob, a .txt list of paths, a numpy BGR array, a
    PIL image, or a list of any of these."""
    skips, read = _Skips(), False
    items = enumerate(source) if isinstance(source, (list, tuple)) else [(0, source)]
    for index, item in items:
        for frame in _frames_of_item(item, vid_stride, f"image{index}", isinstance(source, (list, tuple)), skips):
            read = True
            yield frame
    skips.log_total()
    if skips.count and not read:
        raise SourceError(f"no file of source '{source}' could be read: {skips.count} skipped (first: {skips.first})")


def _frames_of_item(item, vid_stride, name, in_collection, skips):
    if isinstance(item, np.ndarray):
        yield Frame(_as_bgr(item, name), name)
        return
    if _is_pil_image(item):
        yield Frame(np.ascontiguousarray(np.asarray(item.convert("RGB"))[..., ::-1]), name)
        return
    if not isinstance(item, (str, Path)):
        raise SourceError(f"source of type {type(item).__name__} is not supported; expected a path, a folder, a "
                          f"glob, a .txt list, a numpy BGR array or a PIL image")
    yield from _frames_of_path(str(item), vid_stride, in_collection, skips)


def _frames_of_path(path, vid_stride, in_collection, skips):
    if "://" in path:
        raise SourceError(f"source '{path}' is a URL: predict reads local files only (download it first)")
    if Path(path).exists() and not (Path(path).is_file() or Path(path).is_dir()):
        raise SourceError(f"source '{path}' is not a regular file or folder (a pipe or device would block)")
    if any(c in path for c in "*?[") and not Path(path).exists():
        files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise SourceError(f"source glob '{path}' matches no file")
        yield from _frames_of_files(files, vid_stride, skips)
    elif Path(path).is_dir():
        files = sorted(str(p) for p in Path(path).iterdir() if p.is_file())
        supported = [f for f in files if has_image_suffix(f) or is_video_file(f)]
        if not supported:
            raise SourceError(f"source folder '{path}' holds no image or video file")
        yield from _frames_of_files(supported, vid_stride, skips)
    elif not Path(path).exists():
        raise SourceError(f"source '{path}' does not exist")
    elif _suffix(path) == "txt":
        yield from _frames_of_files(read_image_list(Path(path)), vid_stride, skips)
    else:
        yield from _frames_of_file(path, vid_stride, in_collection, skips)


def _frames_of_files(files, vid_stride, skips):
    for file in files:
        yield from _frames_of_file(file, vid_stride, True, skips)


def _frames_of_file(path, vid_stride, in_collection, skips):
    """An image or a video file; inside a folder, glob or list an unreadable file is a named skip."""
    try:
        if is_video_file(path):
            yield from _video_frames(path, vid_stride)
        elif has_image_suffix(path):
            yield Frame(_read_image(path), path)
        else:
            raise SourceError(f"source '{path}' has an unsupported suffix; expected an image "
                              f"({', '.join(sorted(IMG_FORMATS))}) or a video ({', '.join(sorted(VID_FORMATS))})")
    except SourceError as error:
        if not in_collection:
            raise
        skips.add(error)


def _read_image(path):
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise SourceError(f"image '{path}' cannot be read (corrupt or not an image)")
    return image


def _video_frames(path, vid_stride):
    """Frames streamed from a video file, every `vid_stride`-th one."""
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise SourceError(f"video '{path}' cannot be opened")
    info = VideoInfo(
        path=path,
        fps=capture.get(cv2.CAP_PROP_FPS) or 30.0,
        frame_count=int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0),
        width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
        height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
    )
    try:
        index = 0
        while True:
            ok, image = capture.read()
            if not ok:
                break
            if index % vid_stride == 0:
                yield Frame(image, path, info, index)
            index += 1
        if index == 0:
            raise SourceError(f"video '{path}' has no readable frame")
    finally:
        capture.release()


def _as_bgr(array, name):
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise SourceError(f"{name}: a numpy source must be a uint8 BGR image of shape (h, w, 3); got "
                          f"{array.dtype} {tuple(array.shape)}")
    if array.ndim == 2 or array.shape[2] == 1:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2BGR)
    if array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2BGR)
    return np.ascontiguousarray(array)


def _is_pil_image(item):
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(item, Image.Image)
