"""Starting a sharded server: ``neurotap serve MODEL --ranks N`` and what every rank runs.

``launch`` starts torch's elastic agent (the launcher behind ``torchrun``) on this
machine with N workers, each running ``python -m neurotap.serve`` with the same
options; ``torchrun ... -m neurotap.serve`` starts them directly, on as many
machines as it is told. A ``serve`` started by either (``RANK``, ``WORLD_SIZE``
and the rendezvous address in its environment) is one rank (``run_rank``): rank 0
serves HTTP, the others follow its commands.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import socket
import sys
import uuid
from typing import Any

import torch

from ..errors import NeurotapError

LOOPBACK = "127.0.0.1"


def _parser() -> argparse.ArgumentParser:
    from ..cli import serve

    parser = argparse.ArgumentParser(prog="neurotap")
    serve.add_parser(parser.add_subparsers(dest="command"))
    return parser


def _argv(args: argparse.Namespace) -> list[str]:
    """``args`` written back as ``serve`` command-line options, for the workers."""
    serve = _parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    argv = [args.model]
    for action in serve._actions:
        if not action.option_strings or action.dest in ("help", "ranks"):
            continue
        value = getattr(args, action.dest, action.default)
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                argv.append(action.option_strings[0])
        elif value is not None and value != action.default:
            argv += [action.option_strings[0], str(value)]
    return argv


def _loopback_store() -> tuple[Any, int]:
    """The rendezvous store of a one-machine launch, listening on loopback only, and its port.

    The launcher's own store would listen on every interface, where anyone who
    reaches the machine could write into it (declare a rank failed, stop a pass).
    A store made first in this process on a socket bound to loopback is the one
    the launcher then uses (``multi_tenant``: one server per port in a process).
    """
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen()
    port = sock.getsockname()[1]
    store = dist.TCPStore(
        LOOPBACK,
        port,
        None,
        True,
        wait_for_workers=False,
        multi_tenant=True,
        master_listen_fd=sock.fileno(),
    )
    return (store, sock), port


def launch(args: argparse.Namespace) -> int:
    """Run ``args.ranks`` ranks on this machine under torch's elastic agent, then exit with the server's status."""
    from torch.distributed.launcher.api import LaunchConfig

    from ..model.load import local_folder, model_folder
    from .stages import check_folder

    try:
        gpus = torch.cuda.device_count()
        if args.rank_device == "cuda" and gpus < args.ranks:
            raise NeurotapError(
                f"--rank-device cuda puts each of the {args.ranks} ranks on a GPU of its own, but torch sees {gpus} "
                f"on this machine: pass {f'--ranks {gpus} or fewer, or ' if gpus else ''}--rank-device cpu"
            )
        # a built-in model is converted once here, and a Hub model found in the cache (or downloaded) once, not
        # by every rank at once; the ranks then read the folder
        folder = model_folder(args.model)
        check_folder(folder)
        if local_folder(args.model) is None:  # a Hub id: the ranks read the snapshot found here
            args.model = str(folder)
    except NeurotapError as error:
        print(f"neurotap serve: {error}", file=sys.stderr)
        return 2
    # one machine: everything on loopback, the rendezvous store included
    os.environ["MASTER_ADDR"] = LOOPBACK
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    _held, port = _loopback_store()  # until this process exits
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=args.ranks,
        run_id=f"neurotap-{uuid.uuid4().hex[:8]}",
        rdzv_backend="static",
        rdzv_endpoint=f"{LOOPBACK}:{port}",
        rdzv_configs={"rank": 0},
        max_restarts=0,  # a restarted rank would have lost its sessions' recordings
        monitor_interval=0.5,
        local_addr=LOOPBACK,
        start_method="spawn",
    )
    code = _run(config, args)
    # every rank has exited and the launcher has shut down; tearing its interpreter down would wait for its
    # rendezvous store several seconds more, delaying whoever restarts the server
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(config: Any, args: argparse.Namespace) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    try:
        elastic_launch(config, sys.executable)("-m", "neurotap.serve", *_argv(args))
    except ChildFailedError as error:
        failed = ", ".join(
            f"rank {rank} (exit code {failure.exitcode})" for rank, failure in sorted(error.failures.items())
        )
        print(f"neurotap serve: the sharded server stopped because of {failed}", file=sys.stderr)
        return 1
    except SignalException:
        return 0  # stopped by SIGTERM or Ctrl-C: the ranks were told to finish
    return 0


def run_rank(args: argparse.Namespace) -> int:
    """One rank of a sharded server, started by ``launch`` or by torchrun; ends the process."""
    code = _rank(args)
    # the rank's work is done; tearing torch.distributed down would only wait for the rendezvous store several
    # seconds, and the launcher (or a supervisor) waits for this exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _rank(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    # the default group only sets the ranks up (loading may take long); requests use one with --rank-timeout
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=1))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpus = torch.cuda.device_count() if args.rank_device != "cpu" else 0
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (local_rank, gpus))
    try:
        device = rank_device(args.rank_device, everyone, dist.get_rank())
    except NeurotapError as error:
        if dist.get_rank() == 0:
            print(f"neurotap serve: {error}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.get_rank() == 0:
        return _serve(args, device)
    # the launcher forwards SIGTERM to every rank at once; rank 0 finishes its requests and then says stop
    # (after a failure, every rank ends by itself: see Liveness)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ..cli.serve import settings_of
    from .executor import follow

    return follow(args.model, settings_of(args, []), args.rank_timeout, device)


def rank_device(choice: str, everyone: list[tuple[int, int]], rank: int) -> torch.device:
    """Where rank ``rank`` computes, given every rank's ``(LOCAL_RANK, GPUs its machine has)``: with ``choice``
    "auto", its own GPU (``cuda:LOCAL_RANK``) if every rank has one, else the CPU; "cuda" the same, refused if
    some rank has none; "cpu" the CPU. All ranks decide alike, since the pipeline between them speaks one
    backend (NCCL between GPUs, gloo on the CPU), and NCCL needs a GPU of its own for each rank."""
    if choice == "cpu":
        return torch.device("cpu")
    lacking = [r for r, (local_rank, gpus) in enumerate(everyone) if local_rank >= gpus]
    if not lacking:
        return torch.device("cuda", everyone[rank][0])
    if choice == "cuda":
        local_rank, gpus = everyone[lacking[0]]
        raise NeurotapError(
            f"--rank-device cuda puts each rank on a GPU of its own (cuda:LOCAL_RANK), but rank {lacking[0]} is "
            f"local rank {local_rank} on a machine with {gpus} GPU(s): start at most as many ranks on each machine "
            "as it has GPUs, or pass --rank-device cpu"
        )
    return torch.device("cpu")


def _serve(args: argparse.Namespace, device: torch.device) -> int:
    from ..cli.serve import settings_of
    from ..transport.server import is_loopback, read_tokens, serve
    from .executor import ShardedExecutor, exit_soon

    try:
        tokens = read_tokens(args.token_file) if args.token_file else []
        if not is_loopback(args.host) and not tokens:
            raise NeurotapError(f"refusing to listen on {args.host} without tokens; pass --token-file FILE")
        settings = settings_of(args, tokens)
        settings.check()
        executor = ShardedExecutor(
            args.model, settings, rank_timeout=args.rank_timeout, on_failure=exit_soon(0.5, 5), device=device
        )
    except NeurotapError as error:
        print(f"neurotap serve: {error}", file=sys.stderr)
        return 2
    try:
        serve(executor, settings, host=args.host, port=args.port)
    except NeurotapError as error:
        print(f"neurotap serve: {error}", file=sys.stderr)
        return 1
    finally:
        executor.stop()
    return 1 if executor.failed is not None else 0
