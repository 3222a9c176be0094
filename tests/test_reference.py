"""The Linen DoRA layers and ``dora_jax.ops.merge`` against the float64 NumPy reference.

What is compared (``tests/reference.py`` holds the reference, written from the paper):

* the forward output of DoRADense, DoRADenseGeneral (2 input axes, 2 output axes),
  DoRAConv (2-d, stride 1, 'SAME' and 'VALID') and DoRAEmbed (and ``DoRAEmbed.attend``);
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

import dataclasses
import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import dora_jax
from dora_jax import ops

F32_TOL = 1e-5
BF16_TOL = 2e-2
TOLERANCE = {"float32": F32_TOL, "bfloat16": BF16_TOL}
DTYPE_KWARGS = {
    "float32": {},
    "bfloat16": {"param_dtype": jnp.bfloat16, "dtype": jnp.bfloat16},
}
RANK, ALPHA = 3, 4.0


@dataclasses.dataclass(frozen=True)
class LayerCase:
    """One layer configuration and how the reference sees it.

    ``design`` turns the input into the reference's ``(N, fan_in)`` matrix and
    ``out_shape`` gives the output shape, both computed without the library.
    """

    name: str
    make: Callable[..., nn.Module]  # (**kwargs) -> DoRA layer
    make_base: Callable[[], nn.Module]  # the plain Flax layer
    layout: ops.Layout
    x_shape: tuple[int, ...]
    design: Callable[[np.ndarray], np.ndarray]
    out_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    in_shape: tuple[int, ...]  # the kernel's input block (reduced by the norm)
    features: tuple[int, ...]  # the kernel's output block (one magnitude each)
    scale: float = ALPHA / RANK
    vocab: int | None = None  # integer inputs in [0, vocab) for embeddings
    param: str = "kernel"
    use_bias: bool = True


def _conv_case(name: str, kernel_size: tuple[int, int], padding: str) -> LayerCase:
    return LayerCase(
        name=name,
        make=lambda **kw: dora_jax.DoRAConv(
            5, kernel_size=kernel_size, padding=padding, rank=RANK, alpha=ALPHA, **kw
        ),
        make_base=lambda: nn.Conv(5, kernel_size=kernel_size, padding=padding),
        layout=ops.conv_layout(2),
        x_shape=(2, 6, 5, 4),
        in_shape=(*kernel_size, 4),
        features=(5,),
        design=lambda x: ref.conv2d_design(x, kernel_size, padding),
        out_shape=lambda s: ref.conv2d_output_shape(s, kernel_size, padding, 5),
    )


CASES = {
    c.name: c
    for c in [
        LayerCase(
            name="dense",
            make=lambda **kw: dora_jax.DoRADense(6, rank=RANK, alpha=ALPHA, **kw),
            make_base=lambda: nn.Dense(6),
            layout=ops.dense_layout(),
            x_shape=(2, 3, 5),
            in_shape=(5,),
            features=(6,),
            design=lambda x: ref.dense_design(x, 1),
            out_shape=lambda s: (*s[:-1], 6),
        ),
        LayerCase(
            name="dense_rslora",
            make=lambda **kw: dora_jax.DoRADense(6, rank=RANK, alpha=ALPHA, rslora=True, **kw),
            make_base=lambda: nn.Dense(6),
            layout=ops.dense_layout(),
            x_shape=(4, 5),
            in_shape=(5,),
            features=(6,),
            design=lambda x: ref.dense_design(x, 1),
            out_shape=lambda s: (*s[:-1], 6),
            scale=ALPHA / math.sqrt(RANK),
        ),
        LayerCase(
            name="dense_general",
            make=lambda **kw: dora_jax.DoRADenseGeneral(
                features=(3, 4), axis=(-2, -1), rank=RANK, alpha=ALPHA, **kw
            ),
            make_base=lambda: nn.DenseGeneral(features=(3, 4), axis=(-2, -1)),
            layout=ops.dense_general_layout(0, 2, 2),
            x_shape=(3, 4, 5),
            in_shape=(4, 5),
            features=(3, 4),
            design=lambda x: ref.dense_design(x, 2),
            out_shape=lambda s: (*s[:-2], 3, 4),
        ),
        _conv_case("conv_same_3x3", (3, 3), "SAME"),
        _conv_case("conv_valid_3x3", (3, 3), "VALID"),
        _conv_case("conv_same_2x3", (2, 3), "SAME"),
        LayerCase(
            name="embed",
            make=lambda **kw: dora_jax.DoRAEmbed(11, 6, rank=RANK, alpha=ALPHA, **kw),
            make_base=lambda: nn.Embed(11, 6),
            layout=ops.dense_layout(),
            x_shape=(3, 7),
            in_shape=(11,),
            features=(6,),
            design=lambda ids: ref.embed_design(ids, 11),
            out_shape=lambda s: (*s, 6),
            vocab=11,
            param="embedding",
            use_bias=False,
        ),
    ]
}
BASE_CASES = [n for n in CASES if n != "dense_rslora"]


# ----------------------------------------------------------------------------- helpers


def make_inputs(case: LayerCase, rng: np.random.Generator, dtype: str = "float32"):
    if case.vocab is not None:
        ids = rng.integers(0, case.vocab, size=case.x_shape)
        ids.flat[: case.vocab] = np.arange(case.vocab)[: ids.size]  # touch every row
        return jnp.asarray(ids, jnp.int32)
    x = jnp.asarray(rng.standard_normal(case.x_shape), jnp.float32)
    # Round to the compute dtype so the reference sees exactly what the layer computes on.
    return x.astype(jnp.bfloat16).astype(jnp.float32) if dtype == "bfloat16" else x


def fans(case: LayerCase) -> tuple[int, int]:
    return math.prod(case.in_shape), math.prod(case.features)


def flat_adapters(case: LayerCase, params, dora):
    """Kernel, A, B, m, bias flattened to the reference's matrices (float64)."""
    kernel = params[case.param]
    fan_in, fan_out = fans(case)
    w0 = ref.f64(kernel).reshape(fan_in, fan_out)
    a = ref.f64(dora["lora_a"]).reshape(fan_in, -1)
    b = ref.f64(dora["lora_b"]).reshape(-1, fan_out)
    m = ref.f64(dora["magnitude"]).reshape(fan_out)
    bias = ref.f64(params["bias"]) if "bias" in params else None
    return w0, a, b, m, bias


