"""``neurotap export``: write an activation dataset in a format SAE trainers read."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="write an activation dataset as a Hugging Face datasets dataset (SAELens's cached activations)",
        description="Write one point of an activation dataset made by `neurotap collect` in another format. hf: a "
        "Hugging Face datasets dataset on disk laid out as SAELens's cached-activations runner writes it (one row "
        "per sequence: a column named after the hook name, and token_ids).",
    )
    parser.add_argument("dataset", help="the activation dataset folder")
    parser.add_argument("--format", default="hf", choices=("hf",), help="the format to write")
    parser.add_argument("--out", required=True, help="a new (or empty) folder to write")
    parser.add_argument("--point", default=None, help="the point to export (default: the dataset's only point)")
    parser.add_argument(
        "--hook-name", default=None, help="the column name, SAELens's hook_name (default: the point name)"
    )
    parser.add_argument("--max-shard-mb", type=float, default=500.0, help="the largest Arrow file to write, in MiB")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..datasets.export import export
    from ..errors import NeurotapError

    try:
        out = export(
            args.dataset,
            args.out,
            format=args.format,
            point=args.point,
            hook_name=args.hook_name,
            max_shard_mb=args.max_shard_mb,
        )
    except NeurotapError as error:
        print(f"neurotap export: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}", file=sys.stderr)
    return 0
