"""``neurotap serve --ranks N``: a model split over N gloo ranks, against the same model in this process.

One server per rank count serves the whole module (starting ranks is the slow
part); the last test kills a rank of each (the two-rank server loses one, the
three-rank server's middle rank hangs), and the test on the real SmolLM2 stops
its server cleanly.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import neurotap as nt
import serving
from conftest import VOCAB, local_recordings, tiny_llama
from neurotap.transport.wire import (
    MEDIA_TYPE,
    PROTOCOL,
    PROTOCOL_HEADER,
    SESSION_HEADER,
    ProbeSpec,
    RunRequest,
    encode_request,
)

RANK_TIMEOUT = 8  # seconds; a failed server exits within this plus EXIT_WITHIN
EXIT_WITHIN = 10
LAYERS = 4  # 2 ranks: layers 0-1 and 2-3; 3 ranks: 0-1, 2 and 3
FIRST, LAST = "model.layers.0", f"model.layers.{LAYERS - 1}"


def tiny_deep_llama():
    """The conftest tiny Llama with four decoder layers, so that three ranks each get some."""
    import transformers

    base = tiny_llama()
    config = transformers.LlamaConfig(**{**base.config.to_dict(), "num_hidden_layers": LAYERS})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    # not conftest's folder: four decoder layers, so that each of three ranks gets some
    return serving.save_with_word_tokenizer(tiny_deep_llama(), tmp_path_factory.mktemp("tiny-deep"))


class Server(serving.Server):
    """``neurotap serve FOLDER --ranks N`` in a subprocess; ``url`` once rank 0 listens."""

    stop_timeout = 60.0

    def __init__(self, folder: Path, ranks: int, *args: str, env: dict[str, str] | None = None) -> None:
        self.ranks = ranks
        self.killed = False
        super().__init__(folder, "--ranks", str(ranks), *args, env=env)

    def info(self) -> dict:
        return httpx.get(self.url + "/v1/info", headers={PROTOCOL_HEADER: str(PROTOCOL)}).json()


RANK_0_ONLY = '''"""A probe that only rank 0 of a sharded server can import (each rank has RANK in its environment)."""
import os

if os.environ.get("RANK", "0") != "0":
    raise ImportError("this module is importable on rank 0 only")


def record(ctx, value):
    ctx.seen = value.detach().clone()
'''


@pytest.fixture(scope="module")
def rank_0_only(tmp_path_factory) -> Path:
    """A folder on the servers' path with a module that rank 0 and this process import, and no other rank."""
    found = tmp_path_factory.mktemp("rank-0-only")
    (found / "neurotap_rank_0_only.py").write_text(RANK_0_ONLY)
    return found


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def server(request, folder, rank_0_only):
    running = Server(
        folder,
        request.param,
        "--allow-code",
        "--rank-timeout",
        str(RANK_TIMEOUT),
        "--max-session-bytes",
        "300000",
        "--max-total-bytes",
        "450000",
        "--request-timeout",
        "8",
        env={"PYTHONPATH": os.pathsep.join([str(rank_0_only), os.environ.get("PYTHONPATH", "")])},
    )
    yield running
    code = running.stop()
    assert running.killed, "the last test stops the server"
    assert code != 0, "".join(running.log)


@pytest.fixture(scope="module")
def one_process(folder):
    """The same model served by one process, for what the tests compare with the one-process server itself."""
    running = serving.Server(folder, "--allow-code")
    yield running
    running.stop()


@pytest.fixture
def remote(server):
    assert not server.killed
    with nt.connect(server.url) as rm:
        yield rm


