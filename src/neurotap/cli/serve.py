"""``neurotap serve [MODEL]``: hold a model in one process and serve probes over HTTP."""

from __future__ import annotations

import argparse
import sys

from . import MODEL_HELP

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # what accelerate places by itself


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: use 1 to 65535, or 0 to pick a free one")
    return port


def _bytes(text: str) -> int:
    """``1073741824``, ``512M``, ``4G``."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    scale = units.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write bytes, or a number with K, M, G") from None
    return int(value)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..transport.limits import ServerSettings

    settings = ServerSettings()
    limits = settings.limits
    parser = subparsers.add_parser(
        "serve",
        help="serve a model to remote clients (nt.connect)",
        description="Serve a model over HTTP: clients run forward, generate and backward passes with probes "
        "and patches through nt.connect(url). Every limit below bounds what one client can make the server do.",
    )
    parser.add_argument("model", nargs="?", default="smollm2-135m", help=MODEL_HELP)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; any but loopback needs tokens")
    parser.add_argument("--port", type=_port, default=8000, help="port; 0 picks a free one")
    parser.add_argument(
        "--token-file",
        help="file of accepted tokens, one a line, each at least 16 characters (nt.connect(url, token=))",
    )
    parser.add_argument(
        "--allow-code",
        action="store_true",
        help="run Python probe functions that clients send (pickled), and pass on model arguments outside the "
        "allow-list: every client with a token can then run any code as this process's user",
    )
    parser.add_argument(
        "--dataset",
        metavar="FOLDER",
        help="an activation dataset (neurotap collect --out FOLDER) whose top-activating examples the web "
        "inspector shows; clients pick a point and a unit, never a file",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer to this host name (the Host header); repeatable. Loopback names and the bound "
        "address are always accepted",
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="URL",
        help="let web pages of this origin (e.g. http://notebook.example:8888) call the server; repeatable",
    )
    group = parser.add_argument_group("time")
    group.add_argument("--idle-timeout", type=float, default=None, help="stop after this many seconds without requests")
    group.add_argument(
        "--request-timeout",
        type=float,
        default=settings.request_timeout,
        help="seconds a request may run once started (it may wait as long again behind others)",
    )
    group.add_argument(
        "--session-timeout", type=float, default=settings.session_timeout, help="seconds an unused session is kept"
    )
    group.add_argument(
        "--header-timeout", type=float, default=settings.header_timeout, help="seconds for a request's headers"
    )
    group.add_argument("--body-timeout", type=float, default=settings.body_timeout, help="seconds for a request's body")
    group = parser.add_argument_group("size (bytes, or a number with K, M, G)")
    group.add_argument(
        "--max-request-bytes", type=_bytes, default=settings.max_request_bytes, help="largest request body"
    )
    group.add_argument(
        "--max-session-bytes", type=_bytes, default=settings.max_session_bytes, help="recordings one session keeps"
    )
    group.add_argument(
        "--max-total-bytes",
        type=_bytes,
        default=settings.max_total_bytes,
        help="recordings all sessions keep, shared equally among the tokens; a token's requests waiting to run "
        "and answers not yet read may hold as much again",
    )
    group.add_argument(
        "--max-inflight-bytes",
        type=_bytes,
        default=settings.max_inflight_bytes,
        help="request bodies being received at once, all connections together",
    )
    group.add_argument(
        "--max-request-memory",
        type=_bytes,
        default=limits.max_request_memory,
        help="estimated activation memory of one pass (requests batched together share it)",
    )
    group = parser.add_argument_group("work")
    group.add_argument("--max-batch", type=int, default=settings.max_batch, help="requests batched into one pass")
    group.add_argument(
        "--max-request-tokens",
        type=int,
        default=limits.max_request_tokens,
        help="positions one request computes (rows x tokens, beams and return sequences included)",
    )
    group.add_argument(
        "--max-input-elements", type=int, default=limits.max_input_elements, help="elements of one input tensor"
    )
    group.add_argument("--max-probes", type=int, default=limits.max_probes, help="probes and patches in one request")
    group.add_argument(
        "--max-selection-elements",
        type=int,
        default=limits.max_selection_elements,
        help="elements a patch's index= may select beyond the value's own size, a TopK may keep, an SAE's top "
        "examples may hold (examples x d_sae)",
    )
    group.add_argument("--max-new-tokens", type=int, default=limits.max_new_tokens, help="tokens one generate adds")
    group.add_argument("--max-beams", type=int, default=limits.max_beams, help="num_beams of a generate")
    group.add_argument(
        "--max-return-sequences",
        type=int,
        default=limits.max_return_sequences,
        help="num_return_sequences of a generate",
    )
    group.add_argument(
        "--cache-implementations",
        default=",".join(limits.cache_implementations),
        help="cache_implementation values a generate may ask for, comma-separated",
    )
    group = parser.add_argument_group("clients")
    group.add_argument(
        "--max-sessions-per-token",
        type=int,
        default=settings.max_sessions_per_token,
        help="sessions one token holds; opening another closes its least recently used",
    )
    group.add_argument(
        "--max-experiments-per-token",
        type=int,
        default=settings.max_experiments_per_token,
        help="the inspector's experiments (patching, logit lens, top examples) one token has under way or "
        "waiting; more get 429",
    )
    group.add_argument(
        "--max-connections", type=int, default=settings.max_connections, help="open connections; more get 503"
    )
    group = parser.add_argument_group("placement")
    group.add_argument(
        "--device-map",
        choices=DEVICE_MAPS,
        help="spread one process's model over its GPUs with accelerate's device_map (from_pretrained's)",
    )
    group = parser.add_argument_group("sharding (torch.distributed: NCCL between GPUs, gloo on the CPU)")
    group.add_argument("--ranks", type=int, default=1, help="split the model's decoder layers over this many processes")
    group.add_argument(
        "--rank-device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="where each rank computes: cuda: a GPU of its own (cuda:LOCAL_RANK); auto: so where every rank "
        "has one, else the CPU",
    )
    group.add_argument(
        "--rank-timeout",
        type=float,
        default=50.0,
        help="seconds a rank may go without answering before the server names it failed and exits "
        "(within this plus 10 s)",
    )
    return parser


def settings_of(args: argparse.Namespace, tokens: list[str]):
    from ..transport.limits import Limits, ServerSettings

    limits = Limits(
        max_new_tokens=args.max_new_tokens,
        max_beams=args.max_beams,
        max_return_sequences=args.max_return_sequences,
        cache_implementations=tuple(c.strip() for c in args.cache_implementations.split(",") if c.strip()),
        max_request_tokens=args.max_request_tokens,
        max_request_memory=args.max_request_memory,
        max_input_elements=args.max_input_elements,
        max_probes=args.max_probes,
        max_selection_elements=args.max_selection_elements,
    )
    return ServerSettings(
        name=args.model,
        tokens=tokens,
        allow_code=args.allow_code,
        request_timeout=args.request_timeout,
        idle_timeout=args.idle_timeout,
        session_timeout=args.session_timeout,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        max_request_bytes=args.max_request_bytes,
        max_session_bytes=args.max_session_bytes,
        max_total_bytes=args.max_total_bytes,
        max_inflight_bytes=args.max_inflight_bytes,
        max_sessions_per_token=args.max_sessions_per_token,
        max_experiments_per_token=args.max_experiments_per_token,
        max_batch=args.max_batch,
        max_connections=args.max_connections,
        allowed_hosts=[h.strip("[]").lower() for h in args.allow_host],
        allowed_origins=[o.lower().rstrip("/") for o in args.allow_origin],
        limits=limits,
    )


def run(args: argparse.Namespace) -> int:
    from ..datasets.parallel import launched_by_torchrun
    from ..errors import NeurotapError
    from ..transport.server import is_loopback, read_tokens

    if launched_by_torchrun():  # this process is one rank of a sharded server, started by torchrun or --ranks
        options = {"--ranks": args.ranks != 1, "--device-map": args.device_map, "--dataset": args.dataset}
        if any(options.values()):
            given = ", ".join(option for option, value in options.items() if value)
            print(f"neurotap serve: under torchrun, its options set the ranks; leave out {given}", file=sys.stderr)
            return 2
        from ..distributed.launch import run_rank

        return run_rank(args)
    try:
        tokens = read_tokens(args.token_file) if args.token_file else []
        if not is_loopback(args.host) and not tokens:
            raise NeurotapError(
                f"refusing to listen on {args.host} without tokens, since anyone reaching it could use the model; "
                "pass --token-file FILE (one token a line) or keep the default --host 127.0.0.1"
            )
        settings = settings_of(args, tokens)
        settings.check()  # before the model loads: a wrong setting costs no wait
        dataset = None
        if args.dataset is not None:
            if args.ranks != 1:
                raise NeurotapError("--dataset is served by a one-process server only for now: leave out --ranks")
            from ..datasets import ActivationDataset

            dataset = ActivationDataset(args.dataset)
    except NeurotapError as error:
        print(f"neurotap serve: {error}", file=sys.stderr)
        return 2
    if args.ranks == 1 and args.rank_device != "auto":
        print(
            "neurotap serve: --rank-device places the ranks of a sharded server (--ranks N, or torchrun); one "
            "process holds the model on the CPU, or on GPUs with --device-map auto",
            file=sys.stderr,
        )
        return 2
    if args.ranks != 1 and args.device_map is not None:
        print(
            "neurotap serve: --device-map places one process's model; with --ranks every rank holds its own "
            "layers: pass one of them",
            file=sys.stderr,
        )
        return 2
    if args.ranks != 1:
        from ..distributed.launch import launch

        return launch(args)
    from ..model import load
    from ..transport.executor import InProcessExecutor
    from ..transport.server import serve

    try:
        model = load(args.model, **({"device_map": args.device_map} if args.device_map else {}))
        executor = InProcessExecutor(
            model,
            limits=settings.limits,
            max_session_bytes=settings.max_session_bytes,
            max_total_bytes=settings.max_total_bytes,
            max_owner_bytes=settings.max_owner_bytes,
        )
        serve(executor, settings, host=args.host, port=args.port, dataset=dataset)
    except NeurotapError as error:
        print(f"neurotap serve: {error}", file=sys.stderr)
        return 1
    return 0
