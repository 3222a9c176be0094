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
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from bert import Bert, BertConfig, mean_pool  # noqa: E402

import dora_jax  # noqa: E402
from dora_jax import train  # noqa: E402

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
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
        f"backend {jax.default_backend()}, {cpus} CPUs, Python {platform.python_version()}"
    )
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
    runs = {}
    for name in variants:
        compiled, state, frozen, size = build(name, model, params, batch, args.rank)
        runs[name] = {"compiled": compiled, "state": state, "frozen": frozen, "size": size}
        runs[name]["times"] = []
        memory = compiled.memory_analysis()
        runs[name]["temp"] = memory.temp_size_in_bytes
        runs[name]["out"] = memory.output_size_in_bytes

    def run(name, steps, record=True):
        r = runs[name]
        for _ in range(steps):
            start = time.perf_counter()
            r["state"], metrics = r["compiled"](r["state"], r["frozen"], batch)
            jax.block_until_ready(metrics)
            if record:
                r["times"].append(time.perf_counter() - start)

    for name in variants:
        run(name, 2, record=False)  # warm up
    start = time.perf_counter()
    for round_index in range(args.repeats):
        order = variants[round_index % 3 :] + variants[: round_index % 3]
        for name in order:
            run(name, args.steps)
    wall = time.perf_counter() - start
    median = {name: 1e3 * statistics.median(r["times"]) for name, r in runs.items()}
    tokens = args.batch * args.seq
    print(
        f"\nBERT (MiniLM size), batch {args.batch} x seq {args.seq} = {tokens} tokens, "
        f"rank {args.rank}, float32, AdamW; medians of {args.repeats * args.steps} steps "
        f"in {args.repeats} interleaved rounds ({wall:.0f} s)\n"
    )
    header = (
        "| variant | trainable params | step ms | / LoRA | / full | XLA temp MiB | XLA output MiB |"
    )
    print(header)
    print("|" + " --- |" * 7)
    for name in variants:
        r = runs[name]
        print(
            f"| {name} | {r['size']:,} | {median[name]:.1f} | "
            f"{median[name] / median['lora']:.3f} | {median[name] / median['full']:.3f} | "
            f"{r['temp'] / 2**20:.1f} | {r['out'] / 2**20:.1f} |"
        )


if __name__ == "__main__":
    main()
