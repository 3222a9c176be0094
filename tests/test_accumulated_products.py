"""bfloat16 Dense products on the CPU: summed in float32 explicitly, the same numbers.

XLA's CPU backend multiplies two bfloat16 operands at its bfloat16 rate only when the
product is asked for float32 output; a bfloat16 product, and the mixed float32 x bfloat16
one that JAX's gradient of ``preferred_element_type`` produces, are converted to float32
first. So on the CPU a Dense layer's bfloat16 products (``x @ W0``, ``x @ A``,
``(xA) @ B`` and their gradients) run as :func:`dora_jax.ops.accumulated_product`
(the LoRA branch as :func:`dora_jax.ops.low_rank_product`, whose gradients contract
only last axes). Checked: their values and gradients against float64 (one rounding to
bfloat16 per product), the
programs of both front ends (every product of a bfloat16 step has bfloat16 operands and
float32 accumulation), the adapted layer against the float64 reference, and the layers
that keep their own map (float32, a float32 ``preferred_element_type``, a custom
``promote_dtype``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx

import dora_jax
from dora_jax import nnx as dora_nnx
from dora_jax import ops

BF16_EPS = 2.0**-8  # half a bfloat16 ulp, relative: one rounding


def _bf16(shape, key) -> jax.Array:
    return jax.random.normal(jax.random.key(key), shape).astype(jnp.bfloat16)


def _f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _assert_one_rounding(actual, exact: np.ndarray):
    """``actual`` is ``exact`` rounded once to bfloat16 (up to float32 summation)."""
    assert actual.dtype == jnp.bfloat16
    error = np.abs(_f64(actual) - exact)
    assert np.all(error <= BF16_EPS * np.abs(exact) + 1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("lead", [(7,), (2, 5), ()], ids=["rows", "batch-tokens", "vector"])
def test_product_and_gradients_are_float64_rounded_once(jit, lead):
    x, kernel, dy = _bf16((*lead, 40), 0), _bf16((40, 24), 1), _bf16((*lead, 24), 2)
    xs, ks, dys = _f64(x), _f64(kernel), _f64(dy)
    total = (jax.jit(ops.accumulated_product) if jit else ops.accumulated_product)(x, kernel)
    assert total.dtype == jnp.float32  # the float32 sums
    assert reference.relative_error(total, xs @ ks) <= 1e-6

    def rounded(x, kernel):
        return ops.accumulated_product(x, kernel).astype(jnp.bfloat16)

    y, vjp = jax.vjp(jax.jit(rounded) if jit else rounded, x, kernel)
    d_x, d_kernel = vjp(dy)
    _assert_one_rounding(y, xs @ ks)
    _assert_one_rounding(d_x, dys @ ks.T)
    rows, d_rows = xs.reshape(-1, 40), dys.reshape(-1, 24)
    _assert_one_rounding(d_kernel, rows.T @ d_rows)
    assert d_x.dtype == x.dtype and d_kernel.dtype == kernel.dtype
    # XLA's own bfloat16 product gives the same numbers (to float32 summation order).
    plain = jnp.dot(x, kernel)
    assert np.max(np.abs(_f64(plain) - _f64(y))) <= 2 * BF16_EPS * np.abs(_f64(plain)).max()


def _round(values: np.ndarray) -> np.ndarray:
    return _f64(jnp.asarray(values, jnp.float32).astype(jnp.bfloat16))


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("lead", [(12,), (3, 4), ()], ids=["rows", "batch-tokens", "vector"])
def test_low_rank_product_and_gradients_are_float64_rounded_once_each(jit, lead):
    x, dy = _bf16((*lead, 40), 0), _bf16((*lead, 24), 1)
    a = jax.random.normal(jax.random.key(2), (40, 4))  # float32 factors, as the adapters
    b = jax.random.normal(jax.random.key(3), (4, 24))
    product = jax.jit(ops.low_rank_product) if jit else ops.low_rank_product
    y, vjp = jax.vjp(product, x, a, b)
    d_x, d_a, d_b = vjp(dy)
    assert y.shape == dy.shape and d_x.shape == x.shape
    xs, a16, b16, dys = (_f64(v).reshape(-1, v.shape[-1]) for v in (x, a, b, dy))
    a16, b16 = _round(a16), _round(b16)
    d_x = d_x.reshape(-1, 40)
    y = y.reshape(-1, 24)
    h = _round(xs @ a16)  # each product rounded to bfloat16 once, as the layer's own
    _assert_one_rounding(y, h @ b16)
    d_h = _round(dys @ b16.T)
    _assert_one_rounding(d_x, d_h @ a16.T)
    for grad, exact, factor in ((d_a, xs.T @ d_h, a), (d_b, h.T @ dys, b)):
        assert grad.dtype == factor.dtype == jnp.float32
        _assert_one_rounding(grad.astype(jnp.bfloat16), exact)  # a bfloat16 value
        assert np.array_equal(_f64(grad), _f64(grad.astype(jnp.bfloat16)))


def test_low_rank_gradients_contract_the_last_axis_of_row_major_operands():
    """XLA's CPU backend runs a product at its fast rate only when it contracts the
    left operand's last axis: none of the gradient's products contracts over rows."""
    x, dy = _bf16((12, 40), 0), _bf16((12, 24), 1)
    a, b = jnp.ones((40, 4)), jnp.ones((4, 24))
    jaxpr = jax.make_jaxpr(lambda *p: jax.vjp(ops.low_rank_product, *p)[1](dy))(x, a, b)
    dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    # x @ A, h @ B; dy B^T, dh A^T, (dh^T) x, (h^T) dy and the two transposes
    assert len(dots) == 8
    for equation in dots:
        (lhs_contracted, _), _ = equation.params["dimension_numbers"]
        assert tuple(lhs_contracted) == (equation.invars[0].aval.ndim - 1,)
    u = _bf16((9, 4), 5)
    assert np.array_equal(_f64(ops._transposed(u)), _f64(u).T)  # exact
    with jax.enable_x64(True):  # in any dtype: float64 summed in float64
        u = jnp.asarray(np.random.default_rng(0).standard_normal((9, 4)))
        assert u.dtype == jnp.float64
        assert np.array_equal(np.asarray(ops._transposed(u)), np.asarray(u).T)


def _equations(jaxpr):
    for equation in jaxpr.eqns:
        yield equation
        for sub in jax.extend.core.jaxprs_in_params(equation.params):
            yield from _equations(sub)


def _check_accumulated(fn, *args):
    """Every product of ``fn``'s program (forward and backward) with a bfloat16 operand
    multiplies two bfloat16 operands into float32: none is bfloat16 out, none mixes
    dtypes (products of the float32 adapters alone, as the norm's ``A^T A``, may be)."""
    hlo = jax.jit(fn).lower(*args).as_text()
    dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
    low = [line for line in dots if "bf16" in line.rsplit(":", 1)[-1]]
    assert len(low) >= 4  # x @ W0 (maybe with A^T), x @ A, (xA) @ B, dy @ W0^T ...
    for line in low:
        operands, result = line.rsplit(":", 1)[-1].split("->")
        assert operands.count("bf16") == 2 and "f32" not in operands, line
        assert "xf32>" in result, line


# Output columns whose magnitude is set to zero (y = 0 there says nothing of z).
ZEROED = np.arange(24) % 5 == 0


def _linen_case(stack: bool, shape, zeroed=None):
    stacking = ops.Stacking(rows_per_output=np.inf if stack else 0.0)
    layer = dora_jax.DoRADense(
        24, rank=4, alpha=8.0, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, stacking=stacking
    )
    x = _bf16((*shape, 40), 3)
    variables = layer.init(jax.random.key(4), x)
    params = variables["params"]
    dora = {
        "lora_a": jax.random.normal(jax.random.key(5), (40, 4)) * 0.2,
        "lora_b": jax.random.normal(jax.random.key(6), (4, 24)) * 0.2,
        "magnitude": variables["dora"]["magnitude"].astype(jnp.float32) * 1.1,
    }
    if zeroed is not None:
        dora["magnitude"] = jnp.where(zeroed, 0.0, dora["magnitude"])

    def output(dora, x):
        return layer.apply({"params": params, "dora": dora}, x)

    return output, dora, x, params["kernel"], params["bias"], layer.scale


class Net(nnx.Module):
    def __init__(self, **kwargs):
        self.fc = nnx.Linear(40, 24, rngs=nnx.Rngs(0), **kwargs)

    def __call__(self, x):
        return self.fc(x)


def _nnx_case(stack: bool, shape, zeroed=None, **linear_kwargs):
    kwargs = {"dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16, **linear_kwargs}
    model = Net(**kwargs)
    stacking = ops.Stacking(rows_per_output=np.inf if stack else 0.0)
    model.fc = dora_nnx.DoRALinear.from_module(
        model.fc, rank=4, alpha=8.0, stacking=stacking, rngs=nnx.Rngs(1)
    )
    fc = model.fc
    fc.lora_b.set_value(0.2 * jax.random.normal(jax.random.key(6), fc.lora_b.shape))
    fc.magnitude.set_value(fc.magnitude[...] * 1.1)
    if zeroed is not None:
        fc.magnitude.set_value(jnp.where(zeroed, 0.0, fc.magnitude[...]))
    graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)

    def output(adapters, x):
        return nnx.merge(graphdef, adapters, frozen)(x)

    dora = {"lora_a": fc.lora_a[...], "lora_b": fc.lora_b[...], "magnitude": fc.magnitude[...]}
    return output, adapters, _bf16((*shape, 40), 3), fc.kernel[...], fc.bias[...], fc.scale, dora


@pytest.mark.parametrize("front_end", ["linen", "nnx"])
@pytest.mark.parametrize(
    "stack, shape, jit",
    [
        (True, (6,), True),
        (False, (6,), True),
        (True, (2, 3), False),
        (False, (2, 3), True),
        (False, (), False),
    ],
    ids=[
        "stacked-rows",
        "plain-rows",
        "stacked-batch-tokens-eager",
        "plain-batch-tokens",
        "plain-vector-eager",
    ],
)
def test_bfloat16_layer_products_are_accumulated_and_match_float64(front_end, stack, shape, jit):
    _check_bfloat16_layer(front_end, stack, shape, jit)


@pytest.mark.parametrize("front_end", ["linen", "nnx"])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_bfloat16_magnitude_gradient_where_magnitudes_are_zero(front_end, jit):
    """The bfloat16 path takes the magnitude's gradient from the rounded output, as
    ``sum(dy * y) / g``; where a magnitude is zero (so is ``y``) it recomputes the
    sum ``z``: every gradient still matches float64, the zeroed columns' too."""
    grads, expected = _check_bfloat16_layer(front_end, False, (2, 3), jit, zeroed=ZEROED)
    got = _f64(grads["magnitude"]).reshape(-1)[ZEROED]
    assert reference.relative_error(got, expected["magnitude"][ZEROED]) <= 3e-2


def _check_bfloat16_layer(front_end, stack, shape, jit, zeroed=None):
    if front_end == "linen":
        output, adapters, x, kernel, bias, scale = _linen_case(stack, shape, zeroed)
        dora = adapters
    else:
        output, adapters, x, kernel, bias, scale, dora = _nnx_case(stack, shape, zeroed)
    cotangent = jax.random.normal(jax.random.key(7), (*shape, 24))

    def loss(adapters, x):
        y = output(adapters, x)
        return jnp.sum(y.astype(jnp.float32) * cotangent), y

    _check_accumulated(jax.grad(lambda a, x: loss(a, x)[0], argnums=(0, 1)), adapters, x)
    value_and_grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, y), (grads, d_x) = (jax.jit(value_and_grad) if jit else value_and_grad)(adapters, x)
    assert y.dtype == jnp.bfloat16 and d_x.dtype == jnp.bfloat16
    w0, a, b, m = (_f64(v) for v in (kernel, dora["lora_a"], dora["lora_b"], dora["magnitude"]))
    rows = _f64(x).reshape(-1, 40)
    merged = reference.merged_weight(w0, a, b, m, scale)
    expected = reference.linear_forward(rows, merged, _f64(bias)).reshape(*shape, 24)
    assert reference.relative_error(y, expected) <= 2e-2
    d_rows = np.asarray(cotangent, np.float64).reshape(-1, 24)
    assert reference.relative_error(d_x, (d_rows @ merged.T).reshape(x.shape)) <= 2e-2
    expected_grads = reference.adapter_gradients(
        w0, a, b, m, scale, reference.weight_gradient(rows, d_rows), detach_norm=True
    )
    if front_end == "nnx":
        grads = jax.tree.map(lambda v: v[...], grads.fc)
    for name in ("lora_a", "lora_b", "magnitude"):
        assert grads[name].dtype == jnp.float32
        assert reference.relative_error(grads[name], expected_grads[name]) <= 3e-2, name
    return grads, expected_grads


