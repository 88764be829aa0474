"""Overhead of the core against the plain module, hand-written hooks and nnsight.

    python bench/bench_core.py [--rounds 30] [--no-smollm2] [--no-nnsight] [--wall] [--processes N]

Two regimes: a tiny random Llama (2 layers, hidden 64, batch 2 x 16), where Python
overhead dominates as it does on a GPU, and SmolLM2-135M (batch 1 x 32), where
compute dominates. One thread, variants interleaved round by round in one process,
medians of per-call times, ratios printed. Times are the thread's CPU time (a busy
machine's waiting is left out), or wall-clock time with ``--wall``.

Each task is done three ways, with hooks and probes attached for that call only:
"record" records every decoder layer's output; "zero" zero-ablates unit 3 of the
MLP product of layer 0 (``model.layers.0.mlp.mul``, which hand hooks and nnsight
reach as the input of ``down_proj``). The ratio that matters is each library's
added time over the plain forward against the hand hooks' added time. Also timed:
a 16-token generation with the ablation at every step, a sweep of 1,000
forwards each zeroing one (position, unit) cell, the shape of activation patching,
and the gradient of a next-token loss at every decoder layer's output:
``m.backward`` with gradient probes and ``m.run(grad=...)`` against forward hooks
keeping the outputs and ``torch.autograd.grad`` on the unwrapped model.
"run" (in the record task) is ``m.run(ids, record="blocks.*.resid_post")``: a trace
of every layer's residual, also timed on SmolLM2 in pairs against the plain module
(a, b, b, a each round; median ratio).

On the tiny model the added times are tens of microseconds, and they move between
processes running the same code (hand hooks' from +29 to +73 us here), with where each
process's objects land in memory and so which of them a forward pushes out of the cache:
one process's ratio of added times is good to about +-0.3. ``--processes N`` runs the
tiny model's two forward tasks and the generation in N fresh processes, one after another.
Each round there calls the plain module, hand hooks and neurotap once each, in a fresh
random order, and keeps each one's time minus the plain call's; the ratio is of the medians
of those differences pooled over the processes, with a 95% bootstrap interval that draws
processes and then their rounds again.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers

import neurotap as nt

UNIT = 3


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config).eval()


TASKS = {"record": "record every decoder layer's output", "zero": "zero one unit of the MLP product"}
clock = time.thread_time
CHILD = "NEUROTAP_BENCH_CORE_CHILD"


def tiny_inputs() -> tuple[torch.nn.Module, torch.Tensor]:
    tiny = tiny_llama()
    tiny.generation_config.pad_token_id = 0
    return tiny, torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def time_per_call(fn: Callable[[], Any], repeat: int) -> float:
    start = clock()
    for _ in range(repeat):
        fn()
    return (clock() - start) / repeat


def interleave(variants: dict[str, Callable[[], Any]], rounds: int, repeat: int) -> dict[str, float]:
    for fn in variants.values():  # warm up
        fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(time_per_call(fn, repeat))
    return {name: statistics.median(times) for name, times in samples.items()}


def paired_ratio(a: Callable[[], Any], b: Callable[[], Any], rounds: int) -> tuple[float, float, float]:
    """Median of per-round ratios a/b, each round timed a, b, b, a so that a drifting load cancels out.

    Returns the median ratio and the medians of a and b in seconds.
    """
    a(), b()
    ratios, times_a, times_b = [], [], []
    for _ in range(rounds):
        a1, b1, b2, a2 = (time_per_call(fn, 1) for fn in (a, b, b, a))
        ratios.append((a1 + a2) / (b1 + b2))
        times_a.append((a1 + a2) / 2)
        times_b.append((b1 + b2) / 2)
    return statistics.median(ratios), statistics.median(times_a), statistics.median(times_b)


def hooks_on(module: torch.nn.Module, task: str, store: list) -> list:
    """The task done with plain torch hooks; returns the handles."""
    layers = module.model.layers
    if task == "record":

        def record(_m: Any, _args: Any, output: torch.Tensor) -> None:
            store.append(output.detach().clone())

        return [layer.register_forward_hook(record) for layer in layers]

    def ablate(_m: Any, args: tuple) -> tuple:
        x = args[0].clone()
        x[..., UNIT] = 0
        return (x, *args[1:])

    return [layers[0].mlp.down_proj.register_forward_pre_hook(ablate)]


def probes_for(task: str, n_layers: int) -> list[nt.Probe]:
    if task == "record":
        return [nt.probe(f"model.layers.{i}.output", nt.Record()) for i in range(n_layers)]
    return [nt.probe("model.layers.0.mlp.mul", nt.Zero(index=(..., UNIT)))]


def with_hooks(module: torch.nn.Module, task: str, call: Callable[[], Any], store: list) -> Any:
    handles = hooks_on(module, task, store)
    try:
        return call()
    finally:
        for h in handles:
            h.remove()


def check_same_result(module: torch.nn.Module, m: nt.Model, ids: torch.Tensor, task: str) -> None:
    store: list = []
    expected = with_hooks(module, task, lambda: module(ids).logits, store)
    got = m.forward(ids, probes=probes_for(task, len(module.model.layers))).logits
    if task == "record":
        recorded = [m.recordings()[f"model.layers.{i}.output"]["record"][0] for i in range(len(store))]
        assert all(torch.equal(a, b) for a, b in zip(store, recorded)), "neurotap and hand hooks recorded apart"
    m.clear_recordings()
    assert torch.equal(expected, got), "neurotap and hand hooks disagree"


def forward_variants(
    module: torch.nn.Module, ids: torch.Tensor, task: str, use_nnsight: bool
) -> dict[str, Callable[[], Any]]:
    m = nt.wrap(module)
    m.points()
    n_layers = len(module.model.layers)
    check_same_result(module, m, ids, task)
    probes = probes_for(task, n_layers)
    store: list = []
    with_hooks(module, task, lambda: module(ids), store)

    def hooks_per_call() -> None:
        store.clear()
        with_hooks(module, task, lambda: module(ids), store)

    def neurotap_per_call() -> None:
        # the last call's recordings go first, as hand hooks' store does: freeing them right after the forward
        # instead costs either variant some 10 us more in this harness (the allocator's work moves into the call)
        m.clear_recordings()
        m.forward(ids, probes=probes)

    variants: dict[str, Callable[[], Any]] = {
        "plain module": lambda: module(ids),
        "wrapped, no probes": lambda: m(ids),
        "hand hooks": hooks_per_call,
        "neurotap": neurotap_per_call,
    }
    if task == "record":
        _, trace = m.run(ids, record="blocks.*.resid_post")
        assert torch.equal(trace.stack("blocks.*.resid_post"), torch.stack(store)), "the trace and hand hooks disagree"
        variants["run, every resid_post"] = lambda: m.run(ids, record="blocks.*.resid_post")
    if use_nnsight:
        from nnsight import NNsight

        traced = NNsight(copy.deepcopy(module))  # nnsight sets instance forwards: keep them off neurotap's module

        def nnsight_call() -> None:
            with traced.trace(ids):
                if task == "record":
                    outs = [traced.model.layers[i].output.save() for i in range(n_layers)]  # noqa: F841
                else:
                    traced.model.layers[0].mlp.down_proj.input[..., UNIT] = 0

        variants["nnsight 0.8"] = nnsight_call
    return variants


def gradient_variants(module: torch.nn.Module, ids: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The gradient of a next-token loss at every decoder layer's output, three ways, checked equal first."""
    m = nt.wrap(module)
    m.points()
    layers = module.model.layers
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    loss = nt.CrossEntropy(targets)
    names = [f"model.layers.{i}.output" for i in range(len(layers))]
    probes = [nt.probe(name, nt.Record(), grad=True) for name in names]

    def forward_and_loss() -> torch.Tensor:
        with torch.enable_grad():
            logits = module(ids).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())

    def by_hand() -> tuple[torch.Tensor, ...]:
        outputs: list[torch.Tensor] = []
        handles = [layer.register_forward_hook(lambda _m, _a, output: outputs.append(output)) for layer in layers]
        try:
            value = forward_and_loss()
        finally:
            for handle in handles:
                handle.remove()
        return torch.autograd.grad(value, outputs)

    def with_neurotap() -> None:
        m.clear_recordings()  # the last call's, as by_hand's gradients live until its next call
        m.backward(ids, loss=loss, probes=probes)

    expected = by_hand()
    m.backward(ids, loss=loss, probes=probes)
    got = [m.recordings()[f"{name}.grad"]["record"][0] for name in names]
    _, trace = m.run(ids, grad="blocks.*.resid_post", loss=loss)
    m.clear_recordings()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(expected, got)), "backward and autograd.grad disagree"
    assert torch.allclose(trace.grad.stack("blocks.*.resid_post"), torch.stack(expected), atol=1e-6)
    return {
        "forward and loss": forward_and_loss,
        "hand hooks": by_hand,
        "neurotap": with_neurotap,
        "run, grad every resid_post": lambda: m.run(ids, grad="blocks.*.resid_post", loss=loss),
    }


