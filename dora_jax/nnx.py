"""DoRA layers for Flax NNX.

Each layer subclasses the NNX layer it adapts (``DoRALinear`` is an ``nnx.Linear``),
keeps its ``kernel`` and ``bias`` where they were, and adds::

    lora_a, lora_b   DoRAParam      (an nnx.LoRAParam)
    magnitude        Magnitude      (an nnx.LoRAParam)
    base_norm_sq     NormCache      (only after cache_base_norms: ||W0||_c^2, else None)
    inference_norm   NormCache      (only after cache_norms: the whole norm, inference)

No layer holds a cache unless asked: without one, a call computes ``||W0||_c^2`` from
the kernel it has, so new base weights set into an adapted layer are used as they are
(call :meth:`DoRAMixin.recompute_magnitude` for PEFT's magnitudes of them).
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

The linear maps are the Linen layers' (see :mod:`dora_jax.linen`), so an NNX and a Linen
DoRA layer with the same weights compute the same numbers; the math is
:mod:`dora_jax.ops`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from dora_jax import linen as dora_linen
from dora_jax import ops
from dora_jax import summary as dora_summary
from dora_jax.config import DoRAConfig, LayerSettings

Array = jax.Array


class DoRAParam(nnx.LoRAParam):
    """A trainable DoRA LoRA factor (``lora_a`` or ``lora_b``)."""


class Magnitude(nnx.LoRAParam):
    """The trainable DoRA magnitude ``m``, one value per output feature."""


class NormCache(nnx.Variable):
    """A cached norm, not trained: ``||W0||_c^2`` of the frozen kernel (after
    :func:`cache_base_norms`), or the whole DoRA norm for inference (after
    :func:`cache_norms`). Valid only for the weights it was computed from."""


_DORA_ARGS = (
    "rank",
    "alpha",
    "dropout",
    "rslora",
    "use_dora",
    "detach_norm",
    "eps",
    "adapter_dtype",
    "lora_a_init",
    "lora_b_init",
)


class DoRAMixin:
    """Adapter variables and forward shared by the NNX DoRA layers.

    DoRA arguments (keyword-only in every layer): ``rank``, ``alpha``, ``dropout``,
    ``rslora``, ``use_dora``, ``detach_norm``, ``eps``, ``adapter_dtype``,
    ``lora_a_init``, ``lora_b_init``; they mean what they mean in
    :class:`dora_jax.linen.DoRAMixin`.
    """

    kernel_name = "kernel"
    layout: ops.Layout
    default_lora_a_init: Any = None
    default_lora_b_init: Any = staticmethod(nnx.initializers.zeros_init())

    def _init_adapters(
        self,
        layout: ops.Layout,
        *,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        rslora: bool = False,
        use_dora: bool = True,
        detach_norm: bool = True,
        eps: float = ops.DEFAULT_EPS,
        adapter_dtype: Any = jnp.float32,
        lora_a_init: Any = None,
        lora_b_init: Any = None,
        rngs: nnx.Rngs,
    ) -> None:
        kernel = getattr(self, self.kernel_name)[...]
        where = type(self).__name__
        _check_default_products(self, where)
        ops.check_kernel(kernel, where)
        ops.check_rank(rank, kernel.shape, layout, where)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{where}: dropout must be in [0, 1); got {dropout}.")
        self.layout = layout
        self.rank, self.alpha, self.dropout, self.rslora = rank, alpha, dropout, rslora
        self.use_dora, self.detach_norm, self.eps = use_dora, detach_norm, eps
        self.settings = LayerSettings(
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            rslora=rslora,
            use_dora=use_dora,
            detach_norm=detach_norm,
            eps=eps,
            adapter_dtype=adapter_dtype,
        )
        self.scale = self.settings.scale
        a_shape, b_shape, _ = layout.lora_shapes(kernel.shape, rank)
        a_init = lora_a_init or self.default_lora_a_init or dora_linen.kaiming_uniform(layout)
        b_init = lora_b_init or self.default_lora_b_init
        self.lora_a = DoRAParam(a_init(rngs.params(), a_shape, adapter_dtype))
        self.lora_b = DoRAParam(b_init(rngs.params(), b_shape, adapter_dtype))
        self.magnitude = nnx.data(None)
        self.base_norm_sq = nnx.data(None)  # only cache_base_norms sets it
        self.inference_norm = nnx.data(None)
        if use_dora:
            self.magnitude = Magnitude(self._initial_magnitude())
        self.lora_dropout = nnx.Dropout(dropout, rngs=rngs)

    def __setattr__(self, name: str, value: Any) -> None:
        # A new kernel variable invalidates every norm computed from the old one.
        if name == self.kernel_name and getattr(self, "base_norm_sq", None) is not None:
            super().__setattr__("base_norm_sq", nnx.data(None))
        if name == self.kernel_name and getattr(self, "inference_norm", None) is not None:
            super().__setattr__("inference_norm", nnx.data(None))
        super().__setattr__(name, value)

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
            norm = ops.dora_norm(
                getattr(self, self.kernel_name)[...],
                self.lora_a[...],
                self.lora_b[...],
                self.scale,
                self.layout,
                base_norm_sq=self._base_norm_sq(),
                eps=self.eps,
            )
            self.inference_norm = NormCache(norm)

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
        to_output: Callable[[Array], Array] = lambda v: v,
        apply_lora_a: Callable[[Array, Array], Array] | None = None,
        dense_like: bool = False,
    ) -> Array:
        kernel = getattr(self, self.kernel_name)[...]
        lora_a, lora_b = self.lora_a[...], self.lora_b[...]
        magnitude = self.magnitude[...] if self.use_dora else None
        ops.check_adapter_shapes(
            kernel.shape,
            self.layout,
            lora_a.shape,
            lora_b.shape,
            None if magnitude is None else magnitude.shape,
            type(self).__name__,
        )
        adapters = dora_linen.Adapters(
            lora_a,
            lora_b,
            magnitude,
            self._base_norm_sq(),
            None if self.inference_norm is None else self.inference_norm[...],
        )
        return dora_linen.adapted_output(
            x,
            kernel,
            self.layout,
            adapters,
            self.settings,
            self._dropped(x, deterministic),
            apply_kernel=apply_kernel,
            apply_lora_b=apply_lora_b,
            apply_lora_a=apply_lora_a,
            dense_like=dense_like,
            to_output=to_output,
        )

    def merged(self) -> nnx.Module:
        """The plain Flax layer with the adapters folded into its kernel."""
        kernel = getattr(self, self.kernel_name)
        magnitude = self.magnitude[...] if self.use_dora else None
        value = ops.merge(
            kernel[...],
            self.lora_a[...],
            self.lora_b[...],
            magnitude,
            self.scale,
            self.layout,
            eps=self.eps,
        )
        return _rebuild(_flax_class(type(self)), self, nnx.Rngs(0), {self.kernel_name: value})

    @classmethod
    def from_module(cls, base: nnx.Module, *, rngs: nnx.Rngs, **dora_kwargs):
        """Adapt an existing layer, keeping its kernel and bias variables.

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
        unknown = set(dora_kwargs) - set(_DORA_ARGS)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_module got unknown arguments {sorted(unknown)}.")
        return _rebuild(cls, base, rngs, {}, **dora_kwargs)


