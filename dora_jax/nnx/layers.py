"""DoRA layers for Flax NNX.

Each layer subclasses the NNX layer it adapts (``DoRALinear`` is an ``nnx.Linear``),
keeps its ``kernel`` and ``bias`` where they were, and adds::

    lora_a, lora_b   DoRAParam      (an nnx.LoRAParam)
    magnitude        Magnitude      (an nnx.LoRAParam)
    base_norm_sq     NormCache      (only after cache_base_norms: ||W0||_c^2, else None)
    inference_norm   NormCache      (only after cache_norms: the whole norm, inference)

No layer holds a cache unless asked: without one, a call computes ``||W0||_c^2`` from
the kernel it has, so new base weights set into an adapted layer are used as they are
(call :meth:`DoRALayer.recompute_magnitude` for PEFT's magnitudes of them).
:func:`cache_base_norms` caches ``||W0||_c^2`` to save squaring the frozen kernel in
each training step; it is valid for the kernel of that moment. Assigning a new kernel
variable (``layer.kernel = nnx.Param(w)``) drops the layer's caches; changing the value
in place (``layer.kernel[...] = w``, ``nnx.update``) cannot be seen by the layer (Flax
0.12 has no supported hook on a variable's value: ``on_set_value`` metadata is
deprecated and ``nnx.update`` bypasses it), so call :func:`cache_base_norms` again after
it.

Because the adapters are ``nnx.LoRAParam``\\ s, ``nnx.grad(..., wrt=nnx.LoRAParam)``,
``nnx.Optimizer(..., wrt=nnx.LoRAParam)`` and every tool that already filters LoRA
parameters train exactly the DoRA adapters. ``DoRALinear.from_module(linear, ...)``
adapts an existing layer, keeping its kernel and bias.

Each layer computes as the Flax layer it subclasses: ``W0``, ``A`` and ``B`` go through
the layer's own ``__call__`` (its ``dot_general``, ``promote_dtype``,
``preferred_element_type``, ``precision``, ``conv_general_dilated`` or ``einsum_op``), so
a layer built with a custom product (say, a quantised ``dot_general``) adapts with it.
The math is :mod:`dora_jax.ops`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dora_jax import ops
from dora_jax.adapters import (
    BASE_NORM_SQ,
    INFERENCE_NORM,
    SETTINGS,
    Adapters,
    adapted_output,
    check_dropout,
    default_inits,
    dense_general_output_shape,
    einsum_plan,
    inference_norm,
    kaiming_uniform,
    merged_kernel,
    split_settings,
)
from dora_jax.config import LayerSettings

Array = jax.Array
INITS = ("lora_a_init", "lora_b_init")


class DoRAParam(nnx.LoRAParam):
    """A trainable DoRA LoRA factor (``lora_a`` or ``lora_b``)."""


class Magnitude(nnx.LoRAParam):
    """The trainable DoRA magnitude ``m``, one value per output feature."""


class NormCache(nnx.Variable):
    """A cached norm, not trained: ``||W0||_c^2`` of the frozen kernel (after
    :func:`cache_base_norms`), or the whole DoRA norm for inference (after
    :func:`cache_norms`). Valid only for the weights it was computed from."""


class _WithKernel:
    """A layer seen with another kernel, no bias and some settings overridden.

    Calling the Flax class's ``__call__`` on it computes exactly what the layer computes
    (its ``dot_general``, ``promote_dtype``, ``precision``, ...), on ``A``, ``B`` or
    ``W0``; every other attribute is the layer's.
    """

    def __init__(self, layer: nnx.Module, **overrides):
        self.__dict__.update(_layer=layer, bias=None, use_bias=False, **overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_layer"], name)


def _split_dora_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(DoRA arguments, the Flax layer's arguments)``."""
    settings, rest = split_settings(kwargs)
    settings.update({k: rest.pop(k) for k in INITS if k in rest})
    return settings, rest


