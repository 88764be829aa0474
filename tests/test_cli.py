"""The command line: a user's mistake gets a one-line error and exit status 2, not a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import neurotap as nt
from neurotap.model.load import skeleton
from test_datasets import LAYER0, tiny  # noqa: F401 - the tiny model folder


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neurotap", *args], capture_output=True, text=True, timeout=600)


def test_an_unknown_model_is_a_clear_error(tmp_path):
    result = run("points", str(tmp_path / "no-such-model"))
    assert result.returncode == 2
    assert "is not a built-in model (smollm2-135m), a folder with a config.json, a .gguf file" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_every_command():
    result = run("--help")
    assert result.returncode == 0
    for command in ("demo", "points", "serve", "collect"):
        assert command in result.stdout


def test_version_and_every_help_shows_defaults():
    import neurotap

    assert run("--version").stdout.strip() == f"neurotap {neurotap.__version__}"
    for command in ("demo", "points", "serve", "collect", "export"):
        result = run(command, "--help")
        assert result.returncode == 0 and ("(default:" in result.stdout or command == "points"), command
        assert "(default: None)" not in result.stdout, command  # no default says nothing
        assert "a .gguf file, or a Hugging Face Hub id" in " ".join(result.stdout.split()) or command == "export"
    collect = " ".join(run("collect", "--help").stdout.split())
    assert collect.count("(default: bundled corpus)") == 1 and "(default: bundled corpus) (default:" not in collect


# --- collect --points is checked against the model's points before the model loads ----------------------------


def _collect(*args: str) -> subprocess.CompletedProcess:
    return run("collect", "--quiet", *args)


@pytest.fixture(scope="module")
def unloadable(
    tiny: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The tiny model's config and tokenizer with weights that are not a safetensors file: a load fails on them."""
    folder = tmp_path_factory.mktemp("unloadable")
    for file in tiny.iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, folder / file.name)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


@pytest.mark.parametrize(
    ("point", "closest", "ranks"),
    [
        ("model.layers.1.mlp.mull", "model.layers.1.mlp.mul", "1"),
        ("model.layers.*.mlp.mull", "model.layers.0.mlp.mul", "2"),
    ],
)
def test_collect_refuses_an_unknown_point_before_it_loads_the_model(
    unloadable: Path, tmp_path: Path, point: str, closest: str, ranks: str
) -> None:
    out = tmp_path / "acts"
    result = _collect("--model", str(unloadable), "--points", f"{LAYER0},{point}", "--out", str(out), "--ranks", ranks)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("neurotap collect: ") and repr(point) in message, message
    assert closest in message and f"List them with `neurotap points {unloadable} PREFIX`." in message, message
    assert "model.points(prefix)" not in message
    assert not out.exists()  # nor its .lock


def test_collect_with_known_points_gets_as_far_as_the_load(unloadable: Path, tmp_path: Path) -> None:
    """The other half of the test above: a load of that folder fails, on its weights."""
    out = tmp_path / "acts"
    result = _collect("--model", str(unloadable), "--points", f"{LAYER0},model.layers.*.mlp.mul", "--out", str(out))
    assert result.returncode != 0 and "safetensors" in result.stderr.lower(), result.stderr[-2000:]
    assert "no point" not in result.stderr


def test_a_wrong_prefix_for_neurotap_points_names_the_command_that_lists_them(tiny: Path) -> None:  # noqa: F811
    result = run("points", str(tiny), "model.layers.0.mlpp")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "closest: model.layers.0.mlp" in result.stderr
    assert f"List them with `neurotap points {tiny} PREFIX`." in result.stderr


def _gpt2_and_bert(folder: Path) -> list[Path]:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    saved = []
    for name, module in [
        ("gpt2", GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=3, n_head=2))),
        (
            "bert",
            BertModel(
                BertConfig(
                    vocab_size=50,
                    hidden_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    intermediate_size=64,
                    max_position_embeddings=32,
                )
            ),
        ),  # fmt: skip
    ]:
        module.save_pretrained(folder / name)
        saved.append(folder / name)
    return saved


def _same_points(skeleton: nt.Model, loaded: nt.Model) -> None:
    assert skeleton.points().names() == loaded.points().names()
    assert [(p.kind, p.shape, p.dtype) for p in skeleton.points()] == [
        (p.kind, p.shape, p.dtype) for p in loaded.points()
    ]
    assert skeleton.aliases() == loaded.aliases()
    assert all(p.is_meta for p in skeleton.module.parameters())  # no weights were read or allocated


def test_the_points_checked_before_the_load_are_the_loaded_models(tiny: Path, tmp_path: Path) -> None:  # noqa: F811
    for folder in [tiny, *_gpt2_and_bert(tmp_path)]:
        _same_points(skeleton(folder), nt.load(folder))


@pytest.mark.slow
def test_the_points_checked_before_the_load_are_smollm2s_every_layer() -> None:
    structure = skeleton("smollm2-135m")
    assert structure.module.config.num_hidden_layers == 30
    _same_points(structure, nt.load("smollm2-135m"))


@pytest.mark.parametrize(
    ("left_out", "command", "extra"), [("fastapi", "serve", "server"), ("numpy", "export", "datasets")]
)
def test_a_command_whose_optional_dependency_is_not_installed_names_the_extra(left_out, command, extra, tmp_path):
    # the package is made unimportable in the child, as if pip had installed neurotap without that extra
    script = (
        f"import sys; sys.modules[{left_out!r}] = None; from neurotap.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    args = {
        "serve": ["smollm2-135m", "--port", "0"],
        "export": [str(tmp_path / "dataset"), "--out", str(tmp_path / "out")],
    }
    result = subprocess.run(
        [sys.executable, "-c", script, command, *args[command]], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 2, result.stderr
    assert f"this needs {left_out}: pip install 'neurotap[{extra}]'" in result.stderr
    assert "Traceback" not in result.stderr
