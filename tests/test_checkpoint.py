"""Adapter-only Orbax checkpoints: resuming gives the adapters of never stopping, bit for bit.

The reference is the same training run without interruption; the checkpoint must hold
no frozen base weights.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from dora_jax import train
from dora_jax.checkpoint import AdapterCheckpoints


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(jnp.tanh(nn.Dense(16, name="fc")(x)))


def _setup():
    model, x = MLP(), jax.random.normal(jax.random.key(0), (8, 6))
    config = dora_jax.DoRAConfig(targets=["fc"], rank=2, dropout=0.1, modules_to_save=["head"])
    wrapped = dora_jax.linen.wrap(model, config)
    params = model.init(jax.random.key(1), x)["params"]
    variables = wrapped.init_from_params(jax.random.key(2), params, x)
    trainable, frozen = train.partition(variables, config)
    optimizer = train.adamw(1e-2, weight_decay=0.01, max_grad_norm=1.0)
    step = train.jit_step(
        train.make_train_step(
            train.linen_forward(wrapped),
            lambda out, batch: jnp.mean((out - batch["targets"]) ** 2),
            optimizer,
        )
    )
    batches = [{"inputs": x + 0.1 * i, "targets": jnp.full((8, 3), 0.1 * i)} for i in range(6)]
    return trainable, frozen, optimizer, step, batches


def test_resume_equals_uninterrupted_training(tmp_path):
    trainable, frozen, optimizer, step, batches = _setup()
    state = train.init_state(trainable, optimizer, rng=7)
    for batch in batches:
        state, _ = step(state, frozen, batch)
    uninterrupted = jax.device_get(state.trainable)

    state = train.init_state(trainable, optimizer, rng=7)
    with AdapterCheckpoints(tmp_path, keep=2) as checkpoints:
        for batch in batches[:3]:
            state, _ = step(state, frozen, batch)
            checkpoints.save(state)
        assert checkpoints.latest_step() == 3
        fresh = train.init_state(trainable, optimizer, rng=0)  # another rng: restored too
        resumed = checkpoints.restore(fresh)
    assert int(resumed.step) == 3
    for batch in batches[3:]:
        resumed, _ = step(resumed, frozen, batch)
    for got, want in zip(
        jax.tree.leaves(jax.device_get(resumed.trainable)),
        jax.tree.leaves(uninterrupted),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3]


def test_checkpoint_holds_only_trainable_state(tmp_path):
    trainable, frozen, optimizer, _, _ = _setup()
    state = train.init_state(trainable, optimizer)
    with AdapterCheckpoints(tmp_path) as checkpoints:
        checkpoints.save(state)
    stored = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    frozen_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(frozen))
    trainable_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(trainable))
    assert trainable_bytes * 3 < stored < trainable_bytes * 3 + frozen_bytes + 64 * 1024
    with AdapterCheckpoints(tmp_path) as checkpoints, pytest.raises(FileNotFoundError):
        checkpoints.restore(state, step=99)
