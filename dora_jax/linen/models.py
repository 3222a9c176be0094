"""Whole-model helpers for Linen models (DoRA layers or wrapped): magnitudes from loaded
weights, the norm caches, merging, the summary.

Each is a function of the model and its variables, not a mode of the forward pass: one
shape-only trace of the model (``jax.eval_shape``, no computation) lists the adapted
layers (:func:`adapted_layers`: path, kernel, settings, layout), then the helper computes
from the variables alone with :mod:`dora_jax.ops`. Layers stacked by ``nn.scan`` or
``nn.vmap`` hold their leading stacked axes as batch axes of the layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from dora_jax import merging, ops
from dora_jax import summary as dora_summary
from dora_jax.adapters import (
    BASE_NORM_SQ,
    DORA,
    DORA_CACHE,
    INFERENCE_NORM,
    SETTINGS,
    Adapters,
    has_leaf,
    merged_kernel,
)
from dora_jax.adapters import inference_norm as whole_norm
from dora_jax.config import DoRAConfig, LayerSettings
from dora_jax.linen.layers import DoRAMixin
from dora_jax.linen.variables import module_path
from dora_jax.linen.wrap import ADAPTABLE, DoRAModel

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LayerFacts:
    """One adapted layer of a model, as a trace sees it (static facts, no arrays)."""

    path: tuple[str, ...]  # scope path: where its params and adapters are nested
    kernel_name: str  # "kernel", or "embedding" for Embed
    kernel_shape: tuple[int, ...]  # inside the trace: without stacked (scan / vmap) axes
    settings: LayerSettings
    equation: str | None = None  # Einsum's, which orders the kernel's axes

    def layout(self, kernel: Array, lora_a: Array, lora_b: Array) -> ops.Layout:
        """The layout of the stored kernel: its leading stacked axes are batch axes."""
        n_stack = kernel.ndim - len(self.kernel_shape)
        if n_stack < 0 or tuple(kernel.shape[n_stack:]) != self.kernel_shape:
            raise ValueError(
                f"{'/'.join(self.path)}: stored {self.kernel_name} {tuple(kernel.shape)} does "
                f"not end with the traced shape {self.kernel_shape}; stacked axes (nn.scan, "
                f"nn.vmap) must lead."
            )
        if self.equation is not None:
            inner = ops.einsum_layout(self.equation)
        else:  # (*batch, *in, *out) with lora_a (*batch, *in, r), lora_b (*batch, r, *out)
            n_a, n_b = lora_a.ndim - n_stack - 1, lora_b.ndim - n_stack - 1
            n_batch = n_a + n_b - len(self.kernel_shape)
            inner = ops.dense_general_layout(n_batch, n_a - n_batch, n_b - n_batch)
        shift = lambda axes: tuple(a + n_stack for a in axes)  # noqa: E731
        return ops.Layout(
            tuple(range(n_stack)) + shift(inner.batch_axes),
            shift(inner.in_axes),
            shift(inner.out_axes),
        )


def adapted_layers(
    module: Any, variables: Mapping[str, Any], *args, method=None, **kwargs
) -> list[LayerFacts]:
    r"""The adapted layers of ``module`` (DoRA layers, or a :func:`wrap`\ ped model's
    targets) met by ``apply(variables, *args, method=method, **kwargs)``.

    The model is traced for shapes only (``jax.eval_shape``): nothing is computed.
    """
    config = module.config if isinstance(module, DoRAModel) else None
    found: dict[tuple[str, ...], LayerFacts] = {}

    def record(next_fun, call_args, call_kwargs, context):
        out = next_fun(*call_args, **call_kwargs)
        if context.method_name not in ("__call__", "attend"):
            return out
        facts = _facts(context.module, config, call_args, call_kwargs)
        if facts is not None:
            found.setdefault(facts.path, facts)
        return out

    def run(variables):
        with nn.intercept_methods(record):
            return module.apply(variables, *args, method=method, **kwargs)

    jax.eval_shape(run, dict(variables))
    return list(found.values())


def _facts(layer: nn.Module, config: DoRAConfig | None, args, kwargs) -> LayerFacts | None:
    path = module_path(layer)
    if isinstance(layer, DoRAMixin):
        settings = LayerSettings(**{name: getattr(layer, name) for name in SETTINGS})
    elif config is not None and path and type(layer) in ADAPTABLE and config.is_target(path):
        settings = config.settings(path)
    else:
        return None
    kernel_name = "embedding" if isinstance(layer, nn.Embed) else "kernel"
    kernel = layer.get_variable("params", kernel_name)
    if kernel is None:  # a method that never read the kernel
        return None
    equation = None
    if isinstance(layer, nn.Einsum):
        given = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
        equation = nn.merge_param("einsum_str", layer.einsum_str, given).replace(" ", "")
    return LayerFacts(
        path=tuple(layer.scope.path),
        kernel_name=kernel_name,
        kernel_shape=tuple(kernel.shape),
        settings=settings,
        equation=equation,
    )


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree.get(key, {}) if isinstance(tree, Mapping) else {}
    return tree


def _with(tree: Mapping[str, Any], path: tuple[str, ...], values: Mapping[str, Any]) -> dict:
    """A copy of ``tree`` with ``values`` set in the dict at ``path``."""
    tree = dict(tree)
    if not path:
        return {**tree, **values}
    tree[path[0]] = _with(tree.get(path[0], {}), path[1:], values)
    return tree


def _each_layer(
    module: Any,
    variables: Mapping[str, Any],
    args,
    kwargs,
    compute: Callable[[LayerFacts, Array, Adapters, ops.Layout], Mapping[str, Any]],
    collection: str,
    dora_only: bool = True,
) -> dict[str, Any]:
    """The ``collection`` tree with ``compute(...)``'s values set at every adapted layer."""
    out = dict(variables.get(collection, {}))
    for facts in adapted_layers(module, variables, *args, **kwargs):
        if dora_only and not facts.settings.use_dora:
            continue
        params = _get(variables.get("params", {}), facts.path)
        dora = _get(variables.get(DORA, {}), facts.path)
        cache = _get(variables.get(DORA_CACHE, {}), facts.path)
        kernel = params[facts.kernel_name]
        adapters = Adapters(
            dora["lora_a"], dora["lora_b"], dora.get("magnitude"), cache.get(BASE_NORM_SQ)
        )
        layout = facts.layout(kernel, adapters.lora_a, adapters.lora_b)
        out = _with(out, facts.path, compute(facts, kernel, adapters, layout))
    return out


