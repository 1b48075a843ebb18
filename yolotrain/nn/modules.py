"""Building blocks of the YOLO detector: convolutions, CSP blocks, spatial pyramid pooling and the Detect head.

Attribute names (`conv`, `bn`, `cv1`, `cv2`, `m`, ...) follow the YOLO family's conventions so that state dicts
line up parameter for parameter with other YOLOv8/YOLO11-layout implementations.
"""

import math

import torch
import torch.nn as nn

from yolotrain.nn.anchors import dist2bbox, make_anchors

BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def autopad(kernel_size, padding=None, dilation=1):
    """'Same' padding for odd kernels: the padding that keeps the spatial size at stride 1."""
    if dilation > 1:
        kernel_size = (
            dilation * (kernel_size - 1) + 1
            if isinstance(kernel_size, int)
            else [dilation * (k - 1) + 1 for k in kernel_size]
        )
    if padding is None:
        padding = kernel_size // 2 if isinstance(kernel_size, int) else [k // 2 for k in kernel_size]
    return padding


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU. After `fuse()` the BatchNorm is folded into the conv."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU(inplace=True) if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def fuse(self):
        """Fold the BatchNorm into the convolution (inference only); the layer then computes the same function."""
        if isinstance(self.bn, nn.BatchNorm2d):
            from yolotrain.utils.torch_utils import fuse_conv_and_bn

            self.conv = fuse_conv_and_bn(self.conv, self.bn)
            self.bn = nn.Identity()
        return self


class Bottleneck(nn.Module):
    """Two convolutions with an optional residual connection (used when input and output widths match)."""

    def __init__(self, c1, c2, shortcut=True, g=1, k=(3, 3), e=0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, k[0], 1)
        self.cv2 = Conv(hidden, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block with two halves: one half goes through n bottlenecks, every intermediate output is concatenated."""

    def __init__(self, c1, c2, n=1, shortcut=False, g=1, e=0.5):
        super().__init__()
        self.c = int(c2 * e)  # width of each half
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, g, k=(3, 3), e=1.0) for _ in range(n))

    def forward(self, x):
        parts = list(self.cv1(x).chunk(2, 1))
        for block in self.m:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class C3(nn.Module):
    """CSP block with three convolutions: a bottleneck path and a shortcut path, concatenated and mixed."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, k=(1, 3), e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C3k(C3):
    """C3 whose bottlenecks use a configurable square kernel k."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5, k=3):
        super().__init__(c1, c2, n, shortcut, g, e)
        hidden = int(c2 * e)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, k=(k, k), e=1.0) for _ in range(n)))


class C3k2(C2f):
    """C2f whose inner blocks are either plain bottlenecks or (c3k=True) two-bottleneck C3k blocks (YOLO11)."""

    def __init__(self, c1, c2, n=1, c3k=False, e=0.5, g=1, shortcut=True):
        super().__init__(c1, c2, n, shortcut, g, e)
        self.m = nn.ModuleList(
            C3k(self.c, self.c, 2, shortcut, g) if c3k else Bottleneck(self.c, self.c, shortcut, g) for _ in range(n)
        )


class SPPF(nn.Module):
    """Fast spatial pyramid pooling: three chained max-pools give receptive fields k, 2k-1, 3k-2 at one pool's cost."""

    def __init__(self, c1, c2, k=5):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        pooled = [self.cv1(x)]
        for _ in range(3):
            pooled.append(self.m(pooled[-1]))
        return self.cv2(torch.cat(pooled, 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along one dimension (channels by default)."""

    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class DFL(nn.Module):
    """Distribution Focal Loss integral: the expected value of a softmax over `c1` bins 0..c1-1.

    Implemented as a frozen 1x1 conv whose weights are the bin values, applied to the softmax of each side's logits.
    """

    def __init__(self, c1=16):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x):
        batch_size, _, num_anchors = x.shape  # (B, 4 * c1, A)
        probabilities = x.view(batch_size, 4, self.c1, num_anchors).transpose(2, 1).softmax(1)  # (B, c1, 4, A)
        return self.conv(probabilities).view(batch_size, 4, num_anchors)


class Detect(nn.Module):
    """Decoupled anchor-free detection head over several feature levels.

    Per level: a box branch (`cv2`) predicting 4 * reg_max DFL logits and a class branch (`cv3`) predicting nc
    logits. Training mode returns the raw per-level maps (B, 4 * reg_max + nc, H_i, W_i); eval mode returns
    `(y, feats)` with y (B, 4 + nc, A): xywh boxes in input pixels and sigmoid class scores.
    """

    def __init__(self, nc=80, ch=()):
        super().__init__()
        self.nc = nc
        self.nl = len(ch)  # number of feature levels
        self.reg_max = 16  # DFL bins per box side
        self.no = nc + self.reg_max * 4  # outputs per anchor
        # Non-persistent: follows .to()/.half() with the module but is rebuilt from the yaml, not loaded.
        self.register_buffer("stride", torch.zeros(self.nl), persistent=False)
        box_width = max(16, ch[0] // 4, self.reg_max * 4)
        cls_width = max(ch[0], min(self.nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, box_width, 3), Conv(box_width, box_width, 3), nn.Conv2d(box_width, 4 * self.reg_max, 1))
            for x in ch
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(Conv(x, cls_width, 3), Conv(cls_width, cls_width, 3), nn.Conv2d(cls_width, self.nc, 1))
            for x in ch
        )
        self.dfl = DFL(self.reg_max) if self.reg_max > 1 else nn.Identity()
        self._anchor_cache = None  # (key, anchor_points (2, A), stride_tensor (1, A)) for the last input shape

    def set_stride(self, stride):
        """Set the per-level strides (and forget anchors computed with the old ones)."""
        self.stride.copy_(torch.as_tensor(stride, dtype=self.stride.dtype))
        self._anchor_cache = None

    def forward(self, x):
        maps = [torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1) for i in range(self.nl)]
        if self.training:
            return maps
        return self._decode(maps), maps

    def _anchors(self, maps):
        """Anchor points and strides as (2, A) and (1, A), recomputed only when the input shape/device/dtype change."""
        key = (tuple(tuple(m.shape[2:]) for m in maps), maps[0].device, maps[0].dtype)
        if self._anchor_cache is None or self._anchor_cache[0] != key:
            points, strides = make_anchors(maps, self.stride, 0.5)
            self._anchor_cache = (key, points.transpose(0, 1), strides.transpose(0, 1))
        return self._anchor_cache[1], self._anchor_cache[2]

    def _decode(self, maps):
        batch_size = maps[0].shape[0]
        flat = torch.cat([m.view(batch_size, self.no, -1) for m in maps], 2)  # (B, no, A)
        box_logits, cls_logits = flat.split((self.reg_max * 4, self.nc), 1)
        anchor_points, stride_tensor = self._anchors(maps)
        distances = self.dfl(box_logits)  # (B, 4, A) in grid units of each level
        boxes = dist2bbox(distances, anchor_points.unsqueeze(0), xywh=True, dim=1) * stride_tensor
        return torch.cat((boxes, cls_logits.sigmoid()), 1)

    def bias_init(self):
        """YOLO-family prior: box logits start at 1.0; class logits at a prior of ~5 objects per 640-px image."""
        for box_branch, cls_branch, stride in zip(self.cv2, self.cv3, self.stride.tolist()):
            box_branch[-1].bias.data[:] = 1.0
            cls_branch[-1].bias.data[: self.nc] = math.log(5 / self.nc / (640 / stride) ** 2)
