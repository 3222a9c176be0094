"""BoundAdapter variables of Linen layers: where they live (stores), how they are created,
and :class:`BoundAdapter`, which runs one layer's adapted forward."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax

from dora_jax import ops
from dora_jax.adapters import (
    BASE_NORM_SQ,
    CACHE_LEAVES,
    DORA,
    DORA_CACHE,
    INFERENCE_NORM,
    Adapters,
    adapted_output,
    kaiming_uniform,
)
from dora_jax.config import LayerSettings

Array = jax.Array
RESERVED_PREFIX = "dora_"  # wrapped models: adapters are params named dora_<name> in traces

# A store reads or creates one adapter variable: (name, init) -> value; caches are
# optional (None if absent), and init=None only reads.
Store = Callable[[str, Callable[[], Array] | None], Array | None]


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
        # Caches are only read: the whole-model helpers (dora_jax.linen.models) make them.
        base_norm_sq = store(BASE_NORM_SQ, None)
        if base_norm_sq is not None and base_norm_sq.shape != m_shape:
            raise ValueError(
                f"{where}: cached {BASE_NORM_SQ} has shape {base_norm_sq.shape}, expected "
                f"{m_shape} for kernel {kernel.shape}."
            )
        norm = store(INFERENCE_NORM, None)
    return Adapters(lora_a, lora_b, magnitude, base_norm_sq, norm)


def _identity(v: Array) -> Array:
    return v


@dataclasses.dataclass(frozen=True)
class BoundAdapter:
    """One layer's DoRA adapter: where its variables live and how it runs.

    Calling it with the layer's kernel and linear maps gives the adapted output without
    bias (:func:`dora_jax.ops.adapter_forward`). It has no other mode: merging and the
    norm caches are functions of the variables (:mod:`dora_jax.linen.models`).
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
