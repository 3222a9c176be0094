"""Merging DoRA adapters into base weights: exactly, reversibly, several at once, and
straight from safetensors files.

Per kernel (any :class:`dora_jax.ops.Layout`, so Flax and torch orientations alike):

* :func:`merge_exact` folds one adapter into its kernel, ``W' = m / ||V||_c * V`` with
  ``V = W0 + s*A@B``, in float32 and cast once to the kernel's dtype (the same numbers
  as :func:`dora_jax.ops.merge`), and returns an :class:`UnmergeRecord`;
  :func:`unmerge` gives back the original kernel **bit for bit** from ``W'``, the
  adapter and that record. No float round trip is trusted: the record holds, per
  element, the distance in units in the last place (an ``int8``) between the original
  and ``W'/g - s*A@B`` recomputed in float64 in a fixed order, plus the original value
  of every element farther than 127 ulps (an index and a value). Its memory is one
  byte per element (a quarter of a float32 kernel, half of a bfloat16 one) plus
  ``4 + itemsize`` bytes per exception and the ``(out,)`` float32 ``g``: measured on
  Gaussian weights, 0.25 of a float32 kernel and 0.50 of a bfloat16 one, with 0.04% of
  the elements exceptions (``benchmarks/merge_memory.py``), and 0.2 to 0.6% when
  ``s*A@B`` is as large as ``W0``; more where ``W0`` holds many values far smaller than
  its column's scale. :attr:`UnmergeRecord.nbytes` says exactly. Making it takes float64
  temporaries of three times the kernel's size. The result is checked against the
  original's sha256, never returned unverified.
* :func:`weighted_merge` combines several adapters of one kernel by one of two
  definitions (:data:`COMBINATIONS`), with weights ``w_k``:

  - ``"merged"``, a linear combination of the merged weights:
    ``W = sum_k w_k W'_k + (1 - sum_k w_k) W0`` = ``W0 + sum_k w_k (W'_k - W0)``, where
    ``W'_k`` is adapter ``k`` merged alone. With weights summing to 1 it is
    ``sum_k w_k W'_k``; each layer's output is the same combination of the layer
    outputs of the K merged models. One adapter with weight 1 gives its merge exactly.
  - ``"dora"``, one DoRA adapter from the combined delta and the combined magnitude:
    ``V = W0 + sum_k w_k s_k A_k B_k``, ``m = ||W0||_c + sum_k w_k (m_k - ||W0||_c)``,
    ``W = m / ||V||_c * V``: what a single DoRA adapter of rank ``sum_k r_k`` (``A``
    the concatenated ``A_k``, ``B`` the concatenated ``w_k s_k B_k``, scaling 1)
    computes. With weights summing to 1, ``m = sum_k w_k m_k``.

  The two differ for DoRA: the norm of a sum is not the sum of the norms, so the
  weighted sum of the deltas with a combined magnitude is not the weighted sum of the
  merged weights (they agree for plain LoRA adapters, and for one adapter with weight
  1). PEFT 0.21's ``add_weighted_adapter`` computes neither for DoRA adapters: it
  combines the LoRA factors (``cat`` exactly as ``"dora"`` does, ``svd`` truncated to a
  rank, ``linear`` as ``(sum sqrt(w_k s_k) B_k)(sum sqrt(w_k s_k) A_k)``, cross terms
  included) and leaves the new adapter's magnitude at its initial value ``||W0||_c``,
  so every trained magnitude is dropped.

For folders, :func:`merge_folder` merges PEFT adapter folders into a Hugging Face model
folder tensor by tensor: every ``*.safetensors`` shard is written under the same name
with the same header (names, dtypes, shapes, offsets), so the index and every other
file are copied unchanged. Weights are merged in blocks of about 4 MB: Linear and Conv
weights in blocks of output features, embedding tables in blocks of rows read twice
(the first pass sums the squared norms over the vocabulary), so the memory held does
not grow with the model or the shard.

Framework-neutral: NumPy, JAX and :mod:`dora_jax.ops` only.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import shutil
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from dora_jax import ops

Array = Any  # a NumPy or JAX array

COMBINATIONS = ("merged", "dora")
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_RESIDUAL_LIMIT = 127  # int8


class KernelAdapter(NamedTuple):
    """One adapter of one kernel, in canonical order (see :mod:`dora_jax.ops`).

    ``lora_a (*batch, *in, r)``, ``lora_b (*batch, r, *out)``, ``magnitude
    (*batch, *out)`` or ``None`` for plain LoRA, and the scaling ``s``.
    """

    lora_a: Array
    lora_b: Array
    magnitude: Array | None
    scale: float


# ----------------------------------------------------------------------------- per kernel


def _merged_float32(kernel: Array, adapter: KernelAdapter, layout: ops.Layout, eps: float):
    """``W'`` of one adapter in float32 (not yet cast)."""
    return ops.merge(
        _float32(kernel),
        adapter.lora_a,
        adapter.lora_b,
        adapter.magnitude,
        adapter.scale,
        layout,
        eps=eps,
    )


