"""What the Linen and the NNX front ends share, written once and free of either.

* the names of the adapter collections and leaves (``"dora"``: ``lora_a``, ``lora_b``,
  ``magnitude``; ``"dora_cache"``: ``base_norm_sq``, ``inference_norm``);
* the layer hyperparameters: the fields of :class:`~dora_jax.config.LayerSettings` and
  :func:`split_settings`, which takes them out of a layer's keyword arguments;
* :class:`Adapters` (one layer's adapter arrays) and :func:`adapted_output`, the one call
  of :func:`dora_jax.ops.adapter_forward` for a layer's adapters and settings;
* PEFT's initialisers (:func:`kaiming_uniform`, :func:`default_inits`);
* the per-kind facts that need no framework (:func:`einsum_plan`, the axes of
  ``DenseGeneral``);
* tree helpers on nested dicts of arrays (:func:`drop_leaves`, :func:`has_leaf`,
  :func:`merge_trees`).

It imports neither ``flax.linen`` nor ``flax.nnx``; the math is :mod:`dora_jax.ops`.
"""

from __future__ import annotations

import dataclasses
import functools
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dora_jax import ops
from dora_jax.config import LayerSettings

Array = jax.Array
Initializer = Callable[..., Array]

DORA = "dora"  # trainable adapters
DORA_CACHE = "dora_cache"  # norms cached from the weights, never trained
ADAPTER_LEAVES = ("lora_a", "lora_b", "magnitude")
BASE_NORM_SQ = "base_norm_sq"  # ||W0||_c^2 (cache_base_norms)
INFERENCE_NORM = "inference_norm"  # the whole DoRA norm, for inference only (cache_norms)
CACHE_LEAVES = (BASE_NORM_SQ, INFERENCE_NORM)

# The layer hyperparameters, in LayerSettings order: the one place they are listed.
SETTINGS = tuple(f.name for f in dataclasses.fields(LayerSettings))


