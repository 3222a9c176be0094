"""Adapters to and from HuggingFace PEFT (``adapter_model.safetensors`` + ``adapter_config.json``).

A PEFT DoRA adapter holds, for each adapted torch module ``<name>``::

    base_model.model.<name>.lora_A.weight          (r, in)      Linear; (r, in, *window) Conv
    base_model.model.<name>.lora_B.weight          (out, r)     Linear; (out, r, 1, ...) Conv
    base_model.model.<name>.lora_magnitude_vector  (out,)       Linear; (1, out, 1, ...) Conv
    base_model.model.<name>.lora_embedding_A       (r, vocab)   Embedding
    base_model.model.<name>.lora_embedding_B       (features, r)

the full weights of ``modules_to_save`` (``<module>.weight``, ``<module>.bias``, nested
modules as ``<module>.<child>.weight``), and with ``bias="all"`` / ``"lora_only"`` the
biases (``<name>.base_layer.bias`` of adapted layers, ``<module>.bias`` of others). In
Flax orientation the same arrays are ``lora_a (in, r)``, ``lora_b (r, out)`` and
``magnitude (out,)`` (kernel = weight.T). Flax paths become torch module names by
``module_name``: ``/`` becomes ``.`` and a trailing ``_<n>`` of a path segment becomes
``.<n>`` (``encoder/layer_0/attention`` is ``encoder.layer.0.attention``, HuggingFace's
naming); pass your own for other models.

Linen variables and NNX models both move. Dense (2-d kernel), Conv and Embed layers move;
a layer PEFT has no counterpart for (DenseGeneral with several axes, Einsum, scanned
layers) raises a ``ValueError`` naming its path. No pickle is involved: arrays are
safetensors (read here, bfloat16 included), the config is JSON.

Loading never drops anything: every tensor of the file is either loaded or matched
against what the model already holds, and every field of ``adapter_config.json`` is
either read, known to be irrelevant to the loaded numbers, or refused by name
(:data:`PEFT_FIELDS` lists them).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dora_jax import merging
from dora_jax import nnx as dora_nnx
from dora_jax.adapters import DORA
from dora_jax.config import DoRAConfig

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"

# How each field of PEFT's LoraConfig is treated when a folder is loaded:
#   "read":   translated into the DoRAConfig or used to read the tensors;
#   "any":    any value is fine (bookkeeping, or used only when PEFT initialises new
#             adapters: the loaded weights come from the file);
#   a tuple:  the values that are supported; any other value is refused by name.
PEFT_FIELDS: dict[str, Any] = {
    "peft_type": ("LORA",),
    "r": "read",
    "lora_alpha": "read",
    "lora_dropout": "read",
    "use_rslora": "read",
    "use_dora": "read",
    "target_modules": "read",
    "rank_pattern": "read",
    "alpha_pattern": "read",
    "modules_to_save": "read",
    "bias": ("none", "all", "lora_only"),
    # Which modules PEFT adapted; the file's adapters say exactly which (see load_config).
    "exclude_modules": "read",
    "layers_to_transform": "read",
    "layers_pattern": "read",
    "init_lora_weights": (True, False, "gaussian", "orthogonal", "eva"),
    "task_type": "any",
    "auto_mapping": "any",
    "peft_version": "any",
    "base_model_name_or_path": "any",
    "revision": "any",
    "inference_mode": "any",
    "loftq_config": "any",
    "eva_config": "any",
    "corda_config": "any",
    "lora_ga_config": "any",
    "megatron_core": "any",
    "qalora_group_size": "any",
    "runtime_config": "any",
    "fan_in_fan_out": (False,),
    "lora_bias": (False,),
    "use_qalora": (False,),
    "ensure_weight_tying": (False,),
    "megatron_config": (None,),
    "trainable_token_indices": (None,),
    "layer_replication": (None,),
    "target_parameters": (None,),
    "alora_invocation_tokens": (None,),
    "use_bdlora": (None,),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "velora_config": (None,),
    "monteclora_config": (None,),
}

_WHY = {
    "peft_type": "only LoRA / DoRA adapters (peft_type 'LORA') are read",
    "fan_in_fan_out": "it stores weights as (in, out) for GPT-2's Conv1D layers; dora-jax "
    "reads torch Linear, Conv2d and Embedding layers",
    "lora_bias": "lora_B.bias would need a bias adapter, which the DoRA layers do not have",
    "init_lora_weights": "PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA also change the base "
    "weights when PEFT loads the adapter, and MiCA freezes lora_B; convert the adapter to "
    "plain LoRA with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...)",
}

_FLOAT_DTYPES = {"F16": np.float16, "BF16": jnp.bfloat16, "F32": np.float32, "F64": np.float64}


def module_name(path: str) -> str:
    """Flax path -> torch module name: ``encoder/layer_0/query`` -> ``encoder.layer.0.query``."""
    return ".".join(re.sub(r"^(.*)_(\d+)$", r"\1.\2", part) for part in path.split("/"))


# ------------------------------------------------------------------------------ files


def _read_tensors(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, refusing non-float and non-finite ones by key."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (a PEFT adapter folder holds {WEIGHTS}).")
    _, infos = merging.read_header(file)  # offsets checked against shapes, the file named
    tensors = {}
    for key, info in infos.items():
        if info.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{file}: tensor {key!r} has dtype {info.dtype}; adapter tensors must be "
                f"floating point ({', '.join(_FLOAT_DTYPES)})."
            )
        array = merging.read_tensor(file, info)
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise ValueError(
                f"{file}: tensor {key!r} {tuple(array.shape)} holds {bad} NaN or infinite values."
            )
        tensors[key] = array
    return tensors


def _tensor_names(file: Path) -> list[str] | None:
    """The tensor keys of a safetensors file (its header only), or None if it is absent."""
    return list(merging.read_header(file)[1]) if file.is_file() else None


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (a PEFT adapter folder holds {CONFIG}).")
    try:
        data = json.loads(file.read_text())
    except ValueError as error:
        raise ValueError(f"{file}: not valid JSON ({error}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object; got {type(data).__name__}.")
    for field, value in data.items():
        _check_field(file, field, value)
    for field in ("peft_type", "r", "lora_alpha"):
        if field not in data:
            raise ValueError(f"{file}: the required field {field!r} is missing.")
    return data


def _check_field(file: Path, field: str, value: Any) -> None:
    """Refuse a config field whose value would change the numbers in a way not read here."""
    rule = PEFT_FIELDS.get(field)
    if rule is None:
        # A field newer than this table: PEFT spells "off" as null or false.
        if value is None or value is False or value in ({}, []):
            return
        raise ValueError(
            f"{file}: unknown PEFT config field {field!r} = {value!r}; refused, since its "
            f"effect on the adapter is not known here."
        )
    if rule in ("read", "any"):
        return
    if field == "init_lora_weights" and isinstance(value, str):
        supported = value in rule
    else:
        supported = any(value is v or (type(value) is type(v) and value == v) for v in rule)
    if not supported:
        why = _WHY.get(field, "only its default is supported")
        raise ValueError(
            f"{file}: {field}={value!r} is not supported: {why}. Supported: "
            + ", ".join(repr(v) for v in rule)
            + "."
        )


# ----------------------------------------------------------------------------- config


def load_config(path: str | Path) -> DoRAConfig:
    """A :class:`~dora_jax.DoRAConfig` from a PEFT adapter folder's ``adapter_config.json``.

    ``target_modules`` given as names keep their meaning (path suffixes): torch module
    names become Flax paths, ``.`` a ``/`` and ``.<n>`` either ``_<n>`` (Linen's
    ``layer_0``) or ``/<n>`` (an NNX list item), so ``encoder.layer.0.query`` matches
    ``encoder/layer_0/query`` and ``hidden.0`` matches ``hidden/0``. Keys of
    ``rank_pattern`` and ``alpha_pattern`` are translated in the same way.

    Where PEFT's own selection is more than a list of names (``target_modules`` as a
    regex or ``"all-linear"``, ``exclude_modules``, ``layers_to_transform`` /
    ``layers_pattern``), the targets are the modules the folder's
    ``adapter_model.safetensors`` holds adapters for: exactly the modules PEFT adapted.
    With the file at hand, entries that selected nothing in PEFT's model are left out
    (the ``"score"`` that ``task_type="SEQ_CLS"`` adds to ``modules_to_save`` next to
    ``"classifier"``; pattern keys that matched no adapted module): they held no tensor
    and changed nothing there.

    Raises:
      ValueError: naming the file and the field for a missing required field (``r``,
        ``lora_alpha``, ``peft_type``), a value of the wrong type, or a field whose value
        is not supported (``fan_in_fan_out=true``, ``lora_bias=true``, PiSSA-style
        ``init_lora_weights``, unknown fields that are not null or false...).
    """
    folder = Path(path)
    file = folder / CONFIG
    data = _read_config(folder)
    names = _tensor_names(folder / WEIGHTS)
    keys = [k.removeprefix(PREFIX) for k in names] if names is not None else None
    adapted = sorted(
        {m.group(1) for k in keys or () if (m := re.match(r"(.*)\.lora_(?:A|embedding_A)\b", k))}
    )
    targets = data.get("target_modules")
    selection = [
        f for f in ("exclude_modules", "layers_to_transform") if data.get(f) not in (None, [], "")
    ]
    if not isinstance(targets, list | tuple) or selection:
        why = ", ".join(selection) or f"target_modules={targets!r}"
        if keys is None:
            raise ValueError(
                f"{file}: with {why}, the adapted modules are read from {WEIGHTS}, which is "
                f"missing from {folder}."
            )
        if not adapted:
            raise ValueError(f"{folder / WEIGHTS}: holds no adapters ({why}).")
        targets = adapted
    rank_pattern, alpha_pattern = data.get("rank_pattern"), data.get("alpha_pattern")
    saved = data.get("modules_to_save") or []
    saved = [saved] if isinstance(saved, str) else saved
    if keys is not None:
        rank_pattern = _used_keys(rank_pattern, adapted)
        alpha_pattern = _used_keys(alpha_pattern, adapted)
        plain = [k for k in keys if ".lora_" not in k]
        saved = [m for m in saved if any(re.match(rf"(?:.*\.)?{re.escape(m)}\.", k) for k in plain)]
    try:
        return DoRAConfig(
            targets=_flax_names(list(targets)),
            rank=data["r"],
            alpha=data["lora_alpha"],
            dropout=_given(data, "lora_dropout", 0.0),
            rslora=_given(data, "use_rslora", False),
            use_dora=_given(data, "use_dora", False),
            rank_pattern=_pattern(rank_pattern),
            alpha_pattern=_pattern(alpha_pattern),
            modules_to_save=list(saved),
        )
    except (TypeError, ValueError) as error:
        raise type(error)(f"{file}: {error}") from None


def _given(data: Mapping[str, Any], field: str, default: Any) -> Any:
    """A field's value; PEFT's default where absent or null (types checked by DoRAConfig)."""
    value = data.get(field)
    return default if value is None else value


def _used_keys(pattern: Mapping[str, Any] | None, adapted: list[str]) -> dict[str, Any]:
    """The pattern entries that matched an adapted module, as PEFT matches them."""
    used = {}
    for key, value in (pattern or {}).items():
        try:
            if not any(re.match(rf"(.*\.)?({key})$", name) for name in adapted):
                continue
        except re.error:
            pass  # kept: DoRAConfig names the invalid pattern
        used[key] = value
    return used


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
    if not all(isinstance(name, str) for name in names):
        raise TypeError(f"target_modules must be a list of strings; got {names!r}.")
    if not any("." in name for name in names):
        return list(names)
    return "(?:.*/)?(?:" + "|".join(_flax_pattern(re.escape(name)) for name in names) + ")"


# ------------------------------------------------------------------- layers and params


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


def _modules(params: Mapping[str, Any], path: tuple[str, ...] = ()):
    """``(path, {param: array})`` for every module of a params tree holding parameters."""
    leaves = {k: v for k, v in params.items() if not isinstance(v, Mapping)}
    if leaves and path:
        yield "/".join(path), leaves
    for key, value in params.items():
        if isinstance(value, Mapping):
            yield from _modules(value, (*path, key))


def _torch_param(param: str) -> str | None:
    """The torch parameter a Flax one is: ``kernel``/``embedding``/``scale`` -> weight."""
    return {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}.get(param)


def _param_to_torch(param: str, value: Any) -> np.ndarray:
    value = np.asarray(value)
    if param == "kernel":  # (in, out) -> (out, in); conv (*window, in, out) -> (out, in, *window)
        return np.transpose(value, (value.ndim - 1, value.ndim - 2, *range(value.ndim - 2)))
    return value


def _param_from_torch(param: str, value: np.ndarray) -> np.ndarray:
    if param == "kernel":
        return np.transpose(value, (*range(2, value.ndim), 1, 0))
    return value


def _saved_modules(params: Mapping[str, Any], config: DoRAConfig | None) -> dict[str, Any]:
    """``{path: subtree}`` of the outermost modules ``config.modules_to_save`` names."""
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


def _module_to_torch(
    path: str, module: Mapping[str, Any], module_name: Callable[[str], str]
) -> dict[str, np.ndarray]:
    """A saved module's parameters, nested modules included, under their torch names."""
    out = {}
    for sub, leaves in _modules(module, tuple(path.split("/"))):
        for param, value in leaves.items():
            torch_param = _torch_param(param)
            if torch_param is None:
                raise ValueError(f"{sub!r}: no PEFT name for the parameter {param!r}.")
            out[f"{module_name(sub)}.{torch_param}"] = np.ascontiguousarray(
                _param_to_torch(param, value)
            )
    return out


