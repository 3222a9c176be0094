"""Training with a frozen base: partition, optimizer masking, and one jit-compiled step.

The variables split into two trees::

    trainable = {"dora": adapters, "params": modules_to_save params}   differentiated
    frozen    = everything else (the base W0, biases, dora_cache ...)  not differentiated

The step takes the gradient with respect to ``trainable`` only, so no gradient of
``W0`` is ever formed and the optimizer holds state for the adapters alone. For users
who hand an optimizer the whole parameter tree, :func:`freeze` masks it with
``optax.multi_transform`` (not ``optax.masked``, which passes masked updates through
unchanged), so frozen leaves get zero updates, no state, and no share of gradient
clipping.

One step function serves one device (``jax.jit``), ``jax.pmap`` (with ``axis_name``,
gradients are averaged with ``pmean``: adapter-sized tensors only) and ``jax.jit`` over
a ``Mesh`` (batch sharded over ``"data"``, the frozen base optionally sharded over
``"fsdp"``; XLA inserts the collectives), on one host or many.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dora_jax.config import DoRAConfig
from dora_jax.linen import DORA, DORA_CACHE, NORM, _drop_leaves

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
    """What a step updates: the step count, the trainable tree and its optimizer state."""

    step: jax.Array
    trainable: PyTree
    opt_state: PyTree
    rng: jax.Array


def partition(
    variables: Mapping[str, Any], config: DoRAConfig | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split Linen variables into ``(trainable, frozen)``.

    ``trainable`` holds the ``"dora"`` collection and, under ``"params"``, the modules
    that ``config.modules_to_save`` names; ``frozen`` holds everything else, less any
    inference-only norm cache (:func:`dora_jax.linen.cache_norms`). :func:`combine` is
    the inverse.
    """
    variables = dict(variables)
    if DORA_CACHE in variables:  # a cached whole norm is for inference only
        variables[DORA_CACHE] = _drop_leaves(variables[DORA_CACHE], NORM)
    trainable: dict[str, Any] = {}
    if DORA in variables:
        trainable[DORA] = variables.pop(DORA)
    if config is not None and config.modules_to_save and "params" in variables:
        saved, rest = _split_saved(variables["params"], config, ())
        if saved:
            trainable["params"] = saved
        variables["params"] = rest
    return trainable, variables


