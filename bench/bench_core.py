"""Overhead of the core against the plain module, hand-written hooks and nnsight.

    python bench/bench_core.py [--rounds 30] [--no-smollm2] [--no-nnsight]

Two regimes: a tiny random Llama (2 layers, hidden 64, batch 2 x 16), where Python
overhead dominates as it does on a GPU, and SmolLM2-135M (batch 1 x 32), where
compute dominates. One thread, variants interleaved round by round in one process,
medians of per-forward times, ratios printed.

The task timed in "probe" variants: record every decoder layer's output, read the
MLP product of layer 0 (``model.layers.0.mlp.mul``, which hand hooks and nnsight
reach as the input of ``down_proj``) and zero-ablate unit 3 of it. "run" is
``m.run(ids, record="blocks.*.resid_post")``: a trace of every layer's residual,
also timed in pairs against the plain module (a, b, b, a each round; median ratio).
"""

from __future__ import annotations

import argparse
import statistics
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


def time_per_call(fn: Callable[[], Any], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


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


def hand_hooks(module: torch.nn.Module, store: list) -> list:
    layers = module.model.layers

    def record(_m: Any, _args: Any, output: torch.Tensor) -> None:
        store.append(output.detach().clone())

    def ablate(_m: Any, args: tuple) -> tuple:
        (x,) = args
        store.append(x.detach().clone())
        x = x.clone()
        x[..., UNIT] = 0
        return (x,)

    handles = [layer.register_forward_hook(record) for layer in layers]
    handles.append(layers[0].mlp.down_proj.register_forward_pre_hook(ablate))
    return handles


def probe_task(n_layers: int) -> list[nt.Probe]:
    probes = [nt.probe(f"model.layers.{i}.output", nt.Record()) for i in range(n_layers)]
    probes.append(nt.probe("model.layers.0.mlp.mul", nt.Record()))
    probes.append(nt.probe("model.layers.0.mlp.mul", nt.Zero(index=(..., UNIT))))
    return probes


def check_same_result(module: torch.nn.Module, m: nt.Model, ids: torch.Tensor, probes: list[nt.Probe]) -> None:
    store: list = []
    handles = hand_hooks(module, store)
    try:
        expected = module(ids).logits
    finally:
        for h in handles:
            h.remove()
    got = m.forward(ids, probes=probes).logits
    m.clear_recordings()
    assert torch.equal(expected, got), "neurotap and hand hooks disagree"


def forward_variants(module: torch.nn.Module, ids: torch.Tensor, use_nnsight: bool) -> dict[str, Callable[[], Any]]:
    m = nt.wrap(module)
    m.points()
    n_layers = len(module.model.layers)
    probes = probe_task(n_layers)
    check_same_result(module, m, ids, probes)
    store: list = []

    def hooks_per_call() -> None:
        handles = hand_hooks(module, store)
        try:
            module(ids)
        finally:
            for h in handles:
                h.remove()
        store.clear()

    def neurotap_per_call() -> None:
        m.forward(ids, probes=probes)
        m.clear_recordings()

    _, trace = m.run(ids, record="blocks.*.resid_post")
    outputs: list = []
    handles = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for layer in module.model.layers]
    module(ids)
    for handle in handles:
        handle.remove()
    expected = torch.stack([out[0] if isinstance(out, tuple) else out for out in outputs])
    assert torch.equal(trace.stack("blocks.*.resid_post"), expected), "the trace and hand hooks disagree"
    variants: dict[str, Callable[[], Any]] = {
        "plain module": lambda: module(ids),
        "wrapped, no probes": lambda: m(ids),
        "hand hooks": hooks_per_call,
        "neurotap": neurotap_per_call,
        "run, every resid_post": lambda: m.run(ids, record="blocks.*.resid_post"),
    }
    if use_nnsight:
        from nnsight import NNsight

        traced = NNsight(module)

        def nnsight_call() -> None:
            with traced.trace(ids):
                x = traced.model.layers[0].mlp.down_proj.input
                saved = x.clone().save()  # noqa: F841
                x[..., UNIT] = 0
                outs = [traced.model.layers[i].output.save() for i in range(n_layers)]  # noqa: F841

        variants["nnsight 0.8"] = nnsight_call
    return variants


def report(title: str, medians: dict[str, float], base: str, pairs: list[tuple[str, str]]) -> None:
    print(f"\n{title}")
    for name, seconds in medians.items():
        print(f"  {name:<28} {seconds * 1e3:8.3f} ms   x{seconds / medians[base]:.3f} of {base}")
    for a, b in pairs:
        if a in medians and b in medians:
            print(f"  {a} / {b}: x{medians[a] / medians[b]:.3f}")


def generation(module: torch.nn.Module, ids: torch.Tensor, rounds: int) -> dict[str, float]:
    m = nt.wrap(module)
    m.points()
    ablation = {"model.layers.0.mlp.mul": nt.Zero(index=(..., UNIT))}
    kwargs = {"max_new_tokens": 16, "do_sample": False, "min_new_tokens": 16}

    def patched() -> None:
        with m.patch(ablation):
            m.generate(ids, **kwargs)

    return interleave({"plain generate": lambda: module.generate(ids, **kwargs), "neurotap": patched}, rounds, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--no-nnsight", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    pairs = [
        ("neurotap", "hand hooks"),
        ("neurotap", "nnsight 0.8"),
        ("wrapped, no probes", "plain module"),
        ("run, every resid_post", "plain module"),
    ]

    with torch.no_grad():
        tiny = tiny_llama()
        tiny.generation_config.pad_token_id = 0
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        medians = interleave(forward_variants(tiny, ids, not args.no_nnsight), args.rounds, 20)
        report("Tiny Llama (2 layers, hidden 64), batch 2 x 16, forward", medians, "plain module", pairs)
        gen = generation(tiny, ids[:1], max(5, args.rounds // 3))
        report("Tiny Llama, greedy generate 16 tokens, one ablation at every step", gen, "plain generate", [])

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
            medians = interleave(forward_variants(module, ids, not args.no_nnsight), max(5, args.rounds // 3), 3)
            report("SmolLM2-135M, batch 1 x 32, forward", medians, "plain module", pairs)
            m = nt.wrap(module)
            ratio, traced, plain = paired_ratio(
                lambda: m.run(ids, record="blocks.*.resid_post"), lambda: module(ids), max(10, args.rounds)
            )
            print(
                f"  run, every resid_post, paired with the plain module: x{ratio:.3f} "
                f"({traced * 1e3:.1f} ms against {plain * 1e3:.1f} ms, medians)"
            )
            gen = generation(module, ids[:, :8], 5)
            report("SmolLM2-135M, greedy generate 16 tokens, one ablation at every step", gen, "plain generate", [])


if __name__ == "__main__":
    main()