def _has_accumulated_product(fn, *args) -> bool:
    program = str(jax.make_jaxpr(fn)(*args))
    return "accumulated_product" in program or "low_rank_product" in program


@pytest.mark.parametrize(
    "linear_kwargs, dtype",
    [
        ({"dtype": jnp.float32, "param_dtype": jnp.float32}, jnp.float32),
        ({"preferred_element_type": jnp.float32}, jnp.float32),
        (
            {
                "promote_dtype": lambda args, dtype, inexact=True: nnx.nn.dtypes.promote_dtype(
                    args, dtype=dtype, inexact=inexact
                )
            },
            jnp.bfloat16,
        ),
    ],
    ids=["float32-layer", "float32-output", "custom-promote-dtype"],
)
def test_layers_with_their_own_product_keep_it(linear_kwargs, dtype):
    output, adapters, x, *_ = _nnx_case(False, (6,), **linear_kwargs)
    assert not _has_accumulated_product(jax.grad(lambda a: jnp.sum(output(a, x))), adapters)
    assert output(adapters, x).dtype == dtype


def test_bfloat16_layer_uses_it():
    output, adapters, x, *_ = _nnx_case(False, (6,))
    assert _has_accumulated_product(lambda a: output(a, x), adapters)
    output, dora, x, *_ = _linen_case(False, (6,))
    assert _has_accumulated_product(lambda a: output(a, x), dora)
    dense = nn.Dense(5)  # a plain Flax layer is untouched
    assert not _has_accumulated_product(
        lambda v: dense.apply(v, x), dense.init(jax.random.key(0), x)
    )


