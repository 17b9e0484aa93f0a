"""What every stage script shares: offline mode, --help, params loading, one-line errors."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from shear.config import Params, load_params
from shear.errors import ShearError
from shear.models import offline, seed_everything


class StageArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (a missing or unknown argument) are one line and exit code 1, like every
    other bad input of a stage, instead of argparse's usage block and exit code 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(1)


def run_stage(description: str, body: Callable[[Params, argparse.Namespace], None],
              add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Parse --help/arguments, load params.yaml, run `body`; a ShearError exits 1 with one line."""
    parser = StageArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args()
    offline()
    try:
        params = load_params(args.params)
        seed_everything(params.run.seed)
        body(params, args)
    except ShearError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
