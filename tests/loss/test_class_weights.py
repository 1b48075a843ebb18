"""class_weights_from_labels: inverse-frequency weights on small hand cases."""

import numpy as np
import pytest
import torch

from yolotrain.errors import DatasetError
from yolotrain.loss.detection import class_weights_from_labels


def test_inverse_frequency_with_a_missing_class_counted_once():
    labels = np.array([[0], [0], [0], [1]], dtype=np.float32)  # counts 3, 1 and 0 (treated as 1)
    raw = np.array([1 / 3, 1.0, 1.0])
    expected = raw / raw.mean()  # = 3/7, 9/7, 9/7
    weights = class_weights_from_labels(labels, nc=3, power=1.0)
    assert weights.dtype == torch.float32 and weights.shape == (3,)
    assert np.allclose(weights.numpy(), expected)
    assert np.allclose(weights.numpy(), [3 / 7, 9 / 7, 9 / 7])
    assert weights.mean().item() == pytest.approx(1.0)


def test_power_softens_or_disables_the_weighting():
    labels = np.array([0, 0, 0, 0, 1])
    assert torch.allclose(class_weights_from_labels(labels, nc=2, power=0.0), torch.ones(2))
    half = class_weights_from_labels(labels, nc=2, power=0.5).numpy()
    raw = np.array([1 / 2, 1.0])  # (1/4) ** 0.5 and (1/1) ** 0.5
    assert np.allclose(half, raw / raw.mean())


def test_class_ids_at_or_above_nc_are_rejected():
    with pytest.raises(DatasetError, match="nc=2"):
        class_weights_from_labels(np.array([0, 2]), nc=2, power=1.0)