# Attributes that change how an NNX layer multiplies. The adapted forward computes with
# Flax's defaults (the Linen layers' maps), so other values would be silently ignored.
_PRODUCT_ATTRIBUTES = (
    "dot_general",
    "dot_general_cls",
    "conv_general_dilated",
    "einsum_op",
    "promote_dtype",
    "preferred_element_type",
)


def _check_default_products(layer: nnx.Module, where: str) -> None:
    signature = inspect.signature(_flax_class(type(layer)).__init__).parameters
    for name in _PRODUCT_ATTRIBUTES:
        if name not in signature or not hasattr(layer, name):
            continue
        value, default = getattr(layer, name), signature[name].default
        if value is not default and value != default:
            raise ValueError(
                f"{where}: DoRA computes this layer with Flax's default {name} "
                f"({default!r}); got {value!r}, which it would ignore."
            )


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


def _add_bias(y: Array, bias: nnx.Param | None, to_output=lambda b: b) -> Array:
    return y if bias is None else y + to_output(bias[...]).astype(y.dtype)


def _constrain(y: Array, out_sharding) -> Array:
    """Flax's ``out_sharding`` argument, applied to the output as a sharding constraint."""
    return y if out_sharding is None else jax.lax.with_sharding_constraint(y, out_sharding)