def report(title: str, medians: dict[str, float], base: str, pairs: list[tuple[str, str]]) -> None:
    print(f"\n{title}")
    for name, seconds in medians.items():
        added = seconds - medians[base]
        print(f"  {name:<28} {seconds * 1e3:8.3f} ms   x{seconds / medians[base]:.3f} of {base}, +{added * 1e6:.0f} us")
    for a, b in pairs:
        if a in medians and b in medians:
            ratio = (medians[a] - medians[base]) / (medians[b] - medians[base])
            print(f"  {a} / {b}: x{medians[a] / medians[b]:.3f} of the time, x{ratio:.2f} of the added time")


def generation_variants(module: torch.nn.Module, ids: torch.Tensor) -> dict[str, Callable[[], Any]]:
    m = nt.wrap(module)
    m.points()
    ablation = {"model.layers.0.mlp.mul": nt.Zero(index=(..., UNIT))}
    probes = probes_for("zero", len(module.model.layers))
    kwargs = {"max_new_tokens": 16, "do_sample": False, "min_new_tokens": 16}
    expected = with_hooks(module, "zero", lambda: module.generate(ids, **kwargs), [])
    assert torch.equal(expected, m.generate(ids, probes=probes, **kwargs)), "neurotap and hand hooks disagree"

    def patched() -> None:
        with m.patch(ablation):
            m.generate(ids, **kwargs)

    variants = {
        "plain generate": lambda: module.generate(ids, **kwargs),
        "hand hooks": lambda: with_hooks(module, "zero", lambda: module.generate(ids, **kwargs), []),
        "neurotap": lambda: m.generate(ids, probes=probes, **kwargs),
        "neurotap, patch block": patched,
    }
    return variants


