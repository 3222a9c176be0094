"""NNX DoRA layers compute with the products of the Flax layer they replace.

An ``nnx.Linear`` built with a custom ``dot_general`` (here one that rounds both operands
to bfloat16, as a quantised product would) or with ``precision=HIGHEST`` becomes a DoRA
layer (through ``apply_dora``) that multiplies ``x @ W0``, ``x @ A`` and ``(x @ A) @ B``
with it. Checked against the float64 reference computed the same way (operands rounded
to bfloat16 before each product) and against the jaxpr (every product of the forward
carries the layer's precision). A custom ``conv_general_dilated`` and ``einsum_op`` are
used the same way (counted).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import reference as ref
from flax import nnx

from dora_jax import DoRAConfig
from dora_jax import nnx as dora_nnx

RANK, ALPHA = 2, 4.0


def bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
    """A product on bfloat16 operands accumulated in float32 (a quantised stand-in)."""
    kwargs.pop("preferred_element_type", None)
    return jax.lax.dot_general(
        lhs.astype(jnp.bfloat16),
        rhs.astype(jnp.bfloat16),
        dimension_numbers,
        precision=precision,
        preferred_element_type=jnp.float32,
    )


class Net(nnx.Module):
    def __init__(self, **linear_kwargs):
        self.fc = nnx.Linear(6, 5, rngs=nnx.Rngs(0), **linear_kwargs)

    def __call__(self, x):
        return self.fc(x)


def adapted(**linear_kwargs) -> Net:
    """``Net`` with DoRA on ``fc``, nonzero ``B`` and magnitudes off the norm."""
    model = dora_nnx.apply_dora(
        Net(**linear_kwargs), DoRAConfig(targets=["fc"], rank=RANK, alpha=ALPHA), rngs=nnx.Rngs(1)
    )
    keys = jax.random.split(jax.random.key(2), 3)
    fc = model.fc
    fc.lora_b.set_value(0.3 * jax.random.normal(keys[0], fc.lora_b.shape))
    fc.magnitude.set_value(fc.magnitude[...] * (1 + 0.2 * jax.random.normal(keys[1], (5,))))
    fc.bias.set_value(0.1 * jax.random.normal(keys[2], (5,)))
    return model


def bf16(x) -> np.ndarray:
    """Rounded to bfloat16, then float64."""
    return ref.f64(np.asarray(x, np.float32).astype(jnp.bfloat16))


def reference_output(fc, x, round_operands) -> np.ndarray:
    """``m / ||W0 + s*A@B||_c * (x @ W0 + s*(x @ A) @ B) + bias`` in float64; with
    ``round_operands`` every product's operands are first rounded to bfloat16."""
    r = bf16 if round_operands else ref.f64
    w0, a, b = (ref.f64(v[...]) for v in (fc.kernel, fc.lora_a, fc.lora_b))
    scale = ALPHA / RANK
    norm = ref.column_norm(w0 + scale * a @ b)
    xa = r(x) @ r(a)
    y = r(x) @ r(w0) + scale * r(xa) @ r(b)
    return ref.f64(fc.magnitude[...]) / norm * y + ref.f64(fc.bias[...])


def test_a_custom_dot_general_is_used():
    x = jax.random.normal(jax.random.key(3), (4, 6))
    custom, default = adapted(dot_general=bf16_dot_general), adapted()
    assert type(custom.fc) is dora_nnx.DoRALinear
    got, plain = np.asarray(custom(x)), np.asarray(default(x))
    rounded = reference_output(custom.fc, x, round_operands=True)
    exact = reference_output(default.fc, x, round_operands=False)
    assert ref.relative_error(got, rounded) <= 1e-5
    assert ref.relative_error(plain, exact) <= 1e-5
    assert ref.relative_error(got, exact) > 1e-3  # the rounding shows: the product was used
    jitted = nnx.jit(lambda m, x: m(x))(custom, x)
    assert ref.relative_error(np.asarray(jitted), rounded) <= 1e-5


def _precisions(model, x) -> list:
    jaxpr = jax.make_jaxpr(lambda x: model(x))(x)
    return [e.params["precision"] for e in jaxpr.eqns if e.primitive.name == "dot_general"]


def test_precision_highest_reaches_every_product_with_x():
    x = jax.random.normal(jax.random.key(4), (4, 6))
    highest = adapted(precision=jax.lax.Precision.HIGHEST)
    with_x = [p for p in _precisions(highest, x) if p is not None]
    assert len(with_x) >= 3  # x @ W0, x @ A, (x @ A) @ B
    assert all(p == (jax.lax.Precision.HIGHEST,) * 2 for p in with_x)
    assert all(p is None for p in _precisions(adapted(), x))
    exact = reference_output(highest.fc, x, round_operands=False)
    assert ref.relative_error(np.asarray(highest(x)), exact) <= 1e-6


def test_preferred_element_type_gives_the_flax_layers_output_dtype():
    x = jax.random.normal(jax.random.key(5), (4, 6)).astype(jnp.bfloat16)
    kwargs = dict(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    base = Net(preferred_element_type=jnp.float32, **kwargs)
    expected_dtype = base(x).dtype
    model = adapted(preferred_element_type=jnp.float32, **kwargs)
    y = model(x)
    assert y.dtype == expected_dtype == jnp.float32
    exact = reference_output(model.fc, x, round_operands=False)
    assert ref.relative_error(np.asarray(y), exact) <= 2e-2


def _counting(op, calls: list):
    def counted(*args, **kwargs):
        calls.append(args[0] if isinstance(args[0], str) else None)
        return op(*args, **kwargs)

    return counted


def test_a_custom_conv_and_einsum_op_are_used():
    """``conv_general_dilated`` runs ``x * W0`` and ``x * A``; ``einsum_op`` runs all three
    products (``W0``, ``A``, ``B``), with the adapted equations for ``A`` and ``B``."""
    conv_calls, einsum_calls = [], []

    class Net(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            conv_op = _counting(jax.lax.conv_general_dilated, conv_calls)
            self.conv = nnx.Conv(3, 4, (3, 3), conv_general_dilated=conv_op, rngs=rngs)
            einsum_op = _counting(jnp.einsum, einsum_calls)
            self.mix = nnx.Einsum("bhwc,cd->bhwd", (4, 5), einsum_op=einsum_op, rngs=rngs)

        def __call__(self, x):
            return self.mix(self.conv(x))

    x = jax.random.normal(jax.random.key(6), (2, 5, 5, 3))
    model = Net()
    base = model(x)
    conv_calls.clear(), einsum_calls.clear()
    config = DoRAConfig(targets=["conv", "mix"], rank=2)
    model = dora_nnx.apply_dora(model, config, rngs=nnx.Rngs(1))
    adapted = model(x)
    assert len(conv_calls) == 2
    assert einsum_calls == ["bhwc,cd->bhwd", "bhwc,ca->bhwa", "bhwa,ad->bhwd"]
    assert ref.relative_error(np.asarray(adapted), np.asarray(base)) <= 1e-6  # B = 0
