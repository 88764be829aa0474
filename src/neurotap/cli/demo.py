"""``neurotap demo``: the Taboo experiment and a recording, on the built-in model."""

from __future__ import annotations

import argparse
import time

from . import MODEL_HELP


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("demo", help="forbid a word during generation, then record an MLP, on SmolLM2-135M")
    parser.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    parser.add_argument("--layer", type=int, default=15, help="the layer whose MLP product is recorded")
    return parser


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    import neurotap as nt

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    started = time.perf_counter()
    m = nt.load(args.model)
    tok = m.tokenizer
    print(f"Loaded {args.model} in {time.perf_counter() - started:.1f} s: {len(m.points())} probe points.\n")

    prompt = "The Eiffel Tower, located in"
    word = " Paris"
    (word_id,) = tok(word, add_special_tokens=False).input_ids
    inputs = tok(prompt, return_tensors="pt")
    n_prompt = inputs.input_ids.shape[1]

    def complete() -> str:
        out = m.generate(**inputs, max_new_tokens=16, do_sample=False)
        return tok.decode(out[0, n_prompt:], skip_special_tokens=True)

    def chance() -> float:  # of the word as the next token
        return m.forward(**inputs).logits[0, -1].softmax(-1)[word_id].item()

    # a logit of -inf gives the word probability 0 at every step, whatever the other logits are
    taboo = {"lm_head.output": nt.Replace(float("-inf"), index=(..., word_id))}
    print(f"Taboo: set the logit of {word!r} (token {word_id}) to -inf at lm_head.output, at every generation step.")
    print(f"  {prompt!r}")
    with torch.no_grad():
        print(f"  before: P({word!r} next) = {chance():.3f}  …{complete()!r}")
        with m.patch(taboo):
            print(f"  after:  P({word!r} next) = {chance():.3f}  …{complete()!r}\n")

    point = f"model.layers.{args.layer}.mlp.mul"
    text = "The capital of France is Paris, and the capital of Italy is Rome."
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        m.forward(ids, probes=[nt.probe(point, nt.Record())])
    acts = m.recordings()[point]["record"][0][0]  # [tokens, units]
    tokens = [tok.decode(t) for t in ids[0]]
    print(f"Recorded {point} on {text!r}: shape {tuple(acts.shape)}.")
    print("Its largest units (value, and the token where it peaks):")
    print(f"  {'unit':>6}  {'max':>8}  {'mean':>8}  token")
    peak, where = acts.max(dim=0)
    for unit in peak.topk(8).indices.tolist():
        token = tokens[where[unit]]
        print(f"  {unit:>6}  {peak[unit].item():>8.3f}  {acts[:, unit].mean().item():>8.3f}  {token!r}")
    print(f"\nDone in {time.perf_counter() - started:.1f} s.")
    return 0
