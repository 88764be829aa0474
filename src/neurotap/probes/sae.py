"""``nt.SAE``: a sparse autoencoder spliced in at a point, as a patch that is plain data.

The SAE's encoder and decoder act on the last dimension of the value (``d_in``)::

    pre      = (x - b_dec) @ W_enc + b_enc        (x @ W_enc + b_enc without apply_b_dec_to_input)
    features = relu(pre)                          standard
             = relu(pre) * (pre > threshold)      JumpReLU (``threshold`` given)
             = relu of the k largest of pre, 0 elsewhere    TopK (``k`` given)
    x_hat    = features @ W_dec + b_dec

These are the conventions of SAELens (checked against sae-lens 6.54.12), whose
on-disk layout :meth:`SAE.load` reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import NeurotapError, PatchError
from .context import SaveContext
from .patches import Index, Patch, _select, _tensor_at

SAELENS_CHECKED = "6.54.12"
_ARCHITECTURES = ("standard", "jumprelu", "topk")


@dataclass(frozen=True, eq=False)
class SAE(Patch):
    """Replace the value at a point with a sparse autoencoder's reconstruction, and record its features.

    ``W_enc`` ``[d_in, d_sae]``, ``b_enc`` ``[d_sae]``, ``W_dec`` ``[d_sae, d_in]``,
    ``b_dec`` ``[d_in]``; ``threshold`` ``[d_sae]`` makes it a JumpReLU SAE, ``k``
    a TopK one (see the module docstring for the maths). The SAE runs in the weights'
    dtype; the reconstruction is cast back to the value's.

    With ``error_term`` the value passed on is exactly the original one (the
    reconstruction plus the error ``x - x_hat``, which is held constant), so the
    forward is unchanged, while gradients flow through the SAE: back to ``x``
    through the features and into the weights, as SAELens's ``use_error_term`` has it.

    Saved under ``key`` (default ``"sae"``) at the point, across calls until
    ``clear_recordings()``:

    - with ``record``: ``sae_indices`` (a list, one ``[n, ndim]`` int64 tensor per
      call: the coordinates of every feature activation above zero, the value's
      leading dimensions then the feature), ``sae_values`` (``[n]`` each, the
      activations) and ``sae_shape`` (the dense shape of each call's features);
      :meth:`SAE.dense` rebuilds one call's features;
    - always, as running reductions: ``sae_tokens`` (vectors seen), ``sae_fired``
      ``[d_sae]`` (how many of them each feature fired on: its firing frequency is
      ``fired / tokens``), ``sae_max`` ``[d_sae]`` (largest activation),
      ``sae_squared_error`` (the sum of ``(x - x_hat)**2``, for the MSE) and
      ``sae_l0`` (the sum over vectors of the number of active features);
    - with ``examples > 0``: ``sae_top_values`` ``[examples, d_sae]`` (each feature's
      largest activations, largest first) and ``sae_top_where`` ``[examples, d_sae,
      1 + leading dims]`` (the call, counting from 0, then the batch row, position...).
    """

    W_enc: Any = None
    b_enc: Any = None
    W_dec: Any = None
    b_dec: Any = None
    threshold: Any = None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    error_term: bool = False
    record: bool = True
    examples: int = 0
    index: Index = None
    key: str = "sae"

    def __post_init__(self) -> None:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise PatchError(f"SAE: {name} must be a tensor, got {type(getattr(self, name)).__name__}")
        d_in, d_sae = self.d_in, self.d_sae
        expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        if self.W_enc.ndim != 2:
            raise PatchError(f"SAE: W_enc must be [d_in, d_sae], got the shape {tuple(self.W_enc.shape)}")
        if self.threshold is not None:
            if not isinstance(self.threshold, torch.Tensor):
                kind = type(self.threshold).__name__
                raise PatchError(f"SAE: threshold must be a tensor [d_sae] or None, got {kind}")
            expected["threshold"] = (d_sae,)
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise PatchError(
                    f"SAE: {name} has the shape {tuple(getattr(self, name).shape)}, but W_enc "
                    f"{tuple(self.W_enc.shape)} makes d_in {d_in} and d_sae {d_sae}, so it must be {shape}"
                )
        if self.k is not None and self.threshold is not None:
            raise PatchError("SAE: give threshold (JumpReLU) or k (TopK), not both")
        if self.k is not None and not (isinstance(self.k, int) and 1 <= self.k <= d_sae):
            raise PatchError(f"SAE: k must be an integer from 1 to d_sae {d_sae}, got {self.k!r}")
        if not isinstance(self.examples, int) or self.examples < 0:
            raise PatchError(f"SAE: examples must be a count of at least 0, got {self.examples!r}")

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    # -- the maths ---------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]`` of vectors ``x`` ``[..., d_in]`` (in the weights' dtype)."""
        x = x.to(self.W_enc.dtype)
        w_enc = self.W_enc.to(x.device)
        b_dec = self.b_dec.to(x.device, x.dtype)
        pre = (x - b_dec if self.apply_b_dec_to_input else x) @ w_enc + self.b_enc.to(x.device, x.dtype)
        if self.k is not None:
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        features = pre.relu()
        if self.threshold is not None:
            features = features * (pre > self.threshold.to(x.device, x.dtype))
        return features

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``[..., d_in]`` from feature activations."""
        return features @ self.W_dec.to(features.device, features.dtype) + self.b_dec.to(
            features.device, features.dtype
        )

    # -- the patch ---------------------------------------------------------------------------------

    def __call__(self, ctx: SaveContext, value: Any) -> Any:
        value = _tensor_at(ctx, value, self)
        part = _select(ctx, value, self.index, self)
        if part.ndim < 1 or part.shape[-1] != self.d_in:
            raise PatchError(
                f"SAE at {ctx.point!r}: the value has shape {tuple(part.shape)}"
                + ("" if self.index is None else f" at index {self.index!r}")
                + f", but the SAE reads vectors of d_in {self.d_in} along the last dimension"
            )
        features = self.encode(part)
        x_hat = self.decode(features)
        self._save(ctx, part, features, x_hat)
        if self.error_term:
            # the value itself, plus zero that carries the SAE's gradient: exactly the forward's value
            new = part.detach() + (x_hat - x_hat.detach()).to(part.dtype)
        else:
            new = x_hat.to(part.dtype)
        if self.index is None:
            return new
        result = value.clone()
        result[self.index] = new
        return result

    def _save(self, ctx: SaveContext, x: torch.Tensor, features: torch.Tensor, x_hat: torch.Tensor) -> None:
        data = ctx._data
        key = self.key
        features = features.detach()
        active = features > 0
        if self.record:
            where = active.nonzero()
            data.setdefault(key + "_indices", []).append(where)
            data.setdefault(key + "_values", []).append(features[active])
            data.setdefault(key + "_shape", []).append(torch.tensor(features.shape, dtype=torch.int64))
        flat = features.reshape(-1, self.d_sae)
        fired = active.reshape(-1, self.d_sae).sum(0)
        error = (x.detach().to(x_hat.dtype) - x_hat.detach()).pow(2).sum()
        peak = flat.amax(0) if len(flat) else torch.full((self.d_sae,), -torch.inf, dtype=flat.dtype)
        calls = data.get(key + "_calls", 0)
        if calls == 0:
            data[key + "_tokens"] = 0
            data[key + "_fired"] = torch.zeros_like(fired)
            data[key + "_max"] = torch.full_like(peak, -torch.inf)
            data[key + "_squared_error"] = torch.zeros_like(error)
            data[key + "_l0"] = torch.zeros_like(fired.sum())
        data[key + "_tokens"] += len(flat)
        data[key + "_fired"] = data[key + "_fired"] + fired
        data[key + "_max"] = torch.maximum(data[key + "_max"], peak)
        data[key + "_squared_error"] = data[key + "_squared_error"] + error
        data[key + "_l0"] = data[key + "_l0"] + fired.sum()
        if self.examples:
            self._top(data, features, calls)
        data[key + "_calls"] = calls + 1

    def _top(self, data: dict[str, Any], features: torch.Tensor, call: int) -> None:
        flat = features.reshape(-1, self.d_sae)
        top = flat.topk(min(self.examples, len(flat)), dim=0)
        coordinates, rest = [], top.indices
        for size in reversed(features.shape[:-1]):
            coordinates.append(rest % size)
            rest = rest // size
        coordinates.append(torch.full_like(rest, call))
        values, where = top.values, torch.stack(coordinates[::-1], dim=-1)
        values_key, where_key = self.key + "_top_values", self.key + "_top_where"
        if values_key in data:
            # earlier calls first, so that ties go to the earlier value
            values = torch.cat([data[values_key], values])
            where = torch.cat([data[where_key], where])
            best = values.topk(min(self.examples, len(values)), dim=0)
            values = best.values
            where = where.gather(0, best.indices[:, :, None].expand(-1, -1, where.shape[-1]))
        data[values_key], data[where_key] = values, where

    @staticmethod
    def dense(saved: Any, call: int = 0, key: str = "sae") -> torch.Tensor:
        """The features of one call, dense, from what an SAE with ``record`` saved at its point."""
        shape = torch.Size(saved[key + "_shape"][call].tolist())
        where, values = saved[key + "_indices"][call], saved[key + "_values"][call]
        dense = torch.zeros(shape, dtype=values.dtype)
        dense[tuple(where.T)] = values
        return dense

    # -- SAELens's layout --------------------------------------------------------------------------

    @classmethod
    def load(cls, folder: str | Path, *, dtype: torch.dtype | None = None, **options: Any) -> SAE:
        """An SAE from a folder in SAELens's layout: ``cfg.json`` and ``sae_weights.safetensors``.

        Reads the standard, JumpReLU (``threshold``, or an older ``log_threshold``) and
        TopK architectures, in the config layouts of SAELens 6 (``metadata``,
        ``architecture``) and of earlier versions. ``dtype`` converts the weights;
        ``options`` set the other fields (``error_term=True``, ``examples=10``, ...).
        SAEs that normalise their input at run time, reshape it (``hook_z``) or
        rescale TopK activations by the decoder norm are refused, since this patch
        would compute something else. :meth:`read_config` gives the config itself, with
        the hook name it was trained at.
        """
        from safetensors.torch import load_file

        path = Path(folder)
        config = cls.read_config(path)
        weights_path = path / "sae_weights.safetensors"
        if not weights_path.is_file():
            raise NeurotapError(f"{path} has no sae_weights.safetensors; an SAELens SAE folder holds it with cfg.json")
        weights = load_file(str(weights_path))
        if "log_threshold" in weights and "threshold" not in weights:
            weights["threshold"] = weights.pop("log_threshold").exp()
        scaling = weights.pop("scaling_factor", None)
        if scaling is not None and not torch.all(scaling == 1):
            raise NeurotapError(
                f"{weights_path} holds a scaling_factor that is not all ones (a fine-tuned SAELens SAE); fold it into "
                "W_dec first: W_dec * scaling_factor[:, None]"
            )
        architecture = config["architecture"]
        needed = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if architecture == "jumprelu" else [])
        missing = [name for name in needed if name not in weights]
        if missing:
            raise NeurotapError(f"{weights_path} has no {', '.join(missing)} (it has {sorted(weights)})")
        values = {name: weights[name] if dtype is None else weights[name].to(dtype) for name in needed}
        if architecture == "topk":
            values["k"] = int(config["k"])
        values["apply_b_dec_to_input"] = bool(config.get("apply_b_dec_to_input", True))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"SAE.load got unknown options {unknown}; the fields are {sorted(known)}")
        sae = cls(**values, **options)
        for name, size in (("d_in", sae.d_in), ("d_sae", sae.d_sae)):
            if name in config and config[name] != size:
                raise NeurotapError(f"{path}/cfg.json says {name} {config[name]}, but the weights give {size}")
        return sae

    @staticmethod
    def read_config(folder: str | Path) -> dict[str, Any]:
        """An SAELens ``cfg.json``, in SAELens 6's terms: ``architecture``, ``d_in``, ``d_sae``, ``hook_name``, ...

        ``hook_name`` is a TransformerLens hook name; ``blocks.6.hook_resid_post`` is
        neurotap's alias ``blocks.6.resid_post`` (and ``hook_resid_pre``, ``hook_mlp_out``
        ... likewise, without ``hook_``).
        """
        path = Path(folder) / "cfg.json"
        if not path.is_file():
            raise NeurotapError(f"{folder} has no cfg.json; it is not an SAELens SAE folder")
        try:
            config = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise NeurotapError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise NeurotapError(f"{path} holds a JSON {type(config).__name__}, not an object")
        metadata = config.get("metadata") if isinstance(config.get("metadata"), dict) else {}
        config = {**metadata, **config}  # SAELens 6 keeps the hook name and the model under metadata
        config.setdefault("hook_name", config.get("hook_point"))  # the name before SAELens 6
        activation = config.get("activation_fn", config.get("activation_fn_str", "relu"))
        architecture = config.get("architecture", "standard")
        if activation == "topk" and architecture == "standard":  # how SAELens 5 stored a TopK SAE
            architecture = "topk"
            config.setdefault("k", (config.get("activation_fn_kwargs") or {}).get("k"))
        config["architecture"] = architecture
        problems = []
        if architecture not in _ARCHITECTURES:
            problems.append(f"the architecture {architecture!r} (this reads {', '.join(_ARCHITECTURES)})")
        if architecture == "topk" and not isinstance(config.get("k"), int):
            problems.append(f"a TopK SAE without an integer k ({config.get('k')!r})")
        if config.get("normalize_activations", "none") not in ("none", None):
            problems.append(
                f"normalize_activations {config['normalize_activations']!r}, a run-time normalisation of the input"
            )
        if config.get("reshape_activations", "none") not in ("none", None):
            problems.append(f"reshape_activations {config['reshape_activations']!r}")
        if config.get("rescale_acts_by_decoder_norm"):
            problems.append("rescale_acts_by_decoder_norm")
        if config.get("finetuning_scaling_factor"):
            problems.append("finetuning_scaling_factor")
        if problems:
            raise NeurotapError(
                f"{path}: nt.SAE cannot splice this SAE as it is: {'; '.join(problems)}. Fold the normalisation into "
                "the weights with SAELens first, or save a standard, JumpReLU or TopK SAE"
            )
        return config
