import pytest
import torch

from yolotrain.nn.model import DetectionModel


@pytest.fixture(autouse=True)
def _one_thread():
    # The test machine is shared: keep each test on one core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_n():
    torch.manual_seed(0)
    return DetectionModel("yolo-n.yaml", nc=3, verbose=False)
