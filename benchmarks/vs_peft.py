"""Training step time: HuggingFace PEFT (LoRA, DoRA) against dora-jax (LoRA, DoRA).

Run: ``python benchmarks/vs_peft.py`` (a few minutes on a 2-core CPU).

Same model and shapes as ``step_time.py``: a stack of ``layers`` square layers
``x -> tanh(layer(x))`` of width ``width`` on ``tokens`` inputs, loss ``mean(y ** 2)``,
rank 16, alpha 16, float32, one AdamW step (lr 1e-3, weight decay 1e-2 on both sides).
Four variants, timed in one process:

* ``peft-lora``: a stack of torch ``nn.Linear`` wrapped by
  ``peft.get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=[every
  linear], use_dora=False))``, ``torch.optim.AdamW`` over the trainable parameters only,
  ``torch.set_num_threads(<CPUs available>)``;
* ``peft-dora``: the same with ``use_dora=True``;
* ``jax-lora``: a stack of ``dora_jax.DoRADense(width, rank=16, alpha=16,
  use_dora=False)``, one jit-compiled ``optax.adamw`` step whose gradient is taken only
  with respect to the ``"dora"`` collection (``"params"`` and ``"dora_cache"`` are
  non-differentiated arguments), with the trainable and optimizer state donated, as in
  ``step_time.py``;
* ``jax-dora``: the same with ``use_dora=True``.

Every variant starts from the same weights (``torch.manual_seed``; Flax kernel = torch
weight transposed, ``lora_a = lora_A.weight.T``, ``lora_b = lora_B.weight.T``,
``magnitude = lora_magnitude_vector``): ``nn.Linear``'s own initialisation, PEFT's
Kaiming-uniform ``A``, ``B ~ N(0, 0.02)`` instead of zero (so the DoRA norm is not
trivially ``||W0||``; timing does not depend on values) and PEFT's magnitude
``||W0 + s*B@A||`` per output feature. Before timing, losses and gradients of both
libraries are compared on a small shape (magnitudes perturbed, so that ``m / ||.||`` is
far from 1), and on every timed shape the loss of each variant's first step is compared
with its counterpart's.

Step times are medians over interleaved rounds (every round runs each variant a few
steps, in a rotating order, so background load hits all of them alike). A second table
gives the fastest step, process CPU time per step, and ratios paired by round (the median
over rounds of the ratio of the two variants' medians in that round), which depend less
on other processes competing for the cores. CPU time counts every thread of the process,
including one library's idle threads spinning while the other runs. "1st step" is the
median of each round's first step, which follows another variant (often one of the
other library): a gap to "later steps" is the cost of switching (cold caches, the other
library's worker threads still spinning). ``--torch-threads`` overrides torch's thread
count: on a busy machine torch's OpenMP threads suffer far more than XLA's from other
processes on the cores (each parallel operation waits for a descheduled worker), so run
this on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import statistics
import sys
import time
from typing import NamedTuple

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import torch
from harness import Timed, paired_ratio
from step_time import MLP, CompiledStep, add_timing_arguments, make_step

import dora_jax
from dora_jax import ops

SHAPES = ((1024, 4, 512), (2048, 4, 256), (4096, 2, 128))
CHECK_SHAPE = (64, 2, 32)
RANK = 16
ALPHA = 16
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-2
B_STD = 0.02
ADAPTER = "default"
VARIANTS = ("peft-lora", "peft-dora", "jax-lora", "jax-dora")
LABELS = {
    "peft-lora": "PEFT LoRA",
    "peft-dora": "PEFT DoRA",
    "jax-lora": "dora-jax LoRA",
    "jax-dora": "dora-jax DoRA",
}
GOAL = 2.0  # PEFT DoRA / dora-jax DoRA


# ----- the same weights for both libraries --------------------------------------------


class TorchMLP(torch.nn.Module):
    """``layers`` square ``nn.Linear`` layers, each followed by ``tanh``."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class Weights(NamedTuple):
    """Per layer, in torch orientation: ``(out, in)``, ``(r, in)``, ``(out, r)``, ``(out,)``."""

    base: TorchMLP
    lora_a: list[torch.Tensor]
    lora_b: list[torch.Tensor]
    magnitude: list[torch.Tensor]


