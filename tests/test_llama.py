"""The Llama-family decoder of ``examples/llama.py`` and the Hugging Face folders of
``examples/hf_llm.py``, against transformers and PEFT themselves.

Tiny random torch models (Llama with llama3 rope scaling, Qwen 2 with q/k/v biases and
tied embeddings, Qwen 3 with q/k norms, Mistral with a sliding window) are saved with
``save_pretrained`` and loaded by the JAX model: float32 logits (with left padding) to
1e-4 relative and 20 greedy tokens identical to ``generate(do_sample=False)``. DoRA
adapters cross both ways through PEFT folders, and a merged folder loads with
``AutoModelForCausalLM.from_pretrained``. Loading onto an 8-device CPU mesh runs in a
subprocess (the device count is fixed when JAX starts).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_example
from flax import nnx

import dora_jax

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-4
VOCAB = 128


llama = load_example("llama")
hf_llm = load_example("hf_llm")

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,  # small, so the 8 to 40 positions are scaled
}
CASES = {
    "llama3": ("LlamaConfig", {"rope_scaling": dict(LLAMA3_ROPE), "rope_theta": 500000.0}),
    "qwen2_tied": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "mistral_window": ("MistralConfig", {"sliding_window": 5}),
}


def _torch_model(case: str):
    class_name, extra = CASES[case]
    if not hasattr(transformers, class_name):
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    torch.manual_seed(0)
    config = getattr(transformers, class_name)(**SMALL, **copy.deepcopy(extra))  # it edits dicts
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases and norm scales are zero / one at init: randomise them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``{case: (torch model, folder)}``; llama3 is saved in 100 KB shards too."""
    made = {}
    root = tmp_path_factory.mktemp("hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in CASES:
            class_name = CASES[case][0]
            if not hasattr(transformers, class_name):
                continue
            model = _torch_model(case)
            model.save_pretrained(root / case)
            made[case] = (model, root / case)
        model = made["llama3"][0]
        model.save_pretrained(root / "sharded", max_shard_size="100KB")
        made["sharded"] = (model, root / "sharded")
    return made


def _inputs():
    """Two prompts of 12 tokens, the second left-padded by 3, and their positions."""
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, :3] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def _torch_generate(model, ids, mask, eos_token_id):
    """transformers' greedy generation of 20 tokens, padded with 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=0,
        )
    return out.numpy()


@nnx.jit
def _forward(model, ids, mask=None):
    return model(ids, attention_mask=mask)


def _torch_logits(model, ids, mask=None, positions=None):
    with torch.no_grad():
        out = model(
            torch.tensor(ids),
            attention_mask=None if mask is None else torch.tensor(mask),
            position_ids=None if positions is None else torch.tensor(positions),
        )
    return out.logits.float().numpy()


def _relative(ours, theirs, rows=None) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if rows is not None:
        ours, theirs = ours[rows], theirs[rows]
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("case", [*CASES, "sharded"])
def test_logits_and_greedy_generation_match_transformers(folders, case):
    if case not in folders:
        pytest.skip(f"transformers has no {CASES[case][0]}")
    torch_model, folder = folders[case]
    model, config = hf_llm.load_pretrained(folder, dtype=jnp.float32)
    assert config == llama.LlamaConfig.from_hf(torch_model.config.to_dict())
    ids, mask, positions = _inputs()
    theirs = _torch_logits(torch_model, ids, mask, positions)
    ours = _forward(model, jnp.asarray(ids), jnp.asarray(mask))
    assert ours.dtype == jnp.float32 and ours.shape == (2, 12, VOCAB)
    assert _relative(ours, theirs, mask.astype(bool)) < TOL  # padding queries are garbage
    # No mask, no positions: the rotary tables are NumPy constants of the program.
    assert _relative(_forward(model, jnp.asarray(ids)), _torch_logits(torch_model, ids)) < TOL
    if case == "sharded":
        return
    expected = _torch_generate(torch_model, ids, mask, None)
    generated = np.asarray(llama.generate(model, ids, 20, attention_mask=mask))
    np.testing.assert_array_equal(generated, expected)
    if case != "llama3":
        return
    # A list of end ids (Llama 3's config.json has three): each row stops at its first.
    stops = [int(generated[0, 14]), int(generated[1, 17])]
    expected = _torch_generate(torch_model, ids, mask, stops)
    stopped = np.asarray(llama.generate(model, ids, 20, attention_mask=mask, eos_token_id=stops))
    # transformers ends the batch when every row has stopped; ours pads to 20 new tokens.
    assert expected.shape[1] < stopped.shape[1]
    np.testing.assert_array_equal(stopped[:, : expected.shape[1]], expected)
    assert not np.any(stopped[:, expected.shape[1] :])


@pytest.mark.parametrize("case", list(CASES))
def test_long_sequence_logits_match_transformers(folders, case):
    """160 tokens run causal attention in 2 query blocks (with left padding, and
    Mistral's window inside them): the logits still equal transformers'."""
    if case not in folders:
        pytest.skip(f"transformers has no {CASES[case][0]}")
    torch_model, folder = folders[case]
    model, _ = hf_llm.load_pretrained(folder, dtype=jnp.float32)
    t = 160
    assert min(llama.QUERY_BLOCKS, t // llama.MIN_BLOCK) == 2
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, t))
    mask = np.ones((2, t), np.int64)
    mask[1, :7] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    theirs = _torch_logits(torch_model, ids, mask, positions)
    ours = _forward(model, jnp.asarray(ids), jnp.asarray(mask))
    assert _relative(ours, theirs, mask.astype(bool)) < TOL


def test_remat_and_bfloat16(folders):
    """remat=True recomputes the blocks in the backward pass; a bfloat16 load computes
    in bfloat16, close to float32."""
    ids, mask, _ = _inputs()

    def recomputed(remat: bool) -> int:
        config = llama.LlamaConfig(**SMALL)
        abstract = nnx.eval_shape(lambda: llama.Llama(config, remat=remat, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        loss = lambda state: nnx.merge(graphdef, state)(jnp.asarray(ids)).mean()  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(loss))(state)  # traced, not compiled
        return sum(e.primitive.name.startswith("remat") for e in jaxpr.jaxpr.eqns)

    assert recomputed(False) == 0 and recomputed(True) >= 1
    folder = folders["llama3"][1]
    assert hf_llm.load_pretrained(folder, remat=True)[0].model.remat

    # With DoRA and only the adapters differentiated, as a training step does.
    def adapter_grads(remat: bool):
        model = llama.Llama(llama.LlamaConfig(**SMALL), remat=remat, rngs=nnx.Rngs(0))
        config = dora_jax.DoRAConfig(targets=["q_proj", "down_proj"], rank=2)
        dora_jax.nnx.apply_dora(model, config, rngs=nnx.Rngs(1))
        graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
        adapters = jax.tree.map(lambda a: a + 0.1, adapters)  # B != 0: every factor matters

        def loss(adapters):
            return nnx.merge(graphdef, adapters, frozen)(jnp.asarray(ids)).mean()

        return jax.tree.leaves(jax.jit(jax.grad(loss))(adapters))

    for got, want in zip(adapter_grads(True), adapter_grads(False), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    low, _ = hf_llm.load_pretrained(folder)  # bfloat16 by default
    assert low.model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    high, _ = hf_llm.load_pretrained(folder, dtype=jnp.float32)
    rows = mask.astype(bool)
    assert _relative(_forward(low, ids, mask), _forward(high, ids, mask), rows) < 5e-2


def _attention_and_gradients_f64(q, k, v, d_out, mask):
    """Float64 NumPy softmax attention ``[B, T, H, D]`` and the gradients of
    ``sum(out * d_out)`` from the formulas: ``dV = P^T dO``, ``dS = P (dP - rowsum(dP P))``
    with ``dP = dO V^T``, ``dQ = dS K s``, ``dK = dS^T Q s``, summed over each kv head's
    query group."""
    groups = q.shape[2] // k.shape[2]
    scale = 1 / np.sqrt(q.shape[-1])
    k_rep, v_rep = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.where(mask[:, None], np.einsum("bthd,bshd->bhts", q, k_rep) * scale, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", probs, v_rep)
    d_v = np.einsum("bhts,bthd->bshd", probs, d_out)
    d_probs = np.einsum("bthd,bshd->bhts", d_out, v_rep)
    d_scores = probs * (d_probs - np.sum(d_probs * probs, -1, keepdims=True)) * scale
    d_q = np.einsum("bhts,bshd->bthd", d_scores, k_rep)
    d_k = np.einsum("bhts,bthd->bshd", d_scores, q)

    def per_kv_head(x):  # [B, S, H, D] -> [B, S, kv_heads, D]
        return x.reshape(*x.shape[:2], k.shape[2], groups, x.shape[-1]).sum(3)

    return out, d_q, per_kv_head(d_k), per_kv_head(d_v)


def test_block_causal_attention_in_bfloat16_matches_float64():
    """In bfloat16 (probabilities and score gradients rounded to bfloat16 before their
    products, as torch's are), the block attention's output and q/k/v gradients stay
    within bfloat16 rounding of float64 NumPy attention of the same inputs."""
    t, heads, kv_heads, dim = 256, 4, 2, 16  # 4 blocks of 64 queries
    rng = np.random.default_rng(1)
    q, k, v, d_out = (
        jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
        for shape in [(1, t, heads, dim), (1, t, kv_heads, dim), (1, t, kv_heads, dim)]
        + [(1, t, heads, dim)]
    )
    mask = np.tril(np.ones((t, t), bool))[None]

    def loss(q, k, v):
        out = llama.attention(q, k, v, jnp.asarray(mask), causal=True)
        return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32)), out

    (d_q, d_k, d_v), out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    exact = _attention_and_gradients_f64(
        *(np.asarray(x, np.float64) for x in (q, k, v, d_out)), mask
    )
    # Measured: 0.0027, 0.0048, 0.0029, 0.0021 (with d_k, d_v rounded per query block
    # and summed in bfloat16: 0.0039 and 0.0033).
    for ours, reference in zip((out, d_q, d_k, d_v), exact, strict=True):
        assert ours.dtype == jnp.bfloat16
        error = np.max(np.abs(np.asarray(ours, np.float64) - reference))
        assert error <= 1e-2 * np.max(np.abs(reference)), error


@pytest.mark.parametrize("tables", ["traced", "numpy"])
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rotary_and_its_gradient_match_float64(jit, dtype, tables):
    """Rotary embeddings (``rotate_half`` layout) and their gradient, written as the
    rotation by the opposite angle, equal the float64 formulas: ``x cos + rot(x) sin``
    and its transpose ``g cos + rot^T(g sin)`` with ``rot(x) = [-x2, x1]``; with the
    tables from traced positions and from NumPy ones (constants of the program)."""
    config = llama.LlamaConfig(
        vocab_size=8, hidden_size=32, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, rope_theta=500.0,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 7, 2, 16)), dtype)
    d_out = jnp.asarray(rng.standard_normal((2, 7, 2, 16)), dtype)
    positions = np.asarray([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]])
    cos, sin = llama.rotary(positions if tables == "numpy" else jnp.asarray(positions), config)
    assert isinstance(cos, np.ndarray) == (tables == "numpy")

    def loss(x):
        out = llama.apply_rotary(x, cos, sin)
        return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32)), out

    grad = jax.grad(loss, has_aux=True)
    d_x, out = (jax.jit(grad) if jit else grad)(x)
    assert out.dtype == dtype and d_x.dtype == dtype
    angles = np.asarray(positions, np.float64)[..., None] * llama.inverse_frequencies(config)
    c, s = (np.concatenate([f(angles), f(angles)], -1)[:, :, None] for f in (np.cos, np.sin))
    x64, g64 = np.asarray(x, np.float64), np.asarray(d_out, np.float64)
    half = 8
    rot = np.concatenate([-x64[..., half:], x64[..., :half]], -1)
    gs = g64 * s
    rot_t = np.concatenate([gs[..., half:], -gs[..., :half]], -1)
    rtol = 1e-6 if dtype == jnp.float32 else 2.0**-8  # bfloat16: the output rounded once
    np.testing.assert_allclose(np.asarray(out, np.float64), x64 * c + rot * s, rtol, 1e-6)
    np.testing.assert_allclose(np.asarray(d_x, np.float64), g64 * c + rot_t, rtol, 1e-6)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
def test_head_logits_and_gradients_match_float64(tied, dtype, jit):
    """The logits (``lm_head`` or tied embeddings) are float32 sums of the compute-dtype
    operands, and their gradients take the logits' cotangent in the compute dtype, as
    torch's do: each gradient is the float64 product rounded once. In bfloat16 the
    backward products multiply two bfloat16 operands into float32 (none mixes dtypes)."""
    config = llama.LlamaConfig(
        vocab_size=24, hidden_size=40, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    head = "embed_tokens" if tied else "lm_head"
    model = llama.Llama(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, weight, rest = nnx.split(model, nnx.PathContains(head), ...)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 40)), dtype)
    d_logits = jnp.asarray(rng.standard_normal((2, 5, 24)), jnp.float32)

    def loss(weight, x):
        logits = nnx.merge(graphdef, weight, rest)._logits(x)
        return jnp.sum(logits * d_logits), logits

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    (d_w, d_x), logits = (jax.jit(grad) if jit else grad)(weight, x)
    (d_w,), (w,) = jax.tree.leaves(d_w), jax.tree.leaves(weight)
    assert logits.dtype == jnp.float32 and d_x.dtype == dtype and d_w.dtype == dtype
    w64 = np.asarray(w, np.float64)
    kernel = w64.T if tied else w64  # [hidden, vocab]
    x64 = np.asarray(x, np.float64)
    g64 = np.asarray(d_logits.astype(dtype), np.float64)  # the cotangent in the dtype
    np.testing.assert_allclose(np.asarray(logits, np.float64), x64 @ kernel, 1e-5, 1e-5)
    rtol = 1e-5 if dtype == jnp.float32 else 2.0**-8  # bfloat16: rounded once
    np.testing.assert_allclose(np.asarray(d_x, np.float64), g64 @ kernel.T, rtol, 1e-4)
    d_kernel = np.einsum("bth,btv->hv", x64, g64)
    np.testing.assert_allclose(
        np.asarray(d_w, np.float64), d_kernel.T if tied else d_kernel, rtol, 1e-4
    )
    if dtype == jnp.bfloat16:
        hlo = jax.jit(grad).lower(weight, x).as_text()
        dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
        assert len(dots) == 3  # logits, d_x, d_w
        for line in dots:
            operands, result = line.rsplit(":", 1)[-1].split("->")
            assert operands.count("bf16") == 2 and "xf32>" in result, line


def test_bfloat16_silu_is_rounded_once():
    """SwiGLU's activation in bfloat16 is float64 ``g / (1 + exp(-g))`` rounded once (as
    torch's bfloat16 silu): an MLP whose gate and down projections are identities and
    whose up projection is the constant 1 (its bias) outputs the activation itself.
    Rounding after each of SiLU's four operations misses by up to 2.5 roundings."""
    n = 64
    config = llama.LlamaConfig(
        vocab_size=8, hidden_size=n, intermediate_size=n, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, mlp_bias=True,
    )  # fmt: skip
    mlp = llama.MLP(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    eye = jnp.eye(n, dtype=jnp.bfloat16)
    mlp.gate_proj.kernel[...], mlp.down_proj.kernel[...] = eye, eye
    mlp.up_proj.kernel[...] = jnp.zeros_like(eye)
    mlp.up_proj.bias[...] = jnp.ones((n,), jnp.bfloat16)
    for layer in (mlp.gate_proj, mlp.down_proj):
        layer.bias[...] = jnp.zeros((n,), jnp.bfloat16)
    gate = jnp.asarray(3 * np.random.default_rng(0).standard_normal((32, n)), jnp.bfloat16)
    g = np.asarray(gate, np.float64)
    exact = g / (1 + np.exp(-g))
    out = np.asarray(mlp(gate), np.float64)
    assert np.all(np.abs(out - exact) <= 2.0**-8 * np.abs(exact) + 1e-30)


def test_adapted_head_keeps_its_own_product():
    """An adapted ``lm_head`` (a DoRA layer, not a plain ``nnx.Linear``) gives the logits
    through its own call, adapter included."""
    config = llama.LlamaConfig(
        vocab_size=24, hidden_size=40, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    model = llama.Llama(config, rngs=nnx.Rngs(0))
    dora_jax.nnx.apply_dora(
        model, dora_jax.DoRAConfig(targets=["lm_head"], rank=2), rngs=nnx.Rngs(1)
    )
    model.lm_head.lora_b[...] = jnp.ones_like(model.lm_head.lora_b[...])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 40)), jnp.float32)
    plain = x @ model.lm_head.kernel[...]
    np.testing.assert_array_equal(model._logits(x), model.lm_head(x))
    assert np.max(np.abs(model._logits(x) - plain)) > 1e-2  # the adapter counts


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("jit", [False, True])
def test_block_causal_attention_matches_float64(jit):
    """Causal attention in query blocks (each over the keys up to its last query) with
    its own backward pass equals the float64 softmax attention: outputs and the
    gradients of q, k, v, with grouped-query heads, left padding and uneven blocks."""
    t, heads, kv_heads, dim = 200, 4, 2, 8  # 3 blocks of 66, 67 and 67 queries
    rng = np.random.default_rng(0)
    q, k, v, d_out = (
        rng.standard_normal(shape).astype(np.float32)
        for shape in [(2, t, heads, dim), (2, t, kv_heads, dim), (2, t, kv_heads, dim)]
        + [(2, t, heads, dim)]
    )
    real = np.ones((2, t), bool)
    real[1, :5] = False
    mask = real[:, None, :] & np.tril(np.ones((t, t), bool))[None]
    assert min(llama.QUERY_BLOCKS, t // llama.MIN_BLOCK) == 3

    def reference(q, k, v):  # float64, every key of every query, masked by select
        k, v = np.repeat(k, heads // kv_heads, axis=2), np.repeat(v, heads // kv_heads, axis=2)
        scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(dim)
        scores = np.where(mask[:, None], scores, -1e300)  # padding rows: all masked
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return np.einsum("bhts,bshd->bthd", probs, v)

    def loss(q, k, v):
        out = llama.attention(q, k, v, jnp.asarray(mask), causal=True)
        return jnp.sum(out * d_out * real[:, :, None, None]), out

    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    (d_q, d_k, d_v), out = (jax.jit(grad) if jit else grad)(q, k, v)
    f64 = [x.astype(np.float64) for x in (q, k, v)]
    np.testing.assert_allclose(out[real], reference(*f64)[real], rtol=0, atol=1e-5)
    # Gradients by central differences of the float64 loss along one random direction.
    directions = [rng.standard_normal(x.shape) for x in f64]
    weights = d_out.astype(np.float64) * real[:, :, None, None]

    def f64_loss(shift):
        moved = [x + shift * d for x, d in zip(f64, directions, strict=True)]
        return np.sum(reference(*moved) * weights)

    numeric = (f64_loss(1e-4) - f64_loss(-1e-4)) / 2e-4
    analytic = sum(
        np.sum(np.asarray(g, np.float64) * d)
        for g, d in zip((d_q, d_k, d_v), directions, strict=True)
    )
    assert abs(analytic - numeric) <= 1e-4 * abs(numeric)

    # And each gradient against autodiff of the plain single-block softmax.
    def plain(q, k, v):
        groups = heads // kv_heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(dim)
        probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -1e30), axis=-1)
        return jnp.sum(jnp.einsum("bhts,bshd->bthd", probs, v) * weights)

    for ours, theirs in zip(
        (d_q, d_k, d_v), jax.grad(plain, argnums=(0, 1, 2))(q, k, v), strict=True
    ):
        np.testing.assert_allclose(
            ours, theirs, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(theirs)))
        )


