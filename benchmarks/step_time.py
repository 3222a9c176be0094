"""Training step time and XLA temp memory: DoRA against LoRA (and a materialised DoRA).

Run: ``python benchmarks/step_time.py`` (a few minutes on a 2-core CPU).

The model is a stack of square layers ``x -> tanh(layer(x))`` with the loss
``mean(y ** 2)``; every variant takes one jit-compiled AdamW step whose gradient is taken
only with respect to the trainable ``"dora"`` collection (the frozen ``"params"`` and the
``"dora_cache"`` are ordinary, non-differentiated arguments), and donates the trainable
state and the optimizer state. Variants:

* ``lora``: ``dora_jax.DoRADense(..., use_dora=False)``, the same code without magnitude;
* ``dora``: ``dora_jax.DoRADense(..., use_dora=True)``, the library's factored norm with
  the cached ``||W0||_c^2`` (made by ``dora_jax.linen.cache_base_norms``: ``init``
  makes none);
* ``materialised``: a reference written here that forms
  ``W' = m * (W0 + s*A@B) / stop_gradient(||W0 + s*A@B||_c)`` and computes ``x @ W'``,
  what a direct port of PEFT does.

Further variants, only with ``--variants``:

* ``dora-nocache``: the library layer without the ``"dora_cache"`` collection, so
  ``||W0||_c^2`` is recomputed every step;
* ``dora-stacked``: the library layer with ``stacking=ops.Stacking(constants=True)``:
  ``[x; A^T] @ W0`` stacked (:func:`dora_jax.ops.kernel_products`) wherever the
  backend's threshold allows, even when ``x`` and ``W0`` are both constants;
* ``magnitude-only``: a diagnostic, not DoRA: the magnitude scaling with the norm frozen
  at ``||W0||_c`` (no ``A^T @ W0``), i.e. what the magnitude's elementwise work and
  saved activation cost on their own, so the part of DoRA's overhead due to the norm is
  the difference to ``dora``.

``--patterns`` chooses how the step sees the frozen variables (default ``argument``; a
comma-separated list measures several side by side in one process, each with its own
tables, ratios against its own LoRA):

* ``argument``: the frozen ``"params"`` and ``"dora_cache"`` and the batch are arguments
  of the jitted step, as above;
* ``closure``: the loss function closes over the frozen variables (as the README's first
  Linen example does), so ``jit`` embeds them as compile-time constants; the batch is an
  argument;
* ``closure-batch``: the loss closes over the batch too (one fixed batch, as in that
  example): XLA then folds the first layer's ``x @ W0`` at compile time.

Variants for these comparisons (with ``--variants``): ``dora-nocache`` (with a
constant ``W0`` XLA folds ``||W0||_c^2`` at compile time, so the cache changes the step
nothing, only the compile time) and ``dora-stacked`` (stacking keeps XLA from folding
``x @ W0`` when the batch is a constant too).

Step times are medians over interleaved rounds (every round runs each variant a few
steps, in a rotating order, so background load hits all of them alike). A second table
gives, per variant, the fastest step, the median over rounds of the ratio to LoRA in the
same round (paired), and the ratio of median process CPU time per step, which is far
less sensitive than wall time to other processes competing for the cores. Temp memory is
``compiled.memory_analysis().temp_size_in_bytes``, exact and repeatable.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dora_jax
from dora_jax import ops

SHAPES = ((1024, 4, 512), (2048, 4, 256), (4096, 2, 128))
RANK = 16
ALPHA = 16.0
MAIN_VARIANTS = ("lora", "dora", "materialised")
EXTRA_VARIANTS = ("dora-nocache", "magnitude-only", "dora-stacked")
# What the jitted step takes as arguments; the rest its loss function closes over.
PATTERNS = {
    "argument": "the frozen variables and the batch are arguments of the jitted step",
    "closure": "the loss closes over the frozen variables (compile-time constants)",
    "closure-batch": "the loss closes over the frozen variables and the batch",
}


class MLP(nn.Module):
    """``layers`` square ``DoRADense`` layers, each followed by ``tanh``.

    Shared by the benchmarks. ``B`` starts at N(0, 0.02) rather than 0, so that checks
    against references exercise ``A`` too; values do not change the timing.
    """

    width: int
    layers: int
    use_dora: bool = True
    rank: int = RANK
    dtype: Any = jnp.float32  # of the base weights and the computation
    stacking: ops.Stacking = ops.Stacking()

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            layer = dora_jax.DoRADense(
                self.width,
                rank=self.rank,
                alpha=ALPHA,
                use_dora=self.use_dora,
                lora_b_init=nn.initializers.normal(0.02),
                dtype=self.dtype,
                param_dtype=self.dtype,
                stacking=self.stacking,
                name=f"layer_{i}",
            )
            x = jnp.tanh(layer(x))
        return x


# ----- reference and prototype layers: functions of one layer's variables ---------------


def materialised_layer(x, params, dora, cache):
    """A direct port of PEFT: form ``W'`` and multiply by it."""
    del cache
    scale = ops.scaling(RANK, ALPHA)
    direction = params["kernel"] + scale * dora["lora_a"] @ dora["lora_b"]
    norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(direction * direction, axis=0)))
    return x @ (dora["magnitude"] * direction / norm) + params["bias"]