def _float32(x: Array):
    """``x`` as a float32 JAX array (a float64 one is rounded by NumPy: JAX without x64
    would warn)."""
    return jnp.asarray(np.asarray(x, np.float32) if np.dtype(x.dtype) == np.float64 else x).astype(
        jnp.float32
    )


def _cast(x, dtype) -> Array:
    """Cast once to the kernel's dtype (float64 by NumPy, the rest by JAX)."""
    if np.dtype(dtype) == np.float64:
        return np.asarray(x).astype(np.float64)
    return jnp.asarray(x).astype(dtype)


def weighted_merge(
    kernel: Array,
    adapters: Sequence[KernelAdapter],
    weights: Sequence[float],
    layout: ops.Layout,
    *,
    combination: str = "merged",
    eps: float = ops.DEFAULT_EPS,
) -> Array:
    """Several adapters of one kernel merged into it, computed in float32, cast once.

    Args:
      kernel: ``W0`` of ``layout``, e.g. a Flax Dense ``(in, out)`` or a torch Linear
        ``(out, in)`` (``Layout((), (1,), (0,))``).
      adapters: one :class:`KernelAdapter` per adapter.
      weights: one weight per adapter (any real numbers).
      combination: ``"merged"`` (``W0 + sum_k w_k (W'_k - W0)``) or ``"dora"`` (one DoRA
        adapter from ``sum_k w_k s_k A_k B_k`` and ``||W0|| + sum_k w_k (m_k - ||W0||)``);
        see the module docstring. ``"dora"`` needs every adapter to have a magnitude or
        none to (then both definitions are ``W0 + sum_k w_k s_k A_k B_k``).
    Returns:
      the merged kernel, ``kernel``'s shape and dtype (a JAX array).

    Raises:
      ValueError: an unknown combination, a count of weights unlike the count of
        adapters, a non-finite weight, or DoRA and LoRA adapters mixed under ``"dora"``.
    """
    dtype = kernel.dtype
    w0 = _float32(kernel)
    base_norm = ops.column_norm(w0, layout) if combination == "dora" else None
    c0, terms = _terms(adapters, weights, layout, combination, base_norm, "weighted_merge")
    if c0 == 0.0 and len(terms) == 1 and terms[0][0] == 1.0:
        return _cast(_merged_float32(w0, terms[0][1], layout, eps), dtype)
    total = c0 * w0
    for coefficient, term in terms:
        total = total + coefficient * _merged_float32(w0, term, layout, eps)
    return _cast(total, dtype)


def _terms(adapters, weights, layout, combination, base_norm, where):
    """``(c0, [(c_t, adapter_t)])`` with ``W = c0 W0 + sum_t c_t W'_t``, ``W'_t`` the
    merge of ``adapter_t`` alone: the two definitions of :func:`weighted_merge` in one
    form. ``"dora"`` is one term, the concatenated adapter, whose magnitude needs
    ``base_norm`` (``||W0||_c``; with ``None`` a placeholder is left)."""
    adapters, weights = list(adapters), [float(w) for w in weights]
    check_weights(weights, len(adapters), where)
    if combination not in COMBINATIONS:
        raise ValueError(
            f"{where}: combination must be one of {COMBINATIONS}; got {combination!r}."
        )
    if combination == "merged" or (len(adapters) == 1 and weights[0] == 1.0):
        return 1.0 - sum(weights), list(zip(weights, adapters, strict=True))
    with_magnitude = [a.magnitude is not None for a in adapters]
    if any(with_magnitude) and not all(with_magnitude):
        raise ValueError(
            f"{where}: combination 'dora' combines DoRA magnitudes, but "
            f"{with_magnitude.count(False)} of the {len(adapters)} adapters are plain LoRA "
            "(no magnitude); use combination 'merged'."
        )
    n_batch = len(layout.batch_axes)
    lora_a = jnp.concatenate([jnp.asarray(a.lora_a, jnp.float32) for a in adapters], axis=-1)
    lora_b = jnp.concatenate(
        [
            w * a.scale * jnp.asarray(a.lora_b, jnp.float32)
            for a, w in zip(adapters, weights, strict=True)
        ],
        axis=n_batch,
    )
    magnitude = None
    if all(with_magnitude):
        base = jnp.zeros(()) if base_norm is None else base_norm
        magnitude = base + sum(
            w * (jnp.asarray(a.magnitude, jnp.float32) - base)
            for a, w in zip(adapters, weights, strict=True)
        )
    return 0.0, [(1.0, KernelAdapter(lora_a, lora_b, magnitude, 1.0))]


def check_weights(weights: Sequence[float], count: int, where: str) -> None:
    """Raise ``ValueError`` unless there are ``count`` finite weights."""
    if len(weights) != count:
        raise ValueError(
            f"{where}: {len(weights)} weights for {count} adapters; give one weight per adapter."
        )
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise ValueError(f"{where}: weights must be finite numbers; got {list(weights)}.")


