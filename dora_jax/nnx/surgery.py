"""DoRA put into unmodified NNX models, and whole-model helpers.

:func:`apply_dora` replaces the layers a :class:`~dora_jax.DoRAConfig` selects by their
DoRA counterparts (:mod:`dora_jax.nnx.layers`), in place; :func:`merge_adapters` folds
them back. The norm caches, the Linen-layout view of the adapters (what
:mod:`dora_jax.peft` and :mod:`dora_jax.analysis` read) and the summary work on a whole
model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dora_jax import merging
from dora_jax import summary as dora_summary
from dora_jax.adapters import ADAPTER_LEAVES, DORA
from dora_jax.config import DoRAConfig
from dora_jax.nnx.layers import DORA_CLASSES, DoRALayer


class SavedParam(nnx.LoRAParam):
    """A base parameter trained in full (``DoRAConfig.modules_to_save``).

    An ``nnx.LoRAParam``, so the one filter ``nnx.LoRAParam`` selects everything that
    trains: the adapters and the saved modules.
    """


def apply_dora(model: nnx.Module, config: DoRAConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Put DoRA into an NNX model, in place; return it.

    Every ``nnx.Linear``, ``LinearGeneral``, ``Einsum``, ``Conv`` and ``Embed`` whose
    path ``config`` selects becomes its DoRA counterpart, keeping the pretrained kernel
    and bias variables; the parameters of ``modules_to_save`` become
    :class:`SavedParam`. Afterwards ``nnx.LoRAParam`` filters exactly the trainable
    variables.

    Raises:
      ValueError: if ``targets`` match no adaptable layer (listing the ones that exist,
        closest first), match a module of another kind, or ask a layer for a rank it
        cannot have.
    """
    if not isinstance(config, DoRAConfig):
        raise TypeError(f"apply_dora needs a DoRAConfig; got {type(config).__name__}.")
    modules = [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module) and p]
    paths, adaptable, chosen, saved = [], [], [], []
    for path, module in modules:
        name = "/".join(str(p) for p in path)
        paths.append(name)
        if isinstance(module, DoRALayer):
            continue
        if type(module) in DORA_CLASSES:
            adaptable.append(name)
        if config.is_target(name):
            if type(module) not in DORA_CLASSES:
                raise ValueError(
                    f"DoRAConfig targets match {name!r}, a {type(module).__module__}."
                    f"{type(module).__name__}; DoRA adapts nnx.Linear, nnx.LinearGeneral, "
                    f"nnx.Einsum, nnx.Conv and nnx.Embed. Narrow `targets` or add {name!r} "
                    f"to `exclude`."
                )
            chosen.append((path, name, module))
        elif config.is_saved(name):
            saved.append(module)
    holding_params = {  # the modules that hold a parameter directly
        "/".join(str(p) for p in path[:-1])
        for path, variable in nnx.iter_graph(model)
        if isinstance(variable, nnx.Param) and len(path) > 1
    }
    config.check_matched(paths, adaptable, param_paths=holding_params)
    # Build every replacement before changing anything: an error leaves the model as is.
    replacements = []
    for path, name, module in chosen:
        # Shallow: asdict would turn the nested ops.Stacking into a dict.
        resolved = config.settings(name)
        settings = {f.name: getattr(resolved, f.name) for f in dataclasses.fields(resolved)}
        try:
            layer = DORA_CLASSES[type(module)].from_module(module, rngs=rngs, **settings)
        except ValueError as error:
            raise ValueError(f"{name!r}: {error}") from None
        replacements.append((model, path, layer))
    for module in saved:
        for variable_path, variable in nnx.iter_graph(module):
            if type(variable) is nnx.Param:
                replacements.append((module, variable_path, SavedParam(variable[...])))
    for root, path, value in replacements:
        _replace(root, path, value)
    return model


def merge_adapters(model: nnx.Module) -> nnx.Module:
    """Fold every DoRA layer into its plain Flax layer, in place; return the model.

    ``W' = m / ||W0 + s*A@B||_c * (W0 + s*A@B)`` in float32, cast once to the kernel's
    dtype; :class:`SavedParam` variables become ``nnx.Param`` again. The result has the
    unadapted model's structure and runs at its speed.
    """
    for path, module in list(nnx.iter_graph(model)):
        if isinstance(module, DoRALayer):
            _replace(model, path, module.merged())
        elif isinstance(module, SavedParam):
            _replace(model, path, nnx.Param(module[...]))
    return model


