"""Files and folders: atomic writes, run folders (numbering), writability checks."""

import os
import shutil
import tempfile
from pathlib import Path

from yolotrain.errors import YoloTrainError


def write_atomic(path, write, durable=True):
    """Replace `path` so that a reader sees the old file or the whole new one, never half of it (a crash or a full
    disk mid-write leaves the old file): `write(temp_path)` fills a temporary file in the same folder, which is then
    renamed over `path` in one step. `durable` also flushes the file and the rename to disk first (checkpoints,
    results); a cache that can be rebuilt skips that cost. Returns `path`; an error (a missing folder too) removes
    the temporary file.
    """
    path = Path(path)
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        os.chmod(temp, 0o666 & ~current_umask())  # as open() would create it: a team's shared folder stays readable
        write(Path(temp))
        if durable:
            _fsync(temp, os.O_RDWR)
        os.replace(temp, path)
    except BaseException:  # KeyboardInterrupt too: the half-written temporary file must not be left behind
        Path(temp).unlink(missing_ok=True)
        raise
    if durable and os.name != "nt":  # a folder cannot be opened for fsync on Windows
        _fsync(path.parent, os.O_RDONLY)
    return path


def current_umask():
    """The process's file-creation mask: from /proc where Linux says it (no change to the process), else read by
    setting it and putting it back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic_stream(path, write, durable=True):
    """`write_atomic` for a writer of an open binary file: `write(file)`. A failed write (a full disk) is raised as
    the OSError it is, also from writers that report it as an error of their own (torch.save's RuntimeError)."""

    def fill(temp):
        with open(temp, "wb") as file:
            keeper = _WriteErrorKeeper(file)
            try:
                write(keeper)
            except Exception:
                if keeper.error is not None:
                    raise keeper.error from None
                raise

    return write_atomic(path, fill, durable)


class _WriteErrorKeeper:
    """A binary file that remembers the first OSError of its `write`: torch's checkpoint writer turns it into
    `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`, which says nothing of the full disk."""

    def __init__(self, file):
        self.file = file
        self.error = None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def __getattr__(self, name):  # everything else (seek, tell, flush, ...) is the file's own
        return getattr(self.file, name)


def _fsync(path, flags):
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def increment_path(path, exist_ok=False):
    """Return `path` if it is free (or exist_ok), else the first free `path2`, `path3`, ..."""
    path = Path(path)
    if exist_ok or not path.exists():
        return path
    n = 2
    while (candidate := path.with_name(f"{path.name}{n}")).exists():
        n += 1
    return candidate


def project_dir(args):
    """The folder that holds a task's runs: `project`, by default `runs/<task>`."""
    return Path(args.project or Path("runs") / args.task)


def run_dir(args, default_name):
    """The next free run folder: `project/name` (default `runs/<task>/<default_name>`), numbered 2, 3, ... unless
    `exist_ok`."""
    return increment_path(project_dir(args) / (args.name or default_name), exist_ok=args.exist_ok)


def missing_root(path):
    """The outermost folder that creating `path` would create (`runs` for `runs/detect/train` on a fresh checkout),
    None when `path` exists."""
    path = Path(path).absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def remove_unstarted_run(folder):
    """Delete the folders made for a run that stopped before training (a user mistake found while setting up):
    they hold args.yaml and perhaps plots, never weights; folders holding a checkpoint are kept."""
    folder = Path(folder)
    if folder.is_dir() and not any(folder.rglob("*.pt")):
        shutil.rmtree(folder, ignore_errors=True)


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
