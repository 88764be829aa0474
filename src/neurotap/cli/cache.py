"""``neurotap cache``: the converted models in the cache, their sizes, and clearing them."""

from __future__ import annotations

import argparse
import shutil

_EVERY = "\0every copy"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "cache",
        help="list the converted GGUF models in the cache, or clear them",
        description="List the safetensors copies that loading a GGUF file (the built-in model included) made in the "
        "cache ($NEUROTAP_CACHE, else ~/.cache/neurotap), with their sizes, and whether each is stale (its GGUF file "
        "changed or gone, or made by an older neurotap): a stale copy is never read again.",
    )
    parser.add_argument(
        "--clear",
        nargs="?",
        const=_EVERY,
        default=None,
        metavar="NAME",
        help="delete the copy NAME (as listed), or every copy; the next load converts again",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from ..errors import NeurotapError
    from ..model.load import cache_dir, cached_copies, size_text

    copies = cached_copies()
    if args.clear is not None:
        chosen = copies if args.clear == _EVERY else [c for c in copies if c.name == args.clear]
        if not chosen:
            names = ", ".join(c.name for c in copies) or "none"
            raise NeurotapError(f"no copy named {args.clear!r} in {cache_dir()} (there: {names}); see `neurotap cache`")
        for copy in chosen:
            shutil.rmtree(copy.folder)
            print(f"deleted {copy.name} ({size_text(copy.bytes)})")
        return 0
    if not copies:
        print(f"no converted models in {cache_dir()}")
        return 0
    width = max(len(c.name) for c in copies)
    for copy in copies:
        state = f"stale: {copy.stale}" if copy.stale else "current"
        print(
            f"{copy.name.ljust(width)}  {size_text(copy.bytes):>9}  {state}  {copy.source or '(source not recorded)'}"
        )
    counted = f"{len(copies)} {'copy' if len(copies) == 1 else 'copies'}"
    print(f"{counted}, {size_text(sum(c.bytes for c in copies))} in {cache_dir()}")
    return 0
