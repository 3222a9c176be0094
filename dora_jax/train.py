"""Training with a frozen base: partition, optimizer masking, and one jit-compiled step.

The variables split into two trees::

    trainable = {"dora": adapters, "params": modules_to_save params}   differentiated
    frozen    = everything else (the base W0, biases, dora_cache ...)  not differentiated

``dora_cache`` holds each layer's ``||W0||_c^2`` when :func:`dora_jax.linen.cache_base_norms`
made it (call it after loading the pretrained params and before :func:`partition`); it
saves squaring the frozen kernels every step and stays in ``frozen``. Without it the
step computes the same norms from the kernels.

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

from dora_jax.adapters import DORA, DORA_CACHE, INFERENCE_NORM, drop_leaves
from dora_jax.config import DoRAConfig

PyTree = Any
# Leaf suffixes of a weight ``w``'s adapters made by a qwix provider (dora_jax.qwix's
# DoraProvider, qwix's LoraProvider): they live in "params" beside ``w``.
PROVIDER_ADAPTER_SUFFIXES = ("_lora_a", "_lora_b", "_dora_magnitude")
_NEVER = np.iinfo(np.int32).max  # apply_if_finite's counter is an int32


class NonFiniteError(FloatingPointError):
    """A training step produced a NaN or Inf metric (raised by :func:`fit`).

    Attributes:
      step: the step number (``state.step`` after the failing step).
      metrics: that step's metrics, as floats.
      state: the state before the failing step (``None`` when the step donated it).
    """

    def __init__(self, message: str, *, step: int, metrics: dict[str, float], state: Any):
        super().__init__(message)
        self.step, self.metrics, self.state = step, metrics, state


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
    that ``config.modules_to_save`` names and the adapters a qwix provider put beside
    their weight ``w`` (``w_lora_a``, ``w_lora_b``, ``w_dora_magnitude``:
    :mod:`dora_jax.qwix`); ``frozen`` holds everything else, less any inference-only norm
    cache (:func:`dora_jax.linen.cache_norms`). :func:`combine` is the inverse.
    """
    variables = dict(variables)
    if DORA_CACHE in variables:  # a cached whole norm is for inference only
        variables[DORA_CACHE] = drop_leaves(variables[DORA_CACHE], INFERENCE_NORM)
    trainable: dict[str, Any] = {}
    if DORA in variables:
        trainable[DORA] = variables.pop(DORA)
    if config is not None and config.modules_to_save and "params" in variables:
        saved, rest = _split_saved(variables["params"], config, ())
        if saved:
            trainable["params"] = saved
        variables["params"] = rest
    if "params" in variables:
        adapters, rest = _split_provider_adapters(variables["params"])
        if adapters:
            trainable["params"] = _merge(trainable.get("params", {}), adapters)
            variables["params"] = rest
    return trainable, variables


