"""imgsz: a size off the model's stride is rounded up to the next multiple, with one warning naming both sizes; a
size no machine could hold is refused."""

import pytest

from yolotrain.cfg import check_imgsz, get_cfg
from yolotrain.errors import CfgError


@pytest.mark.parametrize("given, used", [(640, 640), (641, 672), (200, 224), (50, 64), (16, 32), (1, 32)])
def test_imgsz_is_rounded_up_to_a_multiple_of_the_stride(given, used):
    assert check_imgsz(given, 32) == used


def test_rounding_warns_in_one_line_naming_the_given_and_the_used_size(yolotrain_log):
    check_imgsz(200, 32)
    (message,) = yolotrain_log
    assert "imgsz=200" in message and "imgsz=224" in message and "stride 32" in message and "\n" not in message


def test_size_on_the_stride_is_used_silently(yolotrain_log):
    assert check_imgsz(640, 32) == 640 and check_imgsz(128, 64) == 128
    assert yolotrain_log == []


def test_an_image_size_no_machine_could_hold_is_a_one_line_error():
    """imgsz=100000 would allocate tens of gigabytes per image inside OpenCV: refused before anything runs."""
    with pytest.raises(CfgError, match=r"'imgsz=100000' is invalid: expected int in \[1, 8192\]"):
        get_cfg({"imgsz": 100000})
    assert get_cfg({"imgsz": 8192}).imgsz == 8192
