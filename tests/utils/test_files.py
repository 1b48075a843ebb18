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
