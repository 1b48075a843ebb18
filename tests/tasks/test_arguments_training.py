"""Training arguments as a run sees them: imgsz off the stride, multi_scale ranges, classes in train and val."""

import random

import numpy as np
import pytest
import torch

import yolotrain.tasks.detect.val as val_module
from yolotrain import DetectionTrainer
from yolotrain.errors import CfgError

STRIDE = 32  # the largest stride of the built-in layouts


@pytest.fixture
def overrides(tiny_family_yaml, tiny_data, tmp_path):
    """One quick CPU epoch of a 1/16-width YOLOv8 layout (with its Concat layers) on the 6-class shapes data."""
    return dict(model=tiny_family_yaml("yolo"), data=tiny_data, epochs=1, imgsz=64, batch=4, workers=0,
                device="cpu", project=str(tmp_path / "runs"), name="train", plots=False, seed=0,
                warmup_epochs=0.5, close_mosaic=0, verbose=False)  # fmt: skip


def train(overrides, **extra):
    trainer = DetectionTrainer(overrides={**overrides, **extra})
    shapes = []
    trainer.add_callback("on_train_batch_end", lambda t: shapes.append(t.last_batch_shape[2:]))
    trainer.train()
    return trainer, shapes


def dataset_classes(dataset):
    return set(np.concatenate([r["cls"][:, 0] for r in dataset.labels]).astype(int).tolist())


# ------------------------------------------------------------------------------------------------------ imgsz
def test_imgsz_off_the_stride_trains_and_validates_at_the_next_multiple(overrides, yolotrain_log):
    trainer, shapes = train(overrides, imgsz=50)
    assert set(shapes) == {(64, 64)}
    assert trainer.metrics is not None and trainer.test_loader.dataset.imgsz == 64
    assert trainer.args.imgsz == 50 and trainer.resolved.imgsz == 64  # the user's value stays as given
    warnings = [m for m in yolotrain_log if "is not a multiple of the model's stride" in m]
    assert warnings == ["imgsz=50 is not a multiple of the model's stride 32: using imgsz=64"]


# ------------------------------------------------------------------------------------------------ multi_scale
def drawn_sizes(tmp_path, imgsz, multi_scale, draws=400):
    trainer = DetectionTrainer(overrides=dict(imgsz=imgsz, multi_scale=multi_scale, project=str(tmp_path)))
    random.seed(0)
    images = torch.zeros(1, 1, imgsz, imgsz)  # one channel keeps hundreds of resizes cheap
    return [trainer._random_rescale(images).shape[-1] for _ in range(draws)]


@pytest.mark.parametrize("multi_scale, low, high", [(0.25, 0.75, 1.25), (True, 0.5, 1.5), (0.1, 0.9, 1.1)])
def test_multi_scale_sizes_span_the_range_on_the_stride(tmp_path, multi_scale, low, high):
    sizes = drawn_sizes(tmp_path, 640, multi_scale)
    assert all(size % STRIDE == 0 for size in sizes)
    smallest, largest = -(-round(640 * low) // STRIDE) * STRIDE, round(640 * high) // STRIDE * STRIDE
    assert min(sizes) == smallest and max(sizes) == largest  # the whole range, and nothing outside it


def test_multi_scale_is_centred_on_the_rounded_imgsz(tmp_path):
    assert set(drawn_sizes(tmp_path, 200, 0.25, draws=100)) == {192, 224, 256}  # 224 +/- 25% on the stride


def test_multi_scale_out_of_range_stops_before_training(overrides):
    with pytest.raises(CfgError, match=r"^'multi_scale=1.5' is invalid"):
        DetectionTrainer(overrides={**overrides, "multi_scale": 1.5})


# ---------------------------------------------------------------------------------------------------- classes
def test_classes_train_and_validate_on_those_classes_only(overrides, monkeypatch, yolotrain_log):
    nms_classes = []

    def recording_nms(*args, **kwargs):
        nms_classes.append(kwargs.get("classes"))
        return non_max_suppression(*args, **kwargs)

    non_max_suppression = val_module.non_max_suppression
    monkeypatch.setattr(val_module, "non_max_suppression", recording_nms)
    trainer, _ = train(overrides, classes=[0, 2])
    assert dataset_classes(trainer.train_loader.dataset) == {0, 2}
    assert dataset_classes(trainer.test_loader.dataset) == {0, 2}
    assert nms_classes and all(classes == [0, 2] for classes in nms_classes)
    summaries = [m for m in yolotrain_log if "labels of other classes dropped (classes=[0, 2])" in m]
    assert [m.split(":")[0] for m in summaries] == ["train", "val"]


def test_class_id_not_below_nc_stops_with_one_line(overrides):
    with pytest.raises(CfgError) as error:
        DetectionTrainer(overrides={**overrides, "classes": [0, 6]}).train()
    message = str(error.value)
    assert "class id 6" in message and "nc=6" in message and "\n" not in message


def test_the_list_of_bad_entries_is_copied_into_the_run_folder(overrides, tiny_data, tmp_path):
    import shutil
    from pathlib import Path

    data_dir = tmp_path / "data"
    shutil.copytree(Path(tiny_data).parent, data_dir)
    label = next((data_dir / "labels" / "train").glob("*.txt"))
    label.write_text("0 0.5 0.5 not-a-number 0.2\n")
    data_yaml = data_dir / "data.yaml"
    data_yaml.write_text(Path(tiny_data).read_text().replace(str(Path(tiny_data).parent), str(data_dir)))
    trainer, _ = train(overrides, data=str(data_yaml), val=False)
    listed = (trainer.save_dir / "train.bad.txt").read_text()
    assert label.stem in listed and len(listed.strip().splitlines()) == 1