def _split_dora_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    dora = {k: kwargs.pop(k) for k in _DORA_ARGS if k in kwargs}
    return dora, kwargs


class DoRALinear(DoRAMixin, nnx.Linear):
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
        y = self._adapt(
            inputs,
            deterministic,
            dora_linen.kernel_map(nn.Dense, self, 1, copy=("dtype", "precision")),
            dora_linen.rank_map(self),
            dense_like=True,
        )
        return _constrain(_add_bias(y, self.bias), out_sharding)


class DoRALinearGeneral(DoRAMixin, nnx.LinearGeneral):
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
        expanded = tuple(
            inputs.shape[ax] if ax in batch_dims else 1
            for ax in range(inputs.ndim)
            if ax not in axis
        )
        to_output = lambda v: jnp.reshape(v, expanded + tuple(self.out_features))  # noqa: E731
        apply_kernel = dora_linen.kernel_map(
            nn.DenseGeneral,
            self,
            len(batch_dims) + len(axis),
            copy=("dtype", "precision"),
            axis=axis,
            batch_dims=batch_dims,
        )
        y = self._adapt(
            inputs,
            deterministic,
            apply_kernel,
            dora_linen.rank_map(self, len(batch_dims)),
            to_output,
        )
        return _constrain(_add_bias(y, self.bias, to_output), out_sharding)