def make_weights(width: int, layers: int, seed: int, perturb_magnitude: bool = False) -> Weights:
    torch.manual_seed(seed)
    base = TorchMLP(width, layers)  # nn.Linear's own initialisation
    scale = ALPHA / RANK
    lora_a, lora_b, magnitude = [], [], []
    with torch.no_grad():
        for layer in base.layers:
            a = torch.empty(RANK, width)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's A
            b = torch.randn(width, RANK) * B_STD  # nonzero B (PEFT's default is 0)
            m = torch.linalg.norm(layer.weight + scale * (b @ a), dim=1)  # PEFT's magnitude
            if perturb_magnitude:
                m = m * (1.0 + 0.1 * torch.randn(width))
            lora_a.append(a)
            lora_b.append(b)
            magnitude.append(m)
    return Weights(base, lora_a, lora_b, magnitude)


def peft_model(weights: Weights, use_dora: bool) -> torch.nn.Module:
    """``get_peft_model`` on a copy of the base, with the adapters set to ``weights``."""
    layers = len(weights.base.layers)
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=[f"layers.{i}" for i in range(layers)],
        use_dora=use_dora,
    )
    model = peft.get_peft_model(copy.deepcopy(weights.base), config)
    adapted = model.base_model.model.layers
    with torch.no_grad():
        for i, layer in enumerate(adapted):
            layer.lora_A[ADAPTER].weight.copy_(weights.lora_a[i])
            layer.lora_B[ADAPTER].weight.copy_(weights.lora_b[i])
            if use_dora:
                layer.lora_magnitude_vector[ADAPTER].weight.copy_(weights.magnitude[i])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if len(trainable) != layers * (3 if use_dora else 2):
        raise AssertionError(f"unexpected trainable parameters: {trainable}")
    model.train()
    return model


def peft_adapters(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, ...]]:
    """Per layer ``(lora_A, lora_B[, magnitude])`` parameters of a model from peft_model."""
    out = []
    for layer in model.base_model.model.layers:
        params = (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)
        if ADAPTER in layer.lora_magnitude_vector:
            params += (layer.lora_magnitude_vector[ADAPTER].weight,)
        out.append(params)
    return out


def _to_jax(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(np.ascontiguousarray(t.detach().numpy()))


def jax_variables(model: MLP, weights: Weights, x: jax.Array) -> dict:
    """Flax variables holding ``weights``; checked against the structure ``init`` makes."""
    params, dora, cache = {}, {}, {}
    for i, layer in enumerate(weights.base.layers):
        name = f"layer_{i}"
        kernel = _to_jax(layer.weight.T)
        params[name] = {"kernel": kernel, "bias": _to_jax(layer.bias)}
        dora[name] = {
            "lora_a": _to_jax(weights.lora_a[i].T),
            "lora_b": _to_jax(weights.lora_b[i].T),
        }
        if model.use_dora:
            dora[name]["magnitude"] = _to_jax(weights.magnitude[i])
            cache[name] = {"base_norm_sq": ops.column_norm_sq(kernel, ops.dense_layout())}
    variables = {"params": params, "dora": dora}
    if model.use_dora:
        variables["dora_cache"] = cache

    def init(key):  # with the ||W0||_c^2 cache, which init alone does not make
        variables = model.init(key, x)
        if model.use_dora:
            variables = dora_jax.linen.cache_base_norms(model, variables, x)
        return variables

    expected = jax.eval_shape(init, jax.random.key(0))
    got = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), variables)
    if jax.tree.structure(got) != jax.tree.structure(expected) or jax.tree.leaves(
        got
    ) != jax.tree.leaves(expected):
        raise AssertionError(f"variables do not match init: {got} vs {expected}")
    return variables


