"""Scripts written for the Ultralytics API run with only the import line changed: what `train()` and `val()`
return, what the `YOLO` object exposes, and what predict's `Results` and `Boxes` offer."""

from pathlib import Path

import numpy as np
import pytest
import torch

from yolotrain import YOLO, DetectionTrainer
from yolotrain.cli import main as cli_main
from yolotrain.engine.callbacks import EVENTS
from yolotrain.errors import CfgError
from yolotrain.nn.model import DetectionModel
from yolotrain.tasks import task_classes
from yolotrain.tasks.detect.predict import DetectionPredictor
from yolotrain.tasks.detect.val import DetectionValidator
from yolotrain.utils.checkpoint import load_checkpoint, save_checkpoint

NAMES = {i: name for i, name in enumerate(["circle", "square", "triangle", "star", "cross", "ellipse"])}
METRIC_KEYS = ["metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)"]


@pytest.fixture
def detector(tiny_model_yaml, tmp_path):
    """A checkpoint of the tiny detector whose class scores sit above predict's threshold: every image has boxes."""
    torch.manual_seed(0)
    model = DetectionModel(tiny_model_yaml, nc=6, verbose=False)
    for branch in model.model[-1].cv3:
        torch.nn.init.constant_(branch[-1].bias, -1.0)
    path = tmp_path / "weights" / "best.pt"
    path.parent.mkdir()
    save_checkpoint({"epoch": 0, "model": model.state_dict(), "ema": None, "model_yaml": model.yaml,
                     "names": NAMES, "nc": 6, "train_args": {"imgsz": 64, "data": None}}, path)
    return path


def image_of(tiny_data):
    return str(sorted(Path(tiny_data).parent.glob("images/val/*.jpg"))[0])


def assert_detection_metrics(metrics, nc):
    """Everything such scripts read from a detection metrics object, each consistent with the others."""
    box = metrics.box
    assert metrics["metrics/mAP50-95(B)"] == box.map and metrics["metrics/mAP50(B)"] == box.map50
    assert metrics["metrics/precision(B)"] == box.mp and metrics["metrics/recall(B)"] == box.mr
    assert 0 <= box.map <= box.map50 <= 1 and 0 <= box.map75 <= 1
    assert box.maps.shape == (nc,) and len(box.p) == len(box.r) == len(box.f1) == len(box.ap50) == len(box.ap)
    assert metrics.results_dict == dict(metrics) and list(metrics.results_dict) == [*METRIC_KEYS, "fitness"]
    assert metrics.fitness == pytest.approx(0.1 * box.map50 + 0.9 * box.map)
    assert {"preprocess", "inference", "postprocess"} <= set(metrics.speed)
    assert metrics.confusion_matrix.matrix.shape == (nc + 1, nc + 1)


def test_val_returns_a_metrics_object_that_is_also_the_flat_mapping(detector, tiny_data, tmp_path):
    metrics = YOLO(str(detector)).val(data=tiny_data, batch=4, project=str(tmp_path))
    assert_detection_metrics(metrics, nc=6)
    # With plots (the default) the confusion matrix counts every val box, as the reference's does.
    assert metrics.confusion_matrix.matrix.sum() >= 44
    assert (tmp_path / "val" / "confusion_matrix_normalized.png").is_file()
    assert Path(metrics.save_dir) == tmp_path / "val"


def test_train_returns_the_final_metrics_object_and_the_weights_remember_their_task(train_overrides):
    model = YOLO(train_overrides["model"])
    metrics = model.train(**{**train_overrides, "epochs": 1})
    assert_detection_metrics(metrics, nc=6)
    assert Path(metrics.save_dir) == model.trainer.save_dir
    assert load_checkpoint(model.trainer.best)["task"] == "detect" and YOLO(model.model_path).task == "detect"
    assert {k: metrics[k] for k in METRIC_KEYS} == {k: model.trainer.metrics[k] for k in METRIC_KEYS}


