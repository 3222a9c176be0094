"""Adapter-only Orbax checkpoints that resume training exactly.

A checkpoint holds a :class:`~dora_jax.train.TrainState`: the step, the trainable tree
(adapters and ``modules_to_save``), its optimizer state and the rng key; never the
frozen base, which the user loads from the pretrained checkpoint as before. Restoring
into a state of the same structure and continuing gives the same adapters, bit for bit,
as never stopping.

>>> import tempfile, jax.numpy as jnp, optax
>>> from dora_jax import train
>>> state = train.init_state({"dora": {"lora_b": jnp.zeros((2, 3))}}, optax.adam(1e-3))
>>> with AdapterCheckpoints(tempfile.mkdtemp()) as checkpoints:
...     _ = checkpoints.save(state)
...     restored = checkpoints.restore(state)
>>> int(restored.step)
0
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from dora_jax.train import TrainState


class AdapterCheckpoints:
    """A folder of adapter-only checkpoints, one per saved step, the newest ``keep`` kept.

    Args:
      directory: where the checkpoints live (created if missing).
      keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, directory: str | Path, keep: int = 3):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def save(self, state: TrainState, *, force: bool = False) -> bool:
        """Save ``state`` under its step; returns whether a checkpoint was written."""
        step = int(jax.device_get(state.step).max())
        saved = self.manager.save(step, args=ocp.args.StandardSave(_plain(state)), force=force)
        self.manager.wait_until_finished()
        return saved

    def restore(self, like: TrainState, step: int | None = None) -> TrainState:
        """The state saved at ``step`` (default: the latest), shaped like ``like``.

        Raises:
          FileNotFoundError: when the folder holds no checkpoint (or not that step).
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise FileNotFoundError(
                f"no adapter checkpoint for step {step} in {self.manager.directory} "
                f"(steps there: {list(self.manager.all_steps())})."
            )
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _plain(like))
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        return like.replace(
            step=restored["step"],
            trainable=restored["trainable"],
            opt_state=restored["opt_state"],
            rng=jax.random.wrap_key_data(restored["rng"], impl=jax.random.key_impl(like.rng)),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> AdapterCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain(state: TrainState) -> dict:
    """The state as a tree of plain arrays (typed rng keys become their raw data)."""
    return {
        "step": state.step,
        "trainable": state.trainable,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng),
    }
