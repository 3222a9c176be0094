"""Hypothesis property tests of the DoRA math over random shapes, ranks and layouts.

What is compared:

* ``ops.dora_norm`` (the factored norm ``||W0||^2 + 2s colsum(B * A^T W0) + s^2 ...``,
  float32) against the norm of the materialised ``W0 + s*A@B`` computed in float64 NumPy
  (``reference.dora_norm_any_layout``), for Dense, DenseGeneral, Conv and arbitrarily
  permuted kernel layouts, with and without the cached ``||W0||^2``; the materialised
  library path ``ops.column_norm(W0 + s*ops.lora_delta(A, B, layout), layout)`` and
  ``ops.lora_delta`` itself are checked against the same reference.
* The merged forward (a plain ``nn.Dense`` with the ``ops.merge`` kernel) against the
  unmerged ``DoRADense`` forward, with nonzero ``B`` and a perturbed magnitude.

Relative error: ``max|got - ref| / max|ref|`` (``reference.relative_error``). The factored
norm squares before it subtracts, so where a column of ``W0 + s*A@B`` nearly cancels its
float32 error is bounded in the *squared* norm by the size of the terms; that bound is
checked everywhere, and the plain relative error on the columns that do not cancel.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

import dora_jax
from dora_jax import ops

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, database=None, derandomize=True)


@st.composite
def layouts(draw):
    """A kernel layout and shape: Dense, DenseGeneral, Conv, or any permutation of axes."""
    kind = draw(st.sampled_from(["dense", "dense_general", "conv", "permuted"]))
    if kind == "dense":
        layout = ops.dense_layout()
    elif kind == "dense_general":
        n_batch, n_in, n_out = draw(st.tuples(*[st.integers(lo, 2) for lo in (0, 1, 1)]))
        layout = ops.dense_general_layout(n_batch, n_in, n_out)
    elif kind == "conv":
        layout = ops.conv_layout(draw(st.integers(1, 2)))
    else:
        n_batch, n_in, n_out = draw(st.tuples(*[st.integers(lo, 2) for lo in (0, 1, 1)]))
        perm = draw(st.permutations(range(n_batch + n_in + n_out)))
        layout = ops.Layout(
            batch_axes=tuple(perm[:n_batch]),
            in_axes=tuple(perm[n_batch : n_batch + n_in]),
            out_axes=tuple(perm[n_batch + n_in :]),
        )
    ndim = len(layout.batch_axes) + len(layout.in_axes) + len(layout.out_axes)
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    return layout, shape


def _adapter_shapes(layout: ops.Layout, shape, rank: int):
    """``(lora_a, lora_b)`` shapes in canonical order, derived here from the axis lists."""
    take = lambda axes: tuple(shape[i] for i in axes)  # noqa: E731
    batch, ins, outs = take(layout.batch_axes), take(layout.in_axes), take(layout.out_axes)
    return (*batch, *ins, rank), (*batch, rank, *outs)


@PROPERTY_SETTINGS
@given(
    layout_shape=layouts(),
    rank=st.integers(1, 4),
    scale=st.floats(0.1, 4.0),
    use_cache=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_factored_norm_equals_float64_norm_of_materialised_weight(
    layout_shape, rank, scale, use_cache, seed
):
    layout, shape = layout_shape
    rng = np.random.default_rng(seed)
    a_shape, b_shape = _adapter_shapes(layout, shape, rank)
    kernel = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    lora_a = jnp.asarray(rng.standard_normal(a_shape), jnp.float32)
    lora_b = jnp.asarray(rng.standard_normal(b_shape), jnp.float32)
    axes = (layout.batch_axes, layout.in_axes, layout.out_axes)

    cache = ops.column_norm_sq(kernel, layout) if use_cache else None
    got = ops.dora_norm(kernel, lora_a, lora_b, scale, layout, base_norm_sq=cache)
    want = ref.dora_norm_any_layout(kernel, lora_a, lora_b, scale, *axes)
    assert got.dtype == jnp.float32
    assert got.shape == want.shape

    # The float32 error of the factored form, bounded by the size of its three terms.
    w = ref.canonical_matrices(kernel, *axes)
    delta = ref.canonical_matrices(ref.lora_delta_any_layout(lora_a, lora_b, *axes), *axes)
    terms = (
        np.sum(w * w, axis=1)
        + 2 * scale * np.abs(np.sum(w * delta, axis=1))
        + scale**2 * np.sum(delta * delta, axis=1)
    ).reshape(want.shape)
    got64 = ref.f64(got)
    assert np.all(np.abs(got64**2 - want**2) <= 1e-5 * terms)
    no_cancellation = want**2 >= 1e-2 * terms
    assert ref.relative_error(got64[no_cancellation], want[no_cancellation]) <= 1e-5

    # The library's materialised path agrees with the same float64 reference.
    lib_delta = ops.lora_delta(lora_a, lora_b, layout)
    assert lib_delta.shape == shape
    want_delta = ref.lora_delta_any_layout(lora_a, lora_b, *axes)
    assert ref.relative_error(lib_delta, want_delta) <= 1e-6
    materialised = ops.column_norm(kernel + scale * lib_delta, layout)
    assert ref.relative_error(materialised, want) <= 1e-6


@PROPERTY_SETTINGS
@given(
    in_features=st.integers(2, 8),
    out_features=st.integers(1, 8),
    rank_fraction=st.floats(0.0, 1.0),
    alpha=st.floats(0.5, 16.0),
    rslora=st.booleans(),
    use_bias=st.booleans(),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_merged_dense_forward_equals_unmerged(
    in_features, out_features, rank_fraction, alpha, rslora, use_bias, batch, seed
):
    rank = 1 + int(rank_fraction * (min(in_features, out_features) - 1))
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    rng = np.random.default_rng(seed)
    layer = dora_jax.DoRADense(
        out_features, rank=rank, alpha=alpha, rslora=rslora, use_bias=use_bias
    )
    x = jnp.asarray(rng.standard_normal((batch, in_features)), jnp.float32)
    w0 = rng.standard_normal((in_features, out_features)) / math.sqrt(in_features)
    a = rng.standard_normal((in_features, rank)) / math.sqrt(in_features)
    b = rng.standard_normal((rank, out_features)) * 0.5 / (math.sqrt(rank) * scale)
    m = ref.column_norm(ref.direction(w0, a, b, scale)) * rng.uniform(0.5, 1.5, out_features)
    params = {"kernel": jnp.asarray(w0, jnp.float32)}
    if use_bias:
        params["bias"] = jnp.asarray(rng.standard_normal(out_features), jnp.float32)
    dora = {
        "lora_a": jnp.asarray(a, jnp.float32),
        "lora_b": jnp.asarray(b, jnp.float32),
        "magnitude": jnp.asarray(m, jnp.float32),
    }

    unmerged = layer.apply({"params": params, "dora": dora}, x)
    merged_kernel = ops.merge(
        params["kernel"], dora["lora_a"], dora["lora_b"], dora["magnitude"], scale,
        ops.dense_layout(),
    )  # fmt: skip
    plain = nn.Dense(out_features, use_bias=use_bias)
    merged = plain.apply({"params": {**params, "kernel": merged_kernel}}, x)
    assert merged.shape == unmerged.shape == (batch, out_features)
    assert ref.relative_error(merged, unmerged) <= 1e-5
