"""A run interrupted after its first epoch and resumed from last.pt must end where the same run without the
interruption ends: the same weights and the same loss in every results.csv row."""

import csv

import pytest
import torch

from yolotrain.utils.checkpoint import load_checkpoint


def read_rows(path):
    """The rows of a results.csv, keys and values stripped."""
    with open(path, newline="") as f:
        return [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(f)]


def assert_resumes_exactly(trainer_class, overrides, loss_column):
    def crash_after_first_epoch(trainer):
        if trainer.epoch == 0:
            raise KeyboardInterrupt

    straight = trainer_class(overrides={**overrides, "name": "straight"})
    straight.train()
    crashed = trainer_class(overrides={**overrides, "name": "crashed"})
    crashed.add_callback("on_fit_epoch_end", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = trainer_class(overrides={"resume": str(crashed.save_dir / "weights" / "last.pt")})
    resumed.train()
    a, b = load_checkpoint(straight.last), load_checkpoint(resumed.last)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r[loss_column] for r in read_rows(straight.csv)] == [r[loss_column] for r in read_rows(resumed.csv)]