def sweep(module: torch.nn.Module, ids: torch.Tensor, rounds: int, cells: int = 1000) -> dict[str, float]:
    """Activation patching's shape: one forward per (position, unit) cell, each zeroing that cell only."""
    m = nt.wrap(module)
    m.points()
    width = module.config.intermediate_size
    where = [(position, unit) for position in range(ids.shape[1]) for unit in range(width)][:cells]
    target = 5

    def by_hand() -> list[float]:
        results = []
        for position, unit in where:

            def ablate(_m: Any, args: tuple, position: int = position, unit: int = unit) -> tuple:
                x = args[0].clone()
                x[:, position, unit] = 0
                return (x, *args[1:])

            handle = module.model.layers[0].mlp.down_proj.register_forward_pre_hook(ablate)
            try:
                results.append(module(ids).logits[0, -1, target].item())
            finally:
                handle.remove()
        return results

    def with_neurotap() -> list[float]:
        results = []
        for position, unit in where:
            probe = nt.probe("model.layers.0.mlp.mul", nt.Zero(index=(slice(None), position, unit)))
            results.append(m.forward(ids, probes=[probe]).logits[0, -1, target].item())
        return results

    def plain() -> list[float]:
        return [module(ids).logits[0, -1, target].item() for _ in where]

    assert by_hand() == with_neurotap(), "the sweeps disagree"
    return interleave({"plain forwards": plain, "hand hooks": by_hand, "neurotap": with_neurotap}, rounds, 1)


