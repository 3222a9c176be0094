"""DoRA for Flax Linen: drop-in layers, and wrapping of unmodified models.

**Layers.** Each layer is a subclass of the Flax layer it adapts (``DoRADense`` is an
``nn.Dense``) with the same constructor arguments plus the DoRA hyperparameters, and the
same ``"params"`` collection, so a pretrained checkpoint loads unchanged::

    "params":     kernel, bias                  the frozen base, exactly as in Flax
    "dora":       lora_a, lora_b, magnitude     trainable
    "dora_cache": base_norm_sq                  ||W0||_c^2, only if asked for (see below)

``init`` returns ``params`` and ``dora`` only. Without a cache, ``apply`` computes
``||W0||_c^2`` from the kernel it is given, so ``init``, then pretrained weights put
into ``variables["params"]``, then ``apply`` computes DoRA of those weights. The
magnitudes are still those of the kernel present at ``init``: after loading new base
weights call :func:`recompute_magnitudes` (PEFT's initialisation of ``m``).

``dora_cache`` only saves squaring the frozen ``W0`` every training step. It is made by
an explicit call, :func:`cache_base_norms`, from the params as they are then; it is
valid for those params only: call it again after they change.

**Wrapping.** :func:`wrap` adapts the ``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``
and ``Embed`` layers of any Linen model that a :class:`~dora_jax.DoRAConfig` selects,
through ``nn.intercept_methods``: no model code changes, and ``nn.scan`` / ``nn.remat``
models work because, inside the trace, adapters are ``params`` under reserved names
(``dora_lora_a`` ...), which every lifted transform already carries. The wrapper's
``init`` and ``apply`` move them to and from the ``"dora"`` and ``"dora_cache"``
collections, so users see the same collections as with the layers. The wrapper is not a
module of its own: it runs the model's own ``init`` / ``apply`` (any ``method=``, names
and functions alike) under the interceptor, so it takes no name from the model.

The frozen linear map (padding, dilation, precision, dtype promotion) is Flax's own: a
plain Flax layer runs on ``W0`` and on ``A``; the DoRA math is :mod:`dora_jax.ops`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dora_jax import ops
from dora_jax import summary as dora_summary
from dora_jax.adapters import (
    ADAPTER_LEAVES,
    BASE_NORM_SQ,
    CACHE_LEAVES,
    DORA,
    DORA_CACHE,
    INFERENCE_NORM,
    SETTINGS,
    Adapters,
    adapted_output,
    as_tuple,
    check_dropout,
    default_inits,
    dense_general_output_shape,
    drop_leaves,
    einsum_plan,
    has_leaf,
    kaiming_uniform,
    merge_trees,
    normalize_axes,
)
from dora_jax.config import DoRAConfig, LayerSettings

Array = jax.Array
# The names dora_jax.train imports from here (dora_jax.adapters defines them).
NORM = INFERENCE_NORM
_drop_leaves = drop_leaves
RESERVED_PREFIX = "dora_"  # wrapped models: adapters are params named dora_<name> in traces

# A store reads or creates one adapter variable: (name, init) -> value; caches are
# optional (None if absent), and init=None only reads.
Store = Callable[[str, Callable[[], Array] | None], Array | None]

_merging = contextvars.ContextVar("dora_jax_merging", default=False)
_caching_norms = contextvars.ContextVar("dora_jax_caching_norms", default=False)
# Set only by cache_base_norms (and recompute_magnitudes refreshing an existing cache):
# the ||W0||_c^2 cache depends on the params, so nothing creates it implicitly.
_caching_base_norms = contextvars.ContextVar("dora_jax_caching_base_norms", default=False)


# --------------------------------------------------------------------------------------
# The frozen layers' linear maps, applied to any kernel.


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


# --------------------------------------------------------------------------------------
# Adapter variables and the adapted forward, shared by the layers and the wrapper.


def describe(module: nn.Module) -> str:
    """``"DoRADense 'encoder/query'"``: a module's type and path, for error messages."""
    path = module_path(module)
    return f"{type(module).__name__} {path!r}" if path else type(module).__name__


