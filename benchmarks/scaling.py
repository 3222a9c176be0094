"""How DoRA's training-step overhead over LoRA scales with width, tokens and rank.

Run: ``python benchmarks/scaling.py`` (a few minutes on a 2-core CPU);
``--sweeps width,tokens,rank`` picks sweeps, ``--repeats`` / ``--steps`` the effort,
``--widths`` / ``--tokens`` / ``--ranks`` the values, ``--markdown PATH`` saves the tables.

The model is step_time.py's: a stack of ``--layers`` (default 1) square
``dora_jax.DoRADense`` layers, ``x -> tanh(layer(x))``, loss ``mean(y ** 2)``, float32.
Each variant is one jit-compiled AdamW step whose gradient is taken only with respect to
the ``"dora"`` collection (frozen ``"params"`` and ``"dora_cache"`` are ordinary
arguments), with the trainable and optimizer state donated; LoRA is the same layer with
``use_dora=False``. Three sweeps, each varying one parameter from the base point
(width 2048, 256 tokens, rank 16):

* width: 512, 1024, 2048, 4096, 8192 (256 tokens, rank 16);
* tokens: 16, 64, 256, 1024, 4096 (width 2048, rank 16);
* rank: 4, 16, 64, 256 (width 2048, 256 tokens).

Times are medians over interleaved rounds (each round runs LoRA and DoRA a few steps,
alternating which goes first, so background load hits both alike; enough steps per
round to last ``--min-round-ms``); ``paired`` is the median over rounds of the ratio of
the two rounds' medians, ``CPU ratio`` the ratio of median process CPU time per step
(all threads; much less sensitive than wall time to other processes). Temp memory is XLA's
``compile().memory_analysis().temp_size_in_bytes``, exact and repeatable. A
(width, tokens, rank) point shared by several sweeps is measured once.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import NamedTuple

import harness
import jax
import jax.numpy as jnp
import optax
from step_time import MLP, CompiledStep

import dora_jax

ALPHA = 16.0
BASE = {"width": 2048, "tokens": 256, "rank": 16}
SWEEPS = {
    "width": (512, 1024, 2048, 4096, 8192),
    "tokens": (16, 64, 256, 1024, 4096),
    "rank": (4, 16, 64, 256),
}

COST_MODEL = """\
Cost model (docs/design.md section 3). Per layer with a D x D kernel and N tokens, LoRA's big
products are the forward x @ W0 (2*N*D*D flops) and, for every layer but the first (whose
input needs no gradient), the input gradient dy @ W0^T (the same); the frozen kernel gets
no weight gradient. Exact DoRA adds one A^T @ W0 per layer (2*r*D*D) for the column norm,
and nothing else of that size (||W0||_c^2 is cached, the norm is detached). So for L
layers DoRA/LoRA >= 1 + L*r/((2L-1)*N): 1 + r/N for one layer, 1 + r/(2N) for a deep
stack; the rank-r products and elementwise work, shared by both, are not counted, so
ratios near 1 + r/(2N) are reached only when the D*D products dominate. Memory: DoRA
keeps one more N x D float32 activation per layer (x@W0 + s*(x@A)@B, needed for the
magnitude's gradient), L*N*D*4 bytes more temp than LoRA, plus a few r x D float32
terms of the norm (A^T W0, (A^T A) B), visible only when r is not small against N; no
D x D temporary."""


def runner(use_dora: bool, width: int, layers: int, rank: int, x) -> CompiledStep:
    """One variant's compiled step and its (donated, rolling) state."""
    model = MLP(width, layers, use_dora=use_dora, rank=rank)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    if use_dora:  # the cached ||W0||_c^2 (LoRA has no norm)
        variables = dora_jax.linen.cache_base_norms(model, variables, x)
    frozen = {k: v for k, v in variables.items() if k != "dora"}
    name = "dora" if use_dora else "lora"
    return CompiledStep(name, model.apply, frozen, variables["dora"], x, optax.adamw(1e-4))


class Point(NamedTuple):
    width: int
    tokens: int
    rank: int
    lora_ms: float
    dora_ms: float
    paired: float
    cpu_ratio: float
    lora_temp: int
    dora_temp: int
    steps: int  # per variant, in all rounds
    seconds: float


def measure(width, tokens, rank, layers, repeats, steps, min_round_ms) -> Point:
    start = time.perf_counter()
    x = jax.random.normal(jax.random.key(1), (tokens, width), jnp.float32)
    lora = runner(False, width, layers, rank, x)
    dora = runner(True, width, layers, rank, x)
    lora.run(1, record=False)
    dora.run(1, record=False)
    estimate = min(lora.run(1, record=False)[0][0], dora.run(1, record=False)[0][0])
    per_round = max(steps, min(50, math.ceil(min_round_ms / 1e3 / max(estimate, 1e-6))))
    for _, timed in harness.rotations((lora, dora), repeats):
        timed.run(per_round)
    losses = float(lora.last), float(dora.last)
    if not all(map(math.isfinite, losses)):
        raise AssertionError(f"non-finite loss: LoRA {losses[0]}, DoRA {losses[1]}")
    return Point(
        width=width,
        tokens=tokens,
        rank=rank,
        lora_ms=lora.median_ms(),
        dora_ms=dora.median_ms(),
        paired=harness.paired_ratio(dora, lora),
        cpu_ratio=dora.cpu_ms() / lora.cpu_ms(),
        lora_temp=lora.temp_bytes,
        dora_temp=dora.temp_bytes,
        steps=repeats * per_round,
        seconds=time.perf_counter() - start,
    )


def predicted_ratio(layers: int, tokens: int, rank: int) -> float:
    return 1 + layers * rank / ((2 * layers - 1) * tokens)


def build_table(sweep: str, points: list[Point], layers: int) -> str:
    model = "1 + r/N" if layers == 1 else "1 + L*r/((2L-1)*N)"
    head = [sweep, "LoRA ms", "DoRA ms", "DoRA/LoRA", "paired", "CPU ratio", model]
    head += ["LoRA temp MiB", "DoRA temp MiB", "DoRA - LoRA MiB", "L*N*out*4 B MiB", "steps"]
    rows = []
    for p in points:
        row = [getattr(p, sweep), f"{p.lora_ms:.2f}", f"{p.dora_ms:.2f}"]
        row += [f"{p.dora_ms / p.lora_ms:.3f}", f"{p.paired:.3f}", f"{p.cpu_ratio:.3f}"]
        row += [f"{predicted_ratio(layers, p.tokens, p.rank):.3f}"]
        row += [f"{p.lora_temp / 2**20:.2f}", f"{p.dora_temp / 2**20:.2f}"]
        row += [f"{(p.dora_temp - p.lora_temp) / 2**20:.2f}"]
        row += [f"{layers * p.tokens * p.width * 4 / 2**20:.2f}", p.steps]
        rows.append(row)
    return harness.table(head, rows)


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sweeps",
        default=",".join(SWEEPS),
        help="comma-separated, from width, tokens, rank (default: all)",
    )
    parser.add_argument("--widths", type=int_list, default=SWEEPS["width"])
    parser.add_argument("--tokens", type=int_list, default=SWEEPS["tokens"])
    parser.add_argument("--ranks", type=int_list, default=SWEEPS["rank"])
    parser.add_argument(
        "--base",
        type=int_list,
        default=(BASE["width"], BASE["tokens"], BASE["rank"]),
        help="WIDTH,TOKENS,RANK held fixed while another one varies (default: 2048,256,16)",
    )
    parser.add_argument("--layers", type=int, default=1, help="stack depth (default: 1)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="interleaved rounds (default: %(default)s)"
    )
    parser.add_argument(
        "--steps", type=int, default=2, help="min. steps per variant per round (%(default)s)"
    )
    parser.add_argument(
        "--min-round-ms",
        type=float,
        default=150.0,
        help="more steps per round for fast points, up to 50 (default: %(default)s)",
    )
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args(argv)
    sweeps = [s.strip() for s in args.sweeps.split(",") if s.strip()]
    unknown = set(sweeps) - set(SWEEPS)
    if unknown:
        parser.error(f"unknown sweeps {sorted(unknown)}; choose from {', '.join(SWEEPS)}")
    values = {"width": args.widths, "tokens": args.tokens, "rank": args.ranks}
    base = dict(zip(("width", "tokens", "rank"), args.base, strict=True))

    print(harness.banner("jax", "flax", "optax", load=True))
    print(
        f"float32, {args.layers} layer(s), alpha {ALPHA:g}, AdamW; {args.repeats} interleaved "
        f"rounds of >= {args.steps} steps per variant\n"
    )
    print(COST_MODEL + "\n", flush=True)
    start = time.perf_counter()
    cache: dict[tuple[int, int, int], Point] = {}
    tables = []
    for sweep in sweeps:
        points = []
        for value in values[sweep]:
            setting = {**base, sweep: value}
            key = (setting["width"], setting["tokens"], setting["rank"])
            if key not in cache:
                cache[key] = measure(*key, args.layers, args.repeats, args.steps, args.min_round_ms)
                p = cache[key]
                print(
                    f"  width {p.width}, tokens {p.tokens}, rank {p.rank}: LoRA "
                    f"{p.lora_ms:.2f} ms, DoRA {p.dora_ms:.2f} ms ({p.seconds:.0f} s)",
                    flush=True,
                )
            points.append(cache[key])
        fixed = ", ".join(f"{k} {v}" for k, v in base.items() if k != sweep)
        title = f"Varying {sweep} ({fixed}, {args.layers} layer(s)):"
        tables.append(title + "\n\n" + build_table(sweep, points, args.layers))
    print(f"\nload average at end: {harness.load_average()}\n")
    print("\n\n".join(tables))
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(COST_MODEL + "\n\n" + "\n\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
