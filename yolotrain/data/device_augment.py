"""Training augmentation as batched torch operations on the training device.

The CPU pipeline (yolotrain.data.augment) builds every sample in a dataloader worker; at 640 px that caps a GPU
at what the workers can make. Here the workers only decode and pad (`DeviceAugmentDataset`; on CUDA with
torchvision they only read the JPEG bytes, decoded on the GPU), and `DeviceAugment` turns the whole collated batch
into the augmented one on the device: mosaic, letterbox, rotation / scale / shear / translation / perspective,
mixup, HSV and both flips, with the gains of cfg/default.yaml read as the CPU transforms read them.

How one batch is made (a fixed sequence of batched kernels, whatever the batch size):
1. Every random draw of the batch (which samples get a mosaic, its centre and tiles, the matrix gains, mixup,
   HSV gains, flips) comes from one CPU generator seeded from the samples' own seeds, so a batch is a pure
   function of the loader's (seed, epoch, salt, index), like the CPU path's samples.
2. Each output image has a virtual canvas: for a mosaic the 2*imgsz square of 4 tiles around a random centre
   (tiles are the batch's own images, tile 0 the sample itself), else the image letterboxed to imgsz. The canvas is
   never built: one 3x3 matrix per image (perspective, rotation, scale, shear, translation, then the flips) maps
   canvas to output, and one `grid_sample` pulls every output pixel through its inverse straight from the tile it
   lands in (bilinear, gray 114 outside the tiles, as OpenCV's warp of the CPU canvas gives).
3. Boxes travel as padded (B, K, 4) tensors with a mask: shifted with their tile, clipped to the canvas, their
   corners mapped by the same matrix, clipped to the image and filtered by `box_candidates`' rules.
4. Mixup blends each chosen image with another output of the batch, HSV jitters the result; the labels are
   compacted to the collated format (`cls`, `bboxes` normalised xywh, `batch_idx`, `max_boxes`), which costs the
   one device read of the batch (the box counts).

Differences from the CPU path, by design: mosaic tiles and mixup partners come from the same batch rather than
from the whole dataset (the batch is a random draw, so the distribution is the same for batches of more than a few
images), and pixel values are not rounded to uint8 between the steps. Copy-paste, a per-sample `augment` hook and
rectangular training batches are CPU-only (`check_device_augment` says so).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from yolotrain.cfg import get_cfg
from yolotrain.data.augment import (
    CANDIDATE_AR_THR,
    CANDIDATE_AREA_THR,
    CANDIDATE_WH_THR,
    PAD_VALUE,
    Compose,
    Format,
    LetterBox,
    _non_negative,
    _probability,
    _scale_gain,
)
from yolotrain.data.dataset import YOLODataset
from yolotrain.errors import CfgError

LOGGER = logging.getLogger(__name__)

AUGMENT_DEVICE_CHOICES = ("cpu", "device", "auto")
JPEG_SUFFIXES = (".jpg", ".jpeg")
EXIF_ORIENTATION_TAG = 0x0112
MOSAIC_MIN_BOX_SIZE = 1.0  # pixels, as the CPU Mosaic
MIXUP_BETA = 32  # ratio ~ Beta(32, 32), drawn as a ratio of two Gamma(32) sums of exponentials
NOT_A_MOSAIC = 1e9  # centre of a single-image canvas: every pixel is in "tile" 0
SEED_MIX = 1_000_003  # combines the samples' seeds into the batch's


# ---------------------------------------------------------------------------------------------------------------
# choosing the path
# ---------------------------------------------------------------------------------------------------------------


def check_device_augment(args, device: torch.device, augment_hook: bool = False) -> bool:
    """Whether training augments on the device, from `args.augment_device` (cpu, device or auto) and `device`.

    `auto` picks the device path on CUDA when the arguments allow it (else the CPU path, with a log line);
    `device` asks for it on any device and stops with a CfgError when an argument needs the CPU path.
    `augment_hook`: a per-sample user augmentation is set (it runs on numpy samples, so in the CPU path only).
    """
    choice = str(getattr(args, "augment_device", "cpu") or "cpu")
    if choice not in AUGMENT_DEVICE_CHOICES:
        raise CfgError(f"augment_device={choice!r} is invalid: expected one of {', '.join(AUGMENT_DEVICE_CHOICES)}")
    if choice == "cpu" or (choice == "auto" and torch.device(device).type != "cuda"):
        return False
    blocker = "augment= (a per-sample hook runs in the CPU pipeline)" if augment_hook else _cpu_only_reason(args)
    if blocker is None:
        return True
    if choice == "device":
        raise CfgError(f"augment_device=device cannot be combined with {blocker}; set augment_device=cpu or auto")
    LOGGER.info("augment_device=auto: augmenting in the dataloader workers because of %s", blocker)
    return False


def _cpu_only_reason(args) -> str | None:
    task = getattr(args, "task", "detect")
    if task in ("pose", "segment", "obb"):
        carried = {"pose": "keypoints", "segment": "masks", "obb": "rotated boxes"}[task]
        return f"task={task} ({carried} are augmented only in the CPU pipeline)"
    if getattr(args, "rect", False):
        return "rect=True (rectangular batches are letterboxed per batch shape on the CPU)"
    if float(getattr(args, "copy_paste", 0.0) or 0.0) > 0:
        return f"copy_paste={args.copy_paste} (copy-paste runs only in the CPU pipeline)"
    return None


# ---------------------------------------------------------------------------------------------------------------
# the loader side
# ---------------------------------------------------------------------------------------------------------------


class _RecordInput:
    """First transform of the device path: the resized image's size before padding, and the sample's seed."""

    def __call__(self, sample):
        sample["content_shape"] = tuple(sample["img"].shape[:2])
        sample["augment_seed"] = random.getrandbits(62)  # `random` was seeded from the sample's seed
        return sample


class DeviceAugmentDataset(YOLODataset):
    """A training `YOLODataset` whose workers only decode: each sample is the image resized so its long side is
    imgsz, padded bottom/right to an imgsz square (uint8, RGB CHW), with its boxes, its content size
    (`content_shape`, h, w) and a seed (`augment_seed`). `device_augment` (a `DeviceAugment`) makes the training
    batch from the collated samples on the device.

    `decode_on_device=True` (for CUDA with torchvision; the trainer decides): the workers only read the JPEG files
    (`jpeg`, 1-D uint8, and an empty `img`), and `device_augment` decodes the batch on the device first. It needs
    every image to be a JPEG and no image cache; otherwise the workers decode, with a log line.
    """

    def __init__(self, *args, decode_on_device: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.device_augment = DeviceAugment(self.imgsz, self.hyp if self.hyp is not None else get_cfg())
        self.decode_on_device = decode_on_device and self._files_decodable_on_device()

    def _files_decodable_on_device(self) -> bool:
        if self.cache is not None:
            LOGGER.info("%s: images cached (cache=%s): decoded in the dataloader workers", self.prefix, self.cache)
            return False
        if not all(Path(f).suffix.lower() in JPEG_SUFFIXES for f in self.im_files):
            LOGGER.info("%s: not every image is a JPEG: decoded in the dataloader workers", self.prefix)
            return False
        return True

    def build_transforms(self, hyp=None):
        """Pad only: the augmentation runs on the device."""
        return Compose([_RecordInput(), LetterBox((self.imgsz, self.imgsz), center=False), Format()])

    def __getitem__(self, index) -> dict:
        if not self.decode_on_device:
            return super().__getitem__(index)
        index, seed = index if isinstance(index, tuple) else (index, random.getrandbits(32))
        return self._encoded_sample(index, seed)

    def _encoded_sample(self, index: int, seed: int) -> dict:
        """The file's bytes and the labels as the padded sample would carry them (boxes normalised to the square)."""
        label = self.labels[index]
        h0, w0 = label["shape"]
        ratio = self.imgsz / max(h0, w0)
        h, w = max(1, round(h0 * ratio)), max(1, round(w0 * ratio))  # as resize_long_side rounds
        boxes = label["bboxes"].astype(np.float32) * np.array([w, h, w, h], np.float32) / self.imgsz
        encoded = np.fromfile(self.im_files[index], np.uint8)
        return {
            "img": torch.empty(0, dtype=torch.uint8),
            "jpeg": torch.from_numpy(encoded),
            "exif_orientation": exif_orientation(encoded),
            "cls": torch.from_numpy(label["cls"].astype(np.float32).reshape(-1, 1)),
            "bboxes": torch.from_numpy(boxes),
            "content_shape": (h, w),
            "augment_seed": random.Random(seed).getrandbits(62),
            "im_file": label["im_file"],
            "ori_shape": (h0, w0),
            "resized_shape": (self.imgsz, self.imgsz),
            "ratio_pad": ((h / h0, w / w0), (0.0, 0.0)),
        }

    def close_mosaic(self, hyp=None) -> None:
        """Turn mosaic and mixup off for the final epochs (in the device augmentation; the workers are unchanged)."""
        self.device_augment.close_mosaic()


