"""`python -m linmix` runs the command-line tool."""

import sys

from linmix.cli import main

if __name__ == "__main__":
    sys.exit(main())
