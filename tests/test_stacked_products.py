"""Reading ``W0`` once: the stacked ``concat([x, A^T]) @ W0`` path against float64.

On the CPU, for few tokens per rank, Dense layers compute ``x @ W0`` and the norm's
``A^T W0`` as one product under a custom VJP (:func:`dora_jax.ops.kernel_products`);
when is the layer's ``stacking`` setting (:class:`dora_jax.ops.Stacking`), no global.
Both that path and the plain one must give the reference forward and gradients, for the
detached and the exact norm and in bfloat16, and the stacked VJP must equal plain
autodiff for every input (the kernel included). A layer's own ``dot_general`` is never
handed the stacked operand.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import dora_jax
from dora_jax import nnx as dora_nnx
from dora_jax import ops

ALWAYS, NEVER = ops.Stacking(rows_per_output=math.inf), ops.Stacking(rows_per_output=0.0)


def _layer_case(tokens: int):
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (tokens, 12))
    layer = dora_jax.DoRADense(10, rank=3, alpha=6.0)
    variables = layer.init(keys[1], x)
    dora = {
        "lora_a": jax.random.normal(keys[2], (12, 3)) * 0.3,
        "lora_b": jax.random.normal(keys[3], (3, 10)) * 0.3,
        "magnitude": variables["dora"]["magnitude"] * 1.1,
    }
    cotangent = jax.random.normal(keys[4], (tokens, 10))
    return layer, variables, dora, x, cotangent


def _uses_stacked_product(fn, *args) -> bool:
    return "kernel_products" in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("stack", [True, False], ids=["stacked", "plain"])
@pytest.mark.parametrize(
    "detach_norm, dtype",
    [(True, "float32"), (False, "float32"), (True, "bfloat16")],
    ids=["detached", "exact", "detached-bfloat16"],
)
def test_forward_and_gradients_match_reference(stack, detach_norm, dtype):
    """bfloat16 layers stack too (in bfloat16: XLA's CPU backend would otherwise convert
    all of ``W0`` to float32 for the r-row product) and stay within bfloat16 error."""
    layer, variables, dora, x, cotangent = _layer_case(tokens=6)
    layer = layer.clone(
        detach_norm=detach_norm, dtype=dtype, param_dtype=dtype, stacking=ALWAYS if stack else NEVER
    )
    params = jax.tree.map(lambda p: p.astype(dtype), variables["params"])
    x = x.astype(dtype)
    tolerance = 1e-5 if dtype == "float32" else 2e-2

    # x is an argument: with x and W0 both closed over, nothing stacks (tested below).
    def loss(dora, x):
        y = layer.apply({"params": params, "dora": dora}, x)
        return jnp.sum(y.astype(jnp.float32) * cotangent), y

    assert _uses_stacked_product(loss, dora, x) is stack
    (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(dora, x)
    assert y.dtype == jnp.dtype(dtype)
    w0, x, scale = params["kernel"].astype(jnp.float32), x.astype(jnp.float32), layer.scale
    merged = reference.merged_weight(w0, dora["lora_a"], dora["lora_b"], dora["magnitude"], scale)
    expected_y = reference.linear_forward(x, merged, params["bias"])
    assert reference.relative_error(y, expected_y) <= tolerance
    grad_w = reference.weight_gradient(x, cotangent)
    expected = reference.adapter_gradients(
        w0,
        dora["lora_a"],
        dora["lora_b"],
        dora["magnitude"],
        scale,
        grad_w,
        detach_norm=detach_norm,
    )
    for name, want in expected.items():
        assert reference.relative_error(grads[name], want) <= tolerance, name


def test_stacked_vjp_equals_autodiff_for_every_input():
    keys = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(keys[0], (2, 3, 8))
    lora_a = jax.random.normal(keys[1], (8, 2))
    kernel = jax.random.normal(keys[2], (8, 5))
    d_base = jax.random.normal(keys[3], (2, 3, 5))
    d_a_t_w = jax.random.normal(keys[4], (2, 5))
    apply = lambda x, k: x @ k  # noqa: E731

    def plain(x, lora_a, kernel):
        return x @ kernel, lora_a.T @ kernel

    outputs, vjp = jax.vjp(lambda *a: ops.kernel_products(apply, *a), x, lora_a, kernel)
    expected_outputs, expected_vjp = jax.vjp(plain, x, lora_a, kernel)
    for got, want in zip(outputs, expected_outputs, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp((d_base, d_a_t_w)), expected_vjp((d_base, d_a_t_w)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_custom_dot_general_is_never_stacked():
    """A layer's own ``dot_general`` (say, a quantised one) must see ``x`` alone."""
    layer, variables, dora, x, _ = _layer_case(tokens=6)
    layer = layer.clone(stacking=ALWAYS)
    custom = layer.clone(dot_general=jax.lax.dot_general)

    def output(layer):
        return lambda dora, x: layer.apply({"params": variables["params"], "dora": dora}, x)

    assert _uses_stacked_product(output(layer), dora, x)
    assert not _uses_stacked_product(output(custom), dora, x)
    np.testing.assert_allclose(
        output(custom)(dora, x), output(layer)(dora, x), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "x_closed, kernel_closed, constants, stacked",
    [
        (True, True, False, False),
        (True, True, True, True),
        (False, True, False, True),
        (True, False, False, True),
        (False, False, False, True),
    ],
    ids=[
        "both-closed-over",
        "both-closed-over-constants",
        "kernel-closed-over",
        "input-closed-over",
        "arguments",
    ],
)
def test_closed_over_input_and_kernel_are_not_stacked(x_closed, kernel_closed, constants, stacked):
    """With ``x`` and ``W0`` both closed over by the jitted function, ``x @ W0`` is a
    constant XLA folds at compile time (LoRA's first layer then costs no product at all);
    stacking ``A^T`` under ``x`` would make it depend on ``A``. Otherwise it stacks, and
    ``Stacking(constants=True)`` stacks even then. Either way the numbers are the same."""
    layer, variables, dora, x, cotangent = _layer_case(tokens=6)
    plain_layer = layer.clone(stacking=NEVER)
    layer = layer.clone(stacking=ops.Stacking(rows_per_output=math.inf, constants=constants))
    params = variables["params"]

    def loss(dora, *args):
        args = list(args)
        p = args.pop(0) if not kernel_closed else params
        inputs = args.pop(0) if not x_closed else x
        return jnp.sum(layer.apply({"params": p, "dora": dora}, inputs) * cotangent)

    args = ([] if kernel_closed else [params]) + ([] if x_closed else [x])
    assert _uses_stacked_product(loss, dora, *args) is stacked
    step = jax.jit(jax.value_and_grad(loss))
    # Unstacked with both constants: XLA computed x @ W0 when compiling, no [x; A^T] left.
    assert ("concatenate" in step.lower(dora, *args).compile().as_text()) is stacked
    value, grads = step(dora, *args)

    def plain_loss(dora, params, x):
        return jnp.sum(plain_layer.apply({"params": params, "dora": dora}, x) * cotangent)

    assert not _uses_stacked_product(plain_loss, dora, params, x)
    want_value, want_grads = jax.jit(jax.value_and_grad(plain_loss))(dora, params, x)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for name, want in want_grads.items():
        np.testing.assert_allclose(grads[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    "stacking, rows, stacked",
    [
        (ops.Stacking(), 5, True),  # the CPU's default: up to 0.5 rows per output feature
        (ops.Stacking(), 6, False),
        (ops.Stacking(rows_per_output=1.0), 10, True),
        (ops.Stacking(rows_per_output=1.0), 11, False),
        (NEVER, 1, False),
        (ALWAYS, 1000, True),
    ],
)
def test_rows_per_output_threshold(stacking, rows, stacked):
    """A Dense layer with 10 output features stacks up to ``rows_per_output * 10`` rows."""
    layer, variables, dora, _, _ = _layer_case(tokens=1)
    layer = layer.clone(stacking=stacking)
    x = jnp.ones((rows, 12))

    def output(dora, x):
        return layer.apply({"params": variables["params"], "dora": dora}, x)

    assert _uses_stacked_product(output, dora, x) is stacked


def test_default_threshold_is_per_backend_and_read_only():
    assert ops.default_stack_rows("cpu") == 0.5
    assert ops.default_stack_rows("gpu") == 0.0  # unmeasured: never
    assert ops.Stacking().limit() == ops.default_stack_rows(jax.default_backend())
    with pytest.raises(TypeError):
        ops.DEFAULT_STACK_ROWS_PER_OUTPUT["cpu"] = 1.0  # type: ignore[index]
    assert not hasattr(ops, "STACK_ROWS_PER_OUTPUT")


def test_stacking_is_a_layer_setting_and_config_layers_take_the_default():
    """Linen and NNX layers take ``stacking``; layers made from a ``DoRAConfig`` (which
    has no such field: a speed setting is no part of a checkpoint's config record) get
    the backend's default, as an ``ops.Stacking`` (not a dict)."""
    from flax import nnx

    x = jnp.ones((2, 12))  # 2 rows <= 0.5 * 10 features: the CPU's default stacks
    for stacking, stacked in ((ALWAYS, True), (NEVER, False)):
        layer = dora_nnx.DoRALinear(12, 10, rank=3, stacking=stacking, rngs=nnx.Rngs(0))
        assert layer.stacking == stacking
        assert _uses_stacked_product(layer, x) is stacked
    config = dora_jax.DoRAConfig(targets=["proj"], rank=3)
    assert config.settings("proj").stacking == ops.Stacking()
    assert "stacking" not in {f.name for f in dataclasses.fields(config)}
    holder = nnx.Dict(proj=nnx.Linear(12, 10, rngs=nnx.Rngs(0)))
    dora_nnx.apply_dora(holder, config, rngs=nnx.Rngs(1))
    assert holder["proj"].stacking == ops.Stacking()
    assert _uses_stacked_product(holder["proj"], x) is (jax.default_backend() == "cpu")


def test_bad_stacking_is_refused_by_name():
    with pytest.raises(ValueError, match=r"Stacking: rows_per_output .* got -1"):
        ops.Stacking(rows_per_output=-1)
    with pytest.raises(ValueError, match="Stacking: constants must be a bool"):
        ops.Stacking(constants=1)
    with pytest.raises(TypeError, match="stacking must be an ops.Stacking; got 0.5"):
        dora_jax.DoRADense(4, rank=2, stacking=0.5).init(jax.random.key(0), jnp.ones((1, 4)))