@dataclasses.dataclass(frozen=True)
class MergedAdapters:
    """What :func:`unmerge_adapters` needs to put the adapters back, bases bit for bit.

    Attributes:
      layers: ``{path: (DoRA layer, record)}``: each DoRA layer taken out of the model,
        holding the merged layer's kernel variable (not ``W0``), and its
        :class:`dora_jax.merging.UnmergeRecord`.
      saved: paths of the :class:`SavedParam` variables that became ``nnx.Param``.
    """

    layers: dict[tuple, tuple[DoRALayer, merging.UnmergeRecord]]
    saved: tuple[tuple, ...]

    @property
    def nbytes(self) -> int:
        """Memory of the records (about one byte per kernel element), adapters aside."""
        return sum(record.nbytes for _, record in self.layers.values())


def merge_adapters_exact(model: nnx.Module) -> MergedAdapters:
    """:func:`merge_adapters` (in place, the same merged kernels), keeping what
    :func:`unmerge_adapters` needs to restore every DoRA layer with its original kernel
    bit for bit: the adapters and an :class:`~dora_jax.merging.UnmergeRecord` per layer
    (about one byte per kernel element), not a copy of the base."""
    layers, saved = {}, []
    for path, module in list(nnx.iter_graph(model)):
        if isinstance(module, DoRALayer):
            name = module.kernel_name
            adapters = module.adapters()
            adapter = merging.KernelAdapter(
                adapters.lora_a, adapters.lora_b, adapters.magnitude, module.scale
            )
            value, record = merging.merge_exact(
                getattr(module, name)[...], adapter, module.layout, eps=module.settings.eps
            )
            plain = module.merged()
            getattr(plain, name).set_value(jnp.asarray(value))
            setattr(module, name, getattr(plain, name))  # W0 is not kept
            _replace(model, path, plain)
            layers[path] = (module, record)
        elif isinstance(module, SavedParam):
            _replace(model, path, nnx.Param(module[...]))
            saved.append(path)
    return MergedAdapters(layers, tuple(saved))


def unmerge_adapters(model: nnx.Module, merged: MergedAdapters) -> nnx.Module:
    """Undo :func:`merge_adapters_exact`, in place: every DoRA layer back, with the
    kernel it had, bit for bit; saved parameters become :class:`SavedParam` again.

    Raises:
      ValueError: naming the path, when a merged kernel changed since merging (its
        checksum differs) or a layer is missing; the model is then left unchanged.
    """
    restored = []
    for path, (module, record) in merged.layers.items():
        where = "/".join(str(p) for p in path)
        try:
            plain = _get_path(model, path)
            variable = getattr(plain, module.kernel_name)
            adapters = module.adapters()
            adapter = merging.KernelAdapter(
                adapters.lora_a, adapters.lora_b, adapters.magnitude, module.scale
            )
            kernel = merging.unmerge(variable[...], adapter, module.layout, record)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"unmerge_adapters: {where!r}: {error}") from None
        restored.append((path, module, variable, kernel))
    for path, module, variable, kernel in restored:
        variable.set_value(jnp.asarray(kernel))
        setattr(module, module.kernel_name, variable)
        _replace(model, path, module)
    for path in merged.saved:
        _replace(model, path, SavedParam(_get_path(model, path)[...]))
    return model


def _get_path(root: Any, path: tuple) -> Any:
    for key in path:
        root = root[key] if isinstance(key, int) else getattr(root, key)
    return root


def cache_base_norms(model: nnx.Module) -> nnx.Module:
    """Cache every DoRA layer's ``||W0||_c^2``, in place; return the model.

    The cache depends on the layer's kernel as it is now, and on nothing else: it saves
    squaring the frozen ``W0`` in every training step (the step computes the same
    numbers with or without it). Call it after the base weights are final (after
    loading pretrained weights and :meth:`DoRALayer.recompute_magnitude`), and again
    whenever a kernel's value changes: a layer cannot see ``kernel[...] = w`` or
    ``nnx.update``. Assigning a new kernel variable drops the layer's caches.
    :func:`apply_dora` and ``from_module`` never create it.
    """
    return _each_layer(model, "cache_base_norm")


def clear_base_norms(model: nnx.Module) -> nnx.Module:
    """Drop every ``||W0||_c^2`` cache set by :func:`cache_base_norms`, in place."""
    return _each_layer(model, "clear_base_norm")


def cache_norms(model: nnx.Module) -> nnx.Module:
    """Cache every DoRA layer's whole norm for inference, in place; return the model.

    An unmerged layer then skips the ``A^T W0`` product: it costs an unmerged LoRA
    layer plus one ``(out,)`` scaling. Only the ``(out,)`` norm is stored. It depends on
    the kernel (``W0``) AND the adapters (``lora_a``, ``lora_b``) of this moment: call
    again after changing either, or ``recompute_magnitude()`` / :func:`clear_norms`
    before training. :func:`apply_dora` and ``from_module`` never create it.
    """
    return _each_layer(model, "cache_norm")


def clear_norms(model: nnx.Module) -> nnx.Module:
    """Drop the inference norm caches set by :func:`cache_norms`, in place."""
    return _each_layer(model, "clear_norm")


