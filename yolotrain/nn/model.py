"""YOLO models built from a model yaml (`nc`, `scales`, `backbone`, `head`): `DetectionModel` (a `Detect` head),
`SegmentationModel` (a `Segment` or `Segment26` head), `PoseModel` (a `Pose` or `Pose26` head, with the yaml's
`kpt_shape`),
`OBBModel` (an `OBB` or `OBB26` head: oriented boxes) and `ClassificationModel` (a `Classify` head), on one
`BaseModel`.

A model yaml lists layers as `[from, repeats, module, args]`. `from` is -1 (previous layer), a layer index, or a
list of them; `repeats` is scaled by the depth multiple; the first arg of channel-producing modules is their output
width, scaled by the width multiple and capped by max channels. `yolo-<scale>.yaml` resolves to `yolo.yaml` built
at that scale; the same works for a user's own `name.yaml` -> `name-<scale>.yaml`.
"""

import copy
import logging
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from yolotrain.cfg import DEFAULT_MODEL
from yolotrain.errors import CfgError, CheckpointError, one_line
from yolotrain.nn.modules import (C2PSA, C2f, C3, C3k, C3k2, OBB, OBB26, SPPF, Bottleneck, Classify, Concat, Conv,
                                  Detect, DWConv, Pose, Pose26, Segment, Segment26)
from yolotrain.utils.torch_utils import intersect_dicts, model_info

LOGGER = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent.parent / "cfg" / "models"
STRIDE_PROBE_SIZE = 256  # square zero image used once to measure the head's strides

# Modules whose first arg is the output width (scaled by the width multiple); they receive the input width first.
_WIDTH_MODULES = (Conv, DWConv, Bottleneck, C2f, C3, C3k, C3k2, C2PSA, SPPF)
# Modules that take the repeat count as their third argument instead of being stacked in an nn.Sequential.
_REPEAT_ARG_MODULES = (C2f, C3, C3k, C3k2, C2PSA)
# Larger scales of the C3k2 families (YOLO11, YOLO26) always use C3k inner blocks, whatever the row says.
_C3K_SCALES = ("m", "l", "x")
# The task a model serves follows from its head (its last layer).
HEAD_TASKS = {"Detect": "detect", "Segment": "segment", "Segment26": "segment", "Pose": "pose", "Pose26": "pose",
              "OBB": "obb", "OBB26": "obb", "Classify": "classify"}


def _module_table():
    """Module names a yaml may use -> class (built per call: no module-level mutable registry)."""
    blocks = (Conv, DWConv, Bottleneck, C2f, C3, C3k, C3k2, C2PSA, SPPF, Concat, Detect, Segment, Segment26, Pose,
              Pose26, OBB, OBB26, Classify)
    table = {cls.__name__: cls for cls in blocks}
    for cls in (nn.Upsample, nn.Identity, nn.MaxPool2d):  # shape-preserving in channels
        table[cls.__name__] = cls
        table[f"nn.{cls.__name__}"] = cls
    return table


# ----------------------------------------------------------------------------------------------------- yaml loading
def load_model_yaml(cfg):
    """Resolve `cfg` (a dict, a yaml path, or a name like `yolo-n.yaml`) to a validated model dict.

    The returned dict is a deep copy with `scale` set when the yaml has `scales`, and `yaml_file` naming its source.
    Raises CfgError (one line) for a missing file, unreadable yaml, unknown scale or malformed layer list.
    """
    if isinstance(cfg, dict):
        model_dict = copy.deepcopy(cfg)
        source = str(model_dict.get("yaml_file", "model dict"))
    else:
        model_dict, source = _read_model_file(cfg)
    _validate_model_dict(model_dict, source)
    model_dict.setdefault("yaml_file", source)
    _resolve_scale(model_dict, source)
    return model_dict