def _split_provider_adapters(tree: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(adapters, rest)``: the leaves ``w<suffix>`` beside a weight ``w``, at any depth."""
    adapters, rest = {}, {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            a, r = _split_provider_adapters(value)
            if a:
                adapters[key] = a
            if r or not a:
                rest[key] = r
        elif any(
            key.endswith(suffix) and key[: -len(suffix)] in tree
            for suffix in PROVIDER_ADAPTER_SUFFIXES
        ):
            adapters[key] = value
        else:
            rest[key] = value
    return adapters, rest


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
    skip_nonfinite: bool = False,
    **adamw_kwargs,
) -> optax.GradientTransformation:
    """AdamW for the adapters, with optional global-norm clipping first.

    The learning rate (a float or an ``optax`` schedule) is held in the optimizer state
    (``optax.inject_hyperparams``), so :func:`make_train_step` reports the rate each step
    applied without being given the schedule.

    Args:
      learning_rate: a float or a schedule ``step -> rate``.
      weight_decay: AdamW's decoupled weight decay.
      max_grad_norm: clip the gradients to this global norm first (``None``: no clipping).
      skip_nonfinite: wrap everything in ``optax.apply_if_finite``: an update whose
        gradients hold a NaN or an Inf (one bad batch) is skipped, leaving the
        trainable tree and the optimizer state exactly as they were; the step counter
        still advances and the step's ``skipped`` metric is 1. Without it, one such
        batch makes every adapter and every AdamW moment NaN for good.
      **adamw_kwargs: passed to ``optax.adamw`` (``b1``, ``b2``, ``eps``, ...).
    """

    def make(learning_rate):
        parts = [] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm)]
        parts.append(optax.adamw(learning_rate, weight_decay=weight_decay, **adamw_kwargs))
        return optax.chain(*parts)

    optimizer = optax.inject_hyperparams(make)(learning_rate=learning_rate)
    if skip_nonfinite:
        # Never give up skipping: optax's "accept after n failures" would let NaN in.
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=_NEVER)
    return optimizer


def init_state(
    trainable: PyTree, optimizer: optax.GradientTransformation, rng: jax.Array | int = 0
) -> TrainState:
    """A fresh :class:`TrainState`: optimizer state for ``trainable`` only.

    ``trainable`` is copied (adapter-sized), so a donating step (``jit_step(...,
    donate=True)``) never invalidates the caller's variables.
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
      learning_rate: the rate to report in the metrics (a float or the optimizer's
        schedule). Not needed for optimizers that hold their rate in their state
        (:func:`adamw`, or any ``optax.inject_hyperparams`` optimizer): the rate is read
        from there. When neither gives it, the metrics have no ``learning_rate``.
      axis_name: the ``pmap`` axis to average gradients over.
    Returns:
      ``step``; ``metrics`` has ``loss`` and ``grad_norm`` (of this step's gradients,
      before clipping), ``learning_rate`` (the rate this step applied) where known, and
      ``skipped`` (1 when the optimizer skipped a non-finite update, 0 otherwise) for
      optimizers wrapped in ``optax.apply_if_finite`` (``adamw(skip_nonfinite=True)``).
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
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        rate = _learning_rate(learning_rate, state.step, opt_state)
        if rate is not None:
            metrics["learning_rate"] = rate
        guards = _states_of(opt_state, optax.ApplyIfFiniteState)
        if guards:
            metrics["skipped"] = jnp.logical_not(guards[0].last_finite).astype(jnp.float32)
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


def _learning_rate(learning_rate, step, opt_state) -> jax.Array | None:
    """The rate applied at ``step``: as given, else from the optimizer state, else None."""
    if callable(learning_rate):
        return jnp.asarray(learning_rate(step), jnp.float32)
    if learning_rate is not None:
        return jnp.asarray(learning_rate, jnp.float32)
    for injected in _states_of(
        opt_state, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
    ):
        # After the update, ``hyperparams`` holds the values this update used.
        if "learning_rate" in injected.hyperparams:
            return jnp.asarray(injected.hyperparams["learning_rate"], jnp.float32)
    return None


def _states_of(opt_state: PyTree, kind) -> list:
    """The optimizer states of type ``kind`` nested anywhere in ``opt_state``, outer first."""
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kind))
    return [x for x in nodes if isinstance(x, kind)]


def jit_step(
    step,
    *,
    donate: bool = False,
    mesh: Mesh | None = None,
    frozen_sharding: PyTree = None,
    data_axes=("data",),
):
    """Compile ``step`` with ``jax.jit``.

    ``donate=True`` lets XLA reuse the input state's buffers for the new state (the
    adapters and optimizer moments are not held twice): the memory option. The state
    passed in is then deleted by the step, and touching it afterwards raises JAX's
    "Array has been deleted" error; keep only the returned state. The default keeps the
    input state usable.

    With a ``mesh``, the state is replicated, the batch's leading axis is sharded over
    ``data_axes`` and the frozen tree follows ``frozen_sharding`` (see
    :func:`fsdp_sharding`; replicated if ``None``).
    """
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P(data_axes))
    return jax.jit(
        step,
        in_shardings=(replicated, frozen_sharding or replicated, batch),
        out_shardings=(replicated, replicated),
        donate_argnums=donate_argnums,
    )


