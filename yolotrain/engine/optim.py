"""Optimizer construction (parameter groups, optimizer by name, the ``auto`` choice) and ``OptimizerStepper``,
the one helper that owns mixed precision, gradient accumulation, clipping, the optimizer step and the EMA update.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from yolotrain.errors import CfgError

LOGGER = logging.getLogger(__name__)

OPTIMIZERS = ("SGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSProp")
# Above this many optimizer iterations SGD converges better; below it AdamW gets there faster.
AUTO_SGD_MIN_ITERATIONS = 10_000


def _normalisation_types() -> Tuple[type, ...]:
    types = [nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm]
    if hasattr(nn, "RMSNorm"):  # torch >= 2.4
        types.append(nn.RMSNorm)
    return tuple(types)


def build_param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Split the model's parameters into three groups, always in this order:

    0 ``weights``: weights of every non-normalisation layer, with ``weight_decay``;
    1 ``norm``: weights of normalisation layers (decided by the module's class), no decay;
    2 ``bias``: all biases, no decay (they get the warmup bias LR).

    Every parameter appears exactly once, frozen ones included, so unfreezing a layer later trains it.
    """
    norm_types = _normalisation_types()
    weights: List[nn.Parameter] = []
    norm: List[nn.Parameter] = []
    bias: List[nn.Parameter] = []
    seen: set = set()  # tied parameters belong to several modules but must be optimised once
    for module in model.modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if param_name == "bias":
                bias.append(param)
            elif isinstance(module, norm_types):
                norm.append(param)
            else:
                weights.append(param)
    return [
        {"params": weights, "weight_decay": weight_decay, "name": "weights", "bias_group": False},
        {"params": norm, "weight_decay": 0.0, "name": "norm", "bias_group": False},
        {"params": bias, "weight_decay": 0.0, "name": "bias", "bias_group": True},
    ]


def _check_optimizer_name(name: str) -> str:
    by_lower = {valid.lower(): valid for valid in OPTIMIZERS}
    if str(name).lower() in by_lower:
        return by_lower[str(name).lower()]
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1)
    hint = f" Did you mean '{by_lower[close[0]]}'?" if close else ""
    raise CfgError(f"optimizer='{name}' is not supported.{hint} Valid optimizers: {', '.join(OPTIMIZERS)}, auto")


def make_optimizer(name: str, param_groups: List[Dict[str, Any]], lr: float, momentum: float) -> torch.optim.Optimizer:
    """Build optimizer ``name`` (case-insensitive) over ``param_groups`` (each group keeps its weight decay).

    SGD uses Nesterov momentum; the Adam family uses ``betas=(momentum, 0.999)``; RMSProp uses ``momentum``.
    Every group gets ``initial_lr = lr`` (the LR the schedule scales).
    """
    canonical = _check_optimizer_name(name)
    for group in param_groups:
        group.setdefault("initial_lr", lr)
    betas = (momentum, 0.999)
    if canonical == "SGD":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=True)
    if canonical == "RMSProp":
        return torch.optim.RMSprop(param_groups, lr=lr, momentum=momentum)
    adam_family = {
        "Adam": torch.optim.Adam,
        "Adamax": torch.optim.Adamax,
        "AdamW": torch.optim.AdamW,
        "NAdam": torch.optim.NAdam,
        "RAdam": torch.optim.RAdam,
    }
    return adam_family[canonical](param_groups, lr=lr, betas=betas)


def resolve_auto_optimizer(iterations: int, nc: int) -> Tuple[str, float, float]:
    """``optimizer=auto``: SGD(0.01, 0.9) for long runs, else AdamW with an LR fitted to the number of classes."""
    if iterations > AUTO_SGD_MIN_ITERATIONS:
        return "SGD", 0.01, 0.9
    return "AdamW", round(0.002 * 5 / (4 + nc), 6), 0.9


def scaled_weight_decay(weight_decay: float, batch_size: int, accumulate: int, nominal_batch: int) -> float:
    """Weight decay scaled to the images per optimizer step, relative to the nominal batch it was tuned for."""
    return weight_decay * batch_size * accumulate / nominal_batch


class OptimizerStepper:
    """Mixed precision, gradient accumulation, unscale, clipping, optimizer step, zero_grad and EMA update.

    ``step`` passed to ``step_if_due`` is the global batch index; the optimizer steps once ``accumulate`` batches
    have been back-propagated since the last step. ``last_grad_norm`` is the total gradient norm before clipping
    (a 0-dim tensor, left on its device so reading it is the caller's choice of sync point).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        amp_dtype: Optional[torch.dtype],
        device_type: str,
        max_norm: Optional[float] = 10.0,
    ) -> None:
        self.optimizer = optimizer
        self.amp_dtype = amp_dtype
        self.device_type = device_type
        self.max_norm = max_norm
        # Only float16 needs loss scaling (bfloat16 has float32's range); CUDA is where fp16 training happens.
        scaler_enabled = amp_dtype == torch.float16 and device_type == "cuda"
        self.scaler = torch.amp.GradScaler(device_type, enabled=scaler_enabled)
        self.last_opt_step = -1
        self.last_grad_norm: Optional[torch.Tensor] = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass and loss: autocast to ``amp_dtype``, or a no-op when it is None."""
        return torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` (scaled when training in float16); gradients accumulate until the next step."""
        self.scaler.scale(loss).backward()

    def step_if_due(
        self,
        model: nn.Module,
        ema: Optional[Any],
        accumulate: int,
        step: int,
        before_zero_grad: Optional[Callable[[], None]] = None,
        after_step: Optional[Callable[[], None]] = None,
    ) -> bool:
        """Step the optimizer when ``accumulate`` batches have been accumulated; returns whether it stepped.

        Order: unscale, clip to ``max_norm``, step, update the scale, ``after_step()`` (the trainer's
        optimizer_step callbacks), ``before_zero_grad()``, zero the gradients, update the EMA.
        """
        if step - self.last_opt_step < accumulate:
            return False
        self.scaler.unscale_(self.optimizer)
        self._clip_gradients(model)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if after_step is not None:
            after_step()
        if before_zero_grad is not None:
            before_zero_grad()
        self.zero_grad()
        if ema is not None:
            ema.update(model)
        self.last_opt_step = step
        return True

    def _clip_gradients(self, model: nn.Module) -> None:
        if self.max_norm is None or self.max_norm <= 0:
            self.last_grad_norm = None
            return
        self.last_grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=self.max_norm)

    def zero_grad(self) -> None:
        """Drop all gradients (set to None: cheaper than zero-filling and frees the memory)."""
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> Dict[str, Any]:
        """GradScaler state and the step of the last optimizer update."""
        return {"scaler": self.scaler.state_dict(), "last_opt_step": int(self.last_opt_step)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ``state_dict()``; a scaler state is ignored when this run trains without fp16 scaling."""
        self.last_opt_step = int(state.get("last_opt_step", -1))
        scaler_state = state.get("scaler") or {}
        if scaler_state and self.scaler.is_enabled():
            self.scaler.load_state_dict(scaler_state)
        elif scaler_state:
            LOGGER.info("checkpoint has a GradScaler state but this run does not use fp16 scaling; ignored")
