"""Model wrapping for the training step: `torch.compile` with a fallback to eager, then DDP when distributed."""

import logging

import torch

from yolotrain.errors import one_line
from yolotrain.utils import dist

LOGGER = logging.getLogger(__name__)


def wrap_for_training(model, device, use_compile=False, sync_bn=False):
    """The module the training step calls: `model` compiled (`use_compile`) and/or wrapped in DDP (when this
    process is one of several). The wrappers share `model`'s parameters; `de_parallel` unwraps them."""
    if use_compile:
        model = compile_with_fallback(model)
    if dist.is_dist():
        model = ddp_wrap(model, device, sync_bn)
    return model


def compile_with_fallback(model):
    """`torch.compile(model)` that trains uncompiled where compiling is unavailable or fails at the first call."""
    try:
        compiled = torch.compile(model)
    except Exception as e:  # torch.compile is unavailable on some platforms/python versions
        LOGGER.warning(f"compile: torch.compile is not available here ({e}); training uncompiled")
        return model
    LOGGER.info("compile: torch.compile enabled")
    return CompiledWithFallback(compiled, model)


def ddp_wrap(model, device, sync_bn=False):
    """DistributedDataParallel over `model` on `device`; SyncBatchNorm first when asked for and on CUDA."""
    from torch.nn.parallel import DistributedDataParallel

    if sync_bn and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif sync_bn:
        LOGGER.warning("sync_bn: SyncBatchNorm needs CUDA; training with per-process BatchNorm statistics")
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


class CompiledWithFallback(torch.nn.Module):
    """A torch.compile'd module that turns back into the eager one if compiling fails when it is called.

    torch.compile compiles lazily, so a missing C++ compiler or an unsupported op only shows at the first forward
    (or at a recompilation for a new shape); training then continues uncompiled instead of stopping.
    """

    def __init__(self, compiled, eager):
        super().__init__()
        self.module = compiled
        self._eager = (eager,)  # a tuple: not registered twice (the compiled module already holds its parameters)

    @property
    def _orig_mod(self):
        """The eager model (what `de_parallel` unwraps to, as for torch.compile's own wrapper)."""
        return self._eager[0]

    def forward(self, *args, **kwargs):
        if self.module is self._eager[0]:
            return self.module(*args, **kwargs)
        try:
            return self.module(*args, **kwargs)
        except Exception as e:  # a backend/compiler failure; an error of the model itself re-raises below
            message = one_line(f"{type(e).__name__}: {e}")[:200]
            LOGGER.warning(f"compile: torch.compile failed when running the model ({message}); training uncompiled")
            self.module = self._eager[0]
            return self.module(*args, **kwargs)
