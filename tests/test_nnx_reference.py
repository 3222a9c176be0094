"""The NNX DoRA layers against the float64 NumPy reference, on their own.

For every case of the catalogue (``conftest.CASES``: Linear, LinearGeneral, Einsum, Conv,
Embed), the NNX layer gets the same random base weights and trained-looking adapters as
the Linen suite (``test_reference.py``), then its forward output, ``merged()`` kernel
and ``jax.grad`` with respect to ``lora_a``, ``lora_b`` and ``magnitude`` (detached and
exact norm) are compared with the reference, jitted, on a float32 and a bfloat16 base
(eager equals jitted: ``test_surgery_nnx.py``). Tolerances are the Linen suite's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from conftest import CASES, DTYPE_KWARGS, TOLERANCE, make_cotangent, random_variables
from conftest import reference_results as reference
from flax import nnx

ADAPTERS = ("lora_a", "lora_b", "magnitude")


def nnx_layer(case, variables, dtype: str, detach_norm: bool):
    """The case's NNX DoRA layer holding ``variables`` (Linen layout)."""
    layer = case.make_nnx(nnx.Rngs(0), detach_norm=detach_norm, **DTYPE_KWARGS[dtype])
    for name, value in variables["params"].items():
        getattr(layer, name).set_value(jnp.asarray(value))
    for name, value in variables["dora"].items():
        getattr(layer, name).set_value(jnp.asarray(value))
    return layer


@functools.cache
def compare(case_name: str, dtype: str, jit: bool, detach_norm: bool):
    case = CASES[case_name]
    _, x, variables = random_variables(case, dtype, seed=0)
    cotangent = make_cotangent(case, x)
    layer = nnx_layer(case, variables, dtype, detach_norm)
    graphdef, adapters, rest = nnx.split(layer, nnx.LoRAParam, ...)

    def everything(adapters):
        def loss(adapters):
            y = nnx.merge(graphdef, adapters, rest)(x)
            return jnp.sum(y.astype(jnp.float32) * cotangent), y

        (_, y), grads = jax.value_and_grad(loss, has_aux=True)(adapters)
        merged = nnx.merge(graphdef, adapters, rest).merged()
        return y, getattr(merged, case.param)[...], nnx.to_pure_dict(grads)

    y, merged, grads = (jax.jit(everything) if jit else everything)(adapters)
    want = reference(case, variables, x, cotangent, detach_norm=detach_norm)
    return {"y": y, "merged": merged, "grads": grads}, want


CONFIGS = [
    ("float32", True, True),
    ("float32", True, False),
    ("bfloat16", True, True),
]


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize(
    "dtype, jit, detach_norm",
    CONFIGS,
    ids=["f32-detached", "f32-exact", "bf16-detached"],
)
def test_nnx_layer_matches_reference(case_name, dtype, jit, detach_norm):
    got, want = compare(case_name, dtype, jit, detach_norm)
    tolerance = TOLERANCE[dtype]
    assert got["y"].dtype == jnp.dtype(dtype)
    assert got["y"].shape == want["y"].shape
    assert ref.relative_error(got["y"], want["y"]) <= tolerance
    assert ref.relative_error(got["merged"], want["merged"]) <= tolerance
    for name in ADAPTERS:
        grad = np.asarray(got["grads"][name])
        assert grad.dtype == np.float32, name
        assert ref.relative_error(grad, want["grads"][name]) <= tolerance, name
