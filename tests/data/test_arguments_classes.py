"""classes: labels of other classes are dropped at load time, counted in the summary; ids are kept as they are."""

import pytest

from yolotrain.data.data_yaml import check_det_dataset
from yolotrain.data.dataset import YOLODataset
from yolotrain.errors import CfgError

# Rows of class 0, 1, 2, 1 in one file and 3, 0 in another: with classes=[0, 2], the three rows of 1 and 3 go.
MIXED = "0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1\n2 0.7 0.7 0.2 0.2\n1 0.2 0.8 0.1 0.1\n"
OTHER = "3 0.5 0.5 0.3 0.3\n0 0.2 0.2 0.1 0.1\n"
NAMES = {0: "a", 1: "b", 2: "c", 3: "d"}


@pytest.fixture
def images(yolo_split):
    return yolo_split({"mixed": (32, 32, MIXED), "other": (32, 32, OTHER)})


def load(images, classes, **kwargs):
    return YOLODataset(str(images), imgsz=32, classes=classes, data={"nc": 4, "names": NAMES}, prefix="train",
                       workers=0, **kwargs)  # fmt: skip


def class_ids(dataset):
    return [r["cls"][:, 0].astype(int).tolist() for r in dataset.labels]


def test_other_classes_are_dropped_and_ids_kept(images):
    dataset = load(images, [0, 2])
    assert class_ids(dataset) == [[0, 2], [0]]
    assert [len(r["bboxes"]) for r in dataset.labels] == [2, 1]
    assert dataset.nc == 4  # not renumbered: the model still predicts every class of the data yaml


def test_summary_counts_the_dropped_labels(images, yolotrain_log):
    load(images, [0, 2])
    (summary,) = [m for m in yolotrain_log if m.startswith("train: ")]
    assert "train: 2 images, 3 boxes" in summary
    assert summary.endswith("3 labels of other classes dropped (classes=[0, 2])")


def test_a_single_class_id_works_as_well_as_a_list(images):
    assert class_ids(load(images, 2)) == [[2], []]


def test_single_cls_applies_after_the_filter(images):
    assert class_ids(load(images, [2, 3], single_cls=True)) == [[0], [0]]


def test_class_id_not_below_nc_is_a_one_line_error(images):
    with pytest.raises(CfgError) as error:
        load(images, [0, 7])
    message = str(error.value)
    assert "classes=[0, 7]" in message and "class id 7" in message and "nc=4" in message and "\n" not in message


def test_the_filter_works_from_a_data_yaml_split(tiny_data):
    data = check_det_dataset(tiny_data)  # rows of classes 0 and 2
    dataset = YOLODataset(data["train"], imgsz=32, classes=[2], data=data, workers=0)
    assert {c for ids in class_ids(dataset) for c in ids} == {2}