def ids(seed: int, rows: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(2, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected.detach(), rtol=1e-5, atol=1e-5)


# -- how the model is split ------------------------------------------------------------------------


def test_info_says_which_rank_owns_which_layers(server, remote, local):
    ranks = remote.info()["ranks"]
    layers = [layer for row in ranks for layer in range(*row["layers"])]
    assert layers == list(range(LAYERS))  # contiguous, in rank order, each layer once
    assert "model.embed_tokens" in ranks[0]["parts"]
    assert {"model.norm", "lm_head"} <= set(ranks[-1]["parts"])
    on_gpus = torch.cuda.device_count() >= server.ranks  # --rank-device auto: a GPU for each rank, else the CPU
    assert [row["device"] for row in ranks] == [f"cuda:{r}" if on_gpus else "cpu" for r in range(server.ranks)]
    assert all(row["peak_rss_mb"] > 0 and (row["peak_gpu_mb"] is None) != on_gpus for row in ranks)
    assert len({row["pid"] for row in ranks}) == server.ranks
    assert server.info()["parameters"] == sum(p.numel() for p in local.module.parameters())


def listening_addresses(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, local address) of every TCP socket the processes ``pids`` listen on, read from /proc."""
    inodes: dict[str, int] = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/net/{table}") as rows:
            for row in list(rows)[1:]:
                local, state, inode = row.split()[1], row.split()[3], row.split()[9]
                if state == "0A" and inode in inodes:  # 0A: LISTEN
                    found.append((inodes[inode], local.rpartition(":")[0]))
    return found


def test_every_socket_the_ranks_and_their_launcher_listen_on_is_on_loopback(server):
    """Nothing of a one-machine sharded server (its rendezvous store above all, which any writer could use to
    declare a rank failed) can be reached from another machine."""
    ranks = {row["pid"] for row in server.info()["ranks"]}
    processes = ranks | {server.process.pid}
    listening = listening_addresses(processes)
    assert {pid for pid, _ in listening} == processes  # the launcher's store, the ranks' HTTP server and gloo
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    assert all(address in loopback for _, address in listening), listening


def status_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field + ":"))


def resident_mb(pid: int, path: Path) -> float:
    """What of the file at ``path`` the process holds in memory, in all its mappings of it (/proc/PID/smaps)."""
    resident, inside = 0.0, False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header: "start-end perms offset dev inode path"
                inside = line.rstrip("\n").endswith(str(path))
            elif inside and first == "Rss:":
                resident += int(line.split()[1]) / 1024
    return resident


def test_each_ranks_peak_rss_once_loaded_holds_its_weights(tmp_path):
    import transformers

    # weights large enough to tell apart from what a rank's startup allocates: ~87 MB a rank
    config = transformers.LlamaConfig(
        vocab_size=16384,
        hidden_size=512,
        intermediate_size=8192,
        num_hidden_layers=2,
        num_attention_heads=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    module = transformers.LlamaForCausalLM(config).eval()
    module.save_pretrained(tmp_path)
    owned = [("model.embed_tokens", "model.layers.0."), ("model.layers.1.", "model.norm", "lm_head")]
    weights_mb = [
        sum(t.nbytes for name, t in module.state_dict().items() if name.startswith(parts)) / 2**20 for parts in owned
    ]
    del module
    server = Server(tmp_path, 2)
    try:
        ranks = server.info()["ranks"]  # no request yet: all a rank holds is what it loaded and its startup
        for row, weights in zip(ranks, weights_mb):
            peak = status_mb(row["pid"], "VmHWM")
            assert row["peak_rss_mb"] <= peak + 0.1 and peak - row["peak_rss_mb"] < 2
            # every page of the rank's own tensors is in memory (none left to be read by the first requests) ...
            assert resident_mb(row["pid"], tmp_path / "model.safetensors") >= weights
            # ... and was already when the rank measured its peak once loaded: the inventory's dry run and the
            # HTTP server, after it, add little
            assert row["peak_rss_mb_after_load"] <= row["peak_rss_mb"]
            assert row["peak_rss_mb"] - row["peak_rss_mb_after_load"] < weights / 3
    finally:
        assert server.stop() == 0, "".join(server.log)


def test_points_and_aliases_are_those_of_one_process(remote, local):
    assert remote.points() == local.points()
    assert remote.points(f"{LAST}.mlp") == local.points(f"{LAST}.mlp")
    assert remote.aliases() == local.aliases()


def test_parameters_come_from_the_owning_rank(remote, local):
    for name in ("model.embed_tokens.weight", f"{LAST}.mlp.up_proj.weight", "lm_head.weight"):
        assert torch.equal(remote.get_parameter(name), local.get_parameter(name).detach())


# -- equivalence with one process ------------------------------------------------------------------


def test_logits_equal_one_process(remote, local):
    x = ids(1)
    close(remote.forward(x)["logits"], local.forward(x).logits)


def test_recordings_on_the_first_and_last_stage_in_one_request(remote, local):
    x = ids(2)
    points = [
        "model.embed_tokens.output",
        f"{FIRST}.mlp.mul",
        f"{FIRST}.self_attn.attention_interface.softmax",
        "model.layers.2.output",
        f"{LAST}.mlp.mul",
        "model.norm.output",
        "lm_head.output",
        "model.rotary_emb.output[0]",  # glue every rank computes for itself
        "blocks.1.resid_post",  # an alias
    ]
    probes = [nt.probe(p, nt.Record()) for p in points]
    remote.forward(x, probes=probes)
    local.forward(x, probes=probes)
    got, want = remote.recordings(), local_recordings(local)
    assert set(got) == set(want) == set(points)
    for point in points:
        assert len(got[point]["record"]) == len(want[point]["record"]) == 1, point
        close(got[point]["record"][0], want[point]["record"][0])
    remote.clear_recordings()
    assert remote.recordings() == {}


def test_patches_inside_an_mlp_and_on_the_output_change_what_comes_after(remote, local):
    x = ids(3)
    patches = {
        "model.layers.1.mlp.mul": nt.Zero(index=(..., slice(0, 40))),
        f"{LAST}.output": nt.Scale(0.5),
        'output["logits"]': nt.Add(1.0, index=(..., 5)),
    }
    probes = [nt.probe(f"{LAST}.mlp.mul", nt.Record())]
    with remote.patch(patches):
        got = remote.forward(x, probes=probes)["logits"]
    with local.patch(patches):
        want = local.forward(x, probes=probes).logits
    close(got, want)
    assert not torch.allclose(got, local.forward(x).logits)  # the patches did change something
    close(remote.recordings()[f"{LAST}.mlp.mul"]["record"][0], local_recordings(local)[f"{LAST}.mlp.mul"]["record"][0])
    remote.clear_recordings()


def test_reductions_accumulate_over_requests_on_every_stage(remote, local):
    points = [f"{FIRST}.mlp.mul", f"{LAST}.mlp.mul", "model.norm.output"]
    for seed in (4, 5, 6):
        probes = [nt.probe(p, nt.Mean(dims=(0, 1))) for p in points] + [nt.probe(points[1], nt.Max(dims=(0, 1)))]
        remote.forward(ids(seed), probes=probes)
        local.forward(ids(seed), probes=probes)
    got, want = remote.recordings(), local_recordings(local)
    for point in points:
        assert got[point]["mean_count"] == want[point]["mean_count"]
        close(got[point]["mean"], want[point]["mean"])
    close(got[points[1]]["max"], want[points[1]]["max"])
    remote.clear_recordings()


def test_generate_with_the_kv_cache_and_patches_at_every_step(remote, local):
    x = ids(7, rows=1, length=5)
    patches = {"lm_head.output": nt.Zero(index=(..., 44)), f"{LAST}.mlp.mul": nt.Scale(1.5)}
    probes = [nt.probe(f"{FIRST}.mlp.mul", nt.Record()), nt.probe(f"{LAST}.self_attn.output[0]", nt.Record())]
    with remote.patch(patches):
        got = remote.generate(x, max_new_tokens=6, do_sample=False, probes=probes)
    with local.patch(patches):
        want = local.generate(x, max_new_tokens=6, do_sample=False, probes=probes)
    assert torch.equal(got, want)
    recorded, expected = remote.recordings(), local_recordings(local)
    for point in (f"{FIRST}.mlp.mul", f"{LAST}.self_attn.output[0]"):
        assert len(recorded[point]["record"]) == len(expected[point]["record"]) == 6  # the prompt, then 1 a step
        for a, b in zip(recorded[point]["record"], expected[point]["record"]):
            close(a, b)
    remote.clear_recordings()


def test_a_traced_generate_has_every_steps_values_from_every_stage_in_execution_order(remote, local):
    x = ids(25, rows=1, length=5)
    patches = {f"{FIRST}.mlp.mul": nt.Scale(0.5), "lm_head.output": nt.Zero(index=(..., 44))}  # at every step
    record = [
        "model.rotary_emb.output[0]",
        f"{FIRST}.mlp.mul",
        "model.layers.2.output",
        f"{LAST}.mlp.mul",
        "lm_head.output",
    ]
    with remote.patch(patches):
        got, trace = remote.run(x, record=record, generate=True, max_new_tokens=4, do_sample=False)

    expected: dict[str, list] = {point: [] for point in record}  # hand hooks on the unwrapped model's generate
    modules = dict(local.module.named_modules())

    def keeper(point, edit=None):
        def hook(module, args, output):
            value = output[0] if point.endswith("[0]") else output
            if edit is not None:
                value = edit(value)
            expected[point].append(value.detach().clone())
            return value if edit is not None else None

        return hook

    def zero_44(value):
        value = value.clone()
        value[..., 44] = 0
        return value

    def product_halved(module, args):  # the MLP's product, scaled before down_proj reads it
        return (args[0] * 0.5,)

    handles = [
        modules["model.rotary_emb"].register_forward_hook(keeper("model.rotary_emb.output[0]")),
        modules[f"{FIRST}.mlp.down_proj"].register_forward_pre_hook(product_halved),
        modules[f"{FIRST}.mlp.down_proj"].register_forward_pre_hook(
            lambda m, a: expected[record[1]].append(a[0].clone())
        ),
        modules["model.layers.2"].register_forward_hook(keeper("model.layers.2.output")),
        modules[f"{LAST}.mlp.down_proj"].register_forward_pre_hook(
            lambda m, a: expected[record[3]].append(a[0].clone())
        ),
        modules["lm_head"].register_forward_hook(keeper("lm_head.output", zero_44)),
    ]
    try:
        with torch.no_grad():
            want = local.module.generate(x, max_new_tokens=4, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(got, want)
    assert trace.points == record  # in execution order, across the ranks
    for point in record:
        assert len(trace.calls(point)) == len(expected[point]) == 4, point  # the prompt's pass, then 1 a step
        for a, b in zip(trace.calls(point), expected[point]):
            close(a, b)
    assert remote.recordings() == {}


def test_backward_gradients_flow_back_through_every_stage(remote, local):
    x = ids(13)
    points = ["model.embed_tokens.output", f"{FIRST}.mlp.mul", "model.layers.2.output", f"{LAST}.mlp.mul"]
    probes = [nt.probe(p, nt.Record(), grad=True) for p in points] + [nt.probe(f"{FIRST}.output", nt.Record())]
    patches = {f"{LAST}.mlp.mul": nt.Scale(0.5), f"{FIRST}.mlp.mul": nt.Zero(index=(..., 3))}
    with remote.patch(patches):
        got = remote.backward(x, loss=nt.CrossEntropy(ids(14)), probes=probes)
    with local.patch(patches):
        want = local.backward(x, loss=nt.CrossEntropy(ids(14)), probes=probes)
    assert got == pytest.approx(want, rel=1e-6)
    recorded, expected = remote.recordings(), local_recordings(local)
    assert set(recorded) == set(expected) == {p + ".grad" for p in points} | {f"{FIRST}.output"}
    for name in expected:
        close(recorded[name]["record"][0], expected[name]["record"][0])
    remote.clear_recordings()

    def surprise(output):  # a loss function (code: the server runs with --allow-code), taken on the last rank
        return output.logits[:, -1].logsumexp(-1).mean()

    _, got = remote.run(x, grad=points, loss=surprise)
    _, want = local.run(x, grad=points, loss=surprise)
    assert got.loss == pytest.approx(want.loss, rel=1e-6)
    for point in points:
        close(got.grad[point], want.grad[point])


def test_a_failing_gradient_patch_on_the_first_stage_fails_only_its_request(remote, local):
    x = ids(15)
    bad = nt.probe(f"{FIRST}.mlp.mul", nt.Replace(torch.zeros(3)), grad=True)  # raises on rank 0, last of all
    with pytest.raises(nt.PatchError, match="grad"):
        remote.backward(x, loss=nt.LogitDiff(3, 4), probes=[bad, nt.probe(f"{LAST}.mlp.mul", nt.Record())])
    assert remote.recordings() == {}
    assert remote.backward(x, loss=nt.LogitDiff(3, 4)) == pytest.approx(local.backward(x, loss=nt.LogitDiff(3, 4)))


def test_hidden_states_attentions_and_raw_logits_come_from_every_stage(remote, local):
    x = ids(23)
    got = remote.forward(x, output_hidden_states=True, output_attentions=True)
    want = local.forward(x, output_hidden_states=True, output_attentions=True)
    assert len(got["hidden_states"]) == len(want.hidden_states) == LAYERS + 1
    assert len(got["attentions"]) == len(want.attentions) == LAYERS
    for a, b in [*zip(got["hidden_states"], want.hidden_states), *zip(got["attentions"], want.attentions)]:
        close(a, b)

    prompt = ids(24, rows=1, length=5)
    settings = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True}
    flags = {"output_logits": True, "output_scores": True, "output_hidden_states": True}
    with remote.patch({"lm_head.output": nt.Scale(2.0)}):
        got = remote.generate(prompt, **settings, **flags)
    with local.patch({"lm_head.output": nt.Scale(2.0)}):
        want = local.generate(prompt, **settings, **flags)
    assert torch.equal(got["sequences"], want.sequences)
    for field in ("logits", "scores"):  # the raw logits, as the last rank's head returned them
        assert len(got[field]) == len(want[field]) == 4
        for a, b in zip(got[field], want[field]):
            close(a, b)
    assert len(got["hidden_states"]) == len(want.hidden_states) == 4
    for got_step, want_step in zip(got["hidden_states"], want.hidden_states):
        assert len(got_step) == len(want_step) == LAYERS + 1
        for a, b in zip(got_step, want_step):
            close(a, b)


def test_the_last_ranks_logits_travel_only_to_an_answer_that_holds_them(remote, local):
    x = ids(48)
    hidden = local.module.config.hidden_size

    def sent() -> torch.Tensor:  # what each rank has sent down the pipeline since it started, in bytes
        return torch.tensor([row["sent_bytes"] for row in remote.info()["ranks"]])

    before = sent()
    assert remote.forward(x, outputs=[]) is None
    nothing = sent() - before
    logits = remote.forward(x)["logits"]
    close(logits, local.forward(x).logits)
    everything = sent() - before - nothing
    assert nothing[-1] == 0  # in a forward, the last rank sends nothing but the logits
    assert 0 < everything[-1] - logits.nbytes <= 64  # the logits and a header
    assert torch.equal(nothing[:-1], everything[:-1])  # the hidden states, as before
    before = sent()
    remote.backward(x, loss=nt.CrossEntropy(ids(49)))
    backward = sent() - before
    assert 0 < backward[-1] - x.numel() * hidden * 4 <= 64  # the gradient at its input only, no logits


def test_patterns_and_traces_work_across_stages(remote, local):
    x = ids(21)
    probes = [nt.probe("model.layers.*.mlp.mul", nt.Mean(dims=(0, 1)))]  # one probe on every rank's layers
    close(remote.forward(x, probes=probes)["logits"], local.forward(x, probes=probes).logits)
    got, want = remote.recordings(), local_recordings(local)
    assert set(got) == set(want) == {f"model.layers.{i}.mlp.mul" for i in range(LAYERS)}
    for name in want:
        close(got[name]["mean"], want[name]["mean"])
    remote.clear_recordings()

    record = ["blocks.*.resid_post", "model.embed_tokens.output", "lm_head.output"]
    output, trace = remote.run(x, record=record, grad="model.layers.{0..3}.output", loss=nt.LogitDiff(3, 4))
    expected_output, expected = local.run(x, record=record, grad="model.layers.{0..3}.output", loss=nt.LogitDiff(3, 4))
    close(output["logits"], expected_output.logits)
    assert trace.points == expected.points  # in execution order, across the ranks
    assert trace.grad.points == expected.grad.points
    for name in expected.points:
        close(trace[name], expected[name])
    for name in expected.grad.points:
        close(trace.grad[name], expected.grad[name])
    assert trace.loss == pytest.approx(expected.loss, rel=1e-6)
    assert remote.recordings() == {}  # a trace goes back with the answer, not into the session


def test_recordings_are_metered_at_every_probe_call(remote):
    def never(ctx, value):
        raise AssertionError("the pass went on after its recordings outgrew the session's limit")

    x = ids(19, rows=8, length=64)  # each recorded value: 262144 bytes, the limit 300000
    probes = [
        nt.probe(f"{LAST}.mlp.mul", nt.Record()),
        nt.probe("lm_head.output", nt.Record()),  # the second value: over the limit while the pass runs
        nt.probe('output["logits"]', never),
    ]
    with pytest.raises(nt.NeurotapError, match="the probes of this request recorded") as raised:
        remote.forward(x, probes=probes)
    assert raised.value.status == 413
    assert remote.recordings() == {}


# -- batching --------------------------------------------------------------------------------------


def queued_behind_a_slow_request(server, tmp_path, calls):
    """Each of ``calls`` (a function of a client) from its own client, all sent while the server is busy with
    another client's slow request, so that they queue up and the server's next batch takes them all.

    Returns their results (or the exceptions they raised), the clients (still open, for their recordings) and
    how many requests, passes and padded passes the server ran meanwhile.
    """
    import concurrent.futures

    started = tmp_path / "started"

    def slow(ctx, value, started=str(started)):
        import pathlib
        import time

        pathlib.Path(started).touch()
        time.sleep(2.0)

    def counts():
        info = server.info()
        return torch.tensor([info["requests"], info["passes"], info["padded_passes"]])

    clients = [nt.connect(server.url) for _ in calls]  # connected first: a connection asks the server too
    blocker = nt.connect(server.url)
    before = counts()
    with concurrent.futures.ThreadPoolExecutor(len(calls) + 1) as pool:
        blocked = pool.submit(blocker.forward, ids(29), probes=[nt.probe(f"{FIRST}.mlp.mul", slow)])
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline and not blocked.done(), "the slow request did not start"
            time.sleep(0.02)
        futures = [pool.submit(call, client) for call, client in zip(calls, clients)]
        blocked.result()
        results = [f.exception() or f.result() for f in futures]
    blocker.close()
    ran = counts() - before
    return results, clients, {"requests": int(ran[0]), "passes": int(ran[1]), "padded_passes": int(ran[2])}


def test_concurrent_requests_of_different_lengths_share_padded_passes_and_get_what_they_get_alone(
    server, local, tmp_path
):
    requests = [  # (op, ids, keyword arguments): probes on every stage, patches, reductions, gradients
        ("forward", [ids(30, rows=2, length=5), ids(43, rows=1, length=6)], {"probes": [
            nt.probe(f"{FIRST}.mlp.mul", nt.Record()), nt.probe(f"{LAST}.mlp.mul", nt.Mean(dims=(0, 1)))]}),
        ("forward", ids(31, rows=1, length=9), {"probes": [
            nt.probe("model.layers.2.output", nt.Scale(0.5)), nt.probe("lm_head.output", nt.Record())]}),
        ("forward", ids(32, rows=1, length=7), {"probes": [
            nt.probe("blocks.1.resid_post", nt.Record()), nt.probe(f"{LAST}.mlp.mul", nt.Zero(index=(..., 3))),
            nt.probe("model.norm.output", nt.Max(dims=(0, 1)))]}),
        ("backward", ids(33, rows=1, length=6), {"loss": nt.CrossEntropy(ids(34, rows=1, length=6)), "probes": [
            nt.probe("model.layers.2.output", nt.Record(), grad=True), nt.probe(f"{FIRST}.output", nt.Record())]}),
        ("backward", ids(35, rows=2, length=8), {"loss": nt.LogitDiff(3, 4), "probes": [
            nt.probe(f"{FIRST}.mlp.mul", nt.Record(), grad=True), nt.probe(f"{LAST}.mlp.mul", nt.Scale(2.0))]}),
        ("generate", ids(36, rows=1, length=5), {"max_new_tokens": 4, "do_sample": False, "probes": [
            nt.probe("lm_head.output", nt.Zero(index=(..., 44))), nt.probe(f"{LAST}.mlp.mul", nt.Record())]}),
        ("generate", ids(37, rows=2, length=5), {"max_new_tokens": 4, "do_sample": False, "probes": [
            nt.probe(f"{FIRST}.mlp.mul", nt.Scale(1.5))]}),
    ]  # fmt: skip

    def each(model, op, inputs, kwargs):  # a list of inputs: one request after another, the last one's answer
        return [getattr(model, op)(x, **kwargs) for x in (inputs if isinstance(inputs, list) else [inputs])][-1]

    calls = [lambda rm, op=op, x=x, kw=kw: each(rm, op, x, kw) for op, x, kw in requests]
    results, clients, ran = queued_behind_a_slow_request(server, tmp_path, calls)
    try:
        for (op, x, kw), result, client in zip(requests, results, clients):
            assert not isinstance(result, Exception), result
            want = each(local, op, x, kw)  # alone, in one process
            if op == "forward":
                close(result["logits"], want.logits)
            elif op == "backward":
                assert result == pytest.approx(want, rel=1e-5)
            else:
                assert torch.equal(result, want)
            got, expected = client.recordings(), local_recordings(local)
            assert set(got) == set(expected), op
            for name, saved in expected.items():
                assert set(got[name]) == set(saved)
                for key, value in saved.items():
                    if isinstance(value, list):
                        assert len(got[name][key]) == len(value), name
                        for a, b in zip(got[name][key], value):
                            close(a, b)
                    elif isinstance(value, torch.Tensor):
                        close(got[name][key], value)
                    else:
                        assert got[name][key] == value
    finally:
        for client in clients:
            client.close()
    # the slow request; the forwards in one padded pass, the backwards in another, the generations in one; then
    # the first client's second forward, whose reductions add to what its first one saved in the shared pass
    assert ran == {"requests": len(requests) + 2, "passes": 5, "padded_passes": 2}


def test_a_probe_raising_on_rank_1_in_a_shared_pass_fails_its_request_alone(server, local, tmp_path):
    def explode(ctx, value):
        raise ValueError("boom on rank 1")

    requests = [
        (ids(38, rows=1, length=6), [nt.probe("model.layers.2.mlp.mul", explode), nt.probe(FIRST + ".output",
                                                                                            nt.Record())]),
        (ids(39, rows=2, length=8), [nt.probe(f"{FIRST}.mlp.mul", nt.Record()), nt.probe(f"{LAST}.output",
                                                                                          nt.Record())]),
        (ids(40, rows=1, length=5), []),
    ]  # fmt: skip
    calls = [lambda rm, x=x, probes=probes: rm.forward(x, probes=probes) for x, probes in requests]
    results, clients, ran = queued_behind_a_slow_request(server, tmp_path, calls)
    try:
        assert isinstance(results[0], nt.ProbeError) and "boom on rank 1" in str(results[0])
        assert "ValueError" in (results[0].remote_traceback or "")
        assert clients[0].recordings() == {}  # rank 0's part of the failed request was not kept either
        for (x, probes), result, client in zip(requests[1:], results[1:], clients[1:]):
            close(result["logits"], local.forward(x, probes=probes).logits)
            got, expected = client.recordings(), local_recordings(local)
            assert set(got) == set(expected)
            for name in expected:
                close(got[name]["record"][0], expected[name]["record"][0])
        close(clients[0].forward(ids(41))["logits"], local.forward(ids(41)).logits)  # the ranks are in step
    finally:
        for client in clients:
            client.close()
    assert ran == {"requests": 4, "passes": 3, "padded_passes": 2}  # the slow one, the shared try, the others


def test_stop_at_ends_the_forward_on_the_rank_owning_the_point(remote, local):
    def never(ctx, value):
        raise AssertionError("a layer after the stop_at point ran")

    x = ids(42)
    for point in ("model.layers.1.output", "model.layers.2.mlp.mul", "blocks.2.resid_post", "model.norm.output"):
        probes = [nt.probe(f"{FIRST}.mlp.mul", nt.Mean(dims=(0, 1))), nt.probe("model.layers.2.mlp.mul", nt.Record())]
        if point != "model.norm.output":
            probes.append(nt.probe(f"{LAST}.mlp.mul", never))  # the last rank's layer: never reached
        got = remote.forward(x, stop_at=point, probes=probes)
        want = local.forward(x, stop_at=point, probes=probes)
        close(got, want)
        recorded, expected = remote.recordings(), local_recordings(local)
        assert set(recorded) == set(expected), point
        close(recorded[f"{FIRST}.mlp.mul"]["mean"], expected[f"{FIRST}.mlp.mul"]["mean"])
        if "model.layers.2.mlp.mul" in expected:
            close(recorded["model.layers.2.mlp.mul"]["record"][0], expected["model.layers.2.mlp.mul"]["record"][0])
        remote.clear_recordings()
    assert remote.forward(x, stop_at="model.layers.2.output", outputs=[]) is None
    close(remote.forward(x)["logits"], local.forward(x).logits)


def test_a_stop_at_point_its_rank_never_reaches_fails_as_in_one_process(remote, local):
    x = ids(43)
    record = nt.probe(f"{FIRST}.mlp.mul", nt.Record())
    for point, skipped in (
        ("args.attention_mask", None),  # not passed: fires on no rank
        ("loss_function", None),  # no labels, no loss: after the head, on the last rank
        ("model.layers.1.mlp.mul", "model.layers.1.output"),  # inside a skipped layer of rank 0's
        (f"{LAST}.mlp.mul", f"{LAST}.output"),  # ... and of the last rank's
    ):
        probes = [record, *([nt.probe(skipped, nt.Skip())] if skipped else [])]
        with pytest.raises(nt.MissedPointError) as one:
            local.forward(x, stop_at=point, probes=probes)
        local.clear_recordings()
        with pytest.raises(nt.MissedPointError) as sharded:
            remote.forward(x, stop_at=point, probes=probes)
        assert str(one.value) in str(sharded.value), point
        assert remote.recordings() == {}
    mask = torch.ones_like(x)
    close(remote.forward(x, attention_mask=mask, stop_at="args.attention_mask"), mask)  # passed: rank 0 stops there
    with pytest.raises(nt.NeurotapError) as one:
        local.forward(x, stop_at="model.layers.*.output")
    with pytest.raises(nt.NeurotapError) as sharded:
        remote.forward(x, stop_at="model.layers.*.output")
    assert "one point name" in str(one.value) and str(one.value) in str(sharded.value)
    assert sharded.value.status == 422
    close(remote.forward(x)["logits"], local.forward(x).logits)  # the ranks are in step


def test_the_models_own_loss_from_labels_is_the_one_process_servers(remote, one_process):
    x, y = ids(46), ids(47)

    def own(output):  # the model's own loss as the loss to differentiate (code: both servers run --allow-code)
        return output["loss"]

    points = ["model.embed_tokens.output", f"{FIRST}.mlp.mul", f"{LAST}.output"]
    with nt.connect(one_process.url) as single:
        for call in (
            lambda rm: rm.forward(x, labels=y, probes=[nt.probe("loss_function", nt.Record())]),
            lambda rm: rm.forward(x, labels=y, outputs=["loss"]),
        ):
            got, want = call(remote), call(single)
            assert list(got) == list(want)
            for field in want:
                close(got[field], want[field])
            recorded, expected = remote.recordings(), single.recordings()
            assert set(recorded) == set(expected)
            for name in expected:  # the loss function ran on the last rank, where the logits are
                close(recorded[name]["record"][0], expected[name]["record"][0])
            remote.clear_recordings()
            single.clear_recordings()
        probes = [nt.probe(p, nt.Record(), grad=True) for p in points]
        assert remote.backward(x, loss=own, labels=y, probes=probes) == pytest.approx(
            single.backward(x, loss=own, labels=y, probes=probes), rel=1e-6
        )
        recorded, expected = remote.recordings(), single.recordings()
        assert set(recorded) == set(expected) == {p + ".grad" for p in points}
        for name in expected:
            close(recorded[name]["record"][0], expected[name]["record"][0])
        remote.clear_recordings()
        output, got = remote.run(x, grad=points, loss=own, labels=y)
        _, want = single.run(x, grad=points, loss=own, labels=y)
        close(output["loss"], torch.tensor(want.loss))
        assert got.loss == pytest.approx(want.loss, rel=1e-6)
        for point in points:
            close(got.grad[point], want.grad[point])
        beyond = torch.full_like(y, VOCAB + 5)  # the last rank's loss function refuses it
        with pytest.raises(nt.NeurotapError) as sharded:
            remote.forward(x, labels=beyond)
        with pytest.raises(nt.NeurotapError) as one:
            single.forward(x, labels=beyond)
        assert (sharded.value.status, str(sharded.value)) == (one.value.status, str(one.value))
        close(remote.forward(x, labels=y)["loss"], single.forward(x, labels=y)["loss"])  # the ranks are in step


def assert_same_structure(got: Any, want: Any, where: str = "") -> None:
    """``got`` has ``want``'s containers, of the same types, and equal tensors in the same places."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} against {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        close(got, want)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for k, (g, w) in enumerate(zip(got, want)):
            assert_same_structure(g, w, f"{where}[{k}]")
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            assert_same_structure(got[key], want[key], f"{where}[{key!r}]")
    else:
        assert got == want, where


def test_what_a_code_probe_saves_in_any_container_comes_back_from_every_stage_as_from_one_process(remote, one_process):
    import collections
    import dataclasses
    import types

    Pair = collections.namedtuple("Pair", "first last")  # the client's own class: it travels by value

    @dataclasses.dataclass
    class Box:
        value: Any

    def saves(ctx, value):
        v = value.detach()
        ctx.saved = {
            "plain": [v[0], (v.sum(), 2.5, "x", None), [{"deep": (v * 2,)}]],
            "pair": Pair(v[:, 0], v[:, -1]),
            "top": v.topk(2),  # torch.return_types.topk, a tuple of its own kind
            "ordered": collections.OrderedDict(mean=v.mean(), count=[v.shape[1]]),
            "read_only": types.MappingProxyType({"max": v.amax()}),
            "counts": collections.defaultdict(list, rows=[v[0, 0]]),
            "by_row": {0: v[0], -1: v[-1], (1, "b"): {"a", 2}},
        }

    points = ["model.rotary_emb.output[0]", f"{FIRST}.mlp.mul", f"{LAST}.mlp.mul"]  # every rank, rank 0, the last
    x = ids(52)
    with nt.connect(one_process.url) as single:
        probes = [nt.probe(p, saves) for p in points]
        close(remote.forward(x, probes=probes)["logits"], single.forward(x, probes=probes)["logits"])
        recorded, expected = remote.recordings(), single.recordings()
        assert set(recorded) == set(expected) == set(points)
        for point in points:
            assert_same_structure(dict(recorded[point]), dict(expected[point]), point)
        remote.clear_recordings()
        single.clear_recordings()

        def unkept(ctx, value):  # kept by no server
            ctx.kept = Box(1)

        refused = []
        for server in (remote, single):
            with pytest.raises(nt.NeurotapError) as raised:
                server.forward(x, probes=[nt.probe(f"{LAST}.mlp.mul", unkept)])
            refused.append((raised.value.status, str(raised.value)))
        assert refused[0] == refused[1]
        assert remote.recordings() == {}
        close(remote.forward(x)["logits"], single.forward(x)["logits"])  # the ranks are in step


# -- errors ----------------------------------------------------------------------------------------


def test_a_failing_patch_on_the_last_stage_records_nothing_anywhere_and_the_ranks_stay_in_step(remote, local):
    x = ids(8)
    probes = [
        nt.probe(f"{FIRST}.mlp.mul", nt.Record()),  # would succeed on rank 0
        nt.probe(f"{LAST}.mlp.mul", nt.Replace(torch.zeros(3))),  # cannot fit on the last rank
    ]
    with pytest.raises(nt.PatchError, match=f"{LAST}.mlp.mul"):
        remote.forward(x, probes=probes)
    assert remote.recordings() == {}  # rank 0's part of the failed request was not committed either
    close(remote.forward(x)["logits"], local.forward(x).logits)


def test_unknown_points_and_points_no_rank_sees_whole(remote):
    with pytest.raises(nt.UnknownPointError, match="model.layers.9"):
        remote.forward(ids(9), probes=[nt.probe("model.layers.9.mlp.mul", nt.Record())])
    with pytest.raises(nt.UnknownPointError, match="model.decoder_layer"):  # a layer's call is that layer's output
        remote.forward(ids(9), probes=[nt.probe("model.decoder_layer", nt.Record())])


def test_patterns_reach_every_rank(remote, local):
    x = ids(12)
    remote.clear_recordings()
    remote.forward(x, probes=[nt.probe("model.layers.*.mlp.mul", nt.Record())])
    local.forward(x, probes=[nt.probe(f"model.layers.{i}.mlp.mul", nt.Record()) for i in range(LAYERS)])
    got, expected = remote.recordings(), local_recordings(local)
    assert set(got) == {f"model.layers.{i}.mlp.mul" for i in range(LAYERS)}  # every rank's layers
    for name in expected:
        close(got[name]["record"][0], expected[name]["record"][0])
    assert remote.points("model.layers.*.mlp.mul") == local.points("model.layers.*.mlp.mul")
    remote.clear_recordings()
    with pytest.raises(nt.UnknownPointError, match="no point matches"):
        remote.forward(x, probes=[nt.probe("model.layers.*.mull", nt.Record())])
    assert remote.recordings() == {}


def test_the_servers_limits_hold(remote):
    with pytest.raises(nt.NeurotapError, match="max_position_embeddings"):
        remote.forward(ids(16, rows=1, length=65))

    def leave(ctx, value):

        sys.exit(0)

    with pytest.raises(nt.ProbeError, match="SystemExit"):  # fails its request, not the rank that ran it
        remote.forward(ids(16), probes=[nt.probe(f"{LAST}.mlp.mul", leave)])
    remote.forward(ids(16))


def test_recording_limits_hold_for_all_ranks_together(server, local):
    x = ids(19, rows=8, length=64)  # each of these values: 8 x 64 x 128 float32, 262144 bytes
    first, last = nt.probe(f"{FIRST}.mlp.mul", nt.Record()), nt.probe("lm_head.output", nt.Record())
    with nt.connect(server.url) as one, nt.connect(server.url) as other:
        one.forward(x, probes=[first])  # rank 0 alone could keep both: the limit is for the session
        with pytest.raises(nt.NeurotapError, match="max-session-bytes"):
            one.forward(x, probes=[last])
        assert list(one.recordings()) == [f"{FIRST}.mlp.mul"]
        with pytest.raises(nt.NeurotapError, match="max-total-bytes"):  # 2 x 262144 over 450000
            other.forward(x, probes=[last])
        assert other.recordings() == {}
        one.clear_recordings()
        other.forward(x, probes=[last])
        assert list(other.recordings()) == ["lm_head.output"]


def test_each_tokens_share_of_the_recording_limit_holds_for_all_ranks_together(folder, tmp_path):
    tokens = ["first-token-0123456789", "second-token-0123456789"]
    (tmp_path / "tokens").write_text("\n".join(tokens))
    x = ids(19, rows=8, length=64)  # each of these values: 262144 bytes; each token's share 600000 / 2
    first, last = nt.probe(f"{FIRST}.mlp.mul", nt.Record()), nt.probe("lm_head.output", nt.Record())
    limits = ["--max-session-bytes", "300000", "--max-total-bytes", "600000"]
    server = Server(folder, 2, "--token-file", str(tmp_path / "tokens"), *limits)
    try:
        with nt.connect(server.url, token=tokens[0]) as one, nt.connect(server.url, token=tokens[0]) as same:
            one.forward(x, probes=[first])  # on rank 0
            with pytest.raises(nt.NeurotapError, match="your token's sessions") as refused:
                same.forward(x, probes=[last])  # on the last rank: 524288 bytes for the token, 600000 in all
            assert refused.value.status == 413
            assert same.recordings() == {}
            with nt.connect(server.url, token=tokens[1]) as other:
                other.forward(x, probes=[last])  # the other token's share is its own
                assert list(other.recordings()) == ["lm_head.output"]
            one.clear_recordings()
            same.forward(x, probes=[last])
            assert list(same.recordings()) == ["lm_head.output"]
    finally:
        stop_cleanly(server)


def test_a_generate_past_the_request_timeout_stops_between_steps(remote, local):
    def slow(ctx, value):
        import time

        time.sleep(0.5)

    with pytest.raises(nt.NeurotapError, match="request timeout"):  # 40 steps of 0.5 s, 8 s allowed
        remote.generate(ids(20, rows=1, length=4), max_new_tokens=40, probes=[nt.probe(f"{LAST}.mlp.mul", slow)])
    close(remote.forward(ids(20))["logits"], local.forward(ids(20)).logits)


def test_a_client_that_goes_away_stops_its_pass_on_every_rank_and_leaves_nothing(server, remote, local, tmp_path):
    calls = tmp_path / "calls"

    def slow(ctx, value, calls=str(calls)):  # on the last rank, which alone never hears from the client
        import time

        with open(calls, "a") as seen:
            seen.write(".")
        time.sleep(0.1)

    def count(ctx, value):
        counted.append(1)

    x, steps = ids(44, rows=1, length=5), {"max_new_tokens": 40, "do_sample": False}
    counted: list[int] = []
    local.generate(x, **steps, probes=[nt.probe(f"{LAST}.mlp.mul", count)])  # the steps a whole run takes
    recorded = [ProbeSpec(f"{FIRST}.mlp.mul", nt.Record()), ProbeSpec(f"{LAST}.output", nt.Record())]
    request = RunRequest("generate", (x,), steps, [ProbeSpec(f"{LAST}.mlp.mul", slow), *recorded])
    session = {PROTOCOL_HEADER: str(PROTOCOL), "Content-Type": MEDIA_TYPE, SESSION_HEADER: remote._session}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/run", content=encode_request(request), headers=session, timeout=1.0)
    seen, deadline = -1, time.monotonic() + 30
    while seen != calls.stat().st_size:  # until the last rank has stopped calling the probe
        assert time.monotonic() < deadline, "the pass did not stop"
        seen = calls.stat().st_size
        time.sleep(1.0)
    assert 0 < seen < len(counted) / 2, (seen, len(counted))
    assert remote.recordings() == {}
    x = ids(45)
    close(remote.forward(x, probes=[nt.probe(s.point, nt.Record()) for s in recorded])["logits"],
          local.forward(x, probes=[nt.probe(s.point, nt.Record()) for s in recorded]).logits)  # fmt: skip
    got, expected = remote.recordings(), local_recordings(local)
    assert set(got) == set(expected)
    for name in expected:
        close(got[name]["record"][0], expected[name]["record"][0])


def test_skipped_layers_on_every_stage_pass_their_input_on(remote, local):
    skipped = [1, LAYERS - 1]  # on the first rank and on the last
    x = ids(21)
    out = remote.forward(x, probes=[nt.probe(f"model.layers.{i}.output", nt.Skip()) for i in skipped])

    def passes_input_on(module, args, kwargs, output):
        return args[0] if args else kwargs["hidden_states"]

    layers = local.module.model.layers
    handles = [layers[i].register_forward_hook(passes_input_on, with_kwargs=True) for i in skipped]
    try:
        with torch.no_grad():
            expected = local.module(x).logits
    finally:
        for handle in handles:
            handle.remove()
    close(out["logits"], expected)


def test_the_logit_lens_is_each_layer_through_the_final_norm_and_unembedding(server, local):
    text = "the old capital of france is paris"
    answer = httpx.post(
        server.url + "/v1/logit_lens", json={"text": text, "top": 2}, headers={PROTOCOL_HEADER: str(PROTOCOL)}
    )
    assert answer.status_code == 200, answer.text
    lens = answer.json()
    module = local.module
    residuals = {}
    handles = [
        layer.register_forward_hook(lambda m, args, out, i=i: residuals.setdefault(i, out))
        for i, layer in enumerate(module.model.layers)
    ]
    try:
        with torch.no_grad():
            module(torch.tensor([local.tokenizer(text).input_ids]))
            probs = torch.stack([module.lm_head(module.model.norm(residuals[i]))[0] for i in range(LAYERS)]).softmax(-1)
    finally:
        for handle in handles:
            handle.remove()
    best, found = probs.topk(2, dim=-1)
    assert [row["layer"] for row in lens["layers"]] == list(range(LAYERS))
    assert torch.equal(torch.tensor([row["ids"] for row in lens["layers"]]), found)
    close(torch.tensor([row["probs"] for row in lens["layers"]]), best)

    # token ids, two positions and one token's rank and probability
    body = {"ids": lens["ids"], "positions": [1, -1], "top": 1, "token": 9}
    answer = httpx.post(server.url + "/v1/logit_lens", json=body, headers={PROTOCOL_HEADER: str(PROTOCOL)})
    assert answer.status_code == 200, answer.text
    lens = answer.json()
    assert lens["positions"] == [1, len(lens["ids"]) - 1]
    chosen = probs[:, lens["positions"]]
    close(torch.tensor([row["token_prob"] for row in lens["layers"]]), chosen[..., 9])
    ranks = torch.tensor([row["token_rank"] for row in lens["layers"]])
    assert torch.equal(ranks, (chosen > chosen[..., 9:10]).sum(-1))
    assert torch.equal(torch.tensor([row["ids"] for row in lens["layers"]])[..., 0], chosen.argmax(-1))


# -- faults ----------------------------------------------------------------------------------------


def test_a_raising_probe_reaches_the_client_with_its_traceback(remote, local):
    def explode(ctx, value):
        raise ValueError("boom on rank 1")

    with pytest.raises(nt.ProbeError, match="boom on rank 1") as raised:
        remote.forward(ids(11), probes=[nt.probe("model.layers.2.mlp.mul", explode)])  # rank 1 owns layer 2
    assert "ValueError" in (raised.value.remote_traceback or "")
    close(remote.forward(ids(11))["logits"], local.forward(ids(11)).logits)  # every rank is still in step


def test_a_code_probe_only_rank_0_can_unpickle_fails_its_request_naming_the_rank(remote, local, rank_0_only):
    sys.path.insert(0, str(rank_0_only))
    try:
        import neurotap_rank_0_only  # pickled by reference: each rank imports it
    finally:
        sys.path.remove(str(rank_0_only))
    x = ids(50)
    probes = [nt.probe(f"{FIRST}.mlp.mul", nt.Record()), nt.probe(f"{LAST}.output", nt.Record())]
    with pytest.raises(nt.NeurotapError, match="rank 1 of the sharded server could not unpickle the probe") as raised:
        remote.forward(x, probes=[nt.probe(f"{FIRST}.output", neurotap_rank_0_only.record), *probes])
    assert raised.value.status == 400 and "importable on rank 0 only" in str(raised.value)
    assert remote.recordings() == {}
    close(remote.forward(x, probes=probes)["logits"], local.forward(x, probes=probes).logits)  # still serving
    got, expected = remote.recordings(), local_recordings(local)
    assert set(got) == set(expected)
    for name in expected:
        close(got[name]["record"][0], expected[name]["record"][0])
    remote.clear_recordings()


def test_a_saved_value_that_cannot_be_measured_fails_its_request_and_the_ranks_stay_in_step(server, remote, local):
    def hides_a_key(ctx, value):  # on the last rank; a tuple is measured once, so what it holds later is not
        class Unprintable:
            def __str__(self):
                raise ValueError("this key cannot be printed")

        if "box" not in ctx:
            ctx.box = ([],)
        else:
            ctx.box[0].append({Unprintable(): 1})

    x = ids(51, rows=1, length=4)
    with pytest.raises(nt.NeurotapError, match=f"rank {server.ranks - 1} .*cannot be printed") as raised:
        remote.generate(x, max_new_tokens=2, do_sample=False, probes=[nt.probe(f"{LAST}.mlp.mul", hides_a_key)])
    assert raised.value.status == 422
    assert remote.recordings() == {}
    close(remote.forward(x)["logits"], local.forward(x).logits)


def post_and_leave(url: str, request: RunRequest, session: str) -> socket.socket:
    """Send ``request`` to ``url``'s /v1/run on a socket of its own, for the caller to close mid-request."""
    host, port = url.removeprefix("http://").split(":")
    body = encode_request(request)
    headers = {PROTOCOL_HEADER: str(PROTOCOL), "Content-Type": MEDIA_TYPE, SESSION_HEADER: session}
    lines = ["POST /v1/run HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock = socket.create_connection((host, int(port)))
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def test_a_client_leaving_a_shared_pass_leaves_the_others_their_whole_answers(server, local, tmp_path):
    started, calls = tmp_path / "started", tmp_path / "calls"

    def block(ctx, value, started=str(started)):
        import pathlib
        import time

        pathlib.Path(started).touch()
        time.sleep(2.0)

    def slow(ctx, value, calls=str(calls)):  # on the last rank, on the leaving request's row
        import time

        with open(calls, "a") as seen:
            seen.write(".")
        time.sleep(0.1)

    steps = {"max_new_tokens": 16, "do_sample": False}
    leaving_ids, staying_ids = ids(52, rows=1, length=5), ids(53, rows=1, length=5)
    recorded = [nt.probe(f"{FIRST}.mlp.mul", nt.Record()), nt.probe(f"{LAST}.output", nt.Record())]
    leaving_request = RunRequest(
        "generate",
        (leaving_ids,),
        steps,
        [ProbeSpec(f"{LAST}.mlp.mul", slow), ProbeSpec(f"{FIRST}.mlp.mul", nt.Record())],
    )
    with nt.connect(server.url) as blocker, nt.connect(server.url) as leaving, nt.connect(server.url) as staying:
        before = server.info()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            blocked = pool.submit(blocker.forward, ids(29), probes=[nt.probe(f"{FIRST}.mlp.mul", block)])
            deadline = time.monotonic() + 30
            while not started.exists():
                assert time.monotonic() < deadline and not blocked.done(), "the slow request did not start"
                time.sleep(0.02)
            sock = post_and_leave(server.url, leaving_request, leaving._session)  # both queue behind the slow one
            answer = pool.submit(staying.generate, staying_ids, **steps, probes=recorded)
            blocked.result()
            while not calls.exists():  # the shared pass is under way
                assert time.monotonic() < deadline + 30 and not answer.done(), "the shared pass did not start"
                time.sleep(0.02)
            sock.close()
            out = answer.result()
        after = server.info()
        assert (after["requests"] - before["requests"], after["passes"] - before["passes"]) == (3, 2)
        assert torch.equal(out, local.generate(staying_ids, **steps, probes=recorded))
        got, expected = staying.recordings(), local_recordings(local)
        assert set(got) == set(expected)
        for name in expected:
            for a, b in zip(got[name]["record"], expected[name]["record"], strict=True):
                close(a, b)
        assert leaving.recordings() == {}
    assert 0 < calls.stat().st_size


def test_a_forward_past_the_request_timeout_stops_on_the_rank_computing_it(folder, local, tmp_path):
    calls = tmp_path / "calls"

    def slow(ctx, value, calls=str(calls)):  # on the last rank, which hears of the deadline only from rank 0
        import time

        with open(calls, "a") as seen:
            seen.write(".")
        time.sleep(1.0)

    points = [p.name for p in local.points(LAST) if p.kind == "output" and "[" not in p.name]
    points += ["model.norm.output", "lm_head.output"]  # 15 s of probes on the last rank, 3 s allowed
    # rank 0 waits for the logits meanwhile: within the rank timeout, or it would take the last rank for dead
    server = Server(folder, 2, "--allow-code", "--request-timeout", "3", "--rank-timeout", "30")
    try:
        with nt.connect(server.url) as rm:
            started = time.monotonic()
            with pytest.raises(nt.NeurotapError, match="request timeout") as raised:
                rm.forward(ids(54), probes=[nt.probe(point, slow) for point in points])
            took = time.monotonic() - started
            assert raised.value.status == 504
            called = calls.stat().st_size
            assert called < len(points) - 5 and took < len(points) - 5, (called, took)
            time.sleep(1.5)
            assert calls.stat().st_size == called  # the last rank stopped calling its probes
            close(rm.forward(ids(54))["logits"], local.forward(ids(54)).logits)
    finally:
        stop_cleanly(server)


def test_a_pass_computing_longer_than_the_rank_timeout_is_not_taken_for_a_hung_rank(folder, local, tmp_path):
    def slow(ctx, value):  # on the last rank, while rank 0 waits for its logits
        import time

        time.sleep(1.0)

    points = [p.name for p in local.points(LAST) if p.kind == "output" and "[" not in p.name][:6]
    server = Server(folder, 2, "--allow-code", "--request-timeout", "60", "--rank-timeout", "4")
    try:
        with nt.connect(server.url) as rm:
            started = time.monotonic()
            logits = rm.forward(ids(55), probes=[nt.probe(point, slow) for point in points])["logits"]
            assert time.monotonic() - started > 4 + 1  # longer than any one transfer used to wait
            close(logits, local.forward(ids(55)).logits)
            close(rm.forward(ids(56))["logits"], local.forward(ids(56)).logits)
    finally:
        stop_cleanly(server)


def fail_rank_1(server: Server, remote, fault: str) -> None:
    """Rank 1 dies mid-pass or hangs (SIGSTOP: it answers nothing, closes nothing, ignores SIGTERM); the client
    gets a 503 naming it, and the launcher and every rank exit non-zero within the bound."""
    server.killed = True
    pids = [row["pid"] for row in server.info()["ranks"]]
    pid = pids[1]
    started = time.monotonic()
    probes = []
    if fault == "dies":

        def die(ctx, value):
            import os

            os._exit(3)

        probes = [nt.probe("model.layers.2.mlp.mul", die)]  # rank 1 owns layer 2
    else:
        os.kill(pid, signal.SIGSTOP)
    bound = started + RANK_TIMEOUT + EXIT_WITHIN
    try:
        with pytest.raises(nt.NeurotapError, match="rank 1 of the sharded server failed") as raised:
            remote.forward(ids(12), probes=probes)
        answered = time.monotonic() - started
        assert raised.value.status == 503
        code = server.process.wait(timeout=max(0.1, bound - time.monotonic()))
        launcher = time.monotonic() - started
        while any(map(_running, pids)) and time.monotonic() < bound:
            time.sleep(0.05)
        exited = time.monotonic() - started
    finally:
        if fault == "hangs":
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # ended with the server
        server.stop()
    assert not any(map(_running, pids)), "a rank outlived the server"
    assert code != 0
    print(f"{server.ranks} ranks, rank 1 {fault}: 503 after {answered:.1f} s, launcher gone after {launcher:.1f} s, "
          f"every rank after {exited:.1f} s")  # fmt: skip
    assert answered < RANK_TIMEOUT + EXIT_WITHIN and exited < RANK_TIMEOUT + EXIT_WITHIN, (answered, exited)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_rank_that_dies_or_hangs_gets_a_503_naming_it_and_the_server_exits_in_time(server, remote):
    fail_rank_1(server, remote, "dies" if server.ranks == 2 else "hangs")


@pytest.mark.parametrize("ranks, fault", [(2, "hangs"), (3, "dies")])
def test_the_other_faults_end_the_server_in_time_too(ranks, fault, folder):
    server = Server(folder, ranks, "--allow-code", "--rank-timeout", str(RANK_TIMEOUT))
    try:
        with nt.connect(server.url) as rm:
            fail_rank_1(server, rm, fault)
    finally:
        server.stop()


def test_gpt2_over_three_ranks_equals_one_process(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=64, pad_token_id=0, bos_token_id=1
    )
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(tmp_path)
    local = nt.load(str(tmp_path))
    server = Server(tmp_path, 3)
    try:
        with nt.connect(server.url) as remote:
            assert remote.points() == local.points()
            x = ids(17)
            points = [
                "transformer.wte.output",
                "transformer.h.0.mlp.act.output",
                "transformer.h.2.output",
                "lm_head.output",
            ]
            probes = [nt.probe(p, nt.Record()) for p in points]
            probes.append(nt.probe("transformer.h.2.mlp.act.output", nt.Scale(2.0)))
            close(remote.forward(x, probes=probes)["logits"], local.forward(x, probes=probes).logits)
            recorded, expected = remote.recordings(), local_recordings(local)
            for point in points:
                close(recorded[point]["record"][0], expected[point]["record"][0])
            prompt = ids(18, rows=1, length=5)
            with remote.patch({"transformer.h.3.mlp.act.output": nt.Scale(2.0)}):
                generated = remote.generate(prompt, max_new_tokens=5, do_sample=False)
            with local.patch({"transformer.h.3.mlp.act.output": nt.Scale(2.0)}):
                assert torch.equal(generated, local.generate(prompt, max_new_tokens=5, do_sample=False))
            grad = [nt.probe("transformer.h.0.output", nt.Record(), grad=True)]
            loss = remote.backward(x, loss=nt.LogitDiff(3, 4), probes=grad)
            assert loss == pytest.approx(local.backward(x, loss=nt.LogitDiff(3, 4), probes=grad), rel=1e-6)
            got, want = remote.recordings(), local_recordings(local)
            close(got["transformer.h.0.output.grad"]["record"][0], want["transformer.h.0.output.grad"]["record"][0])
    finally:
        stop_cleanly(server)


def stop_cleanly(server: serving.Server) -> None:
    """SIGTERM: rank 0 finishes, tells the others to stop, and every process exits 0, within seconds."""
    started = time.monotonic()
    code = server.stop()
    assert code == 0, "".join(server.log)
    assert time.monotonic() - started < EXIT_WITHIN


def test_nt_stop_ends_a_sharded_server_as_its_launchers_sigterm_does(folder):
    """nt.stop signals the pid /health names, rank 0's: every rank still exits cleanly, and so does the launcher."""
    server = Server(folder, 2)
    try:
        pids = [row["pid"] for row in server.info()["ranks"]]
        port = int(server.url.rsplit(":", 1)[1])
        started = time.monotonic()
        nt.stop(port)
        assert server.process.wait(EXIT_WITHIN) == 0, "".join(server.log)
        assert time.monotonic() - started < EXIT_WITHIN
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not any("stopped because of" in line for line in server.log), server.log
    finally:
        server.stop()


def test_a_hub_id_is_served_from_the_hugging_face_cache_and_a_missing_one_refused_before_any_rank(
    folder, local, tmp_path, monkeypatch
):
    import shutil
    import subprocess

    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-deep"  # the layout huggingface_hub writes
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)

    started = time.monotonic()
    refused = subprocess.run(
        [sys.executable, "-c", serving.LAUNCH, "serve", "tiny-org/never-downloaded", "--ranks", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2, refused.stderr
    assert "'tiny-org/never-downloaded'" in refused.stderr and "not in the local cache" in refused.stderr
    assert str(tmp_path / "hf" / "hub") in refused.stderr
    assert "[rank" not in refused.stderr and time.monotonic() - started < 60  # refused before any rank started

    server = Server(Path("tiny-org/tiny-deep"), 2)
    try:
        with nt.connect(server.url) as remote:
            assert [row["layers"] for row in remote.info()["ranks"]] == [[0, 2], [2, 4]]
            x = ids(31)
            probes = [nt.probe(f"{LAST}.mlp.mul", nt.Record())]
            close(remote.forward(x, probes=probes)["logits"], local.forward(x, probes=probes).logits)
            close(
                remote.recordings()[f"{LAST}.mlp.mul"]["record"][0],
                local_recordings(local)[f"{LAST}.mlp.mul"]["record"][0],
            )
    finally:
        stop_cleanly(server)


def test_collect_through_a_sharded_server_equals_a_local_collection_and_stops_on_the_last_points_rank(
    folder, local, tmp_path
):
    from neurotap.cli import main
    from neurotap.datasets import ActivationDataset, collect

    everywhere, first_rank = [f"{FIRST}.mlp.mul", f"{LAST}.output"], [f"{FIRST}.mlp.mul", "blocks.1.resid_post"]
    sizes = dict(seq_len=16, batch_size=4, tokens=600, shard_mb=0.05)
    options = ["--seq-len", "16", "--batch", "4", "--tokens", "600", "--shard-mb", "0.05", "--quiet"]
    server = Server(folder, 2)
    try:
        counters = []
        for name, points in (("both", everywhere), ("first", first_rank)):
            counters.append(server.info()["ranks"])
            assert main(["collect", "--model", str(folder), "--server", server.url, "--points", ",".join(points),
                         "--out", str(tmp_path / name), *options]) == 0  # fmt: skip
        counters.append(server.info()["ranks"])
    finally:
        stop_cleanly(server)
    for name, points in (("both", everywhere), ("first", first_rank)):
        remote = ActivationDataset(tmp_path / name)
        here = collect(local, points, tmp_path / f"local-{name}", progress=False, **sizes)
        assert remote.num_shards == here.num_shards > 2
        assert torch.equal(remote.read("tokens"), here.read("tokens"))
        for point in points:
            torch.testing.assert_close(remote.read(point), here.read(point), rtol=1e-5, atol=1e-6)
    (_, rank_1), (rank_0_before, rank_1_before), (rank_0_after, rank_1_after) = counters
    assert rank_1_before["receive_s"] > rank_1["receive_s"]  # the first collection ran on both ranks
    assert rank_1_after["receive_s"] == rank_1_before["receive_s"]  # the second, on rank 0 alone
    assert rank_0_after["send_s"] == rank_0_before["send_s"]  # nothing went down the pipeline


def test_under_torchrun_the_options_that_set_ranks_or_devices_are_refused(folder):
    import subprocess

    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(serving.free_port())}
    refused = subprocess.run(
        [sys.executable, "-m", "neurotap.serve", str(folder), "--ranks", "2", "--device-map", "auto"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **torchrun},
    )
    assert refused.returncode == 2
    assert "under torchrun" in refused.stderr and "leave out --ranks, --device-map" in refused.stderr


def start_two_nodes(folder: Path) -> tuple[list, str]:
    """Two ``torchrun --nnodes 2`` nodes of one rank each on loopback, serving. Returns the node processes and
    the URL, once it serves."""
    import subprocess

    rendezvous, port = serving.free_port(), serving.free_port()
    node = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rendezvous}", "--local-addr", "127.0.0.1",
        "-m", "neurotap.serve", str(folder), "--port", str(port), "--rank-timeout", str(RANK_TIMEOUT),
    ]  # fmt: skip
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONUNBUFFERED": "1",
    }
    nodes = [
        subprocess.Popen(node, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(2)
    ]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return nodes, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or any(n.poll() is not None for n in nodes):
            end_nodes(nodes)
            raise AssertionError("the two nodes did not start")
        time.sleep(0.5)


def end_nodes(nodes: list, ranks: list[int] = ()) -> None:
    """Kill what is left of the nodes, and of their ranks (which torchrun starts in sessions of their own)."""
    for n in nodes:
        if n.poll() is None:
            os.killpg(n.pid, signal.SIGKILL)
            n.wait()
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_torchrun_on_two_nodes_serves_as_two_ranks_do_and_one_node_lost_ends_the_other(folder, local):
    nodes, url = start_two_nodes(folder)
    ranks = []
    try:
        with nt.connect(url) as remote:
            ranks = remote.info()["ranks"]
            assert [row["layers"] for row in ranks] == [[0, 2], [2, 4]]
            x = ids(32)
            probes = [nt.probe(f"{FIRST}.mlp.mul", nt.Record()), nt.probe(f"{LAST}.output", nt.Record())]
            close(remote.forward(x, probes=probes)["logits"], local.forward(x, probes=probes).logits)
            recorded, expected = remote.recordings(), local_recordings(local)
            for name in (f"{FIRST}.mlp.mul", f"{LAST}.output"):
                close(recorded[name]["record"][0], expected[name]["record"][0])
        # rank 0's machine dies: its launcher and rank 0 at once; the other node's processes must end by themselves
        rank0 = ranks[0]["pid"]
        first = next(n for n in nodes if _parent(rank0) == n.pid)
        other = next(n for n in nodes if n is not first)
        rank1 = ranks[1]["pid"]
        lost = time.monotonic()
        first.kill()
        os.kill(rank0, signal.SIGKILL)
        assert other.wait(timeout=RANK_TIMEOUT + EXIT_WITHIN) != 0
        print(f"the other node exited {time.monotonic() - lost:.1f} s after rank 0's was lost")
        with pytest.raises(ProcessLookupError):
            os.kill(rank1, 0)
    finally:
        end_nodes(nodes, [row["pid"] for row in ranks])


def test_a_stopped_rank_on_another_machine_ends_both_nodes_in_time(folder):
    # no rank ends another's process, so each node is left to end its own, as on two machines: whichever node's
    # launcher hosts the rendezvous store, and with its default 30 s grace before it kills a worker that ignores
    # its SIGTERM, the stopped rank's watchdog ends it, and so its node, within the bound
    nodes, url = start_two_nodes(folder)
    ranks = []
    try:
        with nt.connect(url) as remote:
            ranks = remote.info()["ranks"]
        rank0, rank1 = ranks[0]["pid"], ranks[1]["pid"]
        live = next(n for n in nodes if n.pid == _parent(rank0))
        stuck = next(n for n in nodes if n.pid == _parent(rank1))
        stopped = time.monotonic()
        os.kill(rank1, signal.SIGSTOP)
        for node in (live, stuck):
            assert node.wait(timeout=max(1.0, RANK_TIMEOUT + EXIT_WITHIN - (time.monotonic() - stopped))) != 0
            print(f"a node exited {time.monotonic() - stopped:.1f} s after rank 1 was stopped")
        for pid in (rank0, rank1):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        end_nodes(nodes, [row["pid"] for row in ranks])


BEATING = """
import os, sys, time
from neurotap.distributed.pipe import Watchdog
watchdog = Watchdog(2.0)
print(watchdog.process.pid, flush=True)
for _ in range(int(sys.argv[1])):
    watchdog.beat()
    time.sleep(0.2)
os._exit(0)  # as a rank ends
"""


@pytest.mark.parametrize("fault", ["stopped", "exits"])
def test_a_rank_is_killed_by_its_watchdog_once_it_stops_beating_and_the_watchdog_ends_with_it(fault):
    import subprocess

    beats = 10_000 if fault == "stopped" else 40  # beating for 8 s, four times the watchdog's wait
    with subprocess.Popen([sys.executable, "-c", BEATING, str(beats)], stdout=subprocess.PIPE, text=True) as rank:
        try:
            watchdog = int(rank.stdout.readline())
            time.sleep(4.0)
            assert _running(watchdog)
            if fault == "stopped":
                assert rank.poll() is None  # beating for longer than the watchdog waits
                os.kill(rank.pid, signal.SIGSTOP)
                assert rank.wait(timeout=10) == -signal.SIGKILL
            else:
                assert rank.wait(timeout=10) == 0
            deadline = time.monotonic() + 10
            while _running(watchdog) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _running(watchdog)
        finally:
            rank.kill()


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


FAMILIES = {  # tiny configs of the other supported layouts; 4 layers, split 2 + 2
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2}),
    "gemma": ("GemmaConfig", {"num_key_value_heads": 2, "head_dim": 16}),  # scaled embeddings, tied head
    "gpt_neox": ("GPTNeoXConfig", {}),  # its head is saved as embed_out
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_other_layouts_over_two_ranks_equal_one_process(family, tmp_path):
    import transformers

    name, extra = FAMILIES[family]
    config = getattr(transformers, name)(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=64,
        **extra,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(tmp_path)
    local = nt.load(str(tmp_path))
    server = Server(tmp_path, 2)
    try:
        with nt.connect(server.url) as remote:
            assert remote.points() == local.points()
            layers = [row["layers"] for row in remote.info()["ranks"]]
            assert layers == [[0, 2], [2, 4]]
            x = ids(25)
            points = ["blocks.0.resid_post", "blocks.3.resid_post"]
            probes = [nt.probe(p, nt.Record()) for p in points]
            close(remote.forward(x, probes=probes)["logits"], local.forward(x, probes=probes).logits)
            recorded, expected = remote.recordings(), local_recordings(local)
            for point in points:
                close(recorded[point]["record"][0], expected[point]["record"][0])
            prompt = ids(26, rows=1, length=5)
            generated = remote.generate(prompt, max_new_tokens=4, do_sample=False)
            assert torch.equal(generated, local.generate(prompt, max_new_tokens=4, do_sample=False))
    finally:
        assert server.stop() == 0, "".join(server.log)


def test_device_map_auto_serves_one_process_and_is_refused_with_ranks(folder, local):
    import subprocess

    refused = subprocess.run(
        [sys.executable, "-c", serving.LAUNCH, "serve", str(folder), "--device-map", "auto", "--ranks", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "--device-map" in refused.stderr
    server = serving.Server(folder, "--device-map", "auto")  # without a GPU accelerate places it all on the CPU
    try:
        with nt.connect(server.url) as remote:
            devices = remote.info()["devices"]
            assert devices == ["cpu"] if not torch.cuda.is_available() else all(d.startswith("cuda") for d in devices)
            if not torch.cuda.is_available():  # accelerate keeps no map of a model it put in one place
                assert remote.info()["device_map"] == {"": "cpu"}
            x = ids(27)
            close(remote.forward(x)["logits"], local.forward(x).logits)
    finally:
        server.stop()


@pytest.mark.slow
def test_smollm2_over_two_ranks_equals_one_process_and_stops_cleanly():
    local = nt.load("smollm2-135m")
    server = Server(Path("smollm2-135m"), 2)
    try:
        ranks = server.info()["ranks"]
        assert [row["layers"] for row in ranks] == [[0, 15], [15, 30]]
        x = local.tokenizer("The capital of France is", return_tensors="pt").input_ids
        probes = [
            nt.probe("model.layers.3.mlp.mul", nt.Mean(dims=(0, 1))),
            nt.probe("blocks.29.resid_post", nt.Record()),
        ]
        with nt.connect(server.url) as remote:
            got = remote.forward(x, probes=probes)["logits"]
            recorded = remote.recordings()
            assert torch.equal(remote.encode("The capital of France is"), x)  # the tokenizer, from rank 0
            assert remote.decode(got[0, -1].argmax()) == " Paris"
        want = local.forward(x, probes=probes).logits
        expected = local_recordings(local)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for name, key in (("model.layers.3.mlp.mul", "mean"), ("blocks.29.resid_post", "record")):
            got_value, want_value = recorded[name][key], expected[name][key]
            if key == "record":
                got_value, want_value = got_value[0], want_value[0]
            torch.testing.assert_close(got_value, want_value, rtol=1e-4, atol=1e-4)
    finally:
        code = server.stop()
    assert code == 0, "".join(server.log)  # SIGTERM: rank 0 finished, told the others to stop, all exited


# -- GPUs ------------------------------------------------------------------------------------------


def test_each_rank_takes_a_gpu_of_its_own_only_where_every_rank_has_one():
    from neurotap.distributed.launch import rank_device

    two_gpus = [(0, 2), (1, 2)]  # (LOCAL_RANK, the GPUs its machine has), by rank
    assert [rank_device("auto", two_gpus, r) for r in (0, 1)] == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert rank_device("cuda", two_gpus, 1) == torch.device("cuda", 1)
    assert rank_device("cpu", two_gpus, 1) == torch.device("cpu")
    two_machines = [(0, 1), (0, 1)]  # one rank on each of two machines of one GPU each
    assert [rank_device("auto", two_machines, r) for r in (0, 1)] == [torch.device("cuda", 0)] * 2
    one_gpu = [(0, 1), (1, 1)]  # NCCL cannot put two ranks on one GPU: every rank stays on the CPU
    assert [rank_device("auto", one_gpu, r) for r in (0, 1)] == [torch.device("cpu")] * 2
    with pytest.raises(nt.NeurotapError, match="rank 1 is local rank 1 on a machine with 1 GPU"):
        rank_device("cuda", one_gpu, 0)
    assert rank_device("auto", [(0, 0)], 0) == torch.device("cpu")


def test_rank_device_cuda_is_refused_before_any_rank_starts_where_gpus_are_too_few(folder):
    import subprocess

    too_many = max(2, torch.cuda.device_count() + 1)
    argv = [sys.executable, "-c", serving.LAUNCH, "serve", str(folder), "--ranks", str(too_many)]
    refused = subprocess.run([*argv, "--rank-device", "cuda"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--rank-device cuda" in refused.stderr and "--rank-device cpu" in refused.stderr
    one = subprocess.run([*argv[:-2], "--rank-device", "cpu"], capture_output=True, text=True, timeout=120)
    assert one.returncode == 2 and "--rank-device places the ranks" in one.stderr


def torchrun_server(folder: Path, ranks: int, *args: str) -> tuple[Any, str]:
    """``torchrun --nproc-per-node RANKS -m neurotap.serve FOLDER ARGS`` on loopback; its process and URL."""
    import subprocess

    port = serving.free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{serving.free_port()}", "--local-addr", "127.0.0.1",
        "-m", "neurotap.serve", str(folder), "--port", str(port), *args,
    ]  # fmt: skip
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"}
    node = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while node.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return node, url
        except httpx.TransportError:
            time.sleep(0.5)
    end_nodes([node])
    raise AssertionError("torchrun's ranks did not start serving")


@pytest.mark.parametrize("launch, ranks", [("--ranks", 2), ("--ranks", 3), ("torchrun", 1)])
def test_ranks_on_gpus_over_nccl_equal_one_process(launch, ranks, folder, local):
    """Each rank on a GPU of its own, hidden states and scores between them over NCCL: the CPU tests'
    comparisons with one process hold (the client's values come back on the CPU), and a hung rank ends the
    server in time. With one GPU, torchrun's single rank: the sharded executor on a GPU, without transfers."""
    if torch.cuda.device_count() < ranks:
        pytest.skip(f"needs {ranks} CUDA device(s), one per rank")
    node = None
    if launch == "torchrun":
        node, url = torchrun_server(folder, ranks, "--allow-code", "--rank-device", "cuda")
    else:
        server = Server(folder, ranks, "--allow-code", "--rank-device", "cuda", "--rank-timeout", str(RANK_TIMEOUT))
        url = server.url
    try:
        with nt.connect(url) as remote:
            rows = remote.info()["ranks"]
            assert [row["device"] for row in rows] == [f"cuda:{r}" for r in range(ranks)]
            for row in rows:  # each GPU held at least the weights of its rank's layers and parts
                start, stop = row["layers"]
                mine = [f"model.layers.{i}." for i in range(start, stop)]
                mine += [part + "." for part in row["parts"] if not part.startswith("model.layers")]
                held = sum(p.nbytes for n, p in local.module.named_parameters() if n.startswith(tuple(mine)))
                assert row["peak_gpu_mb"] * 2**20 >= held > 0
            test_logits_equal_one_process(remote, local)
            test_recordings_on_the_first_and_last_stage_in_one_request(remote, local)
            test_generate_with_the_kv_cache_and_patches_at_every_step(remote, local)
            test_a_traced_generate_has_every_steps_values_from_every_stage_in_execution_order(remote, local)
            test_backward_gradients_flow_back_through_every_stage(remote, local)
            test_hidden_states_attentions_and_raw_logits_come_from_every_stage(remote, local)
            test_stop_at_ends_the_forward_on_the_rank_owning_the_point(remote, local)
            test_a_failing_patch_on_the_last_stage_records_nothing_anywhere_and_the_ranks_stay_in_step(remote, local)
            test_a_raising_probe_reaches_the_client_with_its_traceback(remote, local)
            if node is None:
                fail_rank_1(server, remote, "hangs")
    finally:
        if node is not None:
            end_nodes([node])
        else:
            server.stop()
