"""User-facing errors: raised for bad input, shown as one line without a traceback by the CLI."""


class YoloTrainError(Exception):
    """Base class for errors caused by the user's input (arguments, files, data)."""

    exit_code = 1


class CfgError(YoloTrainError):
    """An unknown argument or a value of the wrong type."""

    exit_code = 2


class DatasetError(YoloTrainError):
    """A data yaml, split or label set that cannot be used."""


class CheckpointError(YoloTrainError):
    """A checkpoint that cannot be loaded safely or is not a yolotrain checkpoint."""


def one_line(error) -> str:
    """An error's message on a single line (parsers such as YAML's spread theirs over several)."""
    return " ".join(str(error).split())