def magnitude_only_layer(x, params, dora, cache):
    """Not DoRA: the factored norm without its ``A^T W0`` term (detached), so the
    magnitude's elementwise work and saved activation are timed on their own."""
    scale = ops.scaling(RANK, ALPHA)
    a, b, m = dora["lora_a"], dora["lora_b"], dora["magnitude"]
    quad = jnp.sum(b * ((a.T @ a) @ b), axis=0)
    norm = ops.safe_sqrt(cache["base_norm_sq"] + scale * scale * quad)
    g = m / jax.lax.stop_gradient(norm)
    return g * (x @ params["kernel"] + scale * ((x @ a) @ b)) + params["bias"]


def functional_mlp(layer_fn):
    def apply(variables, x):
        layers = sorted(variables["params"], key=lambda name: int(name.split("_")[-1]))
        cache = variables.get("dora_cache", {})
        for name in layers:
            x = jnp.tanh(
                layer_fn(x, variables["params"][name], variables["dora"][name], cache.get(name))
            )
        return x

    return apply


# ----- variants ----------------------------------------------------------------------


def make_variant(name: str, width: int, layers: int, x):
    """``(apply, frozen, trainable)`` with ``apply(variables, x) -> y``."""
    use_dora = name != "lora"
    # dora-stacked: stack even with x and W0 both constants (closure-batch).
    stacking = ops.Stacking(constants=name == "dora-stacked")
    model = MLP(width, layers, use_dora=use_dora, dtype=x.dtype, stacking=stacking)
    variables = model.init(jax.random.key(0), x)
    frozen = {"params": variables["params"]}
    if name in ("dora", "magnitude-only", "dora-stacked"):
        cached = dora_jax.linen.cache_base_norms(model, variables, x)
        frozen["dora_cache"] = cached["dora_cache"]
    applies = {
        "lora": model.apply,
        "dora": model.apply,
        "dora-nocache": model.apply,
        "dora-stacked": model.apply,
        "materialised": functional_mlp(materialised_layer),
        "magnitude-only": functional_mlp(magnitude_only_layer),
    }
    return applies[name], frozen, variables["dora"]


def make_step(apply: Callable, optimizer: optax.GradientTransformation, closed_over=None):
    """``(step, loss_fn)``: ``step(trainable, opt_state, frozen, x)``, jitted, donating
    the trainable and optimizer state; ``loss_fn(trainable, frozen, x)``.

    ``closed_over`` (a dict with ``"frozen"`` and optionally ``"x"``): values the loss
    uses instead of the arguments of those names, so ``jit`` embeds them as constants
    (and drops the unused arguments).
    """
    closed_over = dict(closed_over or {})

    def loss_fn(trainable, frozen, x):
        frozen = closed_over.get("frozen", frozen)
        x = closed_over.get("x", x)
        return jnp.mean(jnp.square(apply({**frozen, "dora": trainable}, x).astype(jnp.float32)))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, frozen, x):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step, loss_fn


