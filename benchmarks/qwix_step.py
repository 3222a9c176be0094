"""Training-step time of DoRA through qwix against qwix's own LoRA, on float, int8 and NF4 bases.

Run: ``python benchmarks/qwix_step.py`` (a few minutes on a 2-core CPU; needs qwix).

The model is ``examples/bert.py``'s BERT at all-MiniLM-L6-v2's width (hidden 384, 12
heads; ``--layers`` of them) with a mean-pooled two-class head, random weights (speed does
not depend on their values). Every encoder ``Dense`` (query, key, value, the attention
output, intermediate and output) is adapted at rank 16 through qwix's interception:

* ``lora``: ``qwix.LoraProvider`` (qwix's LoRA; QLoRA with a quantised base);
* ``dora``: :class:`dora_jax.qwix.DoraProvider` (QDoRA with a quantised base);

both with the same ``weight_qtype`` (``None``, ``int8``, ``nf4``), in one jit-compiled AdamW
step of :mod:`dora_jax.train` over the adapters (``train.partition``), state donated.
Step times are medians over interleaved rounds (each round runs every variant a few steps,
rotating the order), so background load affects all alike; ``DoRA / LoRA`` is the median
of the per-round ratios. Memory is XLA's ``memory_analysis()`` of the compiled step; base
MiB is the frozen encoder as stored (quantised values at their bit width, scales included;
the embedding tables are not quantised).
"""

from __future__ import annotations

import argparse
import time

import harness
import jax
import jax.numpy as jnp
import optax
import qwix
from train_step import TARGETS, BertConfig, Classifier, Step, cross_entropy, inputs

from dora_jax import qwix as dora_qwix
from dora_jax import train

BASES = {"float": None, "int8": "int8", "nf4": "nf4"}


def build(variant: str, qtype, model: Classifier, batch, rank: int):
    """``(compiled step, state, frozen, trainable size)`` and the base's stored bytes."""
    settings = dict(module_path=TARGETS, rank=rank, alpha=2.0 * rank, weight_qtype=qtype)
    if variant == "lora":
        provider = qwix.LoraProvider([qwix.LoraRule(**settings)])
    else:
        provider = dora_qwix.DoraProvider([dora_qwix.DoraRule(**settings)])
    adapted = qwix.apply_lora_to_model(model, provider)
    variables = jax.jit(adapted.init)(jax.random.key(1), *inputs(batch))
    trainable, frozen = train.partition(variables)
    optimizer = optax.adamw(1e-4)
    forward = train.linen_forward(adapted, inputs)
    step = train.jit_step(train.make_train_step(forward, cross_entropy, optimizer), donate=True)
    state = train.init_state(trainable, optimizer)
    compiled = step.lower(state, frozen, batch).compile()
    encoder = frozen["params"]["bert"]["encoder"]
    return (compiled, state, frozen, train.tree_size(trainable)), dora_qwix.weight_bytes(encoder)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--bases", default="float,int8,nf4", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=8, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    args = parser.parse_args(argv)
    print(harness.banner("jax", "flax", "qwix", load=True))
    config = BertConfig(num_layers=args.layers)
    model = Classifier(config)
    # Random token ids; the label of a row is the parity of one more id.
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1), 0, config.vocab_size)
    tokens = ids[:, :-1]
    batch = {"input_ids": tokens, "attention_mask": jnp.ones_like(tokens), "labels": ids[:, -1] % 2}
    runs, stored = {}, {}
    for base in args.bases.split(","):
        for variant in ("lora", "dora"):
            parts, stored[base, variant] = build(variant, BASES[base], model, batch, args.rank)
            runs[base, variant] = Step(f"{base} {variant}", *parts, batch)
    start = time.perf_counter()
    harness.interleave(list(runs.values()), args.repeats, args.steps)
    wall = time.perf_counter() - start
    print(
        f"\nBERT ({args.layers} layers of MiniLM's width), batch {args.batch} x seq {args.seq} "
        f"= {args.batch * args.seq} tokens, rank {args.rank}, every encoder Dense adapted "
        f"through qwix, "
        f"AdamW; medians of {args.repeats * args.steps} steps in {args.repeats} interleaved "
        f"rounds ({wall:.0f} s)\n"
    )
    head = ["base", "variant", "trainable params", "step ms", "DoRA / LoRA", "encoder MiB"]
    head += ["XLA temp MiB", "XLA argument MiB"]
    rows = []
    for (base, variant), run in runs.items():
        lora = runs[base, "lora"]
        ratio = harness.paired_ratio(run, lora) if variant == "dora" else 1.0
        memory = run.compiled.memory_analysis()
        rows.append(
            [base, variant, f"{run.size:,}", f"{run.median_ms():.1f}", f"{ratio:.3f}"]
            + [f"{stored[base, variant] / 2**20:.2f}", f"{run.temp / 2**20:.1f}"]
            + [f"{memory.argument_size_in_bytes / 2**20:.1f}"]
        )
    print(harness.table(head, rows))


if __name__ == "__main__":
    main()