def jpeg_decoder_for(device) -> bool:
    """Whether JPEGs can be decoded on `device`: CUDA with torchvision's nvjpeg decoder importable."""
    if torch.device(device).type != "cuda":
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401  (optional dependency)
    except ImportError:
        return False
    return True


def decode_jpegs(encoded: list[torch.Tensor], device) -> list[torch.Tensor]:
    """Decode 1-D uint8 JPEG byte tensors to (3, h, w) RGB uint8 on `device` as stored, without EXIF orientation
    (nvjpeg ignores it; `padded_batch` applies it). torchvision decodes a whole list with one call on CUDA."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device)


def exif_orientation(encoded: np.ndarray) -> int:
    """The EXIF Orientation (1..8, 1 = as stored) of JPEG bytes; 1 when there is none or it cannot be read."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(encoded.tobytes())) as image:  # reads the header only
            value = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return 1
    return value if 1 <= value <= 8 else 1


def _oriented(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, h, w) as EXIF `orientation` says to show it (as OpenCV's decoder does)."""
    rows, cols = 1, 2
    if orientation == 2:
        return image.flip(cols)
    if orientation == 3:
        return image.flip(rows, cols)
    if orientation == 4:
        return image.flip(rows)
    if orientation == 5:  # transpose: mirrored about the main diagonal
        return image.transpose(rows, cols)
    if orientation == 6:  # stored rotated: turn 90 degrees clockwise
        return torch.rot90(image, -1, (rows, cols))
    if orientation == 7:  # transverse: mirrored about the other diagonal
        return image.transpose(rows, cols).flip(rows, cols)
    if orientation == 8:
        return torch.rot90(image, 1, (rows, cols))
    return image


def padded_batch(images: list[torch.Tensor], content_hw, size: int, orientations=None) -> torch.Tensor:
    """(N, 3, S, S) uint8, gray 114: each decoded image turned by its EXIF orientation and resized (bilinear) to
    its content size at the top left.

    The images differ in size, so this step goes image by image (one resize kernel each); the augmentation after
    it is batched.
    """
    device = images[0].device
    orientations = orientations if orientations is not None else [1] * len(images)
    padded = torch.full((len(images), 3, size, size), PAD_VALUE, dtype=torch.uint8, device=device)
    for i, (image, (h, w), orientation) in enumerate(zip(images, content_hw, orientations)):
        image = _oriented(image, int(orientation))
        if tuple(image.shape[1:]) != (h, w):
            image = F.interpolate(image[None].float(), size=(int(h), int(w)), mode="bilinear", align_corners=False)
            image = image[0].round().clamp(0, 255).to(torch.uint8)
        padded[i, :, :h, :w] = image
    return padded


# ---------------------------------------------------------------------------------------------------------------
# the device side
# ---------------------------------------------------------------------------------------------------------------


class DeviceAugment:
    """The training augmentation of a batch, on the batch's device.

    Args:
        imgsz: output size (square).
        hyp: gains with the keys of default.yaml (an `Args` or a dict), checked as the CPU transforms check them.
    """

    def __init__(self, imgsz: int, hyp):
        self.imgsz = int(imgsz)
        self.mosaic = _probability(hyp, "mosaic")
        self.mixup = _probability(hyp, "mixup")
        self.degrees = _non_negative(hyp, "degrees")
        self.translate = _probability(hyp, "translate")
        self.scale = _scale_gain(hyp)
        self.shear = _non_negative(hyp, "shear")
        self.perspective = _non_negative(hyp, "perspective")
        self.hsv_gains = (_non_negative(hyp, "hsv_h"), _non_negative(hyp, "hsv_s"), _non_negative(hyp, "hsv_v"))
        self.flipud = _probability(hyp, "flipud")
        self.fliplr = _probability(hyp, "fliplr")
        self.decoder = decode_jpegs  # (list of JPEG byte tensors, device) -> list of (3, h, w) uint8 RGB, as stored

    def close_mosaic(self) -> None:
        """Mosaic and mixup off: every sample is letterboxed and warped on its own, as the CPU path's final epochs."""
        self.mosaic = 0.0
        self.mixup = 0.0

    # ----------------------------------------------------------------------------------------------- batches
    def preprocess(self, batch: dict, device) -> dict:
        """Augment a batch collated from `DeviceAugmentDataset` samples; returns it with `img` (B, 3, S, S) float
        in [0, 1] on `device` and the new `cls`, `bboxes` (normalised xywh), `batch_idx` and `max_boxes`."""
        device = torch.device(device)
        if "jpeg" in batch:  # read, not decoded, by the workers
            decoded = self.decoder(batch.pop("jpeg"), device)
            images = padded_batch(decoded, batch["content_shape"], self.imgsz, batch.get("exif_orientation"))
        else:
            images = batch["img"].to(device, non_blocking=True)
        boxes = _xywhn_to_xyxy(batch["bboxes"].to(device, non_blocking=True).float(), images.shape[-1])
        out = self.apply(
            images,
            torch.as_tensor(batch["content_shape"]),
            batch["cls"].to(device, non_blocking=True).float(),
            boxes,
            batch["batch_idx"].to(device, non_blocking=True),
            int(batch.get("max_boxes", len(boxes))),
            seed=batch_seed(batch.get("augment_seed")),
        )
        batch.update(out)
        return batch

    def apply(self, images, content_hw, cls, boxes, batch_idx, max_boxes: int, seed: int | None = None) -> dict:
        """Augment N images with their labels into N imgsz images.

        images (N, 3, S, S) uint8 RGB, image i filling its top-left `content_hw[i]` (h, w; a CPU tensor) and gray
        114 elsewhere; cls (M, 1), boxes (M, 4) pixel xyxy, batch_idx (M,) the image of each box, max_boxes the
        most boxes of one image. Returns a dict of `img` (N, 3, S, S) float in [0, 1], `cls`, `bboxes`
        (normalised xywh), `batch_idx` and `max_boxes`.
        """
        device = images.device
        num_images = len(images)
        generator = torch.Generator().manual_seed(int(seed) if seed is not None else random.getrandbits(62))
        draws = self._draw(num_images, generator)
        layout = self._layout(torch.as_tensor(content_hw).cpu().double().view(num_images, 2), draws)
        matrix = self._matrices(draws, layout["canvas_size"])  # (N, 3, 3) float64, canvas -> output
        labels = _padded_labels(cls, boxes, batch_idx, num_images, max(int(max_boxes), 1))
        labels = _mosaic_labels(labels, layout, draws)
        labels = _warped_labels(labels, matrix, draws["scale"], self.imgsz)

        inverse = torch.linalg.inv(matrix)
        projective = bool((matrix[:, 2, :2] != 0).any())  # a CPU tensor: no device read
        warped = _warp_images(images, layout, inverse.to(device, torch.float32), self.imgsz, projective)
        if self.mixup > 0:
            warped, labels = _mix(warped, labels, draws)
        if any(self.hsv_gains):
            warped = _hsv_jitter(warped, draws["hsv"].to(device))
        return _collated(warped / 255.0, labels, self.imgsz)

    # ------------------------------------------------------------------------------------------ random draws
    def _draw(self, n: int, generator: torch.Generator) -> dict:
        """Every random number of the batch, on the CPU (float64, so matrices match the CPU path's precision)."""

        def uniform(low, high, *shape):
            return low + (high - low) * torch.rand(*(shape or (n,)), generator=generator, dtype=torch.float64)

        size = self.imgsz
        gamma = -torch.rand(n, 2, MIXUP_BETA, generator=generator, dtype=torch.float64).log().sum(-1)  # Gamma(32)
        return {
            "mosaic": torch.rand(n, generator=generator, dtype=torch.float64) < self.mosaic,
            "centre": uniform(0.5 * size, 1.5 * size, n, 2).floor(),  # x, y on the 2S canvas
            "tiles": torch.cat([torch.arange(n)[:, None], torch.randint(0, n, (n, 3), generator=generator)], 1),
            "perspective": uniform(-self.perspective, self.perspective, n, 2),
            "angle": uniform(-self.degrees, self.degrees),
            "scale": uniform(1 - self.scale, 1 + self.scale),
            "shear": uniform(-self.shear, self.shear, n, 2),
            "translate": uniform(0.5 - self.translate, 0.5 + self.translate, n, 2),
            "mixup": torch.rand(n, generator=generator, dtype=torch.float64) < self.mixup,
            "mixup_partner": torch.randint(0, n, (n,), generator=generator),
            "mixup_ratio": gamma[:, 0] / gamma.sum(1),
            "hsv": uniform(-1, 1, n, 3) * torch.tensor(self.hsv_gains, dtype=torch.float64) + 1,
            "flipud": torch.rand(n, generator=generator, dtype=torch.float64) < self.flipud,
            "fliplr": torch.rand(n, generator=generator, dtype=torch.float64) < self.fliplr,
        }

    def _layout(self, resized: torch.Tensor, draws: dict) -> dict:
        """Where the 4 tiles of every canvas lie, from the images' sizes `resized` (N, 2) h, w: the image of each
        tile (N, 4), the canvas position of its top-left corner (N, 4, 2), whether the tile is used (N, 4), the
        canvas centre (N, 2; far away for a single image) and size (N,). A single image is tile 0, letterboxed
        (centred) on an imgsz canvas, as the CPU LetterBox does before RandomPerspective."""
        size = self.imgsz
        mosaic = draws["mosaic"]
        tiles = draws["tiles"]
        tile_hw = resized[tiles]  # (N, 4, 2)
        tile_h, tile_w = tile_hw[..., 0], tile_hw[..., 1]
        centre = draws["centre"]
        right = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
        bottom = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
        mosaic_x = centre[:, :1] - tile_w * (1 - right)  # left tiles end at the centre, right ones start there
        mosaic_y = centre[:, 1:] - tile_h * (1 - bottom)
        # Letterbox: pad split as LetterBox splits it (round(pad / 2 - 0.1) before the image).
        letterbox_x = torch.round((size - tile_w[:, :1]) / 2 - 0.1).expand(-1, 4)
        letterbox_y = torch.round((size - tile_h[:, :1]) / 2 - 0.1).expand(-1, 4)
        origin_x = torch.where(mosaic[:, None], mosaic_x, letterbox_x)
        origin_y = torch.where(mosaic[:, None], mosaic_y, letterbox_y)
        canvas_size = torch.where(mosaic, 2.0 * size, float(size)).double()  # (N,)
        used = mosaic[:, None] | (torch.arange(4) == 0)[None]
        return {
            "tiles": tiles,
            "origin": torch.stack([origin_x, origin_y], -1),
            "used": used,
            "centre": torch.where(mosaic[:, None], centre, torch.full_like(centre, NOT_A_MOSAIC)),
            "canvas_size": canvas_size,
        }

    def _matrices(self, draws: dict, canvas_size: torch.Tensor) -> torch.Tensor:
        """(N, 3, 3) canvas -> output matrices: translation @ shear @ rotation @ perspective @ centre, as
        RandomPerspective composes them, followed by the flips."""
        n = len(canvas_size)
        size = float(self.imgsz)

        def eye():
            return torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)

        centre = eye()
        centre[:, 0, 2] = centre[:, 1, 2] = -canvas_size / 2
        perspective = eye()
        perspective[:, 2, :2] = draws["perspective"]
        rotation = eye()
        angle = torch.deg2rad(draws["angle"])
        cos, sin = draws["scale"] * torch.cos(angle), draws["scale"] * torch.sin(angle)
        rotation[:, 0, 0], rotation[:, 0, 1], rotation[:, 1, 0], rotation[:, 1, 1] = cos, sin, -sin, cos
        shear = eye()
        shear[:, 0, 1] = torch.tan(torch.deg2rad(draws["shear"][:, 0]))
        shear[:, 1, 0] = torch.tan(torch.deg2rad(draws["shear"][:, 1]))
        translation = eye()
        translation[:, :2, 2] = draws["translate"] * size
        flip = eye()
        flip[:, 0, 0] = torch.where(draws["fliplr"], -1.0, 1.0)
        flip[:, 0, 2] = torch.where(draws["fliplr"], size, 0.0)
        flip[:, 1, 1] = torch.where(draws["flipud"], -1.0, 1.0)
        flip[:, 1, 2] = torch.where(draws["flipud"], size, 0.0)
        return flip @ translation @ shear @ rotation @ perspective @ centre