def test_config_round_trip():
    config = llama.LlamaConfig(**SMALL, rope_scaling=LLAMA3_ROPE, attention_bias=True)
    assert llama.LlamaConfig.from_hf(config.to_hf()) == config
    hf = transformers.LlamaConfig(**config.to_hf())
    assert llama.LlamaConfig.from_hf(hf.to_dict()) == config
    legacy = {"model_type": "llama", **SMALL, "rope_theta": 1e4, "rope_scaling": LLAMA3_ROPE}
    assert llama.LlamaConfig.from_hf(legacy).rope_scaling_dict == LLAMA3_ROPE
    assert hash(config)  # static in the model's graph


# config.json files as published (trimmed of bookkeeping), with what each must give.
PUBLISHED = {
    "SmolLM2-135M": (
        {
            "model_type": "llama",
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_attention_heads": 9,
            "num_hidden_layers": 30,
            "num_key_value_heads": 3,
            "is_llama_config": True,
            "rope_interleaved": False,
            "rope_scaling": None,
            "rope_theta": 100000,
            "pretraining_tp": 1,
            "tie_word_embeddings": True,
            "attention_bias": False,
            "mlp_bias": False,
            "pad_token_id": None,
            "vocab_size": 49152,
            "rms_norm_eps": 1e-05,
        },
        {"head_dim": 64, "rope_theta": 1e5, "tie_word_embeddings": True},
    ),
    "Qwen2.5-0.5B": (
        {
            "model_type": "qwen2",
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_attention_heads": 14,
            "num_hidden_layers": 24,
            "num_key_value_heads": 2,
            "max_window_layers": 24,
            "sliding_window": 32768,
            "use_sliding_window": False,
            "use_mrope": False,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
            "vocab_size": 151936,
            "attention_dropout": 0.0,
        },
        {"head_dim": 64, "attention_bias": True, "sliding_window": None},
    ),
    "Llama-3.2-1B": (
        {
            "model_type": "llama",
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_attention_heads": 32,
            "num_hidden_layers": 16,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "rope_theta": 500000.0,
            "tie_word_embeddings": True,
            "rope_scaling": {
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "vocab_size": 128256,
            "eos_token_id": [128001, 128008, 128009],
        },
        {"head_dim": 64, "num_key_value_heads": 8},
    ),
    "Mistral-7B-v0.1": (
        {
            "model_type": "mistral",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 8,
            "sliding_window": 4096,
            "rope_theta": 10000.0,
            "vocab_size": 32000,
        },
        {"head_dim": 128, "sliding_window": 4096},
    ),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_load(name):
    data, expected = PUBLISHED[name]
    config = llama.LlamaConfig.from_hf(data)
    assert {k: getattr(config, k) for k in expected} == expected
    # A field that would change the numbers is still refused by name.
    with pytest.raises(ValueError, match="rope_interleaved"):
        llama.LlamaConfig.from_hf({**data, "rope_interleaved": True})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not implemented"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not implemented"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear' is not implemented"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not implemented"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "sliding window"),
        ({"model_type": "qwen3", "layer_types": ["sliding_attention"] * 2}, "sliding window"),
        ({"moe_num_experts": 8}, "field 'moe_num_experts' = 8 is not known"),
    ],
)
def test_config_refusals(change, message):
    data = {"model_type": "llama", **SMALL, **change}
    with pytest.raises(ValueError, match=message):
        llama.LlamaConfig.from_hf(data)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"model_type": "qwen3", "qk_norm": False}, "qwen3 models have qk_norm=True"),
        ({"model_type": "qwen2", "attention_bias": False}, "qwen2 models have attention_bias"),
        ({"model_type": "mistral", "mlp_bias": True}, "mistral models have mlp_bias=False"),
        ({"sliding_window": 8}, "llama models have sliding_window=None"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ],
)
def test_config_refuses_what_the_model_type_fixes(fields, message):
    with pytest.raises(ValueError, match=message):
        llama.LlamaConfig(**{**SMALL, **fields})