class CompiledStep(harness.Timed):
    """A jit-compiled training step of :func:`make_step` and its (donated, rolling) state."""

    def __init__(
        self, name: str, apply: Callable, frozen, trainable, x, optimizer, pattern="argument"
    ):
        super().__init__(name)
        self.frozen, self.x = frozen, x
        closed_over = {
            "argument": {},
            "closure": {"frozen": frozen},
            "closure-batch": {"frozen": frozen, "x": x},
        }[pattern]
        step, self.loss_fn = make_step(apply, optimizer, closed_over)
        self.initial = trainable
        # Copies: the step donates its inputs.
        self.trainable = jax.tree.map(jnp.copy, trainable)
        self.opt_state = optimizer.init(self.trainable)
        t0 = time.perf_counter()
        self.compiled = step.lower(self.trainable, self.opt_state, self.frozen, x).compile()
        self.compile_s = time.perf_counter() - t0
        self.temp_bytes = self.compiled.memory_analysis().temp_size_in_bytes

    def step(self):
        self.trainable, self.opt_state, loss = self.compiled(
            self.trainable, self.opt_state, self.frozen, self.x
        )
        jax.block_until_ready((self.trainable, self.opt_state, loss))
        return loss


class Runner(CompiledStep):
    """One variant of this benchmark, in one of the :data:`PATTERNS`."""

    def __init__(self, name, width, layers, x, optimizer, pattern="argument"):
        apply, frozen, trainable = make_variant(name, width, layers, x)
        super().__init__(name, apply, frozen, trainable, x, optimizer, pattern)
        self.grad_fn = jax.jit(jax.value_and_grad(self.loss_fn))


class Summary(NamedTuple):
    median_ms: float
    min_ms: float
    paired_ratio: float  # median over rounds of (round median / LoRA's round median)
    cpu_ms: float
    cpu_ratio: float  # median CPU time over LoRA's
    temp_bytes: int
    compile_s: float
    paired_low: float  # lowest and highest per-round ratio: the spread of paired_ratio
    paired_high: float


def summarise(runner: Runner, lora: Runner | None) -> Summary:
    median = statistics.median
    paired = cpu_ratio = float("nan")
    per_round = [paired]
    if lora is not None:
        per_round = harness.round_ratios(runner, lora)
        paired = median(per_round)
        cpu_ratio = median(runner.cpu()) / median(lora.cpu())
    return Summary(
        median_ms=1e3 * median(runner.wall()),
        min_ms=1e3 * min(runner.wall()),
        paired_ratio=paired,
        cpu_ms=1e3 * median(runner.cpu()),
        cpu_ratio=cpu_ratio,
        temp_bytes=runner.temp_bytes,
        compile_s=getattr(runner, "compile_s", float("nan")),
        paired_low=min(per_round),
        paired_high=max(per_round),
    )


def check_against_reference(runners: dict[str, Runner]) -> str:
    """Loss and gradients of every DoRA variant against the materialised reference."""
    ref = runners.get("materialised")
    if ref is None:
        return "no reference"
    ref_loss, ref_grads = ref.grad_fn(ref.initial, ref.frozen, ref.x)
    worst = 0.0
    for name, runner in runners.items():
        if name in ("lora", "materialised", "magnitude-only"):
            continue
        loss, grads = runner.grad_fn(runner.initial, runner.frozen, runner.x)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-4, err_msg=name)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            scale = float(jnp.max(jnp.abs(want))) or 1.0
            err = float(jnp.max(jnp.abs(got - want))) / scale
            worst = max(worst, err)
            if err > 1e-3:
                raise AssertionError(f"{name}: gradient differs from the reference by {err:.2e}")
    return f"gradients match the materialised reference (max rel. err {worst:.1e})"


def measure_shape(
    width, layers, tokens, variants, repeats, steps_per_round, check, dtype, patterns=("argument",)
):
    """``{pattern: {variant: Summary}}``: every (pattern, variant) step timed in the same
    interleaved rounds; ratios against the LoRA step of the same pattern."""
    x = jax.random.normal(jax.random.key(1), (tokens, width), jnp.float32).astype(dtype)
    optimizer = optax.adamw(1e-3)
    runners = {
        pattern: {name: Runner(name, width, layers, x, optimizer, pattern) for name in variants}
        for pattern in patterns
    }
    for pattern, group in runners.items():
        label = "" if len(runners) == 1 else f" ({pattern})"
        compile_note = ", ".join(f"{n} {r.compile_s:.1f}s" for n, r in group.items())
        print(f"  compiled{label}: {compile_note}", flush=True)
        if check:
            print(f"  check{label}: {check_against_reference(group)}", flush=True)
    order = [runner for group in runners.values() for runner in group.values()]
    harness.interleave(order, repeats, steps_per_round)
    return {
        pattern: {name: summarise(r, group.get("lora")) for name, r in group.items()}
        for pattern, group in runners.items()
    }


