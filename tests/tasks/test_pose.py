"""Pose: keypoint labels and their checks, the Pose head and its reference layout, OKS and keypoint AP (by hand and
against pycocotools), keypoints through every transform, and a pose run's train / val / predict / export / resume
through the same `YOLO` object."""

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from coco_reference import cocoeval_stats
from resume_check import assert_resumes_exactly, read_rows
from yolotrain.cfg import get_cfg
from yolotrain.data.augment import LetterBox, Mosaic, RandomFlip, RandomPerspective
from yolotrain.data.builtin import (SHAPE_FLIP_IDX, generate_shapes_pose_dataset, image_rng, render_scene,
                                    shape_keypoints)
from yolotrain.data.data_yaml import check_det_dataset
from yolotrain.engine.model import YOLO
from yolotrain.errors import CfgError, DatasetError
from yolotrain.nn.backends import load_inference_model
from yolotrain.nn.model import PoseModel
from yolotrain.tasks.pose.train import PoseTrainer
from yolotrain.tasks.pose.val import PoseValidator
from yolotrain.utils.checkpoint import load_checkpoint
from yolotrain.utils.metrics import COCO_KEYPOINT_SIGMAS, OKS_AREA_FROM_BOX, PoseMetrics, keypoint_oks, keypoint_sigmas

POSE_HEAD = [[4, 6, 8], 1, "Pose", ["nc", "kpt_shape"]]


@pytest.fixture(scope="module")
def tiny_pose_yaml(tiny_yaml_with_head):
    return tiny_yaml_with_head("tinypose", POSE_HEAD, kpt_shape=[17, 3])


@pytest.fixture(scope="module")
def pose_data(tmp_path_factory):
    """The built-in pose set, small: shapes with five keypoints (top, right, bottom, left, centre)."""
    return str(generate_shapes_pose_dataset(tmp_path_factory.mktemp("pose-data"), n_train=12, n_val=6, imgsz=96,
                                            seed=3))


@pytest.fixture
def pose_overrides(tiny_pose_yaml, pose_data, tmp_path):
    return dict(model=tiny_pose_yaml, data=pose_data, epochs=2, imgsz=64, batch=4, workers=0, device="cpu",
                project=str(tmp_path / "runs"), name="train", plots=False, seed=0, deterministic=True,
                warmup_epochs=0.5, verbose=False, close_mosaic=1)


# ---------------------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("name, parameters, head", [
    ("yolo11n-pose.yaml", 2_908_507, "model.23"),  # the reference's own figure for its model at nc=80, 17 keypoints
    ("yolov8n-pose.yaml", 3_441_627, "model.22"),
])  # fmt: skip
def test_pose_models_have_the_reference_layout(name, parameters, head):
    model = PoseModel(name, verbose=False)
    assert sum(p.numel() for p in model.parameters()) == parameters and model.task == "pose"
    keys = model.state_dict().keys()
    assert f"{head}.cv4.2.2.weight" in keys and f"{head}.cv2.0.0.conv.weight" in keys
    assert model.state_dict()[f"{head}.cv4.0.2.weight"].shape[0] == 17 * 3


