"""Arguments: the defaults in default.yaml, merging user layers over them, checks and CLI value parsing.

Every argument a user may set is a key of `default.yaml`, whose line comment starts with the key's type, e.g.
`epochs: 100  # (int) number of epochs`. That file is the single source of truth: the type checks, the
did-you-mean suggestions and `yolotrain help` are all derived from it.

This module must stay light (no torch import): the CLI validates arguments before any heavy import.
"""

import difflib
import functools
import logging
import math
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Optional, Union

import yaml

from yolotrain.data.data_yaml import SPLITS
from yolotrain.errors import CfgError, one_line

LOGGER = logging.getLogger(__name__)

DEFAULT_CFG_PATH = Path(__file__).resolve().parent / "default.yaml"

TASKS = ("detect", "segment", "pose", "obb", "classify")
# The model a run uses when none is named (`model=` empty, `YOLO()`, `yolotrain train`), and per task.
DEFAULT_MODEL = "yolo-n.yaml"
DEFAULT_MODELS = types.MappingProxyType({"detect": DEFAULT_MODEL, "segment": "yolo11n-seg.yaml",
                                         "pose": "yolo11n-pose.yaml", "obb": "yolo11n-obb.yaml",
                                         "classify": "yolo11n-cls.yaml"})
MODES = ("train", "val", "predict", "export")
# Modes of the command line; `convert` and `sync` take positional arguments instead of key=value pairs, `tune` runs
# many `train` runs (its trials) and is no `mode=` of a run.
CLI_MODES = ("train", "val", "predict", "tune", "help", "convert", "sync", "export", "version")
POSITIONAL_CLI_MODES = ("convert", "sync")
OBB_IOU_CHOICES = ("exact", "probiou")  # how validation matches rotated boxes (see yolotrain.tasks.obb.val)
OPTIMIZER_CHOICES = ("SGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSProp", "MuSGD", "auto")
EXPORT_FORMATS = ("onnx", "torchscript", "safetensors")

_TYPE_NAMES = ("int", "float", "bool", "str", "list")
_NONE_WORDS = ("", "none", "null", "~")
_HELP_HINT = "(yolotrain help lists all arguments)"

# A `key: value  # (types) description` line of default.yaml.
_KEY_LINE = re.compile(r"^(?P<key>[A-Za-z_]\w*):[^#]*#\s*\((?P<types>[^)]*)\)\s*(?P<comment>.*)$")

# Strings allowed for str-typed keys with a fixed vocabulary (for `bool | str` keys: the allowed strings).
_STR_CHOICES = types.MappingProxyType(
    {
        "task": TASKS,
        "mode": MODES,
        "optimizer": OPTIMIZER_CHOICES,
        "split": SPLITS,
        "cache": ("ram", "disk"),
        "amp": ("bf16",),
        "augment_device": ("cpu", "device", "auto"),
        "obb_iou": OBB_IOU_CHOICES,
        "format": EXPORT_FORMATS,
        "auto_augment": ("randaugment", "autoaugment", "augmix"),
    }
)
# Keys a Python caller may set to an object instead of a str: `augment=fn` (a callable or an albumentations Compose).
# The trainer keeps such an object out of its saved arguments (see yolotrain.data.augment_hook).
_OBJECT_KEYS = ("augment",)
# str keys for which a number is a natural thing to type (`device=0`, `name=2`): converted to str.
_NUMBER_AS_STR_KEYS = ("device", "name", "project")
# Examples shown in type errors, for keys whose default is empty or would make a poor example.
_EXAMPLES = types.MappingProxyType(
    {
        "model": "yolo-n.yaml",
        "data": "data.yaml",
        "time": "1.5",
        "device": "0",
        "project": "runs/detect",
        "name": "exp",
        "freeze": "10",
        "conf": "0.25",
        "remote": "https://tracker.example.com",
        "classes": "0,2",
        "multi_scale": "0.25",
    }
)


