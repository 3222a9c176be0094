"""The Linen DoRA layers and ``dora_jax.ops.merge`` against the float64 NumPy reference.

What is compared (``tests/reference.py`` holds the reference, written from the paper):

* the forward output of DoRADense, DoRADenseGeneral (2 input axes, 2 output axes),
  DoRAEinsum (``btd,dhk->bthk``), DoRAConv (2-d, stride 1, 'SAME' and 'VALID') and
  DoRAEmbed (and ``DoRAEmbed.attend``), the cases of the catalogue in ``conftest.py``
  (``test_nnx_reference.py`` runs the NNX layers over the same cases);
* the merged kernel ``ops.merge(...)`` against the reference ``W'``;
* ``jax.grad`` with respect to the ``"dora"`` collection (``lora_a``, ``lora_b``,
  ``magnitude``) of ``L = sum(y * cotangent)``, with the detached norm (default, the
  paper's constant-C gradient) and the exact projected gradient (``detach_norm=False``);
* the state at initialisation (equal to the plain Flax layer), that every magnitude gets
  a gradient, that one Adam step makes DoRA differ from LoRA, and all-zero output
  features (no NaN/Inf, other features unchanged).

The forward, merge and gradient comparisons run with and without ``jax.jit``, on a
float32 base (relative error ``<= 1e-5``) and a bfloat16 base
(``param_dtype=dtype=bfloat16``; relative error ``<= 2e-2`` against the reference computed
from the bfloat16 weights upcast to float64); the other checks use float32, the Adam step
runs under ``jax.jit`` and the zero-norm checks eagerly. Adapters always have nonzero
``B`` (and ``A``) and a magnitude perturbed away from the norm, so the DoRA scaling is not
the identity.

Relative error: ``max|got - ref| / max|ref|`` over a whole array (``reference.relative_error``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from conftest import (
    BASE_CASES,
    CASES,
    F32_TOL,
    TOLERANCE,
    fans,
    flat_adapters,
    make_cotangent,
    make_inputs,
    random_variables,
    reference_results,
)

import dora_jax
from dora_jax import ops


def library_results(case, model, variables, x, cotangent, *, jit: bool):
    """Forward, merged kernel and ``jax.grad`` w.r.t. ``"dora"`` from the library."""
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k not in ("params", "dora")}

    def forward(dora):
        return model.apply({"params": params, "dora": dora, **rest}, x)

    def loss(dora):
        return jnp.sum(forward(dora).astype(jnp.float32) * cotangent)

    def merged(dora):
        return ops.merge(
            params[case.param],
            dora["lora_a"],
            dora["lora_b"],
            dora["magnitude"],
            case.scale,
            case.layout,
        )

    def everything(dora):
        return {"y": forward(dora), "merged": merged(dora), "grads": jax.grad(loss)(dora)}

    return (jax.jit(everything) if jit else everything)(variables["dora"])


@functools.cache
def compare(case_name: str, dtype: str, jit: bool, detach_norm: bool):
    """``(library, reference)`` results for one configuration (cached across tests)."""
    case = CASES[case_name]
    model, x, variables = random_variables(case, dtype, seed=0)
    model = model.clone(detach_norm=detach_norm)
    cotangent = make_cotangent(case, x)
    got = library_results(case, model, variables, x, cotangent, jit=jit)
    want = reference_results(case, variables, x, cotangent, detach_norm=detach_norm)
    return got, want


jit_param = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
dtype_param = pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
case_param = pytest.mark.parametrize("case_name", list(CASES))


# ------------------------------------------------------------------- against reference


@case_param
@dtype_param
@jit_param
def test_forward_matches_reference(case_name, dtype, jit):
    got, want = compare(case_name, dtype, jit, True)
    assert got["y"].dtype == jnp.dtype(dtype)
    assert got["y"].shape == want["y"].shape
    assert ref.relative_error(got["y"], want["y"]) <= TOLERANCE[dtype]


@case_param
@dtype_param
@jit_param
def test_merge_matches_reference_weight(case_name, dtype, jit):
    got, want = compare(case_name, dtype, jit, True)
    assert got["merged"].dtype == jnp.dtype(dtype)
    assert ref.relative_error(got["merged"], want["merged"]) <= TOLERANCE[dtype]


@case_param
@dtype_param
@jit_param
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
def test_gradients_match_reference(case_name, dtype, jit, detach_norm):
    """Detached: ``(m/C) grad_W'`` carried to A and B; exact: the projected gradient."""
    got, want = compare(case_name, dtype, jit, detach_norm)
    for name in ("lora_a", "lora_b", "magnitude"):
        assert got["grads"][name].dtype == jnp.float32, name
        err = ref.relative_error(got["grads"][name], want["grads"][name])
        assert err <= TOLERANCE[dtype], (name, err)


