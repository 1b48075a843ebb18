"""Checkpoint I/O: atomic saves, non-finite refusal, weights-only loads, RNG state, stripping, safetensors."""

import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from yolotrain.errors import CheckpointError
from yolotrain.utils import checkpoint as ckpt_io
from yolotrain.utils.checkpoint import (
    NonFiniteCheckpointError,
    export_safetensors,
    find_latest_checkpoint,
    load_checkpoint,
    load_safetensors,
    rng_state,
    save_atomic_text,
    save_checkpoint,
    set_rng_state,
    strip_optimizer,
)


def _state(value: float) -> dict:
    return {"weight": torch.full((2, 2), value), "steps": torch.tensor(3)}


def test_save_and_load_round_trip(tmp_path):
    path = tmp_path / "weights" / "last.pt"
    save_checkpoint({"epoch": 4, "model": _state(1.0), "train_args": {"lr0": 0.01}}, path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 4 and loaded["train_args"] == {"lr0": 0.01}
    torch.testing.assert_close(loaded["model"]["weight"], torch.ones(2, 2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left behind


def test_copies_are_the_same_bytes_serialised_once(tmp_path, monkeypatch):
    saves = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *args, **kwargs: (saves.append(1), real_save(*args, **kwargs))[1])
    last, best, epoch = tmp_path / "last.pt", tmp_path / "best.pt", tmp_path / "sub" / "epoch3.pt"
    save_checkpoint({"epoch": 3, "model": _state(2.0)}, last, [best, epoch])
    assert len(saves) == 1
    assert best.read_bytes() == last.read_bytes() == epoch.read_bytes()
    assert load_checkpoint(epoch)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "sub"]  # no temp file left


def test_failed_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "model": _state(1.0)}, path)
    before = path.read_bytes()

    def torch_save_that_dies(obj, file):
        file.write(b"PK\x03\x04 partial zip bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torch_save_that_dies)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2, "model": _state(2.0)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("key, bad", [("model", float("nan")), ("ema", float("inf"))])
def test_non_finite_weights_are_refused_before_writing(tmp_path, key, bad):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "model": _state(1.0)}, path)
    before = path.read_bytes()
    weights = _state(1.0)
    weights["weight"][0, 1] = bad
    obj = {"epoch": 2, "model": _state(1.0), key: weights}
    with pytest.raises(NonFiniteCheckpointError) as info:
        save_checkpoint(obj, path)
    assert isinstance(info.value, ValueError)
    assert key in str(info.value) and "weight" in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == before
    with pytest.raises(NonFiniteCheckpointError):
        save_checkpoint(obj, tmp_path / "new.pt")
    assert not (tmp_path / "new.pt").exists()


def test_non_finite_values_outside_weights_are_allowed(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": _state(1.0), "best_fitness": float("nan"), "train_metrics": {"loss": float("inf")}}, path)
    assert np.isnan(load_checkpoint(path)["best_fitness"])


class CreatesMarker:
    """Unpickling this would call open(marker, 'w'): the file appearing means code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_load_refuses_code_and_runs_nothing(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"model": CreatesMarker(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "needs arbitrary code to unpickle and was refused" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


def test_missing_and_corrupt_files_raise_one_line(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "nope.pt")
    assert "not found" in str(info.value) and "\n" not in str(info.value)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(corrupt)
    assert str(corrupt) in str(info.value) and "\n" not in str(info.value)


def _draws():
    return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(2).tolist(), torch.rand(3)


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.randn(1)
    path = tmp_path / "rng.pt"
    save_checkpoint({"rng": rng_state()}, path)
    expected = _draws()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(load_checkpoint(path)["rng"])
    actual = _draws()
    assert actual[:4] == expected[:4]
    assert torch.equal(actual[4], expected[4])


def _training_checkpoint():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema_state = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return {
        "epoch": 5,
        "best_fitness": 0.4,
        "model": model.state_dict(),
        "ema": ema_state,
        "ema_updates": 10,
        "optimizer": optimizer.state_dict(),
        "scaler": {},
        "schedule": {"epochs": 10},
        "stopper": {"best_epoch": 3},
        "rng": rng_state(),
        "callbacks": {},
        "train_args": {"epochs": 10},
    }


def test_strip_optimizer_keeps_half_precision_ema_weights(tmp_path):
    path = tmp_path / "last.pt"
    full = _training_checkpoint()
    save_checkpoint(full, path)
    out = strip_optimizer(path, tmp_path / "stripped.pt")
    stripped = load_checkpoint(out)
    assert set(stripped) == {"epoch", "best_fitness", "model", "train_args"}
    for key, value in full["ema"].items():
        if value.is_floating_point():
            assert stripped["model"][key].dtype == torch.float16
            torch.testing.assert_close(stripped["model"][key], value.half())
        else:
            assert torch.equal(stripped["model"][key], value)
    assert out.stat().st_size < path.stat().st_size
    assert "optimizer" in load_checkpoint(path)  # the source is untouched when out is given


def test_strip_optimizer_in_place_without_ema(tmp_path):
    path = tmp_path / "best.pt"
    full = _training_checkpoint()
    full.pop("ema")
    save_checkpoint(full, path)
    assert strip_optimizer(path) == path
    stripped = load_checkpoint(path)
    assert "optimizer" not in stripped
    torch.testing.assert_close(stripped["model"]["0.weight"], full["model"]["0.weight"].half())


def test_safetensors_round_trip_with_shared_and_strided_tensors(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {
        "weight": base,
        "tied": base,  # same storage as weight
        "transposed": base.t(),  # non-contiguous view of the same storage
        "row": base[1],  # a slice
        "count": torch.tensor(7),
    }
    path = tmp_path / "model.safetensors"
    export_safetensors(state, path, metadata={"format_version": 1})
    loaded = load_safetensors(path)
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        assert file.metadata() == {"format_version": "1"}
    with pytest.raises(CheckpointError):
        load_safetensors(tmp_path / "missing.safetensors")


def test_safetensors_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_safetensors(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError("No module named 'safetensors'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    with pytest.raises(CheckpointError, match="pip install safetensors"):
        export_safetensors({"w": torch.zeros(1)}, tmp_path / "w.safetensors")


def test_find_latest_checkpoint_by_mtime(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    older = tmp_path / "train" / "weights" / "last.pt"
    newer = tmp_path / "train2" / "weights" / "last.pt"
    ignored = tmp_path / "train3" / "weights" / "best.pt"
    for i, path in enumerate([older, newer, ignored]):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 + i * 100, 1_000_000 + i * 100))
    assert find_latest_checkpoint(tmp_path) == newer
    os.utime(older, (2_000_000, 2_000_000))
    assert find_latest_checkpoint(tmp_path) == older


def test_atomic_text_overwrites(tmp_path):
    path = tmp_path / "results.csv"
    save_atomic_text("epoch,loss\n0,1.0\n", path)
    save_atomic_text("epoch,loss\n0,1.0\n1,0.5\n", path)
    assert path.read_text() == "epoch,loss\n0,1.0\n1,0.5\n"
    assert ckpt_io.save_atomic_bytes(b"\x00\x01", tmp_path / "b.bin").read_bytes() == b"\x00\x01"