@dataclass(frozen=True)
class Bound:
    """An allowed numeric range; `extra` lists single values allowed outside it (e.g. batch=-1 for auto)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    extra: tuple = ()

    def contains(self, value) -> bool:
        if value in self.extra:
            return True
        # Written as positive comparisons so that NaN is refused.
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.high == math.inf:
            text = f"{'>' if self.low_open else '>='} {_format_number(self.low)}"
        else:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"in {left}{_format_number(self.low)}, {_format_number(self.high)}{right}"
        return text + "".join(f" or {_format_number(v)}" for v in self.extra)


_UNIT = Bound(0.0, 1.0)
_NON_NEGATIVE = Bound(0.0)
_POSITIVE = Bound(0.0, low_open=True)
_AT_LEAST_ONE = Bound(1.0)
_BOUNDS = types.MappingProxyType(
    {
        # Probabilities and fractions.
        **dict.fromkeys(("flipud", "fliplr", "mosaic", "mixup", "copy_paste"), _UNIT),
        **dict.fromkeys(("hsv_h", "hsv_s", "hsv_v", "translate", "label_smoothing"), _UNIT),
        **dict.fromkeys(("iou", "conf", "momentum", "warmup_momentum"), _UNIT),
        "multi_scale": Bound(0.0, 1.0, high_open=True),  # the +/- share of imgsz; 0 is off
        # Counts and sizes.
        **dict.fromkeys(("epochs", "patience", "close_mosaic", "workers", "seed"), _NON_NEGATIVE),
        **dict.fromkeys(("val_period", "max_det", "nbs", "vid_stride", "line_width", "mask_ratio"), _AT_LEAST_ONE),
        "imgsz": Bound(1.0, 8192.0),  # larger is a typo, not a model input: one image would need gigabytes
        "save_period": Bound(1.0, extra=(-1,)),
        "freeze": _NON_NEGATIVE,  # a layer count; a list holds layer indices and name prefixes
        # Rates, gains and durations.
        **dict.fromkeys(("lr0", "time", "dist_timeout"), _POSITIVE),
        **dict.fromkeys(("lrf", "weight_decay", "warmup_epochs", "warmup_bias_lr"), _NON_NEGATIVE),
        **dict.fromkeys(("box", "cls", "dfl", "pose", "kobj", "rle", "angle", "cls_pw", "scale", "perspective"),
                       _NON_NEGATIVE),
        **dict.fromkeys(
            (
                "remote_metrics_period",
                "remote_ckpt_period",
                "remote_heartbeat_period",
                "remote_timeout",
                "remote_final_timeout",
            ),
            _POSITIVE,
        ),
    }
)
# Keys whose range depends on the type of the value: fraction=0.5 is a share of the images, fraction=50 a count.
# batch=16 is a size, batch=-1 or batch=0.7 the share of GPU memory the measured batch may fill (-1: 60%).
_BOUNDS_BY_TYPE = types.MappingProxyType(
    {
        "fraction": types.MappingProxyType({"float": Bound(0.0, 1.0, low_open=True), "int": _AT_LEAST_ONE}),
        "batch": types.MappingProxyType(
            {"int": Bound(1.0, extra=(-1,)), "float": Bound(0.0, 1.0, low_open=True, high_open=True)}
        ),
    }
)


@dataclass(frozen=True)
class ArgSpec:
    """One argument of default.yaml: its default, accepted types (from the `(type)` comment) and help text."""

    name: str
    default: Any
    types: tuple
    comment: str
    section: str

    @property
    def allows_none(self) -> bool:
        """Keys with an empty default may be left empty (None) by the user too."""
        return self.default is None


class Args(types.SimpleNamespace):
    """Resolved arguments: `args.epochs`, `vars(args)` for the dict, `for key, value in args`, `args.get(k)`."""

    def __iter__(self):
        return iter(vars(self).items())

    def get(self, key: str, default: Any = None) -> Any:
        """The value of `key`, or `default` when it is not set."""
        return getattr(self, key, default)


# ----------------------------------------------------------------------------------------------- default.yaml


@functools.lru_cache(maxsize=1)
def _read_arg_specs() -> tuple:
    # Cached as an immutable tuple; callers get fresh containers from the public functions.
    text = DEFAULT_CFG_PATH.read_text(encoding="utf-8")
    defaults = yaml.safe_load(text)
    specs, section, previous_comment = [], "", None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            previous_comment = None
        elif stripped.startswith("#"):
            previous_comment = stripped.lstrip("#").strip()
        else:
            # A comment line directly above a key line titles the group of keys that follows.
            section = previous_comment if previous_comment is not None else section
            previous_comment = None
            specs.append(_parse_key_line(line, defaults, section))
    missing = set(defaults) - {spec.name for spec in specs}
    if missing:
        raise RuntimeError(f"{DEFAULT_CFG_PATH}: keys without a '# (type)' comment: {sorted(missing)}")
    return tuple(specs)


def _parse_key_line(line: str, defaults: dict, section: str) -> ArgSpec:
    match = _KEY_LINE.match(line)
    if match is None:
        raise RuntimeError(f"{DEFAULT_CFG_PATH}: line without a '# (type)' comment: {line!r}")
    type_names = tuple(name.strip() for name in match["types"].split("|"))
    unknown = [name for name in type_names if name not in _TYPE_NAMES]
    if unknown:
        raise RuntimeError(f"{DEFAULT_CFG_PATH}: unknown type {unknown} in line {line!r}")
    key = match["key"]
    return ArgSpec(key, defaults[key], type_names, match["comment"].strip(), section)


def load_arg_specs() -> dict:
    """Every argument of default.yaml as `{key: ArgSpec}`, in file order."""
    return {spec.name: spec for spec in _read_arg_specs()}


def load_default() -> dict:
    """The default value of every argument (a new dict on each call)."""
    return {spec.name: _copy_value(spec.default) for spec in _read_arg_specs()}


def _copy_value(value):
    return list(value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------------------------- get_cfg


def get_cfg(overrides: Optional[dict] = None, cfg: Union[str, Path, dict, None] = None) -> Args:
    """Resolve arguments: defaults, then the yaml file or dict `cfg`, then `overrides`.

    A `cfg` key inside `overrides` names a yaml file applied between `cfg` and the other overrides.
    Raises `CfgError` (one line) for an unknown key, a value of the wrong type or out of range,
    or a cfg file that is missing or not a mapping. Values are kept as given, except that numbers for
    `device`/`name`/`project` and path objects become strings (`device=0` -> "0").
    """
    specs = load_arg_specs()
    values = load_default()
    for layer, source in user_layers(overrides, cfg):
        values.update(check_args(layer, specs, source))
    return Args(**values)


def user_layers(overrides: Optional[dict] = None, cfg: Union[str, Path, dict, None] = None) -> list:
    """The user's layers as `[(dict, source name or None), ...]`, lowest priority first (not yet checked)."""
    overrides = dict(overrides or {})
    override_cfg = overrides.pop("cfg", None)
    layers = []
    if cfg is not None:
        layers.append(_cfg_layer(cfg))
    if override_cfg is not None:
        layers.append(_cfg_layer(override_cfg))
    layers.append((overrides, None))
    return layers


