"""Many DoRA adapters of one frozen NNX model in one batch.

:func:`stack_adapters` takes ``K`` models adapted by :func:`~dora_jax.nnx.apply_dora`
from one base (same structure, same base weights) and returns a new model whose DoRA
layers are stacked layers (:class:`StackedLinear`, ...) holding the ``K`` adapters on a
leading axis and each adapter's norm ``||W0 + s_k*A_k@B_k||_c``, computed once. The
``K`` models are not changed, and the new model shares their base arrays.

The routing of a batch is an explicit input: :func:`with_adapter_ids` returns a view of
the stacked model (a copy of its graph sharing its arrays; the model itself is not
changed) whose stacked layers run example ``i`` (the leading axis of each layer's
input) through adapter ``ids[i]``, ``-1`` through the base::

    y = with_adapter_ids(stacked, ids)(x)

    @nnx.jit
    def serve(model, ids, x):
        return with_adapter_ids(model, ids)(x)

A stacked model called without :func:`with_adapter_ids` refuses to run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dora_jax import ops
from dora_jax.adapters import (
    AdapterStack,
    example_axis_problem,
    stacked_output,
)
from dora_jax.adapters import (
    stack_adapters as stack_layer,
)
from dora_jax.config import LayerSettings
from dora_jax.nnx.layers import (
    DoRAConv,
    DoRAEinsum,
    DoRALayer,
    DoRALinear,
    DoRALinearGeneral,
    NormCache,
    _rebuild,
)
from dora_jax.nnx.surgery import SavedParam

Array = jax.Array


class StackedParam(nnx.Variable):
    """``K`` adapters' ``lora_a``, ``lora_b``, ``magnitude`` or scalings, stacked on a
    leading axis (inference only: not an ``nnx.LoRAParam``, nothing trains)."""


class StackedLayer(DoRALayer):
    """A DoRA layer holding ``K`` adapters of one frozen kernel; each example of a batch
    runs through the adapter :func:`with_adapter_ids` names.

    The layer computes with the Flax layer's own products, as the single-adapter DoRA
    layer it extends. ``inference_norm`` holds the ``(K, *out)`` norms; assigning a new
    kernel variable drops it (as for every DoRA layer) and calls then compute the norms
    from the kernel; :func:`cache_stacked_norms` caches them again.
    """

    def _init_adapters(self, layout: ops.Layout, *, rngs, lora_a_init=None, lora_b_init=None, **kw):
        # The stack is set by stack_adapters; nothing is drawn at random here.
        self.layout, self.settings = layout, LayerSettings(**kw)
        for name in ("lora_a", "lora_b", "magnitude", "scales", "base_norm_sq", "inference_norm"):
            setattr(self, name, nnx.data(None))
        self.adapter_ids = nnx.data(None)
        self.routing = None

    def _set_stack(self, stack: AdapterStack) -> None:
        self.lora_a, self.lora_b, self.magnitude, self.scales = map(StackedParam, stack[:4])
        self.inference_norm = NormCache(stack.inference_norm)

    @property
    def num_adapters(self) -> int:
        return self.lora_a.shape[0]

    def stack(self) -> AdapterStack:
        """The layer's :class:`~dora_jax.adapters.AdapterStack` (norms if cached)."""
        norm = self.inference_norm
        return AdapterStack(
            self.lora_a[...],
            self.lora_b[...],
            self.magnitude[...],
            self.scales[...],
            None if norm is None else norm[...],
        )

    def adapters(self):
        raise ValueError(
            f"{type(self).__name__} holds {self.num_adapters} adapters: see stack(); "
            f"cache_stacked_norms caches their norms."
        )

    def merged(self):
        raise ValueError(
            f"{type(self).__name__} holds {self.num_adapters} adapters and cannot be merged; "
            f"merge each adapter's own model (dora_jax.nnx.merge_adapters)."
        )

    def recompute_magnitude(self) -> None:
        raise ValueError(
            f"{type(self).__name__}: a stack of trained adapters is inference only; "
            f"recompute magnitudes in the single-adapter models, then stack them again."
        )

    def cache_norm(self) -> None:
        """Cache each adapter's whole norm from the current kernel and stack
        (:func:`cache_stacked_norms`)."""
        stack = self.stack()
        norm = ops.stacked_norms(
            getattr(self, self.kernel_name)[...],
            stack.lora_a,
            stack.lora_b,
            stack.scales,
            self.layout,
            base_norm_sq=self._base_norm_sq(),
            eps=self.eps,
        )
        self.inference_norm = NormCache(norm)

    def _example_axis_problem(self, x: Array) -> str | None:
        return None

    def _adapt(self, x, deterministic, apply_kernel, apply_lora_b, **maps) -> Array:
        where = type(self).__name__
        if self.adapter_ids is None:
            raise ValueError(
                f"{where}: a stacked model runs through dora_jax.nnx.with_adapter_ids("
                f"model, adapter_ids), which names each example's adapter."
            )
        problem = self._example_axis_problem(x)
        if problem is not None:
            raise ValueError(f"{where}: {problem}.")
        return stacked_output(
            x,
            getattr(self, self.kernel_name)[...],
            self.layout,
            self.stack(),
            self.adapter_ids,
            self.eps,
            where,
            apply_kernel=apply_kernel,
            apply_lora_b=apply_lora_b,
            routing=self.routing,
            **maps,
        )


