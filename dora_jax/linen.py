"""DoRA layers for Flax Linen.

Each layer is a drop-in subclass of the Flax layer it adapts (``DoRADense`` is an
``nn.Dense``): the same constructor arguments plus the DoRA hyperparameters, and the same
``"params"`` collection (``kernel``, ``bias``), so a pretrained checkpoint loads unchanged.
The adapters live apart from the frozen base::

    "params":     kernel, bias                  the frozen base, exactly as in Flax
    "dora":       lora_a, lora_b, magnitude     trainable
    "dora_cache": base_norm_sq                  ||W0||_c^2, a cache (optional at apply)

``dora_cache`` only saves the ``in x out`` squaring of ``W0`` each step; without it the
value is recomputed. After loading new base weights into variables made by ``init``,
call :func:`recompute_magnitudes`, which refreshes ``magnitude`` and the cache.

The frozen linear map itself (padding, dilation, precision, dtype promotion) is Flax's
own: the layer runs a plain Flax layer on ``W0`` and on ``A``, and the DoRA math is
:mod:`dora_jax.ops`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dora_jax import ops

Array = jax.Array
DORA = "dora"
DORA_CACHE = "dora_cache"


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


class DoRAMixin(nn.Module):
    """The DoRA hyperparameters and adapter variables shared by every Linen layer.

    Attributes:
      rank: LoRA rank ``r``, ``1 <= r <= min(fan_in, fan_out)``.
      alpha: LoRA alpha; scaling ``s = alpha / r`` (``alpha / sqrt(r)`` with rslora).
      dropout: dropout rate on the adapter path (PEFT's ``lora_dropout``).
      rslora: use rank-stabilised scaling.
      use_dora: ``False`` gives plain LoRA through the same code (no magnitude).
      detach_norm: the paper's constant-C gradient (default); ``False`` differentiates
        through the norm exactly.
      eps: floor of the norm, so all-zero output features stay finite.
      adapter_dtype: dtype of ``lora_a``, ``lora_b`` and ``magnitude`` (float32 even on
        a low-precision base, as PEFT).
      deterministic: disables dropout; may also be given at call time.
      lora_a_init: initializer of ``A``; default Kaiming-uniform as PEFT
        (zeros for embeddings).
      lora_b_init: initializer of ``B``; default zeros (normal for embeddings), so the
        adapted layer starts equal to the base layer.
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    use_dora: bool = True
    detach_norm: bool = True
    eps: float = ops.DEFAULT_EPS
    adapter_dtype: Any = jnp.float32
    deterministic: bool | None = None
    lora_a_init: nn.initializers.Initializer | None = None
    lora_b_init: nn.initializers.Initializer | None = None

    default_lora_a_init = None  # set per layer (class attributes, not fields)
    default_lora_b_init = staticmethod(nn.initializers.zeros_init())

    @property
    def scale(self) -> float:
        return ops.scaling(self.rank, self.alpha, self.rslora)

    def _where(self) -> str:
        path = "/".join(str(p) for p in self.scope.path) if self.scope else ""
        return f"{type(self).__name__} {path!r}" if path else type(self).__name__

    def _adapters(self, kernel: Array, layout: ops.Layout):
        """Create or read ``(lora_a, lora_b, magnitude, base_norm_sq)``."""
        where = self._where()
        ops.check_kernel(kernel, where)
        ops.check_rank(self.rank, kernel.shape, layout, where)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{where}: dropout must be in [0, 1); got {self.dropout}.")
        a_shape, b_shape, m_shape = layout.lora_shapes(kernel.shape, self.rank)
        a_init = self.lora_a_init or self.default_lora_a_init or _kaiming_uniform(layout)
        b_init = self.lora_b_init or self.default_lora_b_init
        lora_a = self.variable(
            DORA, "lora_a", lambda: a_init(self.make_rng("params"), a_shape, self.adapter_dtype)
        ).value
        lora_b = self.variable(
            DORA, "lora_b", lambda: b_init(self.make_rng("params"), b_shape, self.adapter_dtype)
        ).value
        magnitude = None
        if self.use_dora:
            magnitude = self.variable(
                DORA,
                "magnitude",
                lambda: ops.init_magnitude(kernel, lora_a, lora_b, self.scale, layout).astype(
                    self.adapter_dtype
                ),
            ).value
        m_given = None if magnitude is None else magnitude.shape
        ops.check_adapter_shapes(kernel.shape, layout, lora_a.shape, lora_b.shape, m_given, where)
        if lora_a.shape[-1] != self.rank:
            raise ValueError(
                f"{where}: the layer has rank={self.rank} but its adapters have rank "
                f"{lora_a.shape[-1]} (lora_a {lora_a.shape}, lora_b {lora_b.shape})."
            )
        base_norm_sq = None
        if self.use_dora and (
            self.has_variable(DORA_CACHE, "base_norm_sq") or self.is_mutable_collection(DORA_CACHE)
        ):
            base_norm_sq = self.variable(
                DORA_CACHE, "base_norm_sq", lambda: ops.column_norm_sq(kernel, layout)
            ).value
            if base_norm_sq.shape != m_shape:
                raise ValueError(
                    f"{where}: cached base_norm_sq has shape {base_norm_sq.shape}, expected "
                    f"{m_shape} for kernel {kernel.shape}."
                )
        return lora_a, lora_b, magnitude, base_norm_sq

    def _dropped(self, x: Array, deterministic: bool | None) -> Array | None:
        """The dropped-out input in training with dropout, else ``None``."""
        if self.dropout == 0.0:
            return None
        if nn.merge_param("deterministic", self.deterministic, deterministic):
            return None
        return nn.Dropout(rate=self.dropout, name="lora_dropout")(x, deterministic=False)

    def _adapt(
        self,
        x: Array,
        kernel: Array,
        layout: ops.Layout,
        deterministic: bool | None,
        apply_kernel: Callable[[Array, Array], Array],
        apply_lora_b: Callable[[Array, Array], Array],
        to_output: Callable[[Array], Array] = lambda v: v,
    ) -> Array:
        lora_a, lora_b, magnitude, base_norm_sq = self._adapters(kernel, layout)
        return ops.adapter_forward(
            x,
            kernel,
            lora_a,
            lora_b,
            magnitude,
            apply_kernel=apply_kernel,
            apply_lora_b=apply_lora_b,
            to_output=to_output,
            layout=layout,
            scale=self.scale,
            x_dropped=self._dropped(x, deterministic),
            detach_norm=self.detach_norm,
            base_norm_sq=base_norm_sq,
            eps=self.eps,
        )


def _kaiming_uniform(layout: ops.Layout) -> nn.initializers.Initializer:
    # PEFT: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    n_batch, n_in = len(layout.batch_axes), len(layout.in_axes)
    return nn.initializers.variance_scaling(
        1.0 / 3.0,
        "fan_in",
        "uniform",
        in_axis=tuple(range(n_batch, n_batch + n_in)),
        out_axis=-1,
        batch_axis=tuple(range(n_batch)),
    )


def _add_bias(y: Array, bias: Array | None) -> Array:
    return y if bias is None else y + bias.astype(y.dtype)


class DoRADense(DoRAMixin, nn.Dense):
    """``nn.Dense`` with a DoRA adapter.

    ``y = m / ||W0 + s*A@B||_c * (x @ W0 + s * (x @ A) @ B) + bias`` for
    ``x (..., in)``, kernel ``(in, out)``, ``lora_a (in, r)``, ``lora_b (r, out)``,
    ``magnitude (out,)``.

    >>> import jax, jax.numpy as jnp
    >>> layer = DoRADense(features=4, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> {k: v.shape for k, v in variables["dora"].items()}
    {'lora_a': (3, 2), 'lora_b': (2, 4), 'magnitude': (4,)}
    """

    @nn.compact
    def __call__(self, inputs: Array, deterministic: bool | None = None) -> Array:
        in_features = jnp.shape(inputs)[-1]
        kernel = self.param(
            "kernel", self.kernel_init, (in_features, self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        y = self._adapt(
            inputs,
            kernel,
            ops.dense_layout(),
            deterministic,
            apply_kernel=kernel_map(nn.Dense, self, 1),
            apply_lora_b=rank_map(self),
        )
        return _add_bias(y, bias)


class DoRADenseGeneral(DoRAMixin, nn.DenseGeneral):
    """``nn.DenseGeneral`` with a DoRA adapter.

    Kernel ``(*batch, *in, *out)``; ``lora_a (*batch, *in, r)``,
    ``lora_b (*batch, r, *out)``, ``magnitude (*batch, *out)``; the norm reduces the
    ``in`` block.
    """

    @nn.compact
    def __call__(self, inputs: Array, deterministic: bool | None = None) -> Array:
        features = _as_tuple(self.features)
        axis = tuple(_normalize_axes(_as_tuple(self.axis), inputs.ndim))
        batch_dims = tuple(_normalize_axes(_as_tuple(self.batch_dims), inputs.ndim))
        if batch_dims and batch_dims != tuple(range(len(batch_dims))):
            raise ValueError(
                f"{self._where()}: batch_dims {batch_dims} must be consecutive leading "
                f"dimensions starting from 0."
            )
        batch_shape = tuple(inputs.shape[ax] for ax in batch_dims)
        in_shape = tuple(inputs.shape[ax] for ax in axis)
        layout = ops.dense_general_layout(len(batch_dims), len(axis), len(features))
        kernel = self.param(
            "kernel",
            _flat_init(self.kernel_init, len(batch_dims), len(axis), len(features)),
            batch_shape + in_shape + features,
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias",
                _flat_init(self.bias_init, len(batch_dims), 0, len(features)),
                batch_shape + features,
                self.param_dtype,
            )
        # (*batch, *out) values -> broadcastable against (*batch, *other, *out).
        expanded = tuple(
            inputs.shape[ax] if ax in batch_dims else 1
            for ax in range(inputs.ndim)
            if ax not in axis
        )
        to_output = lambda v: jnp.reshape(v, expanded + features)  # noqa: E731
        y = self._adapt(
            inputs,
            kernel,
            layout,
            deterministic,
            apply_kernel=kernel_map(nn.DenseGeneral, self, len(batch_dims) + len(axis)),
            apply_lora_b=rank_map(self, len(batch_dims)),
            to_output=to_output,
        )
        return y if bias is None else y + to_output(bias).astype(y.dtype)


class DoRAConv(DoRAMixin, nn.Conv):
    """``nn.Conv`` with a DoRA adapter.

    Kernel ``(*window, in, out)``; ``lora_a (*window, in, r)`` is a convolution with
    the layer's window, strides and padding, ``lora_b (r, out)`` a 1x1 projection
    (as PEFT); ``magnitude (out,)``, the norm reducing every axis but the last.
    Grouped convolutions and masks are not supported.
    """

    @nn.compact
    def __call__(self, inputs: Array, deterministic: bool | None = None) -> Array:
        kernel_size = (
            (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        )
        if self.feature_group_count != 1 or self.mask is not None:
            raise ValueError(
                f"{self._where()}: DoRA supports convolutions with feature_group_count=1 "
                f"and no mask; got feature_group_count={self.feature_group_count}, "
                f"mask={'set' if self.mask is not None else None}."
            )
        kernel_shape = (*kernel_size, jnp.shape(inputs)[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        y = self._adapt(
            inputs,
            kernel,
            ops.conv_layout(len(kernel_size)),
            deterministic,
            apply_kernel=kernel_map(nn.Conv, self, len(kernel_size) + 1),
            apply_lora_b=rank_map(self),
        )
        return _add_bias(y, bias)


class DoRAEmbed(DoRAMixin, nn.Embed):
    """``nn.Embed`` with a DoRA adapter.

    Table ``(vocab, features)``; ``lora_a (vocab, r)`` is a table looked up like the
    embedding, ``lora_b (r, features)``, ``magnitude (features,)`` with the norm over
    the vocabulary axis (PEFT's convention). ``y = g * (E[x] + s * A[x] @ B)``. PEFT
    applies no dropout to embeddings, nor does this layer.
    """

    default_lora_a_init = staticmethod(nn.initializers.zeros_init())
    default_lora_b_init = staticmethod(nn.initializers.normal(1.0))

    def setup(self):
        self.embedding = self.param(
            "embedding", self.embedding_init, (self.num_embeddings, self.features), self.param_dtype
        )
        self.lora_a, self.lora_b, self.magnitude, self.base_norm_sq = self._adapters(
            self.embedding, ops.dense_layout()
        )

    def __call__(self, inputs: Array, deterministic: bool | None = None) -> Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"{self._where()}: input type must be an integer; got {inputs.dtype}.")
        lookup = kernel_map(
            nn.Embed, self, 1, param="embedding", num_embeddings=self.num_embeddings
        )
        return ops.adapter_forward(
            inputs,
            self.embedding,
            self.lora_a,
            self.lora_b,
            self.magnitude,
            apply_kernel=lookup,
            apply_lora_b=rank_map(self),
            to_output=lambda v: v,
            layout=ops.dense_layout(),
            scale=self.scale,
            detach_norm=self.detach_norm,
            base_norm_sq=self.base_norm_sq,
            eps=self.eps,
        )

    def attend(self, query: Array) -> Array:
        """``query @ W'.T`` for tied output embeddings, without forming ``W'``."""
        return ops.embed_attend(
            query,
            self.embedding,
            self.lora_a,
            self.lora_b,
            self.magnitude,
            self.scale,
            detach_norm=self.detach_norm,
            base_norm_sq=self.base_norm_sq,
            eps=self.eps,
        )


def recompute_magnitudes(
    module: nn.Module, variables: Mapping[str, Any], *args, **kwargs
) -> dict[str, Any]:
    """Recompute every magnitude (and the norm cache) from the base weights now in ``variables``.

    Pretrained weights usually arrive after ``init``: load them into
    ``variables["params"]``, then call this with the same example inputs as ``init``.
    The magnitudes become ``||W0 + s*A@B||_c`` of the loaded ``W0`` and the current
    adapters (PEFT's initialisation), so with ``B = 0`` the layer equals the base.

    Returns:
      a new variables dict; ``lora_a`` and ``lora_b`` are kept.
    """
    kept = dict(variables)
    kept.pop(DORA_CACHE, None)
    kept[DORA] = _drop_leaves(variables.get(DORA, {}), "magnitude")
    _, updates = module.apply(kept, *args, mutable=[DORA, DORA_CACHE], **kwargs)
    return {**kept, **updates}


def _drop_leaves(tree: Mapping[str, Any], name: str) -> dict[str, Any]:
    return {
        k: _drop_leaves(v, name) if isinstance(v, Mapping) else v
        for k, v in tree.items()
        if k != name
    }


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _normalize_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(ax if ax >= 0 else ndim + ax for ax in axes)


def _flat_init(init, n_batch: int, n_in: int, n_out: int):
    """Initialise a DenseGeneral parameter as Flax does: on its flattened 2-d view."""

    def wrapped(key, shape, dtype=jnp.float32):
        batch = int(np.prod(shape[:n_batch]))
        fan_in = int(np.prod(shape[n_batch : n_batch + n_in]))
        fan_out = int(np.prod(shape[len(shape) - n_out :]))
        flat = (batch * fan_in, fan_out) if n_in else (batch * fan_out,)
        return jnp.reshape(init(key, flat, dtype), shape)

    return wrapped
