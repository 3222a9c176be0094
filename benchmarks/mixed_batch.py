"""Many DoRA adapters in one batch: the cost of a mixed batch against one adapter.

Run: ``python benchmarks/mixed_batch.py`` (about five minutes on a 2-core CPU).

A transformer-ish Linen stack (pre-norm blocks of ``DenseGeneral`` query/key/value/out
attention and a ``Dense`` MLP, float32) with DoRA (rank 16) on every projection,
:func:`dora_jax.linen.wrap` ped. For each batch shape (examples x tokens per example)
every variant is one jit-compiled forward pass of the same inputs:

* ``base``: the unwrapped model;
* ``one adapter``: one unmerged adapter with cached norms
  (:func:`dora_jax.linen.cache_norms`) on the whole batch;
* ``mixed gather`` / ``mixed mask``: ``K = 8`` adapters stacked with
  :func:`dora_jax.linen.stack_adapters`, example ``i`` through adapter ``i % K``, the
  low-rank products gathered per example or masked over all adapters
  (:func:`dora_jax.ops.stacked_adapter_forward`); ``mixed auto`` the default choice;
* ``K groups``: the same batch as ``K`` calls of the one-adapter program, one per
  group of examples sharing an adapter (the way to serve ``K`` adapters without a
  mixed batch).

Medians over interleaved rounds; throughput ratios are paired per round. Memory is
XLA's own account of each compiled program (``compiled.memory_analysis()``): arguments
(weights, adapters, inputs) and temporaries.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import flax.linen as nn
import harness
import jax
import jax.numpy as jnp
import numpy as np

import dora_jax

RANK, K = 16, 8
# About 200 MB of float32 weights: more than the CPU's caches, as a served model is, and
# each rank-16 adapter 1.2% of them (a K-adapter batch must read K adapters).
WIDTH, HEADS, MLP, LAYERS = 2048, 16, 8192, 1
SHAPES = ((8, 1), (32, 1), (16, 4), (8, 16))  # (examples, tokens per example)
TARGETS = ["query", "key", "value", "out", "up", "down"]


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        head_dim = WIDTH // HEADS
        h = nn.LayerNorm(name="attention_norm")(x)
        q, k, v = (nn.DenseGeneral((HEADS, head_dim), name=n)(h) for n in TARGETS[:3])
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / head_dim**0.5)
        o = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        x = x + nn.DenseGeneral(WIDTH, axis=(-2, -1), name="out")(o)
        h = nn.LayerNorm(name="mlp_norm")(x)
        return x + nn.Dense(WIDTH, name="down")(nn.gelu(nn.Dense(MLP, name="up")(h)))


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(LAYERS):
            x = Block(name=f"block_{i}")(x)
        return x


def trained(wrapped, params, x, seed):
    """Variables with trained-looking adapters, drawn with NumPy (shapes by tracing):
    small factors, magnitudes within 50% of one."""
    dora = jax.eval_shape(lambda p: wrapped.init_from_params(jax.random.key(0), p, x), params)
    rng = np.random.default_rng(seed)
    draw = {
        "lora_a": lambda shape: 0.05 * rng.standard_normal(shape),
        "lora_b": lambda shape: 0.05 * rng.standard_normal(shape),
        "magnitude": lambda shape: rng.uniform(0.5, 1.5, shape),
    }
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(draw[path[-1].key](leaf.shape), jnp.float32),
        dora["dora"],
    )
    return {"params": params, "dora": adapters}


def compiled(fn, *args):
    """``(executable, memory row)`` of ``jax.jit(fn)`` for ``args``."""
    executable = jax.jit(fn).lower(*args).compile()
    memory = executable.memory_analysis()
    mb = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    return executable, [mb(memory.argument_size_in_bytes), mb(memory.temp_size_in_bytes)]


def variants(examples: int, tokens: int):
    """``{name: (step, memory row)}`` and the largest difference of the mixed batch from
    the groups run one by one."""
    model = Stack()
    x = jax.random.normal(jax.random.key(0), (examples, tokens, WIDTH))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    wrapped = dora_jax.linen.wrap(model, dora_jax.DoRAConfig(targets=TARGETS, rank=RANK))
    adapters = [trained(wrapped, params, x, seed) for seed in range(K)]
    stacked, stacked_vars = dora_jax.linen.stack_adapters(wrapped, adapters, x)
    cached = [dora_jax.linen.cache_norms(wrapped, v, x) for v in adapters]
    ids = jnp.arange(examples) % K
    groups = [np.flatnonzero(np.asarray(ids) == k) for k in range(K)]
    x_groups = [x[g] for g in groups]

    base, base_mem = compiled(model.apply, {"params": params}, x)
    one, one_mem = compiled(wrapped.apply, cached[0], x)
    group, group_mem = compiled(wrapped.apply, cached[0], x_groups[0])
    out = {
        "base": (lambda: base({"params": params}, x), base_mem),
        "one adapter": (lambda: one(cached[0], x), one_mem),
    }
    for routing in ("gather", "mask", None):
        mixed = dataclasses.replace(stacked, routing=routing)
        run, mem = compiled(functools.partial(mixed.apply, adapter_ids=ids), stacked_vars, x)
        out[f"mixed {routing or 'auto'}"] = (functools.partial(run, stacked_vars, x), mem)

    def by_groups():
        return [group(cached[k], x_groups[k]) for k in range(K)]

    out["K groups"] = (by_groups, [f"{K} x {group_mem[0]}", f"{K} x {group_mem[1]}"])
    y = out["mixed auto"][0]()
    y_groups = np.concatenate([np.asarray(v) for v in by_groups()])
    order = np.concatenate(groups)
    error = float(np.max(np.abs(np.asarray(y)[order] - y_groups)) / np.max(np.abs(y_groups)))
    return out, error


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=2, help="calls per variant per round")
    args = parser.parse_args(argv)
    print(harness.banner("jax", "flax", load=True))
    print(
        f"\n{LAYERS} blocks, width {WIDTH}, {HEADS} heads, MLP {MLP}; DoRA rank {RANK} on "
        f"{', '.join(TARGETS)}; K = {K} adapters; times in ms per batch."
    )
    names = ("base", "one adapter", "mixed gather", "mixed mask", "mixed auto", "K groups")
    rows, memory_rows = [], []
    for examples, tokens in SHAPES:
        out, error = variants(examples, tokens)
        timers = [harness.Timed(n, functools.partial(_block, out[n][0])) for n in names]
        harness.interleave(timers, args.repeats, args.steps, warmup=1)
        by = {t.name: t for t in timers}
        row = [examples, tokens] + [f"{by[n].median_ms():.2f}" for n in names]
        row += [f"{harness.paired_ratio(by['one adapter'], by['mixed auto']):.2f}"]
        row += [f"{harness.paired_ratio(by['K groups'], by['mixed auto']):.2f}"]
        rows.append(row + [f"{error:.1e}"])
        memory_rows.append([examples, tokens] + [" / ".join(out[n][1]) for n in names])
    head = ["examples", "tokens each"] + [f"{n} ms" for n in names]
    head += ["mixed auto vs one adapter (throughput)", "mixed auto vs K groups (throughput)"]
    print("\n" + harness.table(head + ["mixed vs groups, max rel. diff"], rows))
    print("\nMemory (MiB, arguments / temporaries, from compiled.memory_analysis()):\n")
    print(harness.table(["examples", "tokens each", *names], memory_rows))


def _block(step):
    return jax.block_until_ready(step())


if __name__ == "__main__":
    main()