def pmap_step(
    step_fn_builder: Callable[[str], Callable], axis_name: str = "data", *, donate: bool = False
):
    """``jax.pmap`` of a step made with ``axis_name`` (gradients averaged by ``pmean``).

    ``step_fn_builder(axis_name)`` returns the step, e.g.
    ``lambda axis: make_train_step(..., axis_name=axis)``. Inputs carry a leading device
    axis: replicate the state and frozen tree (each leaf ``jnp.broadcast_to`` shape
    ``(devices, *shape)``) and reshape the batch to ``(devices, per_device, ...)``.
    ``donate`` as in :func:`jit_step`.
    """
    donate_argnums = (0,) if donate else ()
    return jax.pmap(step_fn_builder(axis_name), axis_name=axis_name, donate_argnums=donate_argnums)


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
    on_nonfinite: str = "raise",
    checkpoints: Any = None,
    save_every: int | None = None,
) -> TrainState:
    """A thin training loop: progress bar, evaluation, JSON-lines metrics, checkpoints.

    Each step takes the next batch of ``batches`` (one batch per step). Each logged line
    is strict JSON, ``{"step", "time", <metrics>}``, with a NaN or Inf metric written as
    ``null``; evaluation lines add ``"eval_<name>"`` keys. Users with their own loop
    only need the step.

    Args:
      step: a compiled step, ``(state, frozen, batch) -> (state, metrics)``.
      state: the state to start from (see :func:`init_state`).
      frozen: the frozen tree passed to every step.
      batches: an iterable of batches; iterated once, from its start.
      num_steps: train until ``state.step`` reaches this; a resumed run does the rest.
      evaluate: ``state -> {name: value}``, run every ``eval_every`` steps.
      log_path: append the JSON lines to this file. A resumed run appends too: steps
        done after the last checkpoint before a crash appear twice, the later line
        being the one the final state comes from.
      progress: show a progress bar (on terminals).
      on_nonfinite: what a step with a NaN or Inf metric does. ``"raise"`` (default):
        stop with :class:`NonFiniteError`, naming the step and the metrics, unless the
        optimizer skipped that update (``adamw(skip_nonfinite=True)``: the state is
        intact), which only warns. ``"warn"``: warn (``RuntimeWarning``) and go on.
      checkpoints: a :class:`dora_jax.checkpoint.AdapterCheckpoints`. When it holds a
        checkpoint, training resumes from the latest one: its state is restored and
        the batches it had consumed (its recorded data position) are skipped, so an
        interrupted run resumed over the same batches ends as if never stopped. The
        state is saved with its data position every ``save_every`` steps and at the end.
      save_every: steps between saves (needs ``checkpoints``).
    Returns:
      the final state.
    Raises:
      NonFiniteError: see ``on_nonfinite``.
      ValueError: ``batches`` ran out before ``num_steps``.
    """
    from tqdm.auto import tqdm

    if on_nonfinite not in ("raise", "warn"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'warn'; got {on_nonfinite!r}.")
    if save_every is not None and (checkpoints is None or save_every < 1):
        raise ValueError(
            f"save_every={save_every!r} needs a positive number of steps and checkpoints=."
        )
    iterator = iter(batches)
    position = 0  # batches consumed from the start of `batches`
    if checkpoints is not None and checkpoints.latest_step() is not None:
        latest = checkpoints.latest_step()
        state = checkpoints.restore(state, latest)
        recorded = checkpoints.data_position(latest)
        # A checkpoint saved without a position: one batch per step, fit's own contract.
        position = _step_of(state) if recorded is None else int(recorded)
        for skipped in range(position):
            if next(iterator, _END) is _END:
                raise ValueError(
                    f"resuming from the checkpoint of step {latest} in "
                    f"{getattr(checkpoints, 'directory', checkpoints)} needs to skip the "
                    f"{position} batches it had consumed, but `batches` ran out after "
                    f"{skipped}; pass the same batches as the interrupted run."
                )
    first = _step_of(state)
    saved_step = first if checkpoints is not None else None
    log = open(log_path, "a") if log_path else None  # noqa: SIM115
    start = time.perf_counter()
    # disable=None: a bar on terminals only, so logs stay readable.
    bar = tqdm(
        total=num_steps,
        initial=min(first, num_steps),
        disable=None if progress else True,
        dynamic_ncols=True,
    )
    try:
        for _ in range(max(num_steps - first, 0)):
            batch = next(iterator, _END)
            if batch is _END:
                raise ValueError(
                    f"`batches` ran out after {position} batches, at step {_step_of(state)} "
                    f"of num_steps={num_steps}."
                )
            previous = state
            state, metrics = step(state, frozen, batch)
            position += 1
            record = {k: float(np.mean(jax.device_get(v))) for k, v in metrics.items()}
            step_index = _step_of(state)
            record = {"step": step_index, "time": time.perf_counter() - start, **record}
            if evaluate is not None and eval_every and step_index % eval_every == 0:
                record.update({f"eval_{k}": float(v) for k, v in evaluate(state).items()})
                if progress:
                    # 4 significant digits: a learning rate of 5e-05 must not read 0.0
                    shown = [f"{k} {v:.4g}" for k, v in record.items() if k != "time"]
                    tqdm.write(" ".join(shown))
            if log is not None:
                log.write(_json_line(record) + "\n")
                log.flush()
            bad = {k: record[k] for k in metrics if not math.isfinite(record[k])}
            if bad:
                _nonfinite(on_nonfinite, step_index, position, record, bad, previous, state)
            if save_every and step_index % save_every == 0:
                checkpoints.save(state, data_position=position)
                saved_step = step_index
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            bar.update(1)
        if checkpoints is not None and saved_step != _step_of(state):
            checkpoints.save(state, data_position=position)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return state


_END = object()


def _step_of(state: TrainState) -> int:
    return int(np.max(jax.device_get(state.step)))  # pmap states hold one per device


def _json_line(record: Mapping[str, float]) -> str:
    """Strict JSON: NaN and Inf, which JSON cannot hold, are written as ``null``."""
    finite = {k: None if _nonfinite_float(v) else v for k, v in record.items()}
    return json.dumps(finite, allow_nan=False)


def _nonfinite_float(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _nonfinite(mode, step_index, position, record, bad, previous, state) -> None:
    """Raise or warn for a step whose metrics hold NaN or Inf (see :func:`fit`)."""
    import warnings

    named = ", ".join(f"{k} = {v}" for k, v in bad.items())
    where = f"step {step_index} (batch {position - 1} of `batches`): non-finite {named}"
    if record.get("skipped") == 1.0:
        warnings.warn(
            f"{where}; the optimizer skipped this update, so the adapters and optimizer "
            "state are unchanged.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    leaves = jax.tree.leaves(state.trainable)
    broken = sum(not np.all(np.isfinite(np.asarray(x))) for x in leaves)
    if broken:
        effect = f"{broken} of {len(leaves)} trainable leaves are now non-finite"
    else:
        effect = "the trainable leaves are still finite"
    message = (
        f"{where}; {effect}. Check that batch, lower the learning rate, or train with "
        "train.adamw(..., skip_nonfinite=True) to skip such updates."
    )
    if mode == "warn":
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return
    donated = any(
        getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(previous.trainable)
    )
    kept = None if donated else previous
    raise NonFiniteError(
        message + " (fit(..., on_nonfinite='warn') goes on regardless; this error's "
        "`.state` is the state before the step.)",
        step=step_index,
        metrics=record,
        state=kept,
    )


def tree_size(tree: PyTree) -> int:
    """Total number of elements in a pytree's arrays."""
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(tree))
