"""Wrapping of unmodified Linen models (:func:`wrap`): DoRA through ``nn.intercept_methods``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dora_jax import ops
from dora_jax.adapters import (
    ADAPTER_LEAVES,
    CACHE_LEAVES,
    DORA,
    DORA_CACHE,
    default_inits,
    merge_trees,
)
from dora_jax.config import DoRAConfig
from dora_jax.linen import calls
from dora_jax.linen.layers import DoRAMixin
from dora_jax.linen.variables import RESERVED_PREFIX, BoundAdapter, module_path, params_store

Array = jax.Array


# Exact types: a user's subclass may change the layer's computation, so it is not taken
# for a plain Flax layer.
ADAPTABLE = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed)


@dataclasses.dataclass
class _Trace:
    """What one trace of a wrapped model saw: every module path, the adaptable ones."""

    paths: set = dataclasses.field(default_factory=set)
    adaptable: set = dataclasses.field(default_factory=set)
    adapted: set = dataclasses.field(default_factory=set)


def _dropout_from_rng(module: nn.Module, rate: float) -> Callable[[Array], Array | None]:
    """BoundAdapter dropout in a wrapped model: active when apply gets a ``"dropout"`` rng."""

    def dropped(x: Array) -> Array | None:
        if rate == 0.0 or not module.has_rng("dropout"):
            return None
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))

    return dropped


def _intercept(config: DoRAConfig, trace: _Trace, next_fun, args, kwargs, context):
    module = context.module
    path = module_path(module)
    if path:
        trace.paths.add(path)
    if isinstance(module, DoRAMixin) or not path or not config.is_target(path):
        if type(module) in ADAPTABLE and path:
            trace.adaptable.add(path)
        return next_fun(*args, **kwargs)
    if type(module) not in ADAPTABLE:
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        raise ValueError(
            f"DoRAConfig targets match {path!r}, a {type(module).__module__}."
            f"{type(module).__name__}; DoRA adapts nn.Dense, nn.DenseGeneral, nn.Einsum, "
            f"nn.Conv and nn.Embed layers. Narrow `targets` or add {path!r} to `exclude`."
        )
    trace.adaptable.add(path)
    trace.adapted.add(path)
    settings = config.settings(path)
    kind = type(module)
    a_init, b_init = default_inits(kind is nn.Embed)
    adapter = BoundAdapter(
        module=module,
        settings=settings,
        store=params_store(module),
        dropout=_dropout_from_rng(module, settings.dropout),
        lora_a_init=a_init,
        lora_b_init=b_init,
    )
    if kind is nn.Embed:
        if context.method_name == "setup":
            next_fun(*args, **kwargs)
            adapters = adapter.variables(module.embedding, ops.dense_layout())
            object.__setattr__(module, "_dora_adapters", adapters)
            return None
        if context.method_name == "__call__":
            return calls.embed_call(module, args[0], adapter, module._dora_adapters)
        if context.method_name == "attend":
            return calls.embed_attend(module, args[0], adapter, module._dora_adapters)
        return next_fun(*args, **kwargs)
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    if kind is nn.Dense:
        return calls.dense_call(module, *args, adapter)
    if kind is nn.DenseGeneral:
        return calls.dense_general_call(module, *args, adapter)
    if kind is nn.Conv:
        return calls.conv_call(module, *args, adapter)
    return calls.einsum_call(
        module, args[0], kwargs.get("einsum_str", args[1] if len(args) > 1 else None), adapter
    )


@dataclasses.dataclass(frozen=True, eq=False)
class DoRAModel:
    """An unmodified Linen model with DoRA on the layers a config selects.

    Made by :func:`wrap`. ``init`` and ``apply`` take the model's own arguments (and
    Flax's ``method=``, ``rngs=``, ``mutable=`` ...); variables hold ``"params"``
    (exactly the model's), ``"dora"`` (trainable adapters, nested like the params) and,
    only after :func:`cache_base_norms`, ``"dora_cache"``. BoundAdapter dropout runs when
    ``apply`` is given a ``"dropout"`` rng.

    The wrapper is not a Linen module and has no scope of its own: ``init`` and ``apply``
    are the model's own, run inside a method interceptor, so no name of the model is
    taken (a submodule may be called ``model``, ``config`` or anything else).
    """

    model: nn.Module
    config: DoRAConfig

    @contextlib.contextmanager
    def _adapting(self, method, params: Callable[[], Mapping[str, Any]]):
        """Adapt the targeted layers of every trace of the model run inside.

        A trace of the whole model (``method=None``) checks every setting of the config
        against what it saw (``params()`` gives the parameters of the run); a trace of
        another method sees part of the model, so only ``targets`` is checked there.
        """
        trace = _Trace()
        with nn.intercept_methods(functools.partial(_intercept, self.config, trace)):
            yield
        if not trace.paths:
            return
        if method is None:
            self.config.check_matched(
                trace.paths, trace.adaptable, param_paths=_module_paths_with_leaves(params())
            )
        elif not trace.adapted:
            self.config.check_matched(trace.paths, trace.adaptable)

    def init(self, rngs, *args, method=None, **kwargs) -> dict[str, Any]:
        """``init`` of the model plus adapters; magnitudes from the fresh base weights.

        ``method`` is Flax's: a method name (``"encode"``), an unbound method
        (``Model.encode``) or a function ``fn(module, *args)`` called with the model.
        Returns ``params`` and ``dora``; no cache (see :func:`cache_base_norms`).
        """
        variables = {}
        with self._adapting(method, lambda: variables.get("params", {})):
            variables = self.model.init(rngs, *args, method=method, **kwargs)
        return split_adapters(variables)

    def init_from_params(
        self, rngs, params: Mapping[str, Any], *args, method=None, **kwargs
    ) -> dict[str, Any]:
        """Adapters for pretrained ``params``: magnitudes are computed from them.

        Base parameters absent from ``params`` (a new classification head, say) are
        initialised as ``init`` would. ``method`` as in :meth:`init`. Returns ``params``
        and ``dora``; no cache (see :func:`cache_base_norms`).
        """
        rngs = {"params": rngs} if not isinstance(rngs, Mapping) else rngs
        variables = {}
        with self._adapting(method, lambda: variables.get("params", {})):
            _, variables = self.model.apply(
                {"params": params}, *args, rngs=rngs, mutable=True, method=method, **kwargs
            )
        return split_adapters(variables)

    def apply(self, variables, *args, method=None, mutable=False, **kwargs):
        """``apply`` of the model with the adapters in ``variables["dora"]``.

        ``method`` as in :meth:`init`. Without ``variables["dora_cache"]``, each layer's
        ``||W0||_c^2`` is computed from the ``params`` given.
        """
        joined = join_adapters(variables)
        with self._adapting(method, lambda: joined.get("params", {})):
            result = self.model.apply(joined, *args, method=method, mutable=mutable, **kwargs)
        if mutable is False:
            return result
        out, updates = result
        return out, split_adapters(updates)


def _module_paths_with_leaves(params: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The ``/``-joined paths of the modules in a params tree that hold arrays directly."""
    paths = []
    if any(not isinstance(v, Mapping) for v in params.values()) and prefix:
        paths.append(prefix)
    for name, value in params.items():
        if isinstance(value, Mapping):
            paths += _module_paths_with_leaves(value, f"{prefix}/{name}" if prefix else name)
    return paths


def wrap(model: nn.Module, config: DoRAConfig) -> DoRAModel:
    """Put DoRA into an unmodified Linen model.

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from dora_jax import DoRAConfig
    >>> mlp = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> model = wrap(mlp, DoRAConfig(targets=["layers_0"], rank=2))
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> jax.tree.map(jnp.shape, variables["dora"])
    {'layers_0': {'lora_a': (4, 2), 'lora_b': (2, 8), 'magnitude': (8,)}}
    """
    if not isinstance(config, DoRAConfig):
        raise TypeError(f"wrap needs a DoRAConfig; got {type(config).__name__}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap needs a flax.linen Module; got {type(model).__name__}.")
    if model.scope is not None:
        raise ValueError(
            f"wrap needs an unbound {type(model).__name__} (as passed to init/apply); "
            f"this one is bound to a scope."
        )
    return DoRAModel(model=model, config=config)


def split_adapters(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Move reserved-name adapter params into the ``"dora"`` / ``"dora_cache"`` collections."""
    variables = dict(variables)
    if "params" not in variables:
        return variables
    params, dora, cache = _split(variables["params"])
    variables["params"] = params
    for name, tree in ((DORA, dora), (DORA_CACHE, cache)):
        if tree:
            variables[name] = merge_trees(variables.get(name, {}), tree)
    return variables


def join_adapters(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`split_adapters`: adapters back into ``"params"``."""
    variables = dict(variables)
    dora, cache = variables.pop(DORA, {}), variables.pop(DORA_CACHE, {})
    params = variables.get("params", {})
    for tree in (dora, cache):
        params = merge_trees(params, _prefix_leaves(tree))
    if params:
        variables["params"] = params
    return variables


def _split(tree):
    params, dora, cache = {}, {}, {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            p, d, c = _split(value)
            if p:
                params[key] = p
            if d:
                dora[key] = d
            if c:
                cache[key] = c
        elif key.startswith(RESERVED_PREFIX) and key[len(RESERVED_PREFIX) :] in CACHE_LEAVES:
            cache[key[len(RESERVED_PREFIX) :]] = value
        elif key.startswith(RESERVED_PREFIX) and key[len(RESERVED_PREFIX) :] in ADAPTER_LEAVES:
            dora[key[len(RESERVED_PREFIX) :]] = value
        else:
            params[key] = value
    return params, dora, cache


def _prefix_leaves(tree):
    return {
        k if isinstance(v, Mapping) else RESERVED_PREFIX + k: _prefix_leaves(v)
        if isinstance(v, Mapping)
        else v
        for k, v in tree.items()
    }