class DoRALayer:
    """Adapter variables and forward shared by the NNX DoRA layers.

    DoRA arguments (keyword-only in every layer): the fields of
    :class:`~dora_jax.config.LayerSettings` (``rank``, ``alpha``, ``dropout``,
    ``rslora``, ``use_dora``, ``detach_norm``, ``eps``, ``adapter_dtype``, ``stacking``), and
    ``lora_a_init``, ``lora_b_init`` (PEFT's initialisers by default). The settings are
    ``layer.settings``; each is also an attribute (``layer.rank``).
    """

    kernel_name = "kernel"
    is_embedding = False
    layout: ops.Layout
    settings: LayerSettings

    def _init_adapters(
        self, layout: ops.Layout, *, rngs: nnx.Rngs, lora_a_init=None, lora_b_init=None, **kw
    ) -> None:
        kernel = getattr(self, self.kernel_name)[...]
        where = type(self).__name__
        try:
            settings = LayerSettings(**kw)
        except TypeError:
            unknown = sorted(set(kw) - set(SETTINGS))
            raise TypeError(f"{where} got unknown arguments {unknown}.") from None
        ops.check_kernel(kernel, where)
        ops.check_rank(settings.rank, kernel.shape, layout, where)
        check_dropout(settings.dropout, where)
        self.layout, self.settings = layout, settings
        a_shape, b_shape, _ = layout.lora_shapes(kernel.shape, settings.rank)
        default_a, default_b = default_inits(self.is_embedding)
        a_init = lora_a_init or default_a or kaiming_uniform(layout)
        b_init = lora_b_init or default_b
        dtype = settings.adapter_dtype
        self.lora_a = DoRAParam(a_init(rngs.params(), a_shape, dtype))
        self.lora_b = DoRAParam(b_init(rngs.params(), b_shape, dtype))
        self.magnitude = nnx.data(None)
        setattr(self, BASE_NORM_SQ, nnx.data(None))  # only cache_base_norms sets it
        setattr(self, INFERENCE_NORM, nnx.data(None))  # only cache_norms sets it
        if settings.use_dora:
            self.magnitude = Magnitude(self._initial_magnitude())
        self.lora_dropout = nnx.Dropout(settings.dropout, rngs=rngs)

    @property
    def scale(self) -> float:
        return self.settings.scale

    def __setattr__(self, name: str, value: Any) -> None:
        # A new kernel variable invalidates every norm computed from the old one.
        if name == self.kernel_name:
            for cache in (BASE_NORM_SQ, INFERENCE_NORM):
                if getattr(self, cache, None) is not None:
                    super().__setattr__(cache, nnx.data(None))
        super().__setattr__(name, value)

    def adapters(self) -> Adapters:
        """The layer's adapter arrays, caches included (checked against the kernel)."""
        kernel_shape = getattr(self, self.kernel_name).shape
        lora_a, lora_b = self.lora_a[...], self.lora_b[...]
        magnitude = self.magnitude[...] if self.use_dora else None
        ops.check_adapter_shapes(
            kernel_shape,
            self.layout,
            lora_a.shape,
            lora_b.shape,
            None if magnitude is None else magnitude.shape,
            type(self).__name__,
        )
        norm = self.inference_norm
        return Adapters(
            lora_a,
            lora_b,
            magnitude,
            self._base_norm_sq(),
            None if norm is None or not self.use_dora else norm[...],
        )

    def recompute_magnitude(self) -> None:
        """Set ``m = ||W0 + s*A@B||_c`` from the current weights (PEFT's initialisation).

        Call after loading new base weights into the layer. A ``base_norm_sq`` cache is
        recomputed from the current kernel; the inference norm cache is dropped.
        """
        if self.use_dora:
            self.magnitude.set_value(self._initial_magnitude())
            if self.base_norm_sq is not None:
                self.cache_base_norm()
            self.inference_norm = nnx.data(None)

    def cache_base_norm(self) -> None:
        """Cache ``||W0||_c^2`` of the current kernel (see :func:`cache_base_norms`)."""
        if self.use_dora:
            kernel = getattr(self, self.kernel_name)[...]
            self.base_norm_sq = NormCache(ops.column_norm_sq(kernel, self.layout))

    def clear_base_norm(self) -> None:
        """Drop the ``||W0||_c^2`` cache; calls compute it from the kernel again."""
        self.base_norm_sq = nnx.data(None)

    def cache_norm(self) -> None:
        """Cache the whole DoRA norm for inference (see :func:`cache_norms`)."""
        if self.use_dora:
            kernel = getattr(self, self.kernel_name)[...]
            norm = inference_norm(kernel, self.adapters(), self.settings, self.layout)
            self.inference_norm = NormCache(norm)

    def clear_norm(self) -> None:
        """Drop the inference norm cache (see :func:`cache_norms`)."""
        self.inference_norm = nnx.data(None)

    def _base_norm_sq(self) -> Array | None:
        """The cached ``||W0||_c^2`` checked against the kernel, or ``None``."""
        if not self.use_dora or self.base_norm_sq is None:
            return None
        cache = self.base_norm_sq[...]
        kernel_shape = getattr(self, self.kernel_name).shape
        expected = self.layout.lora_shapes(kernel_shape, 1)[2]
        if tuple(cache.shape) != tuple(expected):
            raise ValueError(
                f"{type(self).__name__}: cached base_norm_sq has shape {tuple(cache.shape)}, "
                f"expected {tuple(expected)} for kernel {tuple(kernel_shape)}; call "
                f"cache_base_norms again after changing the kernel."
            )
        return cache

    def _initial_magnitude(self) -> Array:
        kernel = getattr(self, self.kernel_name)[...]
        lora_a, lora_b = self.lora_a[...], self.lora_b[...]
        magnitude = ops.init_magnitude(kernel, lora_a, lora_b, self.scale, self.layout)
        return magnitude.astype(lora_a.dtype)

    def _dropped(self, x: Array, deterministic: bool | None) -> Array | None:
        if self.dropout == 0.0:
            return None
        if deterministic is None:
            deterministic = self.lora_dropout.deterministic
        if deterministic:
            return None
        return self.lora_dropout(x, deterministic=False)

    def _adapt(
        self,
        x: Array,
        deterministic: bool | None,
        apply_kernel: Callable[[Array, Array], Array],
        apply_lora_b: Callable[[Array, Array], Array],
        **maps,
    ) -> Array:
        """The adapted output without bias, from the layer's maps of ``W0``, ``A``, ``B``."""
        return adapted_output(
            x,
            getattr(self, self.kernel_name)[...],
            self.layout,
            self.adapters(),
            self.settings,
            self._dropped(x, deterministic),
            apply_kernel=apply_kernel,
            apply_lora_b=apply_lora_b,
            **maps,
        )

    def _through_layer(self, **overrides) -> Callable[[Array, Array], Array]:
        """``(x, k) -> y``: the Flax layer's own ``__call__`` with kernel ``k``, no bias."""
        flax_call = _flax_class(type(self)).__call__
        name = self.kernel_name
        return lambda x, k: flax_call(_WithKernel(self, **{name: k}, **overrides), x)

    def merged(self) -> nnx.Module:
        """The plain Flax layer with the adapters folded into its kernel."""
        kernel = getattr(self, self.kernel_name)[...]
        value = merged_kernel(kernel, self.adapters(), self.settings, self.layout)
        return _rebuild(_flax_class(type(self)), self, nnx.Rngs(0), {self.kernel_name: value})

    @classmethod
    def from_module(cls, base: nnx.Module, *, rngs: nnx.Rngs, **dora_kwargs):
        """Adapt an existing layer, keeping its kernel and bias variables and settings.

        Args:
          base: an instance of the layer this class extends (e.g. ``nnx.Linear``).
          rngs: for the adapters' initialisation.
          **dora_kwargs: DoRA arguments (``rank``, ``alpha``, ...).
        """
        flax_cls = _flax_class(cls)
        if not isinstance(base, flax_cls):
            raise TypeError(
                f"{cls.__name__}.from_module needs an {flax_cls.__name__}; "
                f"got {type(base).__name__}."
            )
        settings, unknown = _split_dora_kwargs(dora_kwargs)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_module got unknown arguments {sorted(unknown)}.")
        return _rebuild(cls, base, rngs, {}, **settings)


