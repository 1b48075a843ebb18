"""fraction: a share in (0, 1] or an image count keeps the first images of the sorted list, the same every time."""

from pathlib import Path

import pytest

from yolotrain.data.dataset import YOLODataset, images_kept
from yolotrain.errors import CfgError

NO_LABEL = None


@pytest.fixture
def ten_images(yolo_split):
    """A folder of ten 32-px background images named i0 ... i9, listed in a shuffled order on disk."""
    return yolo_split({f"i{i}": (32, 32, NO_LABEL) for i in (3, 7, 0, 9, 1, 5, 8, 2, 6, 4)})


def kept_names(images, fraction):
    dataset = YOLODataset(str(images), imgsz=32, fraction=fraction, workers=0)
    return [Path(f).stem for f in dataset.im_files]


@pytest.mark.parametrize("fraction, expected", [(0.3, 3), (0.5, 5), (0.01, 1), (1.0, 10), (1, 10), (4, 4), (10, 10)])
def test_share_or_count_of_images_kept(fraction, expected):
    assert images_kept(10, fraction) == expected


def test_count_keeps_that_many_first_images_deterministically(ten_images):
    assert kept_names(ten_images, 3) == ["i0", "i1", "i2"]
    assert kept_names(ten_images, 3) == ["i0", "i1", "i2"]
    assert kept_names(ten_images, 0.5) == ["i0", "i1", "i2", "i3", "i4"]


def test_count_beyond_the_images_keeps_all_with_a_warning(ten_images, yolotrain_log):
    assert len(kept_names(ten_images, 50)) == 10
    assert any("fraction=50" in m and "10" in m for m in yolotrain_log)


@pytest.mark.parametrize("fraction", [0, -3, 1.5, 0.0, True])
def test_anything_else_is_a_one_line_error_naming_the_value(ten_images, fraction):
    with pytest.raises(CfgError) as error:
        kept_names(ten_images, fraction)
    message = str(error.value)
    assert message.startswith("fraction=") and "(0, 1]" in message and "\n" not in message
