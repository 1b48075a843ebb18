"""`python -m yolotrain MODE key=value ...`: the same as the `yolotrain` command."""

import sys

from yolotrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
