"""``neurotap serve [MODEL]``: hold a model in one process and serve probes over HTTP."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model to remote clients (nt.connect)",
        description="Serve a model over HTTP: clients run forward, generate and backward passes with probes "
        "and patches through nt.connect(url).",
    )
    parser.add_argument(
        "model", nargs="?", default="smollm2-135m", help='"smollm2-135m" (default) or a local Hugging Face model folder'
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1); others need tokens")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument(
        "--token-file", help="file of accepted tokens, one a line (clients: nt.connect(url, token=...))"
    )
    parser.add_argument(
        "--allow-code",
        action="store_true",
        help="run Python probe functions that clients send (pickled): every client with a token can then run "
        "any code as this process's user",
    )
    parser.add_argument(
        "--idle-timeout", type=float, default=None, help="stop after this many seconds without requests"
    )
    parser.add_argument(
        "--request-timeout", type=float, default=120.0, help="seconds one request may run (default 120)"
    )
    parser.add_argument(
        "--max-request-bytes", type=int, default=256 << 20, help="largest request body in bytes (default 256 MiB)"
    )
    parser.add_argument(
        "--max-session-bytes", type=int, default=1 << 30, help="most bytes a session may keep recorded (default 1 GiB)"
    )
    parser.add_argument("--max-batch", type=int, default=32, help="most requests batched into one pass (default 32)")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..errors import NeurotapError
    from ..transport.server import ServerSettings, is_loopback, read_tokens

    try:
        tokens = read_tokens(args.token_file) if args.token_file else []
    except (OSError, NeurotapError) as error:
        print(f"neurotap serve: {error}", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and not tokens:
        print(
            f"neurotap serve: refusing to listen on {args.host} without tokens, since anyone reaching it could use "
            "the model; pass --token-file FILE (one token a line) or keep the default --host 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    settings = ServerSettings(
        name=args.model,
        tokens=tokens,
        allow_code=args.allow_code,
        request_timeout=args.request_timeout,
        idle_timeout=args.idle_timeout,
        max_request_bytes=args.max_request_bytes,
        max_session_bytes=args.max_session_bytes,
        max_batch=args.max_batch,
    )
    from ..model import load
    from ..transport.executor import InProcessExecutor
    from ..transport.server import serve

    try:
        model = load(args.model)
        executor = InProcessExecutor(model, max_session_bytes=args.max_session_bytes)
        serve(executor, settings, host=args.host, port=args.port)
    except NeurotapError as error:
        print(f"neurotap serve: {error}", file=sys.stderr)
        return 1
    return 0
