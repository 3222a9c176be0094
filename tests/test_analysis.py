"""Magnitude and direction changes against a float64 NumPy reference of the paper's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dora_jax import analysis, ops


def _reference(tuned, pretrained):
    a, b = np.asarray(tuned, np.float64), np.asarray(pretrained, np.float64)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    cosine = np.sum(a * b, axis=0) / (na * nb)
    return np.mean(np.abs(na - nb)), np.mean(1.0 - cosine)


@pytest.mark.parametrize("step", [1e-3, 0.1, 1.0])
def test_matches_the_paper_formulas(step):
    keys = jax.random.split(jax.random.key(0), 2)
    pretrained = jax.random.normal(keys[0], (64, 32))
    tuned = pretrained + step * jax.random.normal(keys[1], (64, 32))
    d_m, d_d = analysis.magnitude_direction_change(tuned, pretrained)
    ref_m, ref_d = _reference(tuned, pretrained)
    np.testing.assert_allclose(float(d_m), ref_m, rtol=1e-4)
    np.testing.assert_allclose(float(d_d), ref_d, rtol=1e-3)


def test_pure_rescaling_changes_magnitude_only_and_rotation_direction_only():
    pretrained = jax.random.normal(jax.random.key(1), (16, 8))
    scaled = pretrained * jnp.linspace(0.5, 2.0, 8)
    d_m, d_d = analysis.magnitude_direction_change(scaled, pretrained)
    assert float(d_m) > 0.1 and abs(float(d_d)) < 1e-6
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(16, 16)))[0]
    rotated = jnp.asarray(rotation, jnp.float32) @ pretrained
    d_m, d_d = analysis.magnitude_direction_change(rotated, pretrained)
    assert abs(float(d_m)) < 1e-5 and float(d_d) > 0.1


def test_changes_by_layer_and_conv_layout():
    pretrained = {"a": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    tuned = {"a": {"kernel": 2.0 * jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    assert analysis.changes_by_layer(tuned, pretrained) == {"a": (2.0, 0.0)}
    kernel = jax.random.normal(jax.random.key(2), (3, 3, 4, 5))
    d_m, _ = analysis.magnitude_direction_change(2.0 * kernel, kernel, ops.conv_layout(2))
    expected = np.mean(np.linalg.norm(np.asarray(kernel).reshape(-1, 5), axis=0))
    np.testing.assert_allclose(float(d_m), expected, rtol=1e-5)
