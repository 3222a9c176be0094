"""Magnitude and direction changes of fine-tuned weights (the paper's section 2).

For a fine-tuned kernel ``W_t`` against the pretrained ``W0``, over the ``k`` output
features (columns of a Flax ``(in, out)`` kernel)::

    dM = mean_n | ||W_t[:, n]|| - ||W0[:, n]|| |
    dD = mean_n ( 1 - cos(W_t[:, n], W0[:, n]) )

Plotted per layer and checkpoint, full fine-tuning and DoRA show a negative correlation
between ``dD`` and ``dM`` and LoRA a positive one (Liu et al., 2024, Figure 2).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from dora_jax import ops

Array = Any


def magnitude_direction_change(
    tuned: Array, pretrained: Array, layout: ops.Layout | None = None
) -> tuple[Array, Array]:
    """``(dM, dD)`` of one kernel, in float32.

    Args:
      tuned: ``W_t``, e.g. a merged kernel ``(in, out)``.
      pretrained: ``W0`` of the same shape.
      layout: which axes are input (reduced) axes; Dense ``(in, out)`` by default.
    Returns:
      two scalars: the mean absolute change of the per-feature norms, and the mean
      ``1 - cosine`` between the per-feature weight vectors.
    """
    layout = layout or ops.dense_layout()
    if tuned.shape != pretrained.shape:
        raise ValueError(
            f"magnitude_direction_change needs kernels of one shape; got {tuned.shape} and "
            f"{pretrained.shape}."
        )
    norm_t = ops.column_norm(tuned, layout)
    norm_0 = ops.column_norm(pretrained, layout)
    # 1 - cos(a, b) = (||a - b||^2 - (||a|| - ||b||)^2) / (2 ||a|| ||b||): both terms stay
    # accurate when a is close to b, where 1 - <a, b> / (||a|| ||b||) would cancel.
    difference = ops.column_norm_sq(tuned.astype(jnp.float32) - pretrained, layout)
    gap = norm_t - norm_0
    denominator = jnp.maximum(2.0 * norm_t * norm_0, jnp.finfo(jnp.float32).tiny)
    return jnp.mean(jnp.abs(gap)), jnp.mean((difference - gap * gap) / denominator)


def changes_by_layer(
    tuned_params: Mapping[str, Any], pretrained_params: Mapping[str, Any]
) -> dict[str, tuple[float, float]]:
    """``{path: (dM, dD)}`` for every 2-d ``kernel`` in two Flax params trees.

    ``tuned_params`` are plain params (e.g. from :func:`dora_jax.linen.merge_params`)
    with the same structure as ``pretrained_params``.
    """
    out: dict[str, tuple[float, float]] = {}

    def visit(tuned, pretrained, path):
        for key, value in tuned.items():
            name = f"{path}/{key}" if path else key
            if isinstance(value, Mapping):
                visit(value, pretrained[key], name)
            elif key == "kernel" and value.ndim == 2:
                d_m, d_d = magnitude_direction_change(value, pretrained[key])
                out[path] = (float(d_m), float(d_d))

    visit(tuned_params, pretrained_params, "")
    return out
