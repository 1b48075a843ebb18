"""Range and item checks of fraction, multi_scale and classes: a bad value is one line naming it, before any work."""

import pytest

from yolotrain.cfg import get_cfg
from yolotrain.cli import main
from yolotrain.errors import CfgError


@pytest.mark.parametrize("value", [0.5, 1.0, 1, 50, 10_000])
def test_fraction_takes_a_share_or_an_image_count(value):
    assert get_cfg({"fraction": value}).fraction == value


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, 1.5, 50.5, True, "half"])
def test_fraction_outside_a_share_or_a_count_is_refused(value):
    with pytest.raises(CfgError) as error:
        get_cfg({"fraction": value})
    message = str(error.value)
    assert message.startswith("'fraction=") and "\n" not in message and "float" in message and "int" in message


@pytest.mark.parametrize("value", [True, False, 0, 0.0, 0.25, 0.9])
def test_multi_scale_takes_a_bool_or_a_share_below_one(value):
    assert get_cfg({"multi_scale": value}).multi_scale == value


@pytest.mark.parametrize("value", [-0.1, 1, 1.0, 1.5, "wide"])
def test_multi_scale_out_of_range_is_refused(value):
    with pytest.raises(CfgError, match=r"^'multi_scale=.*' is invalid: expected bool or float"):
        get_cfg({"multi_scale": value})


@pytest.mark.parametrize("value", [0, 3, [0, 2], [5]])
def test_classes_takes_class_ids_in_training(value):
    assert get_cfg({"mode": "train", "classes": value}).classes == value


@pytest.mark.parametrize("value", [-1, [0, -2], [], ["person"], [0, 1.5]])
def test_classes_must_be_non_negative_int_ids(value):
    with pytest.raises(CfgError, match=r"^'classes=.*' is invalid: expected (a class id \(int >= 0\)|int or list)"):
        get_cfg({"classes": value})


@pytest.mark.parametrize("argument", ["multi_scale=1.5", "fraction=0", "classes=-1"])
def test_command_line_stops_with_one_line_before_training(argument, tmp_path, capsys):
    missing_data = str(tmp_path / "missing.yaml")  # were the check gone, the run would stop there, not train
    assert main(["train", argument, f"data={missing_data}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("yolotrain: error: '") and err.count("\n") == 1 and argument.split("=")[0] in err
