"""Optimizer construction (parameter groups, optimizer by name, the ``auto`` choice), the ``MuSGD`` optimizer and
``OptimizerStepper``, the one helper that owns mixed precision, gradient accumulation, clipping, the optimizer step
and the EMA update.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from yolotrain.cfg import OPTIMIZER_CHOICES
from yolotrain.errors import CfgError

LOGGER = logging.getLogger(__name__)

OPTIMIZERS = tuple(name for name in OPTIMIZER_CHOICES if name != "auto")
# Above this many optimizer iterations MuSGD converges better; below it AdamW gets there faster.
AUTO_MUSGD_MIN_ITERATIONS = 10_000
# Under MuSGD the detection head's class branches learn this much faster than the rest (the YOLO26 recipe).
CLASS_BRANCH_LR_SCALE = 3.0
# Matrix (Linear) and conv-filter weights; other shapes have no useful matrix form for the Muon update.
MUON_WEIGHT_NDIMS = (2, 4)
# Quintic Newton-Schulz coefficients tuned for Muon: few steps, singular values pushed into about [0.7, 1.2].
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5


def _normalisation_types() -> Tuple[type, ...]:
    types = [nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm]
    if hasattr(nn, "RMSNorm"):  # torch >= 2.4
        types.append(nn.RMSNorm)
    return tuple(types)


def build_param_groups(
    model: nn.Module,
    weight_decay: float,
    muon: bool = False,
    boosted_prefixes: Sequence[str] = (),
    boosted_lr_scale: float = CLASS_BRANCH_LR_SCALE,
) -> List[Dict[str, Any]]:
    """Split the model's parameters into groups, always in this order:

    0 ``weights``: weights of every non-normalisation layer, with ``weight_decay``;
    1 ``norm``: weights of normalisation layers (decided by the module's class), no decay;
    2 ``bias``: all biases, no decay (they get the warmup bias LR);
    3 ``muon`` (only with ``muon=True``, for MuSGD): the 2-D and 4-D weights that would otherwise be in
      ``weights``, with ``weight_decay``; every group then carries a ``muon`` flag.

    Parameters whose qualified name starts with one of ``boosted_prefixes`` go instead into copies of their
    groups, appended after the above in the same order, named ``<group>_boosted`` and carrying
    ``lr_scale=boosted_lr_scale`` (``make_optimizer`` turns it into their LR); empty copies are left out.

    Every parameter appears exactly once, frozen ones included, so unfreezing a layer later trains it.
    """
    norm_types = _normalisation_types()
    base_names = ["weights", "norm", "bias"] + (["muon"] if muon else [])
    members: Dict[Tuple[str, bool], List[nn.Parameter]] = {
        (name, boosted): [] for name in base_names for boosted in (False, True)
    }
    seen: set = set()  # tied parameters belong to several modules but must be optimised once
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            qualified_name = f"{module_name}.{param_name}" if module_name else param_name
            boosted = any(qualified_name.startswith(prefix) for prefix in boosted_prefixes)
            members[(_group_name(module, param_name, param, norm_types, muon), boosted)].append(param)

    groups = [_param_group(name, members[(name, False)], weight_decay, muon) for name in base_names]
    for name in base_names:
        if members[(name, True)]:
            boosted_group = _param_group(name, members[(name, True)], weight_decay, muon)
            boosted_group.update(name=f"{name}_boosted", lr_scale=float(boosted_lr_scale))
            groups.append(boosted_group)
    return groups


def _group_name(
    module: nn.Module, param_name: str, param: nn.Parameter, norm_types: Tuple[type, ...], muon: bool
) -> str:
    if param_name == "bias":
        return "bias"
    if isinstance(module, norm_types):
        return "norm"
    if muon and param.ndim in MUON_WEIGHT_NDIMS:
        return "muon"
    return "weights"


def _param_group(name: str, params: List[nn.Parameter], weight_decay: float, muon: bool) -> Dict[str, Any]:
    decay = weight_decay if name in ("weights", "muon") else 0.0
    group = {"params": params, "weight_decay": decay, "name": name, "bias_group": name == "bias"}
    if muon:
        group["muon"] = name == "muon"
    return group


def class_branch_prefixes(model: nn.Module) -> Tuple[str, ...]:
    """Name prefixes of the detection head's class branches (``cv3`` and, end-to-end, ``one2one_cv3``).

    These are the ``boosted_prefixes`` of the MuSGD recipe; empty when the model has no ``head``.
    """
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        return ()
    head_name = next((name for name, module in model.named_modules() if module is head), None)
    if head_name is None:
        return ()
    branches = [branch for branch in ("cv3", "one2one_cv3") if isinstance(getattr(head, branch, None), nn.Module)]
    return tuple(f"{head_name}.{branch}." if head_name else f"{branch}." for branch in branches)


def _check_optimizer_name(name: str) -> str:
    by_lower = {valid.lower(): valid for valid in OPTIMIZERS}
    if str(name).lower() in by_lower:
        return by_lower[str(name).lower()]
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1)
    hint = f" Did you mean '{by_lower[close[0]]}'?" if close else ""
    raise CfgError(f"optimizer='{name}' is not supported.{hint} Valid optimizers: {', '.join(OPTIMIZERS)}, auto")


def make_optimizer(name: str, param_groups: List[Dict[str, Any]], lr: float, momentum: float) -> torch.optim.Optimizer:
    """Build optimizer ``name`` (case-insensitive) over ``param_groups`` (each group keeps its weight decay).

    SGD and MuSGD use Nesterov momentum (MuSGD applies Muon to the groups flagged ``muon``); the Adam family uses
    ``betas=(momentum, 0.999)``; RMSProp uses ``momentum``. Every group gets ``initial_lr = lr`` (the LR the
    schedule scales), or ``lr * lr_scale`` together with that starting ``lr`` when the group has an ``lr_scale``.
    SGD, Adam and AdamW take torch's fused step where the parameters' device has one (`fused_step`).
    """
    canonical = _check_optimizer_name(name)
    for group in param_groups:
        _set_initial_lr(group, lr)
    betas = (momentum, 0.999)
    fused = fused_step(param_groups)
    if canonical == "SGD":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=True, fused=fused)
    if canonical == "MuSGD":
        if not any(group.get("muon", False) for group in param_groups):
            LOGGER.warning("MuSGD got no group with muon=True: it will train as plain SGD with Nesterov momentum")
        return MuSGD(param_groups, lr=lr, momentum=momentum)
    if canonical == "RMSProp":
        return torch.optim.RMSprop(param_groups, lr=lr, momentum=momentum)
    if canonical in ("Adam", "AdamW"):
        return getattr(torch.optim, canonical)(param_groups, lr=lr, betas=betas, fused=fused)
    others = {"Adamax": torch.optim.Adamax, "NAdam": torch.optim.NAdam, "RAdam": torch.optim.RAdam}
    return others[canonical](param_groups, lr=lr, betas=betas)


def fused_step(param_groups: List[Dict[str, Any]]) -> bool:
    """Whether torch's fused step (one kernel per parameter) serves these parameters: float ones on a CPU or a CUDA
    device. It is several times faster than the default per-tensor loop (AdamW on yolo26n-pose's 3.7M parameters,
    2 CPU cores: 5.7 ms against 27.6 ms a step) and computes the same update up to float rounding."""
    parameters = [p for group in param_groups for p in group["params"]]
    return bool(parameters) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)


def _set_initial_lr(group: Dict[str, Any], lr: float) -> None:
    # The schedule scales initial_lr, so a boosted group keeps its ratio to the others through warmup and decay.
    if "lr_scale" not in group:
        group.setdefault("initial_lr", lr)
        return
    group.setdefault("initial_lr", lr * group["lr_scale"])
    group.setdefault("lr", group["initial_lr"])


def resolve_auto_optimizer(iterations: int, nc: int) -> Tuple[str, float, float]:
    """``optimizer=auto``: MuSGD(0.01, 0.9) for long runs, else AdamW with an LR fitted to the number of classes."""
    if iterations > AUTO_MUSGD_MIN_ITERATIONS:
        return "MuSGD", 0.01, 0.9
    return "AdamW", round(0.002 * 5 / (4 + nc), 6), 0.9


def newton_schulz_orthogonalise(matrices: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """Approximately orthogonalise a matrix or a (B, rows, cols) batch: same singular vectors, singular values ~1.

    The quintic iteration is approximate by design (values land in about [0.7, 1.2]) and runs in bfloat16, which
    it tolerates; the result has the input's shape and dtype.
    """
    batch = matrices if matrices.ndim == 3 else matrices.unsqueeze(0)
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    frobenius = torch.linalg.matrix_norm(batch.float(), keepdim=True)
    x = (batch.float() / (frobenius + 1e-7)).to(torch.bfloat16)  # all singular values now <= 1, where it converges
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # iterate on the small Gram matrix
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * G + c * G @ G
        x = torch.baddbmm(x, polynomial, x, beta=a)  # a * X + (b * G + c * G @ G) @ X
    if tall:
        x = x.mT
    return x.to(matrices.dtype).reshape(matrices.shape)


class MuSGD(torch.optim.Optimizer):
    """SGD with Nesterov momentum, plus a Muon update for the param groups flagged ``muon`` (the YOLO26 recipe).

    Groups with ``muon=False`` step exactly like ``torch.optim.SGD(nesterov=True)`` with weight decay added to the
    gradient. A ``muon=True`` group (2-D and 4-D weights) gets two updates each step, with separate momentum buffers:

    1. Muon: ``m = beta * m + (1 - beta) * g``; the Nesterov step ``beta * m + (1 - beta) * g`` is viewed as a
       (dim 0, rest) matrix, orthogonalised by Newton-Schulz, scaled by ``max(1, rows / cols) ** 0.5`` and applied
       with ``lr * muon_scale``;
    2. then the SGD-Nesterov update of the other groups, applied with ``lr * sgd_scale``.

    ``beta`` is the group's ``momentum``, so the schedule's momentum warmup drives both updates.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        muon_scale: float = 0.2,
        sgd_scale: float = 1.0,
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"MuSGD: invalid lr={lr}, momentum={momentum} or weight_decay={weight_decay}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, muon=False, muon_scale=muon_scale, sgd_scale=sgd_scale
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """One update of every parameter that has a gradient; ``closure`` re-evaluates the loss, as in torch."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["muon"]:
                self._muon_update(group, params, grads)
                self._sgd_update(group, params, grads, lr=group["lr"] * group["sgd_scale"])
            else:
                self._sgd_update(group, params, grads, lr=group["lr"])
        return loss

    def _buffers(self, params: List[torch.Tensor], key: str) -> List[torch.Tensor]:
        # Kept in self.state[p] so that torch's state_dict()/load_state_dict() save and restore them.
        for p in params:
            if key not in self.state[p]:
                self.state[p][key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return [self.state[p][key] for p in params]

    def _sgd_update(
        self, group: Dict[str, Any], params: List[torch.Tensor], grads: List[torch.Tensor], lr: float
    ) -> None:
        momentum, weight_decay = group["momentum"], group["weight_decay"]
        buffers = self._buffers(params, "momentum_buffer")
        if weight_decay:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
        updates = torch._foreach_add(grads, buffers, alpha=momentum)  # Nesterov: look one momentum step ahead
        torch._foreach_add_(params, updates, alpha=-lr)

    def _muon_update(self, group: Dict[str, Any], params: List[torch.Tensor], grads: List[torch.Tensor]) -> None:
        beta = group["momentum"]
        buffers = self._buffers(params, "muon_momentum_buffer")
        torch._foreach_lerp_(buffers, grads, 1 - beta)  # m = beta * m + (1 - beta) * g
        nesterov = torch._foreach_lerp(grads, buffers, beta)  # beta * m + (1 - beta) * g
        # torch.optim.Muon takes only 2-D parameters; conv filters need the (out, in * kh * kw) view used here.
        for indices in _indices_by_shape(params).values():
            shape = params[indices[0]].shape
            rows, cols = shape[0], params[indices[0]][0].numel()
            matrices = torch.stack([nesterov[i] for i in indices]).reshape(len(indices), rows, cols)
            orthogonal = newton_schulz_orthogonalise(matrices).reshape(len(indices), *shape)
            shape_scale = max(1.0, rows / cols) ** 0.5  # tall matrices would otherwise get too small an update
            step_size = group["lr"] * group["muon_scale"] * shape_scale
            torch._foreach_add_([params[i] for i in indices], list(orthogonal.unbind(0)), alpha=-step_size)


def _indices_by_shape(tensors: List[torch.Tensor]) -> Dict[Tuple[Any, ...], List[int]]:
    """Positions of the tensors that can share one batched Newton-Schulz call (same shape, dtype and device)."""
    buckets: Dict[Tuple[Any, ...], List[int]] = {}
    for index, tensor in enumerate(tensors):
        buckets.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), []).append(index)
    return buckets


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
        if not self.is_due(step, accumulate):
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

    def is_due(self, step: int, accumulate: int) -> bool:
        """Whether ``step_if_due`` at this global batch index will step the optimizer."""
        return step - self.last_opt_step >= accumulate

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
