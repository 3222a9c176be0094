"""Many DoRA adapters of one frozen Linen model in one batch.

:func:`stack_adapters` takes ``K`` adapters trained on one base (the variables of
:func:`~dora_jax.linen.wrap`\\ ped models of the same Linen model and params) and
returns a :class:`StackedModel` and its variables::

    "params":     the shared base, exactly the model's
    "dora_stack": lora_a (K, ...), lora_b (K, ...), magnitude (K, ...), scales (K,)
    "dora_cache": inference_norm (K, ...): each adapter's ||W0 + s*A@B||_c

``StackedModel.apply(variables, x, adapter_ids=ids)`` runs example ``i`` of the batch
(the leading axis of every adapted layer's input) through adapter ``ids[i]``, ``-1``
through the base. ``ids`` is an argument of ``apply``, so ``jax.jit(stacked.apply)``
takes it as an array like ``x``. ``x @ W0`` is one product for the batch; only the
low-rank products are per adapter (:func:`dora_jax.ops.stacked_adapter_forward`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dora_jax import ops
from dora_jax.adapters import (
    BASE_NORM_SQ,
    DORA,
    DORA_CACHE,
    INFERENCE_NORM,
    SCALES,
    STACK,
    Adapters,
    AdapterStack,
    as_tuple,
    example_axis_problem,
    normalize_axes,
    stacked_output,
)
from dora_jax.adapters import stack_adapters as stack_layer
from dora_jax.linen import calls
from dora_jax.linen.models import adapted_layers
from dora_jax.linen.variables import describe
from dora_jax.linen.wrap import DoRAModel

Array = jax.Array
STACKED_LEAVES = ("lora_a", "lora_b", "magnitude", SCALES)


@dataclasses.dataclass(frozen=True)
class _StackedAdapter:
    """Stands in for a layer's :class:`~dora_jax.linen.variables.BoundAdapter`: the
    layer's own call (``dora_jax.linen.calls``) gives it the kernel and linear maps."""

    module: nn.Module
    adapter_ids: Array
    eps: float
    routing: str | None

    def __call__(self, x: Array, kernel: Array, layout: ops.Layout, *maps, **named) -> Array:
        """``maps``: ``apply_kernel``, ``apply_lora_b`` and ``to_output`` as the layer's
        call gives them; ``named``: ``apply_lora_a``, ``dense_like``."""
        module = self.module
        stack = AdapterStack(
            *(module.get_variable(STACK, name) for name in STACKED_LEAVES),
            inference_norm=module.get_variable(DORA_CACHE, INFERENCE_NORM),
        )
        names = ("apply_kernel", "apply_lora_b", "to_output")
        named.update(zip(names, maps, strict=False))
        named = {k: v for k, v in named.items() if v is not None}
        where = describe(module)
        return stacked_output(
            x,
            kernel,
            layout,
            stack,
            self.adapter_ids,
            self.eps,
            where,
            routing=self.routing,
            **named,
        )


def _intercept(adapter_ids, eps, routing, next_fun, args, kwargs, context):
    module = context.module
    if not module.has_variable(STACK, "lora_a"):
        return next_fun(*args, **kwargs)
    kind = type(module)
    problem = _problem(module, args, kwargs)
    if problem is not None:
        raise ValueError(f"{describe(module)}: {problem}.")
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    adapter = _StackedAdapter(module, adapter_ids, eps, routing)
    if kind is nn.Einsum:
        given = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
        return calls.einsum_call(module, args[0], given, adapter)
    layer_call = {
        nn.Dense: calls.dense_call,
        nn.DenseGeneral: calls.dense_general_call,
        nn.Conv: calls.conv_call,
    }[kind]
    return layer_call(module, *args, adapter)


def _einsum_str(module: nn.Einsum, args, kwargs) -> str:
    given = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    return nn.merge_param("einsum_str", module.einsum_str, given)