def paired_added_times(variants: dict[str, Callable[[], Any]], base: str, rounds: int) -> dict[str, list[float]]:
    """Each variant's time minus ``base``'s, round by round: every round calls each variant once, in a fresh
    random order, so that a load that drifts, and the cache state one call leaves the next, fall on each alike."""
    order = list(variants.items())
    for _ in range(10):  # warm up
        for _name, fn in order:
            fn()
    shuffle = random.Random(0).shuffle
    added: dict[str, list[float]] = {name: [] for name in variants if name != base}
    for _ in range(rounds):
        shuffle(order)
        times = {name: time_per_call(fn, 1) for name, fn in order}
        for name, values in added.items():
            values.append(times[name] - times[base])
    return added


def ratio_of_medians(numerators: list[list[float]], denominators: list[list[float]]) -> float:
    """median(numerators) / median(denominators), each pooled over every process's rounds."""
    return statistics.median(sum(numerators, [])) / statistics.median(sum(denominators, []))


def bootstrap_interval(numerators: list[list[float]], denominators: list[list[float]]) -> tuple[float, float]:
    """A 95% interval for ``ratio_of_medians``: processes drawn again with replacement, then each one's rounds
    (a round's two values stay together), since a process's memory layout moves its figures as a whole."""
    draw = random.Random(1)
    ratios = []
    for _ in range(BOOTSTRAP):
        tops, bottoms = [], []
        for _ in numerators:
            process = draw.randrange(len(numerators))
            top, bottom = numerators[process], denominators[process]
            picks = [draw.randrange(len(top)) for _ in top]
            tops.append([top[i] for i in picks])
            bottoms.append([bottom[i] for i in picks])
        ratios.append(ratio_of_medians(tops, bottoms))
    ratios.sort()
    return ratios[int(0.025 * BOOTSTRAP)], ratios[int(0.975 * BOOTSTRAP) - 1]


BOOTSTRAP = 400


