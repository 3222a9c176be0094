"""``DoRAConfig``: which layers of a model get DoRA, and with which hyperparameters.

Module paths are ``/``-joined names from the model's root, e.g.
``encoder/layer_0/attention/query`` (Linen scope names, NNX attribute names and list
indices).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from dora_jax import ops

Patterns = str | Sequence[str]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hyperparameters:
    """The DoRA hyperparameters, defined once: a :class:`DoRAConfig`'s and every layer's."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    use_dora: bool = True
    detach_norm: bool = True
    eps: float = ops.DEFAULT_EPS
    adapter_dtype: Any = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerSettings(Hyperparameters):
    """The DoRA hyperparameters of one adapted layer (resolved from a config), and how
    it computes: ``stacking`` changes speed, not results, so a config does not hold it
    and checkpoints do not record it."""

    stacking: ops.Stacking = ops.Stacking()

    @property
    def scale(self) -> float:
        return ops.scaling(self.rank, self.alpha, self.rslora)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoRAConfig(Hyperparameters):
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

    A config holds every :class:`LayerSettings` field but ``stacking``, which changes
    speed only: a layer takes it as an argument, and layers made from a config use
    the backend's default.
    """

    targets: Patterns
    exclude: Patterns = ()
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: Sequence[str] = ()

    def __post_init__(self):
        for name in ("targets", "exclude"):
            object.__setattr__(self, name, _patterns(name, getattr(self, name)))
        object.__setattr__(self, "modules_to_save", _names("modules_to_save", self.modules_to_save))
        object.__setattr__(self, "rank", _rank("rank", self.rank))
        object.__setattr__(self, "alpha", _real("alpha", self.alpha))
        object.__setattr__(self, "dropout", _real("dropout", self.dropout))
        object.__setattr__(self, "eps", _real("eps", self.eps))
        for name in ("rslora", "use_dora", "detach_norm"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise _type_error(name, "a bool", getattr(self, name))
            object.__setattr__(self, name, bool(getattr(self, name)))
        for name, check in (("rank_pattern", _rank), ("alpha_pattern", _real)):
            pattern = getattr(self, name)
            if not isinstance(pattern, Mapping):
                raise _type_error(name, "a dict {pattern: value}", pattern)
            checked = {}
            for key, value in pattern.items():
                if not isinstance(key, str):
                    raise _type_error(f"{name} key", "a regex string", key)
                _compile(f"{name} key {key!r}", key)
                checked[key] = check(f"{name}[{key!r}]", value)
            object.__setattr__(self, name, checked)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DoRAConfig: dropout must be in [0, 1); got {self.dropout}.")
        if not self.eps >= 0.0:
            raise ValueError(f"DoRAConfig: eps must be >= 0; got {self.eps}.")
        try:
            floating = jnp.issubdtype(jnp.dtype(self.adapter_dtype), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise _type_error("adapter_dtype", "a floating dtype", self.adapter_dtype)

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
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(Hyperparameters)}
        return LayerSettings(
            **{
                **shared,
                "rank": _first_match(self.rank_pattern, path, self.rank),
                "alpha": _first_match(self.alpha_pattern, path, self.alpha),
            }
        )

    def _similarity(self, path: str) -> float:
        if isinstance(self.targets, str):
            return _similarity_to(self.targets, path)
        return max((_suffix_similarity(name, path) for name in self.targets), default=0.0)

    def check_matched(
        self,
        paths: Iterable[str],
        adaptable: Iterable[str],
        *,
        param_paths: Iterable[str] | None = None,
    ) -> None:
        """Raise a ``ValueError`` for any setting that selects nothing in the model.

        ``targets`` must select an adaptable layer; every ``exclude`` entry must match a
        module (adaptable or not: excluding a module that ``targets`` would wrongly
        select is a use of it); every ``rank_pattern`` and ``alpha_pattern`` key must
        match an adapted layer; every ``modules_to_save`` entry must match a module (one
        holding parameters, when ``param_paths`` is given). The message names the field
        and the entry and lists the closest candidate paths, closest first, so a typo
        never silently does nothing.

        Args:
          paths: every module path of the model.
          adaptable: the paths of layers of a kind DoRA supports.
          param_paths: optionally, the module paths that hold parameters directly; a
            ``modules_to_save`` entry must then match one of them or an ancestor (what
            :func:`dora_jax.train.partition` trains).
        """
        paths, adaptable = list(paths), list(adaptable)
        every = sorted(set(paths) | set(adaptable))
        targeted = [p for p in adaptable if self.is_target(p)]
        if not targeted:
            closest = sorted(adaptable, key=lambda p: -self._similarity(p))
            shown = [p + ("  (excluded)" if _matches(self.exclude, p) else "") for p in closest]
            raise ValueError(
                f"DoRAConfig targets {self.targets!r} match no adaptable layer"
                + (f" (exclude={self.exclude!r})" if self.exclude else "")
                + ". Adaptable layers, closest first:\n  "
                + _listing(shown)
                + f"\n({len(paths)} module paths in the model.)"
            )
        regex = isinstance(self.exclude, str)
        for entry in [self.exclude] if regex else self.exclude:
            if not any(_matches(entry if regex else (entry,), p) for p in every):
                _unmatched(
                    "exclude", entry, "matches no module", "Module paths", every, suffix=not regex
                )
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, name):
                if not any(_first_match({key: True}, p, False) for p in targeted):
                    _unmatched(
                        name,
                        key,
                        "matches no adapted layer",
                        "Adapted layers",
                        targeted,
                        suffix=True,
                    )
        holders = every
        if param_paths is not None:  # modules holding parameters and their ancestors
            parts = [p.split("/") for p in param_paths]
            holders = sorted({"/".join(p[:n]) for p in parts for n in range(1, len(p) + 1)})
        for entry in self.modules_to_save:
            if not any(_matches((entry,), p) for p in holders):
                problem = "matches no module" + (" with parameters" if holders is not every else "")
                _unmatched("modules_to_save", entry, problem, "Module paths", holders, suffix=True)


def _unmatched(field: str, entry: str, problem: str, what: str, candidates, *, suffix: bool):
    """Raise the error for a config entry that selects nothing, closest candidates first."""
    score = _suffix_similarity if suffix else _similarity_to
    closest = sorted(candidates, key=lambda p: -score(entry, p))
    raise ValueError(
        f"DoRAConfig {field} entry {entry!r} {problem}. {what}, closest first:\n  "
        + _listing(closest)
    )


def _listing(paths: Sequence[str], limit: int = 20) -> str:
    more = f"\n  ... {len(paths) - limit} more" if len(paths) > limit else ""
    return "\n  ".join(list(paths[:limit]) or ["(none)"]) + more


def _suffix_similarity(wanted: str, path: str) -> float:
    """How alike a name (or pattern) and a path are, over the path's ``/``-suffixes."""
    parts = path.split("/")
    return max(_similarity_to(wanted, "/".join(parts[-n:])) for n in range(1, len(parts) + 1))


