"""Whole-model helpers for Linen models (DoRA layers or wrapped): magnitudes from loaded
weights, the norm caches, merging, the summary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from dora_jax import summary as dora_summary
from dora_jax.adapters import (
    BASE_NORM_SQ,
    DORA,
    DORA_CACHE,
    drop_leaves,
    has_leaf,
)
from dora_jax.config import DoRAConfig
from dora_jax.linen.variables import _caching_base_norms, _caching_norms, _merging

Array = jax.Array


def recompute_magnitudes(
    module: Any, variables: Mapping[str, Any], *args, **kwargs
) -> dict[str, Any]:
    """Recompute every magnitude from the base weights now in ``variables``.

    Pretrained weights usually arrive after ``init``: load them into
    ``variables["params"]``, then call this with the same example inputs as ``init``.
    The magnitudes become ``||W0 + s*A@B||_c`` of the loaded ``W0`` and the current
    adapters (PEFT's initialisation), so with ``B = 0`` the model equals the base.
    Works for models built from DoRA layers and for :func:`wrap`\\ ped models.

    Caches are never left stale: a ``base_norm_sq`` cache in ``variables`` is
    recomputed from the params given, and the inference norm cache
    (:func:`cache_norms`) is dropped.

    Returns:
      a new variables dict; ``lora_a`` and ``lora_b`` are kept.
    """
    kept = dict(variables)
    had_cache = has_leaf(kept.pop(DORA_CACHE, {}), BASE_NORM_SQ)
    kept[DORA] = drop_leaves(variables.get(DORA, {}), "magnitude")
    token = _caching_base_norms.set(had_cache)
    try:
        _, updates = module.apply(kept, *args, mutable=[DORA, DORA_CACHE, "params"], **kwargs)
    finally:
        _caching_base_norms.reset(token)
    return {**kept, **updates}


def cache_base_norms(
    module: Any, variables: Mapping[str, Any], *args, method=None, **kwargs
) -> dict[str, Any]:
    """``variables`` plus ``dora_cache/base_norm_sq``: each layer's ``||W0||_c^2``.

    The cache depends on ``variables["params"]`` exactly as given here and on nothing
    else; it saves squaring the frozen ``W0`` in every training step (the step computes
    the same numbers with or without it). Call this after the params are final (after
    loading pretrained weights), and call it again whenever they change: a cache made
    from other params gives wrong outputs. ``init`` never creates it.

    Runs the model once on the example inputs ``args`` (any batch size), with ``method``
    and ``kwargs`` as ``apply`` takes them, to visit every adapted layer. Works for
    models built from DoRA layers and for :func:`wrap`\\ ped models.

    Returns:
      a new variables dict; any ``dora_cache`` given is replaced (an inference norm
      cache from :func:`cache_norms` is dropped: it depends on the params too).
    """
    kept = dict(variables)
    kept.pop(DORA_CACHE, None)
    token = _caching_base_norms.set(True)
    try:
        _, updates = module.apply(
            kept, *args, method=method, mutable=[DORA_CACHE, "params"], **kwargs
        )
    finally:
        _caching_base_norms.reset(token)
    if DORA_CACHE in updates:  # absent when no layer uses DoRA (plain LoRA)
        kept[DORA_CACHE] = updates[DORA_CACHE]
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
    token = _caching_norms.set(True)
    try:
        _, updates = module.apply(variables, *args, mutable=[DORA_CACHE, "params"], **kwargs)
    finally:
        _caching_norms.reset(token)
    return {**variables, DORA_CACHE: updates[DORA_CACHE]}


def merge_params(
    module: nn.Module, variables: Mapping[str, Any], *args, **kwargs
) -> dict[str, Any]:
    """Fold every adapter into its kernel: plain params for the unadapted model.

    ``W' = m / ||W0 + s*A@B||_c * (W0 + s*A@B)`` per layer, in float32, cast once to
    the kernel's dtype. Runs the model once on the example inputs ``args`` (any batch
    size) to visit every adapted layer, scanned layers included.

    Returns:
      ``params`` for the unwrapped model (or the plain Flax layers the DoRA layers
      extend), e.g. ``model.apply({"params": merge_params(wrapped, variables, x)}, x)``.
    """
    token = _merging.set(True)
    try:
        _, updates = module.apply(variables, *args, mutable=["params"], **kwargs)
    finally:
        _merging.reset(token)
    return updates["params"]


def summary(variables: Mapping[str, Any], config: DoRAConfig | None = None):
    """Adapted layers, ``modules_to_save`` and trainable / total parameter counts.

    ``print(summary(variables, config))`` prints a table like PEFT's
    ``print_trainable_parameters``; the :class:`dora_jax.summary.Summary` it returns
    holds the numbers.
    """
    return dora_summary.from_linen_variables(variables, config)
