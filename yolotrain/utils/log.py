"""Console logging for the yolotrain logger tree (configured once by the entry points)."""

import logging
import sys


def setup_logging(verbose=True):
    """Send yolotrain's log records to stdout as plain lines, unless an application (or the CLI) already gave
    the yolotrain logger a handler; idempotent."""
    logger = logging.getLogger("yolotrain")
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return logger
