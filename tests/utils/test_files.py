"""The one atomic writer every file of a run goes through (checkpoints, results, caches, exports)."""

import os
import stat

import pytest

from yolotrain.utils.files import write_atomic, write_atomic_stream


@pytest.mark.parametrize("durable", [True, False])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, durable):
    path = tmp_path / "cache.npy"
    write_atomic_stream(path, lambda f: f.write(b"old"), durable=durable)

    def dies_half_way(file):
        file.write(b"half of the new")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic_stream(path, dies_half_way, durable=durable)
    assert path.read_bytes() == b"old" and [p.name for p in path.parent.iterdir()] == ["cache.npy"]
    with pytest.raises(FileNotFoundError):  # a missing folder is the caller's to create
        write_atomic_stream(tmp_path / "no" / "such.npy", lambda f: f.write(b"x"), durable=durable)


def test_a_path_writer_fills_a_temporary_file_that_replaces_the_target(tmp_path):
    path, seen = tmp_path / "best.onnx", []

    def writer(temp):
        seen.append(temp)
        temp.write_bytes(b"graph")

    assert write_atomic(path, writer) == path and path.read_bytes() == b"graph"
    assert seen[0].parent == tmp_path and seen[0] != path and not seen[0].exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_are_created_with_the_users_umask(tmp_path, umask, mode):
    """Caches, checkpoints and exports in a shared folder are as readable as any file the user creates."""
    previous = os.umask(umask)
    try:
        written = write_atomic_stream(tmp_path / "labels.cache", lambda f: f.write(b"x"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == mode


def test_a_full_disk_during_a_checkpoint_write_is_an_oserror_and_keeps_the_old_file(tmp_path, monkeypatch):
    """torch.save reports a failed write as a RuntimeError of its own; the writer raises the OSError (ENOSPC) it
    hides, so callers that keep the previous checkpoint on OSError do, and no temporary file is left."""
    import builtins
    import errno

    import torch

    from yolotrain.utils import files

    target = tmp_path / "last.pt"
    files.write_atomic_stream(target, lambda f: torch.save({"w": torch.zeros(4)}, f))
    before = target.read_bytes()

    class FullDisk:
        def __init__(self, file):
            self.file, self.written = file, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 2000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(files, "open", lambda *a, **k: FullDisk(builtins.open(*a, **k)), raising=False)
    with pytest.raises(OSError) as info:
        files.write_atomic_stream(target, lambda f: torch.save({"w": torch.zeros(100_000)}, f))
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
