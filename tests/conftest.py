"""Tiny seeded models for the core tests, and helpers that compare against them.

Every Hugging Face model here is a random, few-layer, hidden-64 configuration built
locally (no downloads), in eval mode with eager attention so that attention
probabilities are real tensors. ``toy`` is a hand-written module whose forward
mixes arithmetic, a module-level helper, a ``self.`` helper and a loop that calls
the same submodule twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

VOCAB = 128
HIDDEN = 64
SEQ = 7


def gate(h: torch.Tensor, scale: float) -> torch.Tensor:
    """A module-level helper the toy calls: neurotap enters it."""
    squashed = torch.tanh(h)
    return squashed * scale + 1.0


class Toy(nn.Module):
    """Arithmetic, a helper function, a self.method helper and a submodule called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.block = nn.Linear(16, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.up(h)) * 0.5
        return self.down(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for _ in range(2):
            h = h + self.block(h)
        h = gate(h, 2.0)
        h = h - self.mix(h)
        return self.head(h) / 3.0


def toy_by_hand(toy: Toy, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The toy's forward written out again, naming the intermediates the tests read."""
    h = toy.embed(x)
    block_0 = toy.block(h)
    loop_0 = h + block_0
    block_1 = toy.block(loop_0)
    loop_1 = loop_0 + block_1
    gated = torch.tanh(loop_1) * 2.0 + 1.0
    hidden = torch.relu(toy.up(gated)) * 0.5
    mixed = toy.down(hidden)
    out = toy.head(gated - mixed) / 3.0
    return {
        "block_0": block_0,
        "loop_0": loop_0,
        "block_1": block_1,
        "loop_1": loop_1,
        "gated": gated,
        "hidden": hidden,
        "out": out,
    }


def _hf(config_cls: str, model_cls: str, **fields: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=None, attn_implementation="eager")
        config = getattr(transformers, config_cls)(**common, **fields)
        return getattr(transformers, model_cls)(config)

    return build


_LLAMA_LIKE = dict(
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


@dataclass(frozen=True)
class Arch:
    """One architecture and where its parts are, for the hand computations.

    ``mlp_point`` is the point holding the MLP hidden activation (the value the
    down projection reads); ``mlp_consumer`` is the module that reads it, so a plain
    PyTorch hook on that module's input sees the same tensor.
    """

    name: str
    build: Callable[[], nn.Module]
    family: str
    mlp_point: str
    mlp_consumer: str
    decoder: bool


ARCHS = {
    "gpt2": Arch(
        "gpt2",
        _hf("GPT2Config", "GPT2LMHeadModel", n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64),
        "gpt2",
        "transformer.h.0.mlp.act.output",
        "transformer.h.0.mlp.c_proj",
        True,
    ),
    "llama": Arch(
        "llama",
        _hf("LlamaConfig", "LlamaForCausalLM", **_LLAMA_LIKE),
        "llama",
        "model.layers.0.mlp.mul",
        "model.layers.0.mlp.down_proj",
        True,
    ),
    "mistral": Arch(
        "mistral",
        _hf("MistralConfig", "MistralForCausalLM", **_LLAMA_LIKE),
        "llama",
        "model.layers.0.mlp.mul",
        "model.layers.0.mlp.down_proj",
        True,
    ),
    "qwen2": Arch(
        "qwen2",
        _hf("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA_LIKE),
        "llama",
        "model.layers.0.mlp.mul",
        "model.layers.0.mlp.down_proj",
        True,
    ),
    "gpt_neox": Arch(
        "gpt_neox",
        _hf(
            "GPTNeoXConfig",
            "GPTNeoXForCausalLM",
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        "gpt_neox",
        "gpt_neox.layers.0.mlp.act.output",
        "gpt_neox.layers.0.mlp.dense_4h_to_h",
        True,
    ),
    "gemma": Arch(
        "gemma",
        _hf("GemmaConfig", "GemmaForCausalLM", head_dim=16, **_LLAMA_LIKE),
        "llama",
        "model.layers.0.mlp.mul",
        "model.layers.0.mlp.down_proj",
        True,
    ),
    "bert": Arch(
        "bert",
        _hf(
            "BertConfig",
            "BertModel",
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        "bert",
        "encoder.layer.0.intermediate.intermediate_act_fn.output",
        "encoder.layer.0.output.dense",
        False,
    ),
    "toy": Arch("toy", Toy, "toy", "mix.mul", "down", False),
}
DECODERS = [name for name, arch in ARCHS.items() if arch.decoder]

_built: dict[str, nn.Module] = {}


def tiny_module(name: str) -> nn.Module:
    """The seeded tiny module for ``name``, built once per session, in eval mode.

    Every test shares it, so none may leave anything on it: a call with ``output_attentions`` or
    ``output_hidden_states`` makes transformers put capturing hooks on it for good (use ``tiny_llama()`` or a copy).
    """
    if name not in _built:
        torch.manual_seed(0)
        _built[name] = ARCHS[name].build().eval()
    return _built[name]


def tiny_llama(seed: int = 0) -> nn.Module:
    """A fresh tiny Llama like ``tiny_module("llama")``, seeded with ``seed``, for tests that change or save it."""
    torch.manual_seed(seed)
    return ARCHS["llama"].build().eval()


def example_inputs(name: str, batch: int = 2, seq: int = SEQ, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if name == "toy":
        return {"x": torch.randn(batch, seq, 8, generator=generator)}
    return {"input_ids": torch.randint(2, VOCAB, (batch, seq), generator=generator)}


def wrap_tiny(name: str):
    import neurotap as nt

    module = tiny_module(name)
    example = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(2)) if name == "toy" else None
    return nt.wrap(module, example=example)


def tensors_of(output: Any) -> list[torch.Tensor]:
    """Every tensor in a forward's output (ModelOutput fields, tuples), cache objects left out."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in tensors_of(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in tensors_of(value)]
    return []


def main_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output["logits"] if "logits" in output else output["last_hidden_state"]


def assert_same_output(actual: Any, expected: Any) -> None:
    got, want = tensors_of(actual), tensors_of(expected)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def snapshot_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_clean(module: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
    """No hooks left, original forwards back, and (if given) weights as in ``state``."""
    for path, sub in module.named_modules():
        where = path or "<root>"
        assert not sub._forward_hooks, f"forward hooks left on {where}"
        assert not sub._forward_pre_hooks, f"forward pre-hooks left on {where}"
        assert not sub._backward_hooks, f"backward hooks left on {where}"
        assert "forward" not in sub.__dict__, f"instance forward left on {where}"
        assert "__reduce_ex__" not in sub.__dict__, f"copy hook left on {where}"
        assert not [k for k in sub.__dict__ if k.startswith("_neurotap")], f"neurotap attributes left on {where}"
    if state is not None:
        now = module.state_dict()
        assert now.keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(now[key], value), f"{key} changed"


@pytest.fixture(params=list(ARCHS), ids=list(ARCHS))
def arch(request: pytest.FixtureRequest) -> Arch:
    return ARCHS[request.param]


@pytest.fixture(params=DECODERS, ids=DECODERS)
def decoder(request: pytest.FixtureRequest) -> Arch:
    return ARCHS[request.param]


@pytest.fixture(scope="session")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_llama()`` saved as a model folder with a word-level tokenizer, for the tests that load or serve one.

    Every test reads it and none writes in it; a module that needs other weights defines its own ``folder``.
    """
    from serving import save_with_word_tokenizer

    return save_with_word_tokenizer(tiny_llama(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``--token-file`` holding the researchers' tokens ``serving.ALPHA`` and ``serving.BETA``."""
    from serving import write_token_file

    return write_token_file(tmp_path_factory.mktemp("auth"))


@pytest.fixture(scope="module")
def local(folder: Path):
    """The model in ``folder`` loaded as a server loads it: what a remote call's results are compared with."""
    import neurotap as nt

    return nt.load(str(folder))


def local_recordings(model: Any) -> dict[str, dict[str, Any]]:
    """What ``model`` recorded, by point, as plain dicts; its recordings are cleared."""
    recorded = {name: dict(ctx) for name, ctx in model.recordings().items()}
    model.clear_recordings()
    return recorded


@pytest.fixture
def llama():
    """A fresh wrapper (no recordings, no patches) around the session's tiny Llama."""
    model = wrap_tiny("llama")
    yield model
    assert_clean(model.module)


@pytest.fixture
def toy():
    model = wrap_tiny("toy")
    yield model
    assert_clean(model.module)


def first_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else value[0]


def alias_values_by_hand(module: nn.Module, stack: str, per_layer: dict, top: dict, inputs: dict) -> dict[str, Any]:
    """Every alias's value from plain PyTorch hooks on a copy, plus the eager attentions and the logits.

    ``per_layer`` maps an alias under ``blocks.N`` to ``(path under the layer, "in" or "out")``: the
    module's first input or (the first tensor of) its output; ``top`` the same for whole-model aliases.
    """
    import copy

    reference = copy.deepcopy(module)  # output_attentions leaves transformers' own capturing hooks on a module
    layers = len(reference.get_submodule(stack))
    where = {
        f"blocks.{i}.{alias}": (f"{stack}.{i}.{path}".rstrip("."), how)
        for i in range(layers)
        for alias, (path, how) in per_layer.items()
    }
    where.update(top)
    values: dict[str, Any] = {}

    def keep(alias: str, how: str):
        def before(_m, args, kwargs) -> None:
            values.setdefault(alias, args[0] if args else kwargs["hidden_states"])

        def after(_m, _args, _kwargs, out) -> None:
            values.setdefault(alias, first_tensor(out))

        return before if how == "in" else after

    handles = []
    for alias, (path, how) in where.items():
        sub = reference.get_submodule(path)
        register = sub.register_forward_pre_hook if how == "in" else sub.register_forward_hook
        handles.append(register(keep(alias, how), with_kwargs=True))
    try:
        with torch.no_grad():
            plain = reference(**inputs, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    for i in range(layers):
        values[f"blocks.{i}.attn.pattern"] = plain.attentions[i]
    if "logits" in plain:
        values["logits"] = plain.logits
    return values


def assert_aliases_read(model: Any, expected: dict[str, Any], inputs: dict, *, atol: float, rtol: float = 1e-5) -> None:
    """Each alias in ``expected``, recorded by the model in one forward, is its hand value; the model is left clean."""
    import neurotap as nt

    with torch.no_grad():
        model.forward(**inputs, probes=[nt.probe(alias, nt.Record()) for alias in sorted(expected)])
    recorded = model.recordings()
    for alias in sorted(expected):
        got = first_tensor(recorded[alias]["record"][0])
        assert got.shape == expected[alias].shape and torch.allclose(got, expected[alias], atol=atol, rtol=rtol), alias
    model.clear_recordings()
    assert_clean(model.module)