@case_param
@jit_param
def test_detached_and_exact_gradients_differ(case_name, jit):
    """With ``B != 0`` the projection term is large; the magnitude gradient is shared."""
    detached, want_detached = compare(case_name, "float32", jit, True)
    exact, want_exact = compare(case_name, "float32", jit, False)
    for name in ("lora_a", "lora_b"):
        # The reference itself says the two differ by far more than the tolerance ...
        assert ref.relative_error(want_detached["grads"][name], want_exact["grads"][name]) > 0.05
        # ... and so does the library.
        assert ref.relative_error(detached["grads"][name], exact["grads"][name]) > 0.05, name
    err_m = ref.relative_error(detached["grads"]["magnitude"], exact["grads"]["magnitude"])
    assert err_m <= F32_TOL


@jit_param
def test_embed_attend_matches_reference(jit):
    """``DoRAEmbed.attend(q) = q @ W'^T`` (tied output embeddings)."""
    case = CASES["embed"]
    model, _, variables = random_variables(case)
    query = jnp.asarray(np.random.default_rng(3).standard_normal((4, 6)), jnp.float32)
    attend = functools.partial(model.apply, method="attend")
    got = (jax.jit(attend) if jit else attend)(variables, query)
    w0, a, b, m, _ = flat_adapters(case, variables["params"], variables["dora"])
    want = ref.f64(query) @ ref.merged_weight(w0, a, b, m, case.scale).T
    assert ref.relative_error(got, want) <= F32_TOL


# ------------------------------------------------------------- initialisation, training


@pytest.mark.parametrize("case_name", BASE_CASES)
@pytest.mark.parametrize("weights", ["fresh", "loaded"])
@jit_param
def test_init_output_equals_base_layer(case_name, weights, jit):
    """Default init (``B = 0``; for Embed ``A = 0``): the layer is the plain Flax layer.

    ``fresh``: the variables of ``init``. ``loaded``: random base weights (and bias) put
    into ``"params"`` afterwards, then ``recompute_magnitudes``.
    """
    case = CASES[case_name]
    rng = np.random.default_rng(5)
    model = case.make()
    x = make_inputs(case, rng)
    variables = model.init(jax.random.key(5), x)
    if weights == "loaded":
        params = {
            k: jnp.asarray(rng.standard_normal(v.shape), v.dtype)
            for k, v in variables["params"].items()
        }
        variables = dora_jax.recompute_magnitudes(model, {**variables, "params": params}, x)
    apply = jax.jit(model.apply) if jit else model.apply
    base_apply = jax.jit(case.make_base().apply) if jit else case.make_base().apply
    got = apply(variables, x)
    want = base_apply({"params": variables["params"]}, x)
    assert got.shape == want.shape
    assert ref.relative_error(got, want) <= 1e-6


@pytest.mark.parametrize("case_name", BASE_CASES)
@jit_param
def test_every_magnitude_gets_a_gradient_at_init(case_name, jit):
    case = CASES[case_name]
    model = case.make()
    x = make_inputs(case, np.random.default_rng(7))
    variables = model.init(jax.random.key(7), x)
    cotangent = make_cotangent(case, x, seed=8)

    def loss(dora):
        return jnp.sum(model.apply({**variables, "dora": dora}, x) * cotangent)

    grad = (jax.jit(jax.grad(loss)) if jit else jax.grad(loss))(variables["dora"])
    grad_m = np.asarray(grad["magnitude"])
    assert grad_m.shape == variables["dora"]["magnitude"].shape
    assert np.all(np.isfinite(grad_m))
    assert np.all(grad_m != 0.0), grad_m
    # and it is the reference's colsum(V * grad_W') / C at V = W0
    want = reference_results(case, variables, x, cotangent, detach_norm=True)
    assert ref.relative_error(grad_m, want["grads"]["magnitude"]) <= F32_TOL


@pytest.mark.parametrize("case_name", BASE_CASES)
def test_one_adam_step_makes_dora_differ_from_lora(case_name):
    """Same init, data and optimizer: after one step DoRA's output is not LoRA's."""
    case = CASES[case_name]
    rng = np.random.default_rng(11)
    dora_model, lora_model = case.make(), case.make(use_dora=False)
    x = make_inputs(case, rng)
    target = jnp.asarray(rng.standard_normal(case.out_shape(tuple(x.shape))), jnp.float32)
    dora_vars = dora_model.init(jax.random.key(11), x)
    lora_vars = lora_model.init(jax.random.key(11), x)
    assert "magnitude" not in lora_vars["dora"]
    for name in ("lora_a", "lora_b"):
        np.testing.assert_array_equal(lora_vars["dora"][name], dora_vars["dora"][name])
    np.testing.assert_array_equal(lora_vars["params"][case.param], dora_vars["params"][case.param])
    optimizer = optax.adam(1e-2)

    def step(model, variables):
        def loss(dora):
            y = model.apply({"params": variables["params"], "dora": dora}, x)
            return jnp.mean((y - target) ** 2)

        dora = variables["dora"]
        grads = jax.grad(loss)(dora)
        updates, _ = optimizer.update(grads, optimizer.init(dora), dora)
        new = {"params": variables["params"], "dora": optax.apply_updates(dora, updates)}
        return model.apply(new, x), new

    y0_dora = dora_model.apply(dora_vars, x)
    y0_lora = lora_model.apply(lora_vars, x)
    assert ref.relative_error(y0_dora, y0_lora) <= 1e-6  # identical start
    jit_step = jax.jit(step, static_argnums=0)  # the training path
    y_dora, new_dora = jit_step(dora_model, dora_vars)
    y_lora, _ = jit_step(lora_model, lora_vars)
    assert np.all(
        np.asarray(new_dora["dora"]["magnitude"]) != np.asarray(dora_vars["dora"]["magnitude"])
    )
    assert ref.relative_error(y_dora, y_lora) > 1e-3