def _each_layer(model: nnx.Module, method: str) -> nnx.Module:
    """``layer.method()`` for every DoRA layer of ``model`` (a stacked layer's own
    override included); returns the model."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, DoRALayer):
            getattr(module, method)()
    return model


def as_linen_variables(model: nnx.Module) -> dict[str, Any]:
    """The adapters and their base weights in the Linen layout, as plain arrays.

    ``{"params": {path...: {"kernel", "bias"} or {"embedding"}}, "dora": {path...:
    {"lora_a", "lora_b", "magnitude"}}}`` for every DoRA layer, with the
    :class:`SavedParam` variables of saved modules under ``"params"`` too: what
    :mod:`dora_jax.peft` and :mod:`dora_jax.analysis` read. Paths are the module
    attribute names (list items by index), as :func:`apply_dora` names them.
    """
    params: dict[str, Any] = {}
    dora: dict[str, Any] = {}
    for path, node in nnx.iter_graph(model):
        keys = tuple(str(p) for p in path)
        if isinstance(node, DoRALayer):
            adapters = {"lora_a": node.lora_a[...], "lora_b": node.lora_b[...]}
            if node.use_dora:
                adapters["magnitude"] = node.magnitude[...]
            _set_nested(dora, keys, adapters)
            base = {node.kernel_name: getattr(node, node.kernel_name)[...]}
            if getattr(node, "bias", None) is not None:
                base["bias"] = node.bias[...]
            _set_nested(params, keys, base)
        elif isinstance(node, SavedParam):
            _set_nested(params, keys, node[...])
    return {"params": params, DORA: dora}


def update_from_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> nnx.Module:
    """Set the model's adapters and saved parameters from Linen-layout ``variables``.

    The inverse of :func:`as_linen_variables` for everything that trains: every DoRA
    layer's ``lora_a``, ``lora_b``, ``magnitude`` and every :class:`SavedParam`; base
    kernels are left alone. Inference norm caches are dropped (they belonged to the old
    adapters). In place; returns the model.

    Raises:
      ValueError: naming the path when ``variables`` lacks a value or its shape differs.
    """
    updates = []
    for path, node in nnx.iter_graph(model):
        keys = tuple(str(p) for p in path)
        if isinstance(node, DoRALayer):
            names = ADAPTER_LEAVES if node.use_dora else ADAPTER_LEAVES[:2]
            source = _get_nested(variables.get(DORA, {}), keys)
            for name in names:
                updates.append(("/".join((*keys, name)), getattr(node, name), source, name))
        elif isinstance(node, SavedParam):
            source = _get_nested(variables.get("params", {}), keys[:-1])
            updates.append(("/".join(keys), node, source, keys[-1]))
    new_values = []
    for where, variable, source, name in updates:
        value = None if source is None else source.get(name)
        if value is None or tuple(value.shape) != tuple(variable.shape):
            got = "nothing" if value is None else f"shape {tuple(value.shape)}"
            raise ValueError(f"{where!r}: expected shape {tuple(variable.shape)}; got {got}.")
        new_values.append(jnp.asarray(value, variable.dtype))
    # Everything is checked before anything changes.
    for (_, variable, _, _), value in zip(updates, new_values, strict=True):
        variable.set_value(value)
    return clear_norms(model)


def _set_nested(tree: dict, keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def _get_nested(tree: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _replace(root: Any, path: tuple, value: Any) -> None:
    parent = root
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


def summary(model: nnx.Module):
    """Adapted layers, saved modules and trainable / total counts of an NNX model.

    ``print(summary(model))`` prints a table like PEFT's ``print_trainable_parameters``.
    Trainable means ``nnx.LoRAParam`` (adapters and :class:`SavedParam`).
    """
    layers, saved = [], {}
    for path, node in nnx.iter_graph(model):
        name = "/".join(str(p) for p in path)
        if isinstance(node, DoRALayer):
            magnitude = node.magnitude if node.use_dora else None
            layers.append(
                dora_summary.AdaptedLayer(
                    path=name,
                    kernel_shape=tuple(getattr(node, node.kernel_name).shape),
                    lora_a_shape=tuple(node.lora_a.shape),
                    lora_b_shape=tuple(node.lora_b.shape),
                    magnitude_shape=None if magnitude is None else tuple(magnitude.shape),
                )
            )
        elif isinstance(node, SavedParam):
            module = "/".join(str(p) for p in path[:-1])
            saved[module] = saved.get(module, 0) + node.size
    count = lambda f: sum(v.size for v in jax.tree.leaves(nnx.state(model, f)))  # noqa: E731
    return dora_summary.Summary(
        tuple(layers), tuple(saved.items()), count(nnx.LoRAParam), count(nnx.Param)
    )
