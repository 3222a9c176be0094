"""Many DoRA adapters in one batch (dora_jax.linen.multi, dora_jax.nnx.multi).

K = 4 adapters of one base with different ranks, alphas and rsLoRA, in a batch mixing
them with the base (id -1), under jit:

* every example equals that example run through its own merged model
  (``merge_params`` / ``merge_adapters``) to 1e-5, and id -1 the base exactly, for a
  model of Dense, DenseGeneral, Einsum and Conv layers, in Linen and NNX, with the
  low-rank products gathered per example and masked over all adapters (the float64
  tests below take the default: masked for few tokens per example, else gathered);
* one layer of each kind against the float64 NumPy reference (``reference.py``):
  ``y_i = design(x_i) @ W'_k + bias`` with ``W'_k = m_k (W0 + s_k A_k B_k) / ||.||_c``;
* the norm caches cannot go stale silently, and what cannot run is refused by name.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from flax import nnx

import dora_jax
from dora_jax import nnx as dora_nnx

TOL = 1e-5
# (rank, alpha, rslora) of the K = 4 adapters.
ADAPTERS = ((2, 4.0, False), (3, 2.0, False), (1, 3.0, True), (3, 6.0, False))
IDS = np.array([-1, 0, 1, 2, 3, 2, -1, 0], np.int32)


def _configs(targets):
    return [
        dora_jax.DoRAConfig(targets=targets, rank=r, alpha=a, rslora=rs) for r, a, rs in ADAPTERS
    ]


def _scale(rank, alpha, rslora):
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _trained(wrapped, params, x, seed):
    """Linen variables with trained-looking adapters (B nonzero, magnitudes off the
    norm), from NumPy: shapes by tracing only, so no eager op is compiled."""
    shapes = jax.eval_shape(lambda p: wrapped.init_from_params(jax.random.key(0), p, x), params)
    rng = np.random.default_rng(seed)

    def value(path, leaf):
        if jax.tree_util.keystr(path).endswith("['magnitude']"):
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        return jnp.asarray(0.3 * rng.standard_normal(leaf.shape), jnp.float32)

    return {"params": params, "dora": jax.tree_util.tree_map_with_path(value, shapes["dora"])}


def _perturb_nnx(model, seed):
    rng = np.random.default_rng(seed)
    for _, v in nnx.iter_graph(model):
        if isinstance(v, nnx.LoRAParam):
            v.set_value(
                jnp.asarray(np.asarray(v[...]) + 0.3 * rng.standard_normal(v.shape), v.dtype)
            )


# ------------------------------------------------------------------ a model of every kind


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(12, name="up")(x))
        h = nn.DenseGeneral((3, 4), name="heads")(h)
        h = nn.Einsum((3, 4, 6), "bthk,hkd->btd", name="mix")(h)
        return nn.Conv(5, (3,), name="conv")(h)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(8, 12, rngs=rngs)
        self.heads = nnx.LinearGeneral(12, (3, 4), rngs=rngs)
        self.mix = nnx.Einsum("bthk,hkd->btd", (3, 4, 6), (6,), rngs=rngs)
        self.conv = nnx.Conv(6, 5, (3,), rngs=rngs)

    def __call__(self, x):
        return self.conv(self.mix(self.heads(jnp.tanh(self.up(x)))))


NET_TARGETS = ["up", "heads", "mix", "conv"]
NET_X = jax.random.normal(jax.random.key(0), (len(IDS), 5, 8))


@functools.cache
def _linen_net():
    net = LinenNet()
    params = jax.jit(net.init)(jax.random.key(1), NET_X)["params"]
    models, variables = [], []
    for k, config in enumerate(_configs(NET_TARGETS)):
        wrapped = dora_jax.linen.wrap(net, config)
        models.append(wrapped)
        variables.append(_trained(wrapped, params, NET_X, 20 + k))
    return net, params, models, variables


def _nnx_models():
    base = NnxNet(nnx.Rngs(1))
    models = []
    for k, config in enumerate(_configs(NET_TARGETS)):
        model = nnx.clone(base)
        dora_nnx.apply_dora(model, config, rngs=nnx.Rngs(10 + k))
        _perturb_nnx(model, 20 + k)
        models.append(model)
    return base, models


def _check_rows(y, row_outputs):
    """Row i of ``y`` against ``row_outputs(k)[i]`` for k = IDS[i]; base rows exactly."""
    for i, k in enumerate(IDS):
        want = row_outputs(int(k))[i]
        if k == -1:
            np.testing.assert_array_equal(np.asarray(y[i]), np.asarray(want))
        else:
            assert ref.relative_error(y[i], want) < TOL, (i, k)


@pytest.mark.parametrize("routing", ["gather", "mask"])
def test_linen_mixed_batch_equals_each_merged_model(routing):
    net, params, models, variables = _linen_net()
    stacked, stacked_vars = dora_jax.linen.stack_adapters(models, variables, NET_X)
    stacked = dataclasses.replace(stacked, routing=routing)
    y = jax.jit(stacked.apply)(stacked_vars, NET_X, adapter_ids=jnp.asarray(IDS))
    assert stacked_vars["dora_stack"]["up"]["lora_a"].shape == (4, 8, 3)  # padded to rank 3
    assert stacked_vars["dora_cache"]["up"]["inference_norm"].shape == (4, 12)

    apply = jax.jit(net.apply)

    def row_outputs(k):
        if k == -1:
            return apply({"params": params}, NET_X)
        merged = dora_jax.linen.merge_params(models[k], variables[k], NET_X)
        return apply({"params": merged}, NET_X)

    _check_rows(y, row_outputs)


def test_nnx_mixed_batch_equals_each_merged_model():
    base, models = _nnx_models()
    stacked = dora_nnx.stack_adapters(models)
    assert isinstance(stacked.up, dora_nnx.StackedLinear)
    assert isinstance(models[0].up, dora_nnx.DoRALinear)  # the inputs are not changed

    @nnx.jit
    def serve(model, ids, x):
        return dora_nnx.with_adapter_ids(model, ids, "gather")(x)

    y = serve(stacked, jnp.asarray(IDS), NET_X)
    run = nnx.jit(lambda model, x: model(x))
    merged = [dora_nnx.merge_adapters(nnx.clone(m)) for m in models]
    _check_rows(y, lambda k: run(base, NET_X) if k == -1 else run(merged[k], NET_X))


# ------------------------------------------------- one layer of each kind, float64 reference

# kind: (Linen layer, NNX layer, input shape, kernel (fan_in, fan_out) view, design of
# one example's input, output shape of one example)
KINDS = {
    "dense": (
        lambda: nn.Dense(6, name="layer"),
        lambda rngs: nnx.Linear(5, 6, rngs=rngs),
        (3, 5),
        lambda x: ref.dense_design(x, 1),
        (3, 6),
    ),
    "dense_general": (
        lambda: nn.DenseGeneral((3, 4), axis=(-2, -1), name="layer"),
        lambda rngs: nnx.LinearGeneral((4, 5), (3, 4), axis=(-2, -1), rngs=rngs),
        (2, 4, 5),
        lambda x: ref.dense_design(x, 2),
        (2, 3, 4),
    ),
    "einsum": (
        lambda: nn.Einsum((5, 3, 4), "btd,dhk->bthk", name="layer"),
        lambda rngs: nnx.Einsum("btd,dhk->bthk", (5, 3, 4), (3, 4), rngs=rngs),
        (3, 5),
        lambda x: ref.dense_design(x, 1),
        (3, 3, 4),
    ),
    "conv": (
        lambda: nn.Conv(5, (3, 3), padding="SAME", name="layer"),
        lambda rngs: nnx.Conv(4, 5, (3, 3), padding="SAME", rngs=rngs),
        (6, 5, 4),
        lambda x: ref.conv2d_design(x[None], (3, 3), "SAME"),
        (6, 5, 5),
    ),
}


class LinenOne(nn.Module):
    make: object

    @nn.compact
    def __call__(self, x):
        return self.make()(x)


class NnxOne(nnx.Module):
    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


def _flat(value, rows):
    return ref.f64(value).reshape(rows, -1)


def _linen_one(kind, x):
    """``(y, kernel, bias, [(lora_a, lora_b, magnitude)] * K)`` of the stacked layer."""
    model = LinenOne(KINDS[kind][0])
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    models, variables = [], []
    for k, config in enumerate(_configs(["layer"])):
        wrapped = dora_jax.linen.wrap(model, config)
        models.append(wrapped)
        variables.append(_trained(wrapped, params, x, 20 + k))
    stacked, stacked_vars = dora_jax.linen.stack_adapters(models, variables, x)
    y = jax.jit(stacked.apply)(stacked_vars, x, adapter_ids=jnp.asarray(IDS))
    layer = params["layer"]
    dora = [v["dora"]["layer"] for v in variables]
    adapters = [(d["lora_a"], d["lora_b"], d["magnitude"]) for d in dora]
    return y, layer["kernel"], layer["bias"], adapters


def _nnx_one(kind, x):
    base = NnxOne(KINDS[kind][1](nnx.Rngs(1)))
    models = []
    for k, config in enumerate(_configs(["layer"])):
        model = nnx.clone(base)
        dora_nnx.apply_dora(model, config, rngs=nnx.Rngs(10 + k))
        _perturb_nnx(model, 20 + k)
        models.append(model)
    stacked = dora_nnx.stack_adapters(models)
    y = nnx.jit(lambda m, ids, x: dora_nnx.with_adapter_ids(m, ids)(x))(
        stacked, jnp.asarray(IDS), x
    )
    layers = [m.layer for m in models]
    adapters = [(la.lora_a[...], la.lora_b[...], la.magnitude[...]) for la in layers]
    return y, base.layer.kernel[...], base.layer.bias[...], adapters


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("front_end", ["linen", "nnx"])
def test_each_row_matches_float64_reference(front_end, kind):
    _, _, x_shape, design, out_shape = KINDS[kind]
    x = jax.random.normal(jax.random.key(0), (len(IDS), *x_shape))
    y, kernel, bias, adapters = (_linen_one if front_end == "linen" else _nnx_one)(kind, x)
    features = int(np.prod(bias.shape))
    w0 = _flat(kernel, kernel.size // features)
    for i, k in enumerate(IDS):
        if k == -1:
            w = w0
        else:
            a, b, m = adapters[k]
            rank = a.shape[-1]
            w = ref.merged_weight(
                w0,
                _flat(a, w0.shape[0]),
                _flat(b, rank),
                ref.f64(m).reshape(-1),
                _scale(*ADAPTERS[k]),
            )
        want = ref.linear_forward(design(np.asarray(x[i])), w, ref.f64(bias).reshape(-1))
        assert ref.relative_error(y[i], want.reshape(out_shape)) < TOL, (kind, i, k)


# --------------------------------------------------------------------------- derived values


def test_linen_without_cached_norms_computes_them_from_params():
    _, params, models, variables = _linen_net()
    stacked, stacked_vars = dora_jax.linen.stack_adapters(models, variables, NET_X)
    # StackedModel.apply of either stack (the same model): one compiled program each.
    run = jax.jit(lambda v: stacked.apply(v, NET_X, adapter_ids=jnp.asarray(IDS)))
    uncached = {k: v for k, v in stacked_vars.items() if k != "dora_cache"}
    np.testing.assert_allclose(run(uncached), run(stacked_vars), atol=1e-6)
    # New base weights without the cache: the numbers of those weights, not the old ones.
    new_params = jax.tree.map(lambda p: 1.1 * p, params)
    _, restacked_vars = dora_jax.linen.stack_adapters(
        models, [{**v, "params": new_params} for v in variables], NET_X
    )
    np.testing.assert_allclose(
        run({**uncached, "params": new_params}), run(restacked_vars), atol=1e-6
    )


def test_nnx_new_kernel_drops_the_stacked_norms():
    _, models = _nnx_models()
    stacked = dora_nnx.stack_adapters(models)
    assert stacked.up.inference_norm is not None
    new_kernel = 1.1 * stacked.up.kernel[...]
    stacked.up.kernel = nnx.Param(new_kernel)
    assert stacked.up.inference_norm is None  # computed from the kernel in every call
    for m in models:
        m.up.kernel = nnx.Param(new_kernel)
    fresh = dora_nnx.stack_adapters(models)
    run = nnx.jit(lambda model: dora_nnx.with_adapter_ids(model, jnp.asarray(IDS))(NET_X))
    np.testing.assert_allclose(run(stacked), run(fresh), atol=1e-6)
    dora_nnx.cache_norms(stacked)  # the stacked layers' own cache: K norms, new kernel
    np.testing.assert_allclose(
        stacked.up.inference_norm[...], fresh.up.inference_norm[...], rtol=1e-6
    )
    dora_nnx.clear_norms(stacked)
    dora_nnx.cache_stacked_norms(stacked)  # the same, by its own name
    np.testing.assert_allclose(
        stacked.up.inference_norm[...], fresh.up.inference_norm[...], rtol=1e-6
    )


# ----------------------------------------------------------------------------------- errors


def test_ids_out_of_range_are_refused_or_nan_under_jit():
    net, params, models, variables = _linen_net()
    stacked, stacked_vars = dora_jax.linen.stack_adapters(models, variables, NET_X)
    bad = IDS.copy()
    bad[3] = 4
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 4\).*\[4\]"):
        stacked.apply(stacked_vars, NET_X, adapter_ids=bad)
    with pytest.raises(ValueError, match=r"integers of shape \(8,\)"):
        stacked.apply(stacked_vars, NET_X, adapter_ids=IDS[:5])
    y = jax.jit(stacked.apply)(stacked_vars, NET_X, adapter_ids=jnp.asarray(bad))
    assert np.isnan(y[3]).all() and np.isfinite(np.delete(np.asarray(y), 3, axis=0)).all()
    stacked_nnx = dora_nnx.stack_adapters(_nnx_models()[1])
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 4\).*\[-2\]"):
        dora_nnx.with_adapter_ids(stacked_nnx, np.array([0, -2]))
    with pytest.raises(ValueError, match="runs through dora_jax.nnx.with_adapter_ids"):
        stacked_nnx(NET_X)
    with pytest.raises(ValueError, match="merge each adapter's own model"):
        dora_nnx.merge_adapters(stacked_nnx)


def test_stacks_need_one_base_and_supported_layers():
    net, params, models, variables = _linen_net()
    with pytest.raises(TypeError, match="needs models made by dora_jax.linen.wrap"):
        dora_jax.linen.stack_adapters(net, variables, NET_X)
    other = {**variables[1], "params": jax.tree.map(lambda p: p + 1, params)}
    with pytest.raises(ValueError, match=r"params leaf \['conv'\]\['bias'\] of adapter 1"):
        dora_jax.linen.stack_adapters(models[:2], [variables[0], other], NET_X)
    narrow = dora_jax.linen.wrap(net, dora_jax.DoRAConfig(targets=["up"]))
    v = _trained(narrow, params, NET_X, 0)
    with pytest.raises(ValueError, match=r"adapter 1 adapts other layers.*'conv'"):
        dora_jax.linen.stack_adapters([models[0], narrow], [variables[0], v], NET_X)
    lora = dora_jax.linen.wrap(
        net, dora_jax.DoRAConfig(targets=NET_TARGETS, rank=2, use_dora=False)
    )
    v = _trained(lora, params, NET_X, 0)
    with pytest.raises(ValueError, match="adapter 1 is plain LoRA"):
        dora_jax.linen.stack_adapters([models[0], lora], [variables[0], v], NET_X)

    class Embedder(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Embed(10, 4, name="embed")(ids)

    ids = jnp.zeros((2, 3), jnp.int32)
    embedder = dora_jax.linen.wrap(Embedder(), dora_jax.DoRAConfig(targets=["embed"], rank=2))
    v = embedder.init(jax.random.key(0), ids)
    with pytest.raises(ValueError, match="layer 'embed' is an Embed"):
        dora_jax.linen.stack_adapters(embedder, [v, v], ids)
    embed_models = []
    for _ in range(2):
        model = NnxOne(nnx.Embed(10, 4, rngs=nnx.Rngs(0)))
        embed_models.append(
            dora_nnx.apply_dora(
                model, dora_jax.DoRAConfig(targets=["layer"], rank=2), rngs=nnx.Rngs(1)
            )
        )
    with pytest.raises(ValueError, match="'layer' is a DoRAEmbed"):
        dora_nnx.stack_adapters(embed_models)
    _, nnx_models = _nnx_models()
    nnx_models[1].up.kernel = nnx.Param(nnx_models[1].up.kernel[...] + 1)
    with pytest.raises(ValueError, match=r"base weight .*up.*kernel.* of model 1 differs"):
        dora_nnx.stack_adapters(nnx_models)


def test_example_axis_must_lead():
    class Transposed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((5, 6), "tbd,do->bto", name="layer")(x)

    x = jnp.ones((3, 2, 5))
    wrapped = dora_jax.linen.wrap(Transposed(), dora_jax.DoRAConfig(targets=["layer"], rank=2))
    v = wrapped.init(jax.random.key(0), x)
    stacked, stacked_vars = dora_jax.linen.stack_adapters(wrapped, [v, v], x)
    with pytest.raises(ValueError, match=r"'tbd,do->bto': the input's leading \(example\) axis"):
        stacked.apply(stacked_vars, x, adapter_ids=np.array([0, 1, -1]))
