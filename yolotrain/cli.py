"""The `yolotrain` command: `yolotrain MODE key=value ...`.

Arguments are checked before anything heavy (torch, the model code) is imported, so `yolotrain help`
and argument mistakes answer at once. User mistakes print one line, `yolotrain: error: ...`, and exit with
the error's `exit_code` (2 for arguments); no traceback.
"""

import logging
import os
import signal
import sys
from typing import Optional

from yolotrain import __version__
from yolotrain.cfg import (
    CLI_MODES,
    DEFAULT_MODEL,
    DEFAULT_MODELS,
    TASKS,
    format_value,
    get_cfg,
    load_arg_specs,
    parse_cli_args,
    parse_cli_value,
    user_args,
)
from yolotrain.engine.tune_space import TUNE_ARGS, load_space, split_tune_args
from yolotrain.errors import CfgError, YoloTrainError, one_line

LOGGER = logging.getLogger(__name__)

USAGE = (f"usage: yolotrain [TASK] MODE [key=value ...]  (TASK: {', '.join(TASKS)}; MODE: train, val, predict, "
         f"export, tune, help, convert, sync, version)")
CONVERT_USAGE = "yolotrain convert coco SRC.json IMAGES_DIR OUT_DIR [segments=True] [include_crowd=True]"
CONVERT_MASKS_USAGE = ("yolotrain convert masks MASKS_DIR IMAGES_DIR OUT_DIR names=cat,dog [pixel_classes=1:0,2:1] "
                       "[min_area=16] [split_regions=False]")
CONVERT_DOTA_USAGE = ("yolotrain convert dota LABELS_DIR IMAGES_DIR OUT_DIR [version=1.0|1.5|2.0] [names=a,b] "
                      "[include_difficult=False] [split=train]")
CONVERT_TILES_USAGE = ("yolotrain convert tiles DATA_YAML OUT_DIR [size=1024] [gap=200] [rates=0.5,1.0,1.5] "
                       "[min_inside=0.7] [workers=4]")
CONVERT_ULTRALYTICS_USAGE = "yolotrain convert ultralytics yolov8n.pt yolov8n.safetensors"
SYNC_USAGE = "yolotrain sync RUN_DIR"
EXPORT_USAGE = "yolotrain export model=best.pt format=onnx"
WEIGHTS_MODES = ("val", "predict", "export")  # modes that run trained weights: `model=` must name them
PREDICT_USAGE = "yolotrain predict model=best.pt source=images/"
TUNE_USAGE = "yolotrain tune data=data.yaml epochs=10 iterations=100 space=tune.yaml"
MODE_HELP = (
    ("train", "train a detector", "yolotrain train data=data.yaml model=yolo-n.yaml epochs=100"),
    ("val", "validate a trained model", "yolotrain val model=runs/detect/train/weights/best.pt data=data.yaml"),
    ("predict", "detect objects in images, videos or folders", PREDICT_USAGE),
    ("export", "write a checkpoint as onnx, torchscript or safetensors", EXPORT_USAGE),
    ("tune", "search hyperparameters: many short training runs", TUNE_USAGE),
    ("convert", "convert COCO json labels to YOLO txt labels", CONVERT_USAGE),
    ("convert", "trace mask images into YOLO polygon labels", CONVERT_MASKS_USAGE),
    ("convert", "convert DOTA label files to YOLO oriented-box labels", CONVERT_DOTA_USAGE),
    ("convert", "cut a large-image oriented-box dataset into tiles", CONVERT_TILES_USAGE),
    ("convert", "write an Ultralytics .pt as a plain safetensors file", CONVERT_ULTRALYTICS_USAGE),
    ("sync", "upload a run folder to the remote tracking server", SYNC_USAGE),
    ("help", "show this help", "yolotrain help"),
    ("version", "print the version", "yolotrain version"),
)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each record (it may be replaced after setup)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def main(argv: Optional[list] = None) -> int:
    """Run the command line with `argv` (default `sys.argv[1:]`); return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _dispatch(argv)
    except YoloTrainError as error:
        _print_error(error)
        return error.exit_code
    except KeyboardInterrupt:
        print("yolotrain: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `yolotrain help | head`: the reader has what it wanted
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a tool whose pipe closed


def _silence_stdout() -> None:
    """Point stdout at the null device, so the interpreter's final flush into a closed pipe raises nothing."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())


