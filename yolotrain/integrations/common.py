"""What every integration reports: the epoch's numbers (the results.csv columns) and the run's plot files."""

import math
import re
from pathlib import Path

PLOT_SUFFIXES = (".png", ".jpg", ".jpeg")


def epoch_metrics(trainer):
    """{name: float} for the epoch just finished: train losses, validation metrics (when validated), lrs.

    Non-finite values (an epoch without validation fills NaN) are left out: trackers reject or mis-plot them.
    """
    values = {}
    if trainer.tloss is not None:
        values.update(trainer.label_loss_items(trainer.tloss, prefix="train"))
    values.update(trainer.metrics or {})
    values.update(trainer.lr or {})
    numbers = {}
    for key, value in values.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            numbers[str(key)] = number
    return numbers


def plot_files(save_dir):
    """The image files the trainer and validator wrote in the run folder, sorted by name."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    return sorted(p for p in save_dir.iterdir() if p.is_file() and p.suffix.lower() in PLOT_SUFFIXES)


def plain_params(args):
    """The run's arguments as {name: str}: what trackers store as parameters (None becomes '')."""
    return {str(k): "" if v is None else str(v) for k, v in vars(args).items()}


_INVALID_NAME_CHARS = re.compile(r"[^0-9A-Za-z_\-. :/]")


def sanitize_metric_name(name):
    """An MLflow-valid metric name: "metrics/mAP50(B)" -> "metrics/mAP50_B" (MLflow rejects parentheses)."""
    name = str(name).replace("(", "_").replace(")", "")
    return _INVALID_NAME_CHARS.sub("_", name)


def safe_uri(uri):
    """`uri` without any user:password@ part: the only form that may be logged or written to a file."""
    return re.sub(r"//[^/@]*@", "//", str(uri))
