"""A checkpoint writer in its own process, for the lock and SIGKILL tests.

    python tests/checkpoint_worker.py hold DIR   save step 1, print "ready", then wait
    python tests/checkpoint_worker.py loop DIR   save steps 1, 2, 3, ... printing "saved k"

The state saved at step ``k`` holds the value ``k`` in every adapter entry, so the test
can check what a restored step holds.
"""

import sys
import time

import jax.numpy as jnp
import optax

from dora_jax import train
from dora_jax.checkpoint import AdapterCheckpoints


def state_at(step: int) -> train.TrainState:
    """A small state whose adapters all hold ``step``."""
    value = float(step)
    trainable = {
        "dora": {
            "fc": {
                "lora_a": jnp.full((64, 8), value),
                "lora_b": jnp.full((8, 64), value),
                "magnitude": jnp.full((64,), value),
            }
        }
    }
    state = train.init_state(trainable, optax.sgd(0.1), rng=step)
    return state.replace(step=jnp.asarray(step, jnp.int32))


def main(mode: str, directory: str) -> None:
    checkpoints = AdapterCheckpoints(directory, keep=2)
    if mode == "hold":
        checkpoints.save(state_at(1))
        print("ready", flush=True)
        time.sleep(600)
    elif mode == "loop":
        for step in range(1, 10_000):
            checkpoints.save(state_at(step))
            print(f"saved {step}", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