class DoRAConv(DoRAMixin, nnx.Conv):
    """``nnx.Conv`` with a DoRA adapter.

    Kernel ``(*window, in, out)``, ``lora_a (*window, in, r)`` (a convolution),
    ``lora_b (r, out)`` (a 1x1 projection), ``magnitude (out,)``. Grouped convolutions
    and masks are not supported.
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
        copy = (
            "dtype",
            "precision",
            "kernel_size",
            "strides",
            "padding",
            "input_dilation",
            "kernel_dilation",
        )
        y = self._adapt(
            inputs,
            deterministic,
            dora_linen.kernel_map(nn.Conv, self, len(self.kernel_size) + 1, copy=copy),
            dora_linen.rank_map(self),
        )
        return _constrain(_add_bias(y, self.bias), out_sharding)


class DoRAEinsum(DoRAMixin, nnx.Einsum):
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
        maps = dora_linen.einsum_maps(
            self.einsum_str, self.kernel.shape, self, copy=("dtype", "precision")
        )
        y = self._adapt(
            inputs,
            deterministic,
            maps.apply_kernel,
            maps.apply_lora_b,
            maps.to_output,
            apply_lora_a=maps.apply_lora_a,
        )
        to_bias = lambda bias: jnp.reshape(bias, maps.bias_broadcast)  # noqa: E731
        return _constrain(_add_bias(y, self.bias, to_bias), out_sharding)


class DoRAEmbed(DoRAMixin, nnx.Embed):
    """``nnx.Embed`` with a DoRA adapter.

    Table ``(vocab, features)``, ``lora_a (vocab, r)`` (looked up), ``lora_b (r,
    features)``, ``magnitude (features,)``; ``y = g * (E[x] + s * A[x] @ B)``, no dropout
    (as PEFT).
    """

    kernel_name = "embedding"
    default_lora_a_init = staticmethod(nnx.initializers.zeros_init())
    default_lora_b_init = staticmethod(nnx.initializers.normal(1.0))

    def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs, **kwargs):
        dora, embed = _split_dora_kwargs(kwargs)
        super().__init__(num_embeddings, features, rngs=rngs, **embed)
        self._init_adapters(ops.dense_layout(), rngs=rngs, **dora)

    def __call__(self, inputs: Array, out_sharding=None) -> Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"DoRAEmbed: input type must be an integer; got {inputs.dtype}.")
        lookup = dora_linen.kernel_map(
            nn.Embed,
            self,
            1,
            param="embedding",
            copy=("dtype",),
            num_embeddings=self.num_embeddings,
        )
        return _constrain(
            self._adapt(inputs, True, lookup, dora_linen.rank_map(self)), out_sharding
        )

    def attend(self, query: Array) -> Array:
        """``query @ W'.T`` for tied output embeddings, without forming ``W'``."""
        return ops.embed_attend(
            query,
            self.embedding[...],
            self.lora_a[...],
            self.lora_b[...],
            self.magnitude[...] if self.use_dora else None,
            self.scale,
            detach_norm=self.detach_norm,
            base_norm_sq=self._base_norm_sq(),
            norm=None if self.inference_norm is None else self.inference_norm[...],
            eps=self.eps,
        )


# --------------------------------------------------------------------------------------
# Surgery on unmodified NNX models.


class SavedParam(nnx.LoRAParam):
    """A base parameter trained in full (``DoRAConfig.modules_to_save``).

    An ``nnx.LoRAParam``, so the one filter ``nnx.LoRAParam`` selects everything that
    trains: the adapters and the saved modules.
    """


DORA_CLASSES: dict[type, type] = {
    nnx.Linear: DoRALinear,
    nnx.LinearGeneral: DoRALinearGeneral,
    nnx.Einsum: DoRAEinsum,
    nnx.Conv: DoRAConv,
    nnx.Embed: DoRAEmbed,
}


def apply_dora(model: nnx.Module, config: DoRAConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Put DoRA into an NNX model, in place; return it.

    Every ``nnx.Linear``, ``LinearGeneral``, ``Einsum``, ``Conv`` and ``Embed`` whose
    path ``config`` selects becomes its DoRA counterpart, keeping the pretrained kernel
    and bias variables; the parameters of ``modules_to_save`` become
    :class:`SavedParam`. Afterwards ``nnx.LoRAParam`` filters exactly the trainable
    variables.

    Raises:
      ValueError: if ``targets`` match no adaptable layer (listing the ones that exist,
        closest first), match a module of another kind, or ask a layer for a rank it
        cannot have.
    """
    if not isinstance(config, DoRAConfig):
        raise TypeError(f"apply_dora needs a DoRAConfig; got {type(config).__name__}.")
    modules = [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module) and p]
    paths, adaptable, chosen, saved = [], [], [], []
    for path, module in modules:
        name = "/".join(str(p) for p in path)
        paths.append(name)
        if isinstance(module, DoRAMixin):
            continue
        if type(module) in DORA_CLASSES:
            adaptable.append(name)
        if config.is_target(name):
            if type(module) not in DORA_CLASSES:
                raise ValueError(
                    f"DoRAConfig targets match {name!r}, a {type(module).__module__}."
                    f"{type(module).__name__}; DoRA adapts nnx.Linear, nnx.LinearGeneral, "
                    f"nnx.Einsum, nnx.Conv and nnx.Embed. Narrow `targets` or add {name!r} "
                    f"to `exclude`."
                )
            chosen.append((path, name, module))
        elif config.is_saved(name):
            saved.append(module)
    holding_params = {  # the modules that hold a parameter directly
        "/".join(str(p) for p in path[:-1])
        for path, variable in nnx.iter_graph(model)
        if isinstance(variable, nnx.Param) and len(path) > 1
    }
    config.check_matched(paths, adaptable, param_paths=holding_params)
    # Build every replacement before changing anything: an error leaves the model as is.
    replacements = []
    for path, name, module in chosen:
        settings = dataclasses.asdict(config.settings(name))
        try:
            layer = DORA_CLASSES[type(module)].from_module(module, rngs=rngs, **settings)
        except ValueError as error:
            raise ValueError(f"{name!r}: {error}") from None
        replacements.append((model, path, layer))
    for module in saved:
        for variable_path, variable in nnx.iter_graph(module):
            if type(variable) is nnx.Param:
                replacements.append((module, variable_path, SavedParam(variable[...])))
    for root, path, value in replacements:
        _replace(root, path, value)
    return model


