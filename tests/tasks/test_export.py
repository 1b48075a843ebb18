"""Export to ONNX and TorchScript: the files carry their metadata, their outputs equal PyTorch's, and they
predict and validate like the checkpoint they came from."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detection_match import assert_same_detections
from yolotrain import YOLO
from yolotrain.cli import main as cli_main
from yolotrain.errors import CfgError, CheckpointError
from yolotrain.nn.backends import OnnxModel, TorchScriptModel, load_checkpoint_model
from yolotrain.nn.model import DetectionModel
from yolotrain.utils.checkpoint import save_checkpoint

# ONNX Runtime (MLAS) and PyTorch (oneDNN) sum each convolution in their own order. Worst relative difference of a
# decoded output (boxes in pixels, up to 800) measured on these tests: 1.7e-4 with oneDNN on AMX, AVX512_CORE_BF16
# or AVX512_CORE, 4.8e-4 capped to AVX2. Twice that margin; a wrong decode, stride or anchor is off by pixels.
RUNTIME_ATOL = 1e-3
RUNTIME_RTOL = 1e-3
NAMES = {i: name for i, name in enumerate(["circle", "square", "triangle", "star", "cross", "ellipse"])}


def calibrate_batchnorm(model):
    """BatchNorm statistics of real activations: with its initial statistics an untrained eval model outputs nearly
    the same box and scores at every anchor, and detections that tie everywhere compare nothing."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # cumulative average: one pass gives this batch's statistics
        model.train()(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)))


@pytest.fixture
def detector(tiny_model_yaml, tmp_path):
    torch.manual_seed(0)
    model = DetectionModel(tiny_model_yaml, nc=6, verbose=False)
    calibrate_batchnorm(model)
    for branch in model.model[-1].cv3:
        torch.nn.init.constant_(branch[-1].bias, -1.0)  # scores well above conf: many boxes to compare
    path = tmp_path / "weights" / "best.pt"
    path.parent.mkdir()
    save_checkpoint({"epoch": 0, "model": model.state_dict(), "ema": None, "model_yaml": model.yaml,
                     "names": NAMES, "nc": 6}, path)
    return path


def reference_output(checkpoint, images):
    model = load_checkpoint_model(checkpoint).fuse().eval()
    with torch.no_grad():
        return model(images)[0]


@pytest.mark.numeric
def test_dynamic_onnx_equals_pytorch_at_two_batches_and_two_sizes(detector):
    pytest.importorskip("onnxruntime")
    exported = YOLO(str(detector)).export(format="onnx", imgsz=64, dynamic=True, verbose=False)
    assert exported == detector.with_suffix(".onnx")
    runtime = OnnxModel(exported)
    assert runtime.names == NAMES and runtime.stride.tolist() == [8.0, 16.0, 32.0] and runtime.dynamic
    generator = torch.Generator().manual_seed(1)
    for batch, size in ((1, 64), (4, 96)):
        images = torch.rand(batch, 3, size, size, generator=generator)
        torch.testing.assert_close(runtime(images), reference_output(detector, images), atol=RUNTIME_ATOL, rtol=RUNTIME_RTOL)


def test_onnx_file_carries_its_metadata(detector):
    onnx = pytest.importorskip("onnx")
    exported = YOLO(str(detector)).export(format="onnx", imgsz=64, verbose=False)
    metadata = {p.key: json.loads(p.value) for p in onnx.load(str(exported)).metadata_props}
    assert metadata["names"] == {str(k): v for k, v in NAMES.items()}
    assert metadata["imgsz"] == [64, 64] and metadata["batch"] == 1 and metadata["task"] == "detect"
    assert not list(exported.parent.glob(".*.tmp"))  # written atomically: no temporary file left


@pytest.mark.numeric
def test_torchscript_equals_pytorch_and_carries_its_metadata(detector):
    exported = YOLO(str(detector)).export(format="torchscript", imgsz=64, verbose=False)
    runtime = TorchScriptModel(exported)
    assert runtime.names == NAMES and runtime.imgsz == (64, 64)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(runtime(images), reference_output(detector, images), atol=RUNTIME_ATOL, rtol=RUNTIME_RTOL)


@pytest.mark.numeric
@pytest.mark.parametrize("file_format", ["onnx", "torchscript"])
def test_exported_model_validates_and_predicts_like_the_checkpoint(detector, tiny_data, tmp_path, file_format):
    if file_format == "onnx":
        pytest.importorskip("onnxruntime")
    assert cli_main(["export", f"model={detector}", f"format={file_format}", "imgsz=64", "dynamic=True"]) == 0
    exported = detector.with_suffix(f".{file_format}")
    common = dict(data=tiny_data, imgsz=64, batch=1, device="cpu", plots=False, project=str(tmp_path / "val"))
    from_pt, from_exported = YOLO(str(detector)).val(**common), YOLO(str(exported)).val(**common)
    assert from_exported["metrics/mAP50-95(B)"] == pytest.approx(from_pt["metrics/mAP50-95(B)"], abs=1e-3)
    source = tiny_data.replace("data.yaml", "images/val")
    predict = dict(imgsz=64, conf=0.05, save=False, verbose=False)
    results = YOLO(str(exported)).predict(source, **predict)
    assert len(results) == len(list(Path(source).glob("*.jpg"))) and all(len(r) and r.names == NAMES for r in results)
    # This untrained detector's mAP is near 0 on both: its detections are what show the two runtimes agree.
    for got, expected in zip(results, YOLO(str(detector)).predict(source, **predict)):
        assert_same_detections(got.boxes.data, expected.boxes.data, atol=RUNTIME_ATOL, rtol=RUNTIME_RTOL, cut_off=True)


