"""Torch helpers: device selection, seeding, model unwrapping, BN fusion, parameter/FLOP counting."""

import copy
import logging
import os
import platform
import random

import numpy as np
import torch
import torch.nn as nn

from yolotrain.errors import CfgError

LOGGER = logging.getLogger(__name__)


def select_device(device=None):
    """Resolve a user's `device` argument to a torch.device.

    "" / None: the first GPU when CUDA is available, else the CPU. "cpu", "mps", "cuda", "cuda:N", "N" or a list
    "N,M,..." (the first index is this process's device; DDP assigns the others by local rank).
    Raises CfgError (one line) when the requested accelerator is missing or an index is out of range.
    """
    text = "" if device is None else str(device).strip().lower().replace(" ", "")
    text = text.replace("cuda:", "").replace("[", "").replace("]", "").replace("'", "")
    if text in ("", "none"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise CfgError("device='mps' requested but MPS is not available on this machine; use device=cpu")
        return torch.device("mps")
    if text == "cuda":
        text = "0"
    return torch.device("cuda", _first_cuda_index(device, text))


def _first_cuda_index(device, text):
    indices = text.split(",")
    if not all(index.isdigit() for index in indices):
        raise CfgError(f"device={device!r} is not understood; expected cpu, mps, a GPU index like 0, or a list like 0,1")
    if not torch.cuda.is_available():
        raise CfgError(f"device={device!r} requests CUDA but no CUDA GPU is available; use device=cpu")
    count = torch.cuda.device_count()
    out_of_range = [int(index) for index in indices if int(index) >= count]
    if out_of_range:
        raise CfgError(f"device={device!r}: GPU index {out_of_range[0]} is out of range (this machine has {count} GPU(s))")
    return int(indices[0])


def channels_last_pays(device):
    """True where convolutions run faster on channels-last tensors: CUDA, and x86 CPUs through oneDNN."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available()


def de_parallel(model):
    """The plain model inside DataParallel/DistributedDataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def init_seeds(seed=0, deterministic=False):
    """Seed Python, NumPy and torch (all devices); optionally ask torch for deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        # warn_only: ops without a deterministic kernel warn instead of stopping a training run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # required by cuBLAS for deterministic matmuls
        os.environ["PYTHONHASHSEED"] = str(seed)
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def copy_attr(target, source, include=(), exclude=()):
    """Copy the public attributes of `source` onto `target` (only `include` when given, never `exclude`)."""
    for key, value in source.__dict__.items():
        if (include and key not in include) or key.startswith("_") or key in exclude:
            continue
        setattr(target, key, value)


def intersect_dicts(state_a, state_b, exclude=()):
    """Entries of `state_a` whose key is in `state_b` with the same shape, skipping keys containing any of `exclude`."""
    return {
        key: value
        for key, value in state_a.items()
        if key in state_b and not any(part in key for part in exclude) and value.shape == state_b[key].shape
    }


def any_along(mask, dim):
    """`mask.any(dim)` of a bool tensor, taken as the largest of its bytes: on the CPU `any` over a dimension other
    than the last runs 10-40x slower than `amax` over the same bytes (the assigner's (B, M, A) masks)."""
    if mask.shape[dim] == 0:  # amax has no value to give over nothing; any gives False
        return mask.any(dim)
    return mask.view(torch.uint8).amax(dim).bool()


def fuse_conv_and_bn(conv, bn):
    """A Conv2d (with bias) computing bn(conv(x)) for a BatchNorm2d in eval mode."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
    ).requires_grad_(False)
    fused = fused.to(device=conv.weight.device, dtype=conv.weight.dtype)
    # In the source's memory layout: a channels-last weight makes the CPU convolve channels-last (faster there).
    fused.weight = nn.Parameter(torch.empty_like(conv.weight), requires_grad=False)
    fold_conv_and_bn_into(fused, conv, bn)
    return fused


def fold_conv_and_bn_into(target, conv, bn):
    """Write the weight and bias of bn(conv(x)) (BatchNorm2d in eval mode) into `target`, a Conv2d with bias."""
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
        target.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        target.bias.copy_((conv_bias - bn.running_mean) * scale + bn.bias)


def fused_for_inference(model, copy_first):
    """`model` with each BatchNorm folded into its convolution (exported models already are); `copy_first` when
    the caller's model must stay as it is, e.g. a model that is still training."""
    if not hasattr(model, "fuse") or getattr(model, "is_fused", lambda: True)():
        return model
    return (copy.deepcopy(model) if copy_first else model).fuse()


class FusedCopy:
    """A copy of a model whose weights keep changing (the EMA during training) with each Conv's BatchNorm folded into
    its convolution, for the model's validations.

    Fusing a fresh copy each time costs about what the folded BatchNorms save on a small validation set (module
    construction, not arithmetic), so the copy is made once and `refreshed()` folds the source's current weights
    into it: per folded convolution a scale, per other tensor a copy. Only the BatchNorms are folded: every branch
    stays, so the copy's outputs have the source's layout (the validation loss needs an end-to-end head's
    one-to-many branch, which `fuse()` drops). `copy` is None when the source has nothing to fold.
    """

    def __init__(self, source):
        from yolotrain.nn.modules import Conv

        self.source = source
        self.copy = None
        self._folds = []  # (fused conv, source conv, source BatchNorm)
        self._tensors = []  # (copy's module, source module, parameter or buffer name): copied as they are
        foldable = {name for name, m in source.named_modules()
                    if getattr(type(m), "fuse", None) is Conv.fuse
                    and isinstance(getattr(m, "bn", None), nn.BatchNorm2d)}
        if not foldable:
            return
        self.copy = copy.deepcopy(source).requires_grad_(False)
        for parameter in self.copy.parameters():
            parameter.grad = None  # a model in training carries its gradients: the copy has no use for them
        copied = dict(self.copy.named_modules())
        for name, module in source.named_modules():
            if name.rpartition(".")[0] in foldable:  # a folded Conv's own conv and BatchNorm
                continue
            if name in foldable:
                self._folds.append((copied[name].fuse().conv, module.conv, module.bn))
                continue
            for key, value in [*module._parameters.items(), *module._buffers.items()]:
                if value is not None:
                    self._tensors.append((copied[name], module, key))

    def refreshed(self):
        """The fused copy holding the source's current weights (call it before each use)."""
        with torch.no_grad():
            for target, conv, bn in self._folds:
                fold_conv_and_bn_into(target, conv, bn)
            for target, module, key in self._tensors:
                getattr(target, key).copy_(getattr(module, key))
        return self.copy


def get_flops(model, imgsz=640):
    """GFLOPs of one forward at `imgsz` (int or (h, w)), counted by torch's FlopCounterMode; 0.0 if counting fails.

    Counts on a small stride-sized input and scales by area: convolution FLOPs grow exactly with the pixel count,
    and the small input keeps the count cheap.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = de_parallel(model)
    try:
        parameter = next(model.parameters())
    except StopIteration:
        return 0.0
    height, width = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    stride = max(int(model.stride.max()), 32) if hasattr(model, "stride") else 32
    channels = model.yaml.get("ch", 3) if isinstance(getattr(model, "yaml", None), dict) else 3
    probe = torch.zeros((1, channels, stride, stride), device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    try:
        model.eval()  # eval: BatchNorm running statistics must not move
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(probe)
        return counter.get_total_flops() / 1e9 * (height / stride) * (width / stride)
    except Exception as error:  # a count is informative only; never fail a build over it
        LOGGER.debug("FLOP count failed: %s", error)
        return 0.0
    finally:
        model.train(was_training)


def model_info(model, imgsz=640, verbose=True, name="YOLO"):
    """Log and return (layers, parameters, gradients, GFLOPs) of a model."""
    layers = len(list(model.modules()))
    parameters = sum(p.numel() for p in model.parameters())
    gradients = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gflops = get_flops(model, imgsz)
    if verbose:
        fused = " (fused)" if getattr(model, "is_fused", lambda: False)() else ""
        LOGGER.info(
            "%s summary%s: %d layers, %s parameters, %s gradients, %.1f GFLOPs",
            name, fused, layers, f"{parameters:,}", f"{gradients:,}", gflops,
        )
    return layers, parameters, gradients, gflops


def cpu_copy(obj):
    """A deep copy of nested dicts, lists and tuples in which every tensor is copied to CPU memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: cpu_copy(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(value) for value in obj)
    return copy.deepcopy(obj)
