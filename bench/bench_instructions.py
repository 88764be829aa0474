"""Per-call overhead counted in CPU instructions under callgrind, so a loaded machine cannot blur it.

    python bench/bench_instructions.py [--calls 5]      # needs valgrind (apt-get install valgrind)

Timings on a shared machine drift with its load (bench/bench_core.py says how much); the
number of instructions a call executes does not. This runs bench_core's tiny-Llama tasks
(2 x 16 tokens, one thread) under ``valgrind --tool=callgrind``, counting only while each
variant runs, and prints for each task the instructions a call adds over the plain
forward: hand-written torch hooks against neurotap, and their ratio (the goal is at most
1.15). The generate row is per generated step: a greedy 16-token generate with the
ablation at every step, its added instructions over a plain generate divided by 16.
The sweep row zeroes one (position, unit) cell of the MLP product with a hook, or a probe,
made for that call alone, another cell each call, as an activation-patching sweep does.
The gradients row is ``m.backward`` with a gradient probe at every decoder layer's
output against forward hooks and ``torch.autograd.grad``, over the forward and loss alone.
Each variant runs 10 times before it is counted, so that Python has specialised the code
it runs once per call as it has the rest, and the garbage collector's old objects are
frozen, so that a full collection landing in one variant cannot swamp its count.
Instructions are not time (a cache miss costs more than an add), so confirm a change
with bench_core on a quiet machine; but a change that removes instructions from the
per-call path shows here at once and exactly.

``--cache`` also simulates the caches (callgrind's ``--cache-sim``, a last level of
1 MiB, the size of a core's own L2 here) and prints, for each row, the first-level and
last-level misses a call adds and callgrind's cycle estimate (instructions + 10 per
first-level miss + 100 per last-level miss): a tiny forward pushes most of what ran
before it out of the caches, so the per-call path runs cold, and what it costs then is
the lines it touches rather than the instructions it executes.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import neurotap as nt  # noqa: E402
from bench_core import TASKS, UNIT, gradient_variants, probes_for, tiny_llama, with_hooks  # noqa: E402

CHILD = "NEUROTAP_INSTRUCTIONS_CHILD"
STEPS = 16
WARM = 10
SWEEP_CELL = "zero a new cell, patch made for the call"


def variants() -> dict[str, object]:
    torch.set_num_threads(1)
    module = tiny_llama()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    m = nt.wrap(module)
    m.points()
    layers = len(module.model.layers)
    store: list = []

    def hooks(task: str):
        def call() -> None:
            store.clear()
            with_hooks(module, task, lambda: module(ids), store)

        return call

    def neurotap(task: str):
        probes = probes_for(task, layers)

        def call() -> None:
            m.clear_recordings()  # the last call's first, as the hooks' store (see bench_core)
            m.forward(ids, probes=probes)

        return call

    found = {"plain": lambda: module(ids)}
    for task in TASKS:
        found[f"hooks {task}"] = hooks(task)
        found[f"neurotap {task}"] = neurotap(task)
    cells = itertools.cycle([(position, unit) for position in range(ids.shape[1]) for unit in range(128)])
    down = module.model.layers[0].mlp.down_proj

    def hooks_cell() -> None:  # a sweep's cell: a hook made for this call alone
        position, unit = next(cells)

        def ablate(_m: object, args: tuple) -> tuple:
            x = args[0].clone()
            x[:, position, unit] = 0
            return (x, *args[1:])

        handle = down.register_forward_pre_hook(ablate)
        try:
            module(ids)
        finally:
            handle.remove()

    def neurotap_cell() -> None:  # and a probe made for this call alone
        position, unit = next(cells)
        m.forward(ids, probes=[nt.probe("model.layers.0.mlp.mul", nt.Zero(index=(slice(None), position, unit)))])

    found["hooks cell"], found["neurotap cell"] = hooks_cell, neurotap_cell
    prompt = ids[:1]
    kwargs = {"max_new_tokens": STEPS, "min_new_tokens": STEPS, "do_sample": False, "pad_token_id": 0}
    ablation = {"model.layers.0.mlp.mul": nt.Zero(index=(..., UNIT))}
    probes = probes_for("zero", layers)

    def patched() -> None:
        with m.patch(ablation):
            m.generate(prompt, **kwargs)

    found["plain generate"] = lambda: module.generate(prompt, **kwargs)
    found["hooks generate"] = lambda: with_hooks(module, "zero", lambda: module.generate(prompt, **kwargs), [])
    found["neurotap generate"] = lambda: m.generate(prompt, probes=probes, **kwargs)
    found["neurotap generate, patch block"] = patched
    gradients = gradient_variants(module, ids)
    found["plain loss"] = gradients["forward and loss"]
    found["hooks gradients"] = gradients["hand hooks"]
    found["neurotap gradients"] = gradients["neurotap"]
    return found


def child(calls: int) -> None:
    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(os.getpid())], capture_output=True, check=True)

    with torch.no_grad():
        found = variants()
        for call in found.values():
            for _ in range(WARM):  # rewritten sources, plan caches, the allocator, Python's specialised code
                call()
        for _ in range(WARM):
            control("--instr=off")  # its own code too, which runs inside each count
        gc.collect()
        gc.freeze()
        control("--zero")
        for name, call in found.items():
            call()  # once more, uncounted: what another variant's calls left (a plan it took) is set again
            control("--instr=on")
            for _ in range(calls):
                call()
            control("--instr=off")
            control(f"--dump={name.replace(' ', '_')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5, help="calls counted per variant")
    parser.add_argument("--cache", action="store_true", help="also simulate the caches: misses and cycle estimates")
    args = parser.parse_args()
    if os.environ.get(CHILD):
        child(args.calls)
        return
    with tempfile.TemporaryDirectory() as folder:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            *(["--cache-sim=yes", "--LL=1048576,16,64"] if args.cache else []),
            f"--callgrind-out-file={folder}/counts.%p",
            sys.executable,
            __file__,
            "--calls",
            str(args.calls),
        ]
        done = subprocess.run(command, env={**os.environ, CHILD: "1"}, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"valgrind failed ({done.returncode}):\n{done.stderr[-3000:]}")
        per_call: dict[str, float] = {}
        misses: dict[str, tuple[float, float, float]] = {}  # first level, last level, cycle estimate
        for dump in Path(folder).glob("counts.*.*"):
            lines = dump.read_text().splitlines()
            name = next(line for line in lines if line.startswith("desc: Trigger")).rsplit(" ", 1)[-1].replace("_", " ")
            events = next(line for line in lines if line.startswith("events:")).split()[1:]
            totals = dict(zip(events, map(int, next(line for line in lines if line.startswith("totals:")).split()[1:])))
            per_call[name] = totals["Ir"] / args.calls
            if args.cache:
                first = sum(totals[e] for e in ("I1mr", "D1mr", "D1mw"))
                last = sum(totals[e] for e in ("ILmr", "DLmr", "DLmw"))
                misses[name] = (
                    first / args.calls,
                    last / args.calls,
                    (totals["Ir"] + 10 * first + 100 * last) / args.calls,
                )
    if misses:
        print_misses(misses)
    plain = per_call["plain"]
    print(f"tiny Llama, 2 x 16 tokens: the plain forward executes {plain / 1e3:,.0f} k instructions")
    print(f"{'task':<40} {'hand hooks add':>15} {'neurotap adds':>15} {'ratio':>7}")
    for task, what in TASKS.items():
        hooks = per_call[f"hooks {task}"] - plain
        ours = per_call[f"neurotap {task}"] - plain
        print(f"{what:<40} {hooks / 1e3:>13,.0f} k {ours / 1e3:>13,.0f} k {ours / hooks:>6.2f}x")
    hooks, ours = per_call["hooks cell"] - plain, per_call["neurotap cell"] - plain
    print(f"{SWEEP_CELL:<40} {hooks / 1e3:>13,.0f} k {ours / 1e3:>13,.0f} k {ours / hooks:>6.2f}x")
    plain = per_call["plain generate"]
    print(f"greedy generate, {STEPS} tokens: the plain generate executes {plain / STEPS / 1e3:,.0f} k a step")
    hooks = (per_call["hooks generate"] - plain) / STEPS
    for name in ("neurotap generate", "neurotap generate, patch block"):
        ours = (per_call[name] - plain) / STEPS
        what = f"ablation every step, per step{name.removeprefix('neurotap generate')}"
        print(f"{what:<40} {hooks / 1e3:>13,.1f} k {ours / 1e3:>13,.1f} k {ours / hooks:>6.2f}x")
    plain = per_call["plain loss"]
    print(f"next-token loss: the forward and loss execute {plain / 1e3:,.0f} k instructions")
    hooks, ours = per_call["hooks gradients"] - plain, per_call["neurotap gradients"] - plain
    what = "gradient at every layer's output"
    print(f"{what:<40} {hooks / 1e3:>13,.0f} k {ours / 1e3:>13,.0f} k {ours / hooks:>6.2f}x")


def print_misses(misses: dict[str, tuple[float, float, float]]) -> None:
    """Each row's added first- and last-level misses and cycle estimate over its plain run, hand hooks against
    neurotap (generate: per step)."""
    rows = [(f"{what}", f"hooks {task}", f"neurotap {task}", "plain", 1) for task, what in TASKS.items()]
    rows.append((SWEEP_CELL, "hooks cell", "neurotap cell", "plain", 1))
    rows += [
        (f"generate, per step{name.removeprefix('neurotap generate')}", "hooks generate", name, "plain generate", STEPS)
        for name in ("neurotap generate", "neurotap generate, patch block")
    ]
    rows.append(("gradient at every layer's output", "hooks gradients", "neurotap gradients", "plain loss", 1))
    heading = f"{'L1 misses':>15} {'LL misses':>13} {'est. cycles':>17} {'ratio':>6}"
    print(f"{'added per call, hand hooks / neurotap':<40} {heading}")
    for what, hooks, ours, plain, steps in rows:
        h, o = ([(misses[v][i] - misses[plain][i]) / steps for i in range(3)] for v in (hooks, ours))
        cycles = f"{h[2] / 1e3:,.1f}k/{o[2] / 1e3:,.1f}k"
        cells = f"{h[0]:>7,.0f}/{o[0]:<7,.0f} {h[1]:>6,.0f}/{o[1]:<6,.0f} {cycles:>17}"
        print(f"{what:<40} {cells} {o[2] / h[2]:>5.2f}x")
    print()


if __name__ == "__main__":
    main()