def test_the_pose_head_decodes_keypoints_around_their_anchor(tiny_pose_yaml):
    model = PoseModel(tiny_pose_yaml, data_kpt_shape=[4, 2], verbose=False).eval()
    head = model.head
    for conv in head.cv4:  # raw outputs: all zero, so each keypoint sits at anchor - 0.5 cells
        torch.nn.init.zeros_(conv[-1].weight)
        torch.nn.init.zeros_(conv[-1].bias)
    y, (maps, raw) = model(torch.rand(1, 3, 64, 64))
    assert y.shape == (1, 4 + 2 + 8, 64 // 8 * 64 // 8 + 16 + 4) and raw.shape == (1, 8, y.shape[-1])
    keypoints = y[0, 6:].view(4, 2, -1)
    first_anchor = keypoints[:, :, 0]  # anchor (0.5, 0.5) of the stride-8 level: (0.5 - 0.5) * 8 = 0 pixels
    assert torch.equal(first_anchor, torch.zeros(4, 2))
    last_anchor = keypoints[:, :, -1]  # anchor (1.5, 1.5) of the stride-32 level: 1.0 * 32 pixels
    assert torch.equal(last_anchor, torch.full((4, 2), 32.0))


def test_a_model_for_other_keypoints_fine_tunes_with_a_new_keypoint_head(tiny_pose_yaml):
    person = PoseModel(tiny_pose_yaml, verbose=False)
    shapes = PoseModel(tiny_pose_yaml, data_kpt_shape=[5, 3], verbose=False)
    transferred = shapes.load(person.state_dict(), verbose=False)
    mismatched = [k for k, v in shapes.state_dict().items() if person.state_dict()[k].shape != v.shape]
    assert transferred == len(shapes.state_dict()) - len(mismatched)
    assert mismatched and all(".cv4." in k for k in mismatched)


def test_a_pose_head_with_an_impossible_kpt_shape_is_a_one_line_error(tiny_pose_yaml):
    with pytest.raises(CfgError, match=r"kpt_shape=\[4, 5\]: expected \[keypoints, 2 or 3\]"):
        PoseModel(tiny_pose_yaml, data_kpt_shape=[4, 5], verbose=False)


# ------------------------------------------------------------------------------------------------------ data yaml
@pytest.mark.parametrize("keys, message", [
    ({"kpt_shape": [4]}, "kpt_shape=[4] is invalid: expected [keypoints, 2 or 3]"),
    ({"kpt_shape": [4, 4]}, "kpt_shape=[4, 4] is invalid"),
    ({"kpt_shape": [3, 3], "flip_idx": [0, 1]}, "flip_idx=[0, 1] is invalid: expected a permutation of 0..2"),
    ({"kpt_shape": [3, 3], "flip_idx": [1, 2, 0]}, "mirroring twice must give every keypoint back"),
    ({"kpt_shape": [2, 2], "kpt_sigmas": [0.1, -1]}, "kpt_sigmas=[0.1, -1] is invalid: expected 2 positive numbers"),
])  # fmt: skip
def test_keypoint_keys_of_a_data_yaml_are_checked(tmp_path, keys, message):
    (tmp_path / "images").mkdir()
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump({"train": "images", "val": "images", "names": ["a"], **keys}))
    with pytest.raises(DatasetError) as info:
        check_det_dataset(path)
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_pose_run_without_kpt_shape_is_a_one_line_error(pose_overrides, make_dataset, tmp_path):
    data = make_dataset(tmp_path / "boxes", [("a", 32, 32, [(0, 4, 4, 20, 20)])])
    with pytest.raises(DatasetError, match="a pose dataset needs 'kpt_shape"):
        PoseTrainer(overrides={**pose_overrides, "data": str(data)}).train()


def test_bad_pose_rows_are_named_in_the_report(tmp_path):
    from yolotrain.data.dataset import YOLODataset

    image_dir, label_dir = tmp_path / "images", tmp_path / "labels"
    image_dir.mkdir(), label_dir.mkdir()
    cv2.imwrite(str(image_dir / "a.png"), np.zeros((32, 32, 3), np.uint8))
    (label_dir / "a.txt").write_text("0 0.5 0.5 0.4 0.4 0.5 0.5 2 0.6 0.6 1\n"  # fine
                                     "0 0.5 0.5 0.4 0.4 0.5 0.5 2\n"  # one keypoint short
                                     "0 0.5 0.5 0.4 0.4 0.5 0.5 2 1.8 0.6 1\n")  # a keypoint outside the image
    data = {"names": {0: "a"}, "nc": 1, "kpt_shape": (2, 3)}
    dataset = YOLODataset(str(image_dir), imgsz=32, data=data, task="pose", workers=1)
    assert dataset.labels[0]["keypoints"].shape == (1, 2, 3)
    report = Path(dataset.bad_entries_file).read_text()
    assert "line 2: expected 11 values (class x y w h and 2 keypoints of 3), got 8" in report
    assert "line 3: coordinates" in report and "outside [0, 1]" in report


