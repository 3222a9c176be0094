"""Magnitude and direction changes of fine-tuned weights (the paper's section 2).

For a fine-tuned kernel ``W_t`` against the pretrained ``W0``, over the ``k`` output
features (columns of a Flax ``(in, out)`` kernel)::

    dM = mean_n | ||W_t[:, n]|| - ||W0[:, n]|| |
    dD = mean_n ( 1 - cos(W_t[:, n], W0[:, n]) )

Plotted per layer and checkpoint, full fine-tuning and DoRA show a negative correlation
between ``dD`` and ``dM`` and LoRA a positive one (Liu et al., 2024, Figure 2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from dora_jax import ops

Array = Any


def magnitude_direction_change(
    tuned: Array, pretrained: Array, layout: ops.Layout | None = None
) -> tuple[Array, Array]:
    """``(dM, dD)`` of one kernel, in float32.

    Args:
      tuned: ``W_t``, e.g. a merged kernel ``(in, out)``.
      pretrained: ``W0`` of the same shape.
      layout: which axes are input (reduced) axes; Dense ``(in, out)`` by default.
    Returns:
      two scalars: the mean absolute change of the per-feature norms, and the mean
      ``1 - cosine`` between the per-feature weight vectors.
    """
    layout = layout or ops.dense_layout()
    if tuned.shape != pretrained.shape:
        raise ValueError(
            f"magnitude_direction_change needs kernels of one shape; got {tuned.shape} and "
            f"{pretrained.shape}."
        )
    norm_t = ops.column_norm(tuned, layout)
    norm_0 = ops.column_norm(pretrained, layout)
    # 1 - cos(a, b) = (||a - b||^2 - (||a|| - ||b||)^2) / (2 ||a|| ||b||): both terms stay
    # accurate when a is close to b, where 1 - <a, b> / (||a|| ||b||) would cancel.
    difference = ops.column_norm_sq(tuned.astype(jnp.float32) - pretrained, layout)
    gap = norm_t - norm_0
    denominator = jnp.maximum(2.0 * norm_t * norm_0, jnp.finfo(jnp.float32).tiny)
    return jnp.mean(jnp.abs(gap)), jnp.mean((difference - gap * gap) / denominator)


def changes_by_layer(
    tuned_params: Mapping[str, Any], pretrained_params: Mapping[str, Any]
) -> dict[str, tuple[float, float]]:
    """``{path: (dM, dD)}`` for every 2-d ``kernel`` in two Flax params trees.

    ``tuned_params`` are plain params (e.g. from :func:`dora_jax.linen.merge_params`)
    with the same structure as ``pretrained_params``.
    """
    out: dict[str, tuple[float, float]] = {}

    def visit(tuned, pretrained, path):
        for key, value in tuned.items():
            name = f"{path}/{key}" if path else key
            if isinstance(value, Mapping):
                visit(value, pretrained[key], name)
            elif key == "kernel" and value.ndim == 2:
                d_m, d_d = magnitude_direction_change(value, pretrained[key])
                out[path] = (float(d_m), float(d_d))

    visit(tuned_params, pretrained_params, "")
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample std)`` of a list of numbers, in float64; the std of one number is
    NaN (it is unknown, not 0)."""
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"mean_std needs a non-empty list of numbers; got shape {values.shape}.")
    std = float(np.std(values, ddof=1)) if values.size > 1 else float("nan")
    return float(np.mean(values)), std


def line_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """The least-squares line ``y = slope * x + intercept`` and Pearson's correlation.

    Args:
      x, y: ``(n,)`` numbers, ``n >= 2``, ``x`` not constant (float64 throughout).
    Returns:
      ``{"slope", "intercept", "correlation"}``; the correlation is NaN when ``y`` is
      constant.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"line_fit needs two (n,) arrays, n >= 2; got {x.shape} and {y.shape}.")
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    if sxx == 0.0:
        raise ValueError(f"line_fit: x is constant ({x[0]!r} for all {x.size} points).")
    slope = float(dx @ dy) / sxx
    correlation = float(dx @ dy) / np.sqrt(sxx * syy) if syy > 0.0 else float("nan")
    return {
        "slope": slope,
        "intercept": float(y.mean() - slope * x.mean()),
        "correlation": float(correlation),
    }


def plot_decomposition(panels: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """The paper's Figure 2: ``dD`` on x, ``dM`` on y, one panel per method.

    Args:
      panels: ``{title: {"d_m": (checkpoints, layers), "d_d": (checkpoints, layers),
        "steps": (checkpoints,) labels, "layers": (layers,) names}}``; each point is
        coloured by its checkpoint and marked by its layer, and each panel gets the
        least-squares line of ``dM`` on ``dD`` with its slope and correlation.
      path: the PNG to write (Matplotlib's Agg canvas; no display needed).
    Returns:
      ``path``.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    markers = "os^vD<>ph*XP"
    figure = Figure(figsize=(4.2 * len(panels), 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, panel) in zip(axes, panels.items(), strict=True):
        d_m, d_d = np.asarray(panel["d_m"], np.float64), np.asarray(panel["d_d"], np.float64)
        if d_m.ndim != 2 or d_m.shape != d_d.shape:
            raise ValueError(
                f"plot_decomposition: panel {title!r} needs d_m and d_d of one shape "
                f"(checkpoints, layers); got {d_m.shape} and {d_d.shape}."
            )
        steps, layers = list(panel["steps"]), list(panel["layers"])
        if (len(steps), len(layers)) != d_m.shape:
            raise ValueError(
                f"plot_decomposition: panel {title!r} has {len(steps)} steps and "
                f"{len(layers)} layer names for points of shape {d_m.shape}."
            )
        colours = colormaps["viridis"](np.linspace(0.0, 0.9, len(steps)))
        for i in range(len(steps)):
            for j, layer in enumerate(layers):
                ax.scatter(
                    d_d[i, j],
                    d_m[i, j],
                    color=colours[i],
                    marker=markers[j % len(markers)],
                    label=f"{layer}" if i == len(steps) - 1 else None,
                )
        fit = line_fit(d_d.ravel(), d_m.ravel())
        xs = np.linspace(d_d.min(), d_d.max(), 2)
        ax.plot(xs, fit["slope"] * xs + fit["intercept"], color="crimson")
        ax.set_title(f"{title}: slope {fit['slope']:.3g}, r {fit['correlation']:+.2f}")
        ax.set_xlabel("ΔD (1 - cos)")
        ax.set_ylabel("ΔM (|Δ norm|)")
        ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        ax.legend(
            fontsize="x-small",
            title=f"colour: step {steps[0]}..{steps[-1]}",
            title_fontsize="x-small",
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
