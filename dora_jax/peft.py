"""Adapters to and from HuggingFace PEFT (``adapter_model.safetensors`` + ``adapter_config.json``).

A PEFT DoRA adapter holds, for each adapted torch module ``<name>``::

    base_model.model.<name>.lora_A.weight          (r, in)      Linear; (r, in, *window) Conv
    base_model.model.<name>.lora_B.weight          (out, r)     Linear; (out, r, 1, ...) Conv
    base_model.model.<name>.lora_magnitude_vector  (out,)       Linear; (1, out, 1, ...) Conv
    base_model.model.<name>.lora_embedding_A       (r, vocab)   Embedding
    base_model.model.<name>.lora_embedding_B       (features, r)

and the full weights of ``modules_to_save``. In Flax orientation the same arrays are
``lora_a (in, r)``, ``lora_b (r, out)`` and ``magnitude (out,)`` (kernel = weight.T).
Flax paths become torch module names by ``module_name``: ``/`` becomes ``.`` and a
trailing ``_<n>`` of a path segment becomes ``.<n>`` (``encoder/layer_0/attention`` is
``encoder.layer.0.attention``, HuggingFace's naming); pass your own for other models.

Linen variables and NNX models (through :func:`dora_jax.nnx.as_linen_variables`) both
move. Dense (2-d kernel), Conv and Embed layers move; a layer PEFT has no counterpart for
(DenseGeneral with several axes, Einsum, scanned layers) raises a ``ValueError`` naming
its path. No pickle is involved: arrays are safetensors, the config is JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from dora_jax import nnx as dora_nnx
from dora_jax.config import DoRAConfig
from dora_jax.linen import DORA

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def module_name(path: str) -> str:
    """Flax path -> torch module name: ``encoder/layer_0/query`` -> ``encoder.layer.0.query``."""
    return ".".join(re.sub(r"^(.*)_(\d+)$", r"\1.\2", part) for part in path.split("/"))


def _adapted_layers(variables: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{path: {"adapters": {...}, "base": {...}}}`` for every layer with adapters."""
    found: dict[str, dict[str, Any]] = {}

    def visit(dora, params, path):
        if "lora_a" in dora:
            found["/".join(path)] = {"adapters": dora, "base": params}
            return
        for key, value in dora.items():
            if isinstance(value, Mapping):
                visit(
                    value, params.get(key, {}) if isinstance(params, Mapping) else {}, (*path, key)
                )

    visit(variables.get(DORA, {}), variables.get("params", {}), ())
    return found


def _kind(path: str, base: Mapping[str, Any], adapters: Mapping[str, Any]) -> str:
    """``"linear"``, ``"conv"`` or ``"embedding"``; raise where PEFT has no counterpart."""
    if "embedding" in base:
        return "embedding"
    kernel = base.get("kernel")
    a, b = np.shape(adapters["lora_a"]), np.shape(adapters["lora_b"])
    if kernel is not None and np.ndim(kernel) == 2 and len(a) == 2 and len(b) == 2:
        return "linear"
    if kernel is not None and np.ndim(kernel) >= 3 and len(b) == 2 and len(a) == np.ndim(kernel):
        return "conv"
    raise ValueError(
        f"{path!r}: PEFT has no layer for a kernel of shape {np.shape(kernel)} with lora_a "
        f"{a} and lora_b {b} (DenseGeneral with several axes, Einsum or scanned layers)."
    )


def _to_torch(kind: str, name: str, adapters: Mapping[str, Any]) -> dict[str, np.ndarray]:
    a, b = np.asarray(adapters["lora_a"]), np.asarray(adapters["lora_b"])
    m = adapters.get("magnitude")
    if kind == "embedding":
        out = {f"{name}.lora_embedding_A": a.T, f"{name}.lora_embedding_B": b.T}
    elif kind == "linear":
        out = {f"{name}.lora_A.weight": a.T, f"{name}.lora_B.weight": b.T}
    else:  # conv: (*window, in, r) -> (r, in, *window); (r, out) -> (out, r, 1, ...)
        window = a.ndim - 2
        to_torch = (a.ndim - 1, a.ndim - 2, *range(window))
        out = {
            f"{name}.lora_A.weight": np.transpose(a, to_torch),
            f"{name}.lora_B.weight": b.T.reshape(*b.T.shape, *(1,) * window),
        }
        if m is not None:
            m = np.asarray(m).reshape(1, -1, *(1,) * window)
    if m is not None:
        out[f"{name}.lora_magnitude_vector"] = np.asarray(m)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def _from_torch(kind: str, name: str, tensors: Mapping[str, np.ndarray], want: Mapping[str, Any]):
    def take(key):
        if key not in tensors:
            raise ValueError(f"{name!r}: the PEFT adapter has no tensor {key!r}.")
        return np.asarray(tensors[key])

    if kind == "embedding":
        a, b = take(f"{name}.lora_embedding_A").T, take(f"{name}.lora_embedding_B").T
    elif kind == "linear":
        a, b = take(f"{name}.lora_A.weight").T, take(f"{name}.lora_B.weight").T
    else:
        lora_a = take(f"{name}.lora_A.weight")
        window = lora_a.ndim - 2
        a = np.transpose(lora_a, (*range(2, 2 + window), 1, 0))
        b = take(f"{name}.lora_B.weight").reshape(-1, lora_a.shape[0]).T
    out = {"lora_a": a, "lora_b": b}
    if "magnitude" in want:
        out["magnitude"] = take(f"{name}.lora_magnitude_vector").reshape(-1)
    for key, value in out.items():
        expected = tuple(np.shape(want[key]))
        if value.shape != expected:
            raise ValueError(
                f"{name!r}: PEFT's {key} converts to shape {value.shape}, but the model's "
                f"{key} has shape {expected}."
            )
        out[key] = value.astype(np.asarray(want[key]).dtype)
    return out


