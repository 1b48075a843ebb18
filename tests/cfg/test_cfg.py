"""Arguments: default.yaml parsing, merge order, type and range checks, CLI value parsing."""

from pathlib import Path

import pytest
import yaml

from yolotrain.cfg import (
    DEFAULT_CFG_PATH,
    Args,
    get_cfg,
    load_arg_specs,
    load_default,
    parse_cli_args,
    parse_cli_value,
    user_args,
)
from yolotrain.errors import CfgError


def write_yaml(path: Path, content) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


# ----------------------------------------------------------------------------------------------- defaults


def test_load_default_matches_default_yaml():
    assert load_default() == yaml.safe_load(DEFAULT_CFG_PATH.read_text())


def test_load_default_returns_a_new_dict_each_call():
    first = load_default()
    first["epochs"] = -5
    assert load_default()["epochs"] == 100


def test_types_and_sections_come_from_the_comments():
    specs = load_arg_specs()
    assert specs["epochs"].types == ("int",)
    assert specs["lr0"].types == ("float",)
    assert specs["cache"].types == ("bool", "str")
    assert specs["freeze"].types == ("int", "list")
    assert specs["lr0"].section == "Hyperparameters"
    assert specs["task"].section == "Task and mode"
    assert specs["epochs"].comment == "number of epochs to train for"
    assert list(specs) == list(load_default())


def test_every_default_passes_its_own_checks():
    assert vars(get_cfg()) == load_default()


# ----------------------------------------------------------------------------------------------- Args


def test_args_attribute_access_iteration_and_get():
    args = get_cfg({"epochs": 3})
    assert args.epochs == 3
    assert dict(args) == vars(args)
    assert ("epochs", 3) in list(args)
    assert args.get("epochs") == 3
    assert args.get("not_a_key", "fallback") == "fallback"
    assert isinstance(args, Args)


# ----------------------------------------------------------------------------------------------- merge order


def test_merge_order_default_then_cfg_then_overrides(tmp_path):
    cfg_file = write_yaml(tmp_path / "my.yaml", {"epochs": 7, "batch": 4})
    args = get_cfg({"batch": 2}, cfg=cfg_file)
    assert args.epochs == 7  # from the cfg file
    assert args.batch == 2  # overrides win over the cfg file
    assert args.imgsz == 640  # default untouched


def test_cfg_dict_layer_and_cfg_key_in_overrides(tmp_path):
    cfg_file = write_yaml(tmp_path / "over.yaml", {"epochs": 9, "lr0": 0.02})
    args = get_cfg({"cfg": str(cfg_file), "lr0": 0.03}, cfg={"epochs": 5, "patience": 4})
    assert args.patience == 4  # from the cfg dict
    assert args.epochs == 9  # the overrides' cfg file is above the cfg argument
    assert args.lr0 == 0.03  # explicit overrides on top
    assert "cfg" not in vars(args)


def test_user_args_holds_only_what_the_user_set(tmp_path):
    cfg_file = write_yaml(tmp_path / "my.yaml", {"epochs": 7})
    assert user_args({"cfg": cfg_file, "batch": 2}) == {"epochs": 7, "batch": 2}


def test_values_kept_as_given_except_documented_conversions():
    args = get_cfg({"lr0": 1, "device": 0, "name": 3, "project": Path("runs/x"), "freeze": [0, "model.1"]})
    assert args.lr0 == 1 and isinstance(args.lr0, int)  # an int is a valid float, not rewritten
    assert args.device == "0"
    assert args.name == "3"
    assert args.project == str(Path("runs/x"))
    assert args.freeze == [0, "model.1"]
    assert args.conf is None  # no derived value filled in


def test_device_list_becomes_comma_string():
    assert get_cfg({"device": [0, 1]}).device == "0,1"


@pytest.mark.parametrize(
    "key, value",
    [
        ("cache", "ram"),
        ("cache", "disk"),
        ("cache", True),
        ("amp", "bf16"),
        ("amp", False),
        ("resume", "runs/detect/train/weights/last.pt"),
        ("pretrained", False),
        ("freeze", 10),
        ("time", None),
        ("batch", -1),
        ("mode", "val"),
        ("optimizer", "AdamW"),
    ],
)
def test_accepted_values(key, value):
    assert getattr(get_cfg({key: value}), key) == value


# ----------------------------------------------------------------------------------------------- errors


def test_unknown_key_suggests_the_closest_one():
    with pytest.raises(CfgError) as info:
        get_cfg({"epoch": 3})
    message = str(info.value)
    assert message == (
        "'epoch' is not a valid yolotrain argument, did you mean 'epochs'? (yolotrain help lists all arguments)"
    )


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(CfgError) as info:
        get_cfg({"zzzzqqq": 1})
    assert "did you mean" not in str(info.value)
    assert "'zzzzqqq' is not a valid yolotrain argument" in str(info.value)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("epochs", "abc", "'epochs=abc' is invalid: expected int, e.g. epochs=100"),
        ("epochs", 3.5, "'epochs=3.5' is invalid: expected int, e.g. epochs=100"),
        ("epochs", "3", "'epochs=3' is invalid: expected int, e.g. epochs=100"),
        ("epochs", True, "'epochs=true' is invalid: expected int, e.g. epochs=100"),
        ("lr0", "fast", "'lr0=fast' is invalid: expected float, e.g. lr0=0.01"),
        ("save", 1, "'save=1' is invalid: expected bool (true or false), e.g. save=true"),
        ("save", "yes", "'save=yes' is invalid: expected bool (true or false), e.g. save=true"),
        ("data", 5, "'data=5' is invalid: expected str (or empty), e.g. data=data.yaml"),
        ("epochs", None, "'epochs=none' is invalid: expected int, e.g. epochs=100"),
        ("freeze", 1.5, "'freeze=1.5' is invalid: expected int or list (or empty), e.g. freeze=10"),
    ],
)
def test_wrong_type_names_key_value_and_expected_type(key, value, expected):
    with pytest.raises(CfgError) as info:
        get_cfg({key: value})
    assert str(info.value) == expected


