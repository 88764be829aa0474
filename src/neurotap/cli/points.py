"""``neurotap points MODEL [PREFIX]``: print the inventory tree."""

from __future__ import annotations

import argparse

from . import MODEL_HELP


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("points", help="list a model's probe points")
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("prefix", nargs="?", default=None, help="only points under this name")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..model import load

    print(load(args.model).points(args.prefix))
    return 0
