"""Small, unmodified Flax models that the wrapping and surgery tests adapt.

* :class:`Bert`: a Linen BERT-style encoder. Module paths look like
  ``encoder/layer_0/attention/query``; even layers use a hand-written self-attention
  of ``nn.DenseGeneral`` ``query/key/value/out``, odd layers Flax's own
  ``nn.MultiHeadDotProductAttention`` (whose internals are ``DenseGeneral`` layers
  with the same names). Feed-forward ``intermediate`` / ``output`` are ``nn.Dense``,
  then a ``pooler`` and a ``classifier`` head.
* :class:`Gpt`: a Linen GPT-style decoder whose blocks are
  ``nn.scan(nn.remat(Block), variable_axes={"params": 0}, ...)`` over the layer axis
  (every block parameter has a leading layer axis), with an ``nn.Einsum`` MLP input
  projection and tied output embeddings (``nn.Embed.attend``).
* :class:`LinenCnn` / :class:`NnxCnn`: the same small CNN in Linen and NNX, with the same
  parameter names (``conv1``, ``conv2``, ``fc1``, ``head``), so weights copy across
  (:func:`cnn_params_to_nnx`).
* :class:`NnxEncoder`: an NNX encoder (``nnx.Embed``, self-attention of
  ``nnx.LinearGeneral`` ``query/key/value/out`` or, with ``flax_attention=True``, Flax's
  ``nnx.MultiHeadAttention`` with the same sub-layer names, ``nnx.Linear`` feed-forward,
  layers in an ``nnx.List``), paths like ``layers/0/attention/query``.

Widths are tiny so the tests stay fast on CPU.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# --------------------------------------------------------------------------------------
# Linen BERT-style encoder.


class SelfAttention(nn.Module):
    """Multi-head self-attention from ``nn.DenseGeneral`` query/key/value/out."""

    num_heads: int
    head_dim: int

    @nn.compact
    def __call__(self, x):
        hidden = x.shape[-1]
        heads = (self.num_heads, self.head_dim)
        q = nn.DenseGeneral(heads, name="query")(x)
        k = nn.DenseGeneral(heads, name="key")(x)
        v = nn.DenseGeneral(heads, name="value")(x)
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / self.head_dim**0.5)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return nn.DenseGeneral(hidden, axis=(-2, -1), name="out")(y)


class BertLayer(nn.Module):
    num_heads: int
    intermediate: int
    flax_attention: bool = False

    @nn.compact
    def __call__(self, x):
        hidden = x.shape[-1]
        if self.flax_attention:
            attention = nn.MultiHeadDotProductAttention(
                num_heads=self.num_heads, deterministic=True, name="attention"
            )
        else:
            attention = SelfAttention(self.num_heads, hidden // self.num_heads, name="attention")
        x = nn.LayerNorm(name="attention_norm")(x + attention(x))
        h = nn.gelu(nn.Dense(self.intermediate, name="intermediate")(x))
        h = nn.Dense(hidden, name="output")(h)
        return nn.LayerNorm(name="output_norm")(x + h)


class BertEncoder(nn.Module):
    num_layers: int
    num_heads: int
    intermediate: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = BertLayer(
                self.num_heads, self.intermediate, flax_attention=i % 2 == 1, name=f"layer_{i}"
            )(x)
        return x


class BertEmbeddings(nn.Module):
    vocab: int
    max_len: int
    hidden: int

    @nn.compact
    def __call__(self, ids):
        tokens = nn.Embed(self.vocab, self.hidden, name="word_embeddings")(ids)
        positions = nn.Embed(self.max_len, self.hidden, name="position_embeddings")(
            jnp.arange(ids.shape[-1])[None]
        )
        return nn.LayerNorm(name="norm")(tokens + positions)


class Bert(nn.Module):
    """BERT-style classifier: ``ids (batch, seq) -> logits (batch, num_classes)``."""

    vocab: int = 50
    max_len: int = 16
    hidden: int = 16
    num_layers: int = 2
    num_heads: int = 2
    intermediate: int = 32
    num_classes: int = 3

    @nn.compact
    def __call__(self, ids):
        x = BertEmbeddings(self.vocab, self.max_len, self.hidden, name="embeddings")(ids)
        x = BertEncoder(self.num_layers, self.num_heads, self.intermediate, name="encoder")(x)
        pooled = jnp.tanh(nn.Dense(self.hidden, name="pooler")(x[:, 0]))
        return nn.Dense(self.num_classes, name="classifier")(pooled)


# --------------------------------------------------------------------------------------
# Linen GPT-style decoder with scanned, rematerialised blocks.


class CausalAttention(nn.Module):
    num_heads: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        heads = (self.num_heads, d // self.num_heads)
        q = nn.DenseGeneral(heads, name="query")(x)
        k = nn.DenseGeneral(heads, name="key")(x)
        v = nn.DenseGeneral(heads, name="value")(x)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / heads[1] ** 0.5
        t = x.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
        y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits), v)
        return nn.DenseGeneral(d, axis=(-2, -1), name="out")(y)


class GptBlock(nn.Module):
    num_heads: int
    mlp: int

    @nn.compact
    def __call__(self, x, _):
        d = x.shape[-1]
        x = x + CausalAttention(self.num_heads, name="attn")(nn.LayerNorm(name="ln1")(x))
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.Einsum(shape=(d, self.mlp), einsum_str="btd,dh->bth", name="fc_in")(h)
        h = nn.Dense(d, name="fc_out")(nn.gelu(h))
        return x + h, None


class Gpt(nn.Module):
    """GPT-style decoder: ``ids (batch, seq) -> logits (batch, seq, vocab)``."""

    vocab: int = 40
    max_len: int = 16
    d: int = 16
    num_layers: int = 3
    num_heads: int = 2
    mlp: int = 32

    @nn.compact
    def __call__(self, ids):
        wte = nn.Embed(self.vocab, self.d, name="wte")
        wpe = nn.Embed(self.max_len, self.d, name="wpe")
        x = wte(ids) + wpe(jnp.arange(ids.shape[-1])[None])
        blocks = nn.scan(
            nn.remat(GptBlock),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.num_layers,
        )(self.num_heads, self.mlp, name="blocks")
        x, _ = blocks(x, None)
        return wte.attend(nn.LayerNorm(name="ln_f")(x))


# --------------------------------------------------------------------------------------
# The same CNN in Linen and NNX.

CNN_CHANNELS = (3, 8, 16)  # input, conv1, conv2
CNN_HIDDEN = 32
CNN_CLASSES = 10


class LinenCnn(nn.Module):
    """``x (batch, h, w, 3) -> logits (batch, 10)``."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(CNN_CHANNELS[1], (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(CNN_CHANNELS[2], (3, 3), strides=2, name="conv2")(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.relu(nn.Dense(CNN_HIDDEN, name="fc1")(x))
        return nn.Dense(CNN_CLASSES, name="head")(x)


