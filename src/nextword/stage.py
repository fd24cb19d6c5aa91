"""What every stage script shares: argument parsing, logging, params, one-line errors."""

from __future__ import annotations

import argparse
import logging
from typing import Callable

from nextword.config import Params, load_params
from nextword.errors import exit_on_error


def run(main: Callable[[argparse.Namespace, Params], None], *paths: str, description: str = "") -> None:
    """Parse ``--<path>`` arguments (all required, named in dvc.yaml), load params, run ``main``.

    Params are validated before ``main`` starts, so a bad value is refused
    before any work is done.
    """

    @exit_on_error
    def entry():
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--params", default="params.yaml")
        for name in paths:
            parser.add_argument(f"--{name}", required=True)
        args = parser.parse_args()
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        params = load_params(args.params)
        main(args, params)

    entry()
