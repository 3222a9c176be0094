"""No stale ``||W0||_c^2`` cache: DoRA is always computed from the base weights given.

The natural flows -- ``init``, then pretrained weights put into ``variables["params"]``,
then ``apply`` (Linen layers and :func:`dora_jax.linen.wrap`), and ``apply_dora`` then a
new kernel value set into an adapted NNX layer -- must give DoRA of those weights. The
outputs are compared with a float64 NumPy merge of the same weights (``tests/reference.py``)
and, for a ``Dense`` layer, with HuggingFace PEFT. Each test also checks that the weights
changed enough for a cache of the old ones to be wrong (so no comparison is vacuous).

The speed cache exists only after an explicit ``cache_base_norms`` and gives the same
outputs as no cache (<= 1e-6).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
import reference as ref
from flax import nnx

import dora_jax
from dora_jax import DoRAConfig
from dora_jax import linen as dora_linen
from dora_jax import nnx as dora_nnx

RANK, ALPHA = 2, 4.0
SCALE = ALPHA / RANK
TOL = 1e-5


def _merged(kernel, adapters, scale: float = SCALE) -> np.ndarray:
    """``m * V' / ||V'||_c`` in float64 for any kernel whose ``lora_a`` is ``(*in, r)``."""
    a = np.asarray(adapters["lora_a"])
    fan_in = int(np.prod(a.shape[:-1]))
    w0 = ref.f64(kernel).reshape(fan_in, -1)
    merged = ref.merged_weight(
        w0,
        a.reshape(fan_in, -1),
        np.asarray(adapters["lora_b"]).reshape(a.shape[-1], -1),
        np.asarray(adapters["magnitude"]).reshape(-1),
        scale,
    )
    return merged.reshape(np.shape(kernel))


def _new_weights(tree, seed: int):
    """Different "pretrained" weights of the same shapes (every leaf moved a lot)."""
    return models.perturb(tree, seed=seed, scale=1.0)


# --------------------------------------------------------------------------------------
# Linen layers.


def _dense_case():
    layer = dora_jax.DoRADense(6, rank=RANK, alpha=ALPHA)
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    variables = layer.init(jax.random.key(0), x)
    return layer, x, variables


def test_linen_init_returns_no_cache():
    layer, x, variables = _dense_case()
    assert set(variables) == {"params", "dora"}
    _, state = layer.apply(variables, x, mutable=True)
    assert "dora_cache" not in state  # apply does not create one either
    magnitudes = dora_jax.recompute_magnitudes(layer, variables, x)
    assert "dora_cache" not in magnitudes


def test_linen_new_params_after_init_give_dora_of_those_params():
    layer, x, variables = _dense_case()
    params = _new_weights(variables["params"], seed=1)
    dora = _new_weights(variables["dora"], seed=2)
    loaded = {"params": params, "dora": dora}
    want = ref.linear_forward(x, _merged(params["kernel"], dora), params["bias"])
    assert ref.relative_error(layer.apply(loaded, x), want) <= TOL
    # Not vacuous: the init kernel's ||W0||^2 would give another output.
    stale = dora_linen.cache_base_norms(layer, variables, x)
    wrong = layer.apply({**loaded, "dora_cache": stale["dora_cache"]}, x)
    assert ref.relative_error(wrong, want) > 1e-2


def test_linen_explicit_cache_depends_on_the_params_given():
    layer, x, variables = _dense_case()
    params = _new_weights(variables["params"], seed=3)
    loaded = {"params": params, "dora": _new_weights(variables["dora"], seed=4)}
    cached = dora_linen.cache_base_norms(layer, loaded, x)
    assert set(cached) == {"params", "dora", "dora_cache"}
    np.testing.assert_allclose(
        cached["dora_cache"]["base_norm_sq"],
        np.sum(ref.f64(params["kernel"]) ** 2, axis=0),
        rtol=1e-6,
    )
    assert ref.relative_error(layer.apply(cached, x), layer.apply(loaded, x)) <= 1e-6
    # A second call replaces the cache (and drops an inference norm cache).
    inference = dora_linen.cache_norms(layer, cached, x)
    assert set(inference["dora_cache"]) == {"base_norm_sq", "inference_norm"}
    again = dora_linen.cache_base_norms(layer, inference, x)
    assert set(again["dora_cache"]) == {"base_norm_sq"}


def test_linen_recompute_magnitudes_refreshes_an_existing_cache():
    layer, x, variables = _dense_case()
    cached = dora_linen.cache_base_norms(layer, variables, x)
    params = _new_weights(variables["params"], seed=5)
    fixed = dora_jax.recompute_magnitudes(layer, {**cached, "params": params}, x)
    np.testing.assert_allclose(
        fixed["dora_cache"]["base_norm_sq"],
        np.sum(ref.f64(params["kernel"]) ** 2, axis=0),
        rtol=1e-6,
    )


def test_linen_init_never_creates_the_inference_norm():
    layer, x, variables = _dense_case()
    assert "dora_cache" not in variables
    wrapped = dora_linen.wrap(models.Bert(), DoRAConfig(targets=["query"], rank=RANK))
    ids = np.zeros((1, 4), np.int32)
    shapes = jax.eval_shape(wrapped.init, models.key(0), ids)
    assert set(shapes) == {"params", "dora"}


def test_linen_layer_matches_peft_after_loading_weights_into_init_variables():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(5, 6)

        def forward(self, x):
            return self.layer(x)

    torch.manual_seed(0)
    config = peft.LoraConfig(
        target_modules=["layer"], r=RANK, lora_alpha=ALPHA, use_dora=True, init_lora_weights=False
    )
    peft_model = peft.get_peft_model(Holder(), config).eval()
    lora = peft_model.base_model.model.layer
    with torch.no_grad():  # magnitudes away from PEFT's init, so g != 1
        lora.lora_magnitude_vector["default"].weight.mul_(1.3)
    numpy = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
    layer, x, variables = _dense_case()
    loaded = {
        "params": {
            "kernel": numpy(lora.base_layer.weight).T,
            "bias": numpy(lora.base_layer.bias),
        },
        "dora": {
            "lora_a": numpy(lora.lora_A["default"].weight).T,
            "lora_b": numpy(lora.lora_B["default"].weight).T,
            "magnitude": numpy(lora.lora_magnitude_vector["default"].weight),
        },
    }
    with torch.no_grad():
        want = numpy(peft_model(torch.from_numpy(x)))
    assert ref.relative_error(layer.apply({**variables, **loaded}, x), want) <= TOL


# --------------------------------------------------------------------------------------
# wrap: the repository's BERT.


BERT_CONFIG = DoRAConfig(
    targets=["query", "value", "out", "intermediate", "output", "word_embeddings"],
    rank=RANK,
    alpha=ALPHA,
)


def _bert_merged_params(params, dora):
    """The unwrapped BERT's params with every adapted weight merged in float64."""

    def visit(p, d):
        out = dict(p)
        for key, value in d.items():
            if "lora_a" in value:
                name = "embedding" if "embedding" in p[key] else "kernel"
                merged = _merged(p[key][name], value)
                out[key] = {**p[key], name: jnp.asarray(merged, jnp.float32)}
            else:
                out[key] = visit(p[key], value)
        return out

    return visit(params, dora)