# Each setting is readable as an attribute of the layer (``layer.rank``, ``layer.eps``).
for _name in SETTINGS:
    setattr(DoRALayer, _name, property(lambda self, _n=_name: getattr(self.settings, _n)))
del _name


def _flax_class(cls: type) -> type:
    """The Flax layer a DoRA layer class extends (``DoRALinear`` -> ``nnx.Linear``)."""
    return next(c for c in cls.__mro__ if c.__module__.startswith("flax."))


_WEIGHTS = ("kernel", "bias", "embedding")


def _rebuild(cls: type, base: nnx.Module, rngs: nnx.Rngs, values: dict, **kwargs):
    """A ``cls`` with ``base``'s settings whose weights are ``base``'s (or ``values``).

    Weights not in ``values`` keep ``base``'s variable objects (and their metadata,
    such as sharding); no throwaway random init is drawn.
    """
    flax_cls = _flax_class(cls)
    signature = inspect.signature(flax_cls.__init__).parameters
    settings = {n: getattr(base, n) for n in signature if n != "self" and hasattr(base, n)}
    present = [n for n in _WEIGHTS if getattr(base, n, None) is not None]
    for name in present:
        value = values.get(name, getattr(base, name)[...])
        if f"{name}_init" in signature:
            settings[f"{name}_init"] = lambda *_, value=value: value
    layer = cls(**settings, **kwargs, rngs=rngs)
    for name in present:
        if name not in values:
            setattr(layer, name, getattr(base, name))
    return layer