@dataclasses.dataclass(frozen=True)
class UnmergeRecord:
    """What :func:`unmerge` needs besides ``W'`` and the adapter to restore ``W0`` exactly.

    Attributes:
      g: ``m / ||W0 + s*A@B||_c`` as used for the recomputation, float32 ``(*batch, *out)``.
      residual: ``int8``, the kernel's shape: ulps from the recomputed to the original.
      indices: flat indices (C order) of the elements farther than 127 ulps.
      values: the original values there (the kernel's dtype).
      merged_sha256, base_sha256: of ``W'`` and ``W0``'s bytes, checked by :func:`unmerge`.
    """

    g: np.ndarray
    residual: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    merged_sha256: str
    base_sha256: str

    @property
    def nbytes(self) -> int:
        """The record's memory in bytes (its arrays; the hashes aside)."""
        return sum(a.nbytes for a in (self.g, self.residual, self.indices, self.values))


def merge_exact(
    kernel: Array, adapter: KernelAdapter, layout: ops.Layout, *, eps: float = ops.DEFAULT_EPS
) -> tuple[np.ndarray, UnmergeRecord]:
    """``(W', record)``: the merged kernel (as :func:`dora_jax.ops.merge` computes it) and
    what :func:`unmerge` needs to give back ``kernel`` bit for bit.

    ``kernel`` must be floating point; ``adapter.magnitude`` may be ``None`` (plain LoRA,
    ``g = 1``). See the module docstring for the record's memory.
    """
    kernel = np.asarray(kernel)
    ops.check_kernel(kernel, "merge_exact")
    merged = np.asarray(_cast(_merged_float32(kernel, adapter, layout, eps), kernel.dtype))
    if adapter.magnitude is None:
        g = np.ones(layout.lora_shapes(kernel.shape, 1)[2], np.float32)
    else:
        w0 = _float32(kernel)
        norm = ops.init_magnitude(w0, adapter.lora_a, adapter.lora_b, adapter.scale, layout)
        g = np.asarray(
            jnp.asarray(adapter.magnitude, jnp.float32) / ops.safe_sqrt(norm * norm, eps)
        )
    guess = _unmerged_guess(merged, adapter, layout, g, kernel.dtype)
    distance = _ordered(kernel) - _ordered(guess)
    far = np.abs(distance) > _RESIDUAL_LIMIT
    indices = np.flatnonzero(far).astype(np.int32 if kernel.size < 2**31 else np.int64)
    residual = np.where(far, 0, distance).astype(np.int8)
    record = UnmergeRecord(
        g=g,
        residual=residual,
        indices=indices,
        values=kernel.reshape(-1)[indices].copy(),
        merged_sha256=_sha256(merged),
        base_sha256=_sha256(kernel),
    )
    return merged, record


def unmerge(
    merged: Array, adapter: KernelAdapter, layout: ops.Layout, record: UnmergeRecord
) -> np.ndarray:
    """The kernel :func:`merge_exact` was given, bit for bit.

    Raises:
      ValueError: ``merged`` is not the kernel that ``record`` was made with (its sha256
        differs: changed since, or another layer's), or the restored kernel's sha256
        differs from the original's (never returned unverified).
    """
    merged = np.asarray(merged)
    if _sha256(merged) != record.merged_sha256:
        raise ValueError(
            f"unmerge: the merged kernel {merged.shape} {merged.dtype} is not the one this "
            "record was made from (its sha256 differs): it changed after merging, or the "
            "record belongs to another layer."
        )
    guess = _unmerged_guess(merged, adapter, layout, record.g, merged.dtype)
    keys = _ordered(guess) + record.residual.astype(np.int64)
    restored = _from_ordered(keys, merged.dtype)
    restored.reshape(-1)[record.indices] = record.values
    if _sha256(restored) != record.base_sha256:
        raise ValueError(
            f"unmerge: the restored kernel {merged.shape} {merged.dtype} differs from the "
            "original (sha256 mismatch): the adapter given is not the one that was merged."
        )
    return restored


def _unmerged_guess(merged, adapter: KernelAdapter, layout, g, dtype) -> np.ndarray:
    """``W'/g - s*A@B`` in float64, the rank-r product summed in a fixed order (so that
    every machine computes the same bits), cast to ``dtype``."""
    batch, in_shape, out_shape = layout.split(merged.shape)
    n_b, n_i, n_o = math.prod(batch), math.prod(in_shape), math.prod(out_shape)
    w = np.transpose(np.asarray(merged), layout.canonical_order).astype(np.float64)
    w = w.reshape(n_b, n_i, n_o)
    a = np.asarray(adapter.lora_a, np.float64).reshape(n_b, n_i, -1)
    b = np.asarray(adapter.lora_b, np.float64).reshape(n_b, -1, n_o)
    with np.errstate(all="ignore"):  # g = 0 gives inf or nan: those become exceptions
        v = w / np.asarray(g, np.float64).reshape(n_b, 1, n_o)
        delta = np.zeros_like(v)
        for j in range(a.shape[-1]):
            delta += a[:, :, j : j + 1] * b[:, j : j + 1, :]
        guess = (v - adapter.scale * delta).astype(dtype)
    canonical = guess.reshape(*batch, *in_shape, *out_shape)
    return np.ascontiguousarray(np.transpose(canonical, np.argsort(layout.canonical_order)))