def stack_floor(layers: int, tokens: int, pattern: str = "argument") -> float:
    """The floor of docs/design.md section 3 counted for this stack: the first layer
    needs no input gradient.

    LoRA's big products are ``layers`` forward and ``layers - 1`` input-gradient
    ``N x D x D`` products; exact DoRA adds ``layers`` products ``r x D x D``.
    ``1 + r/(2N)`` is the limit for many layers. With the batch and the frozen variables
    closed over (``closure-batch``), XLA computes the first layer's ``x @ W0`` at compile
    time, so LoRA has one forward product fewer (and none at all with one layer), while
    DoRA still needs that layer's ``A^T W0``.
    """
    big = 2 * layers - 1 - (pattern == "closure-batch")
    return 1 + layers * RANK / (big * tokens) if big else float("inf")


def build_table(results, variants):
    extra = [v for v in variants if v not in MAIN_VARIANTS]
    head = [
        "width",
        "layers",
        "tokens",
        "LoRA ms",
        "DoRA ms",
        "DoRA/LoRA",
        "materialised ms",
        "materialised/LoRA",
    ]
    for name in extra:
        head += [f"{name} ms", f"{name}/LoRA"]
    head += ["LoRA temp MiB", "DoRA temp MiB", "materialised temp MiB"]
    head += [f"{name} temp MiB" for name in extra]
    head += ["floor 1+r/(2N)", "stack floor"]
    rows = []
    for (width, layers, tokens), runs in results:
        lora = runs.get("lora")
        row = [str(width), str(layers), str(tokens)]
        for name in ("lora", "dora", "materialised", *extra):
            run = runs.get(name)
            row.append(f"{run.median_ms:.1f}" if run else "-")
            if name != "lora":
                ok = run is not None and lora is not None
                row.append(f"{run.median_ms / lora.median_ms:.2f}" if ok else "-")
        for name in ("lora", "dora", "materialised", *extra):
            run = runs.get(name)
            row.append(f"{run.temp_bytes / 2**20:.1f}" if run else "-")
        row.append(f"{1 + RANK / (2 * tokens):.3f}")
        row.append(f"{stack_floor(layers, tokens):.3f}")
        rows.append(row)
    return harness.table(head, rows)


def build_spread_table(results):
    head = ["width", "layers", "tokens", "variant", "median ms", "min ms"]
    head += ["paired ratio", "CPU ms", "CPU ratio", "temp MiB"]
    rows = []
    for (width, layers, tokens), runs in results:
        for name, run in runs.items():
            row = [str(width), str(layers), str(tokens), name]
            row += [f"{run.median_ms:.1f}", f"{run.min_ms:.1f}", f"{run.paired_ratio:.2f}"]
            row += [f"{run.cpu_ms:.1f}", f"{run.cpu_ratio:.2f}", f"{run.temp_bytes / 2**20:.1f}"]
            rows.append(row)
    return harness.table(head, rows)


def build_pattern_table(results, variants):
    """One row per shape and pattern: each variant's median ms, its paired ratio to the
    LoRA step of that pattern (lowest-highest round in brackets) and compile seconds."""
    patterns = list(results[0][1])
    others = [v for v in variants if v != "lora"]
    head = ["width", "layers", "tokens", "pattern", "LoRA ms", "LoRA compile s"]
    if "argument" in patterns and len(patterns) > 1:
        head.append("LoRA / argument LoRA")
    for name in others:
        head += [f"{name} ms", f"{name}/LoRA (spread)", f"{name} compile s"]
    head.append("stack floor")
    rows = []
    for (width, layers, tokens), by_pattern in results:
        for pattern, runs in by_pattern.items():
            lora = runs.get("lora")
            row = [str(width), str(layers), str(tokens), pattern]
            row += [f"{lora.median_ms:.1f}", f"{lora.compile_s:.1f}"] if lora else ["-", "-"]
            if "argument" in patterns and len(patterns) > 1:
                ref = by_pattern["argument"].get("lora")
                ok = lora is not None and ref is not None
                row.append(f"{lora.median_ms / ref.median_ms:.2f}" if ok else "-")
            for name in others:
                run = runs[name]
                ratio = f"{run.paired_ratio:.2f} ({run.paired_low:.2f}-{run.paired_high:.2f})"
                row += [f"{run.median_ms:.1f}", ratio if lora else "-", f"{run.compile_s:.1f}"]
            row.append(f"{stack_floor(layers, tokens, pattern):.3f}")
            rows.append(row)
    return harness.table(head, rows)