def split_settings(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(settings, rest)``: the :class:`LayerSettings` fields of ``kwargs`` and the others.

    >>> split_settings({"rank": 2, "use_bias": False})
    ({'rank': 2}, {'use_bias': False})
    """
    settings = {k: v for k, v in kwargs.items() if k in SETTINGS}
    return settings, {k: v for k, v in kwargs.items() if k not in SETTINGS}


def check_dropout(rate: float, where: str) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{where}: dropout must be in [0, 1); got {rate}.")


class Adapters(NamedTuple):
    """One layer's adapter arrays (``None`` where absent).

    ``lora_a``, ``lora_b`` and ``magnitude`` have the shapes of
    :meth:`dora_jax.ops.Layout.lora_shapes`; both caches have the magnitude's shape.
    """

    lora_a: Array
    lora_b: Array
    magnitude: Array | None  # None: plain LoRA
    base_norm_sq: Array | None = None  # cached ||W0||_c^2
    inference_norm: Array | None = None  # cached whole norm, inference only


def adapted_output(
    x: Array,
    kernel: Array,
    layout: ops.Layout,
    adapters: Adapters,
    settings: LayerSettings,
    x_dropped: Array | None,
    **maps,
) -> Array:
    """:func:`dora_jax.ops.adapter_forward` for one layer's adapters and settings.

    ``maps`` are the layer's linear maps (``apply_kernel``, ``apply_lora_b``,
    ``to_output``, ``apply_lora_a``, ``dense_like``). Returns the output without bias.
    """
    maps.setdefault("to_output", _identity)
    return ops.adapter_forward(
        x,
        kernel,
        adapters.lora_a,
        adapters.lora_b,
        adapters.magnitude,
        layout=layout,
        scale=settings.scale,
        x_dropped=x_dropped,
        detach_norm=settings.detach_norm,
        base_norm_sq=adapters.base_norm_sq,
        norm=adapters.inference_norm,
        eps=settings.eps,
        stacking=settings.stacking,
        **maps,
    )


def merged_kernel(kernel: Array, adapters: Adapters, settings: LayerSettings, layout) -> Array:
    """``W' = m / ||W0 + s*A@B||_c * (W0 + s*A@B)`` in the kernel's dtype."""
    return ops.merge(
        kernel,
        adapters.lora_a,
        adapters.lora_b,
        adapters.magnitude,
        settings.scale,
        layout,
        eps=settings.eps,
    )


def inference_norm(
    kernel: Array, adapters: Adapters, settings: LayerSettings, layout: ops.Layout
) -> Array:
    """The whole DoRA norm ``||W0 + s*A@B||_c`` (shape of the magnitude)."""
    return ops.dora_norm(
        kernel,
        adapters.lora_a,
        adapters.lora_b,
        settings.scale,
        layout,
        base_norm_sq=adapters.base_norm_sq,
        eps=settings.eps,
    )


def _identity(v: Array) -> Array:
    return v


def kaiming_uniform(layout: ops.Layout) -> Initializer:
    """PEFT's ``A`` init: ``kaiming_uniform_(a=sqrt(5))``, i.e. U(+-1/sqrt(fan_in)).

    ``fan_in`` is the product of the kernel's input axes (not its batch axes).
    """
    n_batch, n_in = len(layout.batch_axes), len(layout.in_axes)
    return jax.nn.initializers.variance_scaling(
        1.0 / 3.0,
        "fan_in",
        "uniform",
        in_axis=tuple(range(n_batch, n_batch + n_in)),
        out_axis=-1,
        batch_axis=tuple(range(n_batch)),
    )


def default_inits(embedding: bool = False) -> tuple[Initializer | None, Initializer]:
    """PEFT's adapter initializers ``(A, B)``: Kaiming-uniform ``A`` (``None`` here,
    resolved per layout by :func:`kaiming_uniform`) and zero ``B``, so the adapted layer
    starts equal to the base; for embeddings zero ``A`` and normal ``B``."""
    if embedding:
        return jax.nn.initializers.zeros, jax.nn.initializers.normal(1.0)
    return None, jax.nn.initializers.zeros


# --------------------------------------------------------------------------------------
# Per-kind facts that need no framework.


def as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def normalize_axes(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
    return tuple(ax if ax >= 0 else ndim + ax for ax in axes)


def dense_general_output_shape(
    input_shape: Sequence[int], axis: Sequence[int], batch_dims: Sequence[int], features
) -> tuple[int, ...]:
    """The shape ``(*batch, *out)`` values take to broadcast against a DenseGeneral
    output ``(*batch, *other, *out)``: size 1 on the input's other (uncontracted) axes."""
    expanded = tuple(
        input_shape[ax] if ax in batch_dims else 1
        for ax in range(len(input_shape))
        if ax not in axis
    )
    return expanded + tuple(features)


@dataclasses.dataclass(frozen=True)
class EinsumPlan:
    """How an adapted einsum ``lhs,rhs->out`` with kernel ``rhs`` runs.

    ``A`` replaces the kernel's output axes by a rank axis ``r`` and ``B`` maps ``r`` to
    them: ``lora_a_equation = lhs,{batch}{in}r->{rest}r`` then
    ``lora_b_equation = {rest}r,{batch}r{out}->out``. ``(*batch, *out)`` values (the
    magnitude's shape) reach the output's axis order by ``transpose(perm)`` then
    ``reshape(broadcast)``; the bias has ``bias_shape``.
    """

    layout: ops.Layout
    equation: str
    lora_a_equation: str
    lora_b_equation: str
    perm: tuple[int, ...]
    broadcast: tuple[int, ...]
    bias_shape: tuple[int, ...]

    def to_output(self, v: Array) -> Array:
        return jnp.reshape(jnp.transpose(v, self.perm), self.broadcast)


