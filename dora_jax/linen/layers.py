"""The Linen DoRA layers: each a subclass of the Flax layer it adapts."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax

from dora_jax import ops
from dora_jax.adapters import (
    SETTINGS,
    check_dropout,
    default_inits,
)
from dora_jax.config import LayerSettings
from dora_jax.linen.calls import (
    conv_call,
    dense_call,
    dense_general_call,
    einsum_call,
    embed_attend,
    embed_call,
    kernel_param,
)
from dora_jax.linen.variables import BoundAdapter, collection_store, describe

Array = jax.Array


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
      stacking: when ``x @ W0`` and ``A^T W0`` are one product
        (:class:`dora_jax.ops.Stacking`; default: the backend's measured threshold).
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

    def _adapter(self, deterministic: bool | None = None) -> BoundAdapter:
        check_dropout(self.dropout, describe(self))
        a_init, b_init = default_inits(self.is_embedding)
        return BoundAdapter(
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
        self.embedding = kernel_param(self, self.embedding_init, shape, name="embedding")
        self.adapters = self._adapter().variables(self.embedding, ops.dense_layout())

    def __call__(self, inputs: Array) -> Array:
        return embed_call(self, inputs, self._adapter(), self.adapters)

    def attend(self, query: Array) -> Array:
        """``query @ W'.T`` for tied output embeddings, without forming ``W'``."""
        return embed_attend(self, query, self._adapter(), self.adapters)
