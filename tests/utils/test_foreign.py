"""Ultralytics checkpoints read without running code: a file in the reference's pickle layout (its class names,
stub modules made here) imports to known tensors; a payload inside such a file is refused on every path."""

import copy
import os
import types

import numpy as np
import pytest
import torch

from yolotrain import YOLO
from yolotrain.cli import main as cli_main
from yolotrain.errors import CheckpointError
from yolotrain.nn.model import DetectionModel
from yolotrain.tasks.detect.train import DetectionTrainer
from yolotrain.utils.checkpoint import load_checkpoint, load_safetensors_metadata
from yolotrain.utils.foreign import Record, load_records
from reference_layout import classes_named_like_the_reference

NAMES = {0: "person", 1: "bicycle", 2: "car"}


def write_reference_checkpoint(path, tiny_model_yaml, extra=None, ema_offset=0.5):
    """A .pt laid out as the reference trainer writes it: whole model objects (EMA in half precision), numpy
    fitness, train args. Returns the EMA's float state dict (what an import must give). The EMA's parameters are
    the model's plus `ema_offset` (the import must take the EMA; 0 keeps the weights usable for inference)."""
    torch.manual_seed(0)
    model = DetectionModel(tiny_model_yaml, nc=len(NAMES), verbose=False)
    model.names = dict(NAMES)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in ema.parameters():
            parameter.add_(ema_offset)
    checkpoint = {"date": "2026-01-01", "version": "8.4.190", "epoch": 9, "best_fitness": np.float64(0.42),
                  "model": None, "ema": ema.half(), "updates": 100, "optimizer": {"state": {}, "param_groups": []},
                  "train_args": {"imgsz": 64, "epochs": 10}, **(extra or {})}
    with classes_named_like_the_reference(model):
        torch.save(checkpoint, path)
    return {k: v.float() for k, v in ema.state_dict().items()}


