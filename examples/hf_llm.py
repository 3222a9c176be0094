"""Hugging Face model folders for the decoder of ``examples/llama.py``: load onto a mesh,
save merged, and PEFT adapters with Hugging Face's module names.

* :func:`load_pretrained` ``(folder, *, dtype=jnp.bfloat16, mesh=None, shardings=None,
  rngs=None, remat=False) -> (model, config)`` reads ``config.json`` and the
  safetensors weights (``model.safetensors``, or the shards a
  ``model.safetensors.index.json`` names) tensor by tensor straight onto the devices:
  the model is built abstractly (``nnx.eval_shape``) and each parameter is made with
  ``jax.make_array_from_callback``, each device's shard read from the memory-mapped
  file, transposed and cast on its own (each process reads only its own devices'
  shards). The host never holds more than one tensor of the file beyond what the
  devices hold (``benchmarks/llm_load_memory.py`` measures it). ``shardings`` maps
  ``(flax_path, shape) -> PartitionSpec``; with a mesh and no rule,
  :func:`fsdp_sharding` (each parameter split along its largest axis that the
  ``"fsdp"`` axis divides, replicated over ``"data"``).
* :func:`save_merged` ``(model, folder, *, like)`` writes the model, with its DoRA
  adapters merged, as a safetensors folder in the layout of the folder it was loaded
  from (``like``): the same shard files, tensor names, shapes, dtypes and index, with
  ``config.json`` and the other files copied. ``AutoModelForCausalLM.from_pretrained``
  loads it as a plain model. :func:`save_pretrained` ``(model, folder, *, dtype=None)``
  writes a new folder (``config.json`` and one ``model.safetensors``) for a model made
  here. Both write one tensor at a time, from one process (gathered to the host: a
  model whose arrays span several processes is not supported).
* :func:`peft_module_name` (``model/layers/0/self_attn/q_proj`` ->
  ``model.layers.0.self_attn.q_proj``), :func:`save_adapter` and :func:`load_adapter`:
  the adapter as a PEFT folder that ``PeftModel.from_pretrained`` loads onto the torch
  model, and a PEFT folder (say, trained in PyTorch) loaded into the JAX model.

No pickle: safetensors headers are JSON and tensors are raw bytes.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import dora_jax
from dora_jax import merging
from dora_jax import peft as dora_peft


def _sibling(name: str):
    """The example module ``name`` next to this file (imported once, by path)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[name]


_llama = _sibling("llama")
Llama, LlamaConfig = _llama.Llama, _llama.LlamaConfig

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"BF16": jnp.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
# Buffers some checkpoints carry that are recomputed here, not parameters.
SKIPPED = re.compile(r".*\.rotary_emb\.inv_freq$")

ShardingRule = Callable[[str, tuple[int, ...]], PartitionSpec]


# ----------------------------------------------------------------------------- names


def peft_module_name(path: str) -> str:
    """Flax path -> Hugging Face module name: ``/`` -> ``.`` (list items are indices)."""
    return path.replace("/", ".")


def parameter_names(model: nnx.Module) -> dict[str, tuple[nnx.Module, str, bool]]:
    """``{hf tensor name: (module, leaf, transposed)}`` for every base parameter.

    The modules are the ``nnx.Linear`` (``kernel`` -> ``weight``, transposed; ``bias``),
    ``nnx.Embed`` (``embedding`` -> ``weight``) and ``nnx.RMSNorm`` (``scale`` ->
    ``weight``) layers, DoRA layers included (their base kernel and bias).
    """
    names = {}
    for path, module in nnx.iter_graph(model):
        prefix = peft_module_name("/".join(str(p) for p in path))
        if isinstance(module, nnx.Linear):
            names[f"{prefix}.weight"] = (module, "kernel", True)
            if module.bias is not None:
                names[f"{prefix}.bias"] = (module, "bias", False)
        elif isinstance(module, nnx.Embed):
            names[f"{prefix}.weight"] = (module, "embedding", False)
        elif isinstance(module, nnx.RMSNorm):
            names[f"{prefix}.weight"] = (module, "scale", False)
    return names