def merge(model: nnx.Module) -> nnx.Module:
    """Fold every DoRA layer into its plain Flax layer, in place; return the model.

    ``W' = m / ||W0 + s*A@B||_c * (W0 + s*A@B)`` in float32, cast once to the kernel's
    dtype; :class:`SavedParam` variables become ``nnx.Param`` again. The result has the
    unadapted model's structure and runs at its speed.
    """
    for path, module in list(nnx.iter_graph(model)):
        if isinstance(module, DoRAMixin):
            _replace(model, path, module.merged())
        elif isinstance(module, SavedParam):
            _replace(model, path, nnx.Param(module[...]))
    return model


def cache_base_norms(model: nnx.Module) -> nnx.Module:
    """Cache every DoRA layer's ``||W0||_c^2``, in place; return the model.

    The cache depends on the layer's kernel as it is now, and on nothing else: it saves
    squaring the frozen ``W0`` in every training step (the step computes the same
    numbers with or without it). Call it after the base weights are final (after
    loading pretrained weights and :meth:`DoRAMixin.recompute_magnitude`), and again
    whenever a kernel's value changes: a layer cannot see ``kernel[...] = w`` or
    ``nnx.update``. Assigning a new kernel variable drops the layer's caches.
    :func:`apply_dora` and ``from_module`` never create it.
    """
    for _, module in nnx.iter_graph(model):
        if isinstance(module, DoRAMixin):
            module.cache_base_norm()
    return model


def clear_base_norms(model: nnx.Module) -> nnx.Module:
    """Drop every ``||W0||_c^2`` cache set by :func:`cache_base_norms`, in place."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, DoRAMixin):
            module.clear_base_norm()
    return model


def cache_norms(model: nnx.Module) -> nnx.Module:
    """Cache every DoRA layer's whole norm for inference, in place; return the model.

    An unmerged layer then skips the ``A^T W0`` product: it costs an unmerged LoRA
    layer plus one ``(out,)`` scaling. Only the ``(out,)`` norm is stored. It depends on
    the kernel (``W0``) AND the adapters (``lora_a``, ``lora_b``) of this moment: call
    again after changing either, or ``recompute_magnitude()`` / :func:`clear_norms`
    before training. :func:`apply_dora` and ``from_module`` never create it.
    """
    for _, module in nnx.iter_graph(model):
        if isinstance(module, DoRAMixin):
            module.cache_norm()
    return model


def clear_norms(model: nnx.Module) -> nnx.Module:
    """Drop the inference norm caches set by :func:`cache_norms`, in place."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, DoRAMixin):
            module.inference_norm = nnx.data(None)
    return model