def user_args(overrides: Optional[dict] = None, cfg: Union[str, Path, dict, None] = None) -> dict:
    """Only the arguments the user set (cfg layers merged under overrides), checked, without defaults."""
    specs, merged = load_arg_specs(), {}
    for layer, source in user_layers(overrides, cfg):
        merged.update(check_args(layer, specs, source))
    return merged


def _cfg_layer(cfg) -> tuple:
    if isinstance(cfg, (str, os.PathLike)):
        return load_cfg_file(cfg), f"cfg file '{cfg}'"
    if isinstance(cfg, Args):
        return vars(cfg).copy(), "cfg"
    if isinstance(cfg, dict):
        return dict(cfg), "cfg"
    raise CfgError(f"cfg={cfg!r} is invalid: expected a yaml file path or a dict of arguments")


def load_cfg_file(path: Union[str, Path]) -> dict:
    """Read a yaml file of arguments; raise `CfgError` naming the file if it is missing or not a mapping."""
    return read_yaml_mapping(path, "cfg file", "key: value arguments")


def read_yaml_mapping(path: Union[str, Path], kind: str, expected: str) -> dict:
    """Read a yaml file that holds a mapping (an empty file is an empty one); raise a one-line `CfgError` naming
    the `kind` of file, its path and the `expected` content when it is missing, unreadable or not a mapping."""
    path = Path(path)
    if not path.is_file():
        reason = "is a folder" if path.is_dir() else "does not exist"
        raise CfgError(f"{kind} '{path}' {reason}: expected a yaml file of {expected}")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise CfgError(f"{kind} '{path}' is not valid yaml: {one_line(error)}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CfgError(f"{kind} '{path}' cannot be read: {one_line(error)}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise CfgError(f"{kind} '{path}' must be a mapping of {expected}, got a {type(content).__name__}")
    return content



def check_args(layer: dict, specs: Optional[dict] = None, source: Optional[str] = None) -> dict:
    """Check the keys and values of one layer of arguments; return it with values normalised."""
    specs = specs if specs is not None else load_arg_specs()
    prefix = f"{source}: " if source else ""
    _check_keys(layer, specs, prefix)
    return {key: _checked_value(specs[key], value, prefix) for key, value in layer.items()}


def _check_keys(layer: dict, specs: dict, prefix: str) -> None:
    for key in layer:
        if not isinstance(key, str):
            raise CfgError(f"{prefix}argument names must be strings, got {key!r}")
        if key == "cfg":
            raise CfgError(f"{prefix}'cfg' cannot be set inside a cfg file or dict")
    unknown = [key for key in layer if key not in specs]
    if unknown:
        raise CfgError(prefix + "; ".join(_unknown_key_message(key, specs) for key in unknown))


def _unknown_key_message(key: str, specs: dict) -> str:
    message = f"'{key}' is not a valid yolotrain argument"
    suggestion = did_you_mean(key, specs)
    if suggestion:
        message += f", did you mean '{suggestion}'?"
    return f"{message} {_HELP_HINT}"


def did_you_mean(word: str, candidates) -> Optional[str]:
    """The closest candidate to `word` (case-insensitive), or None when nothing is close."""
    by_lower = {str(candidate).lower(): str(candidate) for candidate in candidates}
    matches = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[matches[0]] if matches else None


# ----------------------------------------------------------------------------------------------- value checks


def _checked_value(spec: ArgSpec, value, prefix: str):
    if value is None:
        if spec.allows_none:
            return None
        raise _value_error(spec, value, prefix)
    if spec.name in _OBJECT_KEYS and callable(value):
        return value
    value = _normalised(spec, value)
    for type_name in spec.types:
        if _matches_type(type_name, value):
            _check_choice(spec, value, prefix)
            _check_bound(spec, value, prefix)
            if spec.name == "classes":
                _check_class_ids(spec, value, prefix)
            if spec.name == "name" and value:
                _check_run_name(spec, value, prefix)
            return value
    raise _value_error(spec, value, prefix)


def _normalised(spec: ArgSpec, value):
    # Path objects become strings so that args stay plain yaml-serialisable types.
    if isinstance(value, os.PathLike) and "str" in spec.types:
        return os.fspath(value)
    if spec.name in _NUMBER_AS_STR_KEYS and _is_number(value):
        return str(value)
    if spec.name == "device" and isinstance(value, (list, tuple)) and all(_is_int(v) for v in value):
        return ",".join(str(v) for v in value)  # device=[0, 1] -> "0,1"
    if spec.name == "freeze" and isinstance(value, str):
        return [value]  # freeze=model.23.cv2: one name prefix
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _matches_type(type_name: str, value) -> bool:
    if type_name == "int":
        return _is_int(value)
    if type_name == "float":
        return _is_number(value) and math.isfinite(value)
    if type_name == "bool":
        return isinstance(value, bool)
    if type_name == "str":
        return isinstance(value, str)
    # Lists hold layer indices or names (freeze=[0, 1] or freeze=["model.0"]).
    return isinstance(value, (list, tuple)) and all(_is_int(v) or isinstance(v, str) for v in value)


def _check_choice(spec: ArgSpec, value, prefix: str) -> None:
    choices = _STR_CHOICES.get(spec.name)
    if choices is None or not isinstance(value, str) or value in choices:
        return
    expected = _describe_expected(spec)
    message = f"{prefix}'{spec.name}={value}' is invalid: expected {expected}"
    suggestion = did_you_mean(value, choices)
    raise CfgError(message + (f", did you mean '{suggestion}'?" if suggestion else ""))


def _check_bound(spec: ArgSpec, value, prefix: str) -> None:
    if not _is_number(value):
        return
    bound = _bound_of(spec.name, value)
    if bound is None or bound.contains(value):
        return
    raise CfgError(
        f"{prefix}'{spec.name}={format_value(value)}' is invalid: expected {_describe_bounds(spec)}{_example(spec)}"
    )


def _bound_of(name: str, value) -> Optional[Bound]:
    by_type = _BOUNDS_BY_TYPE.get(name)
    if by_type is not None:
        return by_type["int" if _is_int(value) else "float"]
    return _BOUNDS.get(name)


def _describe_bounds(spec: ArgSpec) -> str:
    """Each accepted type with its range: 'int >= 1 or -1', 'float in (0, 1] or int >= 1', 'bool or float ...'."""
    by_type = _BOUNDS_BY_TYPE.get(spec.name, {})
    parts = []
    for type_name in spec.types:
        bound = by_type.get(type_name) or (_BOUNDS.get(spec.name) if type_name in ("int", "float") else None)
        parts.append(f"{type_name} {bound.describe()}" if bound else type_name)
    return " or ".join(parts)


def _check_class_ids(spec: ArgSpec, value, prefix: str) -> None:
    # Class ids only: a list may hold names for other keys (freeze), and an empty list would keep no class.
    ids = value if isinstance(value, (list, tuple)) else [value]
    if ids and all(_is_int(v) and v >= 0 for v in ids):
        return
    raise CfgError(
        f"{prefix}'{spec.name}={format_value(value)}' is invalid: expected a class id (int >= 0) or a non-empty "
        f"list of them{_example(spec)}"
    )


def _check_run_name(spec: ArgSpec, value, prefix: str) -> None:
    """A run folder name stays inside `project`: a relative path without '..' (`exp/a` is fine)."""
    path = PurePath(str(value))
    if path.is_absolute() or ".." in path.parts or str(value).startswith("~"):
        raise CfgError(f"{prefix}'{spec.name}={format_value(value)}' is invalid: expected a run folder name inside "
                       f"project (no absolute path, no '..'); choose where runs go with project=")


def _value_error(spec: ArgSpec, value, prefix: str) -> CfgError:
    expected = _describe_expected(spec)
    if _is_number(value) and not math.isfinite(value):
        expected = f"a finite {expected}"
    return CfgError(f"{prefix}'{spec.name}={format_value(value)}' is invalid: expected {expected}{_example(spec)}")


def _describe_expected(spec: ArgSpec) -> str:
    choices = _STR_CHOICES.get(spec.name)
    parts = []
    for type_name in spec.types:
        if type_name == "str" and choices:
            parts.append(f"one of {', '.join(choices)}" if len(choices) > 1 else choices[0])
        elif type_name == "bool" and len(spec.types) == 1:
            parts.append("bool (true or false)")
        else:
            parts.append(type_name)
    expected = " or ".join(parts)
    if spec.allows_none:
        expected += " (or empty)"
    return expected


def _example(spec: ArgSpec) -> str:
    example = _EXAMPLES.get(spec.name) or (format_value(spec.default) if spec.default is not None else None)
    return f", e.g. {spec.name}={example}" if example else ""


def format_value(value) -> str:
    """A value written the way a user types it on the command line (true, none, [1, 2])."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def _format_number(value) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# ----------------------------------------------------------------------------------------------- derived values


def check_imgsz(imgsz: int, stride: int) -> int:
    """`imgsz` rounded up to a multiple of the model's largest `stride` (at least one stride).

    The network concatenates feature maps of its stride levels, which line up only on stride multiples: any other
    size fails inside the model. Warns in one line, naming both sizes, when it has to round.
    """
    stride = int(stride)
    used = max(math.ceil(int(imgsz) / stride), 1) * stride
    if used != imgsz:
        LOGGER.warning(f"imgsz={imgsz} is not a multiple of the model's stride {stride}: using imgsz={used}")
    return used


def check_class_ids(classes, nc, owner: str = "the model") -> None:
    """Raise `CfgError` naming the first id of `classes` (an id or a list; None keeps all) that `owner`, with `nc`
    classes, does not have: a filter on a class that cannot be predicted is a mistake, not an empty result."""
    if classes is None or nc is None:
        return
    for class_id in classes if isinstance(classes, (list, tuple)) else [classes]:
        if not 0 <= int(class_id) < int(nc):
            raise CfgError(
                f"classes={format_value(classes)} is invalid: class id {class_id} is not below nc={int(nc)} of "
                f"{owner} (class ids 0 to {int(nc) - 1})"
            )


# ----------------------------------------------------------------------------------------------- command line


def parse_cli_value(text: str, key: Optional[str] = None) -> Any:
    """Turn one command-line value into a Python value: "3" -> 3, "0.5" -> 0.5, "true" -> True,
    "none"/"" -> None, "[1,2]" or "1,2" -> [1, 2]; anything else stays a string.

    With `key` naming a text-only argument (device, name, data, ...) the text is kept as typed, so that
    `device=0,1` stays "0,1".
    """
    if key is not None and _is_text_only(key):
        return None if text.strip().lower() in _NONE_WORDS else text
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        return _parse_bracket_list(stripped)
    if "," in stripped:
        return [_parse_scalar(part.strip()) for part in stripped.split(",") if part.strip()]
    return _parse_scalar(stripped)


def _is_text_only(key: str) -> bool:
    if key == "cfg":
        return True
    spec = load_arg_specs().get(key)
    return spec is not None and spec.types == ("str",)


def _parse_bracket_list(text: str) -> Any:
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if not isinstance(parsed, list):
        return text
    # yaml reads "1e-3" as a string and "yes" as a bool; re-read string items our way.
    return [_parse_scalar(item) if isinstance(item, str) else item for item in parsed]


def _parse_scalar(text: str) -> Any:
    # Parsed by hand rather than with yaml: yaml 1.1 reads "1e-3" as a string and "on"/"yes" as booleans.
    lower = text.lower()
    if lower in _NONE_WORDS:
        return None
    if lower in ("true", "false"):
        return lower == "true"
    for number_type in (int, float):
        try:
            return number_type(text)
        except ValueError:
            pass
    return text


def parse_cli_args(argv: list) -> tuple:
    """Split `["train", "data=x.yaml", "epochs=3"]` into `("train", {"data": "x.yaml", "epochs": 3})`.

    The mode may appear anywhere; `mode=val` works too. Returns `(None, overrides)` when no mode is given.
    A task name may come as a bare word too (`yolotrain detect train ...`), the same as `task=detect`.
    A bare word that is neither a mode, a task nor `key=value` raises `CfgError` with a suggestion.
    """
    mode, overrides, task = None, {}, None
    for token in argv:
        if "=" in token and not token.startswith("-"):
            key, value = _split_key_value(token)
            overrides[key] = parse_cli_value(value, key)
        elif token in TASKS:
            if task is not None and token != task:
                raise CfgError(f"two tasks given, '{task}' and '{token}': give one of {', '.join(TASKS)}")
            task = token
        else:
            word = _cli_word(token)
            if mode is not None and word != mode:
                raise CfgError(f"two modes given, '{mode}' and '{word}': give one of {', '.join(CLI_MODES)}")
            mode = word
    if task is not None:
        if overrides.get("task", task) != task:
            raise CfgError(f"task '{task}' and task={overrides['task']} disagree: give the task once")
        overrides["task"] = task
    return _resolve_mode(mode, overrides), overrides


def _split_key_value(token: str) -> tuple:
    key, value = token.split("=", 1)
    key = key.strip()
    if not key:
        raise CfgError(f"'{token}' has no argument name: write key=value, e.g. epochs=100")
    return key, value


def _cli_word(token: str) -> str:
    if token in ("-h", "--help"):
        return "help"
    if token in ("-V", "--version"):
        return "version"
    if token.startswith("-"):
        raise CfgError(f"'{token}' is invalid: arguments are written key=value without dashes, e.g. epochs=100")
    if token in POSITIONAL_CLI_MODES:
        raise CfgError(f"'{token}' must be the first argument, e.g. yolotrain {token} ...")
    if token in CLI_MODES:
        return token
    raise CfgError(_bare_word_message(token))


def _bare_word_message(word: str) -> str:
    specs = load_arg_specs()
    if word in specs:
        return f"'{word}' has no value: write {word}=VALUE{_example(specs[word])}"
    message = f"'{word}' is not a valid mode, task or key=value argument"
    suggestion = did_you_mean(word, CLI_MODES) or did_you_mean(word, specs)
    if suggestion:
        message += f", did you mean '{suggestion}'?"
    return f"{message} (modes: {', '.join(CLI_MODES)})"


def _resolve_mode(mode: Optional[str], overrides: dict) -> Optional[str]:
    mode_argument = overrides.get("mode")
    if mode is None:
        return mode_argument if isinstance(mode_argument, str) else None
    if mode_argument is not None and mode_argument != mode and mode in MODES:
        raise CfgError(f"mode '{mode}' and mode={mode_argument} disagree: give the mode once")
    return mode
