"""Inference cost: merged DoRA, unmerged DoRA with cached norms, unmerged LoRA, the base.

Run: ``python benchmarks/inference.py`` (about a minute on a 2-core CPU).

A stack of square layers ``x -> tanh(layer(x))`` (float32, rank 16) is wrapped with
:func:`dora_jax.linen.wrap` on every layer; each variant is one jit-compiled forward pass:

* ``base``: the unwrapped model on its own params;
* ``merged``: the unwrapped model on :func:`dora_jax.linen.merge_params` (the same
  compiled program as ``base``, checked by comparing the lowered HLO text);
* ``lora``: the wrapped model with ``use_dora=False``, unmerged;
* ``dora-cached``: the wrapped DoRA model, unmerged, after
  :func:`dora_jax.linen.cache_norms` (only an ``(out,)`` norm per layer is stored);
* ``dora``: the same without the cached norm (computes ``A^T W0`` every call).

Medians over interleaved rounds; ratios are against unmerged LoRA from the same run.
"""

from __future__ import annotations

import argparse
import functools

import flax.linen as nn
import harness
import jax
import jax.numpy as jnp

import dora_jax

SHAPES = ((1024, 4, 512), (2048, 4, 256), (4096, 2, 128))
RANK = 16


class Stack(nn.Module):
    width: int
    layers: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = jnp.tanh(nn.Dense(self.width, name=f"layer_{i}")(x))
        return x


def variants(width: int, layers: int, tokens: int):
    """``{name: (compiled forward, variables)}`` for one shape."""
    model = Stack(width, layers)
    x = jax.random.normal(jax.random.key(0), (tokens, width))
    params = model.init(jax.random.key(1), x)["params"]
    out = {"base": (model, {"params": params})}
    for use_dora in (False, True):
        config = dora_jax.DoRAConfig(targets=".*layer_[0-9]+", rank=RANK, use_dora=use_dora)
        wrapped = dora_jax.linen.wrap(model, config)
        variables = wrapped.init_from_params(jax.random.key(2), params, x)
        # The cached ||W0||_c^2 (only DoRA layers have one), made from the final params.
        variables = dora_jax.linen.cache_base_norms(wrapped, variables, x)
        leaves, treedef = jax.tree.flatten(variables["dora"])
        keys = jax.random.split(jax.random.key(3), len(leaves))
        noisy = [
            a + 0.02 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)
        ]
        variables["dora"] = jax.tree.unflatten(treedef, noisy)
        if use_dora:
            out["dora"] = (wrapped, variables)
            out["dora-cached"] = (wrapped, dora_jax.linen.cache_norms(wrapped, variables, x))
            merged = dora_jax.linen.merge_params(wrapped, variables, x)
            out["merged"] = (model, {"params": merged})
        else:
            out["lora"] = (wrapped, variables)
    compiled = {
        name: (jax.jit(module.apply).lower(v, x).compile(), v) for name, (module, v) in out.items()
    }
    same = (
        jax.jit(model.apply).lower(out["merged"][1], x).as_text()
        == jax.jit(model.apply).lower(out["base"][1], x).as_text()
    )
    return compiled, x, same


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=5, help="calls per variant per round")
    args = parser.parse_args(argv)
    print(harness.banner("jax", "flax", load=True))
    names = ("base", "merged", "lora", "dora-cached", "dora")
    rows = []
    for width, layers, tokens in SHAPES:
        compiled, x, same = variants(width, layers, tokens)
        timers = [
            harness.Timed(name, functools.partial(_forward, *compiled[name], x)) for name in names
        ]
        harness.interleave(timers, args.repeats, args.steps, warmup=1)
        m = {timer.name: timer.median_ms() for timer in timers}
        row = [width, layers, tokens, f"{m['base']:.2f}", f"{m['merged']:.2f}"]
        row += [f"{m['merged'] / m['base']:.3f}", "yes" if same else "NO", f"{m['lora']:.2f}"]
        row += [f"{m['dora-cached']:.2f}", f"{m['dora-cached'] / m['lora']:.3f}"]
        rows.append(row + [f"{m['dora']:.2f}", f"{m['dora'] / m['lora']:.3f}"])
    head = ["width", "layers", "tokens", "base ms", "merged ms", "merged / base"]
    head += ["same program", "LoRA ms", "DoRA cached ms", "DoRA cached / LoRA", "DoRA ms"]
    print("\n" + harness.table(head + ["DoRA / LoRA"], rows))


def _forward(fn, variables, x):
    return jax.block_until_ready(fn(variables, x))


if __name__ == "__main__":
    main()