class StackedLinear(StackedLayer, DoRALinear):
    """``nnx.Linear`` with ``K`` stacked DoRA adapters (see :class:`StackedLayer`)."""


class StackedLinearGeneral(StackedLayer, DoRALinearGeneral):
    """``nnx.LinearGeneral`` with ``K`` stacked DoRA adapters; no ``batch_axis``, and
    the input's leading axis not contracted."""

    def _example_axis_problem(self, x: Array) -> str | None:
        axis = tuple(ax % x.ndim for ax in self.axis)
        batch = tuple(ax % x.ndim for ax in self.batch_axis)
        return example_axis_problem("LinearGeneral", axis=axis, batch_dims=batch)


class StackedConv(StackedLayer, DoRAConv):
    """``nnx.Conv`` with ``K`` stacked DoRA adapters (see :class:`StackedLayer`)."""


class StackedEinsum(StackedLayer, DoRAEinsum):
    """``nnx.Einsum`` with ``K`` stacked DoRA adapters; the input's leading axis must
    lead the output and not be a kernel axis."""

    def _example_axis_problem(self, x: Array) -> str | None:
        return example_axis_problem("Einsum", equation=self.einsum_str)


STACKED_CLASSES: dict[type, type] = {
    DoRALinear: StackedLinear,
    DoRALinearGeneral: StackedLinearGeneral,
    DoRAConv: StackedConv,
    DoRAEinsum: StackedEinsum,
}


def stack_adapters(models: Sequence[nnx.Module]) -> nnx.Module:
    """A new model running ``K`` adapters of one base in one batch.

    Args:
      models: ``K`` models adapted by :func:`~dora_jax.nnx.apply_dora` from one base:
        the same structure, the same DoRA layers and identical base weights (every
        ``nnx.Param`` that is not an adapter). Ranks, alphas and rsLoRA may differ
        (lower ranks are padded with zeros, which changes no product).
    Returns:
      a copy of ``models[0]`` sharing its base arrays, each DoRA layer replaced by its
      stacked counterpart (``STACKED_CLASSES``) holding the ``K`` adapters and their
      norms (computed here, once: they depend on the base kernels and these
      adapters). Run it through :func:`with_adapter_ids`.

    Raises:
      ValueError: naming the path for different bases, structures or adapted layers,
        ``modules_to_save``, plain-LoRA adapters and layers stacks do not run on
        (``nnx.Embed``).
    """
    models = list(models)
    if not models or not all(isinstance(m, nnx.Module) for m in models):
        raise TypeError("stack_adapters needs a list of one or more NNX models.")
    layers = [_dora_layers(m, k) for k, m in enumerate(models)]
    bases = [nnx.state(m, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))) for m in models]
    first = jax.tree_util.tree_flatten_with_path(bases[0])
    for k, base in enumerate(bases[1:], 1):
        other = jax.tree_util.tree_flatten_with_path(base)
        same_tree = first[1] == other[1] and layers[k].keys() == layers[0].keys()
        if not same_tree:
            raise ValueError(
                f"stack_adapters: model {k} has another structure or other DoRA layers than "
                f"model 0 (DoRA layers {sorted(layers[k])} vs {sorted(layers[0])})."
            )
        for (path, a), (_, b) in zip(first[0], other[0], strict=True):
            if a.shape != b.shape or a.dtype != b.dtype or not bool(jnp.array_equal(a, b)):
                raise ValueError(
                    f"stack_adapters: base weight {jax.tree_util.keystr(path)} of model {k} "
                    f"differs from model 0's; stacked adapters share one base."
                )
    stacked = nnx.merge(*nnx.split(models[0]))
    nodes = dict(nnx.iter_graph(stacked))
    for path in layers[0]:
        same = [found[path] for found in layers]
        template = same[0]
        where = "/".join(str(p) for p in path)
        cls = STACKED_CLASSES.get(type(template))
        if cls is None or any(type(layer) is not type(template) for layer in same):
            raise ValueError(
                f"stack_adapters: {where!r} is a {type(template).__name__} in model 0 and "
                f"{[type(layer).__name__ for layer in same]} across the models; stacks run "
                f"on {', '.join(c.__name__ for c in STACKED_CLASSES)} layers."
            )
        kernel = getattr(template, template.kernel_name)[...]
        stack = stack_layer(
            kernel,
            template.layout,
            [layer.adapters() for layer in same],
            [layer.settings for layer in same],
            where,
        )
        settings = dataclasses.replace(template.settings, rank=stack.lora_a.shape[-1])
        fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
        new = _rebuild(cls, template, nnx.Rngs(0), {}, **fields)
        new._set_stack(stack)
        parent, key = nodes[path[:-1]], path[-1]
        if isinstance(key, int):
            parent[key] = new
        else:
            setattr(parent, key, new)
    return stacked


