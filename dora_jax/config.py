"""``DoRAConfig``: which layers of a model get DoRA, and with which hyperparameters.

Module paths are ``/``-joined names from the model's root, e.g.
``encoder/layer_0/attention/query`` (Linen scope names, NNX attribute names and list
indices).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from dora_jax import ops

Patterns = str | Sequence[str]


@dataclasses.dataclass(frozen=True)
class LayerSettings:
    """The DoRA hyperparameters of one adapted layer (resolved from a config)."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    use_dora: bool = True
    detach_norm: bool = True
    eps: float = ops.DEFAULT_EPS
    adapter_dtype: Any = jnp.float32

    @property
    def scale(self) -> float:
        return ops.scaling(self.rank, self.alpha, self.rslora)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoRAConfig:
    """Which layers to adapt and how; frozen and validated on construction.

    Attributes:
      targets: the layers to adapt. A string is a regular expression matched with
        ``re.fullmatch`` against whole module paths (``".*attention/(query|value)"``);
        a list of names is matched against path suffixes, like PEFT's
        ``target_modules`` (``["query", "value"]`` matches ``.../query`` and
        ``.../value``).
      exclude: layers never adapted, in the same two forms; wins over ``targets``.
      rank, alpha: LoRA rank and alpha; scaling ``alpha / rank``.
      dropout: dropout on the adapter path (PEFT's ``lora_dropout``).
      rslora: scaling ``alpha / sqrt(rank)``.
      use_dora: ``False`` gives plain LoRA on the same layers.
      detach_norm: the paper's constant-C gradient (default) or the exact gradient.
      eps: floor of the DoRA norm.
      rank_pattern, alpha_pattern: per-layer overrides ``{pattern: value}``; a pattern
        is a regular expression matched against the path or a ``/``-suffix of it, the
        first matching key wins (PEFT's semantics).
      modules_to_save: layers (names matched as path suffixes) whose base parameters
        are trained in full, such as a new classifier head.
      adapter_dtype: dtype of the adapters (float32 by default, as PEFT).
    """

    targets: Patterns
    exclude: Patterns = ()
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    use_dora: bool = True
    detach_norm: bool = True
    eps: float = ops.DEFAULT_EPS
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: Sequence[str] = ()
    adapter_dtype: Any = jnp.float32

    def __post_init__(self):
        _check_patterns("targets", self.targets)
        _check_patterns("exclude", self.exclude)
        if isinstance(self.modules_to_save, str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            if not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))
        _check_rank("rank", self.rank)
        for key, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", rank)
            _compile(f"rank_pattern key {key!r}", key)
        for key in self.alpha_pattern:
            _compile(f"alpha_pattern key {key!r}", key)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DoRAConfig: dropout must be in [0, 1); got {self.dropout}.")
        if not self.eps >= 0.0:
            raise ValueError(f"DoRAConfig: eps must be >= 0; got {self.eps}.")

    def __hash__(self):  # dicts inside: hash by value so configs can be static arguments
        return hash(repr(self))

    def is_target(self, path: str) -> bool:
        """Whether the layer at ``path`` is adapted."""
        return _matches(self.targets, path) and not _matches(self.exclude, path)

    def is_saved(self, path: str) -> bool:
        """Whether the layer at ``path`` is trained in full (``modules_to_save``)."""
        return _matches(self.modules_to_save, path)

    def settings(self, path: str) -> LayerSettings:
        """The hyperparameters of the layer at ``path``, with pattern overrides applied."""
        return LayerSettings(
            rank=_first_match(self.rank_pattern, path, self.rank),
            alpha=_first_match(self.alpha_pattern, path, self.alpha),
            dropout=self.dropout,
            rslora=self.rslora,
            use_dora=self.use_dora,
            detach_norm=self.detach_norm,
            eps=self.eps,
            adapter_dtype=self.adapter_dtype,
        )

    def _similarity(self, path: str) -> float:
        if isinstance(self.targets, str):
            return _similarity_to(self.targets, path)
        parts = path.split("/")
        return max(
            (
                _similarity_to(name, "/".join(parts[-(name.count("/") + 1) :]))
                for name in self.targets
            ),
            default=0.0,
        )

    def check_matched(self, paths: Iterable[str], adaptable: Iterable[str]) -> None:
        """Raise if ``targets`` matched nothing, listing the closest existing paths.

        Args:
          paths: every module path of the model.
          adaptable: the paths of layers of a kind DoRA supports.
        """
        paths, adaptable = list(paths), list(adaptable)
        if any(self.is_target(p) for p in adaptable):
            return
        closest = sorted(adaptable, key=lambda p: -self._similarity(p))
        shown = [p + ("  (excluded)" if _matches(self.exclude, p) else "") for p in closest]
        raise ValueError(
            f"DoRAConfig targets {self.targets!r} match no adaptable layer"
            + (f" (exclude={self.exclude!r})" if self.exclude else "")
            + ". Adaptable layers, closest first:\n  "
            + "\n  ".join(shown[:20] or ["(none)"])
            + (f"\n  ... {len(closest) - 20} more" if len(closest) > 20 else "")
            + f"\n({len(paths)} module paths in the model.)"
        )


def _similarity_to(wanted: str, path: str) -> float:
    """How alike a target and a path are: whole paths for a regex, else path suffixes."""
    return difflib.SequenceMatcher(None, wanted, path).ratio()


def _check_patterns(name: str, patterns: Patterns) -> None:
    if isinstance(patterns, str):
        _compile(f"{name} {patterns!r}", patterns)
        return
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"DoRAConfig: {name} must be a regex string or a list of names.")


def _check_rank(name: str, rank: Any) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"DoRAConfig: {name} must be an integer >= 1; got {rank!r}.")


def _compile(what: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"DoRAConfig: {what} is not a valid regular expression: {error}."
        ) from None


def _matches(patterns: Patterns, path: str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, path) is not None
    return any(path == name or path.endswith("/" + name) for name in patterns)


def _first_match(pattern: Mapping[str, Any], path: str, default: Any) -> Any:
    for key, value in pattern.items():
        if re.fullmatch(rf"(?:.*/)?(?:{key})", path):
            return value
    return default