def einsum_plan(equation: str, kernel_shape: Sequence[int]) -> EinsumPlan:
    """The :class:`EinsumPlan` of ``equation`` (spaces removed) for a kernel shape.

    >>> plan = einsum_plan("btd,dhk->bthk", (8, 2, 4))
    >>> plan.lora_a_equation, plan.lora_b_equation, plan.bias_shape
    ('btd,da->bta', 'bta,ahk->bthk', (2, 4))
    """
    equation = equation.replace(" ", "")
    layout = ops.einsum_layout(equation)
    operands, out = equation.split("->")
    lhs, rhs = operands.split(",")
    pick = lambda axes: "".join(rhs[a] for a in axes)  # noqa: E731
    batch, contracted, produced = (
        pick(a) for a in (layout.batch_axes, layout.in_axes, layout.out_axes)
    )
    r = next(c for c in string.ascii_letters if c not in equation)
    xa_out = "".join(c for c in out if c not in produced) + r
    return EinsumPlan(
        layout=layout,
        equation=equation,
        lora_a_equation=f"{lhs},{batch}{contracted}{r}->{xa_out}",
        lora_b_equation=f"{xa_out},{batch}{r}{produced}->{out}",
        perm=tuple((batch + produced).index(c) for c in out if c in batch + produced),
        broadcast=tuple(kernel_shape[rhs.index(c)] if c in rhs else 1 for c in out),
        bias_shape=tuple(kernel_shape[rhs.index(c)] for c in out if c in rhs),
    )


# --------------------------------------------------------------------------------------
# Nested dicts of arrays (variables in the Linen layout).


def has_leaf(tree: Any, name: str) -> bool:
    """Whether a nested dict holds a key ``name`` at any depth."""
    return isinstance(tree, Mapping) and any(
        k == name or has_leaf(v, name) for k, v in tree.items()
    )