def batch_seed(sample_seeds) -> int | None:
    """One seed for a batch from its samples' `augment_seed`s (None without them)."""
    if sample_seeds is None or len(sample_seeds) == 0:
        return None
    seeds = np.asarray(sample_seeds, dtype=np.uint64)
    weights = np.uint64(SEED_MIX) ** np.arange(len(seeds), dtype=np.uint64)  # wraps around: fine for mixing
    return int(np.bitwise_xor.reduce(seeds * weights) % np.uint64(2**62))


# ---------------------------------------------------------------------------------------------------------------
# pixels
# ---------------------------------------------------------------------------------------------------------------


def _warp_images(images: torch.Tensor, layout: dict, inverse: torch.Tensor, size: int, projective=True) -> torch.Tensor:
    """(N, 3, S, S) float 0..255: every output pixel centre through `inverse` (N, 3, 3) onto its canvas, then
    bilinear from the tile it lands in, gray 114 outside the tiles and the canvas. `projective=False` promises
    that no matrix has a perspective row (so no division).

    One `grid_sample` does it for the whole batch: the images, minus 114 (so gray is 0, grid_sample's padding),
    are stacked into one tall image with a gray row between them, and each output pixel's sampling point is moved
    into its tile's image. Bilinear neighbours across a tile seam, or just past the edge of a mosaic canvas, are
    gray or the tile's own next pixel rather than what the CPU canvas holds there: a one-pixel difference along
    those lines only.
    """
    device = images.device
    n, _, height, width = images.shape
    row_pitch = height + 1  # an image and its gray separator row
    stacked = F.pad(images.float() - PAD_VALUE, (0, 0, 0, 1))  # (N, 3, H + 1, W)
    stacked = stacked.permute(1, 0, 2, 3).reshape(1, 3, n * row_pitch, width)

    # Canvas point of every output pixel centre (x, y): row r of `inverse` gives r0 * x + r1 * y + r2, built from a
    # (N, 1, S) and a (N, S, 1) term; the division only for matrices with a perspective part.
    centres = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    x_terms = inverse[:, :, :1, None] * centres.view(1, 1, 1, size)  # (N, 3, 1, S)
    y_terms = inverse[:, :, 1:2, None] * centres.view(1, 1, size, 1) + inverse[:, :, 2:, None]  # (N, 3, S, 1)

    def row(r):  # (N, S*S)
        return (x_terms[:, r] + y_terms[:, r]).view(n, -1)

    canvas_x, canvas_y = row(0), row(1)
    if projective:
        depth = row(2)
        canvas_x, canvas_y = canvas_x / depth, canvas_y / depth

    centre = layout["centre"].to(device, torch.float32)
    quadrant = (canvas_x >= centre[:, :1]).long() + 2 * (canvas_y >= centre[:, 1:]).long()  # (N, S*S) tile 0..3
    # Per tile: minus its canvas origin x, the first row of its image in the stack, its canvas origin y.
    tile_shift = torch.stack(
        [-layout["origin"][..., 0], layout["tiles"].double() * row_pitch, layout["origin"][..., 1]], -1
    ).to(device, torch.float32).view(n * 4, 3)
    shift = tile_shift[quadrant + 4 * torch.arange(n, device=device)[:, None]]  # (N, S*S, 3)
    limit = layout["canvas_size"].to(device, torch.float32)[:, None]
    own_y = canvas_y - shift[..., 2]  # in the tile's own image, whose block of the stack starts at row shift[..., 1]
    # Gray off the canvas and above or below the tile's own block of rows (where the stack holds other images);
    # within half a pixel of either, bilinear blends the edge with gray, as OpenCV's constant border does.
    inside = (canvas_x > -0.5) & (canvas_x < limit + 0.5) & (canvas_y > -0.5) & (canvas_y < limit + 0.5)
    inside &= (own_y > -0.5) & (own_y < height + 0.5)
    sample_x = torch.where(inside, canvas_x + shift[..., 0], -2.0)  # a point in grid_sample's zero padding
    sample_y = own_y + shift[..., 1]
    grid = torch.stack([sample_x * (2 / width) - 1, sample_y * (2 / (n * row_pitch)) - 1], -1)
    warped = F.grid_sample(stacked, grid.view(1, n * size, size, 2), mode="bilinear", padding_mode="zeros",
                           align_corners=False)  # (1, 3, N*S, S)
    return warped.view(3, n, size, size).permute(1, 0, 2, 3) + PAD_VALUE


