"""Inference: cached norms and merged models.

An unmerged DoRA model with its norms cached (``cache_norms``) must give the same
outputs and compile to the same matrix products as unmerged LoRA (no ``A^T W0``); a
merged model must compile to exactly the base model's program. The cached norm is
compared with a float64 NumPy norm of the materialised ``W0 + s*A@B``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dora_jax
from dora_jax import train


class Base(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(64, name="fc1")(x))
        return nn.Dense(8, name="fc2")(x)


def _wrapped(use_dora=True):
    model, x = Base(), jax.random.normal(jax.random.key(0), (4, 32))
    config = dora_jax.DoRAConfig(targets=["fc1", "fc2"], rank=4, alpha=8.0, use_dora=use_dora)
    wrapped = dora_jax.linen.wrap(model, config)
    params = model.init(jax.random.key(1), x)["params"]
    variables = wrapped.init_from_params(jax.random.key(2), params, x)
    keys = iter(jax.random.split(jax.random.key(3), 16))
    variables["dora"] = jax.tree.map(
        lambda a: a + 0.2 * jax.random.normal(next(keys), a.shape), variables["dora"]
    )
    return model, wrapped, variables, x


def _dots(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def test_cached_norms_match_reference_and_outputs():
    _, wrapped, variables, x = _wrapped()
    cached = dora_jax.linen.cache_norms(wrapped, variables, x)
    for name in ("fc1", "fc2"):
        kernel = np.asarray(variables["params"][name]["kernel"], np.float64)
        adapters = {k: np.asarray(v, np.float64) for k, v in variables["dora"][name].items()}
        reference = np.linalg.norm(kernel + 2.0 * adapters["lora_a"] @ adapters["lora_b"], axis=0)
        got = np.asarray(cached["dora_cache"][name]["inference_norm"])
        np.testing.assert_allclose(got, reference, rtol=1e-5)
    np.testing.assert_allclose(
        wrapped.apply(cached, x), wrapped.apply(variables, x), rtol=1e-6, atol=1e-6
    )


def test_cached_norms_skip_the_kernel_product():
    _, wrapped, variables, x = _wrapped()
    _, lora, lora_variables, _ = _wrapped(use_dora=False)
    cached = dora_jax.linen.cache_norms(wrapped, variables, x)
    uncached = _dots(wrapped.apply, variables, x)
    with_cache = _dots(wrapped.apply, cached, x)
    assert with_cache == _dots(lora.apply, lora_variables, x)
    assert uncached > with_cache  # the norm's products (A^T W0, A^T A, ...) are gone


def test_merged_model_compiles_to_the_base_program():
    model, wrapped, variables, x = _wrapped()
    merged = dora_jax.linen.merge_params(wrapped, variables, x)
    base_params = model.init(jax.random.key(1), x)["params"]
    lower = lambda params: jax.jit(model.apply).lower({"params": params}, x).as_text()  # noqa: E731
    assert lower(merged) == lower(base_params)
    np.testing.assert_allclose(
        model.apply({"params": merged}, x), wrapped.apply(variables, x), rtol=1e-5, atol=1e-5
    )


def test_training_partition_drops_cached_norms():
    _, wrapped, variables, x = _wrapped()
    variables = dora_jax.linen.cache_base_norms(wrapped, variables, x)
    cached = dora_jax.linen.cache_norms(wrapped, variables, x)
    _, frozen = train.partition(cached)
    assert all("inference_norm" not in layer for layer in frozen["dora_cache"].values())
    assert all("base_norm_sq" in layer for layer in frozen["dora_cache"].values())


def test_nnx_cache_norms():
    layer = dora_jax.nnx.DoRALinear(16, 8, rank=2, rngs=nnx.Rngs(0))
    layer.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(1), layer.lora_b.shape)
    x = jax.random.normal(jax.random.key(2), (4, 16))
    expected = layer(x)
    dora_jax.nnx.cache_norms(layer)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-6, atol=1e-6)
    graphdef, state = nnx.split(layer)
    apply = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731
    assert _dots(apply, state, x) == 3  # x@W0, x@A, (x@A)@B: no A^T W0
    dora_jax.nnx.clear_norms(layer)
    assert layer.inference_norm is None
