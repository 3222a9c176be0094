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


def _orthogonal_partner(w, rng):
    """Per column, a vector orthogonal to that column with the same norm."""
    u = rng.normal(size=w.shape)
    u -= w * np.sum(u * w, axis=0) / np.sum(w * w, axis=0)
    return u * np.linalg.norm(w, axis=0) / np.linalg.norm(u, axis=0)


def test_rotating_each_feature_by_a_known_angle_changes_direction_only():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(24, 6))
    angles = np.linspace(0.1, 1.2, 6)  # feature n turns by angles[n] in its own plane
    rotated = np.cos(angles) * w + np.sin(angles) * _orthogonal_partner(w, rng)
    d_m, d_d = analysis.magnitude_direction_change(jnp.asarray(rotated), jnp.asarray(w))
    assert abs(float(d_m)) < 1e-5
    np.testing.assert_allclose(float(d_d), np.mean(1.0 - np.cos(angles)), rtol=1e-5)


def test_rescaling_each_feature_gives_the_exact_magnitude_change_and_no_direction():
    w = np.random.default_rng(4).normal(size=(24, 6))
    scales = np.array([0.5, 0.9, 1.0, 1.3, 2.0, 3.0])
    d_m, d_d = analysis.magnitude_direction_change(jnp.asarray(w * scales), jnp.asarray(w))
    expected = np.mean(np.abs(scales - 1.0) * np.linalg.norm(w, axis=0))
    np.testing.assert_allclose(float(d_m), expected, rtol=1e-5)
    assert abs(float(d_d)) < 1e-6


def test_line_fit_of_known_points():
    exact = analysis.line_fit([0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 5.0, 7.0])
    assert exact == pytest.approx({"slope": 2.0, "intercept": 1.0, "correlation": 1.0})
    # dx = (-1, 0, 1), dy = (-1, 1, 0): slope 1/2, correlation 1 / sqrt(2 * 2).
    known = analysis.line_fit([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert known == pytest.approx({"slope": 0.5, "intercept": 1.0, "correlation": 0.5})
    falling = analysis.line_fit([0.0, 1.0, 2.0], [4.0, 2.0, 0.0])
    assert falling["slope"] == pytest.approx(-2.0) and falling["correlation"] == pytest.approx(-1)
    with pytest.raises(ValueError, match="x is constant"):
        analysis.line_fit([1.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match=r"\(3,\) and \(2,\)"):
        analysis.line_fit([1.0, 2.0, 3.0], [0.0, 1.0])


def test_mean_std_is_the_sample_std_and_unknown_for_one_value():
    assert analysis.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    mean, std = analysis.mean_std([0.25])
    assert mean == 0.25 and np.isnan(std)
    with pytest.raises(ValueError, match="non-empty"):
        analysis.mean_std([])


def test_plot_decomposition_writes_a_png_and_names_bad_shapes(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(5)
    panel = {"d_m": rng.random((3, 4)), "d_d": rng.random((3, 4)), "steps": [10, 20, 30]}
    panel["layers"] = ["q0", "v0", "q1", "v1"]
    path = analysis.plot_decomposition({"LoRA": panel, "DoRA": panel}, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"panel 'bad' needs d_m and d_d of one shape"):
        analysis.plot_decomposition({"bad": {**panel, "d_d": rng.random((3, 5))}}, path)
    with pytest.raises(ValueError, match="2 steps and 4 layer names"):
        analysis.plot_decomposition({"x": {**panel, "steps": [1, 2]}}, path)