# ----- the steps --------------------------------------------------------------------------


class TorchRunner(Timed):
    def __init__(self, name: str, weights: Weights, x: torch.Tensor, use_dora: bool):
        super().__init__(name)
        self.model = peft_model(weights, use_dora)
        self.x = x
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        self.compile_s = 0.0

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.mean(self.model(self.x) ** 2)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def jax_runner(name: str, weights: Weights, x: jax.Array, use_dora: bool) -> CompiledStep:
    model = MLP(x.shape[-1], len(weights.base.layers), use_dora=use_dora)
    variables = jax_variables(model, weights, x)
    optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    frozen = {k: v for k, v in variables.items() if k != "dora"}
    return CompiledStep(name, model.apply, frozen, variables["dora"], x, optimizer)


# ----- checks -----------------------------------------------------------------------------


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) or 1.0))


def check_against_peft(width: int, layers: int, tokens: int) -> str:
    """Loss and adapter gradients of dora-jax against PEFT for identical weights."""
    weights = make_weights(width, layers, seed=1, perturb_magnitude=True)
    x = torch.randn(tokens, width)
    notes = []
    for use_dora in (False, True):
        model = peft_model(weights, use_dora)
        loss = torch.mean(model(x) ** 2)
        loss.backward()
        flax_model = MLP(width, layers, use_dora=use_dora)
        variables = jax_variables(flax_model, weights, _to_jax(x))
        frozen = {k: v for k, v in variables.items() if k != "dora"}
        _, loss_fn = make_step(flax_model.apply, optax.adamw(LEARNING_RATE))
        jax_loss, grads = jax.value_and_grad(loss_fn)(variables["dora"], frozen, _to_jax(x))
        loss_err = abs(float(jax_loss) - loss.item()) / abs(loss.item())
        grad_err = 0.0
        for i, params in enumerate(peft_adapters(model)):
            mine = grads[f"layer_{i}"]
            grad_err = max(grad_err, _rel_err(mine["lora_a"], params[0].grad.T))
            grad_err = max(grad_err, _rel_err(mine["lora_b"], params[1].grad.T))
            if use_dora:
                grad_err = max(grad_err, _rel_err(mine["magnitude"], params[2].grad))
        label = "DoRA" if use_dora else "LoRA"
        if loss_err > 1e-5 or grad_err > 1e-4:
            raise AssertionError(
                f"{label}: dora-jax differs from PEFT: loss rel. err {loss_err:.1e}, "
                f"gradient rel. err {grad_err:.1e}"
            )
        notes.append(f"{label} loss {loss_err:.1e}, grads {grad_err:.1e}")
    shape = f"{width}x{layers}x{tokens}"
    return f"dora-jax matches PEFT at {shape} (max. rel. err {'; '.join(notes)})"


def check_first_losses(runners: dict[str, Timed]) -> str:
    """The first step of each dora-jax variant against PEFT's: same weights, same loss."""
    notes = []
    for kind in ("lora", "dora"):
        mine, ref = runners[f"jax-{kind}"].first_loss, runners[f"peft-{kind}"].first_loss
        err = abs(mine - ref) / abs(ref)
        if not err <= 1e-4:
            raise AssertionError(f"first-step loss: dora-jax {kind} {mine} vs PEFT {ref}")
        notes.append(f"{kind} {ref:.6f} (rel. diff {err:.1e})")
    return "first-step losses agree: " + ", ".join(notes)


# ----- measurement ------------------------------------------------------------------------


class Summary(NamedTuple):
    median_ms: float
    min_ms: float
    after_switch_ms: float  # median over rounds of each round's first step
    later_ms: float  # median of the other steps
    cpu_ms: float


def summarise(runner: Timed) -> Summary:
    return Summary(
        median_ms=1e3 * statistics.median(runner.wall()),
        min_ms=1e3 * min(runner.wall()),
        after_switch_ms=1e3 * statistics.median(r[0][0] for r in runner.rounds),
        later_ms=1e3
        * statistics.median([w for r in runner.rounds for w, _ in r[1:]] or [math.nan]),
        cpu_ms=1e3 * statistics.median(runner.cpu()),
    )


