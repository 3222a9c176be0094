"""Training-step time of full fine-tuning, LoRA and DoRA on a BERT encoder of MiniLM size.

Run: ``python benchmarks/train_step.py`` (a few minutes on a 2-core CPU).

The model is ``examples/bert.py``'s BERT at all-MiniLM-L6-v2's size (6 layers, hidden
384, 12 heads, vocabulary 30522) with a mean-pooled two-class head, sequence length 128,
random weights (speed does not depend on their values). Each variant is one
jit-compiled AdamW step of :mod:`dora_jax.train` with donated state:

* ``full``: every parameter trained;
* ``lora`` and ``dora``: ``dora_jax.linen.wrap`` on every encoder ``Dense`` (query, key,
  value, the attention output, intermediate and output), rank 16, with the new head in
  ``modules_to_save``; ``lora`` is the same wrapper with ``use_dora=False``.

Step times are medians over interleaved rounds (each round runs every variant a few
steps, rotating the order), so background load affects all alike; ratios come from the
same run. Memory is XLA's ``memory_analysis()`` of the compiled step.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import harness
import jax
import jax.numpy as jnp
import optax

import dora_jax
from dora_jax import train

bert = harness.load_example("bert")
Bert, BertConfig, mean_pool = bert.Bert, bert.BertConfig, bert.mean_pool

TARGETS = ".*encoder/layer_[0-9]+/(attention/self/(query|key|value)|.*dense)"


class Classifier(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        hidden = Bert(self.config, name="bert")(input_ids, attention_mask)
        return nn.Dense(2, name="classifier")(mean_pool(hidden, attention_mask))


def cross_entropy(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def inputs(batch):
    return batch["input_ids"], batch["attention_mask"]


def build(variant: str, model: Classifier, params, batch, rank: int):
    """``(compiled step, state, frozen, trainable size)`` for one variant."""
    optimizer = optax.adamw(1e-4)
    if variant == "full":

        def forward(trainable, frozen, batch, rng):
            return model.apply(trainable, *inputs(batch))

        trainable, frozen = {"params": params}, {}
    else:
        config = dora_jax.DoRAConfig(
            targets=TARGETS,
            rank=rank,
            alpha=2.0 * rank,
            use_dora=variant == "dora",
            modules_to_save=["classifier"],
        )
        wrapped = dora_jax.linen.wrap(model, config)
        variables = wrapped.init_from_params(jax.random.key(1), params, *inputs(batch))
        # The cached ||W0||_c^2 (only DoRA layers have one), made from the final params.
        variables = dora_jax.linen.cache_base_norms(wrapped, variables, *inputs(batch))
        trainable, frozen = train.partition(variables, config)
        forward = train.linen_forward(wrapped, inputs)
    step = train.jit_step(train.make_train_step(forward, cross_entropy, optimizer), donate=True)
    state = train.init_state(trainable, optimizer)
    compiled = step.lower(state, frozen, batch).compile()
    return compiled, state, frozen, train.tree_size(trainable)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    args = parser.parse_args(argv)
    print(harness.banner("jax", "flax", "optax"))
    config = BertConfig()
    model = Classifier(config)
    key_ids, key_labels = jax.random.split(jax.random.key(0))
    batch = {
        "input_ids": jax.random.randint(key_ids, (args.batch, args.seq), 0, config.vocab_size),
        "attention_mask": jnp.ones((args.batch, args.seq), jnp.int32),
        "labels": jax.random.randint(key_labels, (args.batch,), 0, 2),
    }
    params = model.init(jax.random.key(2), *inputs(batch))["params"]
    variants = ("full", "lora", "dora")
    runs = {
        name: Step(name, *build(name, model, params, batch, args.rank), batch) for name in variants
    }
    start = time.perf_counter()
    harness.interleave(list(runs.values()), args.repeats, args.steps)
    wall = time.perf_counter() - start
    median = {name: r.median_ms() for name, r in runs.items()}
    tokens = args.batch * args.seq
    print(
        f"\nBERT (MiniLM size), batch {args.batch} x seq {args.seq} = {tokens} tokens, "
        f"rank {args.rank}, float32, AdamW; medians of {args.repeats * args.steps} steps "
        f"in {args.repeats} interleaved rounds ({wall:.0f} s)\n"
    )
    head = ["variant", "trainable params", "step ms", "/ LoRA", "/ full", "XLA temp MiB"]
    head.append("XLA output MiB")
    rows = [
        [name, f"{r.size:,}", f"{median[name]:.1f}", f"{median[name] / median['lora']:.3f}"]
        + [f"{median[name] / median['full']:.3f}", f"{r.temp / 2**20:.1f}", f"{r.out / 2**20:.1f}"]
        for name, r in runs.items()
    ]
    print(harness.table(head, rows))


class Step(harness.Timed):
    """A compiled training step of :mod:`dora_jax.train` and its rolling state."""

    def __init__(self, name, compiled, state, frozen, size, batch):
        super().__init__(name)
        self.compiled, self.state, self.frozen = compiled, state, frozen
        self.size, self.batch = size, batch
        memory = compiled.memory_analysis()
        self.temp, self.out = memory.temp_size_in_bytes, memory.output_size_in_bytes

    def step(self):
        self.state, metrics = self.compiled(self.state, self.frozen, self.batch)
        return jax.block_until_ready(metrics)


if __name__ == "__main__":
    main()