def _rank_product(layer: nnx.Module, xa: Array, lora_b: Array) -> Array:
    """``(x @ A) @ B`` over the trailing rank axis, with the layer's ``promote_dtype``,
    ``precision`` and ``preferred_element_type`` (Conv's ``B`` is PEFT's 1x1
    convolution, the same product; Embed's is a plain one)."""
    xa, lora_b = layer.promote_dtype((xa, lora_b), dtype=layer.dtype)
    preferred = getattr(layer, "preferred_element_type", None)
    kwargs = {} if preferred is None else {"preferred_element_type": preferred}
    dimensions = (((xa.ndim - 1,), (0,)), ((), ()))
    precision = getattr(layer, "precision", None)
    return jax.lax.dot_general(xa, lora_b, dimensions, precision=precision, **kwargs)


def _add_bias(y: Array, bias: nnx.Param | None, to_output=lambda b: b) -> Array:
    return y if bias is None else y + to_output(bias[...]).astype(y.dtype)


def _constrain(y: Array, out_sharding) -> Array:
    """Flax's ``out_sharding`` argument, applied to the output as a sharding constraint."""
    return y if out_sharding is None else jax.lax.with_sharding_constraint(y, out_sharding)


_LINEAR_DEFAULTS = inspect.signature(nnx.Linear.__init__).parameters
_DEFAULT_DOT_GENERAL = _LINEAR_DEFAULTS["dot_general"].default
_DEFAULT_PROMOTE_DTYPE = _LINEAR_DEFAULTS["promote_dtype"].default


class DoRALinear(DoRALayer, nnx.Linear):
    """``nnx.Linear`` with a DoRA adapter.

    Kernel ``(in, out)``, ``lora_a (in, r)``, ``lora_b (r, out)``, ``magnitude (out,)``.

    >>> from flax import nnx
    >>> layer = DoRALinear(3, 4, rank=2, rngs=nnx.Rngs(0))
    >>> layer.lora_a.shape, layer.lora_b.shape, layer.magnitude.shape
    ((3, 2), (2, 4), (4,))
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, **kwargs):
        dora, linear = _split_dora_kwargs(kwargs)
        super().__init__(in_features, out_features, rngs=rngs, **linear)
        self._init_adapters(ops.dense_layout(), rngs=rngs, **dora)

    def __call__(
        self, inputs: Array, *, deterministic: bool | None = None, out_sharding=None
    ) -> Array:
        apply = self._through_layer()
        # A custom product (say, quantised) sees x alone, never x stacked with A^T, and
        # is never replaced by ops' own product.
        dense_like = (
            self.dot_general is _DEFAULT_DOT_GENERAL
            and self.promote_dtype is _DEFAULT_PROMOTE_DTYPE
        )
        y = self._adapt(inputs, deterministic, apply, apply, dense_like=dense_like)
        return _constrain(_add_bias(y, self.bias), out_sharding)


class DoRALinearGeneral(DoRALayer, nnx.LinearGeneral):
    """``nnx.LinearGeneral`` with a DoRA adapter.

    Kernel ``(*batch, *in, *out)``, ``lora_a (*batch, *in, r)``,
    ``lora_b (*batch, r, *out)``, ``magnitude (*batch, *out)``.
    """

    def __init__(self, in_features, out_features, *, rngs: nnx.Rngs, **kwargs):
        dora, general = _split_dora_kwargs(kwargs)
        super().__init__(in_features, out_features, rngs=rngs, **general)
        layout = ops.dense_general_layout(
            len(self.batch_axis), len(self.in_features), len(self.out_features)
        )
        self._init_adapters(layout, rngs=rngs, **dora)

    def __call__(
        self, inputs: Array, *, deterministic: bool | None = None, out_sharding=None
    ) -> Array:
        axis = tuple(ax % inputs.ndim for ax in self.axis)
        batch_dims = tuple(ax % inputs.ndim for ax in self.batch_axis)
        shape = dense_general_output_shape(inputs.shape, axis, batch_dims, self.out_features)
        to_output = lambda v: jnp.reshape(v, shape)  # noqa: E731
        # B contracts the rank axis, the last of x @ A (*batch, *other, r).
        rank_axes = {"axis": (-1,), "batch_axis": dict.fromkeys(range(len(batch_dims)), 0)}
        y = self._adapt(
            inputs,
            deterministic,
            self._through_layer(),
            self._through_layer(**rank_axes),
            to_output=to_output,
        )
        return _constrain(_add_bias(y, self.bias, to_output), out_sharding)


class DoRAConv(DoRALayer, nnx.Conv):
    """``nnx.Conv`` with a DoRA adapter.

    Kernel ``(*window, in, out)``, ``lora_a (*window, in, r)`` (a convolution with the
    layer's window, strides and padding), ``lora_b (r, out)`` (a 1x1 convolution, as
    PEFT), ``magnitude (out,)``. Grouped convolutions and masks are not supported.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size, *, rngs, **kwargs):
        dora, conv = _split_dora_kwargs(kwargs)
        super().__init__(in_features, out_features, kernel_size, rngs=rngs, **conv)
        if self.feature_group_count != 1 or self.mask is not None:
            raise ValueError(
                f"{type(self).__name__}: DoRA supports convolutions with "
                f"feature_group_count=1 and no mask; got "
                f"feature_group_count={self.feature_group_count}."
            )
        self._init_adapters(ops.conv_layout(len(self.kernel_size)), rngs=rngs, **dora)

    def __call__(
        self, inputs: Array, *, deterministic: bool | None = None, out_sharding=None
    ) -> Array:
        y = self._adapt(
            inputs,
            deterministic,
            self._through_layer(),
            functools.partial(_rank_product, self),
        )
        return _constrain(_add_bias(y, self.bias), out_sharding)


