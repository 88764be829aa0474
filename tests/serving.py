"""A real ``neurotap serve`` process on 127.0.0.1 for the tests that talk to one over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

LAUNCH = "import sys; from neurotap.cli import main; sys.exit(main())"


ALPHA, BETA = "alpha-token-0123456789", "beta-token-0123456789"  # two researchers' tokens


def write_token_file(folder: Path) -> Path:
    """``folder/tokens.txt`` holding :data:`ALPHA` and :data:`BETA` as ``--token-file`` reads them, with a comment
    and a blank line that it skips."""
    path = folder / "tokens.txt"
    path.write_text(f"# researchers\n{ALPHA}\n\n{BETA}\n")
    return path


WORDS = "the a of to and in is it that was capital france paris city river old new".split()


def word_tokenizer():
    """A word-level tokenizer of :data:`WORDS` (ids 2 and up; 0 unknown, 1 padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<unk>", "<pad>", *WORDS])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>")


def save_with_word_tokenizer(module, path: Path) -> Path:
    """``module`` saved as a model folder with a word-level tokenizer of :data:`WORDS`, so that text works."""
    module.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


class Server:
    """``neurotap serve FOLDER --port 0 ARGS`` in a subprocess, its stderr kept in ``log``; ``url`` once it listens.

    ``command="inspect"`` runs ``neurotap inspect``, which serves the same way. ``env`` adds to its
    environment. With ``wait=False`` it returns as soon as the process is started, so that several
    servers load at once; ``wait()`` then waits for this one to listen. ``with Server(...) as server:``
    stops it on leaving the block, a failing test included.
    """

    stop_timeout = 30.0

    def __init__(
        self,
        folder: Path | str,
        *args: str,
        command: str = "serve",
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, command, str(folder), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.log: list[str] = []
        self._drain = threading.Thread(target=self._drain_stderr, daemon=True)
        self._drain.start()
        self.url = ""
        if wait:
            self.wait()

    def wait(self) -> None:
        line = self.process.stdout.readline()  # "neurotap: serving ... on http://127.0.0.1:PORT"
        if " on http://" not in line:
            Server.stop(self)  # not a subclass's stop, which may end what its __init__ had yet to make
            raise RuntimeError(f"the server did not start: {line!r}\n{''.join(self.log)}")
        self.url = line.split(" on ")[1].split()[0]
        self.port = int(self.url.rsplit(":", 1)[1])

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _drain_stderr(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._drain.join(10)
        self.process.stdout.close()
        self.process.stderr.close()
        return self.process.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def concurrently(url: str, clients: int, work: Callable[[int, Any], Any]) -> dict[int, Any]:
    """``work(c, rm)`` for each client ``c``, each in a thread of its own with its own connection, started
    together; what each returned, by client. An error in any client fails the caller."""
    import neurotap as nt

    got: dict[int, Any] = {}
    errors: list[Exception] = []
    barrier = threading.Barrier(clients)

    def run(c: int) -> None:
        try:
            with nt.connect(url) as rm:
                barrier.wait()
                got[c] = work(c, rm)
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return got


def restored_probabilities(layers, model, clean_ids, corrupt_ids, token: int):
    """By hand, with plain hooks: ``token``'s probability at the last position of the corrupt run with each
    decoder layer's output at one position put back from the clean run (layers × positions)."""
    import torch

    saved = {}
    handles = [
        layer.register_forward_hook(lambda m, a, out, i=i: saved.update({i: out.clone()}))
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        model(clean_ids)
    for handle in handles:
        handle.remove()
    expected = torch.zeros(len(layers), clean_ids.shape[1])
    for i, layer in enumerate(layers):
        for j in range(clean_ids.shape[1]):

            def restore(m, a, out, i=i, j=j):
                out = out.clone()
                out[:, j] = saved[i][:, j]
                return out

            handle = layer.register_forward_hook(restore)
            with torch.no_grad():
                expected[i, j] = model(corrupt_ids).logits[0, -1].softmax(-1)[token]
            handle.remove()
    return expected