def _uint(dtype) -> type:
    return {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[np.dtype(dtype).itemsize]


def _ordered(x: np.ndarray) -> np.ndarray:
    """Float bits as int64 ordered like the floats, one apart per ulp (bijective:
    ``+0`` is 0, ``-0`` is -1)."""
    x = np.ascontiguousarray(x)
    bits = x.view(_uint(x.dtype)).astype(np.uint64)
    sign = np.uint64(1) << np.uint64(8 * x.dtype.itemsize - 1)
    magnitude = (bits & (sign - np.uint64(1))).astype(np.int64)
    return np.where(bits & sign, -magnitude - 1, magnitude)


def _from_ordered(keys: np.ndarray, dtype) -> np.ndarray:
    """The inverse of :func:`_ordered`."""
    dtype = np.dtype(dtype)
    sign = np.uint64(1) << np.uint64(8 * dtype.itemsize - 1)
    negative = keys < 0
    bits = np.where(negative, (-keys - 1).astype(np.uint64) | sign, keys.astype(np.uint64))
    return bits.astype(_uint(dtype)).view(dtype)


def _sha256(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


# ---------------------------------------------------------------------- safetensors files

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": jnp.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_FLOATS = ("F64", "F32", "F16", "BF16")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes are (absolute offsets)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(file: str | Path) -> tuple[bytes, dict[str, TensorInfo]]:
    """``(header bytes, {name: TensorInfo})`` of a safetensors file; reads the header only.

    The header bytes are the file's first ``8 + N`` bytes, verbatim (``__metadata__``
    included). Raises ``ValueError`` naming the file when it is not safetensors.
    """
    file = Path(file)
    with open(file, "rb") as f:
        head = f.read(8)
        try:
            (size,) = struct.unpack("<Q", head)
            if size > 100_000_000:
                raise ValueError(f"a header of {size} bytes")
            raw = f.read(size)
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            header.pop("__metadata__", None)
            start = 8 + size
            tensors = {
                name: TensorInfo(
                    str(info["dtype"]),
                    tuple(int(n) for n in info["shape"]),
                    start + int(info["data_offsets"][0]),
                    start + int(info["data_offsets"][1]),
                )
                for name, info in header.items()
            }
        except (struct.error, ValueError, TypeError, KeyError, IndexError) as error:
            raise ValueError(f"{file}: not a readable safetensors file ({error}).") from None
    length = file.stat().st_size
    for name, info in tensors.items():
        dtype = _DTYPES.get(info.dtype)
        count = math.prod(info.shape)
        if info.end > length or (
            dtype is not None and info.end - info.begin != count * np.dtype(dtype).itemsize
        ):
            raise ValueError(f"{file}: tensor {name!r} has offsets that do not fit its shape.")
    return head + raw, tensors


def read_tensor(file: str | Path, info: TensorInfo) -> np.ndarray:
    """One tensor, read from disk alone (bfloat16 included)."""
    if info.dtype not in _DTYPES:
        raise ValueError(f"{file}: dtype {info.dtype} is not read here.")
    dtype = np.dtype(_DTYPES[info.dtype])
    with open(file, "rb") as f:
        f.seek(info.begin)
        data = f.read(info.end - info.begin)
    return np.frombuffer(data, dtype).reshape(info.shape)


def read_tensors(file: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a (small) safetensors file."""
    _, infos = read_header(file)
    return {name: read_tensor(file, info) for name, info in infos.items()}


# ----------------------------------------------------------------------- PEFT folders


@dataclasses.dataclass(frozen=True)
class ModuleAdapter:
    """One adapted torch module of a PEFT folder, in torch orientation.

    ``kind`` is ``"linear"`` (weight ``(out, in)``), ``"conv"`` (``(out, in, *window)``)
    or ``"embedding"`` (``(vocab, features)``); ``adapter`` holds the factors in the
    canonical order of :meth:`layout`.
    """

    name: str
    kind: str
    rank: int
    alpha: float
    adapter: KernelAdapter

    def layout(self, ndim: int) -> ops.Layout:
        """The torch weight's layout: the norm reduces every axis but the output's."""
        if self.kind == "embedding":
            return ops.Layout((), (0,), (1,))
        return ops.Layout((), tuple(range(1, ndim)), (0,))

    def weight_shape(self) -> tuple[int, ...]:
        """The base weight shape this adapter expects."""
        a, b = np.shape(self.adapter.lora_a), np.shape(self.adapter.lora_b)
        if self.kind == "embedding":
            return (a[0], b[1])
        return (b[1], *a[:-1])


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
    """A PEFT LoRA / DoRA adapter folder, read (tensors small enough to hold).

    Attributes:
      folder: the folder.
      config: ``adapter_config.json``.
      use_dora: the folder's ``use_dora``.
      modules: ``{torch module name: ModuleAdapter}``.
      full: the other tensors (``modules_to_save`` weights, biases), by the base's names.
    """

    folder: Path
    config: Mapping[str, Any]
    use_dora: bool
    modules: Mapping[str, ModuleAdapter]
    full: Mapping[str, np.ndarray]
    dtypes: tuple[str, ...]


# Values of adapter_config.json fields that change the merged weights in a way not read
# here (dora_jax.peft.load_config checks every field; the command line runs it first).
_REFUSED = {
    "fan_in_fan_out": lambda v: v is True,
    "lora_bias": lambda v: v is True,
    "layer_replication": lambda v: v not in (None, [], {}),
    "target_parameters": lambda v: v not in (None, [], {}),
    "use_qalora": lambda v: v is True,
    "init_lora_weights": lambda v: (
        isinstance(v, str) and v not in ("gaussian", "orthogonal", "eva")
    ),
}


def read_peft_folder(path: str | Path) -> PeftAdapter:
    """Read a PEFT folder written by ``save_pretrained`` (or :mod:`dora_jax.peft`).

    Raises:
      FileNotFoundError: the folder, its ``adapter_config.json`` or its
        ``adapter_model.safetensors`` is missing (naming the path).
      ValueError: naming the file for an unreadable config, ``peft_type`` other than
        LORA, a setting that changes the weights in a way not read here
        (``fan_in_fan_out``, ``lora_bias``, PiSSA-style ``init_lora_weights``...), a
        magnitude in a folder with ``use_dora`` false or one missing with it true, or
        factors whose shapes do not fit each other.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (a PEFT adapter folder was expected).")
    config_file, weights_file = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{folder}: not a PEFT adapter folder (no {PEFT_CONFIG}; a PEFT folder holds "
            f"{PEFT_CONFIG} and {PEFT_WEIGHTS})."
        )
    try:
        config = json.loads(config_file.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        raise ValueError(f"{config_file}: not a readable adapter config ({error}).") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{config_file}: peft_type {config.get('peft_type')!r}; only LoRA / DoRA adapters "
            "(peft_type 'LORA') are merged."
        )
    for field, refused in _REFUSED.items():
        if refused(config.get(field)):
            raise ValueError(
                f"{config_file}: {field}={config[field]!r} is not supported for merging."
            )
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), int | float) or isinstance(config.get(field), bool):
            raise ValueError(f"{config_file}: the field {field!r} is missing or not a number.")
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file}: no such file (the adapter's weights).")
    _, infos = read_header(weights_file)
    tensors = {
        name.removeprefix(PEFT_PREFIX): read_tensor(weights_file, i) for name, i in infos.items()
    }
    for key, value in tensors.items():
        if value.dtype.kind != "f" and value.dtype != jnp.bfloat16:
            raise ValueError(
                f"{weights_file}: tensor {key!r} is {value.dtype}, not floating point."
            )
        if not np.all(np.isfinite(value.astype(np.float32))):
            raise ValueError(f"{weights_file}: tensor {key!r} holds NaN or infinite values.")
    use_dora = config.get("use_dora") is True
    modules: dict[str, ModuleAdapter] = {}
    names = sorted(
        {
            m.group(1)
            for k in tensors
            if (m := re.match(r"(.*)\.lora_(?:A\.weight|embedding_A)$", k))
        }
    )
    used = set()
    for name in names:
        modules[name] = _module_adapter(weights_file, config, name, tensors, use_dora, used)
    full = {}
    for key, value in tensors.items():
        if key in used or ".original_module." in key:
            continue
        if ".lora_" in key:
            raise ValueError(
                f"{weights_file}: tensor {PEFT_PREFIX + key!r} is not a lora_A / lora_B / "
                "magnitude tensor of an adapted module; refused rather than dropped."
            )
        key = key.replace(".base_layer.", ".")
        full[key] = value
    if not modules:
        raise ValueError(f"{weights_file}: holds no LoRA / DoRA adapters.")
    dtypes = tuple(sorted({str(v.dtype) for v in tensors.values()}))
    return PeftAdapter(folder, config, use_dora, modules, full, dtypes)


def _module_adapter(file, config, name, tensors, use_dora, used) -> ModuleAdapter:
    def take(key):
        if key not in tensors:
            raise ValueError(f"{file}: module {name!r} has no tensor {PEFT_PREFIX + key!r}.")
        used.add(key)
        return tensors[key].astype(np.float32)

    magnitude_key = f"{name}.lora_magnitude_vector"
    if magnitude_key in tensors and not use_dora:
        raise ValueError(
            f"{file}: {PEFT_PREFIX + magnitude_key!r} is a DoRA magnitude, but "
            f"{PEFT_CONFIG} says use_dora=false."
        )
    if f"{name}.lora_embedding_A" in tensors:
        kind = "embedding"
        lora_a, lora_b = take(f"{name}.lora_embedding_A").T, take(f"{name}.lora_embedding_B").T
    else:
        a, b = take(f"{name}.lora_A.weight"), take(f"{name}.lora_B.weight")
        kind = "linear" if a.ndim == 2 else "conv"
        lora_a = np.transpose(a, (*range(1, a.ndim), 0))  # (r, in, *window) -> (in, *window, r)
        if b.ndim != a.ndim or any(n != 1 for n in b.shape[2:]):
            raise ValueError(
                f"{file}: module {name!r} has lora_B {b.shape}; expected (out, r) or "
                "(out, r, 1, ...) with lora_A " + f"{a.shape}."
            )
        lora_b = b.reshape(b.shape[0], b.shape[1]).T
    if lora_a.shape[-1] != lora_b.shape[0]:
        raise ValueError(
            f"{file}: module {name!r}: lora_A has rank {lora_a.shape[-1]} but lora_B has "
            f"rank {lora_b.shape[0]}."
        )
    magnitude = None
    if use_dora:
        magnitude = take(magnitude_key).reshape(-1)
        if magnitude.shape != (lora_b.shape[1],):
            raise ValueError(
                f"{file}: module {name!r} has a magnitude of {magnitude.size} values for "
                f"{lora_b.shape[1]} output features."
            )
    rank = int(lora_a.shape[-1])
    alpha = float(_pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]))
    expected_rank = _pattern_value(config.get("rank_pattern"), name, config["r"])
    if expected_rank != rank:
        raise ValueError(
            f"{file}: module {name!r} has rank {rank}, but {PEFT_CONFIG} gives it "
            f"r={expected_rank}."
        )
    scale = ops.scaling(rank, alpha, config.get("use_rslora") is True)
    return ModuleAdapter(name, kind, rank, alpha, KernelAdapter(lora_a, lora_b, magnitude, scale))


