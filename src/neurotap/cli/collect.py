"""``neurotap collect``: write the values at some points over many tokens to an activation dataset."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import MODEL_HELP


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "collect",
        help="collect activations at some points over a text corpus into sharded files",
        description="Run a model over packed text and store the values at the given points for every token. "
        "Run the same command again after an interruption to continue where it stopped.",
    )
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument(
        "--points",
        required=True,
        help="comma-separated point names or patterns, e.g. model.layers.6.output or 'model.layers.*.mlp.mul'",
    )
    parser.add_argument("--out", required=True, help="the dataset folder (created; an existing one is resumed)")
    parser.add_argument(
        "--data", nargs="+", default=None, help=".txt, .jsonl or .parquet files or folders (default: bundled corpus)"
    )
    parser.add_argument("--text-field", default="text", help="the text field of JSON lines / column of Parquet")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per packed sequence, BOS included")
    parser.add_argument("--batch", type=int, default=8, help="sequences per forward")
    parser.add_argument("--tokens", type=int, default=None, help="how many tokens to collect (default: all the data)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--shard-mb", type=float, default=256.0, help="approximate size of each shard in MiB")
    parser.add_argument("--server", default=None, help="run the model on a neurotap server at this URL")
    parser.add_argument("--tokenizer", default=None, help="a folder holding the tokenizer (default: the model's)")
    parser.add_argument("--device", default=None, help="move a local model to this device, e.g. cuda")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    parser.add_argument(
        "--ranks",
        type=int,
        default=1,
        help="collect with this many processes on this machine (torch.distributed, gloo on loopback); the dataset "
        "is the one a single process writes. Across machines, launch `torchrun ... -m neurotap.collect ...`",
    )
    return parser


_OPTIONS = ("model", "points", "out", "text_field", "seq_len", "batch", "tokens", "dtype", "shard_mb", "server",
            "tokenizer", "device")  # fmt: skip


def _arguments(args: argparse.Namespace) -> list[str]:
    """The command line of this collect, for each rank to parse again."""
    arguments = []
    for name in _OPTIONS:
        value = getattr(args, name)
        if value is not None:
            arguments += [f"--{name.replace('_', '-')}", str(value)]
    if args.data is not None:
        arguments += ["--data", *map(str, args.data)]
    return arguments + (["--quiet"] if args.quiet else [])


def run(args: argparse.Namespace) -> int:
    from ..datasets import collect, parallel
    from ..datasets.collect import check_points, check_seq_len, check_settings
    from ..errors import NeurotapError
    from ..model.load import skeleton
    from . import explained

    points = [p.strip() for p in args.points.split(",") if p.strip()]
    model = None
    distributed = parallel.launched_by_torchrun()
    try:
        # a mistyped --out or point, an unreadable --data or a bad size should not cost a model load (or N) first
        check_settings(points, args.out, args.data, args.text_field, args.seq_len, args.batch, args.tokens,
                       args.dtype, args.shard_mb)  # fmt: skip
        structure = skeleton(args.model) if args.server is None and not distributed else None
        if structure is not None:  # the module tree without weights: its points and config
            check_points(structure, points)
            check_seq_len(args.seq_len, getattr(structure.module.config, "max_position_embeddings", None))
        if args.ranks != 1 and not distributed:
            return parallel.launch(_arguments(args), args.ranks)
        model, tokenizer = _model(args)
        (parallel.collect_rank if distributed else collect)(
            model,
            points,
            args.out,
            data=args.data,
            text_field=args.text_field,
            seq_len=args.seq_len,
            batch_size=args.batch,
            tokens=args.tokens,
            dtype=args.dtype,
            shard_mb=args.shard_mb,
            tokenizer=tokenizer,
            model_name=args.model,
            progress=not args.quiet,
        )
    except NeurotapError as error:
        print(f"neurotap collect: {explained(error, args.model)}", file=sys.stderr)
        return 2
    finally:
        if args.server is not None and model is not None:
            model.close()  # ends the server session
    return 0


def _model(args: argparse.Namespace):
    """The model to run, and the tokenizer to pack text with."""
    from .. import model as model_layer
    from ..errors import NeurotapError

    tokenizer = _tokenizer(args.tokenizer) if args.tokenizer else None
    if args.server is None:
        model = model_layer.load(args.model)
        if args.device:
            device = args.device
            if device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per rank of a torchrun launch
                device = f"cuda:{os.environ['LOCAL_RANK']}"
            model.module.to(device)
        return model, tokenizer
    import neurotap

    connect = getattr(neurotap, "connect", None)
    if connect is None:
        raise NeurotapError("--server needs neurotap's transport client (nt.connect), which this install lacks")
    remote = connect(args.server)
    if tokenizer is None:
        tokenizer = getattr(remote, "tokenizer", None)
    if tokenizer is None and Path(args.model, "config.json").is_file():
        tokenizer = _tokenizer(args.model)
    if tokenizer is None:
        # the server runs the model; only its tokenizer is needed here
        tokenizer = model_layer.load(args.model).tokenizer
    return remote, tokenizer


def _tokenizer(folder: str):
    from ..errors import NeurotapError

    try:
        from transformers import AutoTokenizer
    except ImportError as error:
        raise NeurotapError("--tokenizer needs transformers: pip install 'neurotap[hf]'") from error
    return AutoTokenizer.from_pretrained(folder)
