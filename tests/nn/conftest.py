import pytest
import torch

from yolotrain.nn.model import DetectionModel


@pytest.fixture(scope="module")
def model_n():
    torch.manual_seed(0)
    return DetectionModel("yolo-n.yaml", nc=3, verbose=False)
