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

**Many adapters in one batch.** :func:`stack_adapters` stacks ``K`` adapters trained
on one base; ``StackedModel.apply(variables, x, adapter_ids=ids)`` runs example ``i``
through adapter ``ids[i]`` (``-1``: the base) with one shared ``x @ W0``
(:mod:`dora_jax.linen.multi`).

The frozen linear map (padding, dilation, precision, dtype promotion) is Flax's own: a
plain Flax layer runs on ``W0`` and on ``A``; the DoRA math is :mod:`dora_jax.ops`.
"""

from dora_jax.adapters import DORA, DORA_CACHE
from dora_jax.linen.layers import (
    DoRAConv,
    DoRADense,
    DoRADenseGeneral,
    DoRAEinsum,
    DoRAEmbed,
    DoRAMixin,
)
from dora_jax.linen.models import (
    LayerFacts,
    adapted_layers,
    cache_base_norms,
    cache_norms,
    merge_params,
    merge_params_exact,
    recompute_magnitudes,
    summary,
    unmerge_params,
)
from dora_jax.linen.multi import StackedModel, stack_adapters
from dora_jax.linen.wrap import DoRAModel, join_adapters, split_adapters, wrap

__all__ = [
    "DORA",
    "DORA_CACHE",
    "DoRAConv",
    "DoRADense",
    "DoRADenseGeneral",
    "DoRAEinsum",
    "DoRAEmbed",
    "DoRAMixin",
    "DoRAModel",
    "LayerFacts",
    "adapted_layers",
    "cache_base_norms",
    "cache_norms",
    "join_adapters",
    "merge_params",
    "merge_params_exact",
    "recompute_magnitudes",
    "split_adapters",
    "stack_adapters",
    "StackedModel",
    "unmerge_params",
    "summary",
    "wrap",
]
