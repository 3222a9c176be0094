"""DoRA for Flax NNX: layers (:mod:`dora_jax.nnx.layers`) and model surgery
(:mod:`dora_jax.nnx.surgery`).

Each DoRA layer subclasses the NNX layer it adapts (``DoRALinear`` is an ``nnx.Linear``)
and computes with that layer's own products; the adapters are ``nnx.LoRAParam``
subclasses, so ``nnx.LoRAParam`` filters exactly what trains. :func:`apply_dora` adapts
an unmodified model in place and :func:`merge_adapters` folds the adapters back.
:func:`stack_adapters` and :func:`with_adapter_ids` (:mod:`dora_jax.nnx.multi`) run
``K`` adapters of one base in one batch, each example naming its adapter.
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
from dora_jax.nnx.multi import (
    STACKED_CLASSES,
    StackedConv,
    StackedEinsum,
    StackedLayer,
    StackedLinear,
    StackedLinearGeneral,
    StackedParam,
    cache_stacked_norms,
    stack_adapters,
    with_adapter_ids,
)
from dora_jax.nnx.surgery import (
    MergedAdapters,
    SavedParam,
    apply_dora,
    as_linen_variables,
    cache_base_norms,
    cache_norms,
    clear_base_norms,
    clear_norms,
    merge_adapters,
    merge_adapters_exact,
    summary,
    unmerge_adapters,
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
    "MergedAdapters",
    "NormCache",
    "STACKED_CLASSES",
    "SavedParam",
    "StackedConv",
    "StackedEinsum",
    "StackedLayer",
    "StackedLinear",
    "StackedLinearGeneral",
    "StackedParam",
    "apply_dora",
    "as_linen_variables",
    "cache_base_norms",
    "cache_norms",
    "cache_stacked_norms",
    "clear_base_norms",
    "clear_norms",
    "merge_adapters",
    "merge_adapters_exact",
    "stack_adapters",
    "summary",
    "unmerge_adapters",
    "update_from_linen_variables",
    "with_adapter_ids",
]