def _print_error(error: YoloTrainError) -> None:
    message = one_line(error) or type(error).__name__
    print(f"yolotrain: error: {message}", file=sys.stderr)


def _dispatch(argv: list) -> int:
    if not argv:
        print(USAGE)
        print("run 'yolotrain help' for every mode and argument")
        return 0
    if argv[0] == "convert":
        return _run_convert(argv[1:])
    if argv[0] == "sync":
        return _run_sync(argv[1:])
    mode, overrides = parse_cli_args(argv)
    if mode == "help":
        print(help_text())
        return 0
    if mode == "version":
        print(f"yolotrain {__version__}")
        return 0
    if mode is None:
        raise CfgError(f"no mode given: start with one of {', '.join(CLI_MODES)}, e.g. yolotrain train data=data.yaml")
    if mode == "tune":
        return _run_tune(overrides)
    return _run_mode(mode, overrides)


def _run_mode(mode: str, overrides: dict) -> int:
    """train, val, predict or export, through the `YOLO` facade with the user's arguments as given."""
    given = user_args(overrides)  # the user's arguments only (cfg file merged under key=value), checked
    args = get_cfg({**given, "mode": mode})  # every value checked before the heavy import below
    if mode in WEIGHTS_MODES and not args.model:  # a yaml's untrained weights would give meaningless results
        raise CfgError(f"{mode} needs model=: trained weights (.pt) or an exported file, e.g. "
                       f"yolotrain {mode} model=runs/detect/train/weights/best.pt")
    _configure_logging()
    from yolotrain.engine.model import YOLO  # imports torch
    from yolotrain.utils import dist

    if not dist.is_main():  # a torchrun worker other than rank 0: warnings and errors only
        logging.getLogger("yolotrain").setLevel(logging.WARNING)
    model = YOLO(args.model or DEFAULT_MODELS[given.get("task") or "detect"], task=given.get("task"))
    # The model, task and mode are already given by the call itself; the rest goes through exactly as the user set it.
    kwargs = {key: value for key, value in given.items() if key not in ("model", "mode", "task")}
    if mode == "predict":
        kwargs.setdefault("save", True)  # the command line writes annotated images unless save=False
        for _ in model.predict(stream=True, **kwargs):  # streamed: a long video never sits in memory
            pass
    elif mode == "export":
        print(model.export(**kwargs))
    else:
        _run_recorded(getattr(model, mode), kwargs)
    return 0


def _run_recorded(run, kwargs: dict) -> None:
    """Call `run(**kwargs)` under torch's `record`, which hands an unexpected error's traceback to torchrun's
    failure report. A `YoloTrainError` (a user mistake, or a signal that stopped training with its state saved) is
    an outcome, not a crash: it passes around `record` and ends this worker as it ends a single process, with one
    line and its exit code."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from yolotrain.utils import dist

    def run_and_return_outcome():
        try:
            run(**kwargs)
        except YoloTrainError as error:
            return error
        return None

    outcome = record(run_and_return_outcome)()
    if outcome is not None:
        if dist.launched_distributed():
            # Every rank reached the same outcome; torchrun sends SIGTERM to the others as soon as one exits, which
            # would turn a peer's clean exit (its work saved, its line printed) into a death by signal.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise outcome


def _run_tune(overrides: dict) -> int:
    """Hyperparameter search: tuning's own arguments split off, the rest checked as training arguments."""
    if overrides.get("mode") == "tune":  # `mode=tune` names the mode, not the trials' mode
        overrides.pop("mode")
    settings, _ = split_tune_args(overrides)  # every argument and the space checked before the heavy import below
    if settings["space"] is not None:
        load_space(settings["space"])
    _configure_logging()
    from yolotrain.engine.model import YOLO  # imports torch

    model = overrides.pop("model", None) or DEFAULT_MODEL
    YOLO(model).tune(**overrides)
    return 0


