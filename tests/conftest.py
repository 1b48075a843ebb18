"""Shared fixtures: a tiny detector yaml and a tiny generated dataset, both made on the fly."""

import logging
import os

import pytest
import torch
import yaml

# Tests share 2 cores with each other's worker processes: one thread each keeps timings predictable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_MODEL = {
    "nc": 6,
    "scales": {"t": [0.33, 0.0625, 256]},
    "backbone": [
        [-1, 1, "Conv", [64, 3, 2]],
        [-1, 1, "Conv", [128, 3, 2]],
        [-1, 1, "C2f", [128, True]],
        [-1, 1, "Conv", [256, 3, 2]],
        [-1, 1, "C2f", [256, True]],
        [-1, 1, "Conv", [512, 3, 2]],
        [-1, 1, "C2f", [512, True]],
        [-1, 1, "Conv", [1024, 3, 2]],
        [-1, 1, "C2f", [1024, True]],
        [-1, 1, "SPPF", [1024, 5]],
    ],
    "head": [
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 6], 1, "Concat", [1]],
        [-1, 1, "C2f", [512]],
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 4], 1, "Concat", [1]],
        [-1, 1, "C2f", [256]],
        [-1, 1, "Conv", [256, 3, 2]],
        [[-1, 12], 1, "Concat", [1]],
        [-1, 1, "C2f", [512]],
        [-1, 1, "Conv", [512, 3, 2]],
        [[-1, 9], 1, "Concat", [1]],
        [-1, 1, "C2f", [1024]],
        [[15, 18, 21], 1, "Detect", ["nc"]],
    ],
}


@pytest.fixture(autouse=True)
def _restore_yolotrain_logger():
    """Entry points configure the yolotrain logger (level, handler); keep that from leaking between tests."""
    logger = logging.getLogger("yolotrain")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def yolotrain_log():
    """The messages of the `yolotrain` logger tree at INFO, whatever handlers/propagation another test set up."""
    logger = logging.getLogger("yolotrain")
    handler, level = ListHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="session")
def tiny_model_yaml(tmp_path_factory):
    """Path to a YOLOv8-layout yaml with 1/16 width: same layer indices as yolo-n, a few thousand parameters."""
    path = tmp_path_factory.mktemp("models") / "tiny-t.yaml"
    path.write_text(yaml.safe_dump(TINY_MODEL, sort_keys=False))
    return str(path)


@pytest.fixture(scope="session")
def tiny_family_yaml(tmp_path_factory):
    """`tiny_family_yaml("yolo26")`: the built-in family's layers at 1/16 width (scale `t`), as a yaml path."""
    from yolotrain.nn.model import MODELS_DIR

    folder = tmp_path_factory.mktemp("family-models")

    def make(family):
        model = yaml.safe_load((MODELS_DIR / f"{family}.yaml").read_text())
        model.update(nc=6, scales={"t": [0.5, 0.0625, 256]})
        path = folder / f"tiny{family}-t.yaml"
        path.write_text(yaml.safe_dump(model, sort_keys=False))
        return str(path)

    return make


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A generated shapes dataset: 16 train and 8 val images of at most 64 px."""
    from yolotrain.data.builtin import generate_shapes_dataset

    return str(generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=16, n_val=8, imgsz=64, seed=3))


@pytest.fixture
def train_overrides(tiny_model_yaml, tiny_data, tmp_path):
    """Arguments for a fast, deterministic CPU training run in tmp_path."""
    return dict(
        model=tiny_model_yaml,
        data=tiny_data,
        epochs=2,
        imgsz=64,
        batch=4,
        workers=0,
        device="cpu",
        project=str(tmp_path / "runs"),
        name="train",
        plots=False,
        seed=0,
        deterministic=True,
        warmup_epochs=0.5,
        close_mosaic=0,
        verbose=False,
    )