# ---------------------------------------------------------------- zero-norm features

ZERO = 1  # flat index of the all-zero output feature


@pytest.mark.parametrize("case_name", BASE_CASES)
@pytest.mark.parametrize("state", ["init", "trained"])
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
def test_zero_norm_feature_is_finite_and_leaves_others_unchanged(case_name, state, detach_norm):
    """A kernel column of zeros (and ``B`` zero there): everything stays finite.

    ``init``: default adapters (``B = 0``, for Embed ``A = 0``) and magnitudes from
    ``recompute_magnitudes`` (so ``m = 0`` there), with the norm cache. ``trained``: random
    ``A``, ``B`` except ``B[:, ZERO] = 0``, magnitude 0.8 there, no cache. The nonzero
    features match the reference to float32 precision; the zero feature outputs the bias
    exactly and matches the reference with the layer's ``eps`` floor.
    """
    case = CASES[case_name]
    if state == "trained":
        model, x, variables = random_variables(case, seed=13, zero_column=ZERO)
    else:
        model, x, _ = random_variables(case, seed=13)
        variables = model.init(jax.random.key(13), x)
        kernel = variables["params"][case.param]
        fan_in, fan_out = fans(case)
        zeroed = np.asarray(kernel).reshape(fan_in, fan_out).copy()
        zeroed[:, ZERO] = 0.0
        params = {**variables["params"], case.param: jnp.asarray(zeroed.reshape(kernel.shape))}
        variables = dora_jax.recompute_magnitudes(model, {**variables, "params": params}, x)
        assert "dora_cache" not in variables  # none unless asked for
        assert float(variables["dora"]["magnitude"].reshape(-1)[ZERO]) == 0.0
    model = model.clone(detach_norm=detach_norm)
    cotangent = make_cotangent(case, x, seed=14)
    got = library_results(case, model, variables, x, cotangent, jit=False)
    want = reference_results(case, variables, x, cotangent, detach_norm=detach_norm, eps=model.eps)
    for leaf in jax.tree.leaves(got):
        assert np.all(np.isfinite(np.asarray(leaf)))

    out_shape = variables["dora"]["magnitude"].shape
    n_out = math.prod(out_shape)
    others = np.arange(n_out) != ZERO

    def features_last(a, n_lead):  # (..., *out) -> (prod(...), n_out)
        a = ref.f64(a)
        return a.reshape(math.prod(a.shape[:n_lead]) if n_lead else 1, n_out)

    n_y_lead = len(want["y"].shape) - len(out_shape)
    n_k_lead = len(want["merged"].shape) - len(out_shape)
    y_got, y_want = features_last(got["y"], n_y_lead), features_last(want["y"], n_y_lead)
    w_got, w_want = features_last(got["merged"], n_k_lead), features_last(want["merged"], n_k_lead)
    b_got = features_last(got["grads"]["lora_b"], 1)
    b_want = features_last(want["grads"]["lora_b"], 1)
    m_got = features_last(got["grads"]["magnitude"], 0)
    m_want = features_last(want["grads"]["magnitude"], 0)

    # Nonzero features: unchanged to float precision.
    assert ref.relative_error(y_got[:, others], y_want[:, others]) <= F32_TOL
    assert ref.relative_error(w_got[:, others], w_want[:, others]) <= F32_TOL
    assert ref.relative_error(b_got[:, others], b_want[:, others]) <= F32_TOL
    assert ref.relative_error(m_got[:, others], m_want[:, others]) <= F32_TOL
    grad_a = got["grads"]["lora_a"]
    assert ref.relative_error(grad_a, want["grads"]["lora_a"]) <= F32_TOL
    # The zero feature: output = bias, merged column = 0, magnitude gradient = 0.
    bias = variables["params"].get("bias")
    want_zero_y = 0.0 if bias is None else float(np.asarray(bias).reshape(-1)[ZERO])
    np.testing.assert_array_equal(y_got[:, ZERO], want_zero_y)
    np.testing.assert_array_equal(w_got[:, ZERO], 0.0)
    np.testing.assert_array_equal(m_got[:, ZERO], 0.0)
    assert ref.relative_error(b_got[:, ZERO], b_want[:, ZERO]) <= F32_TOL
