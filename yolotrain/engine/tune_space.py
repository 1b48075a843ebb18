"""The search space of `yolotrain tune`: which arguments a tuning varies, over which ranges or choices.

A space is a yaml mapping of argument names to one of
    `[low, high]`        a uniform range (ints when both ends are ints and the argument takes ints only),
    `[low, high, log]`   a log-uniform range (low > 0),
    `[a, b, c, ...]`     choices (any other list: three or more values, or values that are not numbers).
Every key must be an argument of default.yaml and every end or choice a value that argument accepts, so a trial
never starts with a value training would refuse. The default space ships as `cfg/tune_space.yaml`.

This module stays light (no torch, no optuna): the CLI checks a space before anything heavy is imported.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from yolotrain.cfg import check_args, did_you_mean, format_value, load_arg_specs, read_yaml_mapping, user_args
from yolotrain.errors import CfgError, one_line

DEFAULT_SPACE_PATH = Path(__file__).resolve().parent.parent / "cfg" / "tune_space.yaml"
# Arguments of tuning itself, not of its trials: (name, default, help) as `yolotrain help` shows them.
TUNE_ARGS = (
    ("iterations", 100, "(int) number of trials; a resumed tuning runs only the ones still missing"),
    ("space", None, "(str) yaml of key: [low, high] / [low, high, log] / [choices]; default cfg/tune_space.yaml"),
    ("backend", "optuna", "(str) optuna (in this process, study in study.db) or ray (Ray Tune)"),
    ("ray_address", None, "(str) Ray cluster address for backend=ray; empty starts a local Ray"),
)
BACKENDS = ("optuna", "ray")
_EXPECTED = "expected [low, high], [low, high, log] or a list of choices"


def split_tune_args(overrides: dict) -> tuple:
    """`(tune settings, training overrides)` from one dict of arguments; both checked (one-line `CfgError`)."""
    overrides = dict(overrides)
    settings = {name: overrides.pop(name) for name, _, _ in TUNE_ARGS if name in overrides}
    settings["given"] = tuple(settings)
    settings.update({name: default for name, default, _ in TUNE_ARGS if name not in settings})
    iterations = settings["iterations"]
    if not (isinstance(iterations, int) and not isinstance(iterations, bool) and iterations >= 1):
        raise CfgError(f"'iterations={format_value(iterations)}' is invalid: expected int >= 1, e.g. iterations=100")
    if settings["backend"] not in BACKENDS:
        raise CfgError(f"'backend={format_value(settings['backend'])}' is invalid: expected one of optuna, ray")
    if settings["space"] is not None and not isinstance(settings["space"], (str, Path, dict)):
        raise CfgError(f"'space={format_value(settings['space'])}' is invalid: expected a yaml file path")
    if settings["ray_address"] is not None and not isinstance(settings["ray_address"], str):
        raise CfgError(f"'ray_address={format_value(settings['ray_address'])}' is invalid: expected an address")
    given = user_args(overrides)
    given.pop("mode", None)
    return settings, given


@dataclass(frozen=True)
class Dimension:
    """One tuned argument: a range (`low`, `high`, `log`, `integer`) or, when `choices` is set, a list of values."""

    name: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    integer: bool = False
    choices: Optional[tuple] = None

    def describe(self) -> str:
        if self.choices is not None:
            return format_value(list(self.choices))
        return f"[{self.low}, {self.high}{', log' if self.log else ''}]"


def load_space(space: Union[str, os.PathLike, dict, None] = None) -> dict:
    """`{name: Dimension}` from a yaml file path or a dict (None: the default space); one-line `CfgError` naming
    the file and key for an unknown argument, a bad range or a value the argument does not accept."""
    source = "the default space" if space is None else "space" if isinstance(space, dict) else f"space file '{space}'"
    mapping = _read_space(DEFAULT_SPACE_PATH if space is None else space)
    if not mapping:
        raise CfgError(f"{source} is empty: give at least one argument to tune, e.g. lr0: [0.001, 0.1]")
    specs = load_arg_specs()
    return {str(key): _dimension(key, value, specs, source) for key, value in mapping.items()}


def _read_space(space) -> dict:
    if isinstance(space, dict):
        return dict(space)
    return read_yaml_mapping(space, "space file", "key: [low, high] ranges")


def _dimension(key, value, specs: dict, source: str) -> Dimension:
    if not isinstance(key, str) or key not in specs:
        suggestion = did_you_mean(str(key), specs)
        hint = f", did you mean '{suggestion}'?" if suggestion else " (yolotrain help lists all arguments)"
        raise CfgError(f"{source}: '{key}' is not a yolotrain argument{hint}")
    if key in ("cfg", "mode", "task", "project", "name", "exist_ok", "resume"):
        raise CfgError(f"{source}: '{key}' cannot be tuned: it places or resumes runs rather than training them")
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise CfgError(f"{source}: '{key}: {format_value(value)}' is invalid: {_EXPECTED}")
    prefix = f"{source}: '{key}: {format_value(list(value))}'"
    if _is_range(value):
        return _range(key, value, specs[key], prefix)
    for choice in value:
        _check_value(key, choice, prefix)
    return Dimension(key, choices=tuple(value))


def _is_range(value) -> bool:
    numbers = all(_is_number(v) for v in value[:2])
    return numbers and (len(value) == 2 or (len(value) == 3 and value[2] == "log"))


def _range(key: str, value, spec, prefix: str) -> Dimension:
    low, high, log = value[0], value[1], len(value) == 3
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise CfgError(f"{prefix} is invalid: expected low < high, both finite")
    if log and low <= 0:
        raise CfgError(f"{prefix} is invalid: a log range needs low > 0")
    integer = isinstance(low, int) and isinstance(high, int) and spec.types[0] == "int"
    if not integer and "float" not in spec.types:
        raise CfgError(f"{prefix} is invalid: '{key}' takes {' or '.join(spec.types)}, so give ints or choices")
    for end in (low, high):
        _check_value(key, end if integer else float(end), prefix)
    return Dimension(key, low=low if integer else float(low), high=high if integer else float(high), log=log,
                     integer=integer)


def _check_value(key: str, value, prefix: str) -> None:
    try:
        check_args({key: value})
    except CfgError as error:
        raise CfgError(f"{prefix} is invalid: {one_line(error)}") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