def _hsv_jitter(images: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """Multiply hue, saturation and value of (N, 3, S, S) RGB 0..255 images by per-image gains (N, 3); hue wraps,
    saturation and value are clipped, as RandomHSV does with its lookup tables."""
    gains = gains.float()[:, :, None, None]
    high, _ = images.max(1, keepdim=True)
    low, _ = images.min(1, keepdim=True)
    chroma = high - low
    safe_chroma = chroma.clamp(min=1e-6)
    red, green, blue = images[:, 0:1], images[:, 1:2], images[:, 2:3]
    hue = torch.where(
        high == red, ((green - blue) / safe_chroma) % 6,
        torch.where(high == green, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4),
    )
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))  # (N, 1, S, S) in [0, 1)
    saturation = torch.where(high > 0, chroma / high.clamp(min=1e-6), torch.zeros_like(high))
    hue = (hue * gains[:, 0:1]) % 1.0
    saturation = (saturation * gains[:, 1:2]).clamp(0, 1)
    value = (high * gains[:, 2:3]).clamp(0, 255)
    # HSV -> RGB: channel n of (5, 3, 1) is v - v * s * clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6.
    offsets = torch.tensor([5.0, 3.0, 1.0], device=images.device).view(1, 3, 1, 1)
    k = (offsets + hue * 6) % 6
    return value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1)


