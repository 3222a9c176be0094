"""dora-jax: DoRA (Weight-Decomposed Low-Rank Adaptation) for JAX and Flax.

The math lives once in :mod:`dora_jax.ops`; the layers are thin front ends:

* :mod:`dora_jax.linen`: ``DoRADense``, ``DoRADenseGeneral``, ``DoRAConv``, ``DoRAEmbed``
  (adapters in the ``"dora"`` collection);
* :mod:`dora_jax.nnx`: ``DoRALinear``, ``DoRALinearGeneral``, ``DoRAConv``, ``DoRAEmbed``
  (adapters are ``nnx.LoRAParam`` subclasses).
"""

from dora_jax import nnx, ops
from dora_jax.linen import (
    DoRAConv,
    DoRADense,
    DoRADenseGeneral,
    DoRAEmbed,
    recompute_magnitudes,
)

__version__ = "0.1.0"

__all__ = [
    "DoRAConv",
    "DoRADense",
    "DoRADenseGeneral",
    "DoRAEmbed",
    "nnx",
    "ops",
    "recompute_magnitudes",
]