def tiny_added_times(rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per-round added times of hand hooks and neurotap for each tiny-model task, in this process."""
    tiny, ids = tiny_inputs()
    added = {}
    for task in TASKS:
        variants = forward_variants(tiny, ids, task, use_nnsight=False)
        chosen = {name: variants[name] for name in ("plain module", "hand hooks", "neurotap")}
        added[task] = paired_added_times(chosen, "plain module", rounds)
    steps = generation_variants(tiny, ids[:1])
    added["generate"] = paired_added_times(steps, "plain generate", max(10, rounds // 8))
    return added


PROCESS_ROWS = {
    **{task: (title, "neurotap") for task, title in TASKS.items()},
    "generate": ("generate 16 tokens, one ablation every step", "neurotap"),
    "generate, patch block": ("the same in a patch block", "neurotap, patch block"),
}


def across_processes(processes: int, rounds: int, wall: bool) -> None:
    runs: list[dict[str, dict[str, list[float]]]] = []
    command = [sys.executable, __file__, "--rounds", str(rounds), *(["--wall"] if wall else [])]
    for number in range(processes):
        child = subprocess.run(command, env={**os.environ, CHILD: "1"}, capture_output=True, text=True, check=True)
        runs.append(json.loads(child.stdout.splitlines()[-1]))
        ratios = []
        for row, (_title, variant) in PROCESS_ROWS.items():
            task = runs[-1][row.split(",")[0]]
            ratios.append(f"{row} x{ratio_of_medians([task[variant]], [task['hand hooks']]):.2f}")
        print(f"process {number + 1}: " + ", ".join(ratios), flush=True)
    print(
        f"\nTiny Llama, neurotap's added time over hand hooks' (medians of per-round differences, pooled over "
        f"{processes} processes of {rounds} rounds, 1/8 as many for generate; 95% bootstrap interval)"
    )
    for row, (title, variant) in PROCESS_ROWS.items():
        tasks = [run[row.split(",")[0]] for run in runs]
        ours, theirs = [t[variant] for t in tasks], [t["hand hooks"] for t in tasks]
        low, high = bootstrap_interval(ours, theirs)
        hand = statistics.median(sum(theirs, [])) * 1e6
        ratio = ratio_of_medians(ours, theirs)
        print(f"  {title:<44} x{ratio:.2f} ({low:.2f} to {high:.2f}), hand hooks +{hand:.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="rounds of interleaved calls: 30, or 2,000 with --processes")
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--no-nnsight", action="store_true")
    parser.add_argument("--wall", action="store_true", help="time wall-clock instead of the thread's CPU time")
    parser.add_argument(
        "--processes", type=int, default=0, help="only the tiny forward tasks' ratios, in this many fresh processes"
    )
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 2000 if args.processes or os.environ.get(CHILD) else 30
    global clock
    clock = time.perf_counter if args.wall else time.thread_time
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    if os.environ.get(CHILD):
        with torch.no_grad():
            print(json.dumps(tiny_added_times(args.rounds)))
        return
    if args.processes:
        across_processes(args.processes, args.rounds, args.wall)
        return
    use_nnsight = not args.no_nnsight
    if use_nnsight:
        try:
            import nnsight  # noqa: F401
        except ImportError:
            print("nnsight is not installed (pip install -r bench/requirements.txt): its column is left out")
            use_nnsight = False
    pairs = [
        ("neurotap", "hand hooks"),
        ("neurotap", "nnsight 0.8"),
        ("nnsight 0.8", "hand hooks"),
        ("run, every resid_post", "hand hooks"),
    ]
    gen_pairs = [("neurotap", "hand hooks"), ("neurotap, patch block", "hand hooks")]

    with torch.no_grad():
        tiny, ids = tiny_inputs()
        for task, title in TASKS.items():
            medians = interleave(forward_variants(tiny, ids, task, use_nnsight), args.rounds, 20)
            report(f"Tiny Llama (2 layers, hidden 64), batch 2 x 16, {title}", medians, "plain module", pairs)
        gen = interleave(generation_variants(tiny, ids[:1]), max(5, args.rounds // 2), 1)
        report("Tiny Llama, greedy generate 16 tokens, one ablation at every step", gen, "plain generate", gen_pairs)
        swept = sweep(tiny, ids[:1], max(3, args.rounds // 6))
        report("Tiny Llama, batch 1 x 16, a sweep of 1,000 single-cell ablations", swept, "plain forwards", pairs)
        grads = interleave(gradient_variants(tiny, ids), args.rounds, 10)
        title = "Tiny Llama, batch 2 x 16, the gradient of a next-token loss at every decoder layer's output"
        report(title, grads, "forward and loss", [*pairs[:1], ("run, grad every resid_post", "hand hooks")])

        if not args.no_smollm2:
            started = time.perf_counter()
            loaded = nt.load("smollm2-135m")
            print(f"\nSmolLM2-135M loaded in {time.perf_counter() - started:.2f} s")
            module = loaded.module
            started = time.perf_counter()
            count = len(nt.wrap(module).points())
            seconds = time.perf_counter() - started
            print(f"  wrap + inventory, first time in this process: {seconds:.3f} s ({count} points)")
            wrap_times = [time_per_call(lambda: nt.wrap(module).points(), 1) for _ in range(5)]
            print(f"  wrap + inventory, again (median of 5): {statistics.median(wrap_times):.3f} s")
            ids = loaded.tokenizer(["The Eiffel Tower is in the city of Paris, " * 4], return_tensors="pt").input_ids
            ids = ids[:, :32]
            for task, title in TASKS.items():
                medians = interleave(forward_variants(module, ids, task, use_nnsight), max(5, args.rounds // 3), 3)
                report(f"SmolLM2-135M, batch 1 x 32, {title}", medians, "plain module", pairs)
            m = nt.wrap(module)
            ratio, traced, plain = paired_ratio(
                lambda: m.run(ids, record="blocks.*.resid_post"), lambda: module(ids), max(10, args.rounds)
            )
            print(
                f"  run, every resid_post, paired with the plain module: x{ratio:.3f} "
                f"({traced * 1e3:.1f} ms against {plain * 1e3:.1f} ms, medians)"
            )
            gen = interleave(generation_variants(module, ids[:, :8]), 5, 1)
            report(
                "SmolLM2-135M, greedy generate 16 tokens, one ablation at every step", gen, "plain generate", gen_pairs
            )


if __name__ == "__main__":
    main()