def _mix(images: torch.Tensor, labels: dict, draws: dict):
    """Mixup: blend each chosen image with its partner from the batch and add the partner's boxes."""
    device = images.device
    chosen = draws["mixup"].to(device)
    partner = draws["mixup_partner"].to(device)
    ratio = torch.where(chosen, draws["mixup_ratio"].to(device), 1.0).float().view(-1, 1, 1, 1)
    images = images * ratio + images[partner] * (1 - ratio)
    mixed = {
        "cls": torch.cat([labels["cls"], labels["cls"][partner]], 1),
        "boxes": torch.cat([labels["boxes"], labels["boxes"][partner]], 1),
        "mask": torch.cat([labels["mask"], labels["mask"][partner] & chosen[:, None]], 1),
    }
    return images, mixed


# ---------------------------------------------------------------------------------------------------------------
# boxes
# ---------------------------------------------------------------------------------------------------------------


def _xywhn_to_xyxy(boxes: torch.Tensor, size: int) -> torch.Tensor:
    centre, half = boxes[:, :2] * size, boxes[:, 2:] * size / 2
    return torch.cat([centre - half, centre + half], 1)


def _padded_labels(cls, boxes, batch_idx, num_images: int, max_boxes: int) -> dict:
    """Collated labels (M rows) as (N, K) padded tensors: cls (N, K), boxes (N, K, 4), mask (N, K)."""
    device = boxes.device
    image = batch_idx.long().view(-1)
    # Slot of a box = its rank among its image's boxes; sort + searchsorted are deterministic on CUDA (bincount is not).
    ordered, order = torch.sort(image, stable=True)
    slot = torch.empty_like(image)
    slot[order] = torch.arange(len(image), device=device) - torch.searchsorted(ordered, ordered)
    padded_cls = torch.zeros(num_images, max_boxes, device=device)
    padded_boxes = torch.zeros(num_images, max_boxes, 4, device=device)
    mask = torch.zeros(num_images, max_boxes, dtype=torch.bool, device=device)
    padded_cls[image, slot] = cls.view(-1).float()
    padded_boxes[image, slot] = boxes.float()
    mask[image, slot] = True
    return {"cls": padded_cls, "boxes": padded_boxes, "mask": mask}


