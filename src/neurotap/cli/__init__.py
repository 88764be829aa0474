"""The ``neurotap`` command. Each subcommand is a module here with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import re

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
        command.formatter_class = DefaultsHelpFormatter
        command.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except NeurotapError as error:  # a user's mistake: the message says what to do, a traceback would bury it
        parser.exit(2, f"neurotap {args.command}: error: {explained(error, getattr(args, 'model', None))}\n")
    except ModuleNotFoundError as error:  # an optional dependency left out at install time
        extra = extra_providing(error.name or "")
        if extra is None:
            raise
        parser.exit(2, f"neurotap {args.command}: error: this needs {error.name}: pip install 'neurotap[{extra}]'\n")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every --help shows each option's default, but not a bare ``None`` nor a second one where the help names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def extra_providing(module: str) -> str | None:
    """The extra of neurotap's package metadata that installs ``module``'s package, if one does."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        requirements = requires("neurotap") or []
    except PackageNotFoundError:
        return None
    top = module.partition(".")[0].lower()
    if top == "neurotap":
        return None  # a module of our own missing is a bug, not an install choice
    for requirement in requirements:
        name, _, marker = requirement.partition(";")
        if re.split(r"[\s<>=!~\[(]", name.strip(), maxsplit=1)[0].lower() == top and "extra ==" in marker:
            return marker.split("extra ==")[1].strip().strip("\"'")
    return None


def explained(error: NeurotapError, model: str | None) -> str:
    """The error's message, naming the command that lists a model's points where it names the Python call."""
    from ..points.pattern import LISTING

    if isinstance(error, UnknownPointError) and model:
        return str(error).replace(LISTING, f"List them with `neurotap points {model} PREFIX`.")
    return str(error)