def module_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.scope.path) if module.scope else ""


def collection_store(module: nn.Module) -> Store:
    """Adapters in the ``"dora"`` collection, the cache in ``"dora_cache"``."""

    def variable(name: str, init: Callable[[], Array] | None) -> Array | None:
        collection = DORA_CACHE if name in CACHE_LEAVES else DORA
        return _get_or_create(module, collection, name, init, optional=name in CACHE_LEAVES)

    return variable


def params_store(module: nn.Module) -> Store:
    """Adapters as ``params`` under reserved names (inside a wrapped model's trace)."""

    def variable(name: str, init: Callable[[], Array] | None) -> Array | None:
        return _get_or_create(
            module, "params", RESERVED_PREFIX + name, init, optional=name in CACHE_LEAVES
        )

    return variable


def _get_or_create(module, collection, name, init, optional):
    value = module.get_variable(collection, name)
    if value is not None:
        return value
    if init is None or not module.is_mutable_collection(collection):
        if optional:
            return None
        raise ValueError(
            f"{describe(module)}: no adapter {name!r} in the variables given to apply; "
            f"pass the {DORA!r} collection made by init."
        )
    return module.variable(collection, name, init).value


def create_adapters(
    module: nn.Module,
    kernel: Array,
    layout: ops.Layout,
    settings: LayerSettings,
    store: Store,
    lora_a_init: nn.initializers.Initializer | None,
    lora_b_init: nn.initializers.Initializer | None,
):
    """Read or create one layer's :class:`Adapters`.

    Magnitudes are PEFT's initialisation ``||W0 + s*A@B||_c`` of the kernel present at
    creation. The ``base_norm_sq`` cache is read if present and created only inside
    :func:`cache_base_norms`. Raises ``ValueError`` naming the layer for bad ranks,
    integer kernels and adapters that do not fit the kernel.
    """
    where = describe(module)
    ops.check_kernel(kernel, where)
    ops.check_rank(settings.rank, kernel.shape, layout, where)
    a_shape, b_shape, m_shape = layout.lora_shapes(kernel.shape, settings.rank)
    dtype = settings.adapter_dtype
    lora_a_init = lora_a_init or kaiming_uniform(layout)
    lora_b_init = lora_b_init or nn.initializers.zeros_init()
    lora_a = store("lora_a", lambda: lora_a_init(module.make_rng("params"), a_shape, dtype))
    lora_b = store("lora_b", lambda: lora_b_init(module.make_rng("params"), b_shape, dtype))
    magnitude = base_norm_sq = norm = None
    if settings.use_dora:
        magnitude = store(
            "magnitude",
            lambda: ops.init_magnitude(kernel, lora_a, lora_b, settings.scale, layout).astype(
                dtype
            ),
        )
    m_given = None if magnitude is None else magnitude.shape
    rank = ops.check_adapter_shapes(
        kernel.shape, layout, lora_a.shape, lora_b.shape, m_given, where
    )
    if rank != settings.rank:
        raise ValueError(
            f"{where}: configured rank is {settings.rank} but the adapters have rank {rank} "
            f"(lora_a {lora_a.shape}, lora_b {lora_b.shape})."
        )
    if settings.use_dora:
        cache_init = None
        if _caching_base_norms.get():
            cache_init = lambda: ops.column_norm_sq(kernel, layout)  # noqa: E731
        base_norm_sq = store(BASE_NORM_SQ, cache_init)
        if base_norm_sq is not None and base_norm_sq.shape != m_shape:
            raise ValueError(
                f"{where}: cached {BASE_NORM_SQ} has shape {base_norm_sq.shape}, expected "
                f"{m_shape} for kernel {kernel.shape}."
            )
        norm_init = None
        if _caching_norms.get():
            norm_init = lambda: ops.dora_norm(  # noqa: E731
                kernel,
                lora_a,
                lora_b,
                settings.scale,
                layout,
                base_norm_sq=base_norm_sq,
                eps=settings.eps,
            )
        norm = store(INFERENCE_NORM, norm_init)
    return Adapters(lora_a, lora_b, magnitude, base_norm_sq, norm)