class DoRAEinsum(DoRALayer, nnx.Einsum):
    """``nnx.Einsum`` with a DoRA adapter.

    Kernel axes split into batch, input (contracted) and output axes
    (:func:`dora_jax.ops.einsum_layout`); ``lora_a (*batch, *in, r)``,
    ``lora_b (*batch, r, *out)``, ``magnitude (*batch, *out)``. The equation is fixed at
    construction.
    """

    def __init__(self, einsum_str: str, kernel_shape, bias_shape=None, *, rngs, **kwargs):
        dora, einsum = _split_dora_kwargs(kwargs)
        super().__init__(einsum_str, kernel_shape, bias_shape, rngs=rngs, **einsum)
        self._init_adapters(ops.einsum_layout(self.einsum_str), rngs=rngs, **dora)

    def __call__(
        self, inputs: Array, *, deterministic: bool | None = None, out_sharding=None
    ) -> Array:
        plan = einsum_plan(self.einsum_str, self.kernel.shape)
        flax_call = nnx.Einsum.__call__

        def einsum_map(equation):
            return lambda x, k: flax_call(_WithKernel(self, kernel=k), x, equation)

        y = self._adapt(
            inputs,
            deterministic,
            einsum_map(plan.equation),
            einsum_map(plan.lora_b_equation),
            to_output=plan.to_output,
            apply_lora_a=einsum_map(plan.lora_a_equation),
        )
        to_bias = lambda bias: jnp.reshape(bias, plan.broadcast)  # noqa: E731
        return _constrain(_add_bias(y, self.bias, to_bias), out_sharding)


class DoRAEmbed(DoRALayer, nnx.Embed):
    """``nnx.Embed`` with a DoRA adapter.

    Table ``(vocab, features)``, ``lora_a (vocab, r)`` (looked up), ``lora_b (r,
    features)``, ``magnitude (features,)``; ``y = g * (E[x] + s * A[x] @ B)``, no dropout
    (as PEFT).
    """

    kernel_name = "embedding"
    is_embedding = True

    def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs, **kwargs):
        dora, embed = _split_dora_kwargs(kwargs)
        super().__init__(num_embeddings, features, rngs=rngs, **embed)
        self._init_adapters(ops.dense_layout(), rngs=rngs, **dora)

    def __call__(self, inputs: Array, out_sharding=None) -> Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"DoRAEmbed: input type must be an integer; got {inputs.dtype}.")

        def lookup(x: Array, table: Array) -> Array:
            return nnx.Embed.__call__(
                _WithKernel(self, embedding=table, features=table.shape[-1]), x
            )

        return _constrain(
            self._adapt(inputs, True, lookup, functools.partial(_rank_product, self)), out_sharding
        )

    def attend(self, query: Array) -> Array:
        """``query @ W'.T`` for tied output embeddings, without forming ``W'``."""
        adapters = self.adapters()
        return ops.embed_attend(
            query,
            self.embedding[...],
            adapters.lora_a,
            adapters.lora_b,
            adapters.magnitude,
            self.scale,
            detach_norm=self.detach_norm,
            base_norm_sq=adapters.base_norm_sq,
            norm=adapters.inference_norm,
            eps=self.eps,
        )


# The Flax layer each DoRA layer replaces (exact types: a subclass may compute otherwise).
DORA_CLASSES: dict[type, type] = {
    nnx.Linear: DoRALinear,
    nnx.LinearGeneral: DoRALinearGeneral,
    nnx.Einsum: DoRAEinsum,
    nnx.Conv: DoRAConv,
    nnx.Embed: DoRAEmbed,
}