def _read_model_file(cfg):
    requested = Path(str(cfg))
    if requested.suffix not in (".yaml", ".yml"):
        raise CfgError(f"model file '{cfg}' is not a .yaml model definition (expected e.g. yolo-n.yaml)")
    path, scale_from_name = _find_model_file(requested)
    try:
        model_dict = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise CfgError(f"model file '{path}' cannot be read: {one_line(error)}") from None
    if not isinstance(model_dict, dict):
        raise CfgError(f"model file '{path}' must contain a mapping with nc, backbone and head")
    if scale_from_name is not None:
        model_dict["scale"] = scale_from_name
    elif "scale" not in model_dict:
        # `name-s.yaml` that exists as its own file still picks scale s from its name.
        match = re.fullmatch(r".+-(\w+)", requested.stem)
        if match and match.group(1) in (model_dict.get("scales") or {}):
            model_dict["scale"] = match.group(1)
    return model_dict, str(path)


def _find_model_file(requested):
    """The file for `requested` and the scale named by its `-<scale>` suffix when it resolved to a base yaml."""
    for candidate in _candidate_paths(requested):
        if candidate.is_file():
            return candidate, None
    # `yolo-n.yaml` -> yolo.yaml at scale n; `yolo11n.yaml` -> yolo11.yaml at scale n (a scale after a digit);
    # `yolo11n-cls.yaml` -> yolo11-cls.yaml at scale n (a scale between the family and its task).
    for pattern in (r"(.+)-(\w+)()", r"(.+\d)([a-z]\w*)()", r"(.+\d)([a-z])(-\w+)"):
        match = re.fullmatch(pattern, requested.stem)
        if not match:
            continue
        base = requested.with_name(match.group(1) + match.group(3) + requested.suffix)
        for candidate in _candidate_paths(base):
            if candidate.is_file():
                return candidate, match.group(2)
    available = ", ".join(sorted(p.name for p in MODELS_DIR.glob("*.yaml")))
    raise CfgError(
        f"model file '{requested}' not found (expected a model yaml path, or a built-in name like yolo-n.yaml; "
        f"built-in: {available})"
    )


def _candidate_paths(path):
    yield path
    if not path.is_absolute() and len(path.parts) == 1:
        yield MODELS_DIR / path


def _validate_model_dict(model_dict, source):
    for key in ("backbone", "head"):
        if not isinstance(model_dict.get(key), list):
            raise CfgError(f"model yaml '{source}': '{key}' must be a list of [from, repeats, module, args] rows")
    nc = model_dict.get("nc", 80)
    if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
        raise CfgError(f"model yaml '{source}': nc={nc!r} must be a positive integer")
    modules = _module_table()
    rows = model_dict["backbone"] + model_dict["head"]
    for index, row in enumerate(rows):
        _validate_row(index, row, modules, source)
    if rows[-1][2] not in HEAD_TASKS:
        raise CfgError(f"model yaml '{source}': the last layer must be a head ({', '.join(HEAD_TASKS)}), "
                       f"got '{rows[-1][2]}'")


def head_task(model_dict):
    """The task of a (validated) model dict, from its head: 'detect' for Detect, 'segment' for Segment and
    Segment26, 'pose' for Pose and Pose26, 'obb' for OBB and OBB26, 'classify' for Classify."""
    return HEAD_TASKS[model_dict["head"][-1][2]]


def _validate_row(index, row, modules, source):
    where = f"model yaml '{source}': layer {index}"
    if not (isinstance(row, list) and len(row) == 4):
        raise CfgError(f"{where} must be [from, repeats, module, args], got {row!r}")
    source_index, repeats, module_name, args = row
    if not isinstance(module_name, str) or module_name not in modules:
        raise CfgError(f"{where}: unknown module {module_name!r} (expected one of: {', '.join(sorted(modules))})")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise CfgError(f"{where}: repeats={repeats!r} must be a positive integer")
    if not isinstance(args, list):
        raise CfgError(f"{where}: args must be a list, got {args!r}")
    sources = source_index if isinstance(source_index, list) else [source_index]
    for value in sources:
        if not _is_valid_source(value, index):
            raise CfgError(
                f"{where}: bad from index {value!r} (expected -1 or an earlier layer index, "
                f"0..{index - 1} or -1..-{index})" if index else f"{where}: bad from index {value!r} (expected -1)"
            )


def _is_valid_source(value, index):
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    if index == 0:
        return value == -1  # only the input image
    return -index <= value < 0 or 0 <= value < index