def _dora_layers(model: nnx.Module, k: int) -> dict[tuple, DoRALayer]:
    found = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, StackedLayer):
            raise ValueError(f"stack_adapters: model {k} is already a stack.")
        if isinstance(node, DoRALayer):
            found[tuple(path)] = node
        elif isinstance(node, SavedParam):
            raise ValueError(
                f"stack_adapters: model {k} trains {'/'.join(map(str, path))!r} in full "
                f"(modules_to_save); a stack shares every base weight."
            )
    if not found:
        raise ValueError(f"stack_adapters: model {k} has no DoRA layer (see apply_dora).")
    return found


def cache_stacked_norms(model: nnx.Module) -> nnx.Module:
    """Cache every stacked layer's ``K`` norms from its current kernel, in place.

    :func:`stack_adapters` caches them; assigning a new kernel variable drops a layer's
    cache (calls then compute the norms from the kernel). Like
    :func:`~dora_jax.nnx.cache_norms`, call it again after changing a kernel's value in
    place, which a layer cannot see. Returns the model.
    """
    for _, node in nnx.iter_graph(model):
        if isinstance(node, StackedLayer):
            node.cache_norm()
    return model


def with_adapter_ids(model: nnx.Module, adapter_ids, routing: str | None = None) -> nnx.Module:
    """A view of a stacked model that runs example ``i`` through adapter ``adapter_ids[i]``.

    Args:
      model: made by :func:`stack_adapters`; not changed.
      adapter_ids: ``(batch,)`` integers in ``[-1, K)``, ``-1`` for the base model, one
        per example: the leading axis of every stacked layer's input. Concrete ids out
        of range are refused (``ValueError``); under ``jit`` they cannot be checked, and
        an example with such an id comes out NaN.
      routing: how the low-rank products are routed
        (:func:`dora_jax.ops.stacked_adapter_forward`): ``"gather"``, ``"mask"`` or
        ``None`` (by the tokens per example). The same numbers either way.
    Returns:
      a copy of ``model``'s graph (sharing its arrays) with the ids set in its stacked
      layers; call it as the model.
    """
    stacked = [m for _, m in nnx.iter_graph(model) if isinstance(m, StackedLayer)]
    if not stacked:
        raise ValueError("with_adapter_ids needs a model made by stack_adapters.")
    ops.check_adapter_ids(adapter_ids, stacked[0].num_adapters, None, "with_adapter_ids")
    routed = nnx.merge(*nnx.split(model))
    ids = jnp.asarray(adapter_ids)
    for _, node in nnx.iter_graph(routed):
        if isinstance(node, StackedLayer):
            node.adapter_ids = nnx.data(ids)
            node.routing = routing
    return routed