def test_yolo_object_exposes_the_model_its_names_device_and_callbacks(detector, capsys):
    model = YOLO(str(detector))
    assert model.task == "detect" and model.names == NAMES
    assert isinstance(model.model, torch.nn.Module) and model.device == torch.device("cpu")
    assert model.to("cpu") is model and model.fuse() is model and model.model.is_fused()
    layers, parameters, _, _ = model.info()
    assert layers > 0 and parameters == sum(p.numel() for p in model.model.parameters())
    model.add_callback("on_val_start", print)
    model.add_callback("on_val_start", print)
    model.add_callback("on_val_end", print)
    model.clear_callback("on_val_start")
    assert model.callbacks.get("on_val_start") == [] and model.callbacks.get("on_val_end") == [print]
    model.add_callback("on_train_start", print)
    model.reset_callbacks()
    assert all(not model.callbacks.get(event) for event in EVENTS)


def test_results_and_boxes_move_convert_and_iterate_like_the_reference(detector, tiny_data, tmp_path):
    (result,) = YOLO(str(detector)).predict(image_of(tiny_data), imgsz=64, conf=0.05, save=False, verbose=False)
    boxes = result.boxes
    assert len(boxes) > 1 and boxes.id is None and boxes.is_track is False
    rows = list(boxes)  # one box at a time, as scripts loop over detections
    assert len(rows) == len(boxes)
    first = rows[0]
    assert first.xyxy.shape == (1, 4) and torch.equal(first.xyxy[0], boxes.xyxy[0])
    assert float(first.conf) == float(boxes.conf[0]) and int(first.cls) == int(boxes.cls[0])
    as_numpy = result.numpy()
    assert isinstance(as_numpy.boxes.xyxy, np.ndarray) and isinstance(boxes.numpy().conf, np.ndarray)
    np.testing.assert_array_equal(as_numpy.boxes.data, boxes.data.numpy())
    assert result.cpu().boxes.data.device.type == "cpu"
    assert result.to("cpu", torch.float64).boxes.data.dtype == torch.float64
    assert torch.equal(boxes.to(torch.float64).data, boxes.data.double())
    assert as_numpy.orig_img is result.orig_img and as_numpy.names == result.names
    saved = result.save(filename=str(tmp_path / "annotated.jpg"))
    assert Path(saved).is_file()


def record_args(model, event):
    seen = []
    model.add_callback(event, lambda validator: seen.append(validator.args))
    return seen


def test_val_predict_and_export_default_to_the_image_size_and_data_the_weights_were_trained_with(
        detector, tiny_data, tmp_path, yolotrain_log):
    trained = load_checkpoint(detector)
    trained["train_args"] = {"imgsz": 96, "data": tiny_data}
    save_checkpoint(trained, detector)
    model = YOLO(str(detector))
    seen = record_args(model, "on_val_start")
    metrics = model.val(batch=4, plots=False, project=str(tmp_path))  # neither data nor imgsz given
    assert (seen[-1].imgsz, seen[-1].data) == (96, tiny_data) and metrics.box.maps.shape == (6,)
    assert any("imgsz=96, data=" in m and str(detector) in m for m in yolotrain_log)
    model.val(batch=4, plots=False, project=str(tmp_path), imgsz=64)  # what the user sets wins
    assert seen[-1].imgsz == 64
    model.predict(image_of(tiny_data), save=False, verbose=False)
    assert model.predictor.args.imgsz == 96
    exported = model.export(format="torchscript")
    assert YOLO(str(exported)).model.imgsz == (96, 96) and YOLO(str(exported)).task == "detect"  # its metadata


def test_weights_without_a_task_entry_read_as_detection_and_a_task_given_wins(detector):
    assert "task" not in load_checkpoint(detector) and YOLO(str(detector)).task == "detect"
    assert YOLO(str(detector), task="detect").task == "detect"


def test_the_task_table_names_each_tasks_classes_and_refuses_an_unknown_task(detector, tmp_path, capsys):
    classes = task_classes("detect")
    assert (classes.model, classes.trainer, classes.validator, classes.predictor) == (
        DetectionModel, DetectionTrainer, DetectionValidator, DetectionPredictor)
    with pytest.raises(CfgError, match="task='depth' is not one of detect, segment, pose, obb, classify"):
        task_classes("depth")
    checkpoint = load_checkpoint(detector)
    save_checkpoint({**checkpoint, "task": "depth"}, tmp_path / "depth.pt")  # weights of a task not served here
    with pytest.raises(CfgError, match=r"depth.pt holds a 'depth' model; the tasks served here are: detect"):
        YOLO(str(tmp_path / "depth.pt"))
    assert cli_main(["val", f"model={tmp_path / 'depth.pt'}"]) == 2
    assert "holds a 'depth' model" in capsys.readouterr().err