def _resolve_scale(model_dict, source):
    scales = model_dict.get("scales")
    if not scales:
        return
    if not isinstance(scales, dict) or not all(isinstance(v, list) and len(v) == 3 for v in scales.values()):
        raise CfgError(f"model yaml '{source}': scales must map names to [depth, width, max_channels]")
    scale = model_dict.get("scale")
    if scale is None:
        scale = next(iter(scales))
        LOGGER.warning("model yaml '%s' names no scale; using scale '%s' (pick one with e.g. yolo-s.yaml)", source, scale)
        model_dict["scale"] = scale
    if scale not in scales:
        raise CfgError(f"model yaml '{source}': unknown scale '{scale}' (expected one of: {', '.join(scales)})")


# ---------------------------------------------------------------------------------------------------- model parsing
def make_divisible(value, divisor=8):
    """The smallest multiple of `divisor` >= value (channel widths stay hardware-friendly)."""
    return int(math.ceil(value / divisor) * divisor)


def _multipliers(model_dict):
    if model_dict.get("scales"):
        depth, width, max_channels = model_dict["scales"][model_dict["scale"]]
        return depth, width, max_channels
    return model_dict.get("depth_multiple", 1.0), model_dict.get("width_multiple", 1.0), float("inf")


def _resolve_arg(value, model_dict):
    """A layer argument: the names `nc` and `kpt_shape` stand for the yaml's own values."""
    if value == "nc":
        return model_dict.get("nc", 80)
    if value == "kpt_shape":
        if value not in model_dict:
            raise ValueError(f"a layer names {value} but the yaml has no '{value}' key")
        return model_dict[value]
    if value == "None":
        return None
    return value


def parse_model(model_dict, in_channels, source="model dict", verbose=True):
    """Build the layers of `model_dict` -> (nn.Sequential of layers, sorted indices whose outputs are reused)."""
    nc = model_dict.get("nc", 80)
    depth, width, max_channels = _multipliers(model_dict)
    modules = _module_table()
    head_options = _head_options(model_dict)
    force_c3k = model_dict.get("scale") in _C3K_SCALES
    out_channels, layers, save = [], [], set()
    if verbose:
        LOGGER.info("%3s %18s %3s %10s  %-20s %s", "", "from", "n", "params", "module", "arguments")
    for index, (source_index, repeats, module_name, args) in enumerate(model_dict["backbone"] + model_dict["head"]):
        module_cls = modules[module_name]
        args = [_resolve_arg(a, model_dict) for a in args]
        channels_in = [in_channels if index == 0 else out_channels[s] for s in _as_list(source_index)]
        repeats = max(round(repeats * depth), 1) if repeats > 1 else repeats
        layer, channels, args = _build_layer(module_cls, args, repeats, channels_in, width, max_channels, nc,
                                             head_options, force_c3k)
        layer.i, layer.f, layer.type = index, source_index, module_name
        layer.np = sum(p.numel() for p in layer.parameters())
        save.update(s % index for s in _as_list(source_index) if s != -1)
        layers.append(layer)
        out_channels.append(channels)
        if verbose:
            LOGGER.info("%3s %18s %3s %10s  %-20s %s", index, source_index, repeats, f"{layer.np:,}", module_name, args)
    return nn.Sequential(*layers), sorted(save)


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _head_options(model_dict):
    """Detect's keyword arguments from the yaml: `reg_max` (default 16), `end2end` (default False), and the
    depthwise class branch, which every family built on C3k2 blocks (YOLO11 and later) uses."""
    rows = model_dict["backbone"] + model_dict["head"]
    return {
        "reg_max": int(model_dict.get("reg_max", 16)),
        "end2end": bool(model_dict.get("end2end", False)),
        "depthwise_cls": any(row[2] == "C3k2" for row in rows),
    }


