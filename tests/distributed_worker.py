"""Worker for the multi-device and multi-process training tests (run as a script).

``python tests/distributed_worker.py devices OUT``: 8 forced CPU devices; trains 5 steps
single-device, with pmap, jit over a data mesh and jit over an fsdp x data mesh, and
saves each run's final adapters to ``OUT`` (npz).

``python tests/distributed_worker.py process I N PORT OUT``: process ``I`` of ``N`` (2
CPU devices each) joins ``jax.distributed`` on localhost and trains 3 steps over a mesh
of all processes' devices; process 0 saves the final adapters.
"""

import os
import sys


def _setup(devices: int) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def problem():
    """A small MLP wrapped with DoRA, its trainable/frozen split, optimizer and batches."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import dora_jax
    from dora_jax import train

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jnp.tanh(nn.Dense(64, name="fc1")(x))
            x = jnp.tanh(nn.Dense(64, name="fc2")(x))
            return nn.Dense(4, name="head")(x)

    model = MLP()
    x = jax.random.normal(jax.random.key(0), (32, 64))
    targets = jax.random.normal(jax.random.key(1), (32, 4))
    config = dora_jax.DoRAConfig(targets=["fc1", "fc2"], rank=4, modules_to_save=["head"])
    wrapped = dora_jax.linen.wrap(model, config)
    params = model.init(jax.random.key(3), x)["params"]
    variables = wrapped.init_from_params(jax.random.key(2), params, x)
    trainable, frozen = train.partition(variables, config)
    optimizer = train.adamw(1e-2, max_grad_norm=1.0)
    batches = [{"inputs": x + 0.1 * i, "targets": targets} for i in range(5)]

    def make_step(axis_name=None):
        return train.make_train_step(
            train.linen_forward(wrapped),
            lambda out, batch: jnp.mean((out - batch["targets"]) ** 2),
            optimizer,
            axis_name=axis_name,
        )

    return trainable, frozen, optimizer, batches, make_step


def _run(step, state, frozen, batches, prepare):
    for batch in batches:
        state, _ = step(state, frozen, prepare(batch))
    return state


def _flat(tree) -> dict:
    import jax
    import numpy as np

    return {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def devices_main(out: str) -> None:
    _setup(8)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from dora_jax import train

    trainable, frozen, optimizer, batches, make_step = problem()
    n = jax.device_count()
    fresh = lambda: train.init_state(trainable, optimizer)  # noqa: E731
    results = {"single": _run(train.jit_step(make_step()), fresh(), frozen, batches, lambda b: b)}

    replicate = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), t)  # noqa: E731
    per_device = lambda b: jax.tree.map(lambda a: a.reshape(n, -1, *a.shape[1:]), b)  # noqa: E731
    state = _run(
        train.pmap_step(make_step), replicate(fresh()), replicate(frozen), batches, per_device
    )
    results["pmap"] = jax.tree.map(lambda a: a[0], state)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    step = train.jit_step(make_step(), mesh=mesh)
    results["data_mesh"] = _run(
        step, fresh(), frozen, batches, lambda b: train.global_batch(b, mesh)
    )

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "data"))
    shardings = train.fsdp_sharding(frozen, mesh, min_size=1)
    axes = ("fsdp", "data")
    step = train.jit_step(make_step(), mesh=mesh, frozen_sharding=shardings, data_axes=axes)
    sharded = jax.device_put(frozen, shardings)
    results["fsdp_mesh"] = _run(
        step, fresh(), sharded, batches, lambda b: train.global_batch(b, mesh, axes)
    )
    arrays = fsdp_memory()
    for name, state in results.items():
        arrays.update({f"{name}{k}": v for k, v in _flat(state.trainable).items()})
    np.savez(out, **arrays)


def fsdp_memory() -> dict:
    """XLA's per-device memory of an FSDP step on 8 layers of 512 x 512 over 8 devices."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    import dora_jax
    from dora_jax import train

    class Deep(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(8):
                x = jnp.tanh(nn.Dense(512, name=f"fc{i}")(x))
            return x

    model, x = Deep(), jnp.ones((16, 512))
    config = dora_jax.DoRAConfig(targets=".*fc[0-9]", rank=4)
    wrapped = dora_jax.linen.wrap(model, config)
    params = model.init(jax.random.key(1), x)["params"]
    trainable, frozen = train.partition(wrapped.init_from_params(jax.random.key(0), params, x))
    optimizer = train.adamw(1e-3)
    mesh = Mesh(np.array(jax.devices()).reshape(8, 1), ("fsdp", "data"))
    shardings = train.fsdp_sharding(frozen, mesh)
    axes = ("fsdp", "data")
    step = train.jit_step(
        train.make_train_step(train.linen_forward(wrapped), lambda y, b: jnp.mean(y**2), optimizer),
        mesh=mesh,
        frozen_sharding=shardings,
        data_axes=axes,
    )
    state = train.init_state(trainable, optimizer)
    batch = train.global_batch({"inputs": x}, mesh, axes)
    memory = step.lower(state, jax.device_put(frozen, shardings), batch).compile().memory_analysis()
    return {
        "fsdp_argument_bytes": np.array(memory.argument_size_in_bytes),
        "fsdp_temp_bytes": np.array(memory.temp_size_in_bytes),
        "base_bytes": np.array(sum(a.nbytes for a in jax.tree.leaves(frozen))),
        "layer_bytes": np.array(params["fc0"]["kernel"].nbytes),
        "state_bytes": np.array(sum(a.nbytes for a in jax.tree.leaves(state))),
    }


def process_main(index: int, count: int, port: int, out: str) -> None:
    _setup(2)
    import jax
    import numpy as np
    from jax.sharding import Mesh

    jax.distributed.initialize(f"localhost:{port}", count, index)
    from dora_jax import train

    trainable, frozen, optimizer, batches, make_step = problem()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = len(batches[0]["inputs"]) // count
    local = lambda b: jax.tree.map(lambda a: a[index * rows : (index + 1) * rows], b)  # noqa: E731
    step = train.jit_step(make_step(), mesh=mesh)
    state = train.init_state(trainable, optimizer)
    state = _run(step, state, frozen, batches[:3], lambda b: train.global_batch(local(b), mesh))
    if index == 0:
        np.savez(out, **_flat(jax.device_get(state.trainable)))
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "devices":
        devices_main(args[0])
    else:
        process_main(int(args[0]), int(args[1]), int(args[2]), args[3])