def _pattern_value(pattern, name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: the first key matching the end of
    the module name (``re.match(rf"(.*\\.)?({key})$", name)``)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# -------------------------------------------------------------------- the folder merge


@dataclasses.dataclass(frozen=True)
class FolderMerge:
    """What :func:`merge_folder` wrote.

    ``merged``: base tensor names whose weights were merged; ``replaced``: base tensors
    replaced by an adapter's full weights (``modules_to_save``, biases); ``files``: the
    safetensors files written; ``largest_block_bytes``: the largest block merged at once
    (its float32 size).
    """

    out: Path
    merged: tuple[str, ...]
    replaced: tuple[str, ...]
    files: tuple[str, ...]
    largest_block_bytes: int


def base_files(folder: str | Path) -> dict[str, list[str]]:
    """``{shard file name: [tensor names]}`` of a Hugging Face model folder.

    Raises:
      FileNotFoundError: the folder is missing or holds no safetensors weights (a folder
        with ``pytorch_model.bin`` only is named as such: pickle files are not read), or
        its index names a shard that is missing.
      ValueError: an unreadable index, or a PEFT adapter folder given as the base.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (a Hugging Face model folder).")
    if (folder / PEFT_CONFIG).is_file():
        raise ValueError(
            f"{folder}: a PEFT adapter folder (it holds {PEFT_CONFIG}), not a Hugging Face "
            "model folder; pass it as an adapter."
        )
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{index}: not a readable safetensors index ({error}).") from None
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        for shard in shards:
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{folder / shard}: a shard named by {index} is missing.")
        return shards
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return {files[0].name: list(read_header(files[0])[1])}
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    what = (
        f"{len(files)} .safetensors files and no {SAFETENSORS_INDEX}"
        if files
        else "no .safetensors weights"
        + (f" (only {pickled}, pickle files, not read)" if pickled else "")
    )
    raise FileNotFoundError(f"{folder}: not a Hugging Face model folder with safetensors: {what}.")


def merge_folder(
    base: str | Path,
    adapters: Sequence[str | Path | PeftAdapter],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    combination: str = "merged",
    eps: float = ops.DEFAULT_EPS,
    progress: Callable[[str], None] | None = None,
    block_bytes: int = 1 << 22,
) -> FolderMerge:
    """Merge PEFT adapter folders into a Hugging Face safetensors model folder, streaming.

    Each shard of ``base`` is written to ``out`` under its own name with its own header
    (so names, dtypes, shapes and offsets are unchanged): tensors no adapter touches are
    copied in chunks; each adapted weight is read, merged in float32 in blocks (one
    adapter: ``W' = m/||V||_c * V`` as PEFT's ``merge_and_unload``; several:
    :func:`weighted_merge`), cast once to its dtype and written. Every other file of
    ``base`` (``config.json``, the index, tokenizer files) is copied. One block of about
    ``block_bytes`` is in memory at a time, with its float32 working copies.

    Full weights in an adapter folder (``modules_to_save``, biases saved with
    ``bias="all"`` / ``"lora_only"``) replace the base's, as PEFT does; a weighted merge
    of several adapters (or of one with a weight other than 1) refuses them.

    Args:
      base: the model folder (``model.safetensors``, or shards and
        ``model.safetensors.index.json``).
      adapters: PEFT folders (or :class:`PeftAdapter`).
      out: the folder to write; must not exist or be empty, and not be ``base``.
      weights: one per adapter (default: 1 for one adapter; required for several).
      combination: ``"merged"`` or ``"dora"`` (see :func:`weighted_merge`).
      progress: called with a line per file written.
      block_bytes: weights are merged in blocks of about this many bytes in float32
        (Linear and Conv weights: of output features; embedding tables: of rows, in two
        passes, since their norm runs over the vocabulary).

    Raises:
      FileNotFoundError / ValueError: naming the path, for a missing or wrong folder, an
        adapted module whose weight the base lacks (with the closest base names), a
        shape that does not fit, a weight count unlike the adapter count, an ``out``
        that is ``base`` or not empty.
    """
    base, out = Path(base), Path(out)
    shards = base_files(base)
    adapters = [a if isinstance(a, PeftAdapter) else read_peft_folder(a) for a in adapters]
    if not adapters:
        raise ValueError("merge_folder: no adapter folders given.")
    if weights is None:
        if len(adapters) > 1:
            raise ValueError(
                f"merge_folder: {len(adapters)} adapters need one weight each (weights=...)."
            )
        weights = [1.0]
    weights = [float(w) for w in weights]
    check_weights(weights, len(adapters), "merge_folder")
    if combination not in COMBINATIONS:
        raise ValueError(
            f"merge_folder: combination must be one of {COMBINATIONS}; got {combination!r}."
        )
    weighted = len(adapters) > 1 or weights[0] != 1.0
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out}: exists and is not an empty folder; choose a new output folder."
        )
    if out.resolve() == base.resolve():
        raise ValueError(f"{out}: the output folder must not be the base folder.")

    # Where every base tensor lives, and which adapters touch it.
    where = {name: shard for shard, names in shards.items() for name in names}
    infos: dict[str, dict[str, TensorInfo]] = {s: read_header(base / s)[1] for s in shards}
    plan: dict[str, list[tuple[KernelAdapter, ModuleAdapter, float]]] = {}
    replace: dict[str, tuple[np.ndarray, Path]] = {}
    for adapter, weight in zip(adapters, weights, strict=True):
        for name, module in adapter.modules.items():
            key = f"{name}.weight"
            if key not in where:
                raise ValueError(
                    f"{adapter.folder}: adapts module {name!r}, but the base {base} has no "
                    f"tensor {key!r}. Closest base tensors: {_closest(key, where)}."
                )
            info = infos[where[key]][key]
            expected = module.weight_shape()
            if info.shape != expected or (module.kind == "conv") != (len(info.shape) > 2):
                raise ValueError(
                    f"{adapter.folder}: module {name!r} ({module.kind}, rank {module.rank}) "
                    f"expects a base weight of shape {expected}, but {base / where[key]} holds "
                    f"{key!r} with shape {info.shape}."
                )
            if info.dtype not in _FLOATS:
                raise ValueError(
                    f"{base / where[key]}: {key!r} is {info.dtype}, not floating point."
                )
            plan.setdefault(key, []).append((module.adapter, module, weight))
        for key, value in adapter.full.items():
            if weighted:
                raise ValueError(
                    f"{adapter.folder}: holds full weights ({key!r}, from modules_to_save or "
                    "a saved bias), which a weighted merge cannot combine; merge it alone."
                )
            if key not in where:
                raise ValueError(
                    f"{adapter.folder}: holds {key!r}, but the base {base} has no such "
                    f"tensor. Closest base tensors: {_closest(key, where)}."
                )
            shape = infos[where[key]][key].shape
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"{adapter.folder}: {key!r} has shape {tuple(value.shape)}, but "
                    f"{base / where[key]} holds it with shape {shape}."
                )
            replace[key] = (value, adapter.folder)

    out.mkdir(parents=True, exist_ok=True)
    largest = 0
    for shard in sorted(shards):
        header, tensors = read_header(base / shard)
        with open(base / shard, "rb") as source, open(out / shard, "wb") as target:
            target.write(header)
            for name, info in sorted(tensors.items(), key=lambda item: item[1].begin):
                target.seek(info.begin)
                if name in plan:
                    held = _merge_tensor(
                        base / shard, name, info, plan[name], combination, eps, target, block_bytes
                    )
                    largest = max(largest, held)
                elif name in replace:
                    dtype = np.dtype(_DTYPES[info.dtype])
                    target.write(np.ascontiguousarray(replace[name][0].astype(dtype)).tobytes())
                else:
                    source.seek(info.begin)
                    _copy(source, target, info.end - info.begin)
        if progress is not None:
            progress(f"wrote {out / shard}")
    for path in base.iterdir():
        if path.suffix != ".safetensors" and path.name not in {p.name for p in out.iterdir()}:
            if path.is_dir():
                shutil.copytree(path, out / path.name)
            else:
                shutil.copy2(path, out / path.name)
    return FolderMerge(
        out=out,
        merged=tuple(sorted(plan)),
        replaced=tuple(sorted(replace)),
        files=tuple(sorted(shards)),
        largest_block_bytes=largest,
    )


def _merge_tensor(file, name, info, entries, combination, eps, target, block_bytes) -> int:
    """Merge one base weight into ``target`` (positioned at its offset) in blocks of
    rows of about ``block_bytes`` (in float32); returns the largest block's bytes.

    Linear and Conv weights have their output features on axis 0, and a feature's merge
    needs its own row alone: each block is read, merged and written once. An
    embedding's norm runs over axis 0 (the vocabulary), so its blocks are read twice:
    once to sum the squared norms, once to merge with them.
    """
    dtype = np.dtype(_DTYPES[info.dtype])
    module = entries[0][1]
    layout = module.layout(len(info.shape))
    weights = [weight for _, _, weight in entries]
    row = math.prod(info.shape[1:])
    rows = max(1, block_bytes // (4 * row))
    blocks = []
    for start in range(0, info.shape[0], rows):
        stop = min(start + rows, info.shape[0])
        begin, end = (info.begin + i * row * dtype.itemsize for i in (start, stop))
        blocks.append(
            (start, stop, TensorInfo(info.dtype, (stop - start, *info.shape[1:]), begin, end))
        )
    try:
        if module.kind == "embedding":
            merge = _embedding_blocks(file, blocks, entries, weights, layout, combination, eps)
        else:
            merge = (
                weighted_merge(
                    read_tensor(file, block),
                    [_rows(adapter, start, stop) for adapter, _, _ in entries],
                    weights,
                    layout,
                    combination=combination,
                    eps=eps,
                )
                for start, stop, block in blocks
            )
        largest = 0
        for merged in merge:
            merged = np.ascontiguousarray(np.asarray(merged))
            largest = max(largest, 4 * merged.size)
            target.write(merged.reshape(-1).view(np.uint8).data)
    except ValueError as error:
        raise ValueError(f"{file}: {name!r}: {error}") from None
    return largest


def _embedding_blocks(file, blocks, entries, weights, layout, combination, eps):
    """The merged blocks of rows of an embedding table ``(vocab, features)``: a first
    pass sums each term's squared column norms over the blocks (and ``||W0||_c^2``), the
    second merges each block with them (the form of :func:`_terms`)."""
    adapters = [adapter for adapter, _, _ in entries]
    _, shapes = _terms(adapters, weights, layout, combination, None, "merge_folder")

    def directions(start, stop, block):
        w0 = _float32(read_tensor(file, block))
        views = [
            w0 + t.scale * ops.lora_delta(t.lora_a[start:stop], t.lora_b, layout) for _, t in shapes
        ]
        return w0, views

    base_sq, sums = 0.0, [0.0] * len(shapes)
    for start, stop, block in blocks:
        w0, views = directions(start, stop, block)
        base_sq = base_sq + ops.column_norm_sq(w0, layout)
        sums = [total + ops.column_norm_sq(v, layout) for total, v in zip(sums, views, strict=True)]
    c0, terms = _terms(adapters, weights, layout, combination, jnp.sqrt(base_sq), "merge_folder")
    scales = [
        None
        if t.magnitude is None
        else jnp.asarray(t.magnitude, jnp.float32) / ops.safe_sqrt(total, eps)
        for (_, t), total in zip(terms, sums, strict=True)
    ]
    for start, stop, block in blocks:
        w0, views = directions(start, stop, block)
        out = c0 * w0
        for (coefficient, _), g, v in zip(terms, scales, views, strict=True):
            out = out + coefficient * (v if g is None else g * v)  # g (features,) on axis 1
        yield _cast(out, np.dtype(_DTYPES[block.dtype]))


def _rows(adapter: KernelAdapter, start: int, stop: int) -> KernelAdapter:
    """The adapter of output features ``start:stop`` (rows of a torch Linear or Conv
    weight)."""
    magnitude = None if adapter.magnitude is None else adapter.magnitude[start:stop]
    return adapter._replace(lora_b=adapter.lora_b[:, start:stop], magnitude=magnitude)


def _copy(source, target, size: int, chunk: int = 1 << 20) -> None:
    while size > 0:
        data = source.read(min(chunk, size))
        if not data:
            raise ValueError(f"{source.name}: ends before its header says.")
        target.write(data)
        size -= len(data)


def _closest(key: str, names) -> list[str]:
    return difflib.get_close_matches(key, list(names), n=3, cutoff=0.0)
