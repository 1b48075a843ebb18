"""Learning-rate, momentum and accumulation schedules as explicit functions of ``(epoch, iteration)``.

Nothing here counts calls: the values for a step are computed from the step itself, so a resumed run gets exactly
the values a straight run would, with no ``last_epoch`` bookkeeping. As in the YOLO family, the LR factor is
constant within an epoch, and a warmup over the first iterations ramps each group's LR (bias groups from
``warmup_bias_lr`` down, others from 0 up), the momentum, and the gradient-accumulation count.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

# Warmup lasts at least this many optimizer iterations, however small the dataset.
MIN_WARMUP_ITERS = 100


def warmup_iterations(warmup_epochs: float, num_batches: int) -> int:
    """Number of warmup iterations: ``warmup_epochs`` worth of batches but at least 100; 0 disables warmup."""
    if warmup_epochs <= 0:
        return 0
    return max(round(warmup_epochs * num_batches), MIN_WARMUP_ITERS)


def lr_factor(epoch: int, epochs: int, lrf: float, cos: bool) -> float:
    """Multiplier of the initial LR during ``epoch``: from 1 at epoch 0 towards ``lrf`` at ``epochs``.

    Linear: ``(1 - epoch/epochs) * (1 - lrf) + lrf``; cosine: ``((1 - cos(pi * epoch/epochs)) / 2) * (lrf - 1) + 1``.
    """
    if cos:
        return ((1 - math.cos(epoch * math.pi / epochs)) / 2) * (lrf - 1) + 1
    return (1 - epoch / epochs) * (1 - lrf) + lrf


class TrainSchedule:
    """Per-group learning rates, momentum and accumulation for every ``(epoch, iteration)`` of a run.

    ``iteration`` is the batch index within the epoch; the global step is ``epoch * num_batches + iteration``.
    """

    def __init__(
        self,
        initial_lrs: Sequence[float],
        bias_groups: Sequence[bool],
        epochs: int,
        num_batches: int,
        warmup_epochs: float,
        warmup_bias_lr: float,
        warmup_momentum: float,
        momentum: float,
        lrf: float,
        cos_lr: bool,
        nominal_batch: int,
        batch_size: int,
    ) -> None:
        if len(initial_lrs) != len(bias_groups):
            raise ValueError(f"initial_lrs ({len(initial_lrs)}) and bias_groups ({len(bias_groups)}) differ in length")
        self.initial_lrs = [float(lr) for lr in initial_lrs]
        self.bias_groups = [bool(flag) for flag in bias_groups]
        self.epochs = int(epochs)
        self.num_batches = int(num_batches)
        self.warmup_epochs = float(warmup_epochs)
        self.warmup_bias_lr = float(warmup_bias_lr)
        self.warmup_momentum = float(warmup_momentum)
        self.momentum_value = float(momentum)
        self.lrf = float(lrf)
        self.cos_lr = bool(cos_lr)
        self.nominal_batch = int(nominal_batch)
        self.batch_size = int(batch_size)

    # ------------------------------------------------------------------------------------------------- step values
    @property
    def warmup_iters(self) -> int:
        """Number of warmup iterations (0 when warmup is disabled)."""
        return warmup_iterations(self.warmup_epochs, self.num_batches)

    def global_step(self, epoch: int, iteration: int) -> int:
        """Index of ``(epoch, iteration)`` counted in batches from the start of training."""
        return epoch * self.num_batches + iteration

    def in_warmup(self, epoch: int, iteration: int) -> bool:
        """True while the warmup ramps are active (the last warmup step included)."""
        return self.warmup_iters > 0 and self.global_step(epoch, iteration) <= self.warmup_iters

    def _warmup_ramp(self, epoch: int, iteration: int, start: float, end: float) -> float:
        step = self.global_step(epoch, iteration)
        return float(np.interp(step, [0, self.warmup_iters], [start, end]))

    def lr_factor(self, epoch: int) -> float:
        """The LR multiplier for ``epoch`` (constant within the epoch)."""
        return lr_factor(epoch, self.epochs, self.lrf, self.cos_lr)

    def lrs(self, epoch: int, iteration: int) -> List[float]:
        """The learning rate of each parameter group at ``(epoch, iteration)``."""
        factor = self.lr_factor(epoch)
        targets = [lr * factor for lr in self.initial_lrs]
        if not self.in_warmup(epoch, iteration):
            return targets
        return [
            self._warmup_ramp(epoch, iteration, self.warmup_bias_lr if is_bias else 0.0, target)
            for target, is_bias in zip(targets, self.bias_groups)
        ]

    def momentum(self, epoch: int, iteration: int) -> float:
        """Momentum (SGD ``momentum`` / Adam ``beta1``) at ``(epoch, iteration)``."""
        if not self.in_warmup(epoch, iteration):
            return self.momentum_value
        return self._warmup_ramp(epoch, iteration, self.warmup_momentum, self.momentum_value)

    def accumulate(self, epoch: int, iteration: int) -> int:
        """Batches to accumulate per optimizer step, so one step sees about ``nominal_batch`` images."""
        target = self.nominal_batch / self.batch_size
        if not self.in_warmup(epoch, iteration):
            return max(round(target), 1)
        return max(1, round(self._warmup_ramp(epoch, iteration, 1.0, target)))

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, iteration: int) -> List[float]:
        """Set every group's LR and momentum for ``(epoch, iteration)``; returns the LRs set."""
        if len(optimizer.param_groups) != len(self.initial_lrs):
            raise ValueError(
                f"optimizer has {len(optimizer.param_groups)} param groups, schedule has {len(self.initial_lrs)}"
            )
        lrs = self.lrs(epoch, iteration)
        momentum = self.momentum(epoch, iteration)
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
            set_group_momentum(group, momentum)
        return lrs

    def set_epochs(self, epochs: int) -> None:
        """Re-plan the run for a new number of epochs (the time budget changes it while training)."""
        self.epochs = int(epochs)

    # -------------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Every parameter of the schedule, as plain types."""
        return {
            "initial_lrs": list(self.initial_lrs),
            "bias_groups": list(self.bias_groups),
            "epochs": self.epochs,
            "num_batches": self.num_batches,
            "warmup_epochs": self.warmup_epochs,
            "warmup_bias_lr": self.warmup_bias_lr,
            "warmup_momentum": self.warmup_momentum,
            "momentum": self.momentum_value,
            "lrf": self.lrf,
            "cos_lr": self.cos_lr,
            "nominal_batch": self.nominal_batch,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the parameters saved by ``state_dict()`` (so a resumed run continues the same schedule)."""
        self.__init__(**state)  # type: ignore[misc]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.state_dict().items())
        return f"TrainSchedule({fields})"


def set_group_momentum(group: Dict[str, Any], momentum: float) -> None:
    """Set SGD/RMSprop ``momentum`` or the Adam family's ``betas[0]`` of one optimizer param group."""
    if "momentum" in group:
        group["momentum"] = momentum
    elif "betas" in group:
        group["betas"] = (momentum, group["betas"][1])