def _identity(v: Array) -> Array:
    return v


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One layer's DoRA adapter: where its variables live and how it runs.

    Calling it with the layer's kernel and linear maps gives the adapted output without
    bias (:func:`dora_jax.ops.adapter_forward`); while :func:`merge_params` runs, it
    instead writes the merged kernel back and returns the plain layer's output.
    """

    module: nn.Module
    settings: LayerSettings
    store: Store
    dropout: Callable[[Array], Array | None]
    lora_a_init: nn.initializers.Initializer | None
    lora_b_init: nn.initializers.Initializer | None
    kernel_name: str = "kernel"

    def variables(self, kernel: Array, layout: ops.Layout):
        return create_adapters(
            self.module,
            kernel,
            layout,
            self.settings,
            self.store,
            self.lora_a_init,
            self.lora_b_init,
        )

    def __call__(
        self,
        x: Array,
        kernel: Array,
        layout: ops.Layout,
        apply_kernel: Callable[[Array, Array], Array],
        apply_lora_b: Callable[[Array, Array], Array],
        to_output: Callable[[Array], Array] = _identity,
        apply_lora_a: Callable[[Array, Array], Array] | None = None,
        adapters: Adapters | None = None,
        dense_like: bool = False,
    ) -> Array:
        lora_a, lora_b, magnitude, base_norm_sq, norm = adapters or self.variables(kernel, layout)
        if _merging.get():
            merged = ops.merge(
                kernel,
                lora_a,
                lora_b,
                magnitude,
                self.settings.scale,
                layout,
                eps=self.settings.eps,
            )
            self.module.put_variable("params", self.kernel_name, merged)
            return apply_kernel(x, merged)
        return adapted_output(
            x,
            kernel,
            layout,
            Adapters(lora_a, lora_b, magnitude, base_norm_sq, norm),
            self.settings,
            self.dropout(x),
            apply_kernel=apply_kernel,
            apply_lora_b=apply_lora_b,
            apply_lora_a=apply_lora_a,
            dense_like=dense_like,
            to_output=to_output,
        )


# --------------------------------------------------------------------------------------
# Each Flax layer's parameters, created exactly as Flax does, then the adapted forward.


def _kernel_param(module: nn.Module, init, shape, name: str = "kernel") -> Array:
    """``module.param(name, ...)``, refusing a non-float kernel before initialising it."""
    if not module.has_variable("params", name):
        ops.check_kernel(jax.ShapeDtypeStruct(tuple(shape), module.param_dtype), describe(module))
    return module.param(name, init, tuple(shape), module.param_dtype)


def _bias_param(module: nn.Module, init, shape) -> Array | None:
    """The layer's ``bias`` exactly as Flax creates it, or ``None`` without one."""
    return module.param("bias", init, tuple(shape), module.param_dtype) if module.use_bias else None


def _add_bias(y: Array, bias: Array | None, to_output=_identity) -> Array:
    return y if bias is None else y + to_output(bias).astype(y.dtype)


def dense_call(module: nn.Dense, inputs: Array, adapter: Adapter) -> Array:
    kernel = _kernel_param(module, module.kernel_init, (jnp.shape(inputs)[-1], module.features))
    bias = _bias_param(module, module.bias_init, (module.features,))
    y = adapter(
        inputs,
        kernel,
        ops.dense_layout(),
        kernel_map(nn.Dense, module, 1),
        rank_map(module),
        # A custom dot_general (say, quantised) sees x alone, never x stacked with A^T.
        dense_like=module.dot_general is None and module.dot_general_cls is None,
    )
    return _add_bias(y, bias)