def random_variables(
    case: LayerCase, dtype: str = "float32", seed: int = 0, zero_column: int | None = None
):
    """A model, inputs and variables with random base weights and trained-looking adapters.

    ``A`` and ``B`` are dense random (``s*A@B`` about half of ``W0`` per column) and the
    magnitude is the reference norm times a factor in [0.6, 1.4]. With ``zero_column`` the
    kernel and ``B`` are zero for that output feature (flat index), so its norm is 0.
    No ``"dora_cache"`` is returned (the layer recomputes ``||W0||``).
    """
    rng = np.random.default_rng(seed)
    model = case.make(**DTYPE_KWARGS[dtype])
    x = make_inputs(case, rng, dtype)
    param_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    fan_in, fan_out = fans(case)
    w0 = rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)
    a = rng.standard_normal((fan_in, RANK)) / math.sqrt(fan_in)
    b = rng.standard_normal((RANK, fan_out)) * 0.5 / (math.sqrt(RANK) * case.scale)
    if zero_column is not None:
        w0[:, zero_column] = 0.0
        b[:, zero_column] = 0.0
    params = {case.param: jnp.asarray(w0.reshape(*case.in_shape, *case.features), param_dtype)}
    if case.use_bias:
        params["bias"] = jnp.asarray(rng.standard_normal(case.features), param_dtype)
    w0_rounded = ref.f64(params[case.param]).reshape(fan_in, fan_out)
    m = ref.column_norm(ref.direction(w0_rounded, a, b, case.scale))
    m *= rng.uniform(0.6, 1.4, size=fan_out)
    if zero_column is not None:
        m[zero_column] = 0.8
    dora = {
        "lora_a": jnp.asarray(a.reshape(*case.in_shape, RANK), jnp.float32),
        "lora_b": jnp.asarray(b.reshape(RANK, *case.features), jnp.float32),
        "magnitude": jnp.asarray(m.reshape(case.features), jnp.float32),
    }
    return model, x, {"params": params, "dora": dora}


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


def reference_results(case, variables, x, cotangent, *, detach_norm: bool, eps: float = 0.0):
    """The same quantities from the float64 NumPy reference, in the library's shapes."""
    params, dora = variables["params"], variables["dora"]
    w0, a, b, m, bias = flat_adapters(case, params, dora)
    design = case.design(np.asarray(x))
    w_merged = ref.merged_weight(w0, a, b, m, case.scale, eps)
    y = ref.linear_forward(design, w_merged, bias).reshape(case.out_shape(x.shape))
    grad_w = ref.weight_gradient(design, cotangent)
    grads = ref.adapter_gradients(w0, a, b, m, case.scale, grad_w, detach_norm=detach_norm, eps=eps)
    return {
        "y": y,
        "merged": w_merged.reshape(params[case.param].shape),
        "grads": {k: v.reshape(dora[k].shape) for k, v in grads.items()},
    }


def make_cotangent(case: LayerCase, x, seed: int = 1) -> np.ndarray:
    shape = case.out_shape(tuple(x.shape))
    return np.asarray(np.random.default_rng(seed).standard_normal(shape), np.float32)


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
