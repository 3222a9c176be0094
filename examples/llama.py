"""A Llama-family decoder (Llama 2/3, Mistral, Qwen 2/2.5, Qwen 3) in Flax NNX.

Built from ``nnx.Linear``, ``nnx.Embed`` and ``nnx.RMSNorm`` only, so
:func:`dora_jax.nnx.apply_dora` adapts it unchanged, and with the attribute paths of the
Hugging Face modules, so a Flax path is the torch module name with ``/`` for ``.``::

    model/embed_tokens                       nnx.Embed (vocab, hidden)
    model/layers/<i>/input_layernorm         nnx.RMSNorm (hidden,)
    model/layers/<i>/self_attn/q_proj        nnx.Linear hidden -> heads * head_dim
    model/layers/<i>/self_attn/k_proj        nnx.Linear hidden -> kv_heads * head_dim
    model/layers/<i>/self_attn/v_proj        nnx.Linear hidden -> kv_heads * head_dim
    model/layers/<i>/self_attn/o_proj        nnx.Linear heads * head_dim -> hidden
    model/layers/<i>/self_attn/q_norm        nnx.RMSNorm (head_dim,)   Qwen 3 only
    model/layers/<i>/self_attn/k_norm        nnx.RMSNorm (head_dim,)   Qwen 3 only
    model/layers/<i>/post_attention_layernorm
    model/layers/<i>/mlp/gate_proj           nnx.Linear hidden -> intermediate
    model/layers/<i>/mlp/up_proj             nnx.Linear hidden -> intermediate
    model/layers/<i>/mlp/down_proj           nnx.Linear intermediate -> hidden
    model/norm                               nnx.RMSNorm (hidden,)
    lm_head                                  nnx.Linear hidden -> vocab (absent when tied)

Kernels are Flax's ``(in, out)``: the transpose of the torch ``weight``.

Interface:

* :class:`LlamaConfig`: a frozen dataclass with Hugging Face's field names;
  ``LlamaConfig.from_hf(dict)`` reads a ``config.json`` (``model_type`` llama, mistral,
  qwen2, qwen3) and refuses, by name, every value this model does not compute (another
  ``hidden_act``, a rope scaling other than llama3, Qwen's per-layer sliding window...);
  ``to_hf()`` writes one back.
* ``Llama(config, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=False, rngs)``;
  ``model(tokens int32[B, T], *, positions=None, attention_mask=None, cache=None)``
  returns float32 logits ``[B, T, vocab]``, or ``(logits, cache)`` when a cache is given.
  ``attention_mask`` (bool or 0/1 ``[B, T]``) marks real tokens (False: padding);
  ``positions`` default to the count of real tokens before each one (``arange`` without
  padding, right for left padding too). ``remat=True`` recomputes each decoder block in
  the backward pass (``jax.checkpoint`` per block).
* :func:`init_cache` ``(model, batch, max_length, dtype=None)``: an empty KV cache (a
  pytree of arrays, so it passes through ``jax.jit``).
* :func:`generate` ``(model, tokens, max_new_tokens, *, attention_mask=None,
  eos_token_id=None, pad_token_id=0)``: greedy decoding with the KV cache in one jitted
  call; returns ``[B, T + max_new_tokens]`` tokens (pad prompts on the left).

Hugging Face checkpoints load with ``examples/hf_llm.py``. The numerics follow
transformers: RMSNorm in float32, rotary embeddings in float32 (``rotate_half`` layout,
llama3 frequency scaling), attention softmax in float32, SiLU in float32 rounded once to
the compute dtype. The logits are the float32 sums of the compute-dtype products
(transformers rounds them to the compute dtype before its float32 cast). Causal attention
without a cache runs in query blocks over the keys up to each block's end, with a
backward pass written from the saved probabilities (:func:`attention`): on a CPU a third
of the attention time of plain autodiff over all keys. Attention, rotary embeddings and
the head have their own reverse-mode gradients (``jax.custom_vjp``): ``jax.grad`` and
``jax.vjp`` work, ``jax.jvp`` raises.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# llama3 is the only scaling implemented; "default" means none.
ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

# What each model type's transformers class fixes (a config.json value it does not read).
_FIXED = {
    "llama": {"qk_norm": False, "sliding_window": None},
    "mistral": {"attention_bias": False, "mlp_bias": False, "qk_norm": False},
    "qwen2": {"attention_bias": True, "mlp_bias": False, "qk_norm": False, "sliding_window": None},
    "qwen3": {"mlp_bias": False, "qk_norm": True, "sliding_window": None},
}

# config.json fields that do not change the numbers of a forward pass (bookkeeping,
# tokenizer ids, initialisation, training-only settings at their defaults).
_IGNORED = {
    "architectures",
    "auto_map",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "use_cache",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
    "name_or_path",
    "pretraining_tp",  # only splits torch's matmuls; the result is the same
    "id2label",
    "label2id",
    "problem_type",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "tie_encoder_decoder",
    "max_window_layers",  # used only with use_sliding_window, refused below
    "model_type",
    "quantization_config_ignored",
    "attention_implementation",
    "_attn_implementation_autoset",
    "bos_token",
    "eos_token",
    "is_llama_config",  # nanotron's marker in SmolLM configs
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture, with Hugging Face's field names.

    ``rope_scaling`` is ``None`` or the llama3 parameters (``{"rope_type": "llama3",
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}``),
    held as a sorted tuple of pairs so the config is hashable (Flax keeps it in the
    model's static structure); :attr:`rope_scaling_dict` gives the dict.
    ``attention_bias`` puts biases on q/k/v (and on o, except for Qwen 2, whose o_proj
    has none); ``qk_norm`` is Qwen 3's RMSNorm of each head's query and key;
    ``sliding_window`` (Mistral) lets each token see only the previous
    ``sliding_window`` tokens, itself included. What a model type's transformers class
    fixes (Qwen 2's q/k/v biases, Qwen 3's q/k norms, no MLP bias outside Llama, a
    sliding window only in Mistral) is filled in, and a contradicting value refused.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None  # None: the model type's (True for Qwen 2)
    mlp_bias: bool = False
    qk_norm: bool | None = None  # None: the model type's (True for Qwen 3)
    sliding_window: int | None = None
    hidden_act: str = "silu"
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"LlamaConfig: hidden_size {self.hidden_size} is not a multiple of "
                    f"num_attention_heads {self.num_attention_heads}; give head_dim."
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig: num_attention_heads {self.num_attention_heads} is not a "
                f"multiple of num_key_value_heads {self.num_key_value_heads}."
            )
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"LlamaConfig: model_type {self.model_type!r} is not implemented; "
                f"supported: {', '.join(MODEL_TYPES)}."
            )
        for field, fixed in _FIXED[self.model_type].items():
            value = getattr(self, field)
            if value is None and field in ("attention_bias", "qk_norm"):
                object.__setattr__(self, field, fixed)
            elif value != fixed:
                raise ValueError(
                    f"LlamaConfig: {self.model_type} models have {field}={fixed!r}; got {value!r}."
                )
        for field in ("attention_bias", "qk_norm"):
            if getattr(self, field) is None:
                object.__setattr__(self, field, False)
        if self.hidden_act != "silu":
            raise ValueError(
                f"LlamaConfig: hidden_act {self.hidden_act!r} is not implemented (only 'silu')."
            )
        scaling = self.rope_scaling
        if isinstance(scaling, Mapping):
            scaling = tuple(sorted(scaling.items()))
            object.__setattr__(self, "rope_scaling", scaling)
        if scaling is not None:
            items = dict(scaling)
            kind = items.get("rope_type", items.get("type"))
            if kind != "llama3":
                raise ValueError(
                    f"LlamaConfig: rope_scaling type {kind!r} is not implemented (supported: "
                    f"None or 'llama3')."
                )
            missing = [k for k in LLAMA3_KEYS if k not in items]
            if missing:
                raise ValueError(f"LlamaConfig: llama3 rope_scaling lacks {missing}.")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def o_proj_bias(self) -> bool:
        """Qwen 2 has q/k/v biases and none on o_proj; the others use one setting."""
        return self.attention_bias and self.model_type != "qwen2"

    @classmethod
    def from_hf(cls, data: Mapping[str, Any]) -> LlamaConfig:
        """A config from the dict of a Hugging Face ``config.json``.

        Accepts both rope spellings: ``rope_theta`` + ``rope_scaling`` (transformers 4)
        and ``rope_parameters`` (transformers 5).

        Raises:
          ValueError: naming the field for an unknown ``model_type``, or any value this
            model does not implement (another activation or rope scaling, a partial
            rotary factor, a per-layer sliding window, attention dropout, an unknown
            field that is set).
        """
        data = dict(data)
        model_type = data.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"config.json: model_type {model_type!r} is not implemented; supported: "
                f"{', '.join(MODEL_TYPES)}."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {"model_type": model_type}
        rope = dict(data.pop("rope_parameters", None) or {})
        theta = data.pop("rope_theta", None)
        legacy = data.pop("rope_scaling", None)
        if legacy:
            rope = {**rope, **legacy}
        if theta is not None:
            rope.setdefault("rope_theta", theta)
        kind = rope.pop("rope_type", rope.pop("type", "default"))
        kwargs["rope_theta"] = float(rope.pop("rope_theta", 10000.0))
        factor = rope.pop("partial_rotary_factor", data.pop("partial_rotary_factor", 1.0))
        if factor != 1.0:
            raise ValueError(f"config.json: partial_rotary_factor={factor} is not implemented.")
        if kind not in ROPE_TYPES:
            raise ValueError(
                f"config.json: rope scaling type {kind!r} is not implemented (supported: "
                f"{', '.join(ROPE_TYPES)})."
            )
        if kind == "llama3":
            kwargs["rope_scaling"] = {"rope_type": "llama3", **rope}
        elif rope:
            raise ValueError(f"config.json: rope parameters {sorted(rope)} are not implemented.")
        if data.pop("attention_dropout", 0.0):
            raise ValueError("config.json: attention_dropout is not implemented (must be 0).")
        if model_type in ("qwen2", "qwen3"):
            use_window = data.pop("use_sliding_window", False)
            kinds = set(data.pop("layer_types", None) or ["full_attention"])
            window = data.pop("sliding_window", None)
            if use_window or kinds != {"full_attention"}:
                raise ValueError(
                    f"config.json: Qwen's per-layer sliding window (use_sliding_window="
                    f"{use_window}, sliding_window={window}, layer_types {sorted(kinds)}) is "
                    f"not implemented."
                )
        if model_type == "qwen2":
            data.pop("attention_bias", None)  # transformers' Qwen 2 has q/k/v biases always
        if model_type == "mistral":
            kinds = set(data.pop("layer_types", None) or ["full_attention"])
            if not kinds <= {"full_attention", "sliding_attention"} or len(kinds) > 1:
                raise ValueError(f"config.json: layer_types {sorted(kinds)} is not implemented.")
        for key, value in data.items():
            if key in fields and key not in ("rope_scaling", "qk_norm", "model_type"):
                kwargs[key] = value
            elif key not in _IGNORED and value not in (None, False, {}, []):
                raise ValueError(
                    f"config.json: field {key!r} = {value!r} is not known to this model; "
                    f"refused, since its effect is not implemented."
                )
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"config.json: {error}") from None

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict (transformers 5 spelling: ``rope_parameters``)."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**self.rope_scaling_dict, "rope_theta": self.rope_theta}
        out = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
        }
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        return out


# ---------------------------------------------------------------------------- rotary


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """The rotary inverse frequencies ``(head_dim // 2,)`` (float32), with llama3 scaling."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling_dict
    if scaling is not None:  # transformers' _compute_llama3_parameters
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rotary(positions: Array, config: LlamaConfig) -> tuple[Array, Array]:
    """cos and sin ``[B, T, head_dim]`` (float32) of integer ``positions [B, T]``.

    A NumPy array of positions gives NumPy tables: constants of a compiled step. XLA's
    CPU backend counts cos and sin as cheap and evaluates them again inside each
    rotation that reads them (two per layer); as constants they are computed once, at
    trace time (2 % of the Llama-shaped step in ``benchmarks/llm_step.py``).
    """
    xp = np if isinstance(positions, np.ndarray) else jnp
    freqs = positions.astype(np.float32)[..., None] * inverse_frequencies(config)
    angles = xp.concatenate([freqs, freqs], axis=-1)
    return xp.cos(angles), xp.sin(angles)


@jax.custom_vjp
def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x [B, T, heads, head_dim]`` in the ``rotate_half`` layout (float32 math).

    Its gradient (for ``x``; none for the tables) is the rotation by the opposite angle,
    so reverse mode only (``jax.jvp`` raises).
    """
    return _rotated(x, cos, sin)


def _rotated(x, cos, sin):
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def _rotary_forward(x, cos, sin):
    return _rotated(x, cos, sin), (cos, sin)


def _rotary_backward(tables, d_out):
    # A rotation's transpose is its inverse: one pass like the forward, where autodiff
    # of the concatenation pads and adds the halves.
    cos, sin = tables
    return _rotated(d_out, cos, -sin), None, None


apply_rotary.defvjp(_rotary_forward, _rotary_backward)


# --------------------------------------------------------------------------- attention

# Causal attention runs in up to this many query blocks, each over the keys up to its
# last query only: 4 blocks skip 3/8 of the products and of the softmax.
QUERY_BLOCKS = 4
MIN_BLOCK = 64  # queries: smaller blocks cost more in overhead than they skip


def attention(q: Array, k: Array, v: Array, mask: Array, *, causal: bool) -> Array:
    """Grouped-query attention, softmax in float32.

    Args:
      q: ``[B, T, heads, head_dim]``; k, v: ``[B, S, kv_heads, head_dim]``.
      mask: ``[B, T, S]`` bool, True where query ``t`` may attend to key ``s``.
      causal: ``S == T`` and no query attends to a later key (``mask`` is causal and
        may mask more, e.g. padding), so query blocks skip the keys after them.
    Returns:
      ``[B, T, heads, head_dim]`` in ``v``'s dtype.

    Its gradient is a ``jax.custom_vjp``: reverse mode (``jax.grad``, ``jax.vjp``) only;
    ``jax.jvp`` through it raises.
    """
    b, t, heads, dim = q.shape
    kv_heads = k.shape[2]
    # [B, kv_heads, groups, T, D] and [B, kv_heads, S, D]: batched products, no copies.
    q = q.reshape(b, t, kv_heads, heads // kv_heads, dim).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    # Additive bias (0 or the float32 minimum): one add instead of a select per element.
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]
    causal = causal and t == k.shape[2]
    blocks = max(1, min(QUERY_BLOCKS, t // MIN_BLOCK)) if causal else 1
    bounds = tuple(t * i // blocks for i in range(blocks + 1))
    out = _blocked_attention(q, k, v, bias, dim**-0.5, bounds, causal)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, heads, dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blocked_attention(q, k, v, bias, scale, bounds, causal):
    """``softmax(q k^T * scale + bias) v`` per kv head and group, in query blocks
    ``bounds`` (each over the keys up to its last query when ``causal``): q
    ``[B, K, G, T, D]``, k, v ``[B, K, S, D]``, bias ``[B, 1, 1, T, S]`` float32."""
    return _attention_forward(q, k, v, bias, scale, bounds, causal)[0]


def _blocks(bounds, causal, keys):
    """(first query, end query, keys seen) of each query block."""
    return [
        (lo, hi, hi if causal else keys) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def _attention_forward(q, k, v, bias, scale, bounds, causal):
    outs, all_probs = [], []
    for lo, hi, keys in _blocks(bounds, causal, k.shape[2]):
        scores = jnp.einsum(
            "bkgtd,bksd->bkgts",
            q[..., lo:hi, :],
            k[:, :, :keys],
            preferred_element_type=jnp.float32,
        )
        scores = scores * scale + bias[..., lo:hi, :keys]
        exp = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        probs = exp / jnp.sum(exp, axis=-1, keepdims=True)
        outs.append(_summed("bkgts,bksd->bkgtd", probs.astype(v.dtype), v[:, :, :keys]))
        all_probs.append(probs)
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out, (q, k, v, all_probs, out)


def _attention_backward(scale, bounds, causal, residuals, d_out):
    # The softmax gradient from the saved probabilities, p * (dp - rowsum(do * o)): one
    # pass over the scores where autodiff of the forward takes several. The query
    # blocks' d_q are joined, their d_k and d_v summed in float32 and rounded once.
    q, k, v, all_probs, out = residuals
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_q, d_k, d_v = [], 0.0, 0.0
    for (lo, hi, keys), probs in zip(_blocks(bounds, causal, k.shape[2]), all_probs, strict=True):
        d_o, k_seen, v_seen = d_out[..., lo:hi, :], k[:, :, :keys], v[:, :, :keys]
        pad = ((0, 0), (0, 0), (0, k.shape[2] - keys), (0, 0))
        d_v_block = jnp.einsum(
            "bkgts,bkgtd->bksd", probs.astype(v.dtype), d_o, preferred_element_type=jnp.float32
        )
        d_v = d_v + jnp.pad(d_v_block, pad)
        d_probs = jnp.einsum("bkgtd,bksd->bkgts", d_o, v_seen, preferred_element_type=jnp.float32)
        d_scores = (probs * (d_probs - row[..., lo:hi, :]) * scale).astype(q.dtype)
        d_q.append(_summed("bkgts,bksd->bkgtd", d_scores, k_seen))
        d_k_block = jnp.einsum(
            "bkgts,bkgtd->bksd", d_scores, q[..., lo:hi, :], preferred_element_type=jnp.float32
        )
        d_k = d_k + jnp.pad(d_k_block, pad)
    d_q = d_q[0] if len(d_q) == 1 else jnp.concatenate(d_q, axis=3)
    return d_q, d_k.astype(k.dtype), d_v.astype(v.dtype), None


def _summed(equation: str, a: Array, b: Array) -> Array:
    """``einsum`` summed in float32, in the operands' dtype: XLA's CPU backend multiplies
    bfloat16 at its bfloat16 rate only when asked for float32 output."""
    return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


_blocked_attention.defvjp(_attention_forward, _attention_backward)


# --------------------------------------------------------------------------- modules


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings (``self_attn``)."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.q_proj = nnx.Linear(
            c.hidden_size, c.num_attention_heads * c.head_dim, use_bias=c.attention_bias, **kw
        )
        self.k_proj = nnx.Linear(
            c.hidden_size, c.num_key_value_heads * c.head_dim, use_bias=c.attention_bias, **kw
        )
        self.v_proj = nnx.Linear(
            c.hidden_size, c.num_key_value_heads * c.head_dim, use_bias=c.attention_bias, **kw
        )
        self.o_proj = nnx.Linear(
            c.num_attention_heads * c.head_dim, c.hidden_size, use_bias=c.o_proj_bias, **kw
        )
        if c.qk_norm:
            self.q_norm = nnx.RMSNorm(c.head_dim, epsilon=c.rms_norm_eps, **kw)
            self.k_norm = nnx.RMSNorm(c.head_dim, epsilon=c.rms_norm_eps, **kw)
        self.qk_norm = c.qk_norm

    def __call__(self, x, cos, sin, mask, layer_cache, index):
        """``x [B, T, hidden]``, ``mask [B, T, S]`` (True: may attend) -> ``[B, T, hidden]``.

        With a ``layer_cache`` (``{"key", "value"}: [B, S, kv_heads, head_dim]``) the new
        keys and values are written at slot ``index`` and attention covers all ``S``
        slots; returns the output and the updated layer cache (None without one).
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if layer_cache is not None:
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(
                layer_cache["key"], k.astype(layer_cache["key"].dtype), start
            )
            v = jax.lax.dynamic_update_slice(
                layer_cache["value"], v.astype(layer_cache["value"].dtype), start
            )
            layer_cache = {"key": k, "value": v}
        out = attention(q, k.astype(q.dtype), v, mask, causal=layer_cache is None)
        out = out.astype(x.dtype).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out), layer_cache


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` (``mlp``)."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = {"use_bias": config.mlp_bias, "dtype": dtype, "param_dtype": param_dtype}
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nnx.Linear(h, i, rngs=rngs, **kw)
        self.up_proj = nnx.Linear(h, i, rngs=rngs, **kw)
        self.down_proj = nnx.Linear(i, h, rngs=rngs, **kw)

    def __call__(self, x):
        gate = self.gate_proj(x)
        # SiLU in float32, rounded once (as torch's bfloat16 silu): in bfloat16 XLA would
        # round after each of its four operations.
        act = jax.nn.silu(gate.astype(jnp.float32)).astype(gate.dtype)
        return self.down_proj(act * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """One pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.input_layernorm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.self_attn = Attention(config, **kw)
        self.post_attention_layernorm = nnx.RMSNorm(
            config.hidden_size, epsilon=config.rms_norm_eps, **kw
        )
        self.mlp = MLP(config, **kw)

    def __call__(self, x, cos, sin, mask, layer_cache=None, index=0):
        attended, layer_cache = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, layer_cache, index
        )
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), layer_cache


def _remat_block(layer, x, cos, sin, mask):
    """``layer``'s output, recomputed in the backward pass.

    ``jax.checkpoint`` of a pure function of the layer's state rather than ``nnx.remat``:
    the block mutates nothing, and ``nnx.remat`` writes every variable back afterwards,
    which fails for frozen variables of an outer trace when only the adapters are
    differentiated.
    """
    graphdef, state = nnx.split(layer)

    def pure(state, x, cos, sin, mask):
        return nnx.merge(graphdef, state)(x, cos, sin, mask)[0]

    return jax.checkpoint(pure)(state, x, cos, sin, mask)


class LlamaModel(nnx.Module):
    """The decoder stack without the head (Hugging Face's ``model``)."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, remat, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
        self.layers = nnx.List(
            [DecoderLayer(config, **kw) for _ in range(config.num_hidden_layers)]
        )
        self.norm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.remat = remat

    def __call__(self, x, cos, sin, mask, cache=None, index=0):
        new_layers = []
        for i, layer in enumerate(self.layers):
            if cache is not None:
                x, layer_cache = layer(x, cos, sin, mask, cache[i], index)
                new_layers.append(layer_cache)
            elif self.remat:
                x = _remat_block(layer, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask)[0]
        return self.norm(x), tuple(new_layers)


class Llama(nnx.Module):
    """A Llama-family causal language model (Hugging Face's ``*ForCausalLM``).

    Args:
      config: the architecture.
      dtype: the compute dtype (activations; attention scores, softmax, RMSNorm and
        rotary embeddings are float32 whatever it is).
      param_dtype: the parameters' dtype.
      remat: recompute each decoder block in the backward pass (``jax.checkpoint`` per block).
      rngs: initialises the (random) weights.
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        self.model = LlamaModel(
            config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs
        )
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(
                config.hidden_size,
                config.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )

    def __call__(
        self,
        tokens: Array,
        *,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        cache: dict[str, Any] | None = None,
    ):
        """Logits ``float32 [B, T, vocab]`` of ``tokens int32 [B, T]``.

        Args:
          tokens: token ids ``[B, T]``.
          positions: rotary positions ``[B, T]``; default: the number of real tokens
            before each token (so ``arange(T)`` without padding), counted on from the
            cache's when one is given.
          attention_mask: ``[B, T]`` bool or 0/1, False / 0 for padding; padding keys are
            never attended to (a padding query's output is meaningless).
          cache: from :func:`init_cache` or a previous call: the tokens are written after
            those already in it, and ``(logits, cache)`` is returned.
        """
        b, t = tokens.shape
        real = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        start = 0 if cache is None else cache["position"][:, None]
        if positions is None and attention_mask is None and cache is None:
            positions = np.arange(t)[None]  # known when tracing: tables are constants
        elif positions is None:
            positions = jnp.maximum(start + jnp.cumsum(real, axis=1) - 1, start)
        cos, sin = rotary(positions, self.config)
        if cache is None:
            q_slot = k_slot = jnp.arange(t)
            key_real, index = real, 0
        else:
            index = cache["index"]
            q_slot = index + jnp.arange(t)
            key_real = jax.lax.dynamic_update_slice(cache["valid"], real, (0, index))
            k_slot = jnp.arange(key_real.shape[1])
        allowed = k_slot[None, :] <= q_slot[:, None]
        if self.config.sliding_window is not None:
            allowed &= q_slot[:, None] - k_slot[None, :] < self.config.sliding_window
        mask = key_real[:, None, :] & allowed[None]
        x = self.model.embed_tokens(tokens)
        x, layers = self.model(x, cos, sin, mask, None if cache is None else cache["layers"], index)
        logits = self._logits(x)
        if cache is None:
            return logits
        cache = {
            "layers": layers,
            "index": index + t,
            "valid": key_real,
            "position": cache["position"] + jnp.sum(real, axis=1, dtype=jnp.int32),
        }
        return logits, cache

    def _logits(self, x: Array) -> Array:
        """float32 logits ``[B, T, vocab]`` of the last hidden states ``x [B, T, hidden]``."""
        tied = self.config.tie_word_embeddings
        head = self.model.embed_tokens if tied else self.lm_head
        if type(head) not in (nnx.Embed, nnx.Linear):  # adapted: the layer's own product
            return (head.attend(x) if tied else head(x)).astype(jnp.float32)
        weight = head.embedding[...] if tied else head.kernel[...]
        return head_product(x.astype(self.dtype), weight.astype(self.dtype), tied)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def head_product(x: Array, weight: Array, vocab_first: bool) -> Array:
    """``x [..., hidden] @ weight`` summed in float32, returned unrounded.

    ``weight`` is ``[vocab, hidden]`` when ``vocab_first`` (tied embeddings), else
    ``[hidden, vocab]`` (``lm_head``). The float32 sums are at least as exact as
    transformers' logits (rounded to the compute dtype, then cast); the gradient takes
    the logits' cotangent in the compute dtype, as torch's does, so on a CPU both
    products of the backward pass run at the bfloat16 rate (reverse mode only).
    """
    equation = "...h,vh->...v" if vocab_first else "...h,hv->...v"
    return jnp.einsum(equation, x, weight, preferred_element_type=jnp.float32)


def _head_forward(x, weight, vocab_first):
    return head_product(x, weight, vocab_first), (x, weight)


def _head_backward(vocab_first, residuals, d_logits):
    x, weight = residuals
    d_logits = d_logits.astype(x.dtype)
    d_x = _summed("...v,vh->...h" if vocab_first else "...v,hv->...h", d_logits, weight)
    if vocab_first:
        d_w = _summed("...v,...h->vh", d_logits, x)
    else:
        d_w = _summed("...h,...v->hv", x, d_logits)
    return d_x, d_w


head_product.defvjp(_head_forward, _head_backward)


# --------------------------------------------------------------------------- decoding


def init_cache(model: Llama, batch: int, max_length: int, dtype=None) -> dict[str, Any]:
    """An empty KV cache for ``batch`` sequences of up to ``max_length`` tokens.

    ``{"layers": ({"key", "value"}: [B, max_length, kv_heads, head_dim],) * layers,
    "index": int32 (slots used), "valid": bool [B, max_length] (slots holding real
    tokens), "position": int32 [B] (the next token's rotary position)}``.
    """
    c = model.config
    dtype = dtype or model.dtype
    shape = (batch, max_length, c.num_key_value_heads, c.head_dim)
    return {
        "layers": tuple(
            {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
            for _ in range(c.num_hidden_layers)
        ),
        "index": jnp.zeros((), jnp.int32),
        "valid": jnp.zeros((batch, max_length), bool),
        "position": jnp.zeros((batch,), jnp.int32),
    }


def generate(
    model: Llama,
    tokens: Array,
    max_new_tokens: int,
    *,
    attention_mask: Array | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
) -> Array:
    """Greedy decoding: ``[B, T + max_new_tokens]`` (the prompt, then the new tokens).

    Prompts of different lengths are padded on the LEFT with ``attention_mask`` False
    there. After a row emits ``eos_token_id`` (or any of a list, as Llama 3's
    ``config.json`` gives) its later tokens are ``pad_token_id``.
    One jitted call (prefill, then a ``lax.scan`` of single-token steps with the cache).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones(tokens.shape, bool) if attention_mask is None else jnp.asarray(attention_mask)
    stops = None if eos_token_id is None else tuple(int(i) for i in np.atleast_1d(eos_token_id))
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef, state, tokens, mask.astype(bool), max_new_tokens, stops, pad_token_id
    )


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(graphdef, state, tokens, mask, max_new_tokens, stops, pad_token_id):
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    cache = init_cache(model, b, t + max_new_tokens)
    logits, cache = model(tokens, attention_mask=mask, cache=cache)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    done = jnp.zeros((b,), bool)

    def step(carry, _):
        token, done, cache = carry
        token = jnp.where(done, pad_token_id, token)
        if stops:
            done = done | jnp.isin(token, jnp.asarray(stops, jnp.int32))
        logits, cache = model(token[:, None], cache=cache)
        following = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return (following, done, cache), token

    _, new = jax.lax.scan(step, (first, done, cache), None, length=max_new_tokens)
    return jnp.concatenate([tokens, new.T], axis=1)