class ShapeResult(NamedTuple):
    runs: dict[str, Summary]
    paired: dict[str, float]  # "peft-dora/lora", "jax-dora/lora", "lora", "dora"


def measure_shape(width, layers, tokens, repeats, steps_per_round, seed) -> ShapeResult:
    weights = make_weights(width, layers, seed=seed)
    x_torch = torch.randn(tokens, width)
    x_jax = _to_jax(x_torch)
    runners: dict[str, Timed] = {
        "peft-lora": TorchRunner("peft-lora", weights, x_torch, use_dora=False),
        "peft-dora": TorchRunner("peft-dora", weights, x_torch, use_dora=True),
        "jax-lora": jax_runner("jax-lora", weights, x_jax, use_dora=False),
        "jax-dora": jax_runner("jax-dora", weights, x_jax, use_dora=True),
    }
    del weights
    compile_note = ", ".join(f"{n} {runners[n].compile_s:.1f}s" for n in ("jax-lora", "jax-dora"))
    print(f"  compiled: {compile_note}", flush=True)
    for runner in runners.values():
        runner.run(2, record=False)
    print(f"  check: {check_first_losses(runners)}", flush=True)
    gc.collect()
    harness.interleave(list(runners.values()), repeats, steps_per_round, warmup=0)
    paired = {
        "peft-dora/lora": paired_ratio(runners["peft-dora"], runners["peft-lora"]),
        "jax-dora/lora": paired_ratio(runners["jax-dora"], runners["jax-lora"]),
        "lora": paired_ratio(runners["peft-lora"], runners["jax-lora"]),
        "dora": paired_ratio(runners["peft-dora"], runners["jax-dora"]),
    }
    return ShapeResult({name: summarise(r) for name, r in runners.items()}, paired)


# ----- output -----------------------------------------------------------------------------


def build_table(results):
    head = ["width", "layers", "tokens"]
    head += ["PEFT LoRA ms", "PEFT DoRA ms", "PEFT DoRA/LoRA"]
    head += ["dora-jax LoRA ms", "dora-jax DoRA ms", "dora-jax DoRA/LoRA"]
    head += ["PEFT DoRA / dora-jax DoRA"]
    rows = []
    for (width, layers, tokens), result in results:
        ms = {name: run.median_ms for name, run in result.runs.items()}
        row = [str(width), str(layers), str(tokens)]
        row += [f"{ms['peft-lora']:.1f}", f"{ms['peft-dora']:.1f}"]
        row += [f"{ms['peft-dora'] / ms['peft-lora']:.2f}"]
        row += [f"{ms['jax-lora']:.1f}", f"{ms['jax-dora']:.1f}"]
        row += [f"{ms['jax-dora'] / ms['jax-lora']:.2f}"]
        row += [f"{ms['peft-dora'] / ms['jax-dora']:.2f}"]
        rows.append(row)
    return harness.table(head, rows)


def build_spread_table(results):
    head = ["width", "layers", "tokens", "variant", "median ms", "min ms"]
    head += ["1st step ms", "later steps ms", "CPU ms"]
    head += ["DoRA/LoRA paired", "DoRA/LoRA CPU", "PEFT/dora-jax paired", "PEFT/dora-jax CPU"]
    rows = []
    for (width, layers, tokens), result in results:
        runs = result.runs
        for name in VARIANTS:
            run = runs[name]
            lib, kind = name.split("-")
            row = [str(width), str(layers), str(tokens), LABELS[name]]
            row += [f"{run.median_ms:.1f}", f"{run.min_ms:.1f}"]
            row += [f"{run.after_switch_ms:.1f}", f"{run.later_ms:.1f}", f"{run.cpu_ms:.1f}"]
            if kind == "dora":
                lora_cpu = runs[f"{lib}-lora"].cpu_ms
                row += [f"{result.paired[f'{lib}-dora/lora']:.2f}", f"{run.cpu_ms / lora_cpu:.2f}"]
            else:
                row += ["-", "-"]
            if lib == "jax":
                peft_cpu = runs[f"peft-{kind}"].cpu_ms
                row += [f"{result.paired[kind]:.2f}", f"{peft_cpu / run.cpu_ms:.2f}"]
            else:
                row += ["-", "-"]
            rows.append(row)
    return harness.table(head, rows)