# ------------------------------------------------------------------------------------------------- built-in set
def test_builtin_keypoints_sit_on_their_shape_and_mirror_with_flip_idx():
    scene = render_scene(image_rng(0, "train", 7), 160)
    keypoints = shape_keypoints(scene)  # (n, 5, 3)
    assert keypoints.shape == (len(scene.classes), 5, 3)
    centres = keypoints[:, 4].astype(np.int64)
    shown = scene.object_ids[centres[:, 1], centres[:, 0]]
    assert np.all((shown == np.arange(len(shown))) | (keypoints[:, 4, 2] == 1))  # the centre is its own pixel
    x1, y1, x2, y2 = scene.boxes.T
    top, right, bottom, left = (keypoints[:, k] for k in range(4))
    visible = keypoints[:, :4, 2].min(1) == 2
    for point, edge, axis in ((top, y1, 1), (left, x1, 0), (bottom, y2, 1), (right, x2, 0)):  # on the box's edges
        assert np.all(np.abs(point[visible, axis] - edge[visible]) <= 1.5)
    assert sorted(SHAPE_FLIP_IDX) == list(range(5)) and SHAPE_FLIP_IDX[1] == 3 and SHAPE_FLIP_IDX[3] == 1


# ------------------------------------------------------------------------------------------------ transforms
def _disc_sample(size=96):
    """A sample with two objects, each with two keypoints on discs of their own colours: object 0 'left' on red and
    'right' on green, object 1 'left' on blue and 'right' on white."""
    img = np.full((size, size, 3), 60, np.uint8)
    points = np.array([[[20, 30], [44, 30]], [[40, 70], [70, 70]]], np.float32)
    colours = [[(0, 0, 255), (0, 255, 0)], [(255, 0, 0), (255, 255, 255)]]
    for obj in range(2):
        for k in range(2):
            cv2.circle(img, tuple(int(v) for v in points[obj, k]), 6, colours[obj][k], -1)
    keypoints = np.concatenate([points + 0.5, np.full((2, 2, 1), 2.0, np.float32)], -1)  # pixel centres
    boxes = np.array([[12, 22, 52, 38], [32, 62, 78, 78]], np.float32)
    return {"img": img, "cls": np.zeros((2, 1), np.float32), "bboxes": boxes, "keypoints": keypoints,
            "im_file": "discs.png", "ori_shape": (size, size), "resized_shape": (size, size),
            "ratio_pad": ((1.0, 1.0), (0.0, 0.0))}, colours


def _pixel(img, point):
    return tuple(int(v) for v in img[int(point[1]), int(point[0])])


@pytest.mark.parametrize("transform", ["letterbox", "perspective", "flip", "mosaic"])
def test_every_transform_keeps_each_keypoint_on_its_disc(transform):
    import random

    random.seed(4)
    sample, colours = _disc_sample()
    swapped = False
    if transform == "letterbox":
        out = LetterBox((128, 160))(sample)
    elif transform == "perspective":
        out = RandomPerspective(degrees=25, translate=0.05, scale=0.2, shear=5, border=(0, 0))(sample)
    elif transform == "flip":
        out = RandomFlip(p=1.0, direction="horizontal", flip_idx=[1, 0])(sample)
        swapped = True
    else:
        class OneImage:
            def __len__(self):
                return 1

            def get_image_and_label(self, _):
                return _disc_sample()[0]

        out = RandomPerspective(border=(0, 0), scale=0, translate=0)(Mosaic(OneImage(), 96)(sample))
    kept = 0
    for obj_points in out["keypoints"]:
        for k, point in enumerate(obj_points):
            if point[2] == 0:  # pushed out of the image
                continue
            colour = _pixel(out["img"], point[:2])
            candidates = {tuple(c[1 - k if swapped else k]) for c in colours}  # the disc of this keypoint index
            assert colour in candidates, (transform, k, point, colour)
            kept += 1
    assert kept >= 4
    if swapped:  # the keypoint named "left" is still the one on the left after the mirror
        assert np.all(out["keypoints"][:, 0, 0] < out["keypoints"][:, 1, 0])


