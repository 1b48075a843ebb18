"""Everything that depends on the process rank lives here.

The rank is read lazily on every call (from ``torch.distributed`` once it is initialised, otherwise from the
launcher's environment variables), never at import time, so importing yolotrain in a parent process and then
spawning workers cannot freeze a stale rank into module state.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as torch_dist

LOGGER = logging.getLogger(__name__)

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _process_group_ready() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        return default


def rank() -> int:
    """Global rank of this process, or -1 when not running distributed."""
    if _process_group_ready():
        return torch_dist.get_rank()
    return _env_int("RANK", -1)


def local_rank() -> int:
    """Rank of this process on its node (the GPU index it should use), or -1 when not distributed."""
    return _env_int("LOCAL_RANK", -1)


def world_size() -> int:
    """Number of processes taking part in training; 1 when not distributed."""
    if _process_group_ready():
        return torch_dist.get_world_size()
    return max(_env_int("WORLD_SIZE", 1), 1)


def is_dist() -> bool:
    """True when a process group is initialised with more than one process."""
    return _process_group_ready() and torch_dist.get_world_size() > 1


def is_main() -> bool:
    """True on the process that logs and saves: rank 0, or the only process."""
    return rank() in (-1, 0)


def barrier() -> None:
    """Wait until every process reaches this point; a no-op when not distributed."""
    if is_dist():
        torch_dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return the ``src`` rank's ``obj`` on every rank (any picklable object); returns ``obj`` when alone."""
    if not is_dist():
        return obj
    holder = [obj]
    torch_dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` in place over all ranks and return it; unchanged when not distributed."""
    if not is_dist():
        return tensor
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    tensor /= world_size()
    return tensor


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Let the main process run the block first (e.g. download or cache a dataset), then the others.

    Non-main ranks wait at a barrier until the main rank has finished the block and reached the matching barrier.
    """
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def rank_zero_only(fn: _Fn) -> _Fn:
    """Decorate ``fn`` so that it runs only on the main process; other ranks get ``None``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if is_main():
            return fn(*args, **kwargs)
        return None

    return wrapper  # type: ignore[return-value]


def default_backend() -> str:
    """``nccl`` when CUDA is usable, otherwise ``gloo``."""
    return "nccl" if torch.cuda.is_available() and torch_dist.is_nccl_available() else "gloo"


def init_process_group(backend: Optional[str] = None, timeout_s: float = 600) -> None:
    """Join the process group described by the launcher's environment (``torchrun`` sets it).

    Does nothing when the group is already initialised. With NCCL, the process is bound to its ``LOCAL_RANK`` GPU
    first so collectives use the right device.
    """
    if _process_group_ready():
        return
    backend = backend or default_backend()
    if backend == "nccl" and local_rank() >= 0:
        torch.cuda.set_device(local_rank())
    torch_dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    LOGGER.debug("joined process group: backend=%s rank=%d world_size=%d", backend, rank(), world_size())


def destroy_process_group() -> None:
    """Leave the process group; safe to call when none exists or twice."""
    if _process_group_ready():
        torch_dist.destroy_process_group()