def test_linen_layer_with_its_own_promote_dtype_keeps_it():
    def promote(*args, dtype=None, inexact=True):
        return nn.dtypes.promote_dtype(*args, dtype=dtype, inexact=inexact)

    layer = dora_jax.DoRADense(24, rank=4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = _bf16((6, 40), 3)
    for module, accumulated in ((layer, True), (layer.clone(promote_dtype=promote), False)):
        variables = module.init(jax.random.key(0), x)
        assert _has_accumulated_product(lambda v, m=module: m.apply(v, x), variables) is accumulated


@pytest.mark.parametrize("tokens", [6, 20])
def test_stacking_changes_speed_not_results_in_bfloat16(tokens):
    """The stacked product keeps ``A^T W0``'s float32 sums, as the plain path does: a
    stacked and a plain bfloat16 layer give the same outputs and gradients (to float32
    summation order; rounding ``A^T W0`` to bfloat16 made them differ by ~3e-3)."""
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (tokens, 64)).astype(jnp.bfloat16)
    cotangent = jax.random.normal(keys[4], (tokens, 48))
    results = []
    for rows_per_output in (np.inf, 0.0):
        layer = dora_jax.DoRADense(
            48,
            rank=4,
            alpha=8.0,
            dtype=jnp.bfloat16,
            param_dtype=jnp.bfloat16,
            stacking=ops.Stacking(rows_per_output=rows_per_output),
        )
        variables = layer.init(keys[1], x)
        dora = {
            "lora_a": jax.random.normal(keys[2], (64, 4)) * 0.3,
            "lora_b": jax.random.normal(keys[3], (4, 48)) * 0.3,
            "magnitude": variables["dora"]["magnitude"].astype(jnp.float32) * 1.1,
        }

        # x an argument: with x and W0 both closed over, nothing stacks.
        def loss(dora, x, layer=layer, params=variables["params"]):
            y = layer.apply({"params": params, "dora": dora}, x)
            return jnp.sum(y.astype(jnp.float32) * cotangent), y

        stacks = "kernel_products" in str(jax.make_jaxpr(loss)(dora, x))
        assert stacks is (rows_per_output > 0)
        results.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(dora, x))
    (_, stacked_y), stacked = results[0]
    (_, plain_y), plain = results[1]
    assert reference.relative_error(stacked_y, plain_y) <= 1e-6
    for name in plain:
        assert reference.relative_error(stacked[name], plain[name]) <= 1e-6, name


def test_bfloat16_layer_on_no_rows_has_zero_gradients():
    layer = dora_nnx.DoRALinear(
        40, 24, rank=4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
    )
    x = jnp.zeros((0, 40), jnp.bfloat16)
    assert layer(x).shape == (0, 24)
    grads = nnx.grad(
        lambda m: jnp.sum(m(x).astype(jnp.float32)), argnums=nnx.DiffState(0, nnx.LoRAParam)
    )(layer)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == 3 and all(not np.any(_f64(g)) for g in leaves)