def _saved_modules(params: Mapping[str, Any], config: DoRAConfig | None) -> dict[str, Any]:
    saved: dict[str, Any] = {}

    def visit(tree, path):
        for key, value in tree.items():
            if not isinstance(value, Mapping):
                continue
            name = "/".join((*path, key))
            if config is not None and config.is_saved(name):
                saved[name] = value
            else:
                visit(value, (*path, key))

    visit(params, ())
    return saved


def _module_to_torch(name: str, module: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in module.items():
        value = np.asarray(value)
        if key == "kernel":
            axes = (value.ndim - 1, value.ndim - 2, *range(value.ndim - 2))
            out[f"{name}.weight"] = np.transpose(value, axes)
        elif key in ("embedding", "scale"):
            out[f"{name}.weight"] = value
        elif key == "bias":
            out[f"{name}.bias"] = value
        else:
            raise ValueError(f"{name!r}: no PEFT name for the parameter {key!r}.")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_pretrained(
    path: str | Path,
    variables: Mapping[str, Any],
    config: DoRAConfig,
    *,
    module_name: Callable[[str], str] = module_name,
) -> None:
    """Write ``variables``' adapters as a PEFT adapter folder.

    Args:
      path: folder to create (``adapter_model.safetensors``, ``adapter_config.json``).
      variables: with ``"params"`` and ``"dora"`` (a wrapped model's or DoRA layers'),
        or an NNX model adapted by :func:`dora_jax.nnx.apply_dora`.
      config: the :class:`~dora_jax.DoRAConfig` the adapters were made with.
      module_name: Flax path -> torch module name.

    ``PeftModel.from_pretrained(torch_model, path)`` then loads them. Per-layer ranks and
    alphas become ``rank_pattern`` / ``alpha_pattern`` entries of the exact module names.
    """
    from safetensors.numpy import save_file

    variables = _linen_variables(variables)
    tensors: dict[str, np.ndarray] = {}
    targets, rank_pattern, alpha_pattern = [], {}, {}
    for flax_path, layer in _adapted_layers(variables).items():
        kind = _kind(flax_path, layer["base"], layer["adapters"])
        name = module_name(flax_path)
        targets.append(name)
        tensors.update({PREFIX + k: v for k, v in _to_torch(kind, name, layer["adapters"]).items()})
        settings = config.settings(flax_path)
        rank = int(np.shape(layer["adapters"]["lora_a"])[-1])
        # PEFT matches pattern keys against the end of module names.
        if rank != config.rank:
            rank_pattern[re.escape(name)] = rank
        if settings.alpha != config.alpha:
            alpha_pattern[re.escape(name)] = settings.alpha
    saved = _saved_modules(variables.get("params", {}), config)
    for flax_path, module in saved.items():
        name = module_name(flax_path)
        tensors.update({PREFIX + k: v for k, v in _module_to_torch(name, module).items()})
    if not targets:
        raise ValueError("save_pretrained found no adapters in variables['dora'].")
    peft_config = {
        "peft_type": "LORA",
        "use_dora": config.use_dora,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "use_rslora": config.rslora,
        "lora_dropout": config.dropout,
        "target_modules": sorted(targets),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": [module_name(p).split(".")[-1] for p in saved] or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "task_type": None,
        "base_model_name_or_path": None,
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")


def load_config(path: str | Path) -> DoRAConfig:
    """A :class:`~dora_jax.DoRAConfig` from a PEFT ``adapter_config.json``.

    ``target_modules`` given as names keep their meaning (path suffixes): torch module
    names become Flax paths, ``.`` a ``/`` and ``.<n>`` either ``_<n>`` (Linen's
    ``layer_0``) or ``/<n>`` (an NNX list item), so ``encoder.layer.0.query`` matches
    ``encoder/layer_0/query`` and ``hidden.0`` matches ``hidden/0``. A regular
    expression given as ``target_modules`` is kept as it is, over the Flax path. Keys of
    ``rank_pattern`` and ``alpha_pattern`` are translated in the same way.
    """
    data = json.loads((Path(path) / CONFIG).read_text())
    if data.get("peft_type") != "LORA":
        raise ValueError(f"{path}: not a LoRA/DoRA adapter (peft_type={data.get('peft_type')!r}).")
    targets = data.get("target_modules") or ()
    return DoRAConfig(
        targets=targets if isinstance(targets, str) else _flax_names(targets),
        rank=int(data["r"]),
        alpha=float(data["lora_alpha"]),
        dropout=float(data.get("lora_dropout") or 0.0),
        rslora=bool(data.get("use_rslora", False)),
        use_dora=bool(data.get("use_dora", False)),
        rank_pattern=_pattern(data.get("rank_pattern")),
        alpha_pattern=_pattern(data.get("alpha_pattern")),
        modules_to_save=list(data.get("modules_to_save") or ()),
    )


def _pattern(pattern: Mapping[str, Any] | None) -> dict[str, Any]:
    """PEFT pattern keys (torch names) as Flax path patterns: the inverse of
    :func:`module_name` on separators (``layer.0`` -> ``layer_0``, ``a.b`` -> ``a/b``),
    leaving regex wildcards such as ``.*`` alone."""
    return {_flax_pattern(key): value for key, value in (pattern or {}).items()}


def _flax_pattern(key: str) -> str:
    key = re.sub(r"\\?\.(\d)", r"[/_]\1", key)  # layer.0 or layer\.0 -> layer_0 or layer/0
    return re.sub(r"\\\.|\.(?![*+?{])", "/", key)  # separators, not wildcards


def _flax_names(names: list[str]) -> list[str] | str:
    """PEFT target names as Flax path suffixes: plain names stay a list; dotted torch
    module names become one regex over whole paths (``(?:.*/)?`` keeps them suffixes)."""
    if not any("." in name for name in names):
        return list(names)
    return "(?:.*/)?(?:" + "|".join(_flax_pattern(re.escape(name)) for name in names) + ")"


def load_pretrained(
    path: str | Path,
    variables: Any,
    config: DoRAConfig | None = None,
    *,
    module_name: Callable[[str], str] = module_name,
) -> Any:
    """Fill ``variables``' adapters (and saved modules) from a PEFT adapter folder.

    Args:
      path: a folder written by PEFT's ``save_pretrained`` (or :func:`save_pretrained`).
      variables: from ``init`` of a model wrapped with the matching config, e.g.
        :func:`load_config`'s; its adapter shapes are checked against the file's. Or an
        NNX model adapted by :func:`dora_jax.nnx.apply_dora` with that config.
      config: names ``modules_to_save`` to load (default: :func:`load_config`'s).
      module_name: Flax path -> torch module name.
    Returns:
      new variables; the ``"dora_cache"`` is kept (it depends on the base weights only).
      An NNX model is updated in place and returned.

    Raises:
      ValueError: naming the module when a tensor is missing or does not fit, and
        listing the adapters in the file that the model has no layer for.
    """
    from safetensors.numpy import load_file

    if isinstance(variables, nnx.Module):
        loaded = load_pretrained(
            path, dora_nnx.as_linen_variables(variables), config, module_name=module_name
        )
        return dora_nnx.update_from_linen_variables(variables, loaded)
    config = config or load_config(path)
    raw = load_file(str(Path(path) / WEIGHTS))
    tensors = {k[len(PREFIX) :] if k.startswith(PREFIX) else k: v for k, v in raw.items()}
    used: set[str] = set()
    dora = _copy_tree(variables.get(DORA, {}))
    for flax_path, layer in _adapted_layers(variables).items():
        kind = _kind(flax_path, layer["base"], layer["adapters"])
        name = module_name(flax_path)
        loaded = _from_torch(kind, name, tensors, layer["adapters"])
        node = dora
        for key in flax_path.split("/"):
            node = node[key]
        node.update(loaded)
        used.update(k for k in tensors if k.startswith(name + ".lora_"))
    params = _copy_tree(variables.get("params", {}))
    for flax_path, module in _saved_modules(params, config).items():
        name = module_name(flax_path)
        for key in _module_to_torch(name, module):
            if key not in tensors:
                raise ValueError(f"{name!r}: the PEFT adapter has no tensor {key!r}.")
            used.add(key)
        node = params
        for key in flax_path.split("/"):
            node = node[key]
        for key in list(node):
            torch_key = f"{name}.{'bias' if key == 'bias' else 'weight'}"
            value = np.asarray(tensors[torch_key])
            if key == "kernel":
                value = np.transpose(value, (*range(2, value.ndim), 1, 0))
            node[key] = value.astype(np.asarray(node[key]).dtype)
    unused = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if k not in used and ".lora_" in k})
    if unused:
        raise ValueError(
            f"the PEFT adapter has adapters for modules the model has none for: {unused}; "
            f"adapted here: {sorted(module_name(p) for p in _adapted_layers(variables))}."
        )
    return {**variables, DORA: dora, "params": params}


def _linen_variables(target: Any) -> Mapping[str, Any]:
    if isinstance(target, nnx.Module):
        return dora_nnx.as_linen_variables(target)
    return target


def _copy_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}
