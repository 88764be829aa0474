"""``neurotap inspect [MODEL]``: serve a model as ``neurotap serve`` does, and open its web inspector in a browser."""

from __future__ import annotations

import argparse
import socket
import threading
import time

from . import serve


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    # the same options as serve, from serve's own parser, so that the two never drift apart
    template = serve.add_parser(argparse.ArgumentParser(add_help=False).add_subparsers())
    return subparsers.add_parser(
        "inspect",
        parents=[template],
        add_help=False,
        help="serve a model and open the web inspector in a browser",
        description="Serve a model exactly as `neurotap serve` does (same options and limits), then open the "
        "web inspector (GET /) in a browser once the server answers. With --token-file, the page asks for a token.",
    )


def run(args: argparse.Namespace) -> int:
    if args.port == 0:  # the page's address must be known before the server prints it
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            args.port = sock.getsockname()[1]
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{f'[{host}]' if ':' in host else host}:{args.port}/"
    threading.Thread(target=_open_when_up, args=(url,), daemon=True, name="neurotap-open-browser").start()
    return serve.run(args)


def _open_when_up(url: str) -> None:
    """Open ``url`` in a browser once the server answers; a model can take minutes to load."""
    import webbrowser

    import httpx

    while True:
        try:
            if httpx.get(url + "health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    print(f"neurotap: the inspector is at {url}", flush=True)
    webbrowser.open(url)
