"""The DoRA math, once, as pure functions on arrays.

DoRA (Liu et al., ICML 2024) re-parameterises a frozen kernel ``W0`` as::

    W' = m * (W0 + s * A @ B) / ||W0 + s * A @ B||_c

where ``||.||_c`` is the L2 norm of each *output feature's* weight vector, ``m`` is a
trainable magnitude per output feature, ``A @ B`` is a LoRA update and ``s`` its scaling.

Every front end (Linen, NNX, model wrapping, merging, PEFT interchange) calls these
functions and never re-derives the math. Kernels are described by a :class:`Layout`
that says which axes are batch axes (kept), input axes (reduced by the norm) and output
axes (one magnitude each). LoRA factors are stored in canonical order::

    lora_a: (*batch, *in, r)      lora_b: (*batch, r, *out)      magnitude: (*batch, *out)

Three facts keep DoRA as cheap as LoRA:

* the norm is never taken of a materialised ``W0 + s*A@B``; it is expanded as
  ``||W0||^2 + 2s colsum(B * A^T W0) + s^2 colsum(B * (A^T A) B)``, so the only extra
  work is the ``(r, in) @ (in, out)`` product ``A^T W0``, and ``||W0||^2`` is cached;
* the norm is detached by default (the paper's constant-C gradient, section 4.3), so it
  adds nothing to the backward pass;
* for Dense layers with few tokens (on the CPU), ``x @ W0`` and ``A^T W0`` are one product of the
  stacked ``[x; A^T]`` with ``W0`` (:func:`kernel_products`), so ``W0`` is read once;
  except when ``x`` and ``W0`` are both constants of the traced function (closed over,
  not arguments): XLA then computes ``x @ W0`` at compile time, as it does for LoRA.
  When to stack is the :class:`Stacking` argument of :func:`adapter_forward`; its
  default reads :data:`DEFAULT_STACK_ROWS_PER_OUTPUT` for the backend.

On the CPU, the bfloat16 products of Dense layers (forward and gradients) are summed in
float32 explicitly (:func:`accumulated_product`, and :func:`low_rank_product` for the
LoRA branch, whose gradients avoid the slow product forms): the same numbers, at XLA's
bfloat16 rate.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

DEFAULT_EPS = 1e-6

# Stack A^T under x (one read of W0) while x has at most this many rows per output
# feature, per platform: the saved read of W0 (in x out) then outweighs copying x
# (rows x in) into the stacked operand. Measured on XLA's CPU backend: it pays up to
# about half as many rows as features. Elsewhere unmeasured (on a GPU the r extra rows
# may also cost a tile of the big product), so other platforms take the plain path.
# Read-only: a different choice is a :class:`Stacking` argument, not an edit here.
DEFAULT_STACK_ROWS_PER_OUTPUT = types.MappingProxyType({"cpu": 0.5})


def default_stack_rows(platform: str) -> float:
    """The rows per output feature up to which ``platform`` stacks by default
    (:data:`DEFAULT_STACK_ROWS_PER_OUTPUT`; 0, never, where unmeasured)."""
    return DEFAULT_STACK_ROWS_PER_OUTPUT.get(platform, 0.0)


@dataclasses.dataclass(frozen=True)
class Stacking:
    """When :func:`adapter_forward` computes ``x @ W0`` and ``A^T W0`` as one product.

    Only Dense-like maps (``x (..., in)`` times a kernel ``(in, out)``) with ``x`` in the
    kernel's dtype ever stack (:func:`kernel_products`); this says for which sizes.

    Attributes:
      rows_per_output: stack while ``x`` has at most this many rows (tokens) per output
        feature. ``None`` (the default): the backend's measured threshold,
        :func:`default_stack_rows` of ``jax.default_backend()`` (0.5 on the CPU, 0 on
        other backends, i.e. never). ``0``: never; ``math.inf``: always.
      constants: stack even when ``x`` and ``W0`` are both concrete arrays (closed over
        by a jitted function, not its arguments). Off by default: XLA then computes
        ``x @ W0`` once, at compile time, which stacking would prevent.

    >>> Stacking(rows_per_output=0.0)  # never stack
    Stacking(rows_per_output=0.0, constants=False)
    """

    rows_per_output: float | None = None
    constants: bool = False

    def __post_init__(self):
        rows = self.rows_per_output
        if rows is not None and (
            isinstance(rows, bool) or not isinstance(rows, numbers.Real) or not rows >= 0
        ):
            raise ValueError(
                f"Stacking: rows_per_output must be None (the backend's default) or a "
                f"number >= 0 (0 never stacks, math.inf always); got {rows!r}."
            )
        if not isinstance(self.constants, bool):
            raise ValueError(f"Stacking: constants must be a bool; got {self.constants!r}.")

    def limit(self) -> float:
        """Rows per output feature up to which to stack, on the current backend."""
        if self.rows_per_output is None:
            return default_stack_rows(jax.default_backend())
        return float(self.rows_per_output)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which axes of a kernel are batch, input and output axes.

    Attributes:
      batch_axes: axes kept apart, each index an independent matrix (a scanned layer
        axis, DenseGeneral's ``batch_dims``).
      in_axes: axes contracted with the input; the DoRA norm reduces them.
      out_axes: axes of output features; one magnitude per element.

    Together the three tuples hold every axis of the kernel exactly once.
    """

    batch_axes: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]

    def __post_init__(self):
        axes = (*self.batch_axes, *self.in_axes, *self.out_axes)
        if sorted(axes) != list(range(len(axes))) or not self.in_axes or not self.out_axes:
            raise ValueError(
                f"A kernel layout needs every axis exactly once and at least one input and "
                f"one output axis; got batch={self.batch_axes}, in={self.in_axes}, "
                f"out={self.out_axes}."
            )

    @property
    def ndim(self) -> int:
        return len(self.batch_axes) + len(self.in_axes) + len(self.out_axes)

    @property
    def canonical_order(self) -> tuple[int, ...]:
        """Kernel axes reordered to ``(*batch, *in, *out)``."""
        return (*self.batch_axes, *self.in_axes, *self.out_axes)

    def split(self, kernel_shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        """``(batch_shape, in_shape, out_shape)`` of a kernel of this layout."""
        kernel_shape = tuple(kernel_shape)
        if len(kernel_shape) != self.ndim:
            raise ValueError(
                f"kernel shape {kernel_shape} has {len(kernel_shape)} axes, but the layout "
                f"{self} describes {self.ndim}."
            )
        take = lambda axes: tuple(kernel_shape[a] for a in axes)  # noqa: E731
        return take(self.batch_axes), take(self.in_axes), take(self.out_axes)

    def fans(self, kernel_shape: Sequence[int]) -> tuple[int, int]:
        """``(fan_in, fan_out)``: the sizes of the input and output blocks."""
        _, in_shape, out_shape = self.split(kernel_shape)
        return math.prod(in_shape), math.prod(out_shape)

    def lora_shapes(self, kernel_shape: Sequence[int], rank: int):
        """Shapes of ``(lora_a, lora_b, magnitude)`` for a kernel of this layout."""
        batch, in_shape, out_shape = self.split(kernel_shape)
        return (*batch, *in_shape, rank), (*batch, rank, *out_shape), (*batch, *out_shape)


def dense_layout() -> Layout:
    """Dense / nnx.Linear kernel ``(in, out)``; also Embed's ``(vocab, features)``."""
    return Layout(batch_axes=(), in_axes=(0,), out_axes=(1,))


def dense_general_layout(n_batch: int, n_in: int, n_out: int) -> Layout:
    """DenseGeneral / nnx.LinearGeneral kernel ``(*batch, *in, *out)``."""
    axes = iter(range(n_batch + n_in + n_out))
    take = lambda n: tuple(next(axes) for _ in range(n))  # noqa: E731
    return Layout(batch_axes=take(n_batch), in_axes=take(n_in), out_axes=take(n_out))


def conv_layout(num_spatial: int) -> Layout:
    """Conv kernel ``(*window, in / groups, out)``: the norm reduces all but the last axis."""
    return Layout(batch_axes=(), in_axes=tuple(range(num_spatial + 1)), out_axes=(num_spatial + 1,))


def einsum_layout(equation: str) -> Layout:
    """Layout of the right-hand (kernel) operand of a two-operand einsum.

    Kernel axes that appear in the left operand but not in the output are contracted
    (input axes); those in the output and not in the left operand are output axes; those
    in both are batch axes.

    >>> einsum_layout("btd,dnh->btnh")
    Layout(batch_axes=(), in_axes=(0,), out_axes=(1, 2))
    """
    spec = equation.replace(" ", "")
    try:
        operands, out = spec.split("->")
        lhs, rhs = operands.split(",")
    except ValueError:
        raise ValueError(
            f"einsum_layout needs an explicit two-operand equation 'lhs,rhs->out'; "
            f"got {equation!r}."
        ) from None
    if "." in spec:
        raise ValueError(f"einsum_layout does not support ellipses; got {equation!r}.")
    batch = tuple(i for i, c in enumerate(rhs) if c in lhs and c in out)
    contracted = tuple(i for i, c in enumerate(rhs) if c in lhs and c not in out)
    produced = tuple(i for i, c in enumerate(rhs) if c not in lhs and c in out)
    if len(batch) + len(contracted) + len(produced) != len(rhs) or not contracted or not produced:
        raise ValueError(
            f"einsum {equation!r}: DoRA needs a kernel whose every axis is contracted with "
            f"the input or appears in the output, with at least one of each kind."
        )
    return Layout(batch_axes=batch, in_axes=contracted, out_axes=produced)


def scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    """LoRA scaling ``s``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def check_rank(rank: int, kernel_shape: Sequence[int], layout: Layout, where: str = "") -> None:
    """Raise ``ValueError`` unless ``1 <= rank <= min(fan_in, fan_out)``."""
    fan_in, fan_out = layout.fans(kernel_shape)
    if not isinstance(rank, (int, np.integer)) or not 1 <= rank <= min(fan_in, fan_out):
        raise ValueError(
            f"{_prefix(where)}rank must be an integer in [1, min(fan_in, fan_out)] = "
            f"[1, {min(fan_in, fan_out)}] for kernel {tuple(kernel_shape)} "
            f"(fan_in={fan_in}, fan_out={fan_out}); got {rank!r}."
        )


def check_kernel(kernel: Array, where: str = "") -> None:
    """Raise ``ValueError`` unless ``kernel`` has a floating dtype."""
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(
            f"{_prefix(where)}DoRA needs a floating-point kernel; got {kernel.dtype} "
            f"with shape {tuple(kernel.shape)}."
        )


def check_adapter_shapes(
    kernel_shape: Sequence[int],
    layout: Layout,
    lora_a_shape: Sequence[int],
    lora_b_shape: Sequence[int],
    magnitude_shape: Sequence[int] | None = None,
    where: str = "",
) -> int:
    """Check that adapters fit a kernel; return their rank.

    Raises:
      ValueError: naming ``where``, the kernel shape and the expected and actual
        adapter shapes.
    """
    lora_a_shape, lora_b_shape = tuple(lora_a_shape), tuple(lora_b_shape)
    rank = lora_a_shape[-1] if lora_a_shape else -1
    want_a, want_b, want_m = layout.lora_shapes(kernel_shape, rank)
    got = (lora_a_shape, lora_b_shape, magnitude_shape)
    want = (want_a, want_b, want_m if magnitude_shape is not None else None)
    if got != tuple(None if w is None else tuple(w) for w in want):
        raise ValueError(
            f"{_prefix(where)}adapters do not fit kernel {tuple(kernel_shape)}: expected "
            f"lora_a {want_a}, lora_b {want_b}"
            + (f", magnitude {want_m}" if magnitude_shape is not None else "")
            + f"; got lora_a {lora_a_shape}, lora_b {lora_b_shape}"
            + (f", magnitude {tuple(magnitude_shape)}" if magnitude_shape is not None else "")
            + "."
        )
    return rank


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _as_matrices(kernel: Array, layout: Layout) -> Array:
    """View a kernel as a stack of matrices ``(batch, in, out)`` (canonical order)."""
    batch, in_shape, out_shape = layout.split(kernel.shape)
    kernel = jnp.transpose(kernel, layout.canonical_order)
    return kernel.reshape(math.prod(batch), math.prod(in_shape), math.prod(out_shape))


def _factors_as_matrices(lora_a: Array, lora_b: Array, layout: Layout):
    n_batch = len(layout.batch_axes)
    batch = lora_a.shape[:n_batch]
    rank = lora_a.shape[-1]
    a = lora_a.reshape(math.prod(batch), -1, rank)
    b = lora_b.reshape(math.prod(batch), rank, -1)
    return a, b


def _per_feature(values: Array, kernel_shape: Sequence[int], layout: Layout) -> Array:
    """Reshape ``(batch, out)`` values to the magnitude shape ``(*batch, *out)``."""
    batch, _, out_shape = layout.split(kernel_shape)
    return values.reshape(*batch, *out_shape)


def column_norm_sq(kernel: Array, layout: Layout) -> Array:
    """Squared L2 norm of every output feature's weights, in float32.

    Args:
      kernel: any layout, e.g. Dense ``(in, out)``.
    Returns:
      ``(*batch, *out)``; for Dense ``(out,)``, reducing axis 0.
    """
    w = _as_matrices(kernel, layout).astype(jnp.float32)
    return _per_feature(jnp.sum(w * w, axis=1), kernel.shape, layout)


def safe_sqrt(norm_sq: Array, eps: float = DEFAULT_EPS) -> Array:
    """``sqrt(max(norm_sq, eps^2))``.

    Rounding can make a factored ``norm_sq`` slightly negative, and an all-zero output
    feature has norm 0, where PEFT divides by zero. The floor keeps every value, and the
    gradient of the square root, finite, while norms above ``eps`` are untouched.
    """
    return jnp.sqrt(jnp.maximum(norm_sq, eps * eps))


def column_norm(kernel: Array, layout: Layout, eps: float = 0.0) -> Array:
    """L2 norm of every output feature's weights ``(*batch, *out)``, in float32."""
    return safe_sqrt(column_norm_sq(kernel, layout), eps)


def lora_delta(lora_a: Array, lora_b: Array, layout: Layout) -> Array:
    """The LoRA update ``A @ B`` as a kernel of ``layout`` (float32).

    Materialises an ``in x out`` array: for merging and tests, never a training step.
    """
    a, b = _factors_as_matrices(lora_a, lora_b, layout)
    delta = jnp.einsum("bir,bro->bio", a.astype(jnp.float32), b.astype(jnp.float32))
    n_batch = len(layout.batch_axes)
    batch, in_shape = lora_a.shape[:n_batch], lora_a.shape[n_batch:-1]
    out_shape = lora_b.shape[n_batch + 1 :]
    canonical = delta.reshape(*batch, *in_shape, *out_shape)
    return jnp.transpose(canonical, np.argsort(layout.canonical_order))


def dora_norm(
    kernel: Array,
    lora_a: Array,
    lora_b: Array,
    scale: float,
    layout: Layout,
    *,
    base_norm_sq: Array | None = None,
    a_t_w: Array | None = None,
    eps: float = DEFAULT_EPS,
) -> Array:
    """``||W0 + s*A@B||_c`` without forming ``W0 + s*A@B``, in float32.

    Uses ``||W0||^2 + 2s colsum(B * A^T W0) + s^2 colsum(B * (A^T A) B)``: the only
    product touching the kernel is ``A^T W0`` of shape ``(r, out)``.

    Args:
      kernel: ``W0`` in ``layout``, e.g. ``(in, out)``.
      lora_a: ``(*batch, *in, r)``.
      lora_b: ``(*batch, r, *out)``.
      scale: the LoRA scaling ``s``.
      layout: the kernel's :class:`Layout`.
      base_norm_sq: cached ``column_norm_sq(kernel, layout)``; computed if ``None``.
      a_t_w: ``A^T W0`` if already computed (``(*batch, r, *out)``).
      eps: floor of the norm (see :func:`safe_sqrt`).
    Returns:
      ``(*batch, *out)`` float32.
    """
    w = _as_matrices(kernel, layout)
    a, b = _factors_as_matrices(lora_a, lora_b, layout)
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    # A^T W0 reads the kernel in its own dtype with float32 accumulation: casting a
    # bfloat16 W0 to float32 first would allocate a full-size copy of it.
    if a_t_w is None and w.shape[0] == 1 and jax.default_backend() == "cpu":
        # A^T as a row-major operand: XLA's CPU backend would contract W0 over its rows
        # in float32, converting the whole kernel first (a copy LoRA never makes).
        a_t = _transposed(a[0].astype(w.dtype))
        a_t_w = jnp.dot(a_t, w[0], preferred_element_type=jnp.float32)[None]
    elif a_t_w is None:
        a_t_w = jnp.einsum("bir,bio->bro", a.astype(w.dtype), w, preferred_element_type=jnp.float32)
    else:
        a_t_w = a_t_w.reshape(a.shape[0], a.shape[2], -1).astype(jnp.float32)
    a_t_a = jnp.einsum("bir,bis->brs", a, a)
    cross = jnp.sum(b * a_t_w, axis=1)
    quad = jnp.sum(b * jnp.einsum("brs,bso->bro", a_t_a, b), axis=1)
    if base_norm_sq is None:
        base_norm_sq = column_norm_sq(kernel, layout)
    base = base_norm_sq.reshape(cross.shape).astype(jnp.float32)
    norm_sq = base + 2.0 * scale * cross + scale * scale * quad
    return _per_feature(safe_sqrt(norm_sq, eps), kernel.shape, layout)


def init_magnitude(
    kernel: Array, lora_a: Array, lora_b: Array, scale: float, layout: Layout
) -> Array:
    """PEFT's magnitude initialisation: ``m = ||W0 + s*A@B||_c`` from the current factors.

    With ``B = 0`` (the default init) this is ``||W0||_c``, so ``W' == W0``. Computed
    exactly from the materialised weight, once, outside any training step.
    """
    merged = kernel.astype(jnp.float32) + scale * lora_delta(lora_a, lora_b, layout)
    return column_norm(merged, layout)


def magnitude_scale(magnitude: Array, norm: Array, detach_norm: bool = True) -> Array:
    """``g = m / ||V||_c`` in float32; with ``detach_norm`` the norm is a constant.

    Detaching is the paper's constant-C gradient (section 4.3) and PEFT's behaviour:
    ``grad_V L = (m / C) grad_W' L`` instead of the projected gradient.
    """
    if detach_norm:
        norm = jax.lax.stop_gradient(norm)
    return magnitude.astype(jnp.float32) / norm


def adapted_layer_output(
    base_out: Array,
    lora_out: Array,
    scale: float,
    g: Array | None,
    *,
    base_out_dropped: Array | None = None,
) -> Array:
    """Combine the frozen path and the LoRA path into the layer output (without bias).

    Args:
      base_out: ``x @ W0``, shape ``(..., *out)``.
      lora_out: ``(xd @ A) @ B`` for the (possibly dropped-out) input ``xd``.
      scale: LoRA scaling ``s``.
      g: ``m / ||V||_c`` broadcastable to ``base_out``, or ``None`` for plain LoRA.
      base_out_dropped: ``xd @ W0`` when dropout is active (training with p > 0).
    Returns:
      ``g * (x@W0 + s*lora)``; with dropout PEFT's
      ``x@W0 + (g - 1) * (xd@W0) + g*s*lora``, so the frozen path sees the clean input
      and only the correction and the LoRA branch see the dropped one. The result has
      ``base_out``'s dtype; ``g`` multiplies in float32.
    """
    dtype = base_out.dtype
    lora_out = scale * lora_out.astype(jnp.float32)
    if g is None:
        return (base_out + lora_out).astype(dtype)
    if base_out_dropped is None:
        return (g * (base_out.astype(jnp.float32) + lora_out)).astype(dtype)
    correction = (g - 1.0) * base_out_dropped.astype(jnp.float32) + g * lora_out
    return (base_out.astype(jnp.float32) + correction).astype(dtype)


def merge(
    kernel: Array,
    lora_a: Array,
    lora_b: Array,
    magnitude: Array | None,
    scale: float,
    layout: Layout,
    *,
    eps: float = DEFAULT_EPS,
) -> Array:
    """Fold adapters into a plain kernel: ``W' = g * (W0 + s*A@B)``.

    Computed in float32 and cast once to the kernel's dtype. ``magnitude=None`` merges
    plain LoRA (``W0 + s*A@B``).
    """
    merged = kernel.astype(jnp.float32) + scale * lora_delta(lora_a, lora_b, layout)
    if magnitude is not None:
        g = magnitude.astype(jnp.float32) / column_norm(merged, layout, eps)
        merged = merged * _broadcast_per_feature(g, layout)
    return merged.astype(kernel.dtype)


def _broadcast_per_feature(values: Array, layout: Layout) -> Array:
    """Insert size-1 input axes so ``(*batch, *out)`` values broadcast against a kernel."""
    canonical = values.reshape(
        values.shape[: len(layout.batch_axes)]
        + (1,) * len(layout.in_axes)
        + values.shape[len(layout.batch_axes) :]
    )
    return jnp.transpose(canonical, np.argsort(layout.canonical_order))


def adapter_forward(
    x: Array,
    kernel: Array,
    lora_a: Array,
    lora_b: Array,
    magnitude: Array | None,
    *,
    apply_kernel: Callable[[Array, Array], Array],
    apply_lora_b: Callable[[Array, Array], Array],
    to_output: Callable[[Array], Array],
    layout: Layout,
    apply_lora_a: Callable[[Array, Array], Array] | None = None,
    dense_like: bool = False,
    scale: float,
    x_dropped: Array | None = None,
    detach_norm: bool = True,
    base_norm_sq: Array | None = None,
    norm: Array | None = None,
    eps: float = DEFAULT_EPS,
    stacking: Stacking = Stacking(),
) -> Array:
    """The adapted layer's output without bias, for any linear layer.

    The layer supplies its own linear map, so one function serves Dense, DenseGeneral,
    Einsum, Conv and Embed.

    Args:
      x: the layer input.
      kernel: frozen ``W0``.
      lora_a, lora_b, magnitude: adapters in canonical order (``magnitude=None``: LoRA).
      apply_kernel: ``(x, k) -> y`` the layer's linear map, e.g. ``x @ k``; applied to
        ``W0``, and to ``A`` unless ``apply_lora_a`` is given.
      apply_lora_b: ``(x @ A, B) -> lora_out`` contracting the rank axis.
      to_output: reshapes ``(*batch, *out)`` values to broadcast against the output.
      layout, scale: the kernel's :class:`Layout` and the LoRA scaling.
      apply_lora_a: ``(x, A) -> x @ A`` when ``A`` needs another map than ``W0``.
      dense_like: the map is Flax's plain product of ``x``'s last axis with a kernel
        ``(in, out)`` (default ``dot_general`` and ``promote_dtype``), so ``x @ W0`` and
        ``A^T W0`` may share one read of ``W0`` (:func:`kernel_products`) when
        ``stacking`` says so, and on the CPU its bfloat16 products run as
        :func:`accumulated_product` (reverse-mode differentiable only).
      x_dropped: the dropped-out input in training with dropout, else ``None``.
      detach_norm: constant-C gradient (default) or the exact gradient.
      base_norm_sq: cached ``||W0||_c^2`` (see :func:`column_norm_sq`).
      norm: the whole norm ``||W0 + s*A@B||_c`` cached for inference, or ``None``.
      eps: norm floor.
      stacking: when a ``dense_like`` map stacks (:class:`Stacking`; the default is
        the backend's measured threshold, never with ``x`` and ``kernel`` both concrete).
    Returns:
      ``y - bias`` of the adapted layer (see :func:`adapted_layer_output`).
    """
    lead, on_cpu = None, dense_like and jax.default_backend() == "cpu"
    if on_cpu and x.ndim > 2:
        # One row per token (a free reshape). Over (batch, tokens) XLA's CPU backend
        # copies dy transposed for B's gradient, and with one sequence reduces the
        # magnitude's gradient over a middle axis, ten times slower than over rows.
        # Elsewhere unmeasured, and merging a sequence-sharded axis would reshard x.
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        x_dropped = None if x_dropped is None else x_dropped.reshape(x.shape)
    layer_map = apply_kernel
    if on_cpu:
        apply_kernel, apply_lora_b = _accumulating(layer_map), _accumulating(apply_lora_b)
    a_t_w = None
    if (
        magnitude is not None
        and norm is None
        and _stacking_pays(stacking, dense_like, x, lora_a, kernel)
    ):
        # With the norm detached A gets no gradient through A^T W0: say so, or the
        # backward pass would multiply a zero cotangent by W0^T.
        a_for_norm = jax.lax.stop_gradient(lora_a) if detach_norm else lora_a
        # On the CPU A^T W0 keeps its float32 sums, as unstacked; x @ W0 is rounded.
        stacked = _accumulating(layer_map, rounded=False) if on_cpu else apply_kernel
        base_out, a_t_w = kernel_products(stacked, x, a_for_norm, kernel)
        if on_cpu:
            base_out = base_out.astype(jax.eval_shape(layer_map, x, kernel).dtype)
    else:
        base_out = apply_kernel(x, kernel)
    xd = x if x_dropped is None else x_dropped
    low_rank = on_cpu and lora_a.ndim == 2 and _bfloat16_product(layer_map, xd, lora_a)
    if low_rank:
        x_bf16 = xd.astype(jnp.bfloat16)
        lora_out = low_rank_product(x_bf16, lora_a, lora_b)
    else:
        lora_out = apply_lora_b((apply_lora_a or apply_kernel)(xd, lora_a), lora_b)
    g = None
    if magnitude is not None:
        if norm is None:
            norm = dora_norm(
                kernel,
                lora_a,
                lora_b,
                scale,
                layout,
                base_norm_sq=base_norm_sq,
                a_t_w=a_t_w,
                eps=eps,
            )
        g = to_output(magnitude_scale(magnitude, norm, detach_norm))
    base_out_dropped = None
    if x_dropped is not None and g is not None:
        base_out_dropped = apply_kernel(x_dropped, kernel)
    # base_out in bfloat16 on this path means x @ W0 ran as accumulated_product.
    if (
        low_rank
        and g is not None
        and x_dropped is None
        and x.ndim == 2
        and base_out.dtype == jnp.bfloat16
        and g.size == base_out.shape[-1]
    ):
        inputs = (x_bf16, kernel, lora_a, lora_b)
        y = rounded_dora_output(scale, g.reshape(-1), base_out, lora_out, inputs)
    else:
        y = adapted_layer_output(base_out, lora_out, scale, g, base_out_dropped=base_out_dropped)
    return y if lead is None else y.reshape(*lead, y.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def rounded_dora_output(
    scale: float, g: Array, base_out: Array, lora_out: Array, inputs: tuple[Array, ...]
) -> Array:
    """:func:`adapted_layer_output` ``g * (x@W0 + s*lora)`` (no dropout) of the CPU's
    bfloat16 Dense-like path: ``g (out,)`` float32, ``base_out`` and ``lora_out``
    ``(rows, out)`` bfloat16, and ``inputs = (x (rows, in), W0, A, B)`` that made them
    (bfloat16 products summed in float32 and rounded, as :func:`accumulated_product` and
    :func:`low_rank_product`). Returns ``y (rows, out)`` bfloat16.

    The backward pass takes ``g``'s gradient ``sum_rows(dy * z)``, ``z = x@W0 + s*lora``,
    from the rounded output as ``sum_rows(dy * y) / g`` (the product rounded to bfloat16,
    summed in float32), so only ``y`` is kept for it, in bfloat16: from ``z`` XLA's CPU
    backend keeps every layer's ``z`` in float32 from the forward pass to the backward
    pass and converts both operands first (8% of a Llama training step). ``y``'s
    rounding enters the sum: against float64 the gradient's error grows from about
    2.5e-3 to 3e-3 (PEFT's bfloat16 layer: 2.2e-3 to 3.9e-3; ``docs/benchmarks.md``
    section 8). Where a magnitude is zero ``y`` is zero and says nothing of ``z``: if
    any is, ``z`` is recomputed from ``inputs`` (two more products, only then).
    """
    return _scaled_sum(scale, g, base_out, lora_out)


def _scaled_sum(scale, g, base_out, lora_out):
    z = base_out.astype(jnp.float32) + scale * lora_out.astype(jnp.float32)
    return (g * z).astype(base_out.dtype)


def _rounded_dora_forward(scale, g, base_out, lora_out, inputs):
    y = _scaled_sum(scale, g, base_out, lora_out)
    return y, (g, y, inputs)


def _rounded_dora_backward(scale, residuals, dy):
    g, y, inputs = residuals

    def from_output():
        # A product with a row of ones: XLA's CPU backend sums bfloat16 rows in float32
        # without converting them first.
        ones = jnp.ones((1, dy.shape[0]), dy.dtype)
        sums = jnp.dot(ones, dy * y, preferred_element_type=jnp.float32)[0]
        return sums / jnp.where(g == 0, 1.0, g)

    def recomputed():
        x, kernel, lora_a, lora_b = inputs
        base = accumulated_product(x, kernel.astype(x.dtype)).astype(x.dtype)
        lora = low_rank_product(x, lora_a, lora_b).astype(jnp.float32)
        z = base.astype(jnp.float32) + scale * lora
        return jnp.sum(dy.astype(jnp.float32) * z, axis=0)

    d_g = jax.lax.cond(jnp.any(g == 0), recomputed, from_output)
    d_z = g * dy.astype(jnp.float32)
    zeros = jax.tree.map(jnp.zeros_like, inputs)
    return d_g.astype(g.dtype), d_z.astype(y.dtype), (scale * d_z).astype(y.dtype), zeros


rounded_dora_output.defvjp(_rounded_dora_forward, _rounded_dora_backward)


def _stacking_pays(
    stacking: Stacking, dense_like: bool, x: Array, lora_a: Array, kernel: Array
) -> bool:
    if not isinstance(stacking, Stacking):
        raise TypeError(f"adapter_forward: stacking must be an ops.Stacking; got {stacking!r}.")
    if not dense_like or kernel.ndim != 2 or lora_a.ndim != 2:
        return False
    concrete = not isinstance(x, jax.core.Tracer) and not isinstance(kernel, jax.core.Tracer)
    if concrete and not stacking.constants:
        # Both closed over by a jitted function (not its arguments): x @ W0 is then a
        # constant that XLA computes once, at compile time. Stacking A^T under x would
        # make it depend on A and cost the product in every step.
        return False
    rows = math.prod(x.shape[:-1])
    # The stacked product runs in the layer's own dtype; with a bfloat16 layer on the CPU
    # (accumulated products) A^T W0 keeps its float32 sums, as on the unstacked path.
    return x.dtype == kernel.dtype and rows <= stacking.limit() * kernel.shape[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def kernel_products(
    apply_kernel: Callable[[Array, Array], Array], x: Array, lora_a: Array, kernel: Array
) -> tuple[Array, Array]:
    """``(x @ W0, A^T @ W0)`` as one product ``concat([x, A^T]) @ W0``: ``W0`` read once.

    For Dense-like maps (``x (..., in)``, ``lora_a (in, r)``, kernel ``(in, out)``). The
    backward pass is the exact one, written block by block, so that with a frozen
    kernel and a detached norm only ``dy @ W0^T`` remains (plain autodiff through the
    concatenation would also multiply ``r`` zero rows by ``W0^T``).
    """
    rows = x.reshape(-1, x.shape[-1])
    stacked = apply_kernel(jnp.concatenate([rows, lora_a.T.astype(rows.dtype)]), kernel)
    base = stacked[: rows.shape[0]].reshape(*x.shape[:-1], stacked.shape[-1])
    return base, stacked[rows.shape[0] :]


def _kernel_products_fwd(apply_kernel, x, lora_a, kernel):
    return kernel_products(apply_kernel, x, lora_a, kernel), (x, lora_a, kernel)


def _kernel_products_bwd(apply_kernel, residuals, cotangents):
    x, lora_a, kernel = residuals
    d_base, d_a_t_w = cotangents
    _, base_vjp = jax.vjp(apply_kernel, x, kernel)
    d_x, d_kernel = base_vjp(d_base)
    a_t_w, a_t_w_vjp = jax.vjp(apply_kernel, lora_a.T.astype(x.dtype), kernel)
    d_a_t, d_kernel_a = a_t_w_vjp(d_a_t_w.astype(a_t_w.dtype))
    return d_x, d_a_t.T.astype(lora_a.dtype), d_kernel + d_kernel_a


kernel_products.defvjp(_kernel_products_fwd, _kernel_products_bwd)


def _accumulating(
    apply: Callable[[Array, Array], Array], *, rounded: bool = True
) -> Callable[[Array, Array], Array]:
    """A Dense-like map whose bfloat16 products are :func:`accumulated_product`, rounded
    to bfloat16 as the layer's own (or, ``rounded=False``, their float32 sums).

    XLA's CPU backend multiplies bfloat16 at its bfloat16 rate (about twice float32's where
    the CPU has bfloat16 dot instructions) only when the product is asked for float32
    output; a bfloat16 product, and the mixed float32 x bfloat16 one JAX's gradient of
    ``preferred_element_type`` makes, are converted to float32 first. Products the layer
    computes in another dtype keep the layer's own map.
    """

    def product(x: Array, k: Array) -> Array:
        if not _bfloat16_product(apply, x, k):
            return apply(x, k)
        total = accumulated_product(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
        return total.astype(jnp.bfloat16) if rounded else total

    return product


def _bfloat16_product(layer_map: Callable[[Array, Array], Array], x: Array, k: Array) -> bool:
    """Whether the layer multiplies ``x`` and ``k`` into bfloat16 (its dtype and
    ``preferred_element_type`` say so): the products the CPU path replaces."""
    return jax.eval_shape(layer_map, x, k).dtype == jnp.bfloat16


@jax.custom_vjp
def low_rank_product(x: Array, lora_a: Array, lora_b: Array) -> Array:
    """``(x @ A) @ B`` for the inputs ``x (..., in)`` of a Dense-like layer on the CPU,
    in ``x``'s dtype (bfloat16 or float32): each product summed in float32 and rounded
    to that dtype, as the layer's own two products, with ``lora_a (in, r)`` and
    ``lora_b (r, out)`` cast to it. Returns ``(..., out)``; gradients for all three, of
    the same numbers as the layer's own (``A`` and ``B``'s rounded to ``x``'s dtype,
    returned in their own), reverse mode only.

    Written out because XLA's CPU backend multiplies at its fast rate only two
    row-major operands contracted over the left one's last axis (or both last axes).
    Autodiff gives ``A`` and ``B`` the gradients ``x^T dh`` and ``h^T dy``, which
    contract the rows and run element by element in float32, ten times slower;
    here they are ``(dh^T) x`` and ``(h^T) dy`` from row-major transposes
    (:func:`_transposed`)."""
    return _low_rank_forward(x, lora_a, lora_b)[0]


def _low_rank_forward(x, lora_a, lora_b):
    rows = x.reshape(-1, x.shape[-1])
    a, b = lora_a.astype(x.dtype), lora_b.astype(x.dtype)
    h = jnp.dot(rows, a, preferred_element_type=jnp.float32).astype(x.dtype)
    out = jnp.dot(h, b, preferred_element_type=jnp.float32).astype(x.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1]), (x, lora_a, lora_b, h)


def _low_rank_backward(residuals, d_out):
    x, lora_a, lora_b, h = residuals
    rows, dy = x.reshape(-1, x.shape[-1]), d_out.reshape(-1, d_out.shape[-1]).astype(x.dtype)
    a, b = lora_a.astype(x.dtype), lora_b.astype(x.dtype)
    d_h = _dot_rows(dy, b).astype(x.dtype)  # dy @ B^T
    d_x = _dot_rows(d_h, a).astype(x.dtype)  # dh @ A^T
    d_a = jnp.dot(_transposed(d_h), rows, preferred_element_type=jnp.float32)  # (r, in)
    d_b = jnp.dot(_transposed(h), dy, preferred_element_type=jnp.float32)  # (r, out)
    # Rounded to x's dtype first, as the gradient of the layer's cast of A and B.
    d_a = d_a.astype(x.dtype).T.astype(lora_a.dtype)
    return d_x.reshape(x.shape), d_a, d_b.astype(x.dtype).astype(lora_b.dtype)


low_rank_product.defvjp(_low_rank_forward, _low_rank_backward)


def _dot_rows(u: Array, v: Array, sums=jnp.float32) -> Array:
    """``u @ v^T`` of ``u (n, k)`` and ``v (m, k)``, summed in ``sums``: ``(n, m)``."""
    return jax.lax.dot_general(u, v, (((1,), (1,)), ((), ())), preferred_element_type=sums)


def _transposed(u: Array) -> Array:
    """``u^T`` of ``u (n, r)``, materialised row-major, as the product ``I_r u^T``
    (exact: one nonzero term per sum). XLA would fold a plain transpose into the
    product that uses it, which then contracts over rows, the slow form."""
    eye = jnp.eye(u.shape[1], dtype=u.dtype)
    # Summed in float32, or the operand's own dtype where wider (float64 stays exact).
    return _dot_rows(eye, u, jnp.promote_types(u.dtype, jnp.float32)).astype(u.dtype)


@jax.custom_vjp
def accumulated_product(x: Array, kernel: Array) -> Array:
    """``x @ kernel`` of bfloat16 ``x (..., in)`` and ``kernel (in, out)``, summed in
    float32: rounded to bfloat16, the numbers of XLA's bfloat16 product. The gradients
    ``dy @ kernel^T`` and ``x^T @ dy`` are such products too (bfloat16, from ``dy``
    rounded to bfloat16: exact when ``dy`` is the gradient of the rounded product)."""
    return jnp.dot(x, kernel, preferred_element_type=jnp.float32)


def _accumulated_product_fwd(x, kernel):
    return accumulated_product(x, kernel), (x, kernel)


def _accumulated_product_bwd(residuals, dy):
    x, kernel = residuals
    dy = dy.astype(x.dtype)
    last = (((dy.ndim - 1,), (1,)), ((), ()))
    d_x = jax.lax.dot_general(dy, kernel, last, preferred_element_type=jnp.float32)
    rows, d_rows = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    # Contracted over rows directly: XLA's CPU backend converts an explicitly transposed
    # bfloat16 operand to float32 first (27 ms against 23 for 512 x 1024 x 4096).
    over_rows = (((0,), (0,)), ((), ()))
    d_kernel = jax.lax.dot_general(rows, d_rows, over_rows, preferred_element_type=jnp.float32)
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


accumulated_product.defvjp(_accumulated_product_fwd, _accumulated_product_bwd)


def embed_attend(
    query: Array,
    embedding: Array,
    lora_a: Array,
    lora_b: Array,
    magnitude: Array | None,
    scale: float,
    *,
    detach_norm: bool = True,
    base_norm_sq: Array | None = None,
    norm: Array | None = None,
    eps: float = DEFAULT_EPS,
) -> Array:
    """``query @ W'.T`` for an adapted embedding table (tied output embeddings).

    ``W' = g * (E + s*A@B)`` with ``g`` per feature, so
    ``query @ W'.T = (g*query) @ E.T + s * ((g*query) @ B.T) @ A.T``: no ``W'`` formed.

    Args:
      query: ``(..., features)``.
      embedding: ``E (vocab, features)``; ``lora_a (vocab, r)``; ``lora_b (r, features)``.
    Returns:
      ``(..., vocab)`` logits.
    """
    dtype = jnp.promote_types(query.dtype, embedding.dtype)
    query = query.astype(dtype)
    if magnitude is not None:
        if norm is None:
            layout = dense_layout()
            norm = dora_norm(
                embedding, lora_a, lora_b, scale, layout, base_norm_sq=base_norm_sq, eps=eps
            )
        query = (query * magnitude_scale(magnitude, norm, detach_norm)).astype(dtype)
    lora = (query @ lora_b.T.astype(dtype)) @ lora_a.T.astype(dtype)
    return query @ embedding.T.astype(dtype) + scale * lora


# --------------------------------------------------------------------------------------
# Many adapters of one frozen kernel in one batch.

# stacked_adapter_forward gathers each example's factors from this many output positions
# (tokens) per example, and masks the product with all K factors below it. Measured on
# XLA's CPU backend (benchmarks/mixed_batch.py, K = 8, rank 16): masking is faster at 1
# and 4 tokens per example, gathering at 16. A different choice is its `routing`.
GATHER_MIN_POSITIONS = 8


def stacked_norms(
    kernel: Array,
    lora_a: Array,
    lora_b: Array,
    scales: Array,
    layout: Layout,
    *,
    base_norm_sq: Array | None = None,
    eps: float = DEFAULT_EPS,
) -> Array:
    """Each of ``K`` adapters' whole norm ``||W0 + s_k*A_k@B_k||_c`` (:func:`dora_norm`).

    Args:
      kernel: ``W0`` in ``layout``, shared by every adapter.
      lora_a: ``(K, *batch, *in, r)``; lora_b: ``(K, *batch, r, *out)``; adapters of a
        lower rank padded with zero columns of ``A`` and zero rows of ``B`` (exact).
      scales: ``(K,)`` LoRA scalings.
      base_norm_sq: cached ``||W0||_c^2``; computed once here if ``None``.
    Returns:
      ``(K, *batch, *out)`` float32.
    """
    if base_norm_sq is None:
        base_norm_sq = column_norm_sq(kernel, layout)

    def one(a, b, s):
        return dora_norm(kernel, a, b, s, layout, base_norm_sq=base_norm_sq, eps=eps)

    return jax.vmap(one)(lora_a, lora_b, jnp.asarray(scales, jnp.float32))


def check_adapter_ids(
    adapter_ids, num_adapters: int, num_rows: int | None, where: str = ""
) -> None:
    """Refuse adapter ids that are not ``(num_rows,)`` integers in ``[-1, num_adapters)``
    (any length when ``num_rows`` is ``None``).

    Shapes and dtypes are always checked; values only when ``adapter_ids`` is concrete
    (under ``jit`` they are unknown: :func:`stacked_adapter_forward` then gives the rows
    of out-of-range ids NaN).
    """
    if not isinstance(adapter_ids, jax.Array | np.ndarray):
        adapter_ids = np.asarray(adapter_ids)  # a list of ints, say
    shape, dtype = tuple(adapter_ids.shape), adapter_ids.dtype
    rows = shape[0] if num_rows is None and len(shape) == 1 else num_rows
    if shape != (rows,) or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"{_prefix(where)}adapter_ids must be integers of shape "
            f"({'batch' if rows is None else rows},), one per "
            f"example of the batch (the input's leading axis); got {dtype} {shape}."
        )
    if isinstance(adapter_ids, jax.core.Tracer):
        return
    ids = np.asarray(adapter_ids)
    bad = ids[(ids < -1) | (ids >= num_adapters)]
    if bad.size:
        raise ValueError(
            f"{_prefix(where)}adapter_ids must be in [-1, {num_adapters}) (-1: the base "
            f"model; {num_adapters} adapters stacked); got {sorted(set(bad.tolist()))}."
        )


def stacked_adapter_forward(
    x: Array,
    kernel: Array,
    lora_a: Array,
    lora_b: Array,
    magnitude: Array,
    scales: Array,
    adapter_ids: Array,
    *,
    apply_kernel: Callable[[Array, Array], Array],
    apply_lora_b: Callable[[Array, Array], Array],
    to_output: Callable[[Array], Array],
    layout: Layout,
    apply_lora_a: Callable[[Array, Array], Array] | None = None,
    norm: Array | None = None,
    base_norm_sq: Array | None = None,
    eps: float = DEFAULT_EPS,
    routing: str | None = None,
) -> Array:
    """The output without bias of a batch whose example ``i`` runs adapter ``adapter_ids[i]``.

    Example ``i`` (the input's leading axis) gets
    ``g_k * (x_i @ W0 + s_k * (x_i @ A_k) @ B_k)`` with ``k = adapter_ids[i]`` and
    ``g_k = m_k / ||W0 + s_k*A_k@B_k||_c``; ``k = -1`` gives the frozen ``x_i @ W0``
    exactly. ``x @ W0`` is one product for the whole batch, and no merged kernel is
    formed. The low-rank products are routed one of two ways:

    * ``"gather"``: each example's ``A_k`` and ``B_k`` are gathered and its products
      run batched over the examples: the flops of one adapter, independent of ``K``,
      but ``A`` and ``B`` are read once per example;
    * ``"mask"``: ``x @ [A_1 .. A_K]`` (rank ``K*r``), the other adapters' columns of
      each example zeroed, then one product with ``[B_1; ..; B_K]``: every factor read
      once, ``K`` times the low-rank flops: cheaper for few positions per example
      (decoding), where reading the factors costs more than the products.

    ``routing=None`` gathers from :data:`GATHER_MIN_POSITIONS` output positions (tokens)
    per example and masks below; both give the same numbers.

    Args:
      x: ``(batch, ...)`` the layer input; its leading axis is the example axis.
      kernel: frozen ``W0``.
      lora_a, lora_b, magnitude: ``K`` adapters stacked on a leading axis:
        ``(K, *batch, *in, r)``, ``(K, *batch, r, *out)``, ``(K, *batch, *out)``.
      scales: ``(K,)`` LoRA scalings.
      adapter_ids: ``(batch,)`` integers in ``[-1, K)`` (see :func:`check_adapter_ids`).
        An id outside the range, which cannot be refused under ``jit``, makes that
        example's output NaN, never another adapter's.
      apply_kernel, apply_lora_b, to_output, layout, apply_lora_a: the layer's maps, as
        for :func:`adapter_forward`; they must keep the example axis leading.
      norm: the ``(K, *batch, *out)`` norms cached by :func:`stacked_norms`; computed
        from ``kernel`` when ``None``.
      base_norm_sq, eps: as for :func:`dora_norm`.
      routing: ``"gather"``, ``"mask"`` or ``None`` (by the positions per example).
    Returns:
      ``(batch, ...)``, the dtype of ``x @ W0``.
    """
    num = lora_a.shape[0]
    if norm is None:
        norm = stacked_norms(
            kernel, lora_a, lora_b, scales, layout, base_norm_sq=base_norm_sq, eps=eps
        )
    # Row k of the tables for id k, row K for the base (id -1), K + 1 (out of range) for
    # anything else: gathers fill it with zeros (s) or NaN (g).
    ids = jnp.asarray(adapter_ids)
    index = jnp.where((ids >= 0) & (ids < num), ids, jnp.where(ids == -1, num, num + 1))
    g = magnitude_scale(magnitude, norm)
    g = jnp.concatenate([g, jnp.ones((1, *g.shape[1:]), g.dtype)])
    g_rows = jnp.take(g, index, axis=0, mode="fill", fill_value=jnp.nan)
    s_rows = jnp.take(jnp.asarray(scales, jnp.float32), index, mode="fill", fill_value=0)
    base_out = apply_kernel(x, kernel)
    positions = base_out.size // max(1, x.shape[0] * math.prod(magnitude.shape[1:]))
    if routing is None:
        routing = "gather" if positions >= GATHER_MIN_POSITIONS else "mask"
    if routing == "gather":
        lora_out = _gathered_low_rank(
            x, lora_a, lora_b, index, s_rows, apply_lora_a or apply_kernel, apply_lora_b
        )
    elif routing == "mask":
        lora_out = _masked_low_rank(
            x, lora_a, lora_b, index, s_rows, apply_lora_a or apply_kernel, apply_lora_b, layout
        )
    else:
        raise ValueError(f"routing must be None, 'gather' or 'mask'; got {routing!r}.")
    g_out = _rows_to_output(g_rows, to_output, base_out.ndim)
    return (g_out * (base_out.astype(jnp.float32) + lora_out)).astype(base_out.dtype)


def _per_example(values: Array, ndim: int) -> Array:
    """``(batch, *tail)`` values broadcast over the axes between the example axis and
    ``tail`` of an ``ndim``-axis array."""
    return values.reshape(values.shape[:1] + (1,) * (ndim - values.ndim) + values.shape[1:])


def _gathered_low_rank(x, lora_a, lora_b, index, s_rows, apply_lora_a, apply_lora_b):
    """``s_k (x_i @ A_k) @ B_k`` with each example's ``A_k``, ``B_k`` gathered (zeros for
    the base): the low-rank products of one adapter per example, batched."""
    a_rows = jnp.take(lora_a, index, axis=0, mode="fill", fill_value=0)
    b_rows = jnp.take(lora_b, index, axis=0, mode="fill", fill_value=0)

    def low_rank(x_i, a, b):  # one example through its own A and B, the axis kept
        return apply_lora_b(apply_lora_a(x_i[None], a), b)[0]

    lora_out = jax.vmap(low_rank)(x, a_rows, b_rows).astype(jnp.float32)
    return _per_example(s_rows, lora_out.ndim) * lora_out


def _masked_low_rank(x, lora_a, lora_b, index, s_rows, apply_lora_a, apply_lora_b, layout):
    """The same as :func:`_gathered_low_rank` from ``x @ [A_1 .. A_K]`` (rank ``K*r``),
    each example's columns of the other adapters zeroed (``s_k`` on its own), then one
    product with ``[B_1; ..; B_K]``: ``A`` and ``B`` read once, ``K`` times the flops."""
    num, rank = lora_a.shape[0], lora_a.shape[-1]
    n_batch = len(layout.batch_axes)
    a_all = jnp.moveaxis(lora_a, 0, -2)
    a_all = a_all.reshape(*a_all.shape[:-2], num * rank)
    b_all = jnp.moveaxis(lora_b, 0, n_batch)
    b_all = b_all.reshape(*b_all.shape[:n_batch], num * rank, *b_all.shape[n_batch + 2 :])
    weights = s_rows[:, None] * (index[:, None] == jnp.arange(num)[None, :])
    weights = jnp.repeat(weights, rank, axis=1)  # (batch, K*r)
    xa = apply_lora_a(x, a_all)
    xa = xa * _per_example(weights, xa.ndim).astype(xa.dtype)
    return apply_lora_b(xa, b_all).astype(jnp.float32)


def _rows_to_output(rows: Array, to_output: Callable[[Array], Array], ndim: int) -> Array:
    """``(batch, *batch_axes, *out)`` values per example, broadcastable against the
    ``ndim``-axis output whose leading axis is the example axis."""
    mapped = jax.vmap(to_output)(rows)
    shape = mapped.shape[1:]
    padded = (1,) * (ndim - len(shape)) + shape
    if len(padded) != ndim or padded[0] != 1:
        raise ValueError(
            f"per-feature values of shape {shape} do not leave the output's leading "
            f"(example) axis to the batch: the layer must keep the example axis leading."
        )
    return mapped.reshape(rows.shape[0], *padded[1:])
