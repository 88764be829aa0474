"""The ``neurotap`` command. Each subcommand is a module here with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib

from ..errors import NeurotapError, UnknownPointError

MODEL_HELP = '"smollm2-135m" (built in), a folder written by save_pretrained(), a .gguf file, or a Hugging Face Hub id'
COMMANDS = ("demo", "points", "serve", "inspect", "collect", "export", "cache")


def main(argv: list[str] | None = None) -> int:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="neurotap", description="Probe, record and patch every value inside a model.")
    parser.add_argument("--version", action="version", version=f"neurotap {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f".{name}", __name__)
        command = module.add_parser(subparsers)
        command.formatter_class = argparse.ArgumentDefaultsHelpFormatter  # every --help shows the defaults
        command.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except NeurotapError as error:  # a user's mistake: the message says what to do, a traceback would bury it
        parser.exit(2, f"neurotap {args.command}: error: {explained(error, getattr(args, 'model', None))}\n")


def explained(error: NeurotapError, model: str | None) -> str:
    """The error's message, naming the command that lists a model's points where it names the Python call."""
    from ..points.pattern import LISTING

    if isinstance(error, UnknownPointError) and model:
        return str(error).replace(LISTING, f"List them with `neurotap points {model} PREFIX`.")
    return str(error)