def test_save_pretrained_writes_a_folder_transformers_loads(tmp_path):
    config = llama.LlamaConfig(**SMALL, model_type="qwen3", tie_word_embeddings=True)
    model = llama.Llama(config, rngs=nnx.Rngs(3))
    hf_llm.save_pretrained(model, tmp_path / "f32")
    ids = _inputs()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "f32")
    assert type(twin).__name__ == "Qwen3ForCausalLM"
    assert _relative(_forward(model, jnp.asarray(ids)), _torch_logits(twin, ids)) < TOL
    hf_llm.save_pretrained(model, tmp_path / "bf16", dtype=jnp.bfloat16)
    again, _ = hf_llm.load_pretrained(tmp_path / "bf16")
    for (name, (a, leaf, _)), (_, (b, _, _)) in zip(
        hf_llm.parameter_names(model).items(), hf_llm.parameter_names(again).items(), strict=True
    ):
        expected = np.asarray(getattr(a, leaf)[...]).astype(jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(getattr(b, leaf)[...]), expected, err_msg=name)


def _rewrite(folder: Path, out: Path, edit) -> Path:
    """A copy of a one-file folder whose tensors ``edit(dict)`` changed."""
    from safetensors.numpy import load_file, save_file

    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    return out


BROKEN = {  # what a one-file checkpoint's tensors are changed to, and the error
    "missing": (
        lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
        r"missing/model\.safetensors: .*no tensor 'model\.layers\.1\.mlp\.up_proj",
    ),
    "extra": (
        lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros((2, 2), np.float32)}),
        r"extra/model\.safetensors: tensor 'model\.layers\.0\.mlp\.extra",
    ),
    "shape": (
        lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}),
        r"shape/model\.safetensors: tensor 'model\.norm\.weight' has shape \(63,\)",
    ),
    "ints": (
        lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}),
        r"ints/model\.safetensors: tensor 'model\.norm\.weight' has dtype I32",
    ),
}


