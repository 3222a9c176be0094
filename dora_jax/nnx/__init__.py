"""DoRA for Flax NNX: layers (:mod:`dora_jax.nnx.layers`) and model surgery
(:mod:`dora_jax.nnx.surgery`).

Each DoRA layer subclasses the NNX layer it adapts (``DoRALinear`` is an ``nnx.Linear``)
and computes with that layer's own products; the adapters are ``nnx.LoRAParam``
subclasses, so ``nnx.LoRAParam`` filters exactly what trains. :func:`apply_dora` adapts
an unmodified model in place and :func:`merge_adapters` folds the adapters back.
"""

from dora_jax.nnx.layers import (
    DORA_CLASSES,
    DoRAConv,
    DoRAEinsum,
    DoRAEmbed,
    DoRALayer,
    DoRALinear,
    DoRALinearGeneral,
    DoRAParam,
    Magnitude,
    NormCache,
)
from dora_jax.nnx.surgery import (
    SavedParam,
    apply_dora,
    as_linen_variables,
    cache_base_norms,
    cache_norms,
    clear_base_norms,
    clear_norms,
    merge_adapters,
    summary,
    update_from_linen_variables,
)


__all__ = [
    "DORA_CLASSES",
    "DoRAConv",
    "DoRAEinsum",
    "DoRAEmbed",
    "DoRALayer",
    "DoRALinear",
    "DoRALinearGeneral",
    "DoRAParam",
    "Magnitude",
    "NormCache",
    "SavedParam",
    "apply_dora",
    "as_linen_variables",
    "cache_base_norms",
    "cache_norms",
    "clear_base_norms",
    "clear_norms",
    "merge_adapters",
    "summary",
    "update_from_linen_variables",
]