def _problem(module: nn.Module, args, kwargs) -> str | None:
    """Why ``module`` cannot run a stack of adapters, or ``None``."""
    kind = type(module)
    if kind not in (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum):
        return (
            f"a stack of adapters runs on nn.Dense, nn.DenseGeneral, nn.Einsum and nn.Conv "
            f"layers; not on {kind.__name__}"
        )
    if kind is nn.Einsum and args:
        return example_axis_problem("Einsum", equation=_einsum_str(module, args, kwargs))
    if kind is nn.DenseGeneral and args:
        ndim = np.ndim(args[0])
        return example_axis_problem(
            "DenseGeneral",
            axis=normalize_axes(as_tuple(module.axis), ndim),
            batch_dims=normalize_axes(as_tuple(module.batch_dims), ndim),
        )
    return None


@dataclasses.dataclass(frozen=True, eq=False)
class StackedModel:
    """A Linen model with ``num_adapters`` DoRA adapters on its adapted layers, each
    example of a batch running through the adapter it names (made by :func:`stack_adapters`).

    Inference only: no dropout, nothing trains. The adapted layers are those that have
    a ``"dora_stack"`` entry in the variables given to :meth:`apply`.
    """

    model: nn.Module
    num_adapters: int
    eps: float = ops.DEFAULT_EPS  # the norms' floor, when computed in the call
    # How the low-rank products are routed (ops.stacked_adapter_forward): "gather",
    # "mask" or None (by the tokens per example). The same numbers either way.
    routing: str | None = None

    def apply(self, variables: Mapping[str, Any], *args, adapter_ids, method=None, **kwargs):
        """``apply`` of the model, example ``i`` through adapter ``adapter_ids[i]``.

        Args:
          variables: from :func:`stack_adapters`. Without ``"dora_cache"`` the norms are
            computed from ``"params"`` in every call (the same numbers, slower).
          adapter_ids: ``(batch,)`` integers in ``[-1, num_adapters)``, ``-1`` for the
            base model, one per example: the leading axis of every adapted layer's input.
            Concrete ids out of range are refused (``ValueError``); under ``jit`` they
            cannot be checked, and an example with such an id comes out NaN.
          method, kwargs: as the model's ``apply``.
        """
        ops.check_adapter_ids(adapter_ids, self.num_adapters, None, "StackedModel.apply")
        with nn.intercept_methods(lambda *a: _intercept(adapter_ids, self.eps, self.routing, *a)):
            return self.model.apply(dict(variables), *args, method=method, **kwargs)