def _similarity_to(wanted: str, path: str) -> float:
    """How alike a target and a path are: whole paths for a regex, else path suffixes."""
    return difflib.SequenceMatcher(None, wanted, path).ratio()


def _type_error(name: str, wanted: str, value: Any) -> TypeError:
    return TypeError(
        f"DoRAConfig: {name} must be {wanted}; got {value!r} ({type(value).__name__})."
    )


def _patterns(name: str, patterns: Any) -> Patterns:
    """``targets`` / ``exclude``: a regex string (checked), or a tuple of names."""
    if isinstance(patterns, str):
        _compile(f"{name} {patterns!r}", patterns)
        return patterns
    return _names(name, patterns)


def _names(name: str, names: Any) -> tuple[str, ...]:
    if isinstance(names, str):
        return (names,)
    if isinstance(names, Mapping | bytes) or not isinstance(names, Iterable):
        raise _type_error(name, "a string or a list of strings", names)
    names = tuple(names)
    for item in names:
        if not isinstance(item, str):
            raise _type_error(f"{name} entry", "a string", item)
    return names


def _rank(name: str, rank: Any) -> int:
    if isinstance(rank, bool | np.bool_) or not isinstance(rank, numbers.Integral):
        raise _type_error(name, "an integer >= 1", rank)
    if rank < 1:
        raise ValueError(f"DoRAConfig: {name} must be an integer >= 1; got {rank!r}.")
    return int(rank)


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise _type_error(name, "a real number", value)
    if not math.isfinite(value):
        raise ValueError(f"DoRAConfig: {name} must be finite; got {float(value)!r}.")
    return float(value)


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