def combine(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`partition`."""
    variables = dict(frozen)
    for collection, tree in trainable.items():
        variables[collection] = _merge(variables.get(collection, {}), tree)
    return variables


def _split_saved(tree, config, path):
    saved, rest = {}, {}
    for key, value in tree.items():
        name = "/".join((*path, key))
        if isinstance(value, Mapping) and config.is_saved(name):
            saved[key] = value
        elif isinstance(value, Mapping):
            s, r = _split_saved(value, config, (*path, key))
            if s:
                saved[key] = s
            if r:
                rest[key] = r
        else:
            rest[key] = value
    return saved, rest


def _merge(a: Mapping, b: Mapping) -> dict:
    out = dict(a)
    for key, value in b.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merge(out[key], value) if both else value
    return out


def trainable_labels(variables: Mapping[str, Any], config: DoRAConfig | None = None) -> PyTree:
    """``"trainable"`` / ``"frozen"`` for every leaf of ``variables`` (for optax)."""
    trainable, frozen = partition(variables, config)
    labels = combine(
        jax.tree.map(lambda _: "trainable", trainable), jax.tree.map(lambda _: "frozen", frozen)
    )
    return labels


def freeze(
    optimizer: optax.GradientTransformation,
    variables: Mapping[str, Any],
    config: DoRAConfig | None = None,
) -> optax.GradientTransformation:
    """Wrap ``optimizer`` for the full variables tree so only trainable leaves move.

    Frozen leaves get ``optax.set_to_zero`` (no optimizer state), and anything chained
    inside ``optimizer`` (such as ``clip_by_global_norm``) sees only trainable leaves.
    """
    labels = trainable_labels(variables, config)
    return optax.multi_transform({"trainable": optimizer, "frozen": optax.set_to_zero()}, labels)


def adamw(
    learning_rate: float | optax.Schedule,
    *,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    **adamw_kwargs,
) -> optax.GradientTransformation:
    """AdamW for the adapters, with optional global-norm clipping first."""
    parts = [] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm)]
    parts.append(optax.adamw(learning_rate, weight_decay=weight_decay, **adamw_kwargs))
    return optax.chain(*parts)


def init_state(
    trainable: PyTree, optimizer: optax.GradientTransformation, rng: jax.Array | int = 0
) -> TrainState:
    """A fresh :class:`TrainState`: optimizer state for ``trainable`` only.

    ``trainable`` is copied (adapter-sized), so the step's buffer donation never
    invalidates the caller's variables.
    """
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    trainable = jax.tree.map(jnp.copy, trainable)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        opt_state=optimizer.init(trainable),
        rng=rng,
    )


Forward = Callable[[PyTree, PyTree, Any, jax.Array], Any]
LossFn = Callable[[Any, Any], jax.Array]


def linen_forward(
    model: Any, inputs: Callable[[Any], tuple] = lambda batch: (batch["inputs"],), **apply_kwargs
) -> Forward:
    """``(trainable, frozen, batch, rng) -> output`` for a Linen model or wrapped model.

    ``inputs`` picks the model's positional arguments out of a batch; the rng feeds the
    ``"dropout"`` stream.
    """

    def forward(trainable, frozen, batch, rng):
        variables = combine(trainable, frozen)
        return model.apply(variables, *inputs(batch), rngs={"dropout": rng}, **apply_kwargs)

    return forward


def nnx_forward(
    graphdef: Any, inputs: Callable[[Any], tuple] = lambda batch: (batch["inputs"],)
) -> Forward:
    """``(trainable, frozen, batch, rng) -> output`` for an NNX model split as
    ``graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)``."""
    from flax import nnx

    def forward(trainable, frozen, batch, rng):
        model = nnx.merge(graphdef, trainable, frozen)
        # The frozen tree holds the rng streams' counters, which a step does not update:
        # reseed the dropout stream from the step's key so that every step draws anew.
        nnx.reseed(model, dropout=rng)
        return model(*inputs(batch))

    return forward


def make_train_step(
    forward: Forward,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    accumulation_steps: int = 1,
    learning_rate: float | optax.Schedule | None = None,
    axis_name: str | None = None,
) -> Callable[[TrainState, PyTree, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """The training step ``(state, frozen, batch) -> (state, metrics)``, not yet compiled.

    Compile it with :func:`jit_step` (one device, or a mesh) or :func:`pmap_step`.

    Args:
      forward: runs the model, e.g. :func:`linen_forward` or :func:`nnx_forward`.
      loss_fn: ``(output, batch) -> scalar``; a mean over the batch, so data-parallel
        and accumulated steps equal one step on the whole batch.
      optimizer: for the trainable tree only (e.g. :func:`adamw`).
      accumulation_steps: split the batch's leading axis into this many micro-batches
        and average their gradients before one update.
      learning_rate: reported in the metrics (a float or the optimizer's schedule).
      axis_name: the ``pmap`` axis to average gradients over.
    Returns:
      ``step``; ``metrics`` has ``loss``, ``grad_norm`` and ``learning_rate``.
    """
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1; got {accumulation_steps}.")

    def loss_of(trainable, frozen, batch, rng):
        return loss_fn(forward(trainable, frozen, batch, rng), batch)

    grad_fn = jax.value_and_grad(loss_of)

    def step(state: TrainState, frozen: PyTree, batch: Any):
        rng = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        if accumulation_steps == 1:
            loss, grads = grad_fn(state.trainable, frozen, batch, rng)
        else:
            micro = jax.tree.map(_split_leading(accumulation_steps), batch)

            def accumulate(carry, xs):
                index, micro_batch = xs
                loss, grads = grad_fn(
                    state.trainable, frozen, micro_batch, jax.random.fold_in(rng, index)
                )
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.trainable))
            (loss, grads), _ = jax.lax.scan(
                accumulate, zeros, (jnp.arange(accumulation_steps), micro)
            )
            loss, grads = jax.tree.map(lambda x: x / accumulation_steps, (loss, grads))
        if axis_name is not None:
            loss, grads = jax.lax.pmean((loss, grads), axis_name)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": _learning_rate(learning_rate, state.step),
        }
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new_state, metrics

    return step


def cast_frozen(frozen: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
    """The frozen base in ``dtype`` (e.g. ``jnp.bfloat16``) for low-precision compute.

    Cast once, before training: every step then reads the base in ``dtype`` while the
    adapters (and ``g``) stay float32. The ``dora_cache`` norms stay float32.
    """
    return {
        collection: tree
        if collection == DORA_CACHE
        else jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
        )
        for collection, tree in frozen.items()
    }


def _split_leading(k: int):
    def split(x):
        if x.shape[0] % k:
            raise ValueError(
                f"a batch leaf of shape {x.shape} does not split into {k} micro-batches."
            )
        return x.reshape(k, x.shape[0] // k, *x.shape[1:])

    return split


def _learning_rate(learning_rate, step) -> jax.Array:
    if learning_rate is None:
        return jnp.asarray(jnp.nan, jnp.float32)
    if callable(learning_rate):
        return jnp.asarray(learning_rate(step), jnp.float32)
    return jnp.asarray(learning_rate, jnp.float32)


def jit_step(
    step, *, mesh: Mesh | None = None, frozen_sharding: PyTree = None, data_axes=("data",)
):
    """Compile ``step`` with ``jax.jit``, donating the state's buffers.

    With a ``mesh``, the state is replicated, the batch's leading axis is sharded over
    ``data_axes`` and the frozen tree follows ``frozen_sharding`` (see
    :func:`fsdp_sharding`; replicated if ``None``).
    """
    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P(data_axes))
    return jax.jit(
        step,
        in_shardings=(replicated, frozen_sharding or replicated, batch),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )


def pmap_step(step_fn_builder: Callable[[str], Callable], axis_name: str = "data"):
    """``jax.pmap`` of a step made with ``axis_name`` (gradients averaged by ``pmean``).

    ``step_fn_builder(axis_name)`` returns the step, e.g.
    ``lambda axis: make_train_step(..., axis_name=axis)``. Inputs carry a leading device
    axis: replicate the state and frozen tree (``jax.device_put_replicated``) and
    reshape the batch to ``(devices, per_device, ...)``.
    """
    return jax.pmap(step_fn_builder(axis_name), axis_name=axis_name, donate_argnums=(0,))


def fsdp_sharding(frozen: PyTree, mesh: Mesh, axis: str = "fsdp", min_size: int = 2**14) -> PyTree:
    """Shardings that split each large frozen array over the mesh axis ``axis``.

    Each array of at least ``min_size`` elements is split along its largest dimension
    divisible by the axis size; smaller ones are replicated. XLA then gathers each
    layer's weights only where that layer runs.
    """
    n = mesh.shape[axis]

    def sharding(x):
        dims = [d for d in np.argsort(x.shape)[::-1] if x.shape[d] % n == 0]
        if x.size < min_size or not dims:
            return NamedSharding(mesh, P())
        spec = [None] * x.ndim
        spec[dims[0]] = axis
        return NamedSharding(mesh, P(*spec))

    return jax.tree.map(sharding, frozen)


def global_batch(batch: PyTree, mesh: Mesh, data_axes=("data",)) -> PyTree:
    """Assemble this process's share of a batch into global arrays sharded over ``data_axes``.

    On one host this is ``device_put``; with several processes each passes its own
    rows and gets the global batch (``jax.make_array_from_process_local_data``).
    """
    sharding = NamedSharding(mesh, P(data_axes))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def fit(
    step: Callable,
    state: TrainState,
    frozen: PyTree,
    batches: Iterable[Any],
    *,
    num_steps: int,
    evaluate: Callable[[TrainState], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    log_path: str | None = None,
    progress: bool = True,
) -> TrainState:
    """A thin training loop: progress bar, periodic evaluation, JSON-lines metrics.

    Each logged line is ``{"step", "time", <metrics>}``; evaluation lines add
    ``"eval_<name>"`` keys. Users with their own loop only need the step.
    """
    from tqdm.auto import tqdm

    log = open(log_path, "a") if log_path else None  # noqa: SIM115
    start = time.perf_counter()
    # disable=None: a bar on terminals only, so logs stay readable.
    bar = tqdm(total=num_steps, disable=None if progress else True, dynamic_ncols=True)
    try:
        iterator = iter(batches)
        for _ in range(num_steps):
            state, metrics = step(state, frozen, next(iterator))
            record = {k: float(np.mean(jax.device_get(v))) for k, v in metrics.items()}
            step_index = int(np.max(jax.device_get(state.step)))
            record = {"step": step_index, "time": time.perf_counter() - start, **record}
            if evaluate is not None and eval_every and step_index % eval_every == 0:
                record.update({f"eval_{k}": float(v) for k, v in evaluate(state).items()})
                if progress:
                    shown = {k: round(v, 4) for k, v in record.items() if k != "time"}
                    tqdm.write(" ".join(f"{k} {v}" for k, v in shown.items()))
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            bar.update(1)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return state


def tree_size(tree: PyTree) -> int:
    """Total number of elements in a pytree's arrays."""
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(tree))
