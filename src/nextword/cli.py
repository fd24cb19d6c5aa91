"""The ``nextword`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nextword.errors import NextwordError, exit_on_error

DEFAULT_MODEL = "models/model"


def cmd_params(args) -> None:
    """Compose params.yaml from conf/ with a preset and overrides, exactly as `dvc exp run -S` does."""
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException

    conf = Path(args.conf).resolve()
    if not (conf / "config.yaml").exists():
        raise NextwordError(f"{conf}: no config.yaml; run this from the project root")
    from nextword.config import load_params
    from nextword.files import atomic_path

    with atomic_path(args.out) as tmp:
        try:
            compose_and_dump(tmp, str(conf), None, "config", "", [f"corpus={args.preset}", *args.overrides])
        except HydraException as err:
            raise NextwordError(f"{args.out}: {str(err).splitlines()[0]}") from None
        load_params(tmp, args.out)  # refuse a composition that the stages would refuse
    print(f"{args.out}: preset {args.preset}{' with ' + ' '.join(args.overrides) if args.overrides else ''}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextword", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="write params.yaml from conf/ for a preset (toy or chat)")
    p.add_argument("preset", nargs="?", default="chat")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.layers=2")
    p.add_argument("--conf", default="conf")
    p.add_argument("--out", default="params.yaml")
    p.set_defaults(func=cmd_params)
    return parser


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
