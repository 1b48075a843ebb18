"""The training step waits on the device once: the agreed verdict. No `.item()`, `.cpu()`, `.tolist()` or
boolean-mask indexing in the trainer, the loss or the assigner between two batches (the progress line reads the
running loss when it is drawn). On CPU these calls are counted; with CUDA, torch's sync debug mode checks."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

import yolotrain
from yolotrain import DetectionTrainer

PACKAGE_DIR = str(Path(yolotrain.__file__).parent)
READ_METHODS = ("item", "cpu", "tolist")
ALLOWED_READERS = ("agreed_flags", "_progress_line")  # the verdict; the progress display


def _caller_in_package():
    """(file, function) of the yolotrain frame that called the tensor method, or None when torch itself did."""
    frame = sys._getframe(2)
    if not frame.f_code.co_filename.startswith(PACKAGE_DIR):
        return None
    return Path(frame.f_code.co_filename).name, frame.f_code.co_name


class DeviceReads:
    """Counts the reads made by yolotrain code while `active`, by (file, function, kind)."""

    def __init__(self, monkeypatch):
        self.active = False
        self.reads = {}
        for name in READ_METHODS:
            self._wrap(monkeypatch, name, lambda *args: True)
        for name in ("__getitem__", "__setitem__"):
            self._wrap(monkeypatch, name, lambda self_, index, *rest: _has_bool_mask(index))

    def _wrap(self, monkeypatch, name, counts):
        original = getattr(torch.Tensor, name)
        reads = self

        def wrapper(tensor, *args, **kwargs):
            if reads.active and counts(tensor, *args):
                caller = _caller_in_package()
                if caller is not None and caller[1] not in ALLOWED_READERS:
                    key = (*caller, name)
                    reads.reads[key] = reads.reads.get(key, 0) + 1
            return original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)


def _has_bool_mask(index):
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(item, torch.Tensor) and item.dtype == torch.bool for item in items)


def test_a_training_step_reads_nothing_back_but_its_verdict(train_overrides, monkeypatch):
    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 1, "val": False})
    reads = DeviceReads(monkeypatch)
    trainer.add_callback("on_train_batch_start", lambda t: setattr(reads, "active", True))
    trainer.add_callback("on_train_batch_end", lambda t: setattr(reads, "active", False))
    trainer.train()
    assert trainer.num_batches == 4
    assert reads.reads == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_a_cuda_training_step_synchronises_only_for_its_verdict(train_overrides):
    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 1, "val": False, "device": "0"})
    trainer.add_callback("on_train_batch_start", lambda t: torch.cuda.set_sync_debug_mode("warn"))
    trainer.add_callback("on_train_batch_end", lambda t: torch.cuda.set_sync_debug_mode("default"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 2 * trainer.num_batches, [str(w.message) for w in syncs[:5]]  # verdict + progress line