def _mosaic_labels(labels: dict, layout: dict, draws: dict) -> dict:
    """The boxes of every canvas: each used tile's boxes (N, 4, K) shifted to its origin, clipped to the canvas;
    mosaic boxes thinner than a pixel are dropped, as the CPU Mosaic drops them."""
    device = labels["boxes"].device
    tiles = layout["tiles"].to(device)
    n, k = labels["mask"].shape
    origin = layout["origin"].to(device, torch.float32)  # (N, 4, 2)
    boxes = labels["boxes"][tiles] + origin.repeat(1, 1, 2)[:, :, None, :]  # (N, 4, K, 4)
    limit = layout["canvas_size"].to(device, torch.float32).view(n, 1, 1, 1)
    boxes = torch.minimum(boxes.clamp(min=0), limit)
    mask = labels["mask"][tiles] & layout["used"].to(device)[..., None]
    wide_enough = (boxes[..., 2] - boxes[..., 0] >= MOSAIC_MIN_BOX_SIZE) & (
        boxes[..., 3] - boxes[..., 1] >= MOSAIC_MIN_BOX_SIZE
    )
    mosaic = draws["mosaic"].to(device).view(n, 1, 1)
    mask = mask & (wide_enough | ~mosaic)
    return {"cls": labels["cls"][tiles].view(n, 4 * k), "boxes": boxes.view(n, 4 * k, 4), "mask": mask.view(n, 4 * k)}