def test_a_keypoint_pushed_out_of_the_image_becomes_invisible():
    from yolotrain.data.instances import Instances

    instances = Instances(np.array([[10, 10, 50, 50]], np.float32),
                          keypoints=np.array([[[20, 20, 2], [60, 20, 2]]], np.float32))
    clipped = instances.scale_and_offset(1.0, 1.0, 20.0, 0.0).clip(64, 64)
    assert clipped.keypoints[0, :, 2].tolist() == [2.0, 0.0]


# -------------------------------------------------------------------------------------------------------- metrics
def test_oks_by_hand():
    truth = torch.tensor([[[10.0, 10.0, 2.0], [20.0, 10.0, 2.0], [0.0, 0.0, 0.0]]])  # third keypoint unlabelled
    pred = torch.tensor([[[10.0, 10.0], [23.0, 14.0], [99.0, 99.0]]])
    sigmas = np.array([0.1, 0.2, 0.3])
    area = torch.tensor([100.0])
    # keypoint 1: d^2 = 25, e = 25 / ((2 * 0.2)^2 * 100 * 2) = 0.78125; keypoint 0 exact; keypoint 2 not counted
    expected = (1.0 + np.exp(-0.78125)) / 2
    assert float(keypoint_oks(truth, pred, area, sigmas)[0, 0]) == pytest.approx(expected, rel=1e-6)
    assert keypoint_oks(torch.zeros(1, 3, 3), pred, area, sigmas).item() == 0.0  # nothing labelled


def test_keypoint_sigmas_follow_the_data():
    assert np.array_equal(keypoint_sigmas((17, 3)), COCO_KEYPOINT_SIGMAS)
    assert np.allclose(keypoint_sigmas((5, 3)), 0.2)
    assert keypoint_sigmas((2, 2), [0.5, 0.25]).tolist() == [0.5, 0.25]


