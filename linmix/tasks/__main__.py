"""`python -m linmix.tasks ...` runs `linmix synth ...` (the same flags)."""

import argparse
import sys

from linmix.errors import LinmixError
from linmix.tasks.command import add_synth_parser


def main(argv: list[str] | None = None) -> int:
    """Parse the synth flags and run the command; user errors print one line and exit 2."""
    parser = argparse.ArgumentParser(prog="python -m linmix.tasks")
    synth = add_synth_parser(parser.add_subparsers(dest="command", required=True))
    args = synth.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except LinmixError as error:
        print(f"linmix synth: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