def test_wrap_init_then_new_params_then_apply_is_dora_of_those_params():
    model = models.Bert()
    ids = np.random.default_rng(0).integers(0, model.vocab, (2, 8))
    wrapped = dora_linen.wrap(model, BERT_CONFIG)
    variables = jax.jit(wrapped.init)(models.key(0), ids)
    assert set(variables) == {"params", "dora"}
    params = _new_weights(variables["params"], seed=6)
    dora = _new_weights(variables["dora"], seed=7)
    loaded = {"params": params, "dora": dora}
    merged = _bert_merged_params(params, dora)

    @jax.jit  # one program: the CPU compiles BERT once for all four outputs
    def outputs(variables, loaded, merged):
        cached = dora_linen.cache_base_norms(wrapped, loaded, ids)
        stale = dora_linen.cache_base_norms(wrapped, variables, ids)["dora_cache"]
        return (
            wrapped.apply(loaded, ids),
            wrapped.apply(cached, ids),
            wrapped.apply({**loaded, "dora_cache": stale}, ids),
            model.apply({"params": merged}, ids),
        )

    got, with_cache, wrong, want = outputs(variables, loaded, merged)
    assert ref.relative_error(got, want) <= 1e-4  # float32 model on merged float64 weights
    assert ref.relative_error(with_cache, got) <= 1e-6
    assert ref.relative_error(wrong, want) > 1e-2  # not vacuous: a stale cache is wrong


# --------------------------------------------------------------------------------------
# NNX.


class _NnxMlp(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(5, 8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.fc1(x)))


def test_nnx_apply_dora_then_new_kernel_value_is_dora_of_that_kernel():
    layer = dora_nnx.DoRALinear.from_module(
        nnx.Linear(5, 6, rngs=nnx.Rngs(0)), rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1)
    )
    assert layer.base_norm_sq is None  # no cache unless asked for
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    old_kernel = np.asarray(layer.kernel[...])
    layer.lora_b[...] = 0.5 * jax.random.normal(jax.random.key(2), layer.lora_b.shape)
    layer.kernel[...] = jnp.asarray(_new_weights(old_kernel, seed=8))
    adapters = {k: getattr(layer, k)[...] for k in ("lora_a", "lora_b", "magnitude")}
    want = ref.linear_forward(x, _merged(layer.kernel[...], adapters), layer.bias[...])
    assert ref.relative_error(layer(x), want) <= TOL
    stale = _merged(old_kernel, adapters)  # what the old cache would have normalised by
    assert ref.relative_error(_merged(layer.kernel[...], adapters), stale) > 1e-2


