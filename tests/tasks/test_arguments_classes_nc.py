"""classes= naming a class the model does not have: a one-line error before any image is run, in val and predict."""

import numpy as np
import pytest

from yolotrain.cfg import check_class_ids
from yolotrain.errors import CfgError
from yolotrain.nn.model import DetectionModel
from yolotrain.tasks.detect.predict import DetectionPredictor
from yolotrain.tasks.detect.val import DetectionValidator


@pytest.fixture
def two_class_model(tiny_model_yaml):
    return DetectionModel(tiny_model_yaml, nc=2, verbose=False)


def test_check_class_ids():
    check_class_ids(None, 2)
    check_class_ids([0, 1], 2)
    with pytest.raises(CfgError) as info:
        check_class_ids([0, 3], 2, "the model")
    assert str(info.value) == "classes=[0, 3] is invalid: class id 3 is not below nc=2 of the model (class ids 0 to 1)"


def test_val_with_a_class_the_model_lacks(two_class_model, make_dataset, tmp_path):
    # The dataset has 3 classes, so the label filter accepts classes=2; the 2-class model cannot predict it.
    data = make_dataset(tmp_path / "data", [("a", 64, 64, [(2, 8, 8, 40, 40)])], names=("c0", "c1", "c2"))
    validator = DetectionValidator(args={"data": str(data), "imgsz": 64, "classes": [2], "workers": 0,
                                         "device": "cpu", "plots": False, "project": str(tmp_path), "mode": "val"})
    with pytest.raises(CfgError) as info:
        validator(model=two_class_model)
    assert str(info.value) == "classes=[2] is invalid: class id 2 is not below nc=2 of the model (class ids 0 to 1)"
    assert validator.seen == 0  # refused before any batch ran


def test_predict_with_a_class_the_model_lacks(two_class_model, tmp_path):
    predictor = DetectionPredictor({"classes": 5, "imgsz": 64, "device": "cpu", "save": False})
    with pytest.raises(CfgError, match=r"^classes=5 is invalid: class id 5 is not below nc=2 of the model"):
        predictor(np.zeros((64, 64, 3), np.uint8), two_class_model)
