"""DoRA in an unmodified Flax NNX model, from pretraining to a saved PEFT adapter.

Run: ``python examples/nnx_finetune.py`` (about 10 seconds on 2 cores; needs
``safetensors``, part of the ``examples`` extra).

1. An ordinary NNX classifier (``nnx.Linear`` layers, no DoRA anywhere in its code) is
   trained in full on a task: 8 classes of generated 32-d data, labelled by a random
   teacher network.
2. :func:`dora_jax.nnx.apply_dora` adapts its hidden layers in place and marks the head
   as a saved module; ``nnx.LoRAParam`` now selects exactly what trains.
3. DoRA fine-tunes the model to a second task (the same inputs, another teacher), with
   ``nnx.Optimizer(..., wrt=nnx.LoRAParam)``: the pretrained kernels never change.
4. The adapter is written as a PEFT folder (``adapter_model.safetensors`` and
   ``adapter_config.json``), loaded into a fresh copy of the pretrained model, and both
   that copy and the model merged into plain ``nnx.Linear`` layers predict exactly what
   the fine-tuned model predicts.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dora_jax
from dora_jax import peft as dora_peft

FEATURES, CLASSES, HIDDEN = 32, 8, 128


class Classifier(nnx.Module):
    """A plain NNX MLP: what a user already has."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.List(
            [nnx.Linear(FEATURES, HIDDEN, rngs=rngs), nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)]
        )
        self.head = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

    def __call__(self, x):
        for layer in self.hidden:
            x = nnx.gelu(layer(x))
        return self.head(x)


def make_task(seed: int, x: jax.Array) -> jax.Array:
    """Labels of ``x`` by a random teacher network: the argmax of its logits."""
    teacher = Classifier(nnx.Rngs(seed))
    return jnp.argmax(teacher(3.0 * x), axis=-1)


def accuracy(model, x, labels) -> float:
    return float(jnp.mean(jnp.argmax(model(x), axis=-1) == labels))


def fit(model, x, labels, steps: int, learning_rate: float, wrt) -> None:
    """Full-batch AdamW steps on the variables ``wrt`` selects; the rest stays frozen."""
    optimizer = nnx.Optimizer(model, optax.adamw(learning_rate), wrt=wrt)

    @nnx.jit
    def step(model, optimizer, x, labels):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)

    for _ in range(steps):
        step(model, optimizer, x, labels)


def pretrained(x, labels, steps: int) -> Classifier:
    model = Classifier(nnx.Rngs(0))
    fit(model, x, labels, steps, 3e-3, wrt=nnx.Param)
    return model


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--examples", type=int, default=2048)
    args = parser.parse_args(argv)

    x = jax.random.normal(jax.random.key(0), (2 * args.examples, FEATURES))
    train, test = x[: args.examples], x[args.examples :]
    task_a, task_b = make_task(1, x), make_task(2, x)
    n = args.examples

    model = pretrained(train, task_a[:n], args.pretrain_steps)
    pretrained_state = nnx.state(model)  # to rebuild the pretrained model later
    print(f"pretrained on task A: test accuracy {accuracy(model, test, task_a[n:]):.3f}")

    config = dora_jax.DoRAConfig(
        targets=r"hidden/\d+", rank=8, alpha=16.0, modules_to_save=["head"]
    )
    dora_jax.nnx.apply_dora(model, config, rngs=nnx.Rngs(1))
    # ||W0||^2 of the frozen kernels, computed once instead of every step; it belongs to
    # these kernels (call again if they change).
    dora_jax.nnx.cache_base_norms(model)
    print(dora_jax.nnx.summary(model))
    before = accuracy(model, test, task_b[n:])
    kernels = [np.asarray(layer.kernel[...]) for layer in model.hidden]
    fit(model, train, task_b[:n], args.steps, 3e-3, wrt=nnx.LoRAParam)
    after = accuracy(model, test, task_b[n:])
    print(f"DoRA on task B: test accuracy {before:.3f} -> {after:.3f} after {args.steps} steps")
    for kernel, layer in zip(kernels, model.hidden, strict=True):
        np.testing.assert_array_equal(kernel, np.asarray(layer.kernel[...]))  # W0 frozen

    predictions = jnp.argmax(model(test), axis=-1)
    with tempfile.TemporaryDirectory() as folder:
        dora_peft.save_pretrained(folder, model, config)
        fresh = Classifier(nnx.Rngs(0))
        nnx.update(fresh, pretrained_state)
        dora_jax.nnx.apply_dora(fresh, dora_peft.load_config(folder), rngs=nnx.Rngs(2))
        dora_peft.load_pretrained(folder, fresh)
    reloaded = float(jnp.mean(jnp.argmax(fresh(test), axis=-1) == predictions))
    merged = dora_jax.nnx.merge_adapters(model)
    assert all(type(layer) is nnx.Linear for layer in merged.hidden)
    same_merged = float(jnp.mean(jnp.argmax(merged(test), axis=-1) == predictions))
    print(
        f"PEFT adapter reloaded into the pretrained model: {reloaded:.3f} of predictions "
        f"equal; merged into plain nnx.Linear layers: {same_merged:.3f} equal"
    )
    return {"before": before, "after": after, "reloaded": reloaded, "merged": same_merged}


if __name__ == "__main__":
    main()
