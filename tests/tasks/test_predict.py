"""Predict: every kind of source, the outputs users look at, equality with validation's predictions, bad input."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from yolotrain import YOLO
from yolotrain.cli import main as cli_main
from yolotrain.data.data_yaml import check_det_dataset
from yolotrain.data.sources import SourceError
from yolotrain.nn.model import DetectionModel
from yolotrain.tasks.detect.predict import DetectionPredictor
from yolotrain.tasks.detect.val import DetectionValidator
from yolotrain.utils.checkpoint import save_checkpoint

CONF = 0.05


@pytest.fixture
def detector(tiny_model_yaml, tmp_path):
    """A checkpoint of the tiny detector whose class scores sit well above CONF, so every image has boxes."""
    torch.manual_seed(0)
    model = DetectionModel(tiny_model_yaml, nc=6, verbose=False)
    for branch in model.model[-1].cv3:
        torch.nn.init.constant_(branch[-1].bias, -1.0)  # sigmoid(-1) = 0.27 plus the weights' spread
    model.names = {i: name for i, name in enumerate(["circle", "square", "triangle", "star", "cross", "ellipse"])}
    path = tmp_path / "weights" / "best.pt"
    path.parent.mkdir()
    save_checkpoint({"epoch": 0, "model": model.state_dict(), "ema": None, "model_yaml": model.yaml,
                     "names": model.names, "nc": 6}, path)
    return path


@pytest.fixture(scope="module")
def val_images(tiny_data):
    return sorted(Path(check_det_dataset(tiny_data)["val"]).glob("*.jpg"))


def common(tmp_path, **extra):
    return {"imgsz": 64, "conf": CONF, "device": "cpu", "project": str(tmp_path / "runs"), "name": "predict",
            "verbose": False, **extra}


def test_predict_on_a_folder_writes_one_annotated_image_and_label_file_per_image(detector, val_images, tmp_path):
    results = YOLO(str(detector)).predict(str(val_images[0].parent), save=True, save_txt=True, save_conf=True,
                                          **common(tmp_path))
    save_dir = tmp_path / "runs" / "predict"
    assert [Path(r.path).name for r in results] == [p.name for p in val_images]
    assert sorted(p.name for p in save_dir.glob("*.jpg")) == [p.name for p in val_images]
    for result, image_file in zip(results, val_images):
        annotated = cv2.imread(str(save_dir / image_file.name))
        assert annotated.shape == cv2.imread(str(image_file)).shape
        assert len(result) > 0 and not np.array_equal(annotated, result.orig_img)  # boxes were drawn
        rows = np.loadtxt(save_dir / "labels" / f"{image_file.stem}.txt", ndmin=2)
        assert rows.shape == (len(result), 6)
        torch.testing.assert_close(torch.tensor(rows[:, 1:5], dtype=torch.float32), result.boxes.xywhn,
                                   atol=1e-5, rtol=1e-4)
        assert set(result.speed) == {"preprocess", "inference", "postprocess"}


@pytest.mark.numeric
def test_predicted_boxes_equal_the_validators_predictions(detector, val_images, tiny_data, tmp_path):
    """Same letterbox (batch 1, the same margin), same NMS (single-label): validation and predict find the same
    boxes."""
    validator = DetectionValidator(args=dict(data=tiny_data, imgsz=64, batch=1, conf=CONF, device="cpu",
                                             workers=0, plots=False, multi_label=False, save_json=True),
                                   save_dir=tmp_path / "val")
    validator.rect_pad = DetectionPredictor.rect_pad
    validator(model=str(detector))
    # save_json keeps each batch's detections in original-image pixels; at batch 1 a record is one image.
    recorded = [detections for _, _, _, detections in validator.json_records]
    predicted = YOLO(str(detector)).predict([str(p) for p in validator.dataloader.dataset.im_files],
                                            **common(tmp_path, save=False))
    assert len(predicted) == len(recorded) == len(val_images)
    for result, expected in zip(predicted, recorded):
        torch.testing.assert_close(result.boxes.data, expected, atol=1e-4, rtol=1e-5)


def test_every_in_memory_and_list_source_kind(detector, val_images, tmp_path):
    from PIL import Image

    model = YOLO(str(detector))
    image = cv2.imread(str(val_images[0]))
    reference = model.predict(str(val_images[0]), **common(tmp_path, save=False))[0].boxes.data
    from_array = model.predict(image, **common(tmp_path, save=False))
    from_pil = model(Image.fromarray(image[..., ::-1]), **common(tmp_path, save=False))
    from_list = model.predict([image, image], **common(tmp_path, save=False))
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in val_images[:3]))
    from_txt = model.predict(str(listing), **common(tmp_path, save=False))
    from_glob = model.predict(str(val_images[0].parent / "*.jpg"), **common(tmp_path, save=False))
    assert torch.equal(from_array[0].boxes.data, reference) and from_array[0].path == "image0"
    assert torch.equal(from_pil[0].boxes.data, reference)
    assert [r.path for r in from_list] == ["image0", "image1"]
    assert [r.path for r in from_txt] == [str(p) for p in val_images[:3]]
    assert len(from_glob) == len(val_images)
    stream = model.predict(str(val_images[0].parent), stream=True, **common(tmp_path, save=False))
    assert not isinstance(stream, list) and len(list(stream)) == len(val_images)


def test_results_api(detector, val_images, tmp_path):
    (result,) = YOLO(str(detector)).predict(str(val_images[0]), **common(tmp_path, save=False))
    height, width = result.orig_shape
    boxes = result.boxes
    assert boxes.xyxy.shape == (len(result), 4) and boxes.conf.shape == boxes.cls.shape == (len(result),)
    torch.testing.assert_close(boxes.xyxyn * torch.tensor([width, height, width, height]), boxes.xyxy)
    torch.testing.assert_close(boxes.xywh[:, :2], (boxes.xyxy[:, :2] + boxes.xyxy[:, 2:]) / 2)
    summary = result.summary()
    assert len(summary) == len(result) and summary[0]["name"] in result.names.values()
    assert '"confidence"' in result.to_json()
    assert result.plot().shape == result.orig_img.shape
    result.save_crop(tmp_path / "crops", "x")
    assert sum(1 for _ in (tmp_path / "crops").rglob("*.jpg")) == len(result)


def write_video(path, frames=7, size=(80, 64), fps=10.0):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    writer.release()
    return path


def count_frames(path):
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return count, fps


def test_video_gives_an_annotated_video_with_the_same_frame_count_and_fps(detector, tmp_path):
    video = write_video(tmp_path / "clip.mp4")
    results = YOLO(str(detector)).predict(str(video), save=True, save_txt=True, **common(tmp_path))
    assert [r.frame for r in results] == list(range(7))
    out = tmp_path / "runs" / "predict" / "clip.mp4"
    assert count_frames(out) == (7, pytest.approx(10.0))
    strided = YOLO(str(detector)).predict(str(video), vid_stride=3, **common(tmp_path, save=False))
    assert [r.frame for r in strided] == [0, 3, 6]


def test_bad_sources_are_one_line_errors_or_named_skips(detector, val_images, tmp_path, yolotrain_log, capsys,
                                                        monkeypatch):
    model = YOLO(str(detector))
    with pytest.raises(SourceError, match="does not exist"):
        model.predict(str(tmp_path / "missing.jpg"), **common(tmp_path, save=False))
    (tmp_path / "notes.doc").write_text("x")
    with pytest.raises(SourceError, match="unsupported suffix"):
        model.predict(str(tmp_path / "notes.doc"), **common(tmp_path, save=False))
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(SourceError, match="broken.mp4"):
        model.predict(str(tmp_path / "broken.mp4"), **common(tmp_path, save=False))
    folder = tmp_path / "mixed"
    folder.mkdir()
    cv2.imwrite(str(folder / "good.jpg"), cv2.imread(str(val_images[0])))
    (folder / "bad.jpg").write_text("not an image")
    results = model.predict(str(folder), **common(tmp_path, save=False, verbose=True))
    assert [Path(r.path).name for r in results] == ["good.jpg"]
    assert any("skipped" in m and "bad.jpg" in m for m in yolotrain_log)
    monkeypatch.chdir(tmp_path)
    assert cli_main(["predict", f"model={detector}", f"source={tmp_path / 'missing.jpg'}", "imgsz=64"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "missing.jpg" in error[0] and error[0].startswith("yolotrain: error:")
    assert not (tmp_path / "runs").exists()  # the source failed before any run folder was made


def test_a_folder_of_unreadable_images_names_a_few_counts_the_rest_and_fails(detector, tmp_path, yolotrain_log,
                                                                           capsys, monkeypatch):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.jpg").write_text("not an image")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["predict", f"model={detector}", f"source={folder}", "imgsz=64"]) == 2
    skipped = [m for m in yolotrain_log if m.startswith("predict: skipped")]
    assert len(skipped) == 6 and "00.jpg" in skipped[0]
    assert "12 unreadable files in all (7 not named above)" in skipped[-1]
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("yolotrain: error:")]
    assert errors == [f"yolotrain: error: no file of source '{folder}' could be read: 12 skipped (first: image "
                      f"'{folder / '00.jpg'}' cannot be read (corrupt or not an image))"]
    assert not (tmp_path / "runs").exists()


def test_cli_predict_streams_and_saves(detector, val_images, tmp_path):
    project = tmp_path / "cli"
    assert cli_main(["predict", f"model={detector}", f"source={val_images[0].parent}", "imgsz=64",
                     f"conf={CONF}", f"project={project}", "save_txt=True"]) == 0
    assert len(list((project / "predict").glob("*.jpg"))) == len(val_images)
    assert len(list((project / "predict" / "labels").glob("*.txt"))) == len(val_images)


def test_a_url_or_a_named_pipe_as_source_is_a_one_line_error(detector, tmp_path):
    import os

    model = YOLO(str(detector))
    with pytest.raises(SourceError, match="is a URL: predict reads local files only"):
        model.predict("http://example.com/image.jpg", **common(tmp_path, save=False))
    if not hasattr(os, "mkfifo"):
        return
    pipe = tmp_path / "frames"
    os.mkfifo(pipe)
    with pytest.raises(SourceError, match="not a regular file or folder"):  # reading it would block for ever
        model.predict(str(pipe), **common(tmp_path, save=False))


def test_python_predict_writes_nothing_unless_asked(detector, val_images, tmp_path, monkeypatch):
    """As with the reference: a script predicting in a loop fills no runs/detect/predictN folders (the command line
    saves by default, see above)."""
    monkeypatch.chdir(tmp_path)
    results = YOLO(str(detector)).predict(str(val_images[0]), imgsz=64, conf=CONF, verbose=False)
    assert len(results) == 1 and not (tmp_path / "runs").exists()
    YOLO(str(detector)).predict(str(val_images[0]), imgsz=64, conf=CONF, verbose=False, save=True)
    assert len(list((tmp_path / "runs" / "detect" / "predict").glob("*.jpg"))) == 1
