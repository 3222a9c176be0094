"""A summary of an adapted model, like PEFT's ``print_trainable_parameters``.

``print(dora_jax.linen.summary(variables, config))`` or
``print(dora_jax.nnx.summary(model))`` lists each adapted layer with its kernel and
adapter shapes and rank, the fully trained ``modules_to_save``, and the trainable and
total parameter counts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class AdaptedLayer:
    """One adapted layer: shapes, rank and its trainable parameter count."""

    path: str
    kernel_shape: tuple[int, ...]
    lora_a_shape: tuple[int, ...]
    lora_b_shape: tuple[int, ...]
    magnitude_shape: tuple[int, ...] | None

    @property
    def rank(self) -> int:
        return self.lora_a_shape[-1]

    @property
    def size(self) -> int:
        shapes = (self.lora_a_shape, self.lora_b_shape, self.magnitude_shape or ())
        return sum(math.prod(s) for s in shapes if s)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Adapted layers, fully trained modules and parameter counts of a model."""

    layers: tuple[AdaptedLayer, ...]
    saved: tuple[tuple[str, int], ...]  # (module path, parameter count)
    trainable: int
    total: int

    def __str__(self) -> str:
        lines = []
        if self.layers:
            header = ("layer", "kernel", "lora_a", "lora_b", "magnitude", "rank", "params")
            rows = [header] + [
                (
                    layer.path,
                    str(layer.kernel_shape),
                    str(layer.lora_a_shape),
                    str(layer.lora_b_shape),
                    str(layer.magnitude_shape) if layer.magnitude_shape else "-",
                    str(layer.rank),
                    f"{layer.size:,}",
                )
                for layer in self.layers
            ]
            widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
            lines += [
                "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                for row in rows
            ]
        for path, count in self.saved:
            lines.append(f"{path}: trained in full ({count:,} params)")
        share = 100.0 * self.trainable / self.total if self.total else 0.0
        lines.append(
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {share:.4f}"
        )
        return "\n".join(lines)


def _size(tree: Any) -> int:
    if isinstance(tree, Mapping):
        return sum(_size(v) for v in tree.values())
    return int(math.prod(getattr(tree, "shape", ())))


def from_linen_variables(variables: Mapping[str, Any], config: Any = None) -> Summary:
    """Summarise Linen variables with ``"params"`` and ``"dora"`` collections."""
    params, dora = variables.get("params", {}), variables.get("dora", {})
    layers = []

    def visit_dora(tree, path, base):
        if "lora_a" in tree:
            kernel = (
                base.get("kernel", base.get("embedding")) if isinstance(base, Mapping) else None
            )
            magnitude = tree.get("magnitude")
            layers.append(
                AdaptedLayer(
                    path="/".join(path),
                    kernel_shape=tuple(getattr(kernel, "shape", ())),
                    lora_a_shape=tuple(tree["lora_a"].shape),
                    lora_b_shape=tuple(tree["lora_b"].shape),
                    magnitude_shape=None if magnitude is None else tuple(magnitude.shape),
                )
            )
            return
        for key, value in tree.items():
            if isinstance(value, Mapping):
                visit_dora(
                    value, (*path, key), base.get(key, {}) if isinstance(base, Mapping) else {}
                )

    visit_dora(dora, (), params)
    saved = []

    def visit_saved(tree, path):
        name = "/".join(path)
        if path and config is not None and config.is_saved(name):
            saved.append((name, _size(tree)))
            return
        for key, value in tree.items():
            if isinstance(value, Mapping):
                visit_saved(value, (*path, key))

    visit_saved(params, ())
    trainable = _size(dora) + sum(count for _, count in saved)
    return Summary(tuple(layers), tuple(saved), trainable, _size(params) + _size(dora))