def _build_layer(module_cls, args, repeats, channels_in, width, max_channels, nc, head_options, force_c3k):
    """One layer (possibly repeats stacked in nn.Sequential), its output width and its constructor args."""
    if module_cls in _WIDTH_MODULES:
        channels_out = args[0]
        if channels_out != nc:  # a layer sized by nc keeps exactly nc channels
            channels_out = make_divisible(min(channels_out, max_channels) * width, 8)
        args = [channels_in[0], channels_out, *args[1:]]
        if module_cls in _REPEAT_ARG_MODULES:
            args.insert(2, repeats)
            repeats = 1
        if module_cls is C3k2 and force_c3k:
            args[3:4] = [True]  # also supplies c3k when the row omits it
        # Stacked copies after the first take the layer's own output as input.
        copies = [module_cls(*args)] + [module_cls(channels_out, *args[1:]) for _ in range(repeats - 1)]
    elif module_cls is Concat:
        channels_out = sum(channels_in)
        copies = [module_cls(*args) for _ in range(repeats)]
    elif module_cls is Detect:
        args = [*args[:1], channels_in]
        channels_out = None
        copies = [module_cls(*args, **head_options)]
    elif module_cls in (Pose, Pose26):
        args = [*args[:2], channels_in]
        channels_out = None
        copies = [module_cls(*args, **head_options)]
    elif module_cls in (OBB, OBB26):
        args = [*(list(args) + [nc, 1][len(args):])[:2], channels_in]  # [nc, ne]; a row without ne takes 1
        channels_out = None
        copies = [module_cls(*args, **head_options)]
    elif module_cls in (Segment, Segment26):
        # [nc, nm, npr] (a shorter row takes nm 32, npr 256); the prototype width scales as other widths do.
        nc_arg, masks, proto_width = (list(args) + [nc, 32, 256][len(args):])[:3]
        args = [nc_arg, masks, make_divisible(min(proto_width, max_channels) * width, 8), channels_in]
        channels_out = None
        copies = [module_cls(*args, **head_options)]
    elif module_cls is Classify:
        args = [sum(channels_in), *args]
        channels_out = None
        copies = [module_cls(*args)]
    else:
        channels_out = channels_in[0]
        copies = [module_cls(*args) for _ in range(repeats)]
    return (copies[0] if len(copies) == 1 else nn.Sequential(*copies)), channels_out, args