def test_nnx_surgery_then_new_kernels_matches_reference_and_cache_is_explicit():
    model = _NnxMlp(nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    dora_nnx.apply_dora(
        model, DoRAConfig(targets=["fc1", "head"], rank=RANK, alpha=ALPHA), rngs=nnx.Rngs(1)
    )
    h = ref.f64(x)
    for seed, name in enumerate(("fc1", "head")):
        layer = getattr(model, name)
        assert layer.base_norm_sq is None  # no cache unless asked for
        # New "pretrained" kernels set after the surgery, trained-looking adapters.
        layer.kernel[...] = jnp.asarray(_new_weights(layer.kernel[...], seed=9 + seed))
        layer.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(seed), layer.lora_b.shape)
        adapters = {k: getattr(layer, k)[...] for k in ("lora_a", "lora_b", "magnitude")}
        h = ref.linear_forward(h, _merged(layer.kernel[...], adapters), layer.bias[...])
        h = np.tanh(h) if name == "fc1" else h
    expected = model(x)
    assert ref.relative_error(expected, h) <= TOL
    dora_nnx.cache_base_norms(model)
    assert model.fc1.base_norm_sq is not None and model.head.base_norm_sq is not None
    assert ref.relative_error(model(x), expected) <= 1e-6
    assert ref.relative_error(nnx.jit(lambda m, x: m(x))(model, x), expected) <= 1e-6


def test_nnx_cache_follows_the_kernel():
    layer = dora_nnx.DoRALinear(5, 6, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    dora_nnx.cache_base_norms(layer)
    np.testing.assert_allclose(
        layer.base_norm_sq[...], np.sum(ref.f64(layer.kernel[...]) ** 2, axis=0), rtol=1e-6
    )
    dora_nnx.cache_norms(layer)
    # Assigning a new kernel variable drops both caches.
    new = jnp.asarray(_new_weights(layer.kernel[...], seed=10))
    layer.kernel = nnx.Param(new)
    assert layer.base_norm_sq is None and layer.inference_norm is None
    adapters = {k: getattr(layer, k)[...] for k in ("lora_a", "lora_b", "magnitude")}
    want = ref.linear_forward(x, _merged(new, adapters), layer.bias[...])
    assert ref.relative_error(layer(x), want) <= TOL
    # recompute_magnitude refreshes an existing cache from the current kernel.
    dora_nnx.cache_base_norms(layer)
    layer.kernel[...] = jnp.asarray(_new_weights(new, seed=11))
    layer.recompute_magnitude()
    np.testing.assert_allclose(
        layer.base_norm_sq[...], np.sum(ref.f64(layer.kernel[...]) ** 2, axis=0), rtol=1e-6
    )
    dora_nnx.clear_base_norms(layer)
    assert layer.base_norm_sq is None


def test_nnx_cache_of_another_shape_is_refused():
    layer = dora_nnx.DoRALinear(5, 6, rank=RANK, rngs=nnx.Rngs(0))
    layer.base_norm_sq = dora_nnx.NormCache(jnp.ones((4,)))
    with pytest.raises(ValueError, match=r"base_norm_sq has shape \(4,\), expected \(6,\)"):
        layer(jnp.ones((1, 5)))


def test_linen_merge_and_caches_trace_the_model_for_shapes_only():
    """Merging and the norm caches compute from the variables: the model is traced for
    shapes only, so no product with the example input is computed."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return dora_jax.DoRADense(3, rank=2, name="fc2")(
                jnp.tanh(dora_jax.DoRADense(6, rank=2, name="fc1")(x))
            )

    net, x = Net(), jnp.ones((7, 5))  # 7 rows: no kernel has a 7
    variables = net.init(jax.random.key(0), x)
    for helper in (
        dora_linen.merge_params,
        dora_linen.cache_norms,
        dora_linen.cache_base_norms,
        dora_linen.recompute_magnitudes,
    ):
        jaxpr = jax.make_jaxpr(lambda v, helper=helper: helper(net, v, x))(variables)
        products = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
        shapes = [v.aval.shape for e in products for v in e.invars]
        assert all(7 not in shape for shape in shapes), (helper.__name__, shapes)
    facts = dora_linen.adapted_layers(net, variables, x)
    assert [(f.path, f.kernel_shape) for f in facts] == [(("fc1",), (5, 6)), (("fc2",), (6, 3))]
