"""Causal tracing on SmolLM2, batched, against one forward per cell.

    python bench/bench_experiments.py [--rounds 3] [--batch 64]

The trace: "The Eiffel Tower is located in the city of" (10 tokens), the subject
"The Eiffel Tower" noised, the probability of " Paris"; 30 layers x 10 positions
x 10 noise samples. Two variants run interleaved round by round in one process on
one thread:

- ``nt.experiments.causal_trace`` (each forward holds ``--batch`` rows: several
  cells of one layer with their samples; the layers before it are skipped with
  ``nt.Skip``, since they compute what the noised run computed);
- the same with the layers named (``points=``), so that every row runs every layer
  from the noised embeddings, the restorations as ``nt.Replace(index=...)``;
- a hand-written loop on the unwrapped model with plain torch hooks: one forward
  per (layer, position) cell, its 10 samples as the batch.

Both read only the last position's logits (``logits_to_keep=1``) without a cache.
Medians of the wall time are printed with their ratio, and the largest difference
between the two tables (they compute the same numbers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import neurotap as nt

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
TARGET = " Paris"
SAMPLES = 10


def by_hand(module: torch.nn.Module, ids: torch.Tensor, start: int, end: int, target: int) -> torch.Tensor:
    """Meng et al.'s trace with plain hooks, one forward per (layer, position)."""
    layers = module.model.layers
    clean: dict[int, torch.Tensor] = {}
    handles = [
        layer.register_forward_hook(lambda _m, _a, out, i=i: clean.__setitem__(i, out))
        for i, layer in enumerate(layers)
    ]
    embedded: list[torch.Tensor] = []
    handles.append(module.model.embed_tokens.register_forward_hook(lambda _m, _a, out: embedded.append(out)))
    with torch.no_grad():
        module(ids, use_cache=False, logits_to_keep=1)
    for handle in handles:
        handle.remove()
    draws = torch.randn(SAMPLES, end - start, embedded[0].shape[-1], generator=torch.Generator().manual_seed(0))
    noises = draws * 3.0 * embedded[0].std()

    def noise(_m, _a, out):
        out = out.clone()
        out[:, start:end] += noises
        return out

    table = torch.zeros(len(layers), ids.shape[1])
    batch = ids.expand(SAMPLES, -1)
    noising = module.model.embed_tokens.register_forward_hook(noise)
    try:
        for i, layer in enumerate(layers):
            for position in range(ids.shape[1]):

                def restore(_m, _a, out, i=i, position=position):
                    out = out.clone()
                    out[:, position] = clean[i][0, position]
                    return out

                handle = layer.register_forward_hook(restore)
                try:
                    with torch.no_grad():
                        logits = module(batch, use_cache=False, logits_to_keep=1).logits[:, -1]
                finally:
                    handle.remove()
                table[i, position] = logits.float().softmax(-1)[:, target].mean()
    finally:
        noising.remove()
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="rows per forward of the batched trace")
    parser.add_argument("--only", help="run only this variant: batched, every-layer or loop")
    args = parser.parse_args()
    torch.set_num_threads(1)
    m = nt.load("smollm2-135m")
    ids = m.tokenizer(PROMPT, return_tensors="pt").input_ids
    target = m.tokenizer(TARGET, add_special_tokens=False).input_ids[0]
    layers = [f"blocks.{i}.resid_post" for i in range(len(m.module.model.layers))]
    variants = {
        "batched": lambda: nt.experiments.causal_trace(m, PROMPT, SUBJECT, TARGET, samples=SAMPLES, batch=args.batch),
        "batched, every layer run": lambda: nt.experiments.causal_trace(
            m, PROMPT, SUBJECT, TARGET, samples=SAMPLES, batch=args.batch, points=layers
        ),
        "one forward per cell": lambda: by_hand(m.module, ids, 0, 4, target),  # "The", " E", "iffel", " Tower"
    }
    if args.only:
        short = {"batched": "batched", "every-layer": "batched, every layer run", "loop": "one forward per cell"}
        variants = {short[args.only]: variants[short[args.only]]}
    times: dict[str, list[float]] = {name: [] for name in variants}
    tables: dict[str, torch.Tensor] = {}
    loads = []
    for round_ in range(args.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            result = run()
            times[name].append(time.perf_counter() - start)
            loads.append(os.getloadavg()[0])
            if isinstance(result, torch.Tensor):
                tables[name] = result
            else:
                tables[name], clean, corrupt = result.values, result.clean, result.corrupt
            print(f"round {round_ + 1}: {name} {times[name][-1]:.1f} s (load {loads[-1]:.1f})", flush=True)
    loop = statistics.median(times.get("one forward per cell", [float("nan")]))
    print(
        f"causal_trace, SmolLM2-135M, {len(layers)} layers x {ids.shape[1]} positions x {SAMPLES} samples, "
        f"one thread, {args.rounds} rounds, {args.batch} rows a forward, load {min(loads):.1f}-{max(loads):.1f}"
    )
    for name in variants:
        median = statistics.median(times[name])
        print(f"  {name:<26} {median:8.1f} s  (the loop takes {loop / median:.2f}x as long)")
    if "one forward per cell" in tables:
        worst = max(float((table - tables["one forward per cell"]).abs().max()) for table in tables.values())
        print(f"  largest difference between the tables: {worst:.2e}")
    if "batched" in tables:
        print(f"  p(' Paris'): clean {clean:.3f}, subject noised {corrupt:.3f}")
    torch.save(tables, os.environ.get("BENCH_TABLES", os.devnull))


if __name__ == "__main__":
    main()