@pytest.mark.parametrize(
    "key, value, expected_range",
    [
        ("fliplr", 1.5, "in [0, 1]"),
        ("mosaic", -0.1, "in [0, 1]"),
        ("fraction", 0.0, "in (0, 1]"),
        ("epochs", -1, ">= 0"),
        ("batch", 0, ">= 1 or -1"),
        ("imgsz", 0, "in [1, 8192]"),
    ],
)
def test_out_of_range_values(key, value, expected_range):
    with pytest.raises(CfgError) as info:
        get_cfg({key: value})
    message = str(info.value)
    assert message.startswith(f"'{key}={value}' is invalid: expected")
    assert expected_range in message


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("task", "depth", "expected one of detect, segment, pose, obb, classify"),
        ("mode", "track", "expected one of train, val, predict, export"),
        ("cache", "memory", "expected bool or one of ram, disk"),
        ("amp", "fp16", "did you mean 'bf16'?"),
        ("optimizer", "adamw", "did you mean 'AdamW'?"),
    ],
)
def test_values_outside_a_fixed_vocabulary(key, value, fragment):
    with pytest.raises(CfgError) as info:
        get_cfg({key: value})
    assert f"'{key}={value}' is invalid" in str(info.value)
    assert fragment in str(info.value)


def test_non_finite_float_is_refused():
    with pytest.raises(CfgError, match="finite"):
        get_cfg({"lr0": float("nan")})


def test_missing_cfg_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(CfgError) as info:
        get_cfg(cfg=missing)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_cfg_file_that_is_not_a_mapping(tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(CfgError) as info:
        get_cfg({"cfg": str(listing)})
    assert str(listing) in str(info.value) and "mapping" in str(info.value)


def test_cfg_file_with_invalid_yaml_is_one_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1, 2\nbatch: 3\n")
    with pytest.raises(CfgError) as info:
        get_cfg(cfg=broken)
    assert str(broken) in str(info.value) and "\n" not in str(info.value)


def test_error_inside_cfg_file_names_the_file(tmp_path):
    cfg_file = write_yaml(tmp_path / "bad.yaml", {"epochs": "many"})
    with pytest.raises(CfgError) as info:
        get_cfg(cfg=cfg_file)
    assert str(info.value) == f"cfg file '{cfg_file}': 'epochs=many' is invalid: expected int, e.g. epochs=100"


# ----------------------------------------------------------------------------------------------- CLI values


@pytest.mark.parametrize(
    "text, value",
    [
        ("3", 3),
        ("-1", -1),
        ("0.5", 0.5),
        ("1e-3", 0.001),
        ("true", True),
        ("True", True),
        ("false", False),
        ("none", None),
        ("None", None),
        ("null", None),
        ("", None),
        ("[1,2]", [1, 2]),
        ("[model.0, 1e-3]", ["model.0", 0.001]),
        ("1,2", [1, 2]),
        ("yes", "yes"),  # not a yaml 1.1 boolean here
        ("data.yaml", "data.yaml"),
    ],
)
def test_parse_cli_value(text, value):
    assert parse_cli_value(text) == value
    assert type(parse_cli_value(text)) is type(value)


def test_parse_cli_value_keeps_text_for_text_only_keys():
    assert parse_cli_value("0,1", "device") == "0,1"
    assert parse_cli_value("0", "device") == "0"
    assert parse_cli_value("none", "device") is None


def test_parse_cli_args_mode_anywhere_and_values_parsed():
    mode, overrides = parse_cli_args(["data=x.yaml", "train", "epochs=3", "device=0,1", "freeze=0,1"])
    assert mode == "train"
    assert overrides == {"data": "x.yaml", "epochs": 3, "device": "0,1", "freeze": [0, 1]}


def test_parse_cli_args_takes_a_task_before_the_mode_as_task_equals():
    assert parse_cli_args(["detect", "train", "epochs=3"]) == ("train", {"epochs": 3, "task": "detect"})
    assert parse_cli_args(["detect", "val", "task=detect"]) == ("val", {"task": "detect"})
    with pytest.raises(CfgError, match="task 'detect' and task=segment disagree"):
        parse_cli_args(["detect", "train", "task=segment"])


def test_parse_cli_args_mode_from_key_and_none_without_mode():
    assert parse_cli_args(["mode=val"])[0] == "val"
    assert parse_cli_args(["epochs=3"]) == (None, {"epochs": 3})


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["trian"], "did you mean 'train'?"),
        (["train", "epochs"], "'epochs' has no value"),
        (["train", "--epochs=3"], "without dashes"),
        (["train", "val"], "two modes"),
        (["val", "mode=train"], "disagree"),
        (["train", "=3"], "no argument name"),
    ],
)
def test_parse_cli_args_errors(argv, fragment):
    with pytest.raises(CfgError) as info:
        parse_cli_args(argv)
    assert fragment in str(info.value)


@pytest.mark.parametrize("name", ["../x", "/tmp/x", "exp/../../x", "~/x"])
def test_a_run_name_that_leaves_project_is_a_one_line_error(name):
    with pytest.raises(CfgError, match=r"expected a run folder name inside project \(no absolute path, no '\.\.'\)"):
        get_cfg({"name": name})
    assert get_cfg({"name": "exp/a"}).name == "exp/a"  # a nested folder inside project is fine