def as_linen_variables(model: nnx.Module) -> dict[str, Any]:
    """The adapters and their base weights in the Linen layout, as plain arrays.

    ``{"params": {path...: {"kernel", "bias"} or {"embedding"}}, "dora": {path...:
    {"lora_a", "lora_b", "magnitude"}}}`` for every DoRA layer, with the
    :class:`SavedParam` variables of saved modules under ``"params"`` too: what
    :mod:`dora_jax.peft` and :mod:`dora_jax.analysis` read. Paths are the module
    attribute names (list items by index), as :func:`apply_dora` names them.
    """
    params: dict[str, Any] = {}
    dora: dict[str, Any] = {}
    for path, node in nnx.iter_graph(model):
        keys = tuple(str(p) for p in path)
        if isinstance(node, DoRAMixin):
            adapters = {"lora_a": node.lora_a[...], "lora_b": node.lora_b[...]}
            if node.use_dora:
                adapters["magnitude"] = node.magnitude[...]
            _set_nested(dora, keys, adapters)
            base = {node.kernel_name: getattr(node, node.kernel_name)[...]}
            if getattr(node, "bias", None) is not None:
                base["bias"] = node.bias[...]
            _set_nested(params, keys, base)
        elif isinstance(node, SavedParam):
            _set_nested(params, keys, node[...])
    return {"params": params, dora_linen.DORA: dora}


def update_from_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> nnx.Module:
    """Set the model's adapters and saved parameters from Linen-layout ``variables``.

    The inverse of :func:`as_linen_variables` for everything that trains: every DoRA
    layer's ``lora_a``, ``lora_b``, ``magnitude`` and every :class:`SavedParam`; base
    kernels are left alone. Inference norm caches are dropped (they belonged to the old
    adapters). In place; returns the model.

    Raises:
      ValueError: naming the path when ``variables`` lacks a value or its shape differs.
    """
    updates = []
    for path, node in nnx.iter_graph(model):
        keys = tuple(str(p) for p in path)
        if isinstance(node, DoRAMixin):
            names = ("lora_a", "lora_b", "magnitude") if node.use_dora else ("lora_a", "lora_b")
            source = _get_nested(variables.get(dora_linen.DORA, {}), keys)
            for name in names:
                updates.append(("/".join((*keys, name)), getattr(node, name), source, name))
        elif isinstance(node, SavedParam):
            source = _get_nested(variables.get("params", {}), keys[:-1])
            updates.append(("/".join(keys), node, source, keys[-1]))
    new_values = []
    for where, variable, source, name in updates:
        value = None if source is None else source.get(name)
        if value is None or tuple(value.shape) != tuple(variable.shape):
            got = "nothing" if value is None else f"shape {tuple(value.shape)}"
            raise ValueError(f"{where!r}: expected shape {tuple(variable.shape)}; got {got}.")
        new_values.append(jnp.asarray(value, variable.dtype))
    # Everything is checked before anything changes.
    for (_, variable, _, _), value in zip(updates, new_values, strict=True):
        variable.set_value(value)
    return clear_norms(model)


def _set_nested(tree: dict, keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def _get_nested(tree: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _replace(root: Any, path: tuple, value: Any) -> None:
    parent = root
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


def summary(model: nnx.Module):
    """Adapted layers, saved modules and trainable / total counts of an NNX model.

    ``print(summary(model))`` prints a table like PEFT's ``print_trainable_parameters``.
    Trainable means ``nnx.LoRAParam`` (adapters and :class:`SavedParam`).
    """
    layers, saved = [], {}
    for path, node in nnx.iter_graph(model):
        name = "/".join(str(p) for p in path)
        if isinstance(node, DoRAMixin):
            magnitude = node.magnitude if node.use_dora else None
            layers.append(
                dora_summary.AdaptedLayer(
                    path=name,
                    kernel_shape=tuple(getattr(node, node.kernel_name).shape),
                    lora_a_shape=tuple(node.lora_a.shape),
                    lora_b_shape=tuple(node.lora_b.shape),
                    magnitude_shape=None if magnitude is None else tuple(magnitude.shape),
                )
            )
        elif isinstance(node, SavedParam):
            module = "/".join(str(p) for p in path[:-1])
            saved[module] = saved.get(module, 0) + node.size
    count = lambda f: sum(v.size for v in jax.tree.leaves(nnx.state(model, f)))  # noqa: E731
    return dora_summary.Summary(
        tuple(layers), tuple(saved.items()), count(nnx.LoRAParam), count(nnx.Param)
    )