def dense_general_call(module: nn.DenseGeneral, inputs: Array, adapter: Adapter) -> Array:
    features = as_tuple(module.features)
    axis = normalize_axes(as_tuple(module.axis), inputs.ndim)
    batch_dims = normalize_axes(as_tuple(module.batch_dims), inputs.ndim)
    if batch_dims and batch_dims != tuple(range(len(batch_dims))):
        raise ValueError(
            f"{describe(module)}: batch_dims {batch_dims} must be consecutive leading "
            f"dimensions starting from 0."
        )
    n_batch, n_in, n_out = len(batch_dims), len(axis), len(features)
    batch_shape = tuple(inputs.shape[ax] for ax in batch_dims)
    in_shape = tuple(inputs.shape[ax] for ax in axis)
    kernel = _kernel_param(
        module,
        _flat_init(module.kernel_init, n_batch, n_in, n_out),
        batch_shape + in_shape + features,
    )
    bias = _bias_param(
        module, _flat_init(module.bias_init, n_batch, 0, n_out), batch_shape + features
    )
    # (*batch, *out) values -> broadcastable against the output (*batch, *other, *out).
    shape = dense_general_output_shape(inputs.shape, axis, batch_dims, features)
    to_output = lambda v: jnp.reshape(v, shape)  # noqa: E731
    y = adapter(
        inputs,
        kernel,
        ops.dense_general_layout(n_batch, n_in, n_out),
        kernel_map(nn.DenseGeneral, module, n_batch + n_in),
        rank_map(module, n_batch),
        to_output,
    )
    return _add_bias(y, bias, to_output)