class NnxCnn(nnx.Module):
    """:class:`LinenCnn` in NNX, attribute for attribute."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(CNN_CHANNELS[0], CNN_CHANNELS[1], (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(CNN_CHANNELS[1], CNN_CHANNELS[2], (3, 3), strides=2, rngs=rngs)
        self.fc1 = nnx.Linear(CNN_CHANNELS[2], CNN_HIDDEN, rngs=rngs)
        self.head = nnx.Linear(CNN_HIDDEN, CNN_CLASSES, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nnx.relu(self.fc1(x))
        return self.head(x)


CNN_LAYERS = ("conv1", "conv2", "fc1", "head")


def cnn_params_to_nnx(params, model: NnxCnn) -> None:
    """Copy Linen :class:`LinenCnn` params into an :class:`NnxCnn`, in place."""
    for name in CNN_LAYERS:
        layer = getattr(model, name)
        for weight in ("kernel", "bias"):
            getattr(layer, weight)[...] = params[name][weight]


# --------------------------------------------------------------------------------------
# NNX encoder.


class NnxSelfAttention(nnx.Module):
    """:class:`SelfAttention` in NNX: ``nnx.LinearGeneral`` query/key/value/out."""

    def __init__(self, hidden: int, num_heads: int, rngs: nnx.Rngs):
        heads = (num_heads, hidden // num_heads)
        self.query = nnx.LinearGeneral(hidden, heads, rngs=rngs)
        self.key = nnx.LinearGeneral(hidden, heads, rngs=rngs)
        self.value = nnx.LinearGeneral(hidden, heads, rngs=rngs)
        self.out = nnx.LinearGeneral(heads, hidden, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v))


class NnxEncoderLayer(nnx.Module):
    def __init__(
        self,
        hidden: int,
        num_heads: int,
        intermediate: int,
        rngs: nnx.Rngs,
        flax_attention: bool = False,
    ):
        if flax_attention:
            self.attention = nnx.MultiHeadAttention(
                num_heads, hidden, decode=False, deterministic=True, rngs=rngs
            )
        else:
            self.attention = NnxSelfAttention(hidden, num_heads, rngs)
        self.attention_norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.intermediate = nnx.Linear(hidden, intermediate, rngs=rngs)
        self.output = nnx.Linear(intermediate, hidden, rngs=rngs)
        self.output_norm = nnx.LayerNorm(hidden, rngs=rngs)

    def __call__(self, x):
        x = self.attention_norm(x + self.attention(x))
        h = self.output(nnx.gelu(self.intermediate(x)))
        return self.output_norm(x + h)


class NnxEncoder(nnx.Module):
    """``ids (batch, seq) -> logits (batch, num_classes)``."""

    def __init__(
        self,
        rngs: nnx.Rngs,
        vocab: int = 50,
        hidden: int = 16,
        num_layers: int = 2,
        num_heads: int = 2,
        intermediate: int = 32,
        num_classes: int = 3,
        flax_attention: bool = False,
    ):
        self.embed = nnx.Embed(vocab, hidden, rngs=rngs)
        self.layers = nnx.List(
            [
                NnxEncoderLayer(hidden, num_heads, intermediate, rngs, flax_attention)
                for _ in range(num_layers)
            ]
        )
        self.classifier = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x[:, 0])


# --------------------------------------------------------------------------------------
# Helpers shared by the tests.


def relative_error(got, ref) -> float:
    """``max|got - ref| / max|ref|``, in float64."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def key(seed: int) -> jax.Array:
    """A PRNG key whose random ops compile fast on CPU (the ``rbg`` implementation)."""
    return jax.random.key(seed, impl="rbg")


def perturb(tree, seed: int, scale: float = 0.3):
    """Every leaf plus ``scale * (std(leaf) + 0.1) * N(0, 1)`` noise (zero leaves move too).

    NumPy noise, so perturbing compiles nothing.
    """
    rng = np.random.default_rng(seed)

    def move(leaf):
        leaf = np.asarray(leaf)
        noise = rng.standard_normal(leaf.shape)
        return (leaf + scale * (leaf.std() + 0.1) * noise).astype(leaf.dtype)

    return jax.tree.map(move, tree)