def _run_convert(words: list) -> int:
    if words[:1] == ["ultralytics"]:
        return _run_convert_ultralytics(words[1:])
    positional = [word for word in words if "=" not in word]
    options = [word for word in words if "=" in word]
    if positional[:1] == ["masks"]:
        return _run_convert_masks(positional[1:], options)
    if positional[:1] == ["dota"]:
        return _run_convert_dota(positional[1:], options)
    if positional[:1] == ["tiles"]:
        return _run_convert_tiles(positional[1:], options)
    if len(positional) != 4:
        raise CfgError(f"convert takes 4 arguments, got {len(positional)}: usage: {CONVERT_USAGE}")
    source_format, src_json, images_dir, out_dir = positional
    if source_format != "coco":
        raise CfgError(f"'convert {source_format}' is not supported: coco, masks, dota, tiles or ultralytics, "
                       f"usage: {CONVERT_USAGE}")
    kwargs = _convert_options(options, {"segments": _bool_option, "include_crowd": _bool_option}, CONVERT_USAGE)
    _configure_logging()
    from yolotrain.data.convert import convert_coco

    convert_coco(src_json, images_dir, out_dir, **kwargs)
    return 0


def _run_convert_masks(positional: list, options: list) -> int:
    parsers = {"names": _names_option, "pixel_classes": _pixel_classes_option, "min_area": _count_option,
               "split_regions": _bool_option}
    kwargs = _convert_arguments("masks", positional, 3, "folders", options, parsers, CONVERT_MASKS_USAGE)
    if "names" not in kwargs:
        raise CfgError(f"convert masks needs names= (the class names in class order): usage: {CONVERT_MASKS_USAGE}")
    _configure_logging()
    from yolotrain.data.convert import convert_masks

    convert_masks(*positional, **kwargs)
    return 0


def _run_convert_dota(positional: list, options: list) -> int:
    parsers = {"version": _text_option, "names": _names_option, "include_difficult": _bool_option,
               "split": _text_option}
    kwargs = _convert_arguments("dota", positional, 3, "folders", options, parsers, CONVERT_DOTA_USAGE)
    _configure_logging()
    from yolotrain.data.convert import convert_dota

    convert_dota(*positional, **kwargs)
    return 0


def _run_convert_tiles(positional: list, options: list) -> int:
    parsers = {"size": _count_option, "gap": _pixels_option, "rates": _rates_option, "min_inside": _share_option,
               "workers": _count_option}
    kwargs = _convert_arguments("tiles", positional, 2, "arguments (a data yaml and an output folder)", options,
                                parsers, CONVERT_TILES_USAGE)
    _configure_logging()
    from yolotrain.data.tiles import tile_dataset

    print(tile_dataset(*positional, **kwargs))
    return 0


def _convert_arguments(command: str, positional: list, count: int, what: str, options: list, parsers: dict,
                       usage: str) -> dict:
    """The options of `convert <command>`, read by `parsers`, once it has been given `count` positional arguments
    (`what` names them in the error)."""
    if len(positional) != count:
        raise CfgError(f"convert {command} takes {count} {what}, got {len(positional)}: usage: {usage}")
    return _convert_options(options, parsers, usage)


def _convert_options(words: list, parsers: dict, usage: str) -> dict:
    """The `key=value` words of a convert command, each value read by its key's parser."""
    options = {}
    for word in words:
        key, _, text = word.partition("=")
        if key not in parsers:
            raise CfgError(f"'{key}' is not an option of this convert command ({', '.join(parsers)}): usage: {usage}")
        options[key] = parsers[key](key, text)
    return options


