"""The frozen Flax Linen layers' linear maps, applied to any kernel (``W0``, ``A``, ``B``).

A plain, bias-free Flax layer with the adapted layer's settings runs on each kernel, so
padding, dilation, precision and dtype promotion are Flax's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

from dora_jax import ops
from dora_jax.adapters import (
    einsum_plan,
)

Array = jax.Array


def plain_layer(
    cls: type[nn.Module], module: Any, copy: Sequence[str] | None = None, **overrides
) -> nn.Module:
    """An unbound, bias-free ``cls`` carrying ``module``'s settings and ``overrides``.

    ``copy`` names the settings to take from ``module`` (default: every field of
    ``cls`` that ``module`` has).
    """
    fields = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"}
    names = fields if copy is None else fields & set(copy)
    settings = {n: getattr(module, n) for n in names if hasattr(module, n)}
    if "use_bias" in fields:
        settings["use_bias"] = False
    return cls(**{**settings, **overrides}, parent=None)


def kernel_map(
    cls: type[nn.Module],
    module: Any,
    n_lead: int,
    param: str = "kernel",
    copy: Sequence[str] | None = None,
    **overrides,
):
    """``(x, k) -> y``: the linear map of a Flax layer applied with an arbitrary kernel.

    ``features`` follows the kernel's axes after the first ``n_lead`` (batch and input)
    axes, so the same map serves ``W0`` (out features) and ``A`` (rank features).
    """

    def apply(x: Array, kernel: Array) -> Array:
        features = tuple(kernel.shape[n_lead:])
        features = features[0] if len(features) == 1 else features
        layer = plain_layer(cls, module, copy, features=features, **overrides)
        return layer.apply({"params": {param: kernel}}, x)

    return apply


def rank_map(module: Any, n_batch: int = 0) -> Callable[[Array, Array], Array]:
    """``(x @ A, B) -> lora_out``: contract the trailing rank axis with ``B``."""

    def apply(xa: Array, lora_b: Array) -> Array:
        layer = nn.DenseGeneral(
            features=lora_b.shape[n_batch + 1 :],
            axis=-1,
            batch_dims=tuple(range(n_batch)),
            use_bias=False,
            dtype=getattr(module, "dtype", None),
            precision=getattr(module, "precision", None),
            parent=None,
        )
        return layer.apply({"params": {"kernel": lora_b}}, xa)

    return apply


@dataclasses.dataclass(frozen=True)
class EinsumMaps:
    """The linear maps of an adapted einsum ``lhs,rhs->out`` with kernel ``rhs``.

    ``A`` replaces the kernel's output axes by a rank axis ``r`` and ``B`` maps ``r`` to
    them: ``lhs,{batch}{in}r->{rest}r`` then ``{rest}r,{batch}r{out}->out``.
    """

    layout: ops.Layout
    apply_kernel: Callable[[Array, Array], Array]
    apply_lora_a: Callable[[Array, Array], Array]
    apply_lora_b: Callable[[Array, Array], Array]
    to_output: Callable[[Array], Array]
    bias_shape: tuple[int, ...]
    bias_broadcast: tuple[int, ...]


def einsum_maps(
    equation: str, kernel_shape: Sequence[int], module: Any, copy: Sequence[str] | None = None
) -> EinsumMaps:
    """Build :class:`EinsumMaps` from Flax's ``nn.Einsum`` with ``module``'s settings."""
    plan = einsum_plan(equation, kernel_shape)

    def einsum_map(equation):
        return lambda x, k: plain_layer(
            nn.Einsum, module, copy, shape=k.shape, einsum_str=equation
        ).apply({"params": {"kernel": k}}, x)

    return EinsumMaps(
        layout=plan.layout,
        apply_kernel=einsum_map(plan.equation),
        apply_lora_a=einsum_map(plan.lora_a_equation),
        apply_lora_b=einsum_map(plan.lora_b_equation),
        to_output=plan.to_output,
        bias_shape=plan.bias_shape,
        bias_broadcast=plan.broadcast,
    )