def test_checkpoint_refusals(folders, tmp_path):
    folder = folders["llama3"][1]
    for name, (edit, message) in BROKEN.items():
        with pytest.raises(ValueError, match=message):
            hf_llm.load_pretrained(_rewrite(folder, tmp_path / name, edit))
    (tmp_path / "yarn").mkdir()
    data = json.loads((folder / "config.json").read_text())
    data["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    (tmp_path / "yarn" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"yarn.*config\.json|config\.json.*yarn"):
        hf_llm.load_pretrained(tmp_path / "yarn")
    (tmp_path / "pickled").mkdir()  # weights only as pytorch_model.bin: named, not read
    (tmp_path / "pickled" / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin: PyTorch pickles"):
        hf_llm.load_pretrained(tmp_path / "pickled")


# ------------------------------------------------------------------------------ PEFT


def _peft_config(**kwargs):
    return peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, lora_dropout=0.0, **kwargs
    )


def test_peft_dora_trained_in_torch_loads_into_jax(folders, tmp_path):
    torch_model, folder = folders["llama3"]
    twin = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = peft.get_peft_model(twin, _peft_config())
    optimizer = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.5)
    ids = torch.tensor(_inputs()[0])
    for _ in range(3):  # moves lora_B off zero and the magnitudes off ||W0||
        loss = adapted(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapted.eval()
    adapted.save_pretrained(tmp_path / "adapter")
    theirs = _torch_logits(adapted, _inputs()[0])
    base_logits = _torch_logits(torch_model, _inputs()[0])
    assert _relative(theirs, base_logits) > 1e-3  # the adapter changes the logits

    model, _ = hf_llm.load_pretrained(folder, dtype=jnp.float32)
    model, config = hf_llm.load_adapter(model, tmp_path / "adapter")
    assert config.use_dora and config.rank == 4
    assert isinstance(model.model.layers[1].mlp.down_proj, dora_jax.nnx.DoRALinear)
    assert _relative(_forward(model, jnp.asarray(_inputs()[0])), theirs) < TOL


# PEFT configurations users bring, beyond one list of names (each perturbed, not trained).
PEFT_VARIANTS = {
    "all-linear": {"target_modules": "all-linear"},
    "regex-rslora-patterns": {
        "target_modules": r".*\.(q_proj|v_proj|down_proj)",
        "use_rslora": True,
        "rank_pattern": {"down_proj": 2},
        "alpha_pattern": {"down_proj": 16},
    },
    "layers-exclude-save-dropout": {
        "target_modules": ["q_proj", "o_proj", "up_proj"],
        "layers_to_transform": [1],
        "exclude_modules": ["model.layers.1.mlp.up_proj"],
        "modules_to_save": ["lm_head"],
        "lora_dropout": 0.1,
    },
}


@pytest.mark.parametrize("variant", PEFT_VARIANTS)
def test_peft_configurations_load_into_jax(folders, tmp_path, variant):
    torch_model, folder = folders["llama3"]
    twin = transformers.AutoModelForCausalLM.from_pretrained(folder)
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, **PEFT_VARIANTS[variant])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = peft.get_peft_model(twin, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in adapted.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    adapted.eval()
    adapted.save_pretrained(tmp_path)
    ids = _inputs()[0]
    theirs = _torch_logits(adapted, ids)
    assert _relative(theirs, _torch_logits(torch_model, ids)) > 1e-3

    model, _ = hf_llm.load_pretrained(folder, dtype=jnp.float32)
    model, _ = hf_llm.load_adapter(model, tmp_path)
    model.eval()  # dropout off, as in PEFT's eval()
    assert _relative(_forward(model, jnp.asarray(ids)), theirs) < TOL


def test_jax_adapter_loads_in_peft_and_merged_folder_in_transformers(folders, tmp_path):
    torch_model, folder = folders["sharded"]  # several files: the layout is kept
    model, _ = hf_llm.load_pretrained(folder, dtype=jnp.float32)
    config = dora_jax.DoRAConfig(targets=TARGETS, rank=4, alpha=8)
    dora_jax.nnx.apply_dora(model, config, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(2)
    for _, layer in nnx.iter_graph(model):  # stands in for training
        if isinstance(layer, dora_jax.nnx.DoRALayer):
            layer.lora_b[...] = jnp.asarray(rng.normal(0, 0.05, layer.lora_b.shape), jnp.float32)
            layer.magnitude[...] = layer.magnitude[...] * rng.uniform(0.8, 1.2)
    ids = _inputs()[0]
    ours = _forward(model, jnp.asarray(ids))
    assert _relative(ours, _torch_logits(torch_model, ids)) > 1e-3

    hf_llm.save_adapter(model, tmp_path / "adapter", config)
    weights = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(weights["target_modules"])[0] == "model.layers.0.mlp.down_proj"
    twin = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with warnings.catch_warnings():  # transformers' own deprecations, inside PEFT
        warnings.simplefilter("ignore", FutureWarning)
        loaded = peft.PeftModel.from_pretrained(twin, tmp_path / "adapter").eval()
    assert _relative(ours, _torch_logits(loaded, ids)) < TOL

    hf_llm.save_merged(model, tmp_path / "merged", like=folder)
    assert isinstance(model.model.layers[0].self_attn.q_proj, dora_jax.nnx.DoRALinear)
    names = sorted(p.name for p in folder.iterdir())
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == names
    index = "model.safetensors.index.json"
    assert (tmp_path / "merged" / index).read_text() == (folder / index).read_text()
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert _relative(ours, _torch_logits(plain, ids)) < TOL
    merged = dora_jax.nnx.merge_adapters(model)  # what save_merged wrote, in JAX
    for name, (module, leaf, transposed) in hf_llm.parameter_names(merged).items():
        value = np.asarray(getattr(module, leaf)[...])
        np.testing.assert_array_equal(
            plain.state_dict()[name].numpy(), value.T if transposed else value
        )


# --------------------------------------------------------------------------- sharded

SHARDED = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import copy
import importlib.util
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec
examples, folder, expected = sys.argv[1:]
spec = importlib.util.spec_from_file_location("hf_llm", examples + "/hf_llm.py")
hf_llm = importlib.util.module_from_spec(spec)
sys.modules["hf_llm"] = hf_llm
spec.loader.exec_module(hf_llm)
assert jax.device_count() == 8
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "data"))
model, config = hf_llm.load_pretrained(folder, dtype=jnp.float32, mesh=mesh)
q = model.model.layers[0].self_attn.q_proj.kernel[...]
assert q.sharding.spec == PartitionSpec("fsdp", None), q.sharding
assert {s.data.shape for s in q.addressable_shards} == {(16, 64)}
embed = model.model.embed_tokens.embedding[...]
assert embed.sharding.spec == PartitionSpec("fsdp", None), embed.sharding
norm = model.model.norm.scale[...]
assert norm.sharding.spec == PartitionSpec("fsdp"), norm.sharding
ids = jnp.asarray(np.load(expected)["ids"])
logits = jax.jit(lambda ids: model(ids))(ids)
np.testing.assert_allclose(logits, np.load(expected)["logits"], rtol=0, atol=1e-5)
rule = lambda path, shape: PartitionSpec(*([None] * len(shape)))
replicated, _ = hf_llm.load_pretrained(folder, mesh=mesh, shardings=rule)
assert replicated.model.layers[1].mlp.up_proj.kernel[...].sharding.is_fully_replicated
print("ok")
"""


def test_sharded_load_onto_an_eight_device_mesh(folders, tmp_path):
    folder = folders["sharded"][1]
    model, _ = hf_llm.load_pretrained(folder, dtype=jnp.float32)
    ids = _inputs()[0]
    logits = np.asarray(_forward(model, jnp.asarray(ids)))
    np.savez(tmp_path / "expected.npz", ids=ids, logits=logits)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(SHARDED),
            str(EXAMPLES),
            str(folder),
            str(tmp_path / "expected.npz"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_index_and_tied_head_are_checked(folders, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(folders["sharded"][1], sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][name] = files[1]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match=rf"{files[0]}: holds tensor '{name}', which .* places in '{files[1]}'"
    ):
        hf_llm.load_pretrained(sharded)
    # A tied model's file may hold lm_head.weight: accepted if it is the embedding.
    folder = folders["qwen2_tied"][1]
    key = "model.embed_tokens.weight"
    same = _rewrite(folder, tmp_path / "same", lambda t: t.update({"lm_head.weight": t[key]}))
    model, _ = hf_llm.load_pretrained(same, dtype=jnp.float32)
    assert not hasattr(model, "lm_head")
    other = _rewrite(folder, tmp_path / "other", lambda t: t.update({"lm_head.weight": t[key] + 1}))
    with pytest.raises(ValueError, match="'lm_head.weight' differs from 'model.embed_tokens"):
        hf_llm.load_pretrained(other)
