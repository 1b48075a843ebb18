"""Progress display shared by training and validation: a tqdm bar on a terminal, plain log lines elsewhere.

tqdm draws on stderr, where the CLI also logs: both streams must be terminals, or `2> train.log` fills the log
with carriage-return redraws.
"""

import sys


def interactive_terminal():
    """True when stdout and stderr are both terminals (a bar may redraw in place)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def progress_bar(iterable, total, initial=0, desc=None, leave=True):
    """`iterable` wrapped in a tqdm bar on a terminal, or returned as it is."""
    if not interactive_terminal():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, leave=leave, bar_format="{l_bar}{bar:10}{r_bar}")