def recompute_magnitudes(
    module: Any, variables: Mapping[str, Any], *args, **kwargs
) -> dict[str, Any]:
    r"""Recompute every magnitude from the base weights now in ``variables``.

    Pretrained weights usually arrive after ``init``: load them into
    ``variables["params"]``, then call this with the same example inputs as ``init``.
    The magnitudes become ``||W0 + s*A@B||_c`` of the loaded ``W0`` and the current
    adapters (PEFT's initialisation), so with ``B = 0`` the model equals the base.
    Works for models built from DoRA layers and for :func:`wrap`\ ped models.

    Caches are never left stale: a ``base_norm_sq`` cache in ``variables`` is
    recomputed from the params given, and the inference norm cache
    (:func:`cache_norms`) is dropped.

    Returns:
      a new variables dict; ``lora_a`` and ``lora_b`` are kept.
    """

    def magnitude(facts, kernel, adapters, layout):
        m = ops.init_magnitude(
            kernel, adapters.lora_a, adapters.lora_b, facts.settings.scale, layout
        )
        return {"magnitude": m.astype(facts.settings.adapter_dtype)}

    new = {**variables, DORA: _each_layer(module, variables, args, kwargs, magnitude, DORA)}
    if has_leaf(variables.get(DORA_CACHE, {}), BASE_NORM_SQ):
        return cache_base_norms(module, new, *args, **kwargs)
    new.pop(DORA_CACHE, None)
    return new


def cache_base_norms(
    module: Any, variables: Mapping[str, Any], *args, method=None, **kwargs
) -> dict[str, Any]:
    r"""``variables`` plus ``dora_cache/base_norm_sq``: each layer's ``||W0||_c^2``.

    The cache depends on ``variables["params"]`` exactly as given here and on nothing
    else; it saves squaring the frozen ``W0`` in every training step (the step computes
    the same numbers with or without it). Call this after the params are final (after
    loading pretrained weights), and call it again whenever they change: a cache made
    from other params gives wrong outputs. ``init`` never creates it.

    Traces the model for shapes on the example inputs ``args`` (any batch size), with
    ``method`` and ``kwargs`` as ``apply`` takes them, to find every adapted layer.
    Works for models built from DoRA layers and for :func:`wrap`\ ped models.

    Returns:
      a new variables dict; any ``dora_cache`` given is replaced (an inference norm
      cache from :func:`cache_norms` is dropped: it depends on the params too).
    """
    kept = dict(variables)
    kept.pop(DORA_CACHE, None)

    def base_norm_sq(facts, kernel, adapters, layout):
        return {BASE_NORM_SQ: ops.column_norm_sq(kernel, layout)}

    cache = _each_layer(module, kept, args, {"method": method, **kwargs}, base_norm_sq, DORA_CACHE)
    if cache:  # empty when no layer uses DoRA (plain LoRA)
        kept[DORA_CACHE] = cache
    return kept