def starved_torch(results, threads: int) -> str:
    """A warning when torch's threads mostly did not run in parallel, else ``""``.

    With ``threads`` OpenMP threads on otherwise idle cores a torch step's process CPU
    time is close to ``threads`` times its wall time. When another process holds a core,
    every parallel operation waits for a descheduled worker and the step becomes several
    times slower while using about one core: such PEFT times are not representative.
    """
    if threads < 2:
        return ""
    starved = []
    for (width, layers, tokens), result in results:
        for name in ("peft-lora", "peft-dora"):
            run = result.runs[name]
            if run.cpu_ms < 1.5 * run.median_ms:
                ratio = run.cpu_ms / run.median_ms
                starved.append(f"{LABELS[name]} at {width}x{layers}x{tokens} ({ratio:.2f})")
    if not starved:
        return ""
    return (
        f"torch ran {threads} threads but used about one core (CPU time / wall time) for "
        + ", ".join(starved)
        + ": other processes were using the cores and torch's OpenMP threads waited for "
        "each other, which inflates PEFT's times several-fold. Rerun on a quiet machine "
        "(or compare with --torch-threads 1)."
    )


def _torch_parallel_backend() -> str:
    for line in torch.__config__.parallel_info().splitlines():
        if line.startswith("ATen parallel backend:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_arguments(parser)
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed (default: 0)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch.set_num_threads (default: the number of CPUs available)",
    )
    args = parser.parse_args(argv)
    for width, _, _ in args.shapes:
        if width < RANK:
            parser.error(f"width {width} is below the rank {RANK}")

    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")  # torch runs on the CPU: compare like for like
    torch.set_num_threads(args.torch_threads or harness.cpu_count())
    print(harness.banner("jax", "flax", "optax", "torch", "peft", load=True))
    print(
        f"{platform.processor() or platform.machine()}, torch threads "
        f"{torch.get_num_threads()} ({_torch_parallel_backend()})"
    )
    print(
        f"rank {RANK}, alpha {ALPHA}, float32, AdamW, "
        f"{args.repeats} rounds x {args.steps} steps per variant",
        flush=True,
    )
    start = time.perf_counter()
    print(f"check: {check_against_peft(*CHECK_SHAPE)}", flush=True)
    results = []
    for width, layers, tokens in args.shapes:
        print(f"shape width={width} layers={layers} tokens={tokens}", flush=True)
        result = measure_shape(width, layers, tokens, args.repeats, args.steps, args.seed)
        summary = ", ".join(f"{LABELS[n]} {r.median_ms:.1f} ms" for n, r in result.runs.items())
        print(f"  median: {summary}", flush=True)
        results.append(((width, layers, tokens), result))
        gc.collect()
    table = build_table(results)
    spread = build_spread_table(results)
    met = sum(
        r.runs["peft-dora"].median_ms / r.runs["jax-dora"].median_ms >= GOAL for _, r in results
    )
    print(f"\nload average at end: {harness.load_average()}")
    print("\nStep time (median wall ms):\n")
    print(table)
    print(f"\nPEFT DoRA / dora-jax DoRA >= {GOAL:g}: {met} of {len(results)} shapes")
    print("\nSpread and load-robust ratios:\n")
    print(spread)
    starved = starved_torch(results, torch.get_num_threads())
    if starved:
        print(f"\nWARNING: {starved}")
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n\n" + spread + "\n")


if __name__ == "__main__":
    sys.exit(main())