def _flax_path(name: str, leaf: str) -> str:
    return "/".join([*name.rsplit(".", 1)[0].split("."), leaf])


# ----------------------------------------------------------------------------- files


def read_config(folder: str | Path) -> LlamaConfig:
    """The :class:`LlamaConfig` of a Hugging Face folder's ``config.json``."""
    file = Path(folder) / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (a Hugging Face model folder holds it).")
    try:
        return LlamaConfig.from_hf(json.loads(file.read_text()))
    except ValueError as error:
        raise ValueError(f"{file}: {error}") from None


def _header(file: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and the
    byte offset of its data; ``merging.read_header`` checks every offset against its shape."""
    head, _ = merging.read_header(file)
    return json.loads(head[8:]), len(head)


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The weight files of a folder: the index's shards, or ``model.safetensors``."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({folder / f for f in weight_map.values()})
    elif (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    else:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        hint = (
            f" It has {', '.join(pickled[:3])}: PyTorch pickles, which are never loaded here "
            f"(convert them once with transformers' save_pretrained(safe_serialization=True))."
            if pickled
            else ""
        )
        raise FileNotFoundError(f"{folder}: neither {WEIGHTS} nor {INDEX} found.{hint}")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{index}: names {file.name}, which is missing.")
    return files


def _tensors(folder: Path) -> dict[str, tuple[Path, dict[str, Any], int]]:
    """``{tensor name: (file, header entry, data start)}`` over the folder's files.

    Raises:
      ValueError: naming the files for a tensor stored twice, or one the index places
        in another file (or not at all).
    """
    found = {}
    index = folder / INDEX
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    for file in checkpoint_files(folder):
        header, start = _header(file)
        header.pop("__metadata__", None)
        for name, info in header.items():
            if name in found:
                raise ValueError(f"{file}: tensor {name!r} is also in {found[name][0]}.")
            if weight_map is not None and weight_map.get(name) != file.name:
                raise ValueError(
                    f"{file}: holds tensor {name!r}, which {index} places in "
                    f"{weight_map.get(name)!r}."
                )
            found[name] = (file, info, start)
    return found


def _source(folder: Path) -> Path:
    """The file that says where the weights are: the index, or the one weight file."""
    return folder / INDEX if (folder / INDEX).is_file() else folder / WEIGHTS


def _open(name: str, entry: tuple[Path, dict[str, Any], int]) -> np.ndarray:
    """A read-only memory map of one tensor (its pages are read when touched)."""
    file, info, start = entry
    if info["dtype"] not in DTYPES:
        raise ValueError(
            f"{file}: tensor {name!r} has dtype {info['dtype']}; expected one of "
            f"{', '.join(DTYPES)}."
        )
    dtype = np.dtype(DTYPES[info["dtype"]])
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]
    if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise ValueError(f"{file}: tensor {name!r} has a byte size that does not fit {shape}.")
    if not shape or 0 in shape:
        return np.zeros(shape, dtype)
    return np.memmap(file, dtype=dtype, mode="r", offset=start + begin, shape=shape)


# -------------------------------------------------------------------------- sharding


def fsdp_sharding(mesh: jax.sharding.Mesh) -> ShardingRule:
    """The default rule: split each parameter along its largest axis that the mesh's
    ``"fsdp"`` axis divides (the first such axis on a tie); replicate it otherwise and
    over every other mesh axis (``"data"``)."""
    size = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)).get("fsdp", 1)

    def rule(path: str, shape: tuple[int, ...]) -> PartitionSpec:
        spec = [None] * len(shape)
        if size > 1:
            fits = [i for i, n in enumerate(shape) if n % size == 0]
            if fits:
                spec[max(fits, key=lambda i: (shape[i], -i))] = "fsdp"
        return PartitionSpec(*spec)

    return rule


# ------------------------------------------------------------------------------ load


def load_pretrained(
    folder: str | Path,
    *,
    dtype=jnp.bfloat16,
    mesh: jax.sharding.Mesh | None = None,
    shardings: ShardingRule | None = None,
    rngs: nnx.Rngs | None = None,
    remat: bool = False,
) -> tuple[Llama, LlamaConfig]:
    """The :class:`~llama.Llama` of a Hugging Face folder, with its weights on devices.

    Args:
      folder: holds ``config.json`` and ``model.safetensors`` (or an index and shards).
      dtype: the parameters' and the computation's dtype (the file's values are cast).
      mesh: place each parameter as ``NamedSharding(mesh, shardings(path, shape))``;
        None: on the default device.
      shardings: ``(flax_path, flax_shape) -> PartitionSpec``, e.g.
        ``("model/layers/0/mlp/up_proj/kernel", (2048, 5632))``; default
        :func:`fsdp_sharding` of the mesh.
      rngs: only to build the model's structure (no value comes from it).
      remat: ``Llama(..., remat=True)``: each decoder block recomputed in the backward
        pass (for training).

    Each device's shard of each tensor is read from the file (memory-mapped, one tensor
    at a time), transposed to Flax's ``(in, out)`` and cast on its own: no second copy
    of the model is ever held in host memory.

    Raises:
      ValueError: naming the file and tensor for a tensor the model has no parameter
        for, a shape that differs, an unsupported dtype; naming the tensor for one the
        checkpoint lacks; for a config the model does not implement.
    """
    folder = Path(folder)
    config = read_config(folder)
    rngs = rngs or nnx.Rngs(0)
    model = nnx.eval_shape(
        lambda rngs: Llama(config, dtype=dtype, param_dtype=dtype, remat=remat, rngs=rngs),
        rngs,
    )
    if mesh is not None and shardings is None:
        shardings = fsdp_sharding(mesh)
    tensors = _tensors(folder)
    wanted = parameter_names(model)
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise ValueError(
            f"{_source(folder)}: the checkpoint has no tensor {missing[0]!r} ({len(missing)} "
            f"missing: {missing[:8]}), which this {config.model_type} config needs."
        )
    extra = sorted(
        n for n in set(tensors) - set(wanted) if not SKIPPED.match(n) and not _tied_head(n, config)
    )
    if extra:
        raise ValueError(
            f"{tensors[extra[0]][0]}: tensor {extra[0]!r} matches no parameter of the model "
            f"(refused rather than dropped; {len(extra)} such: {extra[:8]})."
        )
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        _check_tied(tensors)
    for name, (module, leaf, transposed) in wanted.items():
        variable = getattr(module, leaf)
        path = _flax_path(name, leaf)
        shape = tuple(variable.shape)
        source = _open(name, tensors[name])
        expected = shape[::-1] if transposed else shape
        if tuple(source.shape) != expected:
            raise ValueError(
                f"{tensors[name][0]}: tensor {name!r} has shape {tuple(source.shape)}; the "
                f"model's {path} needs {expected} (config.json and weights disagree)."
            )
        if mesh is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            sharding = NamedSharding(mesh, shardings(path, shape))

        def shard(index, source=source, transposed=transposed):
            part = source.T[index] if transposed else source[index]
            return np.array(part, dtype=np.dtype(dtype))  # a copy: the map is released

        variable.set_value(jax.make_array_from_callback(shape, sharding, shard, dtype=dtype))
        del source
    return model, config


def _tied_head(name: str, config: LlamaConfig) -> bool:
    return name == "lm_head.weight" and config.tie_word_embeddings


def _check_tied(tensors) -> None:
    """A tied model's file may still hold ``lm_head.weight``: it must be the embedding."""
    head = _open("lm_head.weight", tensors["lm_head.weight"])
    embed = _open("model.embed_tokens.weight", tensors["model.embed_tokens.weight"])
    same = head.shape == embed.shape and all(
        np.array_equal(head[i : i + 4096], embed[i : i + 4096])
        for i in range(0, head.shape[0], 4096)
    )
    if not same:
        raise ValueError(
            f"{tensors['lm_head.weight'][0]}: tensor 'lm_head.weight' differs from "
            f"'model.embed_tokens.weight', but config.json says tie_word_embeddings=true."
        )


# ------------------------------------------------------------------------------ save


def save_merged(model: Llama, folder: str | Path, *, like: str | Path) -> Path:
    """Write ``model`` with its adapters merged, in the layout of the folder ``like``.

    Every DoRA layer is written as ``W' = m * (W0 + s*A@B) / ||W0 + s*A@B||_c``
    (:meth:`dora_jax.nnx.DoRALayer.merged`, the fold :func:`dora_jax.nnx.merge_adapters`
    applies), one layer at a time: ``model`` keeps its adapters and no merged copy of the
    whole model is made. A model already merged (or never adapted) is written as it is.
    The weight files have ``like``'s names, headers (tensor names, order, shapes, dtypes,
    metadata) and index; the other files of ``like`` (``config.json``, the tokenizer...)
    are copied. Tensors are written one at a time. Returns the folder.

    Raises:
      ValueError: if ``folder`` is ``like``, ``like`` holds a tensor the model has no
        parameter for, a shape differs, or a model parameter is in none of the files.
    """
    folder, like = Path(folder), Path(like)
    if folder.resolve() == like.resolve():
        raise ValueError(f"save_merged: {folder} is the input folder; write elsewhere.")
    names = parameter_names(model)
    config = model.config
    folder.mkdir(parents=True, exist_ok=True)
    written = set()
    for file in checkpoint_files(like):
        header, start = _header(file)
        with open(file, "rb") as source:
            head = source.read(start)  # kept as it is: same names, shapes, dtypes

            def value(name, info, file=file, source=source, start=start):
                if SKIPPED.match(name):  # a buffer, copied
                    begin, end = info["data_offsets"]
                    source.seek(start + begin)
                    return source.read(end - begin)
                key = "model.embed_tokens.weight" if _tied_head(name, config) else name
                if key not in names:
                    raise ValueError(f"{file}: tensor {name!r} matches no parameter of the model.")
                written.add(key)
                return _merged_value(*names[key])

            _write(folder / file.name, head, header, value)
    unwritten = sorted(set(names) - written)
    if unwritten:
        raise ValueError(
            f"save_merged: {like} has no tensor {unwritten[0]!r} ({len(unwritten)} model "
            f"parameters in none of its files)."
        )
    for file in like.iterdir():
        if file.is_file() and file.suffix != ".safetensors":
            shutil.copyfile(file, folder / file.name)
    return folder


ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def save_pretrained(model: Llama, folder: str | Path, *, dtype=None) -> Path:
    """Write ``model`` (adapters merged) as a new Hugging Face folder: ``config.json``
    (:meth:`LlamaConfig.to_hf`) and one ``model.safetensors`` with Hugging Face's names
    and torch layouts, in ``dtype`` (default: each parameter's own). Tensors are written
    one at a time. For a model loaded from a folder, :func:`save_merged` keeps that
    folder's layout instead. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = parameter_names(model)
    codes = {np.dtype(v): k for k, v in DTYPES.items()}
    header, offset = {}, 0
    for name, (module, leaf, transposed) in names.items():
        variable = getattr(module, leaf)
        shape = tuple(variable.shape)[::-1] if transposed else tuple(variable.shape)
        kind = np.dtype(dtype or variable.dtype)
        size = int(np.prod(shape, dtype=np.int64)) * kind.itemsize
        header[name] = {"dtype": codes[kind], "shape": list(shape)}
        header[name]["data_offsets"] = [offset, offset + size]
        offset += size
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    head = struct.pack("<Q", len(text)) + text
    _write(folder / WEIGHTS, head, header, lambda name, info: _merged_value(*names[name]))
    fields = {**model.config.to_hf(), "architectures": [ARCHITECTURES[model.config.model_type]]}
    kinds = {header[name]["dtype"] for name in names}
    fields["torch_dtype"] = np.dtype(DTYPES[kinds.pop()]).name if len(kinds) == 1 else "float32"
    (folder / CONFIG).write_text(json.dumps(fields, indent=2) + "\n")
    return folder


def _merged_value(module: nnx.Module, leaf: str, transposed: bool) -> np.ndarray:
    """One parameter in torch layout, the DoRA layer merged if the module is one."""
    if isinstance(module, dora_jax.nnx.DoRALayer):
        module = module.merged()
    value = np.asarray(jax.device_get(getattr(module, leaf)[...]))
    return value.T if transposed else value


def _write(target: Path, head: bytes, header: dict[str, Any], value) -> None:
    """A safetensors file: ``head`` (length and JSON header), then each tensor's bytes in
    the order of its offsets; ``value(name, info)`` gives an array (cast to the header's
    dtype, checked against its shape) or raw bytes. Written under a temporary name and
    renamed when complete."""
    start = len(head)
    entries = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"),
        key=lambda item: item[1]["data_offsets"][0],
    )
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as out:
        out.write(head)
        for name, info in entries:
            begin, end = info["data_offsets"]
            if out.tell() != start + begin:
                raise ValueError(f"{target.name}: tensor {name!r} leaves a gap in the file.")
            data = value(name, info)
            if not isinstance(data, bytes):
                if tuple(data.shape) != tuple(info["shape"]):
                    raise ValueError(
                        f"{target.name}: tensor {name!r} has shape {tuple(info['shape'])}; "
                        f"the model's is {tuple(data.shape)}."
                    )
                data = np.ascontiguousarray(data.astype(np.dtype(DTYPES[info["dtype"]])))
                data = data.tobytes()
            out.write(data)
    partial.replace(target)


# ------------------------------------------------------------------------------ PEFT


def save_adapter(model: Llama, folder: str | Path, config: dora_jax.DoRAConfig) -> None:
    """Write the model's adapters as a PEFT folder with Hugging Face module names
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``...), which
    ``PeftModel.from_pretrained(torch_model, folder)`` loads."""
    dora_peft.save_pretrained(folder, model, config, module_name=peft_module_name)


def load_adapter(
    model: Llama, folder: str | Path, *, rngs: nnx.Rngs | None = None
) -> tuple[Llama, dora_jax.DoRAConfig]:
    """Adapt ``model`` (in place) as the PEFT folder says and load its adapters.

    ``dora_jax.peft.load_config`` reads the folder's config, :func:`dora_jax.nnx.apply_dora`
    adds the layers and ``dora_jax.peft.load_pretrained`` fills them (every tensor of
    the file used, every field checked). Returns the model and the config.

    Like every NNX module with dropout, the adapted model starts in training mode: with
    the folder's ``lora_dropout > 0`` its DoRA layers drop inputs until ``model.eval()``
    (what ``PeftModel.eval()`` is in PyTorch).
    """
    config = dora_peft.load_config(folder)
    dora_jax.nnx.apply_dora(model, config, rngs=rngs or nnx.Rngs(0))
    dora_peft.load_pretrained(folder, model, config, module_name=peft_module_name)
    return model, config


__all__ = [
    "ARCHITECTURES",
    "checkpoint_files",
    "fsdp_sharding",
    "load_adapter",
    "load_pretrained",
    "parameter_names",
    "peft_module_name",
    "read_config",
    "save_adapter",
    "save_merged",
    "save_pretrained",
]
