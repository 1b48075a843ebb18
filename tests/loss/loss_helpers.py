"""Helpers for the loss tests: a stand-in model with just what DetectionLoss reads, random head outputs, batches."""

from types import SimpleNamespace

import torch
from torch import nn


class FakeHead(nn.Module):
    """The attributes of `Detect` that the loss reads, plus one parameter so the model has a device."""

    def __init__(self, nc):
        super().__init__()
        self.nc = nc
        self.reg_max = 16
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.no = 4 * self.reg_max + nc
        self.anchor_weight = nn.Parameter(torch.zeros(1))


class FakeModel(nn.Module):
    """`model.model[-1]` is the head; `args` and `class_weights` as the trainer sets them."""

    def __init__(self, nc=2, class_weights=None, **gains):
        super().__init__()
        self.model = nn.ModuleList([FakeHead(nc)])
        defaults = dict(box=7.5, cls=0.5, dfl=1.5, label_smoothing=0.0)
        self.args = SimpleNamespace(**{**defaults, **gains})
        self.class_weights = class_weights


def make_feats(batch_size, nc, imgsz=64, seed=0, requires_grad=False, scale=1.0):
    """Random head outputs for an imgsz x imgsz input: 3 levels of (B, 64 + nc, imgsz/s, imgsz/s)."""
    generator = torch.Generator().manual_seed(seed)
    feats = []
    for stride in (8, 16, 32):
        side = imgsz // stride
        f = torch.randn(batch_size, 64 + nc, side, side, generator=generator) * scale
        feats.append(f.requires_grad_(requires_grad))
    return feats


def make_batch(boxes_per_image, nc, imgsz=64, seed=0, shuffle=False):
    """A collated batch with the given number of boxes per image (normalised xywh, well inside the image)."""
    generator = torch.Generator().manual_seed(seed)
    batch_idx = torch.cat([torch.full((n,), float(i)) for i, n in enumerate(boxes_per_image)])
    total = batch_idx.numel()
    centres = torch.rand(total, 2, generator=generator) * 0.5 + 0.25
    sizes = torch.rand(total, 2, generator=generator) * 0.3 + 0.15
    cls = torch.randint(0, nc, (total, 1), generator=generator).float()
    bboxes = torch.cat((centres, sizes), 1)
    if shuffle:  # a batch whose boxes are not grouped by image must give the same padded targets
        perm = torch.randperm(total, generator=generator)
        batch_idx, cls, bboxes = batch_idx[perm], cls[perm], bboxes[perm]
    img = torch.zeros(len(boxes_per_image), 3, imgsz, imgsz, dtype=torch.uint8)
    return {"batch_idx": batch_idx, "cls": cls, "bboxes": bboxes, "img": img}
