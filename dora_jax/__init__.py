"""dora-jax: DoRA (Weight-Decomposed Low-Rank Adaptation) for JAX and Flax.

The math lives once in :mod:`dora_jax.ops`; :mod:`dora_jax.adapters` holds what the two
front ends share (names, the layer hyperparameters, the adapted forward) and imports
neither; the front ends are siblings that never import each other (the layering is in
``docs/design.md`` and checked by ``lint-imports``):

* :mod:`dora_jax.linen`: drop-in layers ``DoRADense``, ``DoRADenseGeneral``,
  ``DoRAEinsum``, ``DoRAConv``, ``DoRAEmbed`` (adapters in the ``"dora"`` collection),
  and :func:`~dora_jax.linen.wrap` for unmodified Linen models;
* :mod:`dora_jax.nnx`: ``DoRALinear``, ``DoRALinearGeneral``, ``DoRAEinsum``,
  ``DoRAConv``, ``DoRAEmbed`` (adapters are ``nnx.LoRAParam`` subclasses) and in-place
  :func:`~dora_jax.nnx.apply_dora` for unmodified NNX models, computing with each
  layer's own products (``dot_general``, ``precision``, ...);
* :class:`DoRAConfig`: which layers to adapt, and how;
* :mod:`dora_jax.train`: the frozen-base training step, data parallel, FSDP, multi-host;
* :mod:`dora_jax.summary`: trainable-parameter summaries;
* :mod:`dora_jax.checkpoint`: adapter-only Orbax checkpoints that resume exactly;
* :mod:`dora_jax.peft`: adapters to and from HuggingFace PEFT;
* :mod:`dora_jax.analysis`: magnitude and direction changes (the paper's section 2).
"""

from dora_jax import adapters, analysis, checkpoint, linen, nnx, ops, peft, summary, train
from dora_jax.config import DoRAConfig, LayerSettings
from dora_jax.linen import (
    DoRAConv,
    DoRADense,
    DoRADenseGeneral,
    DoRAEinsum,
    DoRAEmbed,
    cache_base_norms,
    cache_norms,
    merge_params,
    recompute_magnitudes,
)

__version__ = "0.1.0"

__all__ = [
    "DoRAConfig",
    "DoRAConv",
    "DoRADense",
    "DoRADenseGeneral",
    "DoRAEinsum",
    "DoRAEmbed",
    "LayerSettings",
    "adapters",
    "analysis",
    "cache_base_norms",
    "cache_norms",
    "checkpoint",
    "linen",
    "merge_params",
    "nnx",
    "ops",
    "peft",
    "recompute_magnitudes",
    "summary",
    "train",
]