# ------------------------------------------------------------------------------------------------------------ models
class BaseModel(nn.Module):
    """A YOLO model built from a model yaml: the layers, their forward pass, fusing, summary and weight loading. The
    task's model (`DetectionModel`, `ClassificationModel`) adds its head's set-up and its loss.

    Args:
        cfg: a model yaml path or built-in name (`yolo-n.yaml`, `yolo11n-cls.yaml`, ...) or an already loaded dict.
        ch: input image channels.
        nc: number of classes; overrides the yaml's `nc` when given.
        verbose: log the per-layer table and a summary.

    Attributes: `model` (nn.Sequential of layers with `.i`, `.f`, `.type`, `.np`), `save`, `yaml` (the resolved
    dict, enough to rebuild the model), `nc`, `names`, `args` (set by the trainer; a loss reads its gains there),
    `task` (from the head).
    """

    head_type = nn.Module  # the head (last layer) a task's model is built around

    def __init__(self, cfg=DEFAULT_MODEL, ch=3, nc=None, verbose=True):
        super().__init__()
        self.yaml = load_model_yaml(cfg)
        source = self.yaml["yaml_file"]
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc is not None and nc != self.yaml.get("nc", 80):
            LOGGER.info("Overriding model yaml nc=%s with nc=%s", self.yaml.get("nc", 80), nc)
            self.yaml["nc"] = nc
        self.yaml.setdefault("nc", 80)
        self.nc = self.yaml["nc"]
        try:
            self.model, self.save = parse_model(self.yaml, ch, source, verbose)
        except (TypeError, ValueError, IndexError, KeyError) as error:
            raise CfgError(f"model yaml '{source}': cannot build layers: {one_line(error)}") from None
        if not isinstance(self.head, self.head_type):
            raise CfgError(f"model yaml '{source}': a {type(self).__name__} needs a {self.head_type.__name__} head, "
                           f"got {type(self.head).__name__}")
        self.task = head_task(self.yaml)
        self.names = {i: str(i) for i in range(self.nc)}
        self.args = None
        self.criterion = None

    @property
    def head(self):
        """The head (last layer)."""
        return self.model[-1]

    def _probe(self, ch, source):
        """One eval forward of a zero image (BatchNorm statistics untouched); a model whose layers do not fit
        together fails here with a one-line error naming its yaml."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                self.forward(torch.zeros(1, ch, STRIDE_PROBE_SIZE, STRIDE_PROBE_SIZE))
        except RuntimeError as error:
            message = one_line(error)[:300]
            raise CfgError(f"model yaml '{source}': layers do not fit together (probe forward failed: {message})") from None
        finally:
            self.train(was_training)

    def initialize_weights(self):
        """YOLO-family defaults: BatchNorm eps 1e-3 / momentum 0.03, in-place activations (convs keep torch init)."""
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps = 1e-3
                module.momentum = 0.03
            elif isinstance(module, (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)):
                module.inplace = True

    # ----------------------------------------------------------------------------------------------- forward/loss
    def forward(self, x):
        """Image tensor (B, ch, H, W) float in [0, 1] -> head output; a batch dict -> `loss(batch)`.

        Accepting the batch dict lets a DistributedDataParallel wrapper compute the loss through its own forward.
        """
        if isinstance(x, dict):
            return self.loss(x)
        outputs = []  # outputs[i] is kept only for layers listed in self.save
        for layer in self.model:
            if layer.f != -1:
                x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j] for j in layer.f]
            x = layer(x)
            outputs.append(x if layer.i in self.save else None)
        return x

    def init_criterion(self):
        """The loss used by `loss()`; override to plug in another criterion."""
        raise NotImplementedError

    def loss(self, batch, preds=None):
        """(loss to backpropagate, detached loss items) for a collated batch whose `img` is float [0, 1]."""
        if self.criterion is None:
            self.criterion = self.init_criterion()
        return self.criterion(preds if preds is not None else self.forward(batch["img"]), batch)

    # ----------------------------------------------------------------------------------------------- inference
    def is_fused(self):
        """True when no BatchNorm layer is left (after `fuse()`)."""
        return not any(isinstance(m, nn.BatchNorm2d) for m in self.modules())

    def fuse(self, verbose=False):
        """Fold every Conv's BatchNorm into its convolution for faster inference; returns self."""
        for module in self.model.modules():
            if isinstance(module, Conv):
                module.fuse()
        self.head.fuse()
        if verbose:
            self.info()
        return self

    def info(self, imgsz=640, verbose=True):
        """Log and return (layers, parameters, gradients, GFLOPs at imgsz)."""
        name = Path(self.yaml.get("yaml_file", "YOLO")).stem
        scale = self.yaml.get("scale")
        if scale and not name.endswith(f"-{scale}") and f"{scale}-" not in name:
            name = f"{name}-{scale}"
        return model_info(self, imgsz=imgsz, verbose=verbose, name=name)

    # ----------------------------------------------------------------------------------------------- weights
    def load(self, weights, verbose=True):
        """Copy every weight whose name and shape match from `weights`; returns the number transferred.

        `weights` may be another model, a state dict, a checkpoint dict (its `ema` or `model` entry) or a
        checkpoint path. Mismatched layers (e.g. a head for another nc, or another task's head) keep their values.
        """
        source_state = _state_dict_of(weights)
        own_state = self.state_dict()
        matched = intersect_dicts(source_state, own_state)
        self.load_state_dict(matched, strict=False)
        if verbose:
            LOGGER.info("Transferred %d/%d items from pretrained weights", len(matched), len(own_state))
        return len(matched)

    @classmethod
    def from_yaml_and_state(cls, yaml_dict, state_dict, nc=None, verbose=False):
        """Rebuild a model saved as (model yaml dict, state dict); every weight must match exactly."""
        model = cls(yaml_dict, nc=nc, verbose=verbose)
        state = {k: v for k, v in state_dict.items()}
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
        if missing or unexpected or mismatched:
            first = (missing or unexpected or mismatched)[0]
            raise CheckpointError(
                f"checkpoint weights do not fit the model yaml '{model.yaml.get('yaml_file')}': {len(missing)} "
                f"missing, {len(unexpected)} unexpected, {len(mismatched)} shape mismatches (first: {first})"
            )
        model.load_state_dict(state)
        return model


