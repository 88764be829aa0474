"""A real ``neurotap serve`` process shared by many: no client holds back others' requests or the server's resources."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

import neurotap as nt
from conftest import VOCAB, tiny_llama
from neurotap.transport.executor import InProcessExecutor
from neurotap.transport.wire import PROTOCOL, PROTOCOL_HEADER, SESSION_HEADER, ProbeSpec, RunRequest
from neurotap.transport.worker import BatchWorker
from serving import ALPHA, BETA, Server


def ids(seed: int, length: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ranks", [[], ["--ranks", "2"]], ids=["one-process", "2-ranks"])
def test_one_tokens_flood_of_long_requests_does_not_hold_anothers(ranks, folder, token_file, tmp_path):
    """Runs waited in one queue in arrival order, and a batch answered all its requests at its end: a token that
    queued many long requests kept every other token waiting for all of them. Now a batch takes the tokens' runs
    in turns, answers each at the end of its pass, and stops between passes for a token that is waiting; a sharded
    server's ranks stop alike."""
    started = tmp_path / "passes"  # a file for each long pass begun
    started.mkdir()

    def stall(ctx, value, started=str(started)):
        import os

        open(os.path.join(started, str(time.monotonic_ns())), "w").close()
        time.sleep(0.6)

    flood = 8  # more than a batch takes
    with Server(
        folder, "--token-file", str(token_file), "--allow-code", "--request-timeout", "60", "--max-batch", "4", *ranks
    ) as server:
        answered: list[str] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def long_request(k: int) -> None:
            try:
                with nt.connect(server.url, token=ALPHA) as rm:
                    # stop_at: each runs in a pass of its own, as requests too large to share one would
                    rm.forward(
                        ids(k), stop_at="model.layers.1.output", probes=[nt.probe("model.layers.0.output", stall)]
                    )
                with lock:
                    answered.append(f"alpha-{k}")
            except BaseException as error:  # shown by the assertion below
                errors.append(error)

        threads = [threading.Thread(target=long_request, args=(k,)) for k in range(flood)]
        with nt.connect(server.url, token=BETA) as other:
            for thread in threads:
                thread.start()
            while len(list(started.iterdir())) < 2:  # the flood is queued, and a batch of it under way
                time.sleep(0.02)
            logits = other.forward(ids(99), outputs=["logits"]).logits
            with lock:
                answered.append("beta")
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        assert len(answered) == flood + 1
        # the first pass and the one under way when it arrived ran before it; the rest of the flood after
        assert answered.index("beta") <= 2, answered
        with torch.no_grad():
            expected = nt.load(str(folder)).module(ids(99)).logits
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_runs_whose_clients_went_away_do_not_hold_their_owners_next_run():
    """A batch stops between passes for a waiting run of an owner with none left in the batch, but runs their
    client had given up on (one that timed out and sent its request again) still counted as left: the new run
    waited behind every pass of another owner's flood in the batch. Now a run nobody awaits holds nothing back."""
    worker = BatchWorker(InProcessExecutor(nt.wrap(tiny_llama())), max_batch=8, window=0)
    passes: list[str] = []
    retry: list = []

    def request(owner: str, label: str, seed: int) -> RunRequest:
        def noted(ctx, value):
            passes.append(label)
            if label == "beta-1":  # the first pass is under way: alpha's client gives up on its runs and retries
                for given_up, future in alpha:
                    given_up.cancelled = True
                    future.cancel()
                retry.append(worker.run(request("alpha", "alpha-retry", 9)))

        # stop_at: each runs in a pass of its own; one session each, so their order is the queue's alone
        probes = [ProbeSpec("model.layers.0.output", noted)]
        return RunRequest(
            "forward", (ids(seed),), probes=probes, stop_at="model.layers.1.output", session=label, owner=owner
        )

    gate = threading.Event()
    worker.call(gate.wait)  # the worker waits while the runs queue up, so that one batch takes them all
    beta = [worker.run(request("beta", f"beta-{k}", k)) for k in range(1, 5)]
    alpha = [(r, worker.run(r)) for r in (request("alpha", f"alpha-{k}", 10 + k) for k in range(1, 4))]
    gate.set()
    try:
        for future in beta:
            assert future.result(30).error is None
        assert retry[0].result(30).error is None
    finally:
        worker.stop(30)
    assert all(future.cancelled() for _, future in alpha)
    # the batch stopped after the pass under way; the next took the two owners in turns, beta's first
    assert passes == ["beta-1", "beta-2", "alpha-retry", "beta-3", "beta-4"]


def test_a_client_that_takes_its_answer_too_slowly_is_reset_and_holds_nothing(folder, token_file):
    """An answer small enough for the kernel's send queue (a few MiB) left the server's hands at once: the
    connection was closed at --header-timeout, and the kernel went on offering the answer for minutes to a
    client that took a byte now and then, outside the connection cap. Now an answer must be taken within
    --body-timeout plus a second per MiB; past that the connection is reset and what it held is discarded."""
    with Server(folder, "--token-file", str(token_file), "--header-timeout", "1", "--body-timeout", "1") as server:
        with nt.connect(server.url, token=ALPHA) as rm:
            rows = ids(7, length=64).expand(64, -1)  # 64 x 64 x 128 floats of the MLP product: 2 MiB
            rm.forward(rows, probes=[nt.probe("model.layers.0.mlp.mul", nt.Record())], outputs=[])
            reader = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.connect(("127.0.0.1", server.port))
            reader.sendall(
                f"GET /v1/recordings HTTP/1.1\r\nHost: 127.0.0.1\r\n{PROTOCOL_HEADER}: {PROTOCOL}\r\n"
                f"Authorization: Bearer {ALPHA}\r\n{SESSION_HEADER}: {rm._session}\r\n\r\n".encode()
            )
            reader.settimeout(5)
            received = 0
            for _ in range(300):  # a byte every 0.1 s, for at most 30 s, until the server gives up on it
                if any("connection reset" in line for line in server.log):
                    break
                received += len(reader.recv(1))
                time.sleep(0.1)
            ending = "still open"
            try:  # then as fast as it comes: only what reached this end before the reset
                while chunk := reader.recv(65536):
                    received += len(chunk)
                ending = "closed"
            except ConnectionResetError:
                ending = "reset"
            except TimeoutError:
                pass
            reader.close()
            assert ending == "reset" and received < 1 << 20, (ending, received)
            assert any("connection reset" in line for line in server.log), "".join(server.log[-5:])
            assert rm.forward(ids(8), outputs=["logits"]).logits.shape == (1, 6, VOCAB)