def _bool_option(key: str, text: str) -> bool:
    value = parse_cli_value(text)
    if not isinstance(value, bool):
        raise CfgError(f"{key}={text}: expected True or False")
    return value


def _count_option(key: str, text: str) -> int:
    value = parse_cli_value(text)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CfgError(f"{key}={text}: expected a whole number of at least 1")
    return value


def _pixels_option(key: str, text: str) -> int:
    value = parse_cli_value(text)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CfgError(f"{key}={text}: expected a whole number of pixels (0 or more)")
    return value


def _share_option(key: str, text: str) -> float:
    value = parse_cli_value(text)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise CfgError(f"{key}={text}: expected a share above 0 and at most 1, e.g. {key}=0.7")
    return float(value)


def _rates_option(key: str, text: str) -> tuple:
    values = [parse_cli_value(part.strip()) for part in text.split(",") if part.strip()]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
        raise CfgError(f"{key}={text}: expected positive numbers separated by commas, e.g. {key}=0.5,1.0,1.5")
    return tuple(float(value) for value in values)


def _text_option(key: str, text: str) -> str:
    if not text.strip():
        raise CfgError(f"{key}= needs a value")
    return text.strip()


def _names_option(key: str, text: str) -> list:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise CfgError(f"{key}={text}: expected the class names in class order, e.g. {key}=cat,dog")
    return names


def _pixel_classes_option(key: str, text: str) -> dict:
    pairs = [pair.split(":") for pair in text.split(",") if pair.strip()]
    if not pairs or any(len(pair) != 2 or not all(part.strip().isdigit() for part in pair) for pair in pairs):
        raise CfgError(f"{key}={text}: expected pixel value:class pairs, e.g. {key}=255:0 or {key}=1:0,2:1")
    return {int(value): int(class_index) for value, class_index in pairs}


def _run_convert_ultralytics(paths: list) -> int:
    """An Ultralytics .pt, read without running code from it, written once as a plain safetensors file."""
    if len(paths) not in (1, 2) or "=" in "".join(paths):
        raise CfgError(f"convert ultralytics takes IN.pt [OUT.safetensors]: usage: {CONVERT_ULTRALYTICS_USAGE}")
    _configure_logging()
    from yolotrain.utils.checkpoint import export_checkpoint_safetensors

    print(export_checkpoint_safetensors(paths[0], paths[1] if len(paths) == 2 else None))
    return 0


def _run_sync(positional: list) -> int:
    if len(positional) != 1:
        raise CfgError(f"sync takes 1 argument, got {len(positional)}: usage: {SYNC_USAGE}")
    _configure_logging()
    from yolotrain.integrations.remote import sync_run

    sync_run(positional[0])
    return 0


def _configure_logging() -> None:
    # Only the CLI configures output; as a library yolotrain leaves logging to the application.
    package_logger = logging.getLogger("yolotrain")
    if not any(isinstance(handler, _CurrentStderrHandler) for handler in package_logger.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_logger.addHandler(handler)
    if package_logger.level == logging.NOTSET:
        package_logger.setLevel(logging.INFO)


def help_text() -> str:
    """Modes and every argument with its default and description, grouped as in default.yaml."""
    lines = [USAGE, "", "modes:"]
    for mode, description, example in MODE_HELP:
        lines.append(f"  {mode:<8} {description:<50} {example}")
    lines += ["", "arguments (key=default  (type) description); set them as key=value or in a yaml given by cfg=FILE:"]
    section = None
    for spec in load_arg_specs().values():
        if spec.section != section:
            section = spec.section
            lines += ["", f"{section}:"]
        default = "" if spec.default is None else format_value(spec.default)
        lines.append(f"  {spec.name + '=' + default:<30} ({' | '.join(spec.types)}) {spec.comment}")
    lines += ["", "tune (besides the training arguments above, which every trial trains with):"]
    for name, default, comment in TUNE_ARGS:
        lines.append(f"  {name + '=' + ('' if default is None else format_value(default)):<30} {comment}")
    return "\n".join(lines)