def parse_shapes(text: str):
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not WIDTHxLAYERSxTOKENS")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """``--shapes``, ``--repeats`` and ``--steps``, shared by the benchmarks."""
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=list(SHAPES),
        help="comma-separated WIDTHxLAYERSxTOKENS (default: "
        + ",".join("x".join(map(str, shape)) for shape in SHAPES)
        + ")",
    )
    parser.add_argument(
        "--repeats", type=int, default=15, help="interleaved rounds (default: %(default)s)"
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="steps per variant per round (default: %(default)s)"
    )


def add_variant_arguments(parser: argparse.ArgumentParser, variants: str, patterns: str):
    """``--variants`` and ``--patterns`` (comma-separated), shared by the benchmarks."""
    parser.add_argument(
        "--variants",
        default=variants,
        help=f"comma-separated, from {', '.join(MAIN_VARIANTS + EXTRA_VARIANTS)} "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--patterns",
        default=patterns,
        help="comma-separated, from "
        + "; ".join(f"{k}: {v}" for k, v in PATTERNS.items())
        + " (default: %(default)s)",
    )


def chosen_variants(parser: argparse.ArgumentParser, args) -> tuple[list[str], list[str]]:
    """``(variants, patterns)`` of :func:`add_variant_arguments`, checked."""
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(MAIN_VARIANTS + EXTRA_VARIANTS)
    if not variants or unknown:
        parser.error(f"unknown variants {sorted(unknown)}; got {args.variants!r}")
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    if not patterns or set(patterns) - set(PATTERNS):
        parser.error(f"--patterns takes {', '.join(PATTERNS)}; got {args.patterns!r}")
    return variants, patterns


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_arguments(parser)
    add_variant_arguments(parser, ",".join(MAIN_VARIANTS), "argument")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument(
        "--no-check", action="store_true", help="skip the gradient check against the reference"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="base weights and computation; adapters stay float32 (bfloat16: lora and dora "
        "only, no reference check)",
    )
    args = parser.parse_args(argv)
    variants, patterns = chosen_variants(parser, args)
    if args.dtype == "bfloat16":
        if set(variants) - {"lora", "dora", "materialised"}:
            parser.error("--dtype bfloat16 times the variants lora and dora only")
        variants = [v for v in variants if v != "materialised"]

    print(harness.banner("jax", "flax", "optax", load=True))
    print(
        f"rank {RANK}, {args.dtype}, AdamW, {args.repeats} rounds x {args.steps} steps per "
        f"variant, variants: {', '.join(variants)}, patterns: {', '.join(patterns)}",
        flush=True,
    )
    start = time.perf_counter()
    results = []
    for width, layers, tokens in args.shapes:
        print(f"shape width={width} layers={layers} tokens={tokens}", flush=True)
        check = not args.no_check and args.dtype == "float32"
        by_pattern = measure_shape(
            width, layers, tokens, variants, args.repeats, args.steps, check, args.dtype, patterns
        )
        for pattern, runs in by_pattern.items():
            label = "" if len(patterns) == 1 else f" ({pattern})"
            summary = ", ".join(f"{n} {r.median_ms:.1f} ms" for n, r in runs.items())
            print(f"  median{label}: {summary}", flush=True)
        results.append(((width, layers, tokens), by_pattern))
    print(f"\nload average at end: {harness.load_average()}")
    out = []
    for pattern in patterns:
        per_pattern = [(shape, by_pattern[pattern]) for shape, by_pattern in results]
        label = "" if len(patterns) == 1 else f"{pattern} ({PATTERNS[pattern]}): "
        table = build_table(per_pattern, variants)
        spread = build_spread_table(per_pattern)
        print(f"\n{label}Step time (median wall ms) and XLA temp memory:\n")
        print(table)
        print(f"\n{label}Spread and contention-robust ratios (ratios against LoRA):\n")
        print(spread)
        out += [table, spread]
    if len(patterns) > 1 and "lora" in variants:
        table = build_pattern_table(results, variants)
        print("\nPatterns side by side (paired ratios against the same pattern's LoRA):\n")
        print(table)
        out.append(table)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n\n".join(out) + "\n")


if __name__ == "__main__":
    sys.exit(main())