def _warped_labels(labels: dict, matrix: torch.Tensor, scale: torch.Tensor, size: int) -> dict:
    """Boxes through `matrix` (N, 3, 3): the 4 corners mapped and enclosed, clipped to the output, filtered by
    `box_candidates`' rules against the box before the warp times the scale."""
    device = labels["boxes"].device
    before = labels["boxes"]  # (N, K, 4)
    corners = before[..., [0, 1, 2, 1, 2, 3, 0, 3]].view(*before.shape[:2], 4, 2)  # x1y1, x2y1, x2y2, x1y2
    homogeneous = torch.cat([corners, torch.ones_like(corners[..., :1])], -1)  # (N, K, 4, 3)
    projected = homogeneous @ matrix.to(device, torch.float32).transpose(1, 2)[:, None]
    xy = projected[..., :2] / projected[..., 2:]
    after = torch.cat([xy.min(2).values, xy.max(2).values], -1).clamp(0, size)  # (N, K, 4)

    scale = scale.to(device, torch.float32).view(-1, 1)
    before_w, before_h = (before[..., 2] - before[..., 0]) * scale, (before[..., 3] - before[..., 1]) * scale
    after_w, after_h = after[..., 2] - after[..., 0], after[..., 3] - after[..., 1]
    eps = 1e-16
    aspect = torch.maximum(after_w / (after_h + eps), after_h / (after_w + eps))
    keep = (
        (after_w > CANDIDATE_WH_THR) & (after_h > CANDIDATE_WH_THR) & (aspect < CANDIDATE_AR_THR)
        & (after_w * after_h / (before_w * before_h + eps) > CANDIDATE_AREA_THR)
    )
    return {"cls": labels["cls"], "boxes": after, "mask": labels["mask"] & keep}


def _collated(images: torch.Tensor, labels: dict, size: int) -> dict:
    """Padded labels back to the collated format; reads the per-image box counts from the device (one sync)."""
    mask = labels["mask"]
    counts = mask.sum(1).cpu()
    boxes = labels["boxes"][mask]  # row-major: image by image, in slot order
    centre, extent = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
    image_of_box = torch.arange(len(mask), device=mask.device)[:, None].expand_as(mask)[mask]
    return {
        "img": images,
        "cls": labels["cls"][mask].view(-1, 1),
        "bboxes": torch.cat([centre, extent], 1) / size,
        "batch_idx": image_of_box.float(),
        "max_boxes": int(counts.max()) if len(counts) else 0,
    }