class DetectionModel(BaseModel):
    """YOLO detector built from a model yaml whose head is `Detect` (see `BaseModel` for the arguments).

    Adds: `stride` (tensor [8, 16, 32], measured from the head's inputs), `end2end`, `class_weights` (None or (nc,)
    tensor, read by the loss when built). Its `loss` is (loss sum * batch size, detached (box, cls, dfl)).
    """

    head_type = Detect

    def __init__(self, cfg=DEFAULT_MODEL, ch=3, nc=None, verbose=True):
        super().__init__(cfg, ch, nc, verbose)
        self.class_weights = None
        self.stride = self._measure_strides(self.yaml["ch"], self.yaml["yaml_file"])
        self.head.set_stride(self.stride)
        self.head.bias_init()
        self.initialize_weights()
        if verbose:
            self.info()

    @property
    def end2end(self):
        """True when the eval output is already final detections (B, max_det, 6): no NMS follows."""
        return bool(self.head.end2end)

    def _measure_strides(self, ch, source):
        """The stride of each feature level the head reads, measured from the head's inputs (whatever a head
        returns: boxes, masks, keypoints or class scores)."""
        levels = []
        hook = self.head.register_forward_pre_hook(lambda _, inputs: levels.extend(inputs[0]))
        try:
            self._probe(ch, source)
        finally:
            hook.remove()
        return torch.tensor([STRIDE_PROBE_SIZE / level.shape[-2] for level in levels])

    def init_criterion(self):
        from yolotrain.loss.detection import DetectionLoss, EndToEndDetectionLoss

        return EndToEndDetectionLoss(self) if self.end2end else DetectionLoss(self)

    def set_loss_epoch(self, epoch, epochs):
        """Tell the loss where training stands (the end-to-end loss moves weight between its branches)."""
        if self.criterion is None:
            self.criterion = self.init_criterion()
        if hasattr(self.criterion, "set_epoch"):
            self.criterion.set_epoch(epoch, epochs)


class SegmentationModel(DetectionModel):
    """YOLO instance-segmentation model built from a model yaml whose head is `Segment` (`yolo11n-seg.yaml`, ...) or
    `Segment26` (`yolo26n-seg.yaml`); see `BaseModel` for the arguments and `Segment` for the head's outputs.

    Adds `nm` (mask prototypes per image, coefficients per anchor) and `semantic_branch`. Its loss comes from
    `yolotrain.loss.segment`: `SegmentationLoss`, `MaskAlignedSegmentationLoss` for a `Segment26` head (assigned by
    box and mask), either mixed over both branches by `EndToEndSegmentationLoss` for an end2end head; it is (loss sum
    * batch size, detached (box, seg, cls, dfl[, sem])).
    """

    head_type = Segment

    def __init__(self, cfg="yolo11n-seg.yaml", ch=3, nc=None, verbose=True):
        super().__init__(cfg, ch, nc, verbose)

    @property
    def nm(self):
        """Mask prototypes per image (and mask coefficients per anchor)."""
        return self.head.nm

    @property
    def semantic_branch(self):
        """Whether the head also predicts a class per pixel (YOLO26), trained by a fifth loss item (`sem_loss`)."""
        return isinstance(self.head, Segment26)

    def init_criterion(self):
        from yolotrain.loss.segment import EndToEndSegmentationLoss, MaskAlignedSegmentationLoss, SegmentationLoss

        if self.end2end:
            return EndToEndSegmentationLoss(self)
        return MaskAlignedSegmentationLoss(self) if self.semantic_branch else SegmentationLoss(self)