def stack_adapters(
    models: DoRAModel | Sequence[DoRAModel],
    variables: Sequence[Mapping[str, Any]],
    *args,
    method=None,
    **kwargs,
) -> tuple[StackedModel, dict[str, Any]]:
    r"""Stack ``K`` adapters trained on one base for mixed-batch inference.

    Args:
      models: the :func:`~dora_jax.linen.wrap`\ ped model of each adapter (one for all,
        or one each: their configs may give different ranks, alphas and rsLoRA, but
        must adapt the same layers of the same Linen model).
      variables: ``K`` variables of those models (``"params"``, ``"dora"``), with
        identical ``"params"``: the shared base.
      args, method, kwargs: example inputs, as for
        :func:`~dora_jax.linen.cache_norms` (traced for shapes only).
    Returns:
      ``(stacked, variables)``: a :class:`StackedModel` and its variables (see the
      module docstring). Adapters of a lower rank are padded with zeros to the largest
      (exact: the padding adds nothing to any product).

    Each adapter's norm ``||W0 + s_k*A_k@B_k||_c`` is computed here, once, into
    ``"dora_cache"``; it depends on these params and adapters: after changing either,
    stack again (or drop ``"dora_cache"``, and every call computes the norms).

    Raises:
      ValueError: naming the layer or the params leaf for different bases, different
        adapted layers, plain-LoRA adapters, layers inside ``nn.scan`` / ``nn.vmap``,
        Embed layers and layers whose example axis is not the input's leading axis.
    """
    variables = list(variables)
    models = [models] * len(variables) if isinstance(models, DoRAModel) else models
    if not isinstance(models, Sequence) or not all(isinstance(m, DoRAModel) for m in models):
        raise TypeError(
            f"stack_adapters needs models made by dora_jax.linen.wrap (one for all, or a "
            f"list); got {type(models).__name__}."
        )
    models = list(models)
    if not variables or len(models) != len(variables):
        raise ValueError(
            f"stack_adapters needs one or more variables and one model for all or one "
            f"each; got {len(models)} models and {len(variables)} variables."
        )
    for model in models:
        if model.model != models[0].model:
            raise ValueError("stack_adapters: the wrapped models are not the same Linen model.")
    params = variables[0]["params"]
    for k, v in enumerate(variables[1:], 1):
        _check_same_base(params, v["params"], k)
    facts = [
        adapted_layers(m, v, *args, method=method, **kwargs)
        for m, v in zip(models, variables, strict=True)
    ]
    paths = [{f.path for f in fk} for fk in facts]
    for k, p in enumerate(paths[1:], 1):
        if p != paths[0]:
            differ = sorted("/".join(q) for q in p ^ paths[0])
            raise ValueError(
                f"stack_adapters: adapter {k} adapts other layers than adapter 0 "
                f"(differing: {differ})."
            )
    stack: dict[str, Any] = {}
    cache: dict[str, Any] = {}
    for layer in facts[0]:
        where = "/".join(layer.path)
        kernel = _get(params, layer.path)[layer.kernel_name]
        if layer.kernel_name != "kernel" or kernel.ndim != len(layer.kernel_shape):
            kind = "an Embed" if layer.kernel_name != "kernel" else "inside nn.scan / nn.vmap"
            raise ValueError(
                f"stack_adapters: layer {where!r} is {kind} (kernel {tuple(kernel.shape)}); "
                f"stacks run on unscanned Dense, DenseGeneral, Einsum and Conv layers."
            )
        per_layer = [{f.path: f for f in fk}[layer.path] for fk in facts]
        adapters = []
        for v in variables:
            dora = _get(v.get(DORA, {}), layer.path)
            base_norm_sq = _get(v.get(DORA_CACHE, {}), layer.path).get(BASE_NORM_SQ)
            adapters.append(
                Adapters(dora["lora_a"], dora["lora_b"], dora.get("magnitude"), base_norm_sq)
            )
        layout = layer.layout(kernel, adapters[0].lora_a, adapters[0].lora_b)
        settings = [f.settings for f in per_layer]
        stacked = stack_layer(kernel, layout, adapters, settings, where)
        _set(stack, layer.path, dict(zip(STACKED_LEAVES, stacked[:4], strict=True)))
        _set(cache, layer.path, {INFERENCE_NORM: stacked.inference_norm})
    out = {"params": params, STACK: stack, DORA_CACHE: cache}
    eps = {f.settings.eps for f in facts[0]}
    return StackedModel(models[0].model, len(variables), eps.pop() if eps else ops.DEFAULT_EPS), out


def _check_same_base(first: Mapping, other: Mapping, k: int) -> None:
    a, b = jax.tree_util.tree_flatten_with_path(first), jax.tree_util.tree_flatten_with_path(other)
    if a[1] != b[1]:
        raise ValueError(f"stack_adapters: the params of adapter {k} have another structure.")
    for (path, x), (_, y) in zip(a[0], b[0], strict=True):
        if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y):
            raise ValueError(
                f"stack_adapters: params leaf {jax.tree_util.keystr(path)} of adapter {k} "
                f"differs from adapter 0's ({y.dtype}{tuple(y.shape)} vs "
                f"{x.dtype}{tuple(x.shape)}); stacked adapters share one base."
            )


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree.get(key, {}) if isinstance(tree, Mapping) else {}
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