# ---------------------------------------------------------------------- adapters <-> torch


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


def _from_torch(kind, name, want, take):
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


# ------------------------------------------------------------------------------- save


def save_pretrained(
    path: str | Path,
    variables: Any,
    config: DoRAConfig,
    *,
    module_name: Callable[[str], str] = module_name,
    bias: str = "none",
) -> None:
    """Write ``variables``' adapters as a PEFT adapter folder.

    Args:
      path: folder to create (``adapter_model.safetensors``, ``adapter_config.json``).
      variables: with ``"params"`` and ``"dora"`` (a wrapped model's or DoRA layers'),
        or an NNX model adapted by :func:`dora_jax.nnx.apply_dora`.
      config: the :class:`~dora_jax.DoRAConfig` the adapters were made with.
      module_name: Flax path -> torch module name.
      bias: PEFT's ``bias``: ``"none"`` (the base biases are not written), ``"all"``
        (every bias of the model, e.g. after loading a ``bias="all"`` folder) or
        ``"lora_only"`` (the biases of the adapted layers).

    ``PeftModel.from_pretrained(torch_model, path)`` then loads them. Per-layer ranks and
    alphas become ``rank_pattern`` / ``alpha_pattern`` entries of the exact module names.

    Raises:
      ValueError: for a layer PEFT has no counterpart for, a NaN or infinite value
        (naming the tensor), or an unknown ``bias``.
    """
    from safetensors.numpy import save_file

    if bias not in ("none", "all", "lora_only"):
        raise ValueError(
            f"save_pretrained: bias must be 'none', 'all' or 'lora_only'; got {bias!r}."
        )
    variables = _linen_variables(variables, every_param=bias == "all")
    params = variables.get("params", {})
    adapted = _adapted_layers(variables)
    tensors: dict[str, np.ndarray] = {}
    targets, rank_pattern, alpha_pattern = [], {}, {}
    for flax_path, layer in adapted.items():
        kind = _kind(flax_path, layer["base"], layer["adapters"])
        name = module_name(flax_path)
        targets.append(name)
        tensors.update(_to_torch(kind, name, layer["adapters"]))
        settings = config.settings(flax_path)
        rank = int(np.shape(layer["adapters"]["lora_a"])[-1])
        # PEFT matches pattern keys against the end of module names.
        if rank != config.rank:
            rank_pattern[re.escape(name)] = rank
        if settings.alpha != config.alpha:
            alpha_pattern[re.escape(name)] = settings.alpha
        if bias != "none" and "bias" in layer["base"]:
            tensors[f"{name}.base_layer.bias"] = np.asarray(layer["base"]["bias"])
    saved = _saved_modules(params, config)
    for flax_path, module in saved.items():
        tensors.update(_module_to_torch(flax_path, module, module_name))
    if bias == "all":
        for flax_path, leaves in _modules(params):
            name = module_name(flax_path)
            if "bias" in leaves and flax_path not in adapted and f"{name}.bias" not in tensors:
                tensors[f"{name}.bias"] = np.asarray(leaves["bias"])
    if not targets:
        raise ValueError("save_pretrained found no adapters in variables['dora'].")
    for key, value in tensors.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"save_pretrained: {key!r} {value.shape} holds NaN or infinite values."
            )
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
        "bias": bias,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "task_type": None,
        "base_model_name_or_path": None,
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {PREFIX + k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / WEIGHTS)
    )
    (folder / CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")


# ------------------------------------------------------------------------------- load


def load_pretrained(
    path: str | Path,
    variables: Any,
    config: DoRAConfig | None = None,
    *,
    module_name: Callable[[str], str] = module_name,
) -> Any:
    """Fill ``variables``' adapters (and saved modules, and saved biases) from a PEFT folder.

    Args:
      path: a folder written by PEFT's ``save_pretrained`` (or :func:`save_pretrained`).
      variables: from ``init`` of a model wrapped with the matching config, e.g.
        :func:`load_config`'s; its adapter shapes are checked against the file's. Or an
        NNX model adapted by :func:`dora_jax.nnx.apply_dora` with that config.
      config: names ``modules_to_save`` to load (default: :func:`load_config`'s).
      module_name: Flax path -> torch module name.
    Returns:
      new variables (the ``"dora_cache"`` is kept: no base kernel of an adapted layer
      changes). An NNX model is updated in place and returned.

    Every tensor of the file is used:

    * the adapters of every adapted layer (magnitudes only when the folder is DoRA);
    * every parameter of the ``modules_to_save`` modules, nested modules included;
    * biases (``bias="all"`` / ``"lora_only"`` folders): the folder's values replace the
      model's, as in PEFT; other base weights (PEFT's ``save_embedding_layers``) replace
      those of modules without adapters and must equal those of adapted layers;
    * the copies PEFT adds under ``<saved>.modules_to_save.*`` must equal the saved
      weights, and ``<saved>.original_module.*`` (the pretrained copy PEFT keeps but does
      not run) is skipped.

    Raises:
      ValueError: naming the file and the tensor for a tensor the model has no place
        for, a magnitude in a folder whose ``use_dora`` is false, a ``lora_B.bias``
        (``lora_bias``), an integer, NaN or infinite tensor; naming the module when a
        tensor is missing or does not fit; naming the field for an unsupported config.
    """
    folder = Path(path)
    peft_config = _read_config(folder)
    config = config or load_config(folder)
    if isinstance(variables, nnx.Module):
        return _load_nnx(folder, peft_config, variables, config, module_name)
    loaded, _ = _load(folder, peft_config, variables, config, module_name)
    return loaded


def _load(folder, peft_config, variables, config, module_name):
    """The loaded Linen-layout variables and the ``(path, param)`` base values written."""
    file = folder / WEIGHTS
    tensors = {k.removeprefix(PREFIX): v for k, v in _read_tensors(file).items()}
    consumed: set[str] = set()

    def take(key, owner=None):
        if key not in tensors:
            raise ValueError(f"{owner or key!r}: {file} has no tensor {PREFIX + key!r}.")
        consumed.add(key)
        return np.asarray(tensors[key])

    use_dora = peft_config.get("use_dora") is True
    for key in tensors:
        if key.endswith(".lora_magnitude_vector") and not use_dora:
            raise ValueError(
                f"{file}: tensor {PREFIX + key!r} is a DoRA magnitude, but the folder's "
                f"{CONFIG} says use_dora=false; refused rather than dropped."
            )
        if re.search(r"\.lora_B(\.[^.]+)?\.bias$", key):
            raise ValueError(
                f"{file}: tensor {PREFIX + key!r} is a lora_B bias (PEFT's lora_bias=True), "
                f"which the DoRA layers have no adapter for."
            )

    adapted = _adapted_layers(variables)
    dora = _copy_tree(variables.get(DORA, {}))
    for flax_path, layer in adapted.items():
        kind = _kind(flax_path, layer["base"], layer["adapters"])
        name = module_name(flax_path)
        loaded = _from_torch(kind, name, layer["adapters"], functools.partial(take, owner=name))
        _get(dora, flax_path).update(loaded)

    params = _copy_tree(variables.get("params", {}))
    written: list[tuple[str, str]] = []

    def put(flax_path, param, key, must_equal=False):
        node = _get(params, flax_path)
        value = _param_from_torch(param, take(key))
        if value.shape != np.shape(node[param]):
            raise ValueError(
                f"{file}: tensor {PREFIX + key!r} converts to shape {value.shape}, but the "
                f"model's {flax_path}/{param} has shape {np.shape(node[param])}."
            )
        value = value.astype(np.asarray(node[param]).dtype)
        if must_equal:
            same = np.asarray(node[param], np.float64)
            if not np.allclose(value.astype(np.float64), same, rtol=1e-6, atol=0):
                raise ValueError(
                    f"{file}: tensor {PREFIX + key!r} holds base weights that differ from the "
                    f"model's {flax_path}/{param} (PEFT's save_embedding_layers); load the "
                    f"base weights into the model before adding the adapters."
                )
            return
        node[param] = value
        written.append((flax_path, param))

    saved = _saved_modules(params, config)
    saved_names = {}
    for flax_path, module in saved.items():
        saved_names[module_name(flax_path)] = flax_path
        for key in _module_to_torch(flax_path, module, module_name):
            if key not in tensors:
                raise ValueError(
                    f"{module_name(flax_path)!r} (modules_to_save): {file} has no tensor "
                    f"{PREFIX + key!r}."
                )
        for sub, leaves in _modules(module, tuple(flax_path.split("/"))):
            for param in leaves:
                put(sub, param, f"{module_name(sub)}.{_torch_param(param)}")

    # Base parameters outside the saved modules: biases, and base weights.
    for flax_path, leaves in _modules(params):
        if any(flax_path == s or flax_path.startswith(s + "/") for s in saved):
            continue
        name = module_name(flax_path)
        owner = f"{name}.base_layer" if flax_path in adapted else name
        for param in leaves:
            torch_param = _torch_param(param)
            key = f"{owner}.{torch_param}"
            if torch_param is not None and key in tensors:
                put(flax_path, param, key, must_equal=flax_path in adapted and param != "bias")

    # With bias="all" PEFT also writes the biases inside its wrapper of a saved module:
    # "<saved>.modules_to_save[.<adapter>].<param>", the trained copy loaded above, and
    # "<saved>.original_module.<param>", the pretrained copy PEFT keeps but does not run.
    for key in tensors:
        for name in saved_names:
            if key.startswith(f"{name}.original_module."):
                consumed.add(key)
            elif key.startswith(f"{name}.modules_to_save."):
                rest = key.removeprefix(f"{name}.modules_to_save.")
                twins = [f"{name}.{r}" for r in (rest, rest.partition(".")[2]) if r]
                twin = next((t for t in twins if t in consumed), None)
                if twin is not None and not np.array_equal(tensors[key], tensors[twin]):
                    raise ValueError(
                        f"{file}: tensor {PREFIX + key!r} differs from {PREFIX + twin!r}, the "
                        f"saved module's weight that was loaded."
                    )
                if twin is not None:
                    consumed.add(key)

    unused = sorted(set(tensors) - consumed)
    lora = sorted({k.rsplit(".lora_", 1)[0] for k in unused if ".lora_" in k})
    if lora:
        raise ValueError(
            f"{file}: adapters for modules the model has none for: {lora}; "
            f"adapted here: {sorted(module_name(p) for p in adapted)}."
        )
    if unused:
        raise ValueError(
            f"{file}: tensors that match no parameter of the model (refused rather than "
            f"dropped): {[PREFIX + k for k in unused]}."
        )
    return {**variables, DORA: dora, "params": params}, written


def _load_nnx(folder, peft_config, model, config, module_name):
    view, variables = _nnx_view(model)
    loaded, written = _load(folder, peft_config, view, config, module_name)
    dora_nnx.update_from_linen_variables(model, loaded)  # checks everything, then sets
    for flax_path, param in written:
        variable = variables.get((*flax_path.split("/"), param))
        if variable is not None and not isinstance(variable, dora_nnx.SavedParam):
            variable.set_value(jnp.asarray(_get(loaded["params"], flax_path)[param]))
    return model


def _nnx_view(model: nnx.Module) -> tuple[dict[str, Any], dict[tuple[str, ...], Any]]:
    """The Linen layout of an NNX model with every base parameter, and the variables."""
    view = dora_nnx.as_linen_variables(model)
    variables = {}
    for path, node in nnx.iter_graph(model):
        keys = tuple(str(p) for p in path)
        if not isinstance(node, nnx.Param) or (
            isinstance(node, nnx.LoRAParam) and not isinstance(node, dora_nnx.SavedParam)
        ):
            continue
        variables[keys] = node
        tree = view["params"]
        for key in keys[:-1]:
            tree = tree.setdefault(key, {})
        tree.setdefault(keys[-1], node[...])
    return view, variables


def _linen_variables(target: Any, every_param: bool = False) -> Mapping[str, Any]:
    if isinstance(target, nnx.Module):
        return _nnx_view(target)[0] if every_param else dora_nnx.as_linen_variables(target)
    return target


def _get(tree: dict[str, Any], path: str) -> dict[str, Any]:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _copy_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}