class Payload:
    """Unpickling this runs os.mkdir(marker): proof that code in the file was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def reference_pt(tmp_path, tiny_model_yaml):
    path = tmp_path / "yolov8t.pt"
    return path, write_reference_checkpoint(path, tiny_model_yaml)


def test_the_import_gives_the_emas_tensors_names_and_yaml(reference_pt):
    path, expected = reference_pt
    records = load_records(path)
    assert isinstance(records["ema"], Record) and type(records["ema"]).__module__ == "ultralytics.nn.tasks"
    checkpoint = load_checkpoint(path)
    assert checkpoint["names"] == NAMES and checkpoint["nc"] == 3 and checkpoint["source"] == "ultralytics 8.4.190"
    assert checkpoint["model"].keys() == expected.keys()
    assert all(torch.equal(checkpoint["model"][k], expected[k]) for k in expected)
    rebuilt = DetectionModel.from_yaml_and_state(checkpoint["model_yaml"], checkpoint["model"], nc=3)
    assert all(torch.equal(v, expected[k]) for k, v in rebuilt.state_dict().items())


def test_validation_of_the_reference_file_equals_validation_of_its_safetensors(reference_pt, tiny_data, tmp_path):
    path, _ = reference_pt
    out = tmp_path / "plain.safetensors"
    assert cli_main(["convert", "ultralytics", str(path), str(out)]) == 0
    assert load_safetensors_metadata(out)["format"] == "yolotrain"
    common = dict(data=tiny_data, imgsz=64, device="cpu", plots=False, project=str(tmp_path / "val"), conf=0.001)
    assert YOLO(str(path)).val(**common) == pytest.approx(YOLO(str(out)).val(**common))


def test_fine_tuning_from_the_reference_file_with_another_class_count(reference_pt, train_overrides, yolotrain_log):
    path, expected = reference_pt  # 3 classes; the tiny dataset has 6
    trainer = DetectionTrainer(overrides={**train_overrides, "model": str(path), "epochs": 1, "val": False})
    trainer.train()
    assert any(m.startswith("Transferred ") and "pretrained" in m for m in yolotrain_log)
    backbone = [k for k in expected if k.startswith("model.0.")]
    initial = load_checkpoint(path)["model"]
    assert backbone and all(initial[k].shape == trainer.model.state_dict()[k].shape for k in backbone)
    assert trainer.model.nc == 6


def test_a_payload_inside_a_reference_file_never_runs_on_any_path(tmp_path, tiny_model_yaml, tiny_data,
                                                                  train_overrides, capsys):
    marker = tmp_path / "code-was-executed"
    path = tmp_path / "evil.pt"
    write_reference_checkpoint(path, tiny_model_yaml, extra={"train_args": {"imgsz": Payload(marker)}})
    with pytest.raises(CheckpointError, match=r"arbitrary code.*calls posix\.mkdir|arbitrary code.*calls os\.mkdir"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        YOLO(str(path)).val(data=tiny_data, imgsz=64, device="cpu", plots=False, project=str(tmp_path / "v"))
    with pytest.raises(CheckpointError, match="arbitrary code"):
        YOLO(str(path)).predict(tiny_data.replace("data.yaml", "images/val"), imgsz=64, save=False)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        DetectionTrainer(overrides={**train_overrides, "model": str(path)}).train()
    with pytest.raises(CheckpointError, match="arbitrary code"):
        DetectionTrainer(overrides={**train_overrides, "pretrained": str(path)}).train()
    assert cli_main(["val", f"model={path}", f"data={tiny_data}", "imgsz=64"]) == 1
    assert "arbitrary code" in capsys.readouterr().err
    assert not marker.exists(), "loading the file executed code from it"


def test_calling_a_class_named_in_the_file_is_refused(tmp_path):
    """A REDUCE on an unknown class (calling it with arguments) is how a pickle runs code: refused."""

    class Call:
        def __reduce__(self):
            return (types.SimpleNamespace, ())  # types.SimpleNamespace() called at load time

    path = tmp_path / "call.pt"
    torch.save({"model": Call()}, path)
    with pytest.raises(CheckpointError, match="calls types.SimpleNamespace"):
        load_records(path)


@pytest.mark.parametrize("family", ["yolo11", "yolo26"])
def test_current_families_import_key_for_key(tmp_path, tiny_family_yaml, family):
    """YOLO11 (C3k2, C2PSA, depthwise class branch) and YOLO26 (end-to-end head, no DFL) files in the reference's
    layout: every tensor arrives under its own name and rebuilds the model with its head options."""
    path = tmp_path / f"{family}t.pt"
    expected = write_reference_checkpoint(path, tiny_family_yaml(family))
    checkpoint = load_checkpoint(path)
    assert checkpoint["model"].keys() == expected.keys()
    rebuilt = DetectionModel.from_yaml_and_state(checkpoint["model_yaml"], checkpoint["model"], nc=3)
    assert all(torch.equal(v, expected[k]) for k, v in rebuilt.state_dict().items())
    assert rebuilt.end2end == (family == "yolo26") and rebuilt.head.reg_max == (1 if family == "yolo26" else 16)
    if family == "yolo26":
        assert any(k.startswith("model.23.one2one_cv2.") for k in expected) and not any(".dfl." in k for k in expected)


def test_an_imported_end_to_end_model_validates_and_predicts_without_nms(tmp_path, tiny_family_yaml, tiny_data,
                                                                         monkeypatch):
    import yolotrain.tasks.detect.predict as predict_module
    import yolotrain.tasks.detect.val as val_module

    def no_nms(*args, **kwargs):
        raise AssertionError("an end-to-end model must not run NMS")

    monkeypatch.setattr(val_module, "non_max_suppression", no_nms)
    monkeypatch.setattr(predict_module, "non_max_suppression", no_nms)
    path = tmp_path / "yolo26t.pt"
    write_reference_checkpoint(path, tiny_family_yaml("yolo26"), ema_offset=0.0)
    metrics = YOLO(str(path)).val(data=tiny_data, imgsz=64, device="cpu", plots=False, project=str(tmp_path / "v"))
    assert 0.0 <= metrics["metrics/mAP50-95(B)"] <= 1.0
    results = YOLO(str(path)).predict(tiny_data.replace("data.yaml", "images/val"), imgsz=64, conf=0.0, max_det=4,
                                      save=False, verbose=False)
    assert results and all(len(r) == 4 for r in results)  # conf=0: exactly max_det boxes, straight from the head


def test_a_reference_classifier_imports_as_a_classifier(tmp_path):
    """A classification .pt of the reference (model object only, no task entry) loads as a classifier whose outputs
    are the saved model's."""
    from yolotrain.nn.model import ClassificationModel

    torch.manual_seed(0)
    layers = {"nc": 3, "backbone": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "C2f", [8, True]], [-1, 1, "Conv", [16, 3, 2]]],
              "head": [[-1, 1, "Classify", ["nc"]]]}
    model = ClassificationModel(layers, verbose=False).eval()
    model.names = dict(NAMES)
    path = tmp_path / "reference-cls.pt"
    with classes_named_like_the_reference(model):
        torch.save({"epoch": -1, "model": copy.deepcopy(model), "ema": None, "train_args": {"imgsz": 32}}, path)
    imported = YOLO(path)
    assert imported.task == "classify" and imported.names == NAMES
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(imported.model.eval()(images)[0], model(images)[0])