def drop_leaves(tree: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A copy of a nested dict without the keys ``name``, at every depth."""
    return {
        k: drop_leaves(v, name) if isinstance(v, Mapping) else v
        for k, v in tree.items()
        if k != name
    }


def merge_trees(a: Mapping, b: Mapping) -> dict:
    """``a`` updated by ``b``, recursively (``b`` wins on leaves)."""
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------
# Many adapters of one frozen layer in one batch (dora_jax.linen.multi, dora_jax.nnx.multi).

STACK = "dora_stack"  # K adapters stacked on a leading axis, for mixed-batch inference
SCALES = "scales"  # (K,) the LoRA scaling of each stacked adapter


class AdapterStack(NamedTuple):
    """``K`` adapters of one layer stacked on a leading axis (inference only).

    ``lora_a (K, *batch, *in, R)``, ``lora_b (K, *batch, R, *out)`` with ``R`` the
    largest rank (lower ranks padded with zeros, which changes no product),
    ``magnitude (K, *batch, *out)``, ``scales (K,)``; ``inference_norm`` has the
    magnitude's shape: each adapter's ``||W0 + s_k*A_k@B_k||_c``, or ``None``.
    """

    lora_a: Array
    lora_b: Array
    magnitude: Array
    scales: Array
    inference_norm: Array | None = None


def stack_adapters(
    kernel: Array,
    layout: ops.Layout,
    adapters: Sequence[Adapters],
    settings: Sequence[LayerSettings],
    where: str,
) -> AdapterStack:
    """Stack one layer's adapters of ``K`` models and compute each one's norm, once.

    Every adapter must be DoRA (a magnitude) with the same ``eps``; ranks, ``alpha`` and
    rsLoRA may differ (each adapter keeps its own scaling). The norms depend on
    ``kernel`` and on these adapters: a stack is remade, not edited.

    Raises:
      ValueError: naming ``where``, the adapter's index and the shapes or settings.
    """
    for k, (adapter, setting) in enumerate(zip(adapters, settings, strict=True)):
        if adapter.magnitude is None or not setting.use_dora:
            raise ValueError(
                f"{where}: adapter {k} is plain LoRA (use_dora=False); a stack holds DoRA "
                f"adapters only."
            )
        ops.check_adapter_shapes(
            kernel.shape,
            layout,
            adapter.lora_a.shape,
            adapter.lora_b.shape,
            adapter.magnitude.shape,
            f"{where} (adapter {k})",
        )
    eps = {s.eps for s in settings}
    if len(eps) != 1:
        raise ValueError(f"{where}: stacked adapters need one eps; got {sorted(eps)}.")
    return _stacked_arrays(
        kernel,
        tuple(a.lora_a for a in adapters),
        tuple(a.lora_b for a in adapters),
        tuple(a.magnitude for a in adapters),
        tuple(a.base_norm_sq for a in adapters),
        layout=layout,
        scales=tuple(s.scale for s in settings),
        eps=settings[0].eps,
    )


@functools.partial(jax.jit, static_argnames=("layout", "scales", "eps"))
def _stacked_arrays(kernel, lora_a, lora_b, magnitude, base_norm_sq, *, layout, scales, eps):
    """:func:`stack_adapters`'s arrays, as one compiled program (not op by op)."""
    rank = max(a.shape[-1] for a in lora_a)
    n_batch = len(layout.batch_axes)

    def padded(value: Array, axis: int) -> Array:
        widths = [(0, 0)] * value.ndim
        widths[axis] = (0, rank - value.shape[axis])
        return jnp.pad(value, widths)

    dtype = jnp.result_type(*lora_a)
    norms = [
        ops.dora_norm(kernel, a, b, s, layout, base_norm_sq=n, eps=eps)
        for a, b, s, n in zip(lora_a, lora_b, scales, base_norm_sq, strict=True)
    ]
    return AdapterStack(
        lora_a=jnp.stack([padded(a, -1).astype(dtype) for a in lora_a]),
        lora_b=jnp.stack([padded(b, n_batch).astype(dtype) for b in lora_b]),
        magnitude=jnp.stack([m.astype(dtype) for m in magnitude]),
        scales=jnp.asarray(scales, jnp.float32),
        inference_norm=jnp.stack(norms),
    )


def stacked_output(
    x: Array,
    kernel: Array,
    layout: ops.Layout,
    stack: AdapterStack,
    adapter_ids: Array,
    eps: float,
    where: str,
    **maps,
) -> Array:
    """:func:`dora_jax.ops.stacked_adapter_forward` for one layer's stack; ``maps`` as
    for :func:`adapted_output`. Returns the output without bias."""
    num = stack.lora_a.shape[0]
    rank = stack.lora_a.shape[-1]
    want = tuple(layout.lora_shapes(kernel.shape, rank))
    got = tuple(tuple(v.shape[1:]) for v in stack[:3])
    if got != want or stack.magnitude.shape[0] != num or stack.scales.shape != (num,):
        raise ValueError(
            f"{where}: the adapter stack does not fit kernel {tuple(kernel.shape)}: expected "
            f"({num}, ...) stacks of lora_a, lora_b, magnitude {want} and scales ({num},); "
            f"got {tuple(tuple(v.shape) for v in stack[:4])}."
        )
    ops.check_adapter_ids(adapter_ids, num, jnp.shape(x)[0], where)
    maps.setdefault("to_output", _identity)
    maps.pop("dense_like", None)  # the norms are cached: nothing to stack with x
    return ops.stacked_adapter_forward(
        x,
        kernel,
        stack.lora_a,
        stack.lora_b,
        stack.magnitude,
        stack.scales,
        adapter_ids,
        layout=layout,
        norm=stack.inference_norm,
        eps=eps,
        **maps,
    )


def example_axis_problem(
    kind: str, *, equation: str | None = None, axis=(), batch_dims=()
) -> str | None:
    """Why a layer cannot route examples to adapters, or ``None`` if it can.

    The example axis (the input's leading axis) must lead the output and touch no
    kernel axis: for an einsum ``lhs,rhs->out``, ``lhs[0] == out[0]`` and not in
    ``rhs``; for DenseGeneral, no ``batch_dims`` and axis 0 not contracted.
    """
    if equation is not None:
        lhs, rhs = equation.replace(" ", "").split("->")[0].split(",")
        out = equation.split("->")[1].strip()
        if not lhs or not out or lhs[0] != out[0] or lhs[0] in rhs:
            return (
                f"{kind} {equation!r}: the input's leading (example) axis must lead the "
                f"output and not be a kernel axis"
            )
    if batch_dims or 0 in axis:
        return (
            f"{kind} with batch_dims={tuple(batch_dims)}, axis={tuple(axis)}: the input's "
            f"leading (example) axis must be neither a batch dimension nor contracted"
        )
    return None
