"""End to end: harvest SmolLM2's layer-6 residual, train a small SAE on it, splice it back in.

    python examples/sae_end_to_end.py [--tokens 1000000] [--work sae-work/] [--steps 1500] [--ranks 2]

1. Makes a corpus: synthetic English text drawn from a word-level Markov chain over
   neurotap's bundled public-domain-style essays (seeded, so every run makes the same
   text; generated here rather than shipped, so the wheel stays small).
2. Collects ``model.layers.6.output`` (the residual after layer 6) for ``--tokens``
   tokens with ``nt.collect`` (float16, sequences of 128); with ``--ranks N``, by
   ``neurotap collect --ranks N`` with the same settings, which writes the same dataset.
3. Trains a ReLU SAE (``--expansion`` x 576 features) in plain PyTorch on batches from
   ``ds.stream`` (chunked shuffle): MSE plus an L1 penalty weighted by decoder norms.
4. Saves it in SAELens's layout (``sae/cfg.json``, ``sae/sae_weights.safetensors``), splices
   it back with ``nt.SAE`` on held-out text and reports the reconstruction
   MSE, the fraction of variance explained, L0 (active features per token), and the
   next-token loss of the model without and with the SAE in place.

The collection resumes: it carries on after a kill, and a finished one is reused.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file

import neurotap as nt
from neurotap.datasets import bundled_corpus

MODEL = "smollm2-135m"
POINT = "model.layers.6.output"
SETTINGS = {"seq_len": 128, "batch_size": 8, "dtype": "float16", "shard_mb": 32.0}


def synthetic_corpus(path: Path, words: int, seed: int = 0) -> None:
    """JSON lines of documents drawn from an order-2 word Markov chain over the bundled corpus."""
    text = " ".join(p.read_text() for p in sorted(bundled_corpus().glob("*.txt")))
    tokens = re.findall(r"\S+", text)
    chain: dict[tuple[str, str], list[str]] = defaultdict(list)
    for a, b, c in zip(tokens, tokens[1:], tokens[2:]):
        chain[(a, b)].append(c)
    starts = [key for key in chain if key[0][:1].isupper()]
    generator = random.Random(seed)
    with open(path, "w") as file:
        written = 0
        while written < words:
            state = generator.choice(starts)
            document = list(state)
            for _ in range(generator.randint(60, 400)):
                following = chain.get(state)
                if not following:
                    break
                document.append(generator.choice(following))
                state = (state[1], document[-1])
            file.write(json.dumps({"text": " ".join(document)}) + "\n")
            written += len(document)


class SparseAutoencoder(torch.nn.Module):
    def __init__(self, d_in: int, d_sae: int, mean: torch.Tensor) -> None:
        super().__init__()
        decoder = torch.randn(d_sae, d_in)
        decoder = decoder / decoder.norm(dim=1, keepdim=True) * 0.1
        self.W_dec = torch.nn.Parameter(decoder)
        self.W_enc = torch.nn.Parameter(decoder.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(mean.clone())  # the data's mean: the reconstruction starts there

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        return features @ self.W_dec + self.b_dec, features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("sae-work"))
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--l1", type=float, default=3e-3)
    parser.add_argument("--eval-sequences", type=int, default=32)
    parser.add_argument("--ranks", type=int, default=1, help="collect with this many processes")
    args = parser.parse_args()
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)

    corpus = args.work / "corpus.jsonl"
    if not corpus.exists():
        synthetic_corpus(corpus, words=int(args.tokens * 1.0) + 20_000)
    started = time.perf_counter()
    if args.ranks > 1:  # the command line's parallel collection; nt.collect below then finds it complete
        subprocess.run(
            [sys.executable, "-m", "neurotap.cli", "collect", "--model", MODEL, "--points", POINT,
             "--data", str(corpus), "--out", str(args.work / "acts"), "--tokens", str(args.tokens),
             "--seq-len", str(SETTINGS["seq_len"]), "--batch", str(SETTINGS["batch_size"]),
             "--dtype", SETTINGS["dtype"], "--shard-mb", str(SETTINGS["shard_mb"]), "--ranks", str(args.ranks)],
            check=True,
        )  # fmt: skip
    m = nt.load(MODEL)
    ds = nt.collect(m, [POINT], args.work / "acts", data=corpus, tokens=args.tokens, model_name=MODEL, **SETTINGS)
    print(f"{ds}, ready after {time.perf_counter() - started:.0f} s")

    d_in = ds.shapes[POINT][0]
    # the BOS position's residual is huge and the same everywhere; SAEs are trained without it
    sample = ds.read(POINT, 0, min(len(ds), 65536)).float()
    keep = torch.arange(len(sample)) % ds.seq_len != 0
    scale = sample[keep].norm(dim=1).mean() / d_in**0.5  # train on unit-scale vectors, as SAELens normalises
    sae = SparseAutoencoder(d_in, d_in * args.expansion, sample[keep].mean(0) / scale)
    optimiser = torch.optim.Adam(sae.parameters(), lr=1e-3)
    started = time.perf_counter()
    batches = ds.stream(POINT, args.batch, epochs=None, rows=True)
    for step in range(args.steps):
        values, rows = next(batches)
        x = values[rows % ds.seq_len != 0].float() / scale
        x_hat, features = sae(x)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        sparsity = (features * sae.W_dec.norm(dim=1)).sum(-1).mean()
        loss = mse + args.l1 * d_in * sparsity
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 500 == 0 or step == args.steps - 1:
            l0 = (features > 0).float().sum(-1).mean()
            seconds = time.perf_counter() - started
            print(f"step {step:5d}  mse/d {mse.item() / d_in:.4f}  L0 {l0.item():6.1f}  ({seconds:.0f} s)")

    # the trained SAE in the residual's own units (it saw x / scale), as a plain-data patch; it replaces every
    # position but the BOS, whose residual it was not trained on
    with torch.no_grad():
        patch = nt.SAE(
            W_enc=sae.W_enc / scale,
            b_enc=sae.b_enc.clone(),
            W_dec=sae.W_dec * scale,
            b_dec=sae.b_dec * scale,
            index=(slice(None), slice(1, None)),
        )
    # saved in SAELens's layout, which nt.SAE.load (and SAELens) read back
    (args.work / "sae").mkdir(exist_ok=True)
    weights = {name: getattr(patch, name).contiguous() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    save_file(weights, args.work / "sae" / "sae_weights.safetensors")
    config = {"architecture": "standard", "d_in": d_in, "d_sae": patch.d_sae, "hook_name": "blocks.6.hook_resid_post"}
    (args.work / "sae" / "cfg.json").write_text(json.dumps(config))

    held_out = args.work / "held-out.jsonl"
    synthetic_corpus(held_out, words=args.eval_sequences * 128, seed=1)
    evaluation = nt.collect(m, [POINT], args.work / "held-out", data=held_out, seq_len=128, batch_size=8,
                            tokens=args.eval_sequences * 128, progress=False)  # fmt: skip
    ids = evaluation.read("tokens").long().reshape(-1, 128)
    plain_loss, sae_loss, total = 0.0, 0.0, 0.0
    m.clear_recordings()
    with torch.inference_mode():
        for batch in ids.split(8):
            plain_loss += m.forward(batch, labels=batch).loss.item() * len(batch)
            sae_loss += m.forward(batch, labels=batch, probes=[nt.probe(POINT, patch)]).loss.item() * len(batch)
            total += len(batch)
    saved = m.recordings()[POINT]
    residual = evaluation.read(POINT).float().reshape(-1, 128, d_in)[:, 1:].reshape(-1, d_in)
    variance = (residual - residual.mean(0)).pow(2).sum().item()
    squared_error = saved["sae_squared_error"].item()
    tokens = saved["sae_tokens"]
    print(
        f"held out, {tokens:,} tokens: reconstruction MSE {squared_error / (tokens * d_in):.4f} per element "
        f"(variance explained {1 - squared_error / variance:.1%}), L0 {saved['sae_l0'].item() / tokens:.1f} of "
        f"{patch.d_sae} features, next-token loss {plain_loss / total:.3f} plain, {sae_loss / total:.3f} with the "
        f"SAE spliced in (+{(sae_loss - plain_loss) / total:.3f})"
    )


if __name__ == "__main__":
    main()
