"""Building blocks of YOLO models: convolutions, CSP blocks, spatial pyramid pooling, mask prototypes, the Detect,
Segment, Pose, OBB and Classify heads (and the YOLO26 variants), and the normalising flow of the
YOLO26 pose loss.

Attribute names (`conv`, `bn`, `cv1`, `cv2`, `m`, ...) follow the YOLO family's conventions so that state dicts
line up parameter for parameter with other YOLOv8/YOLO11-layout implementations.
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from yolotrain.nn.anchors import dist2bbox, dist2rbox, make_anchors

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


class DWConv(Conv):
    """Depthwise convolution: one filter per channel group (groups = gcd of input and output widths)."""

    def __init__(self, c1, c2, k=1, s=1, d=1, act=True):
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), d=d, act=act)


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
    """C2f whose inner blocks are plain bottlenecks, two-bottleneck C3k blocks (c3k=True, YOLO11), or a bottleneck
    followed by position-sensitive attention (attn=True, YOLO26's last stage)."""

    def __init__(self, c1, c2, n=1, c3k=False, e=0.5, attn=False, g=1, shortcut=True):
        super().__init__(c1, c2, n, shortcut, g, e)
        self.m = nn.ModuleList(self._inner_block(c3k, attn, shortcut, g) for _ in range(n))

    def _inner_block(self, c3k, attn, shortcut, g):
        if attn:
            heads = max(self.c // 64, 1)
            return nn.Sequential(Bottleneck(self.c, self.c, shortcut, g), PSABlock(self.c, attn_ratio=0.5, num_heads=heads))
        if c3k:
            return C3k(self.c, self.c, 2, shortcut, g)
        return Bottleneck(self.c, self.c, shortcut, g)


class Attention(nn.Module):
    """Multi-head self-attention over all positions of a feature map, plus a depthwise 3x3 positional term.

    Queries and keys use `key_dim = head_dim * attn_ratio` channels per head; values use the full head width.
    Shapes: x (B, C, H, W), N = H * W positions.
    """

    def __init__(self, dim, num_heads=8, attn_ratio=0.5):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim**-0.5
        self.qkv = Conv(dim, dim + 2 * self.key_dim * num_heads, 1, act=False)
        self.proj = Conv(dim, dim, 1, act=False)
        self.pe = Conv(dim, dim, 3, 1, g=dim, act=False)  # positional encoding from the values' neighbourhood

    def forward(self, x):
        batch, channels, height, width = x.shape
        positions = height * width
        qkv = self.qkv(x).reshape(batch, self.num_heads, 2 * self.key_dim + self.head_dim, positions)
        q, k, v = qkv.split((self.key_dim, self.key_dim, self.head_dim), dim=2)  # (B, heads, d, N) each
        weights = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1)  # (B, heads, N, N)
        attended = (v @ weights.transpose(-2, -1)).view(batch, channels, height, width)
        return self.proj(attended + self.pe(v.reshape(batch, channels, height, width)))


class PSABlock(nn.Module):
    """Position-sensitive attention block: attention then a 1x1 feed-forward pair, each with a residual."""

    def __init__(self, c, attn_ratio=0.5, num_heads=4, shortcut=True):
        super().__init__()
        self.attn = Attention(c, attn_ratio=attn_ratio, num_heads=num_heads)
        self.ffn = nn.Sequential(Conv(c, c * 2, 1), Conv(c * 2, c, 1, act=False))
        self.add = shortcut

    def forward(self, x):
        x = x + self.attn(x) if self.add else self.attn(x)
        return x + self.ffn(x) if self.add else self.ffn(x)


class C2PSA(nn.Module):
    """CSP block around n PSABlocks: half the channels pass through attention, the other half skip it (YOLO11)."""

    def __init__(self, c1, c2, n=1, e=0.5):
        super().__init__()
        if c1 != c2:
            raise ValueError(f"C2PSA keeps its width: input {c1} and output {c2} channels must be equal")
        self.c = int(c1 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv(2 * self.c, c1, 1)
        self.m = nn.Sequential(*(PSABlock(self.c, attn_ratio=0.5, num_heads=max(self.c // 64, 1)) for _ in range(n)))

    def forward(self, x):
        skipped, attended = self.cv1(x).split((self.c, self.c), dim=1)
        return self.cv2(torch.cat((skipped, self.m(attended)), 1))


class SPPF(nn.Module):
    """Fast spatial pyramid pooling: n chained max-pools give receptive fields k, 2k-1, 3k-2, ... at one pool's cost.

    A yaml row that gives only [c2, k] builds the original block (activated cv1, no shortcut); a row that also gives
    n (YOLO26: [c2, k, n, shortcut]) builds the newer one, whose cv1 is linear and which may add its input back.
    """

    def __init__(self, c1, c2, k=5, n=None, shortcut=False):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1, act=n is None)
        self.n = 3 if n is None else n
        self.cv2 = Conv(hidden * (self.n + 1), c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        pooled = [self.cv1(x)]
        for _ in range(self.n):
            pooled.append(self.m(pooled[-1]))
        y = self.cv2(torch.cat(pooled, 1))
        return x + y if self.add else y


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


class Proto(nn.Module):
    """Mask prototypes: a 3x3 conv, a learned 2x upsample (transposed conv), a 3x3 conv and a 1x1 conv to `c2`
    prototypes. (B, c1, H, W) -> (B, c2, 2H, 2W); on the stride-8 level that is 1/4 of the input size."""

    def __init__(self, c1, c_=256, c2=32):
        super().__init__()
        self.cv1 = Conv(c1, c_, 3)
        self.upsample = nn.ConvTranspose2d(c_, c_, 2, 2, 0, bias=True)
        self.cv2 = Conv(c_, c_, 3)
        self.cv3 = Conv(c_, c2)

    def forward(self, x):
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))


class Proto26(Proto):
    """YOLO26's prototypes, made from every level: each coarser level is projected to the finest level's width
    (`feat_refine`, 1x1 convs), upsampled to its size and added; a 3x3 conv (`feat_fuse`) then feeds `Proto`'s
    layers. A semantic branch (`semseg`: two 3x3 convs and a 1x1 conv to nc logits, on the summed features) is a
    training-only auxiliary task; `fuse()` drops it.

    Output: a tuple, `(proto,)`, or while training (and before `fuse()`) `(proto, semantic)` with semantic
    (B, nc, H_0, W_0) at the finest level's size.
    """

    def __init__(self, ch=(), c_=256, c2=32, nc=80):
        super().__init__(c_, c_, c2)
        self.feat_refine = nn.ModuleList(Conv(c, ch[0], 1) for c in ch[1:])
        self.feat_fuse = Conv(ch[0], c_, 3)
        self.semseg = nn.Sequential(Conv(ch[0], c_, 3), Conv(c_, c_, 3), nn.Conv2d(c_, nc, 1))

    def forward(self, x):
        features = x[0]
        for refine, level in zip(self.feat_refine, x[1:]):
            # Nearest upsampling to the finest level's size (2x, 4x, ... for inputs divisible by the largest stride).
            features = features + F.interpolate(refine(level), size=features.shape[-2:], mode="nearest")
        proto = super().forward(self.feat_fuse(features))
        if self.training and self.semseg is not None:
            return proto, self.semseg(features)
        return (proto,)

    def fuse(self):
        """Inference only: drop the semantic branch, which only training uses."""
        self.semseg = None
        return self


class Detect(nn.Module):
    """Decoupled anchor-free detection head over several feature levels.

    Per level: a box branch (`cv2`) predicting 4 * reg_max outputs (DFL logits, or with reg_max=1 the four side
    distances themselves) and a class branch (`cv3`) predicting nc logits. The class branch is two 3x3 convs
    (YOLOv8) or, with `depthwise_cls`, two depthwise-separable pairs (YOLO11 and later).

    With `end2end` (YOLO26) the head has a second, one-to-one copy of both branches (`one2one_cv2/cv3`), trained
    on detached features with a top-1 assignment so that each object gets one box: its eval output needs no NMS.

    Outputs (maps are per level (B, 4 * reg_max + nc, H_i, W_i)):
    - training: the list of maps; end2end: {"one2many": maps, "one2one": maps};
    - eval: `(y, maps)` with y (B, 4 + nc, A): xywh boxes in input pixels and sigmoid class scores (NMS follows);
      end2end: `(y, {"one2many": maps, "one2one": maps})` with y (B, max_det, 6): x1, y1, x2, y2, score, class
      of the best (anchor, class) pairs, descending by score.

    A subclass adds its own outputs through three hooks: `_shared_outputs` (computed once for both branches),
    `_predict` (one branch's raw output) and `_inference` (its decoded columns, before NMS or the top-k).
    """

    def __init__(self, nc=80, ch=(), reg_max=16, end2end=False, depthwise_cls=False):
        super().__init__()
        self.nc = nc
        self.nl = len(ch)  # number of feature levels
        self.reg_max = reg_max  # DFL bins per box side (1: the box branch regresses distances directly)
        self.no = nc + self.reg_max * 4  # outputs per anchor
        self.max_det = 300  # end2end: boxes kept per image (the caller sets its own max_det)
        # Non-persistent: follows .to()/.half() with the module but is rebuilt from the yaml, not loaded.
        self.register_buffer("stride", torch.zeros(self.nl), persistent=False)
        box_width = max(16, ch[0] // 4, self.reg_max * 4)
        cls_width = max(ch[0], min(self.nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, box_width, 3), Conv(box_width, box_width, 3), nn.Conv2d(box_width, 4 * self.reg_max, 1))
            for x in ch
        )
        self.cv3 = nn.ModuleList(self._class_branch(x, cls_width, depthwise_cls) for x in ch)
        self.dfl = DFL(self.reg_max) if self.reg_max > 1 else nn.Identity()
        self.end2end = end2end
        if end2end:
            self.one2one_cv2 = copy.deepcopy(self.cv2)
            self.one2one_cv3 = copy.deepcopy(self.cv3)
        self._anchor_cache = None  # (key, anchor_points (2, A), stride_tensor (1, A)) for the last input shape

    def _class_branch(self, c_in, width, depthwise):
        if depthwise:
            return nn.Sequential(
                nn.Sequential(DWConv(c_in, c_in, 3), Conv(c_in, width, 1)),
                nn.Sequential(DWConv(width, width, 3), Conv(width, width, 1)),
                nn.Conv2d(width, self.nc, 1),
            )
        return nn.Sequential(Conv(c_in, width, 3), Conv(width, width, 3), nn.Conv2d(width, self.nc, 1))

    def set_stride(self, stride):
        """Set the per-level strides (and forget anchors computed with the old ones)."""
        self.stride.copy_(torch.as_tensor(stride, dtype=self.stride.dtype))
        self._anchor_cache = None

    def forward(self, x):
        shared = self._shared_outputs(x)
        if not self.end2end:
            preds = self._predict(x, shared)
            return preds if self.training else (self._inference(preds), preds)
        # The one-to-one branches learn from detached features (and get the shared outputs detached) so that their
        # top-1 targets do not steer the backbone.
        if self.training:
            one2one = self._predict([xi.detach() for xi in x], tuple(t.detach() for t in shared), one2one=True)
        else:
            one2one = self._predict(x, shared, one2one=True)
        preds = {"one2one": one2one}
        if self.cv2 is not None:  # None after fuse(): inference keeps only the one-to-one branches
            preds["one2many"] = self._predict(x, shared)
        return preds if self.training else (self._top_detections(self._inference(one2one, xywh=False)), preds)

    def _shared_outputs(self, x):
        """Outputs computed once and given to both branches of an end2end head (a subclass's mask prototypes);
        a tuple, empty for Detect."""
        return ()

    def _predict(self, x, shared, one2one=False):
        """One branch's raw output, the form training returns: here its per-level maps."""
        if one2one:
            return self._maps(x, self.one2one_cv2, self.one2one_cv3)
        return self._maps(x, self.cv2, self.cv3)

    def _inference(self, preds, xywh=True):
        """A branch's raw output -> (B, 4 + nc + extra, A) decoded columns; see `_decode`."""
        return self._decode(preds, xywh)

    def _maps(self, x, box_branch, cls_branch):
        return [torch.cat((box_branch[i](x[i]), cls_branch[i](x[i])), 1) for i in range(self.nl)]

    def _per_anchor(self, x, branch, channels):
        """A per-level branch's outputs (B, channels, H_i, W_i) concatenated over levels -> (B, channels, A)."""
        return torch.cat([branch[i](x[i]).view(x[i].shape[0], channels, -1) for i in range(self.nl)], 2)

    def _anchors(self, maps):
        """Anchor points and strides as (2, A) and (1, A), recomputed only when the input shape/device/dtype change."""
        key = (tuple(tuple(m.shape[2:]) for m in maps), maps[0].device, maps[0].dtype)
        if self._anchor_cache is None or self._anchor_cache[0] != key:
            points, strides = make_anchors(maps, self.stride, 0.5)
            self._anchor_cache = (key, points.transpose(0, 1), strides.transpose(0, 1))
        return self._anchor_cache[1], self._anchor_cache[2]

    def _decode(self, maps, xywh=True, angles=None):
        """(B, 4 + nc, A): boxes in input pixels (xywh, or xyxy) and sigmoid class scores. With `angles` (B, 1, A)
        in radians the boxes are rotated ones, always centre x, y, width, height (see `dist2rbox`)."""
        batch_size = maps[0].shape[0]
        flat = torch.cat([m.view(batch_size, self.no, -1) for m in maps], 2)  # (B, no, A)
        box_logits, cls_logits = flat.split((self.reg_max * 4, self.nc), 1)
        anchor_points, stride_tensor = self._anchors(maps)
        distances = self.dfl(box_logits)  # (B, 4, A) in grid units of each level
        if angles is None:
            boxes = dist2bbox(distances, anchor_points.unsqueeze(0), xywh=xywh, dim=1)
        else:
            boxes = dist2rbox(distances, angles, anchor_points.unsqueeze(0), dim=1)
        return torch.cat((boxes * stride_tensor, cls_logits.sigmoid()), 1)

    def _top_detections(self, decoded):
        """(B, 4 + nc + E, A) xyxy, scores and E extra values per anchor -> (B, k, 6 + E): the k = min(max_det, A)
        best (anchor, class) pairs as x1, y1, x2, y2, score, class and their anchor's extra values; no NMS.

        Two top-k steps keep it cheap: the k anchors with the best class score, then the k best pairs among them.
        """
        rows = decoded.transpose(1, 2)  # (B, A, 4 + nc + E)
        scores = rows[..., 4 : 4 + self.nc]  # (B, A, nc)
        k = min(self.max_det, scores.shape[1])
        anchors = scores.amax(-1).topk(k, dim=1).indices  # (B, k)
        candidate_scores = scores.gather(1, anchors.unsqueeze(-1).expand(-1, -1, self.nc))  # (B, k, nc)
        top_scores, pair = candidate_scores.flatten(1).topk(k, dim=1)  # (B, k), descending
        anchor = anchors.gather(1, pair // self.nc)  # (B, k)
        chosen = rows.gather(1, anchor.unsqueeze(-1).expand(-1, -1, rows.shape[-1]))  # (B, k, 4 + nc + E)
        labels = (pair % self.nc).to(top_scores.dtype)
        return torch.cat((chosen[..., :4], top_scores.unsqueeze(-1), labels.unsqueeze(-1), chosen[..., 4 + self.nc :]),
                         -1)

    def fuse(self):
        """Inference only: an end2end head drops its one-to-many branches, which only training uses."""
        if self.end2end:
            self.cv2 = self.cv3 = None
        return self

    def bias_init(self):
        """YOLO-family prior: box outputs start at 2.0 (with DFL any constant is the same uniform distribution;
        without it, sides of 2 grid cells); class logits at a prior of ~5 objects per 640-px image."""
        branches = [(self.cv2, self.cv3)] + ([(self.one2one_cv2, self.one2one_cv3)] if self.end2end else [])
        for box_branches, cls_branches in branches:
            for box_branch, cls_branch, stride in zip(box_branches, cls_branches, self.stride.tolist()):
                box_branch[-1].bias.data[:] = 2.0
                cls_branch[-1].bias.data[: self.nc] = math.log(5 / self.nc / (640 / stride) ** 2)


class Segment(Detect):
    """Detect plus instance masks, as in the YOLO family's segmentation models: a prototype module (`proto`) turns
    the finest level into nm mask prototypes at 1/4 of the input size, and a per-level branch (`cv4`: two 3x3 convs
    and a 1x1 conv) predicts nm mask coefficients per anchor. An object's mask is the sigmoid of its coefficients
    times the prototypes (the loss and the validator compute it, cropped to the object's box).

    Args: nc; nm, mask prototypes (and coefficients per anchor); npr, the prototype module's width; ch and Detect's
    options.

    Outputs, with maps as in Detect, coefficients (B, nm, A) raw and proto (B, nm, H/4, W/4) for an H x W input:
    - training: `(maps, coefficients, proto)`;
    - eval: `(y, (maps, coefficients, proto))` with y (B, 4 + nc + nm, A): Detect's decoded xywh boxes and sigmoid
      scores, then the raw coefficients (NMS follows and carries them along);
    - end2end training: `{"one2many": (maps, coefficients, proto), "one2one": (maps, coefficients, proto)}`, each
      branch a tuple as above. The one-to-one branch is computed from detached features and gets the prototypes
      detached: its mask loss trains its coefficients, not the prototypes or the backbone;
    - end2end eval: `(y, that dict)` with y (B, max_det, 6 + nm): x1, y1, x2, y2, score, class of the best (anchor,
      class) pairs, descending by score, then the coefficients of each row's anchor; after `fuse()` the dict holds
      only "one2one".
    """

    def __init__(self, nc=80, nm=32, npr=256, ch=(), reg_max=16, end2end=False, depthwise_cls=False):
        if nm < 1 or npr < 1:
            raise ValueError(f"Segment needs nm >= 1 mask prototypes and a width npr >= 1, got nm={nm}, npr={npr}")
        super().__init__(nc, ch, reg_max, end2end, depthwise_cls)
        self.nm = nm  # mask prototypes, and coefficients per anchor
        self.npr = npr  # width of the prototype module
        self.proto = self._prototype_module(ch)
        width = max(ch[0] // 4, self.nm)
        self.cv4 = nn.ModuleList(nn.Sequential(Conv(x, width, 3), Conv(width, width, 3), nn.Conv2d(width, self.nm, 1))
                                 for x in ch)
        if end2end:
            self.one2one_cv4 = copy.deepcopy(self.cv4)

    @staticmethod
    def eval_prototypes(output):
        """The prototypes (B, nm, H/4, W/4) of an eval output `(y, extras)`, end2end or not, or of an export's
        `(y, prototypes)`."""
        extras = output[1]
        if isinstance(extras, torch.Tensor):
            return extras
        return (extras["one2one"] if isinstance(extras, dict) else extras)[2]

    def _prototype_module(self, ch):
        return Proto(ch[0], self.npr, self.nm)

    def _shared_outputs(self, x):
        """(proto,): one set of prototypes serves both branches of an end2end head."""
        return (self.proto(x[0]),)

    def _predict(self, x, shared, one2one=False):
        maps = super()._predict(x, shared, one2one)
        coefficients = self._per_anchor(x, self.one2one_cv4 if one2one else self.cv4, self.nm)
        return (maps, coefficients, *shared)

    def _inference(self, preds, xywh=True):
        maps, coefficients = preds[:2]
        return torch.cat((self._decode(maps, xywh), coefficients), 1)

    def fuse(self):
        """Inference only: an end2end head drops its one-to-many branches, the coefficient branch included."""
        if self.end2end:
            self.cv4 = None
        return super().fuse()


class Segment26(Segment):
    """YOLO26's Segment head: its prototypes (`Proto26`) are made from every level, and while training it also
    returns semantic logits from an auxiliary branch. Outputs as in `Segment`, except that each training tuple (of
    each branch, when end2end) gains a fourth element, semantic (B, nc, H/8, W/8) logits (detached in the
    one-to-one branch); eval outputs have none, and `fuse()` drops the semantic branch.
    """

    def _prototype_module(self, ch):
        return Proto26(ch, self.npr, self.nm, self.nc)

    def _shared_outputs(self, x):
        return self.proto(x)

    def fuse(self):
        self.proto.fuse()
        return super().fuse()


class Pose(Detect):
    """Detect plus a keypoint branch (`cv4`, two 3x3 convs and a 1x1 conv, as in the YOLO family's pose models).

    Per anchor it predicts K keypoints of `kpt_shape` (K, D): an x, y offset each and, for D = 3, a visibility
    logit. A keypoint decodes to (2 * offset + anchor - 0.5) * stride pixels (`keypoints_in_grid`): within a few
    cells of its anchor at small offsets, anywhere in the image at large ones.

    Outputs, with maps as in Detect and keypoints (B, K * D, A) raw:
    - training: `(maps, keypoints)`; eval: `(y, (maps, keypoints))` with y (B, 4 + nc + K * D, A): Detect's decoded
      boxes and scores, then each keypoint's x, y in input pixels (and its visibility in [0, 1]);
    - end2end: as for `Segment`, a dict of both branches' tuples, and in eval y (B, max_det, 6 + K * D) rows with
      each row's anchor's decoded keypoints.
    """

    def __init__(self, nc=80, kpt_shape=(17, 3), ch=(), reg_max=16, end2end=False, depthwise_cls=False):
        kpt_shape = tuple(int(v) for v in kpt_shape)
        if len(kpt_shape) != 2 or kpt_shape[0] < 1 or kpt_shape[1] not in (2, 3):
            raise ValueError(f"kpt_shape={list(kpt_shape)}: expected [keypoints, 2 or 3]")
        super().__init__(nc, ch, reg_max, end2end, depthwise_cls)
        self.kpt_shape = kpt_shape
        self.nk = kpt_shape[0] * kpt_shape[1]  # keypoint values per anchor
        self._keypoint_branches(ch)

    def _keypoint_branches(self, ch):
        width = max(ch[0] // 4, self.nk)
        self.cv4 = nn.ModuleList(nn.Sequential(Conv(x, width, 3), Conv(width, width, 3), nn.Conv2d(width, self.nk, 1))
                                 for x in ch)
        if self.end2end:
            self.one2one_cv4 = copy.deepcopy(self.cv4)

    def _predict(self, x, shared, one2one=False):
        maps = super()._predict(x, shared, one2one)
        return maps, self._per_anchor(x, self.one2one_cv4 if one2one else self.cv4, self.nk)

    def _inference(self, preds, xywh=True):
        maps, keypoints = preds[:2]
        return torch.cat((self._decode(maps, xywh), self.decode_keypoints(keypoints, maps)), 1)

    @staticmethod
    def keypoints_in_grid(offsets, anchor_points):
        """Raw x, y outputs -> positions in grid units of each anchor's level (`offsets` and `anchor_points`
        broadcast: e.g. (..., 2, A) and (2, A), or (..., A, K, 2) and (A, 1, 2))."""
        return offsets * 2.0 + (anchor_points - 0.5)

    def decode_keypoints(self, keypoints, maps):
        """(B, K * D, A) raw outputs -> the same shape in input pixels (visibility through a sigmoid)."""
        anchor_points, strides = self._anchors(maps)  # (2, A), (1, A)
        count, dims = self.kpt_shape
        raw = keypoints.view(keypoints.shape[0], count, dims, -1)
        decoded = self.keypoints_in_grid(raw[:, :, :2], anchor_points) * strides  # (B, K, 2, A)
        if dims == 3:
            decoded = torch.cat((decoded, raw[:, :, 2:3].sigmoid()), 2)
        return decoded.view(keypoints.shape[0], self.nk, -1)

    def fuse(self):
        """Inference only: an end2end head drops its one-to-many branches, the keypoint branch included."""
        if self.end2end:
            self.cv4 = None
        return super().fuse()


class Pose26(Pose):
    """YOLO26's Pose head. Its keypoint branch is two shared 3x3 convs (`cv4`) and two 1x1 outputs: the keypoints
    (`cv4_kpts`, decoded as (offset + anchor) * stride, no 2x scale) and, while training, an x and y spread per
    keypoint (`cv4_sigma`, logits of sigma in grid units) for the residual log-likelihood loss, whose normalising
    flow (`flow_model`, a `RealNVP`) the head carries so that it trains, saves and resumes with the model.

    Outputs as in `Pose`, except that each training tuple gains a third element, sigma (B, K * 2, A) raw; eval
    outputs have none, and `fuse()` drops the sigma branches and the flow.
    """

    def _keypoint_branches(self, ch):
        count, dims = self.kpt_shape
        width = max(ch[0] // 4, count * (dims + 2))
        # Registered in the reference models' order, so parameters (and optimizer states) line up one for one.
        self.cv4 = nn.ModuleList(nn.Sequential(Conv(x, width, 3), Conv(width, width, 3)) for x in ch)
        if self.end2end:
            self.one2one_cv4 = copy.deepcopy(self.cv4)
        self.flow_model = RealNVP()
        self.cv4_kpts = nn.ModuleList(nn.Conv2d(width, self.nk, 1) for _ in ch)
        self.nk_sigma = count * 2  # sigma x, y per keypoint
        self.cv4_sigma = nn.ModuleList(nn.Conv2d(width, self.nk_sigma, 1) for _ in ch)
        if self.end2end:
            self.one2one_cv4_kpts = copy.deepcopy(self.cv4_kpts)
            self.one2one_cv4_sigma = copy.deepcopy(self.cv4_sigma)

    def _predict(self, x, shared, one2one=False):
        maps = Detect._predict(self, x, shared, one2one)
        prefix = "one2one_" if one2one else ""
        features = [branch(level) for branch, level in zip(getattr(self, prefix + "cv4"), x)]
        keypoints = self._per_anchor(features, getattr(self, prefix + "cv4_kpts"), self.nk)
        if not self.training:
            return maps, keypoints
        return maps, keypoints, self._per_anchor(features, getattr(self, prefix + "cv4_sigma"), self.nk_sigma)

    @staticmethod
    def keypoints_in_grid(offsets, anchor_points):
        return offsets + anchor_points

    def fuse(self):
        """Inference only: no sigma branches or flow (training alone uses them), and Pose's end2end pruning."""
        self.flow_model = None
        self.cv4_sigma = self.one2one_cv4_sigma = None
        if self.end2end:
            self.cv4_kpts = None
        return super().fuse()


class RealNVP(nn.Module):
    """A normalising flow on 2-D points (Dinh et al., RealNVP, 2017) as residual log-likelihood estimation uses it
    (Li et al., RLE, 2021): it learns the density of keypoint errors divided by their predicted sigma.

    Six affine coupling layers with alternating masks: each keeps one coordinate and moves the other by a scale
    (`s`, tanh-bounded) and a shift (`t`) computed from the kept one, so the log-determinant is the sum of the
    scales. Layer names (`s.i`, `t.i`, the `loc`, `cov` and `mask` buffers) are those of the YOLO family's pose
    models, so their weights load key for key; `loc` and `cov` describe the standard normal prior, which
    `log_prob` uses in closed form.
    """

    def __init__(self, layers=6, width=64):
        super().__init__()
        self.register_buffer("loc", torch.zeros(2))
        self.register_buffer("cov", torch.eye(2))
        self.register_buffer("mask", torch.tensor([[0.0, 1.0], [1.0, 0.0]] * (layers // 2)))
        self.s = nn.ModuleList(self._coupling_net(width, nn.Tanh()) for _ in range(layers))
        self.t = nn.ModuleList(self._coupling_net(width) for _ in range(layers))
        for module in self.modules():
            if isinstance(module, nn.Linear):  # near-identity flow at the start
                nn.init.xavier_uniform_(module.weight, gain=0.01)

    @staticmethod
    def _coupling_net(width, last=None):
        layers = [nn.Linear(2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2)]
        return nn.Sequential(*layers, *([last] if last is not None else []))

    def to_latent(self, x):
        """(N, 2) points -> their latent points (N, 2) and the log-determinant (N,) of the map."""
        z, log_det = x, x.new_zeros(x.shape[0])
        for keep, scale_net, shift_net in zip(reversed(self.mask), reversed(self.s), reversed(self.t)):
            kept = keep * z
            scale, shift = scale_net(kept) * (1 - keep), shift_net(kept) * (1 - keep)
            z = (1 - keep) * (z - shift) * torch.exp(-scale) + kept
            log_det = log_det - scale.sum(1)
        return z, log_det

    def log_prob(self, x):
        """(N, 2) points -> (N,) log density under the flow (a standard normal in latent space)."""
        z, log_det = self.to_latent(x)
        return -0.5 * z.float().pow(2).sum(-1) - math.log(2 * math.pi) + log_det


class OBB(Detect):
    """Detect for oriented boxes: a per-level angle branch (`cv4`, two 3x3 convs and a 1x1 conv, as in the YOLO
    family's OBB models) predicts one rotation angle per anchor, and the four side distances are measured along
    the box's rotated axes (`dist2rbox`).

    Args: nc; ne, angle values per anchor (1: the yaml row is `[nc, 1]`); ch and Detect's options.

    Angle: radians, the box's width axis turned from the image x axis towards y. Here the raw output goes through
    (sigmoid(raw) - 0.25) * pi, so it lies in (-pi/4, 3pi/4); `OBB26` uses the raw output as it is.

    Outputs, with maps as in Detect and angles (B, 1, A) already decoded to radians (float):
    - training: `(maps, angles)`;
    - eval: `(y, (maps, angles))` with y (B, 4 + nc + 1, A): rotated box centre x, y, width, height in input
      pixels, sigmoid class scores, then the angle (NMS for rotated boxes follows);
    - end2end training: `{"one2many": (maps, angles), "one2one": (maps, angles)}`, the one-to-one branch computed
      from detached features;
    - end2end eval: `(y, that dict)` with y (B, max_det, 7): centre x, y, width, height, score, class and angle of
      the best (anchor, class) pairs, descending by score (boxes stay centre/size: a rotated box has no xyxy form);
      after `fuse()` the dict holds only "one2one".
    """

    def __init__(self, nc=80, ne=1, ch=(), reg_max=16, end2end=False, depthwise_cls=False):
        if ne != 1:
            raise ValueError(f"the OBB head predicts one angle per anchor: ne must be 1, got ne={ne}")
        super().__init__(nc, ch, reg_max, end2end, depthwise_cls)
        self.ne = ne  # angle values per anchor
        width = max(ch[0] // 4, self.ne)
        self.cv4 = nn.ModuleList(nn.Sequential(Conv(x, width, 3), Conv(width, width, 3), nn.Conv2d(width, self.ne, 1))
                                 for x in ch)
        if end2end:
            self.one2one_cv4 = copy.deepcopy(self.cv4)

    def decode_angles(self, raw):
        """(B, ne, A) raw angle outputs -> radians in (-pi/4, 3pi/4)."""
        return (raw.sigmoid() - 0.25) * math.pi

    def _predict(self, x, shared, one2one=False):
        maps = super()._predict(x, shared, one2one)
        raw = self._per_anchor(x, self.one2one_cv4 if one2one else self.cv4, self.ne)
        return maps, self.decode_angles(raw)

    def _inference(self, preds, xywh=True):
        """(B, 4 + nc + 1, A): rotated boxes (centre and size whatever `xywh` says), scores and angles."""
        maps, angles = preds
        return torch.cat((self._decode(maps, angles=angles), angles), 1)

    def fuse(self):
        """Inference only: an end2end head drops its one-to-many branches, the angle branch included."""
        if self.end2end:
            self.cv4 = None
        return super().fuse()


class OBB26(OBB):
    """YOLO26's OBB head: the layout of `OBB`, but its angle is the raw output of the angle branch, in unbounded
    radians (no sigmoid). A rotated box repeats every pi, so whatever needs one range folds the angle itself (e.g.
    comparing angles modulo pi). Outputs as in `OBB`."""

    def decode_angles(self, raw):
        """(B, ne, A) raw angle outputs, already radians."""
        return raw


class Classify(nn.Module):
    """Image classification head: a 1x1 Conv to 1280 channels, global average pooling, dropout and a linear layer.

    Outputs: training, the logits (B, nc); eval, `(probabilities, logits)`; with `export` set (an exported file),
    the probabilities alone.
    """

    WIDTH = 1280  # the feature width before the linear layer, as in the YOLO family's classifiers

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1):
        super().__init__()
        self.conv = Conv(c1, self.WIDTH, k, s, p, g)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(p=0.0, inplace=True)
        self.linear = nn.Linear(self.WIDTH, c2)
        self.export = False

    def forward(self, x):
        if isinstance(x, list):
            x = torch.cat(x, 1)
        logits = self.linear(self.drop(self.pool(self.conv(x)).flatten(1)))
        if self.training:
            return logits
        probabilities = logits.softmax(1)
        return probabilities if self.export else (probabilities, logits)

    def fuse(self):
        return self