class PoseModel(DetectionModel):
    """YOLO keypoint model built from a model yaml whose head is `Pose` (`yolo11n-pose.yaml`, ...) or `Pose26`
    (`yolo26n-pose.yaml`, end2end); see `BaseModel` for the arguments. `data_kpt_shape` (the dataset's
    `kpt_shape`) replaces the yaml's, so a model made for 17 person keypoints is rebuilt for K of another dataset
    (its keypoint head is then new, the rest transfers).

    Adds `kpt_shape` and `kpt_oks_sigmas` (None: the default sigmas of `utils.metrics.keypoint_sigmas`; the trainer
    sets the data yaml's `kpt_sigmas`). Its loss comes from `yolotrain.loss.pose`: `PoseLoss`, `RLEPoseLoss` for a
    `Pose26` head (a sixth item, `rle_loss`), either mixed over both branches by `EndToEndPoseLoss` for an end2end
    head; it is (loss sum * batch size, the detached items).
    """

    head_type = Pose

    def __init__(self, cfg="yolo11n-pose.yaml", ch=3, nc=None, data_kpt_shape=None, verbose=True):
        model_dict = load_model_yaml(cfg)
        if data_kpt_shape is not None and list(data_kpt_shape) != list(model_dict.get("kpt_shape") or []):
            LOGGER.info("Overriding model yaml kpt_shape=%s with kpt_shape=%s", model_dict.get("kpt_shape"),
                        list(data_kpt_shape))
            model_dict["kpt_shape"] = [int(v) for v in data_kpt_shape]
        super().__init__(model_dict, ch, nc, verbose)
        self.kpt_oks_sigmas = None

    @property
    def kpt_shape(self):
        """(keypoints per object, values per keypoint: 2 for x y, 3 with visibility)."""
        return self.head.kpt_shape

    @property
    def rle(self):
        """Whether the head predicts keypoint spreads for the residual log-likelihood loss (YOLO26)."""
        return isinstance(self.head, Pose26)

    def init_criterion(self):
        from yolotrain.loss.pose import EndToEndPoseLoss, PoseLoss, RLEPoseLoss

        if self.end2end:
            return EndToEndPoseLoss(self)
        return RLEPoseLoss(self) if self.rle else PoseLoss(self)


class OBBModel(DetectionModel):
    """YOLO oriented-box model built from a model yaml whose head is `OBB` (`yolo11n-obb.yaml`, `yolov8n-obb.yaml`)
    or `OBB26` (`yolo26n-obb.yaml`, end2end); see `BaseModel` for the arguments and `OBB` for the head's outputs
    (rotated boxes as centre, size and an angle in radians). Adds `ne` (angle values per anchor, 1). Its loss comes
    from `yolotrain.loss.obb`: `OBBLoss`, or `EndToEndOBBLoss` for an end2end head.
    """

    head_type = OBB

    def __init__(self, cfg="yolo11n-obb.yaml", ch=3, nc=None, verbose=True):
        super().__init__(cfg, ch, nc, verbose)

    @property
    def ne(self):
        """Angle values per anchor (1)."""
        return self.head.ne

    def init_criterion(self):
        if self.end2end:
            from yolotrain.loss.obb import EndToEndOBBLoss

            return EndToEndOBBLoss(self)
        from yolotrain.loss.obb import OBBLoss

        return OBBLoss(self)


class ClassificationModel(BaseModel):
    """YOLO image classifier built from a model yaml whose head is `Classify` (`yolo11n-cls.yaml`, ...); see
    `BaseModel` for the arguments. `stride` is the backbone's total downsampling (32 for the built-in yamls). Its
    `loss` is (the mean cross-entropy over the batch, as the reference scales it, and that value detached)."""

    head_type = Classify

    def __init__(self, cfg="yolo11n-cls.yaml", ch=3, nc=None, verbose=True):
        super().__init__(cfg, ch, nc, verbose)
        self.stride = self._measure_stride(self.yaml["ch"], self.yaml["yaml_file"])
        self.initialize_weights()
        if verbose:
            self.info()

    def _measure_stride(self, ch, source):
        """The downsampling of the feature map the head pools, measured once."""
        sizes = []
        hook = self.head.register_forward_pre_hook(lambda _, inputs: sizes.append(_as_list(inputs[0])[0].shape[-1]))
        try:
            self._probe(ch, source)
        finally:
            hook.remove()
        return torch.tensor([STRIDE_PROBE_SIZE / sizes[0]])

    def init_criterion(self):
        from yolotrain.loss.classification import ClassificationLoss

        return ClassificationLoss()


def _state_dict_of(weights):
    if isinstance(weights, (str, Path)):
        from yolotrain.utils.checkpoint import load_checkpoint

        weights = load_checkpoint(weights)
    if isinstance(weights, nn.Module):
        return weights.state_dict()
    if isinstance(weights, dict):
        for key in ("ema", "model"):
            nested = weights.get(key)
            if isinstance(nested, nn.Module):
                return nested.state_dict()
            if isinstance(nested, dict) and nested and all(isinstance(v, torch.Tensor) for v in nested.values()):
                return nested
        if all(isinstance(v, torch.Tensor) for v in weights.values()):
            return weights
    raise CheckpointError(f"cannot load weights from {type(weights).__name__}: expected a model, state dict or checkpoint")
