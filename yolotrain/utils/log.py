"""Console logging for the yolotrain logger tree (configured once by the entry points)."""

import logging
import sys


def setup_logging(verbose=True):
    """Send yolotrain's log records to stdout as plain lines; idempotent."""
    logger = logging.getLogger("yolotrain")
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if not any(getattr(h, "_yolotrain", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._yolotrain = True
        logger.addHandler(handler)
        logger.propagate = False
    return logger