def conv_call(module: nn.Conv, inputs: Array, adapter: Adapter) -> Array:
    kernel_size = (
        (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
    )
    if module.feature_group_count != 1 or module.mask is not None:
        raise ValueError(
            f"{describe(module)}: DoRA supports convolutions with feature_group_count=1 and "
            f"no mask; got feature_group_count={module.feature_group_count}, "
            f"mask={'set' if module.mask is not None else None}."
        )
    kernel_shape = (*kernel_size, jnp.shape(inputs)[-1], module.features)
    kernel = _kernel_param(module, module.kernel_init, kernel_shape)
    bias = _bias_param(module, module.bias_init, (module.features,))
    y = adapter(
        inputs,
        kernel,
        ops.conv_layout(len(kernel_size)),
        kernel_map(nn.Conv, module, len(kernel_size) + 1),
        rank_map(module),
    )
    return _add_bias(y, bias)


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


def einsum_call(
    module: nn.Einsum, inputs: Array, einsum_str: str | None, adapter: Adapter
) -> Array:
    equation = nn.merge_param("einsum_str", module.einsum_str, einsum_str).replace(" ", "")
    kernel = _kernel_param(module, module.kernel_init, module.shape)
    try:
        maps = einsum_maps(equation, kernel.shape, module)
    except ValueError as error:
        raise ValueError(f"{describe(module)}: {error}") from None
    bias = _bias_param(module, module.bias_init, maps.bias_shape)
    y = adapter(
        inputs,
        kernel,
        maps.layout,
        maps.apply_kernel,
        maps.apply_lora_b,
        maps.to_output,
        apply_lora_a=maps.apply_lora_a,
    )
    return y if bias is None else y + jnp.reshape(bias, maps.bias_broadcast).astype(y.dtype)


def embed_call(module: nn.Embed, inputs: Array, adapter: Adapter, adapters) -> Array:
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
        raise ValueError(f"{describe(module)}: input type must be an integer; got {inputs.dtype}.")
    lookup = kernel_map(
        nn.Embed, module, 1, param="embedding", num_embeddings=module.num_embeddings
    )
    # PEFT applies no dropout to embeddings.
    adapter = dataclasses.replace(adapter, dropout=lambda x: None, kernel_name="embedding")
    return adapter(
        inputs, module.embedding, ops.dense_layout(), lookup, rank_map(module), adapters=adapters
    )


def embed_attend(module: nn.Embed, query: Array, adapter: Adapter, adapters: Adapters) -> Array:
    lora_a, lora_b, magnitude, base_norm_sq, norm = adapters
    settings = adapter.settings
    return ops.embed_attend(
        query,
        module.embedding,
        lora_a,
        lora_b,
        magnitude,
        settings.scale,
        detach_norm=settings.detach_norm,
        base_norm_sq=base_norm_sq,
        norm=norm,
        eps=settings.eps,
    )


# --------------------------------------------------------------------------------------
# The layers.


def _settings_fields(base: type) -> type:
    """``base`` with the fields of :class:`LayerSettings` (names, types, defaults): the
    Linen layers declare the hyperparameters from their one definition."""
    fields = dataclasses.fields(LayerSettings)
    namespace = {f.name: f.default for f in fields}
    namespace["__annotations__"] = {f.name: f.type for f in fields}
    namespace["__module__"] = __name__
    return type("LayerSettingsFields", (base,), namespace)


class DoRAMixin(_settings_fields(nn.Module)):
    """The DoRA hyperparameters shared by every Linen layer.

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

    deterministic: bool | None = None
    lora_a_init: nn.initializers.Initializer | None = None
    lora_b_init: nn.initializers.Initializer | None = None

    is_embedding = False  # class attribute, not a field

    @property
    def scale(self) -> float:
        return ops.scaling(self.rank, self.alpha, self.rslora)

    def _adapter(self, deterministic: bool | None = None) -> Adapter:
        check_dropout(self.dropout, describe(self))
        a_init, b_init = default_inits(self.is_embedding)
        return Adapter(
            module=self,
            settings=LayerSettings(**{name: getattr(self, name) for name in SETTINGS}),
            store=collection_store(self),
            dropout=functools.partial(self._dropped, deterministic=deterministic),
            lora_a_init=self.lora_a_init or a_init,
            lora_b_init=self.lora_b_init or b_init,
        )

    def _dropped(self, x: Array, deterministic: bool | None) -> Array | None:
        """The dropped-out input in training with dropout, else ``None``."""
        if self.dropout == 0.0:
            return None
        if nn.merge_param("deterministic", self.deterministic, deterministic):
            return None
        return nn.Dropout(rate=self.dropout, name="lora_dropout")(x, deterministic=False)


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
        return dense_call(self, inputs, self._adapter(deterministic))


class DoRADenseGeneral(DoRAMixin, nn.DenseGeneral):
    """``nn.DenseGeneral`` with a DoRA adapter.

    Kernel ``(*batch, *in, *out)``; ``lora_a (*batch, *in, r)``,
    ``lora_b (*batch, r, *out)``, ``magnitude (*batch, *out)``; the norm reduces the
    ``in`` block.
    """

    @nn.compact
    def __call__(self, inputs: Array, deterministic: bool | None = None) -> Array:
        return dense_general_call(self, inputs, self._adapter(deterministic))


class DoRAConv(DoRAMixin, nn.Conv):
    """``nn.Conv`` with a DoRA adapter.

    Kernel ``(*window, in, out)``; ``lora_a (*window, in, r)`` is a convolution with
    the layer's window, strides and padding, ``lora_b (r, out)`` a 1x1 projection
    (as PEFT); ``magnitude (out,)``, the norm reducing every axis but the last.
    Grouped convolutions and masks are not supported.
    """

    @nn.compact
    def __call__(self, inputs: Array, deterministic: bool | None = None) -> Array:
        return conv_call(self, inputs, self._adapter(deterministic))


class DoRAEinsum(DoRAMixin, nn.Einsum):
    """``nn.Einsum`` with a DoRA adapter.

    The kernel's axes split into batch axes (in the input and the output), input axes
    (contracted; the norm reduces them) and output axes (see
    :func:`dora_jax.ops.einsum_layout`); ``lora_a (*batch, *in, r)``,
    ``lora_b (*batch, r, *out)``, ``magnitude (*batch, *out)``.
    """

    @nn.compact
    def __call__(
        self, inputs: Array, einsum_str: str | None = None, deterministic: bool | None = None
    ) -> Array:
        return einsum_call(self, inputs, einsum_str, self._adapter(deterministic))


class DoRAEmbed(DoRAMixin, nn.Embed):
    """``nn.Embed`` with a DoRA adapter.

    Table ``(vocab, features)``; ``lora_a (vocab, r)`` is a table looked up like the
    embedding, ``lora_b (r, features)``, ``magnitude (features,)`` with the norm over
    the vocabulary axis (PEFT's convention). ``y = g * (E[x] + s * A[x] @ B)``. PEFT
    applies no dropout to embeddings, nor does this layer.
    """

    is_embedding = True

    def setup(self):
        shape = (self.num_embeddings, self.features)
        self.embedding = _kernel_param(self, self.embedding_init, shape, name="embedding")
        self.adapters = self._adapter().variables(self.embedding, ops.dense_layout())

    def __call__(self, inputs: Array) -> Array:
        return embed_call(self, inputs, self._adapter(), self.adapters)

    def attend(self, query: Array) -> Array:
        """``query @ W'.T`` for tied output embeddings, without forming ``W'``."""
        return embed_attend(self, query, self._adapter(), self.adapters)


# --------------------------------------------------------------------------------------
# Wrapping unmodified models.


# Exact types: a user's subclass may change the layer's computation, so it is not taken
# for a plain Flax layer.
ADAPTABLE = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed)


@dataclasses.dataclass
class _Trace:
    """What one trace of a wrapped model saw: every module path, the adaptable ones."""

    paths: set = dataclasses.field(default_factory=set)
    adaptable: set = dataclasses.field(default_factory=set)
    adapted: set = dataclasses.field(default_factory=set)


def _dropout_from_rng(module: nn.Module, rate: float) -> Callable[[Array], Array | None]:
    """Adapter dropout in a wrapped model: active when apply gets a ``"dropout"`` rng."""

    def dropped(x: Array) -> Array | None:
        if rate == 0.0 or not module.has_rng("dropout") or _merging.get():
            return None
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))

    return dropped


def _intercept(config: DoRAConfig, trace: _Trace, next_fun, args, kwargs, context):
    module = context.module
    path = module_path(module)
    if path:
        trace.paths.add(path)
    if isinstance(module, DoRAMixin) or not path or not config.is_target(path):
        if type(module) in ADAPTABLE and path:
            trace.adaptable.add(path)
        return next_fun(*args, **kwargs)
    if type(module) not in ADAPTABLE:
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        raise ValueError(
            f"DoRAConfig targets match {path!r}, a {type(module).__module__}."
            f"{type(module).__name__}; DoRA adapts nn.Dense, nn.DenseGeneral, nn.Einsum, "
            f"nn.Conv and nn.Embed layers. Narrow `targets` or add {path!r} to `exclude`."
        )
    trace.adaptable.add(path)
    trace.adapted.add(path)
    settings = config.settings(path)
    kind = type(module)
    a_init, b_init = default_inits(kind is nn.Embed)
    adapter = Adapter(
        module=module,
        settings=settings,
        store=params_store(module),
        dropout=_dropout_from_rng(module, settings.dropout),
        lora_a_init=a_init,
        lora_b_init=b_init,
    )
    if kind is nn.Embed:
        if context.method_name == "setup":
            next_fun(*args, **kwargs)
            adapters = adapter.variables(module.embedding, ops.dense_layout())
            object.__setattr__(module, "_dora_adapters", adapters)
            return None
        if context.method_name == "__call__":
            return embed_call(module, args[0], adapter, module._dora_adapters)
        if context.method_name == "attend":
            return embed_attend(module, args[0], adapter, module._dora_adapters)
        return next_fun(*args, **kwargs)
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    if kind is nn.Dense:
        return dense_call(module, *args, adapter)
    if kind is nn.DenseGeneral:
        return dense_general_call(module, *args, adapter)
    if kind is nn.Conv:
        return conv_call(module, *args, adapter)
    return einsum_call(
        module, args[0], kwargs.get("einsum_str", args[1] if len(args) > 1 else None), adapter
    )


@dataclasses.dataclass(frozen=True, eq=False)
class DoRAModel:
    """An unmodified Linen model with DoRA on the layers a config selects.

    Made by :func:`wrap`. ``init`` and ``apply`` take the model's own arguments (and
    Flax's ``method=``, ``rngs=``, ``mutable=`` ...); variables hold ``"params"``
    (exactly the model's), ``"dora"`` (trainable adapters, nested like the params) and,
    only after :func:`cache_base_norms`, ``"dora_cache"``. Adapter dropout runs when
    ``apply`` is given a ``"dropout"`` rng.

    The wrapper is not a Linen module and has no scope of its own: ``init`` and ``apply``
    are the model's own, run inside a method interceptor, so no name of the model is
    taken (a submodule may be called ``model``, ``config`` or anything else).
    """

    model: nn.Module
    config: DoRAConfig

    @contextlib.contextmanager
    def _adapting(self, method, params: Callable[[], Mapping[str, Any]]):
        """Adapt the targeted layers of every trace of the model run inside.

        A trace of the whole model (``method=None``) checks every setting of the config
        against what it saw (``params()`` gives the parameters of the run); a trace of
        another method sees part of the model, so only ``targets`` is checked there.
        """
        trace = _Trace()
        with nn.intercept_methods(functools.partial(_intercept, self.config, trace)):
            yield
        if not trace.paths:
            return
        if method is None:
            self.config.check_matched(
                trace.paths, trace.adaptable, param_paths=_module_paths_with_leaves(params())
            )
        elif not trace.adapted:
            self.config.check_matched(trace.paths, trace.adaptable)

    def init(self, rngs, *args, method=None, **kwargs) -> dict[str, Any]:
        """``init`` of the model plus adapters; magnitudes from the fresh base weights.

        ``method`` is Flax's: a method name (``"encode"``), an unbound method
        (``Model.encode``) or a function ``fn(module, *args)`` called with the model.
        Returns ``params`` and ``dora``; no cache (see :func:`cache_base_norms`).
        """
        variables = {}
        with self._adapting(method, lambda: variables.get("params", {})):
            variables = self.model.init(rngs, *args, method=method, **kwargs)
        return split_adapters(variables)

    def init_from_params(
        self, rngs, params: Mapping[str, Any], *args, method=None, **kwargs
    ) -> dict[str, Any]:
        """Adapters for pretrained ``params``: magnitudes are computed from them.

        Base parameters absent from ``params`` (a new classification head, say) are
        initialised as ``init`` would. ``method`` as in :meth:`init`. Returns ``params``
        and ``dora``; no cache (see :func:`cache_base_norms`).
        """
        rngs = {"params": rngs} if not isinstance(rngs, Mapping) else rngs
        variables = {}
        with self._adapting(method, lambda: variables.get("params", {})):
            _, variables = self.model.apply(
                {"params": params}, *args, rngs=rngs, mutable=True, method=method, **kwargs
            )
        return split_adapters(variables)

    def apply(self, variables, *args, method=None, mutable=False, **kwargs):
        """``apply`` of the model with the adapters in ``variables["dora"]``.

        ``method`` as in :meth:`init`. Without ``variables["dora_cache"]``, each layer's
        ``||W0||_c^2`` is computed from the ``params`` given.
        """
        joined = join_adapters(variables)
        with self._adapting(method, lambda: joined.get("params", {})):
            result = self.model.apply(joined, *args, method=method, mutable=mutable, **kwargs)
        if mutable is False:
            return result
        out, updates = result
        return out, split_adapters(updates)


def _module_paths_with_leaves(params: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The ``/``-joined paths of the modules in a params tree that hold arrays directly."""
    paths = []
    if any(not isinstance(v, Mapping) for v in params.values()) and prefix:
        paths.append(prefix)
    for name, value in params.items():
        if isinstance(value, Mapping):
            paths += _module_paths_with_leaves(value, f"{prefix}/{name}" if prefix else name)
    return paths


def wrap(model: nn.Module, config: DoRAConfig) -> DoRAModel:
    """Put DoRA into an unmodified Linen model.

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from dora_jax import DoRAConfig
    >>> mlp = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> model = wrap(mlp, DoRAConfig(targets=["layers_0"], rank=2))
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> jax.tree.map(jnp.shape, variables["dora"])
    {'layers_0': {'lora_a': (4, 2), 'lora_b': (2, 8), 'magnitude': (8,)}}
    """
    if not isinstance(config, DoRAConfig):
        raise TypeError(f"wrap needs a DoRAConfig; got {type(config).__name__}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap needs a flax.linen Module; got {type(model).__name__}.")
    if model.scope is not None:
        raise ValueError(
            f"wrap needs an unbound {type(model).__name__} (as passed to init/apply); "
            f"this one is bound to a scope."
        )
    return DoRAModel(model=model, config=config)


def split_adapters(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Move reserved-name adapter params into the ``"dora"`` / ``"dora_cache"`` collections."""
    variables = dict(variables)
    if "params" not in variables:
        return variables
    params, dora, cache = _split(variables["params"])
    variables["params"] = params
    for name, tree in ((DORA, dora), (DORA_CACHE, cache)):
        if tree:
            variables[name] = merge_trees(variables.get(name, {}), tree)
    return variables


def join_adapters(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`split_adapters`: adapters back into ``"params"``."""
    variables = dict(variables)
    dora, cache = variables.pop(DORA, {}), variables.pop(DORA_CACHE, {})
    params = variables.get("params", {})
    for tree in (dora, cache):
        params = merge_trees(params, _prefix_leaves(tree))
    if params:
        variables["params"] = params
    return variables


def _split(tree):
    params, dora, cache = {}, {}, {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            p, d, c = _split(value)
            if p:
                params[key] = p
            if d:
                dora[key] = d
            if c:
                cache[key] = c
        elif key.startswith(RESERVED_PREFIX) and key[len(RESERVED_PREFIX) :] in CACHE_LEAVES:
            cache[key[len(RESERVED_PREFIX) :]] = value
        elif key.startswith(RESERVED_PREFIX) and key[len(RESERVED_PREFIX) :] in ADAPTER_LEAVES:
            dora[key[len(RESERVED_PREFIX) :]] = value
        else:
            params[key] = value
    return params, dora, cache


def _prefix_leaves(tree):
    return {
        k if isinstance(v, Mapping) else RESERVED_PREFIX + k: _prefix_leaves(v)
        if isinstance(v, Mapping)
        else v
        for k, v in tree.items()
    }


# --------------------------------------------------------------------------------------
# Whole-model helpers: magnitudes from loaded weights, and merging.


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


def _flat_init(init, n_batch: int, n_in: int, n_out: int):
    """Initialise a DenseGeneral parameter as Flax does: on its flattened 2-d view."""

    def wrapped(key, shape, dtype=jnp.float32):
        batch = int(np.prod(shape[:n_batch]))
        fan_in = int(np.prod(shape[n_batch : n_batch + n_in]))
        fan_out = int(np.prod(shape[len(shape) - n_out :]))
        flat = (batch * fan_in, fan_out) if n_in else (batch * fan_out,)
        return jnp.reshape(init(key, flat, dtype), shape)

    return wrapped


__all__ = [
    "DoRAConv",
    "DoRADense",
    "DoRADenseGeneral",
    "DoRAEinsum",
    "DoRAEmbed",
    "DoRAMixin",
    "DoRAModel",
    "cache_base_norms",
    "cache_norms",
    "merge_params",
    "recompute_magnitudes",
    "wrap",
]


def summary(variables: Mapping[str, Any], config: DoRAConfig | None = None):
    """Adapted layers, ``modules_to_save`` and trainable / total parameter counts.

    ``print(summary(variables, config))`` prints a table like PEFT's
    ``print_trainable_parameters``; the :class:`dora_jax.summary.Summary` it returns
    holds the numbers.
    """
    return dora_summary.from_linen_variables(variables, config)