def _synthetic_pose_images(seed, num_images=24, count=4, size=200):
    """Per image: labels (m, 5 + 3K) class, xyxy, keypoints x y v, and predictions (n, 6 + 2K) xyxy conf class
    keypoints, in pixels; some labels have no labelled keypoint at all (COCO ignores those)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num_images):
        m = rng.integers(0, 6)
        top_left = rng.uniform(0, size * 0.6, (m, 2))
        wh = rng.uniform(20, size * 0.4, (m, 2))
        boxes = np.concatenate([top_left, top_left + wh], 1)
        keypoints = top_left[:, None] + rng.uniform(0, 1, (m, count, 2)) * wh[:, None]
        visibility = rng.choice([0, 1, 2], (m, count), p=[0.25, 0.25, 0.5])
        visibility[rng.random(m) < 0.2] = 0  # some objects have no labelled keypoint
        cls = rng.integers(0, 2, m)
        labels = np.concatenate([cls[:, None], boxes, np.concatenate([keypoints, visibility[..., None]], -1)
                                 .reshape(m, count * 3)], 1)
        found = rng.random(m) < 0.85
        noise = rng.normal(0, 1, (m, count, 2)) * rng.uniform(0.5, 12, (m, 1, 1))
        pred_keypoints = (keypoints + noise)[found]
        pred_boxes = (boxes + rng.normal(0, 3, (m, 4)))[found]
        pred_cls = np.where(rng.random(m) < 0.9, cls, 1 - cls)[found]
        n_fp = rng.integers(0, 4) if len(images) else 40  # 40 + in one image: COCO scores 20 per image and class
        fp_top_left = rng.uniform(0, size * 0.7, (n_fp, 2))
        fp_boxes = np.concatenate([fp_top_left, fp_top_left + 30], 1)
        fp_keypoints = fp_top_left[:, None] + rng.uniform(0, 30, (n_fp, count, 2))
        boxes_all = np.concatenate([pred_boxes, fp_boxes])
        boxes_all[:, 2:] = np.maximum(boxes_all[:, 2:], boxes_all[:, :2] + 1)
        preds = np.concatenate([boxes_all, rng.uniform(0.01, 1, (len(boxes_all), 1)),
                                np.concatenate([pred_cls, rng.integers(0, 2, n_fp)])[:, None],
                                np.concatenate([pred_keypoints, fp_keypoints]).reshape(len(boxes_all), count * 2)], 1)
        images.append((labels, preds[np.argsort(-preds[:, 4], kind="stable")]))
    return images


def _our_pose_map(images, count, size=200):
    validator = PoseValidator(args={"save_json": False, "plots": False})
    validator.kpt_shape, validator.sigmas = (count, 3), keypoint_sigmas((count, 3))
    validator.names, validator.nc, validator.device = {0: "a", 1: "b"}, 2, torch.device("cpu")
    validator.metrics = PoseMetrics(names=validator.names)
    validator.plot_stats, validator.training = False, False
    validator.reset()
    for position, (labels, preds) in enumerate(images):
        boxes = torch.tensor(labels[:, 1:5], dtype=torch.float32)
        xywhn = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1) / size
        keypoints = torch.tensor(labels[:, 5:], dtype=torch.float32).reshape(-1, count, 3)
        keypoints[..., :2] /= size
        pred = torch.tensor(preds, dtype=torch.float32)
        pred_keypoints = pred[:, 6:].reshape(-1, count, 2)
        pred = torch.cat([pred[:, :6], torch.cat([pred_keypoints, torch.ones_like(pred_keypoints[..., :1])], -1)
                          .flatten(1)], 1)
        batch = {"img": torch.zeros(1, 3, size, size), "batch_idx": torch.zeros(len(labels)),
                 "cls": torch.tensor(labels[:, :1], dtype=torch.float32), "bboxes": xywhn, "keypoints": keypoints,
                 "ratio_pad": [((1.0, 1.0), (0.0, 0.0))], "ori_shape": [(size, size)], "im_file": [f"{position}.png"]}
        validator.batch_position = position
        validator.update([pred], batch)
    validator.compute()
    return validator.metrics


def _pycocotools_pose_map(images, count):
    annotations, detections = [], []
    for image_id, (labels, preds) in enumerate(images, start=1):
        for row in labels:
            x1, y1, x2, y2 = row[1:5]
            keypoints = row[5:].reshape(count, 3)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(row[0]) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1) * OKS_AREA_FROM_BOX,
                                "iscrowd": 0, "keypoints": keypoints.reshape(-1).tolist(),
                                "num_keypoints": int((keypoints[:, 2] > 0).sum())})
        for row in preds:
            keypoints = np.concatenate([row[6:].reshape(count, 2), np.ones((count, 1))], 1)
            detections.append({"image_id": image_id, "category_id": int(row[5]) + 1, "score": float(row[4]),
                               "keypoints": keypoints.reshape(-1).tolist()})
    ground_truth = {"images": [{"id": i} for i in range(1, len(images) + 1)], "annotations": annotations,
                    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    return cocoeval_stats(ground_truth, detections, "keypoints", keypoint_sigmas((count, 3)))


@pytest.mark.numeric
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keypoint_map_equals_pycocotools(seed):
    pytest.importorskip("pycocotools")
    images = _synthetic_pose_images(seed)
    ours = _our_pose_map(images, 4)
    theirs = _pycocotools_pose_map(images, 4)
    assert ours.pose.map == pytest.approx(theirs[0], abs=1e-4) and ours.pose.map50 == pytest.approx(theirs[1], abs=1e-4)
    assert 0.05 < ours.pose.map < 0.95  # neither trivial nor perfect
    assert ours["metrics/mAP50-95(P)"] == ours.pose.map and ours.fitness == pytest.approx(
        ours.box.fitness() + ours.pose.fitness())


# -------------------------------------------------------------------------------------------------------- loss
def test_the_keypoint_loss_is_zero_for_perfect_keypoints(tiny_pose_yaml):
    from yolotrain.loss.pose import PoseLoss

    model = PoseModel(tiny_pose_yaml, nc=1, data_kpt_shape=[3, 3], verbose=False)
    model.args = get_cfg()
    loss = PoseLoss(model)
    batch = {"img": torch.zeros(1, 3, 64, 64), "batch_idx": torch.zeros(1), "cls": torch.zeros(1, 1),
             "bboxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]),
             "keypoints": torch.tensor([[[0.4, 0.4, 2.0], [0.6, 0.4, 2.0], [0.5, 0.6, 0.0]]])}
    maps, raw = model.train()(batch["img"])
    assigned = loss.assign(list(maps), batch)
    target = loss.anchor_keypoints(assigned, loss.padded_keypoints(batch, 1, (64, 64)))  # (1, A, 3, 3) grid units
    # Raw outputs that decode exactly onto every anchor's target: (target - anchor + 0.5) / 2.
    perfect = (target[..., :2] - (assigned.anchor_points[:, None] - 0.5)) / 2
    perfect = torch.cat([perfect, torch.where(target[..., 2:] > 0, 20.0, -20.0)], -1)  # confident visibility

    def decoded(raw_keypoints):  # (1, A, K, D) -> the head's (1, K * D, A) layout, then the loss's decoding
        return loss.decode_keypoints(raw_keypoints.flatten(2).permute(0, 2, 1), assigned.anchor_points)

    location, visibility = loss.keypoint_terms(assigned, decoded(perfect), target)
    assert bool(assigned.fg_mask.any()) and float(location) == pytest.approx(0.0, abs=1e-6)
    assert float(visibility) < 1e-6
    wrong_location, _ = loss.keypoint_terms(assigned, decoded(perfect + 1), target)
    assert float(wrong_location) > 0.01


# --------------------------------------------------------------------------------------------------------- runs
@pytest.mark.numeric
def test_a_pose_run_writes_what_users_read(pose_overrides, tmp_path):
    model = YOLO(pose_overrides["model"])
    metrics = model.train(**{k: v for k, v in pose_overrides.items() if k != "model"})
    save_dir = Path(pose_overrides["project"]) / "train"
    rows = read_rows(save_dir / "results.csv")
    assert list(rows[0])[2:15] == [
        "train/box_loss", "train/pose_loss", "train/kobj_loss", "train/cls_loss", "train/dfl_loss",
        "metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)",
        "metrics/precision(P)", "metrics/recall(P)", "metrics/mAP50(P)", "metrics/mAP50-95(P)"]  # fmt: skip
    assert float(rows[-1]["train/pose_loss"]) > 0 and metrics.pose.map == metrics["metrics/mAP50-95(P)"]
    checkpoint = load_checkpoint(save_dir / "weights" / "best.pt")
    assert checkpoint["task"] == "pose" and checkpoint["model_yaml"]["kpt_shape"] == [5, 3]

    trained = YOLO(save_dir / "weights" / "best.pt")
    assert trained.task == "pose"
    validated = trained.val(data=pose_overrides["data"], imgsz=64, batch=4, plots=False, conf=0.001)
    assert validated.pose.map == pytest.approx(metrics.pose.map, abs=1e-6)
    image = next(Path(pose_overrides["data"]).parent.glob("images/val/*.jpg"))
    (result,) = trained.predict(str(image), imgsz=64, conf=0.0, max_det=5, save=False)
    assert result.keypoints.data.shape == (len(result.boxes), 5, 3) and len(result.boxes) == 5
    height, width = result.orig_shape
    assert torch.allclose(result.keypoints.xyn[..., 0] * width, result.keypoints.xy[..., 0], atol=1e-3)
    txt = tmp_path / "labels.txt"
    result.save_txt(txt)
    assert all(len(line.split()) == 5 + 5 * 3 for line in txt.read_text().splitlines())
    assert "keypoints" in result.summary()[0]
    assert cv2.imread(result.save(tmp_path / "a.jpg")).shape[:2] == (height, width)

    formats = ["torchscript"] + (["onnx"] if importlib.util.find_spec("onnxruntime") else [])
    for file_format in formats:
        exported = YOLO(trained.export(format=file_format, imgsz=64, dynamic=True))  # the same rect input
        assert exported.task == "pose"
        from_export = exported.val(data=pose_overrides["data"], imgsz=64, batch=4, plots=False, conf=0.001)
        assert from_export.pose.map == pytest.approx(metrics.pose.map, abs=2e-3)
        (exported_result,) = exported.predict(str(image), imgsz=64, conf=0.0, max_det=5, save=False)
        assert exported_result.keypoints.data.shape == result.keypoints.data.shape
        # The same raw output (boxes, scores, keypoints) as the checkpoint for a rect input, so the same predictions
        # (an untrained model's near-equal scores could rank its rows differently in the two runtimes).
        images = torch.rand(1, 3, 64, 48)
        from_checkpoint = load_inference_model(save_dir / "weights" / "best.pt").eval()(images)[0]
        assert torch.allclose(load_inference_model(exported.model_path)(images), from_checkpoint, atol=1e-3)


def test_a_pose_run_resumes_exactly(pose_overrides):
    assert_resumes_exactly(PoseTrainer, pose_overrides, "train/pose_loss")


def test_augment_device_auto_falls_back_for_keypoints_and_device_is_a_one_line_error(pose_overrides):
    from yolotrain.data.device_augment import check_device_augment

    args = get_cfg(overrides={"task": "pose", "augment_device": "auto"})
    assert check_device_augment(args, torch.device("cuda")) is False
    args = get_cfg(overrides={"task": "pose", "augment_device": "device"})
    with pytest.raises(CfgError, match="augment_device=device cannot be combined with task=pose"):
        check_device_augment(args, torch.device("cpu"))


def test_an_ultralytics_pose_checkpoint_imports_without_running_its_code(tiny_pose_yaml, pose_overrides, tmp_path):
    """A .pt in the reference's pickle layout (whole model objects, EMA in half precision) gives the EMA's weights
    key for key, keeps its task and keypoints, and fine-tunes."""
    import copy

    from reference_layout import classes_named_like_the_reference

    torch.manual_seed(0)
    model = PoseModel(tiny_pose_yaml, nc=6, data_kpt_shape=[5, 3], verbose=False)
    model.names = {i: f"shape{i}" for i in range(6)}
    ema = copy.deepcopy(model).half()
    path = tmp_path / "yolo11t-pose.pt"
    with classes_named_like_the_reference(model):
        torch.save({"epoch": 9, "model": None, "ema": ema, "train_args": {"task": "pose"}, "version": "8.4.190"}, path)
    imported = YOLO(path)
    assert imported.task == "pose"
    checkpoint = load_checkpoint(path)
    assert checkpoint["model_yaml"]["kpt_shape"] == [5, 3]
    expected = {k: v.float() for k, v in ema.state_dict().items()}
    assert all(torch.equal(checkpoint["model"][k], expected[k]) for k in expected)
    metrics = imported.train(**{k: v for k, v in pose_overrides.items() if k not in ("model", "epochs")}, epochs=1)
    assert 0 <= metrics.pose.map <= 1


@pytest.mark.slow
def test_two_cpu_processes_train_a_pose_model_and_validate_every_image(pose_overrides, pose_data):
    """torchrun with 2 ranks: one run folder, both epochs; the gathered keypoint mAP of the final epoch's
    validation is that of a standalone validation of the same weights."""
    import os
    import subprocess
    import sys

    args = {**pose_overrides, "amp": False, "dist_timeout": 60}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "yolotrain", "pose", "train", *(f"{k}={v}" for k, v in args.items())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    save_dir = Path(pose_overrides["project"]) / "train"
    assert [p.name for p in Path(pose_overrides["project"]).iterdir()] == ["train"]
    rows = read_rows(save_dir / "results.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    standalone = YOLO(save_dir / "weights" / "last.pt").val(data=pose_data, imgsz=64, batch=4, plots=False)
    assert float(rows[-1]["metrics/mAP50-95(P)"]) == pytest.approx(standalone.pose.map, abs=1e-4)
