"""examples/sae_end_to_end.py at a tiny size: its figures against a hand computation on the unwrapped model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import neurotap as nt

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sae_end_to_end.py"
NUMBER = r"([-+]?[\d.]+)"


@pytest.mark.slow
def test_the_sae_example_reports_what_a_hand_computation_gives(tmp_path: Path) -> None:
    work = tmp_path / "sae-work"  # its default folder, where the README's example reads the SAE
    arguments = ["--tokens", "4096", "--steps", "4", "--batch", "256", "--eval-sequences", "8", "--work", str(work)]
    result = subprocess.run([sys.executable, str(EXAMPLE), *arguments], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(
        rf"reconstruction MSE {NUMBER} per element .* L0 {NUMBER} of (\d+) features, next-token loss {NUMBER} plain, "
        rf"{NUMBER} with the SAE",
        result.stdout,
    )
    assert found, result.stdout
    mse, l0, d_sae, plain, spliced = (float(value) for value in found.groups())
    assert nt.ActivationDataset(work / "acts").complete and len(nt.ActivationDataset(work / "acts")) == 4096

    # the SAE the example saved, spliced in by a hand-written hook at every position but the BOS
    weights = load_file(str(work / "sae" / "sae_weights.safetensors"))
    assert nt.SAE.read_config(work / "sae")["d_sae"] == d_sae == weights["W_enc"].shape[1]
    module = nt.load("smollm2-135m").module
    ids = nt.ActivationDataset(work / "held-out").read("tokens").long().view(-1, 128)
    totals = {"error": 0.0, "active": 0.0, "vectors": 0}

    def splice(layer, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        x = hidden[:, 1:]
        features = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
        x_hat = features @ weights["W_dec"] + weights["b_dec"]
        totals["error"] += (x - x_hat).pow(2).sum().item()
        totals["active"] += (features > 0).sum().item()
        totals["vectors"] += x.shape[0] * x.shape[1]
        hidden = torch.cat([hidden[:, :1], x_hat], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    losses = {"plain": 0.0, "spliced": 0.0}
    with torch.no_grad():
        for batch in ids.split(8):
            losses["plain"] += module(batch, labels=batch).loss.item() * len(batch)
            handle = module.model.layers[6].register_forward_hook(splice)
            try:
                losses["spliced"] += module(batch, labels=batch).loss.item() * len(batch)
            finally:
                handle.remove()
    assert plain == pytest.approx(losses["plain"] / len(ids), abs=1.5e-3)
    assert spliced == pytest.approx(losses["spliced"] / len(ids), abs=1.5e-3)
    assert mse == pytest.approx(totals["error"] / (totals["vectors"] * weights["W_enc"].shape[0]), abs=1.5e-4)
    assert l0 == pytest.approx(totals["active"] / totals["vectors"], abs=0.06)

    # the README's example, reading the SAE the example saved: its firing counts against the same SAE by hand
    readme = (EXAMPLE.parent.parent / "README.md").read_text()
    script = next(block for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "nt.SAE.load(" in block)
    script += "\nimport torch\ntorch.save({'ids': ids, **saved}, 'saved.pt')\n"
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-3000:]
    saved = torch.load(tmp_path / "saved.pt")
    captured = {}
    handle = module.model.layers[6].register_forward_hook(lambda layer, inputs, output: captured.update(out=output))
    try:
        with torch.no_grad():
            module(saved["ids"])
    finally:
        handle.remove()
    hidden = captured["out"][0] if isinstance(captured["out"], tuple) else captured["out"]
    features = torch.relu((hidden - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    assert int(saved["sae_tokens"]) == saved["ids"].numel()
    assert torch.equal(saved["sae_fired"].long(), (features > 0).sum((0, 1)).long())
