"""``python -m JointRegSegLib.training ARGS``: ``jointregseg train ARGS`` without the rest of the command line
(whose benchmark needs SimpleITK): what a machine with torch and numpy alone runs (the GPU run, README)."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError, WeightsError
from .command import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m JointRegSegLib.training", description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        run(parser.parse_args(argv))
    except (InputError, WeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
