"""Linen and NNX DoRA layers compute the same outputs and adapter gradients.

Each case of the shared catalogue (``conftest.CASES``: Dense, rsLoRA, DenseGeneral,
Einsum, SAME/VALID/uneven/strided Conv, Embed), plus an Einsum with a batch axis in its
kernel and its output axes reordered, builds an NNX layer, gives it non-trivial adapters
(random ``B``, perturbed magnitude), copies every weight into the matching Linen layer's
variables, and compares outputs and the gradients of ``lora_a``, ``lora_b`` and
``magnitude``, jitted and not, on a float32 and a bfloat16 base. The NNX layer also trains
through the standard ``nnx.LoRAParam`` filter.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CASES, make_inputs
from flax import nnx

import dora_jax
from dora_jax import nnx as dora_nnx

ADAPTERS = ("lora_a", "lora_b", "magnitude")
BATCH_AXIS_EINSUM = "einsum_batch_axis"


def _case(name: str, dtype):
    """``(nnx_layer, linen_layer, inputs, base_param_name)`` for one case."""
    rngs = nnx.Rngs(0)
    common = dict(alpha=6.0, param_dtype=dtype, dtype=dtype)
    if name == BATCH_AXIS_EINSUM:  # the flat reference of the catalogue has no batch axis
        x = jax.random.normal(jax.random.key(1), (2, 3, 4, 6))
        equation = "bthd,hdk->bkth"
        return (
            dora_nnx.DoRAEinsum(equation, (4, 6, 5), (5, 4), rank=3, rngs=rngs, **common),
            dora_jax.DoRAEinsum(shape=(4, 6, 5), einsum_str=equation, rank=3, **common),
            x,
            "kernel",
        )
    case = CASES[name]
    x = make_inputs(case, np.random.default_rng(1))
    return case.make_nnx(rngs, **common), case.make(**common), x, case.param


def _randomise(layer) -> None:
    keys = jax.random.split(jax.random.key(2), 3)
    layer.lora_b[...] = 0.3 * jax.random.normal(keys[0], layer.lora_b.shape)
    layer.lora_a[...] = 0.3 * jax.random.normal(keys[1], layer.lora_a.shape)
    noise = 0.1 * jax.random.normal(keys[2], layer.magnitude.shape)
    layer.magnitude[...] = layer.magnitude[...] * (1.0 + noise)


def _linen_variables(layer, base_name: str) -> dict:
    params = {base_name: getattr(layer, base_name)[...]}
    if getattr(layer, "bias", None) is not None:
        params["bias"] = layer.bias[...]
    adapters = {name: getattr(layer, name)[...] for name in ADAPTERS}
    return {"params": params, "dora": adapters}


@pytest.mark.parametrize("kind", [*CASES, BATCH_AXIS_EINSUM])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_linen_and_nnx_agree(kind, dtype, jit):
    nnx_layer, linen_layer, x, base_name = _case(kind, dtype)
    _randomise(nnx_layer)
    variables = _linen_variables(nnx_layer, base_name)
    graphdef, adapters, frozen = nnx.split(nnx_layer, nnx.LoRAParam, ...)
    cotangent = jax.random.normal(jax.random.key(3), linen_layer.apply(variables, x).shape)

    def nnx_loss(adapters):
        y = nnx.merge(graphdef, adapters, frozen)(x)
        return jnp.sum(y.astype(jnp.float32) * cotangent), y

    def linen_loss(dora):
        y = linen_layer.apply({**variables, "dora": dora}, x)
        return jnp.sum(y.astype(jnp.float32) * cotangent), y

    nnx_grad = jax.value_and_grad(nnx_loss, has_aux=True)
    linen_grad = jax.value_and_grad(linen_loss, has_aux=True)
    if jit:
        nnx_grad, linen_grad = jax.jit(nnx_grad), jax.jit(linen_grad)
    (_, y_nnx), g_nnx = nnx_grad(adapters)
    (_, y_linen), g_linen = linen_grad(variables["dora"])

    assert y_nnx.dtype == y_linen.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(y_nnx, np.float32), np.asarray(y_linen, np.float32), rtol=1e-6, atol=1e-6
    )
    for name in ADAPTERS:
        got, want = np.asarray(g_nnx[name][...]), np.asarray(g_linen[name])
        assert np.abs(want).max() > 0, name
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_nnx_trains_through_lora_param_filter():
    model = dora_nnx.DoRALinear(6, 4, rank=2, rngs=nnx.Rngs(0))
    kernel_before = np.asarray(model.kernel[...]).copy()
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    x = jax.random.normal(jax.random.key(1), (8, 6))
    target = jax.random.normal(jax.random.key(2), (8, 4))

    @nnx.jit
    def step(model, optimizer):
        loss_fn = lambda m: jnp.mean((m(x) - target) ** 2)  # noqa: E731
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(20)]
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(np.asarray(model.kernel[...]), kernel_before)
    assert np.abs(np.asarray(model.lora_b[...])).max() > 0


def test_from_module_keeps_base_variables_and_output():
    base = nnx.Linear(5, 3, rngs=nnx.Rngs(4))
    layer = dora_nnx.DoRALinear.from_module(base, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    assert layer.kernel is base.kernel and layer.bias is base.bias
    x = jax.random.normal(jax.random.key(0), (2, 5))
    np.testing.assert_allclose(layer(x), base(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        layer.magnitude[...], np.linalg.norm(np.asarray(base.kernel[...]), axis=0), rtol=1e-6
    )


def test_recompute_magnitude_after_loading_kernel():
    layer = dora_nnx.DoRALinear(5, 3, rank=2, rngs=nnx.Rngs(0))
    pretrained = jax.random.normal(jax.random.key(9), (5, 3))
    layer.kernel[...] = pretrained
    layer.recompute_magnitude()
    x = jax.random.normal(jax.random.key(0), (2, 5))
    np.testing.assert_allclose(layer(x), x @ pretrained + layer.bias[...], rtol=1e-5, atol=1e-6)


def test_linen_recompute_magnitudes_after_loading_params():
    layer = dora_jax.DoRADense(3, rank=2)
    x = jax.random.normal(jax.random.key(0), (2, 5))
    variables = layer.init(jax.random.key(1), x)
    variables = dora_jax.linen.cache_base_norms(layer, variables, x)  # refreshed below
    pretrained = jax.random.normal(jax.random.key(9), (5, 3))
    variables = {**variables, "params": {**variables["params"], "kernel": pretrained}}
    refreshed = dora_jax.recompute_magnitudes(layer, variables, x)
    np.testing.assert_allclose(
        refreshed["dora"]["magnitude"], np.linalg.norm(np.asarray(pretrained), axis=0), rtol=1e-6
    )
    np.testing.assert_allclose(
        refreshed["dora_cache"]["base_norm_sq"],
        np.sum(np.asarray(pretrained) ** 2, axis=0),
        rtol=1e-6,
    )
    plain = nn.Dense(3).apply({"params": refreshed["params"]}, x)
    np.testing.assert_allclose(layer.apply(refreshed, x), plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(refreshed["dora"]["lora_a"], variables["dora"]["lora_a"])
