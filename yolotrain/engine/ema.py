"""Exponential moving average of model weights, with the decay ramp of the YOLO family.

The EMA is an ``nn.Module`` holding a frozen copy of the model, so moving it (``.to``), evaluating it and saving it
work like any module. Its ``state_dict()`` is exactly the copied model's state dict (same keys as the model), and
the number of updates is a plain int attribute that the checkpoint stores next to it as ``ema_updates``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import torch
from torch import nn

from yolotrain.utils.torch_utils import de_parallel


class ModelEMA(nn.Module):
    """Keeps ``ema = d * ema + (1 - d) * model`` after each optimizer step, with ``d`` ramping up to ``decay``.

    The ramp ``d = decay * (1 - exp(-updates / tau))`` makes early updates follow the fast-changing model closely
    and later ones average over roughly ``1 / (1 - decay)`` steps.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0) -> None:
        super().__init__()
        self.module = copy.deepcopy(de_parallel(model)).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = float(decay)
        self.tau = float(tau)
        self.updates = int(updates)

    def decay_at(self, updates: int) -> float:
        """The decay used for the ``updates``-th update."""
        return self.decay * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model's current weights into the average (one call per optimizer step)."""
        self.updates += 1
        decay = self.decay_at(self.updates)
        model_state = de_parallel(model).state_dict()
        ema_floats, model_floats = [], []
        for name, ema_value in self.module.state_dict().items():
            model_value = model_state[name]
            if ema_value.is_floating_point():
                ema_floats.append(ema_value)
                model_floats.append(model_value.to(device=ema_value.device, dtype=ema_value.dtype))
            else:  # counters such as BatchNorm's num_batches_tracked are not averaged
                ema_value.copy_(model_value)
        if ema_floats:
            # lerp(ema, model, 1 - d) == d * ema + (1 - d) * model, in one fused pass over all tensors
            torch._foreach_lerp_(ema_floats, model_floats, 1.0 - decay)

    def update_attr(self, model: nn.Module, include: Iterable[str] = ("nc", "names", "stride", "args", "yaml")) -> None:
        """Copy plain attributes (class names, stride, hyperparameters, ...) from the model to the EMA copy."""
        source = de_parallel(model)
        for name in include:
            if hasattr(source, name):
                setattr(self.module, name, getattr(source, name))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:  # type: ignore[override]
        """The averaged model's state dict (same keys as the model's own)."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """Load averaged weights saved by ``state_dict()``; set ``updates`` separately from ``ema_updates``."""
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)