def real_images(tiny_data, batch, size):
    """`batch` val images of the tiny dataset, resized to size x size, as a float batch in [0, 1]."""
    files = sorted(Path(tiny_data.replace("data.yaml", "images/val")).glob("*.jpg"))[:batch]
    images = [cv2.resize(cv2.imread(str(f)), (size, size))[..., ::-1] for f in files]
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy()).float() / 255


@pytest.mark.numeric
@pytest.mark.parametrize("file_format", ["onnx", "torchscript"])
def test_exported_outputs_equal_pytorch_on_real_images(detector, tiny_data, file_format):
    if file_format == "onnx":
        pytest.importorskip("onnxruntime")
    exported = YOLO(str(detector)).export(format=file_format, imgsz=64, dynamic=True, verbose=False)
    runtime = OnnxModel(exported) if file_format == "onnx" else TorchScriptModel(exported)
    for batch, size in ((1, 64), (4, 64), (4, 96)):
        images = real_images(tiny_data, batch, size)
        torch.testing.assert_close(runtime(images), reference_output(detector, images), atol=RUNTIME_ATOL, rtol=RUNTIME_RTOL)


def test_export_refuses_what_it_cannot_do(detector, capsys):
    assert cli_main(["export", f"model={detector.with_suffix('.yaml')}", "format=onnx"]) == 2
    assert "FILE.pt" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main(["export", f"model={detector}", "format=onnx", "half=True"]) == 2
        assert "CUDA" in capsys.readouterr().err


def test_a_fixed_shape_onnx_predicts_and_validates_at_its_own_size_and_refuses_another(detector, tiny_data, tmp_path,
                                                                                      capsys):
    pytest.importorskip("onnxruntime")
    exported = YOLO(str(detector)).export(format="onnx", imgsz=64, verbose=False)  # static: (1, 3, 64, 64)
    source = tiny_data.replace("data.yaml", "images/val")
    model = YOLO(str(exported))
    results = model.predict(source, conf=0.05, save=False, verbose=False)  # imgsz: the export's own 64
    assert len(results) == len(list(Path(source).glob("*.jpg"))) and model.predictor.args.imgsz == 64
    seen = []
    model.add_callback("on_val_end", lambda validator: seen.append((validator.seen, validator.batch["img"].shape)))
    metrics = model.val(data=tiny_data, batch=3, plots=False, project=str(tmp_path))  # 8 images: 3 + 3 + 2
    assert seen == [(8, (2, 3, 64, 64))] and 0 <= metrics.box.map <= 1
    # Any number of images through the batch-1 graph: one call each, the same outputs as one at a time.
    runtime, images = OnnxModel(exported), torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(runtime(images), torch.cat([runtime(image[None]) for image in images]))
    with pytest.raises(CheckpointError, match=r"exported for 64x64 images, got 32x32.*dynamic=True"):
        runtime(torch.zeros(1, 3, 32, 32))
    # An image size it cannot honour is a one-line error, from Python and from the command line.
    with pytest.raises(CfgError, match=r"imgsz=320 cannot be used with .*best.onnx: it was exported for fixed 64x64"):
        model.predict(source, imgsz=320, save=False, verbose=False)
    assert cli_main(["val", f"model={exported}", f"data={tiny_data}", "imgsz=320", "plots=False"]) == 2
    assert "yolotrain: error: imgsz=320 cannot be used" in capsys.readouterr().err


@pytest.mark.numeric
def test_an_end_to_end_onnx_returns_final_detections_equal_to_pytorch(tiny_family_yaml, tmp_path):
    """YOLO26: the exported graph ends in the head's top-k (no NMS): (B, max_det, 6) boxes, scores, classes."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = DetectionModel(tiny_family_yaml("yolo26"), nc=6, verbose=False)
    calibrate_batchnorm(model)
    with torch.no_grad():
        for branch in (*model.head.one2one_cv2, *model.head.one2one_cv3):
            torch.nn.init.normal_(branch[-1].weight, std=5e-4)  # scores spread below 1: no ties in the top-k
    path = tmp_path / "best.pt"
    save_checkpoint({"epoch": 0, "model": model.state_dict(), "ema": None, "model_yaml": model.yaml,
                     "names": NAMES, "nc": 6}, path)
    exported = YOLO(str(path)).export(format="onnx", imgsz=64, dynamic=True, max_det=20, verbose=False)
    runtime = OnnxModel(exported)
    assert runtime.end2end
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    expected = load_checkpoint_model(path).fuse().eval()
    expected.head.max_det = 20
    with torch.no_grad():
        reference = expected(images)[0]
    output = runtime(images)
    assert output.shape == (3, 20, 6)
    for got, expected_rows in zip(output, reference):  # near-equal scores may leave the top-k in either order
        assert_same_detections(got, expected_rows, atol=RUNTIME_ATOL, rtol=RUNTIME_RTOL, cut_off=True)


@pytest.mark.parametrize("suffix", [".onnx", ".torchscript"])
def test_a_damaged_exported_file_is_a_one_line_error(tmp_path, capsys, yolotrain_log, suffix):
    if suffix == ".onnx":
        pytest.importorskip("onnxruntime")
    damaged = tmp_path / f"best{suffix}"
    damaged.write_bytes(b"\x00\x01 not a model " * 64)
    assert cli_main(["predict", f"model={damaged}", f"source={tmp_path}"]) == CheckpointError.exit_code
    output = capsys.readouterr().err
    errors = [line for line in output.splitlines() if line.startswith("yolotrain: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"yolotrain: error: {damaged} is not a readable")
    # A TorchScript file is a program: loading one says so (an ONNX graph is data).
    said = any("TorchScript runs the code inside the file" in message for message in yolotrain_log)
    assert said == (suffix == ".torchscript")
