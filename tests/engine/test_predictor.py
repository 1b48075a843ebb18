"""BasePredictor serves any task: a task supplies `postprocess` and `construct_result`, and the base reads the
sources, letterboxes, batches and times them."""

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from yolotrain.engine.predictor import BasePredictor


class MeanColourModel(nn.Module):
    """A stand-in network of another task: one value per image, the mean of its letterboxed pixels."""

    def __init__(self):
        super().__init__()
        self.stride = torch.tensor([32.0])
        self.names = {0: "anything"}
        self.calls = []

    def forward(self, images):
        self.calls.append(tuple(images.shape))
        return images.mean(dim=(1, 2, 3))


class MeanColourPredictor(BasePredictor):
    def postprocess(self, output):
        return output.tolist()

    def construct_result(self, frame, sample, prediction):
        return SimpleNamespace(path=frame.path, shape=sample["img"].shape, mean=prediction, speed=None)


def test_a_task_predictor_needs_only_its_postprocess_and_result():
    grey, white = np.full((40, 64, 3), 128, np.uint8), np.full((40, 64, 3), 255, np.uint8)
    model = MeanColourModel()
    predictor = MeanColourPredictor({"imgsz": 64, "batch": 2, "device": "cpu", "save": False, "verbose": False})
    results = predictor([grey, white, grey], model)
    assert [r.path for r in results] == ["image0", "image1", "image2"]
    # Letterboxed to 64 x 64 (the stride-32 shape of a 40 x 64 image is 64 x 64), batched two at a time.
    assert all(r.shape == (64, 64, 3) for r in results) and model.calls == [(2, 3, 64, 64), (1, 3, 64, 64)]
    assert results[0].mean == results[2].mean < results[1].mean  # the grey padding lowers only the white image
    assert set(results[0].speed) == {"preprocess", "inference", "postprocess"}  # the base times every stage
