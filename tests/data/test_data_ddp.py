"""rect and image_weights with two CPU processes (gloo): whole rect batches per rank, and every rank drawing from
rank 0's validation mAPs. The trainer class and callbacks are module-level so `spawn` can pickle them."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from yolotrain import YOLO, DetectionTrainer
from yolotrain.utils import dist
from yolotrain.utils.metrics import DetMetrics

EVENTS_DIR_ENV = "YOLOTRAIN_TEST_DATA_EVENTS_DIR"
PATTERN = [[0.1, 0.5, 0.9], [0.9, 0.1, 0.5], [0.5, 0.9, 0.1]]


def _append(record):
    path = Path(os.environ[EVENTS_DIR_ENV]) / f"rank{max(dist.rank(), 0)}.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class ScriptedMaps(DetMetrics):
    """Per-class mAPs set by the epoch (a tiny model's are all 0), reported by rank 0's validation only."""

    epoch = 0

    @property
    def maps(self):
        return np.array(PATTERN[ScriptedMaps.epoch % len(PATTERN)])


def _tell_epoch(trainer):
    ScriptedMaps.epoch = trainer.epoch


def _script_maps(validator):
    if validator.training:
        validator.metrics.__class__ = ScriptedMaps


def _record_draw(trainer):
    sampler = trainer.train_loader.sampler
    _append({"epoch": trainer.epoch, "maps": sampler.class_maps.tolist(), "draw": sampler.global_draw()})


def _record_shape(trainer):
    _append({"shape": list(trainer.last_batch_shape[2:])})


class ScriptedMapsTrainer(DetectionTrainer):
    def set_model_attributes(self):
        self.add_callback("on_train_epoch_start", _tell_epoch)
        self.add_callback("on_val_end", _script_maps)  # before the sampler's feed reads the maps
        super().set_model_attributes()
        self.add_callback("on_train_epoch_start", _record_draw)


def read_ranks(folder):
    return [[json.loads(line) for line in (folder / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]


@pytest.fixture
def events_dir(tmp_path, monkeypatch):
    folder = tmp_path / "events"
    folder.mkdir()
    monkeypatch.setenv(EVENTS_DIR_ENV, str(folder))
    return folder


@pytest.mark.slow
def test_ddp_image_weights_ranks_draw_from_rank_zeros_maps(train_overrides, events_dir):
    YOLO(train_overrides["model"]).train(trainer=ScriptedMapsTrainer, nprocs=2, **{
        **train_overrides, "image_weights": True, "epochs": 2, "dist_timeout": 60})
    rank0, rank1 = read_ranks(events_dir)
    assert [r["epoch"] for r in rank0] == [r["epoch"] for r in rank1] == [0, 1]
    for a, b in zip(rank0, rank1):
        assert a["maps"] == b["maps"] and a["draw"] == b["draw"]  # one global draw, from the same weights
    assert [r["maps"] for r in rank0] == [[0, 0, 0], PATTERN[0]]


@pytest.mark.slow
def test_ddp_rect_ranks_take_whole_rectangular_batches(train_overrides, events_dir):
    model = YOLO(train_overrides["model"])
    model.add_callback("on_train_batch_end", _record_shape)
    model.train(nprocs=2, **{**train_overrides, "rect": True, "imgsz": 128, "epochs": 1, "val": False,
                             "dist_timeout": 60})
    rank0, rank1 = read_ranks(events_dir)
    assert len(rank0) == len(rank1) == 1  # 4 images, batches of 2 per rank: one whole group each
    assert {tuple(rank0[0]["shape"]), tuple(rank1[0]["shape"])} == {(96, 128), (128, 96)}
