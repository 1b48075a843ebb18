"""Run folders: numbering, writability checks."""

import os
from pathlib import Path

from yolotrain.errors import YoloTrainError


def increment_path(path, exist_ok=False):
    """Return `path` if it is free (or exist_ok), else the first free `path2`, `path3`, ..."""
    path = Path(path)
    if exist_ok or not path.exists():
        return path
    n = 2
    while (candidate := path.with_name(f"{path.name}{n}")).exists():
        n += 1
    return candidate


def run_dir(args, default_name):
    """The next free run folder: `project/name` (default `runs/<task>/<default_name>`), numbered 2, 3, ... unless
    `exist_ok`."""
    project = Path(args.project or Path("runs") / args.task)
    return increment_path(project / (args.name or default_name), exist_ok=args.exist_ok)


def ensure_writable_dir(path):
    """Create `path` and prove it is writable, or raise a one-line error naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise YoloTrainError(f"cannot write to the run folder '{path}': {e.strerror or e}") from None
    return path