def cache_norms(module: Any, variables: Mapping[str, Any], *args, **kwargs) -> dict[str, Any]:
    """Variables for inference: each layer's whole DoRA norm cached in ``dora_cache``.

    With the norm cached, an unmerged DoRA layer costs what an unmerged LoRA layer does
    plus one ``(out,)`` scaling: the ``A^T W0`` product is skipped. Only the ``(out,)``
    norm is stored, never ``B @ A``. The cache depends on the params (``W0``) AND the
    adapters (``lora_a``, ``lora_b``) given here: call it again after either changes,
    and use the result for inference, not training (:func:`dora_jax.train.partition`
    drops it). ``init`` never creates it.
    """

    def norm(facts, kernel, adapters, layout):
        return {INFERENCE_NORM: whole_norm(kernel, adapters, facts.settings, layout)}

    return {
        **variables,
        DORA_CACHE: _each_layer(module, variables, args, kwargs, norm, DORA_CACHE),
    }


def merge_params(
    module: nn.Module, variables: Mapping[str, Any], *args, **kwargs
) -> dict[str, Any]:
    """Fold every adapter into its kernel: plain params for the unadapted model.

    ``W' = m / ||W0 + s*A@B||_c * (W0 + s*A@B)`` per layer, in float32, cast once to
    the kernel's dtype. Traces the model for shapes on the example inputs ``args`` (any
    batch size) to find every adapted layer, scanned layers included.

    Returns:
      ``params`` for the unwrapped model (or the plain Flax layers the DoRA layers
      extend), e.g. ``model.apply({"params": merge_params(wrapped, variables, x)}, x)``.
    """

    def merged(facts, kernel, adapters, layout):
        return {facts.kernel_name: merged_kernel(kernel, adapters, facts.settings, layout)}

    return _each_layer(module, variables, args, kwargs, merged, "params", dora_only=False)


def merge_params_exact(
    module: nn.Module, variables: Mapping[str, Any], *args, **kwargs
) -> tuple[dict[str, Any], dict[str, merging.UnmergeRecord]]:
    """:func:`merge_params`, and what :func:`unmerge_params` needs to give the base back.

    Returns:
      ``(params, records)``: the merged params (bit for bit those of
      :func:`merge_params`) and ``{layer path: UnmergeRecord}``, whose memory is about one
      byte per kernel element (:class:`dora_jax.merging.UnmergeRecord`; a quarter of a
      float32 kernel, half of a bfloat16 one), not a copy of the base.
    """
    records: dict[str, merging.UnmergeRecord] = {}

    def merged(facts, kernel, adapters, layout):
        adapter = merging.KernelAdapter(
            adapters.lora_a, adapters.lora_b, adapters.magnitude, facts.settings.scale
        )
        value, records["/".join(facts.path)] = merging.merge_exact(
            kernel, adapter, layout, eps=facts.settings.eps
        )
        return {facts.kernel_name: value}

    params = _each_layer(module, variables, args, kwargs, merged, "params", dora_only=False)
    return params, records


def unmerge_params(
    module: Any,
    variables: Mapping[str, Any],
    records: Mapping[str, merging.UnmergeRecord],
    *args,
    **kwargs,
) -> dict[str, Any]:
    """The params :func:`merge_params_exact` was given, bit for bit.

    Args:
      module: the wrapped model (or DoRA layers) that was merged.
      variables: ``{"params": the merged params, "dora": the adapters that were merged}``.
      records: :func:`merge_params_exact`'s records.
      args, kwargs: example inputs, as for :func:`merge_params`.

    Raises:
      ValueError: naming the layer, when a merged kernel changed since merging, the
        adapters differ from the merged ones, or a layer has no record.
    """

    def unmerged(facts, kernel, adapters, layout):
        where = "/".join(facts.path)
        if where not in records:
            raise ValueError(f"unmerge_params: no record for the adapted layer {where!r}.")
        adapter = merging.KernelAdapter(
            adapters.lora_a, adapters.lora_b, adapters.magnitude, facts.settings.scale
        )
        try:
            value = merging.unmerge(kernel, adapter, layout, records[where])
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        return {facts.kernel_name: value}

    return _each_layer(module, variables, args, kwargs, unmerged, "params", dora_only=False)


def summary(variables: Mapping[str, Any], config: DoRAConfig | None = None):
    """Adapted layers, ``modules_to_save`` and trainable / total parameter counts.

    ``print(summary(variables, config))`` prints a table like PEFT's
    ``print_trainable_parameters``; the :class:`dora_jax.summary.Summary` it returns
    holds the numbers.
    """
    return dora_summary.from_linen_variables(variables, config)
