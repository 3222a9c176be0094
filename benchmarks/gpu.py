"""DoRA on a GPU at LLM shapes, bfloat16: an accuracy check and step times, in one call.

Run: ``python benchmarks/gpu.py`` on a machine with a GPU (1 to 3 minutes; no new
(kernel, rank) pair starts after ``--budget-s``, 210 s; then the Llama-shaped model, 1 to
2 minutes more, so it ends within about 7).
Without a GPU it prints one line and exits 0; ``python benchmarks/gpu.py --cpu-smoke``
runs the same code on the CPU with tiny shapes, to test the script.

Shapes (GPU): kernels ``4096 x 4096`` (an attention projection) and ``4096 x 14336`` (an
MLP up-projection of a Llama-3-8B-sized model), 4096 tokens, ranks 16 and 64, every base
array in bfloat16 (``DoRADense(..., param_dtype=bfloat16, dtype=bfloat16)``; the adapters
``lora_a``, ``lora_b``, ``magnitude`` stay float32, the library's default, as PEFT). For each
(kernel, rank):

(a) **Accuracy.** One ``dora_jax.DoRADense`` layer (``lora_b ~ N(0, 0.02)`` and the
    magnitude scaled by ``U(0.5, 1.5)`` so that neither factor is trivial) is compared
    with a float32 reference, computed with ``Precision.HIGHEST`` from the same bfloat16
    weights and inputs upcast, that materialises
    ``W' = m * (W0 + s*A@B) / stop_gradient(||W0 + s*A@B||_c)`` and returns
    ``x @ W' + bias``. Compared: the forward output and, for one fixed random output
    cotangent, the gradients of ``lora_a``, ``lora_b`` and ``magnitude``; the error is
    ``max|DoRA - ref| / max|ref|`` per array and must stay below ``--tol`` (2e-2).

(b) **Time and memory.** Medians over interleaved rounds (warm-up excluded) of

    * ``base fwd``: ``x @ W0`` alone, the frozen layer's forward;
    * ``LoRA step`` and ``DoRA step``: one jit-compiled AdamW step (state donated) of a
      trainable per-feature input gain followed by one ``DoRADense`` layer
      (``use_dora=False`` / ``True``), loss ``mean(y**2)``, the gradient taken only with
      respect to the ``"dora"`` collection (gain, ``lora_a``, ``lora_b``, ``magnitude``).
      The gain stands for the trainable layers in front of any adapted layer of a real
      model: it makes the step compute the input gradient ``dy @ W0^T``, as every
      adapted layer but the very first one must (a lone layer's backward pass would
      have no product with ``W0`` at all).

    * ``DoRA step, stacked``: where the rule measured on the CPU would stack ``x`` and
      ``A^T`` into one product with ``W0`` (tokens at most half the output features),
      the DoRA step with that product enabled on this platform too
      (``stacking=ops.Stacking(rows_per_output=0.5)``, the CPU's default), to decide
      whether GPUs should stack.

    A timed batch is several back-to-back calls with one ``block_until_ready`` at the
    end (so launch latency is amortised), divided by the number of calls.

Flop counts (matmuls only; elementwise work and the gain are ignored), per step, for
``N`` tokens, kernel ``in x out``, rank ``r``::

    base fwd   2*N*in*out                                      x @ W0
    LoRA step  4*N*in*out                                      x @ W0 and dy @ W0^T
             + 6*N*r*(in+out)                                  x@A, (xA)@B; dxA, dB, dA, dx
    DoRA step  LoRA + 2*r*in*out                               A^T @ W0 (the norm)
             + 2*r*r*(in+out)                                  A^T A and (A^T A) @ B

so the DoRA/LoRA flop ratio is docs/design.md section 3's floor ``1 + r/(2N)`` up to the
rank-r terms (``flop ratio`` column). Memory is XLA's
``jitted.lower(...).compile().memory_analysis()``: temp (scratch) and argument bytes.

(c) **A Llama-shaped model** (``--no-llama`` skips it): ``examples/llama.py`` at Llama 3
    8B's layer shapes (width 4096, 32 heads of 128 and 8 key-value heads, SwiGLU MLP of
    14336) with 4 decoder layers and a vocabulary of 32000, bfloat16, 2 sequences of 2048
    tokens; adapters of rank 16 on all seven projections (``q, k, v, o, gate, up,
    down``); one AdamW step of the causal-LM loss, LoRA and DoRA, as
    ``benchmarks/llm_step.py`` times them on the CPU (there against PEFT). Model FLOPs
    per step are ``llm_step.step_flops`` (matmuls; no weight gradients of frozen kernels).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from typing import Any, NamedTuple

import harness
import memory as xla_memory

# Before JAX starts XLA: dump the training steps, for their peak live buffers.
XLA_DUMPS = xla_memory.dump_xla("step")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import llm_step  # noqa: E402  (the Llama-shaped model and its step)
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from step_time import make_step  # noqa: E402  (the benchmarks' shared training step)

import dora_jax  # noqa: E402
from dora_jax import ops  # noqa: E402


class Config(NamedTuple):
    kernels: tuple[tuple[int, int], ...]
    tokens: int
    ranks: tuple[int, ...]
    repeats: int  # at most this many interleaved rounds per (kernel, rank)
    target_batch_s: float  # a timed batch of calls lasts about this long


GPU_CONFIG = Config(
    kernels=((4096, 4096), (4096, 14336)),
    tokens=4096,
    ranks=(16, 64),
    repeats=15,
    target_batch_s=0.025,
)
SMOKE_CONFIG = Config(
    kernels=((256, 256), (256, 512)), tokens=64, ranks=(4, 8), repeats=5, target_batch_s=0.005
)
# Llama 3 8B's layers, 4 of them, 2 x 2048 tokens; the smoke run's is tiny.
LLAMA_GPU = llm_step.Shape(4096, 4, 32, 8, 14336, 32000, 2, 2048)
LLAMA_SMOKE = llm_step.Shape(256, 2, 4, 2, 512, 1024, 1, 64)
DTYPE = jnp.bfloat16
MAX_INNER = 32  # calls per timed batch at most
DEFAULT_STACKING = ops.Stacking()  # the backend's own threshold


def gpu_available() -> bool:
    try:
        return jax.default_backend() == "gpu" and len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


# ----- model ---------------------------------------------------------------------------


def make_layer(
    features: int,
    rank: int,
    use_dora: bool,
    name: str | None = None,
    stacking: ops.Stacking = DEFAULT_STACKING,
):
    return dora_jax.DoRADense(
        features,
        rank=rank,
        alpha=2.0 * rank,
        use_dora=use_dora,
        dtype=DTYPE,
        param_dtype=DTYPE,
        # B = 0 (the default) would make the check trivial in A; values do not change timing.
        lora_b_init=nn.initializers.normal(0.02),
        stacking=stacking,
        name=name,
    )


class GainedLayer(nn.Module):
    """``DoRADense(gain * x)`` with a trainable per-feature gain in the ``"dora"`` collection."""

    features: int
    rank: int
    use_dora: bool
    stacking: ops.Stacking = DEFAULT_STACKING

    @nn.compact
    def __call__(self, x):
        gain = self.variable("dora", "gain", lambda: jnp.ones((x.shape[-1],), jnp.float32))
        h = (x.astype(jnp.float32) * gain.value).astype(DTYPE)
        layer = make_layer(self.features, self.rank, self.use_dora, "layer", self.stacking)
        return layer(h)


def flops(tokens: int, fan_in: int, fan_out: int, rank: int) -> dict[str, float]:
    """Matmul flops per call (see the module docstring)."""
    base = 2.0 * tokens * fan_in * fan_out
    lora = 2 * base + 6.0 * tokens * rank * (fan_in + fan_out)
    dora = lora + 2.0 * rank * fan_in * fan_out + 2.0 * rank * rank * (fan_in + fan_out)
    return {"base fwd": base, "LoRA step": lora, "DoRA step": dora, STACKED: dora}


# ----- (a) accuracy against a materialised float32 reference -----------------------------


def reference_forward(trainable, params, x, scale):
    """``x @ W' + bias`` with ``W'`` materialised in float32 (norm detached, as DoRA's)."""
    hi = jax.lax.Precision.HIGHEST
    f32 = jnp.float32
    direction = params["kernel"].astype(f32) + scale * jnp.matmul(
        trainable["lora_a"].astype(f32), trainable["lora_b"].astype(f32), precision=hi
    )
    norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(direction * direction, axis=0)))
    weight = trainable["magnitude"].astype(f32) * direction / norm
    return jnp.matmul(x.astype(f32), weight, precision=hi) + params["bias"].astype(f32)


def check_accuracy(variables, x, features: int, rank: int, key) -> tuple[dict[str, float], float]:
    """Max. relative errors of DoRA's output and adapter gradients; and the seconds taken."""
    start = time.perf_counter()
    layer = make_layer(features, rank, use_dora=True)
    key_m, key_ct = jax.random.split(key)
    trainable = dict(variables["dora"]["layer"])
    trainable["magnitude"] = trainable["magnitude"] * jax.random.uniform(
        key_m, trainable["magnitude"].shape, jnp.float32, 0.5, 1.5
    )
    frozen = {
        "params": variables["params"]["layer"],
        "dora_cache": variables["dora_cache"]["layer"],
    }
    cotangent = jax.random.normal(key_ct, (x.shape[0], features), jnp.float32).astype(DTYPE)

    @jax.jit
    def errors(trainable, frozen, x, cotangent):
        def dora_fn(t):
            return layer.apply({**frozen, "dora": t}, x)

        def ref_fn(t):
            return reference_forward(t, frozen["params"], x, layer.scale)

        y, vjp = jax.vjp(dora_fn, trainable)
        (grads,) = vjp(cotangent)
        y_ref, vjp_ref = jax.vjp(ref_fn, trainable)
        (grads_ref,) = vjp_ref(cotangent.astype(jnp.float32))
        pairs = {"y": (y, y_ref), **{f"d {k}": (grads[k], grads_ref[k]) for k in grads_ref}}
        return {
            name: jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want))
            for name, (got, want) in pairs.items()
        }

    result = {k: float(v) for k, v in errors(trainable, frozen, x, cotangent).items()}
    return result, time.perf_counter() - start


# ----- (b) timing ------------------------------------------------------------------------


def memory(compiled) -> tuple[float, float]:
    """``(temp, argument)`` bytes of a compiled program (NaN where XLA does not say)."""
    stats = compiled.memory_analysis()
    get = lambda name: float(getattr(stats, name, math.nan)) if stats else math.nan  # noqa: E731
    return get("temp_size_in_bytes"), get("argument_size_in_bytes")


class Timed(harness.Timed):
    """A compiled program; a step runs it ``inner`` times back to back, blocking once."""

    def __init__(self, name: str, compiled, run):
        super().__init__(name, lambda: run(self.inner))
        self.temp_bytes, self.arg_bytes = memory(compiled)
        self.estimate = math.nan  # seconds of one blocking call after warm-up
        self.state: dict[str, Any] = {}  # a training step's rolling state
        self.peak: xla_memory.PeakLive | None = None  # XLA's peak live set, if known

    def warm_up(self, target_batch_s: float) -> None:
        """Two untimed calls, then ``inner`` calls per batch to last ``target_batch_s``."""
        self.rounds, self.inner = [], 2
        self.run(1, record=False)
        self.inner = 1
        ((self.estimate, _),) = self.run(1, record=False)
        self.inner = max(1, min(MAX_INNER, math.ceil(target_batch_s / max(self.estimate, 1e-6))))


def base_forward(kernel, x) -> Timed:
    compiled = jax.jit(jnp.matmul).lower(x, kernel).compile()

    def run(n):
        jax.block_until_ready([compiled(x, kernel) for _ in range(n)])

    return Timed("base fwd", compiled, run)


def train_step(name: str, model, x, trainable, frozen) -> Timed:
    optimizer = optax.adamw(1e-4)
    state = {"trainable": trainable, "opt_state": optimizer.init(trainable), "loss": None}
    step, _ = make_step(model.apply, optimizer)
    compiled = step.lower(state["trainable"], state["opt_state"], frozen, x)
    compiled = compiled.compile()

    def run(n):
        for _ in range(n):
            state["trainable"], state["opt_state"], state["loss"] = compiled(
                state["trainable"], state["opt_state"], frozen, x
            )
        jax.block_until_ready((state["trainable"], state["opt_state"], state["loss"]))

    timed = Timed(name, compiled, run)
    timed.state = state
    timed.peak = xla_memory.peak_live(XLA_DUMPS)
    return timed


STACKED = "DoRA step, stacked"
CPU_STACKING = ops.Stacking(rows_per_output=ops.default_stack_rows("cpu"))


class Result(NamedTuple):
    kernel: tuple[int, int]
    rank: int
    ms: dict[str, float]
    flops: dict[str, float]
    temp: dict[str, float]
    args: dict[str, float]
    errors: dict[str, float]
    rounds: int
    setup_s: float
    peaks: dict[str, xla_memory.PeakLive | None]


def measure(kernel, rank, tokens, base: Timed, x, cfg: Config, deadline_fn, tol) -> Result:
    """Check and time one (kernel, rank); ``deadline_fn(setup_s)`` gives the time slice."""
    fan_in, fan_out = kernel
    t0 = time.perf_counter()
    dora_model = GainedLayer(fan_out, rank, use_dora=True)
    lora_model = GainedLayer(fan_out, rank, use_dora=False)
    variables = jax.jit(dora_model.init)(jax.random.key(rank), x)
    variables = dora_jax.linen.cache_base_norms(dora_model, variables, x)  # ||W0||_c^2
    errors, check_s = check_accuracy(variables, x, fan_out, rank, jax.random.key(7))
    worst = max(errors.values())
    print(
        f"  check vs float32 reference ({check_s:.1f} s): "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()),
        flush=True,
    )
    if not worst < tol:  # also catches NaN
        raise AssertionError(
            f"kernel {fan_in}x{fan_out} rank {rank}: DoRA differs from the float32 reference "
            f"by {worst:.2e} (tolerance {tol:.0e})"
        )
    # The steps donate their trainable state: give each its own copy.
    dora_trainable = jax.tree.map(jnp.copy, variables["dora"])
    lora_trainable = {
        "gain": jnp.copy(variables["dora"]["gain"]),
        "layer": {k: jnp.copy(variables["dora"]["layer"][k]) for k in ("lora_a", "lora_b")},
    }
    dora_frozen = {"params": variables["params"], "dora_cache": variables["dora_cache"]}
    lora_frozen = {"params": variables["params"]}
    runners = [
        base,
        train_step("LoRA step", lora_model, x, lora_trainable, lora_frozen),
        train_step("DoRA step", dora_model, x, dora_trainable, dora_frozen),
    ]
    if tokens <= CPU_STACKING.limit() * fan_out:
        # Where the CPU-measured rule stacks, time the stacked product here too.
        stacked_model = GainedLayer(fan_out, rank, use_dora=True, stacking=CPU_STACKING)
        stacked = jax.tree.map(jnp.copy, variables["dora"])
        runners.append(train_step(STACKED, stacked_model, x, stacked, dora_frozen))
    for r in runners:
        r.warm_up(cfg.target_batch_s)
    setup_s = time.perf_counter() - t0
    round_s = sum(r.inner * r.estimate for r in runners)
    rounds = max(3, min(cfg.repeats, int(deadline_fn(setup_s) / max(round_s, 1e-6))))
    harness.interleave(runners, rounds, steps=1, warmup=0)
    for r in runners[2:]:
        loss = float(r.state["loss"])
        if not math.isfinite(loss):
            raise AssertionError(f"{r.name} loss is {loss}")
    return Result(
        kernel=kernel,
        rank=rank,
        ms={r.name: r.median_ms() for r in runners},
        flops=flops(tokens, fan_in, fan_out, rank),
        temp={r.name: r.temp_bytes for r in runners},
        args={r.name: r.arg_bytes for r in runners},
        errors=errors,
        rounds=rounds,
        setup_s=setup_s,
        peaks={r.name: r.peak for r in runners[1:]},
    )


def measure_llama(shape: llm_step.Shape, repeats: int) -> list[list[str]]:
    """LoRA and DoRA training steps of the Llama-shaped model: table rows."""
    llama, _ = llm_step.load_examples()
    tokens = np.random.default_rng(0).integers(0, shape.vocab, (shape.batch, shape.seq_len))
    runners = []
    for use_dora in (False, True):
        model = llm_step.adapted_jax_model(llama, shape, use_dora, DTYPE, nnx.Rngs(0))
        if use_dora:
            dora_jax.nnx.cache_base_norms(model)
        name = "DoRA step" if use_dora else "LoRA step"
        runner = llm_step.JaxStep(name, model, llm_step.lm_batch(tokens), optax.adamw(1e-4))
        runner.peak = xla_memory.peak_live(XLA_DUMPS)
        print(f"  {name}: compiled in {runner.compile_s:.1f} s", flush=True)
        runners.append(runner)
        del model
    harness.interleave(runners, max(3, repeats), steps=2, warmup=2)
    rows = []
    for runner, use_dora in zip(runners, (False, True), strict=True):
        loss = float(runner.last)
        if not math.isfinite(loss):
            raise AssertionError(f"Llama-shaped {runner.name}: loss {loss}")
        ms, flop = runner.median_ms(), llm_step.step_flops(shape, use_dora)
        ratio = harness.paired_ratio(runner, runners[0]) if use_dora else math.nan
        flop_ratio = flop / llm_step.step_flops(shape, False)
        peak = "-" if runner.peak is None else mib(runner.peak.bytes)
        rows.append(
            [runner.name, f"{ms:.1f}", f"{shape.tokens / (ms * 1e-3):,.0f}"]
            + [f"{flop / (ms * 1e-3) / 1e12:.3g}", mib(runner.temp_bytes), peak]
            + [mib(runner.arg_bytes), "" if math.isnan(ratio) else f"{ratio:.3f}"]
            + ["" if not use_dora else f"{flop_ratio:.4f}"]
        )
    return rows


LLAMA_HEAD = ["step", "ms", "tokens/s", "TFLOP/s", "temp MiB", "peak live MiB"]
LLAMA_HEAD += ["argument MiB", "DoRA / LoRA (paired)", "flop ratio"]


# ----- report ----------------------------------------------------------------------------


def mib(n: float) -> str:
    return "-" if math.isnan(n) else f"{n / 2**20:.1f}"


def build_table(results: list[Result], tokens: int) -> str:
    head = ["kernel", "rank", "what", "ms", "GFLOP", "TFLOP/s", "temp MiB", "argument MiB"]
    head += ["/ LoRA", "flop ratio"]
    rows = []
    for r in results:
        for name in r.ms:
            ms, fl = r.ms[name], r.flops[name]
            row = [f"{r.kernel[0]}x{r.kernel[1]}", r.rank, name, f"{ms:.3f}", f"{fl / 1e9:.4g}"]
            row += [f"{fl / (ms * 1e-3) / 1e12:.3g}", mib(r.temp[name]), mib(r.args[name])]
            ratio = ms / r.ms["LoRA step"]
            flop_ratio = fl / r.flops["LoRA step"]
            dora = name.startswith("DoRA")
            row += [f"{ratio:.3f}", f"{flop_ratio:.4f}"] if dora else ["", ""]
            rows.append(row)
    return harness.table(head, rows)


def build_summary(results: list[Result], tokens: int) -> str:
    head = ["kernel", "rank", "DoRA/LoRA step", "stacked DoRA/LoRA", "flop ratio", "1 + r/(2N)"]
    head += ["DoRA - LoRA temp MiB", "one N x out activation MiB", "max rel. err", "rounds"]
    rows = []
    for r in results:
        fan_out = r.kernel[1]
        row = [f"{r.kernel[0]}x{r.kernel[1]}", r.rank]
        row += [f"{r.ms['DoRA step'] / r.ms['LoRA step']:.3f}"]
        row += [f"{r.ms[STACKED] / r.ms['LoRA step']:.3f}" if STACKED in r.ms else "-"]
        row += [f"{r.flops['DoRA step'] / r.flops['LoRA step']:.4f}"]
        row += [f"{1 + r.rank / (2 * tokens):.4f}"]
        activation = tokens * fan_out * jnp.dtype(DTYPE).itemsize
        row += [mib(r.temp["DoRA step"] - r.temp["LoRA step"]), mib(activation)]
        row += [f"{max(r.errors.values()):.1e}", r.rounds]
        rows.append(row)
    return harness.table(head, rows)


def build_peak_table(results: list[Result], tokens: int) -> str:
    """XLA's peak live set of the two steps, and its activation-sized buffers."""
    head = ["kernel", "rank", "LoRA peak MiB", "DoRA peak MiB", "DoRA - LoRA MiB"]
    head += ["LoRA buffers >= half an activation", "DoRA buffers >= half an activation"]
    rows = []
    for r in results:
        lora, dora = r.peaks["LoRA step"], r.peaks["DoRA step"]
        row = [f"{r.kernel[0]}x{r.kernel[1]}", r.rank]
        if lora is None or dora is None:
            rows.append(row + ["-"] * 5)
            continue
        half = tokens * r.kernel[1] * jnp.dtype(DTYPE).itemsize // 2
        row += [mib(lora.bytes), mib(dora.bytes), mib(dora.bytes - lora.bytes)]
        row += [lora.largest(half) or "-", dora.largest(half) or "-"]
        rows.append(row)
    return harness.table(head, rows)


def main(argv=None) -> int:
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run on the CPU with tiny shapes (256x256 and 256x512, 64 tokens, ranks 4, 8)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=210.0,
        help="total seconds to aim for, compilation included; later (kernel, rank) pairs "
        "are skipped once it is spent (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, help="interleaved rounds at most")
    parser.add_argument(
        "--tol", type=float, default=2e-2, help="max. relative error allowed (%(default)s)"
    )
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument(
        "--no-llama", action="store_true", help="skip the Llama-shaped model (part c)"
    )
    args = parser.parse_args(argv)

    if not args.cpu_smoke and not gpu_available():
        print(
            f"benchmarks/gpu.py: no GPU (jax backend {jax.default_backend()!r}); nothing to "
            f"measure, exiting. Use --cpu-smoke to test the script on the CPU with tiny shapes."
        )
        return 0
    cfg = SMOKE_CONFIG if args.cpu_smoke else GPU_CONFIG
    if args.repeats:
        cfg = cfg._replace(repeats=args.repeats)
    device = jax.devices("cpu")[0] if args.cpu_smoke else jax.devices("gpu")[0]
    print(harness.banner("jax", "jaxlib", "flax", "optax", backend=False))
    print(
        f"device: {device.device_kind} ({device.platform}, {len(jax.devices(device.platform))} "
        f"device(s)){'  [--cpu-smoke: tiny shapes]' if args.cpu_smoke else ''}"
    )
    print(
        f"bfloat16 kernels {', '.join(f'{a}x{b}' for a, b in cfg.kernels)}, {cfg.tokens} "
        f"tokens, ranks {', '.join(map(str, cfg.ranks))}, alpha = 2 * rank, AdamW; "
        f"budget {args.budget_s:.0f} s",
        flush=True,
    )
    results: list[Result] = []
    skipped: list[str] = []
    pairs = [(kernel, rank) for kernel in cfg.kernels for rank in cfg.ranks]
    with jax.default_device(device):
        x = jax.random.normal(jax.random.key(1), (cfg.tokens, cfg.kernels[0][0]), jnp.float32)
        x = x.astype(DTYPE)
        base_for: dict[tuple[int, int], Timed] = {}
        for index, (kernel, rank) in enumerate(pairs):
            elapsed = time.perf_counter() - start
            if elapsed > args.budget_s:
                skipped.append(f"{kernel[0]}x{kernel[1]} r={rank}")
                continue
            print(f"kernel {kernel[0]}x{kernel[1]}, rank {rank} (at {elapsed:.0f} s)", flush=True)
            if kernel not in base_for:
                w0 = jax.random.normal(jax.random.key(2), kernel, jnp.float32) / math.sqrt(
                    kernel[0]
                )
                base_for[kernel] = base_forward(w0.astype(DTYPE), x[:, : kernel[0]])
            left = len(pairs) - index

            def time_slice(setup_s, left=left):
                # Leave each later pair as much setup time as this one took.
                remaining = args.budget_s - (time.perf_counter() - start)
                return max(0.0, remaining - (left - 1) * setup_s) / left

            result = measure(
                kernel,
                rank,
                cfg.tokens,
                base_for[kernel],
                x[:, : kernel[0]],
                cfg,
                time_slice,
                args.tol,
            )
            print(
                f"  setup (init, check, compile, warm-up) {result.setup_s:.1f} s, "
                f"{result.rounds} rounds: "
                + ", ".join(f"{k} {v:.3f} ms" for k, v in result.ms.items()),
                flush=True,
            )
            results.append(result)
        llama_rows = []
        if not args.no_llama:
            shape = LLAMA_SMOKE if args.cpu_smoke else LLAMA_GPU
            print(
                f"Llama-shaped model: {shape.describe()} (at {time.perf_counter() - start:.0f} s)"
            )
            llama_rows = measure_llama(shape, cfg.repeats)
    table = build_table(results, cfg.tokens)
    summary = build_summary(results, cfg.tokens)
    print(f"\nbfloat16, {cfg.tokens} tokens; medians per call (ms):\n")
    print(table)
    print("\nDoRA against LoRA (floor from docs/design.md section 3; all checks passed):\n")
    print(summary)
    peaks = build_peak_table(results, cfg.tokens)
    print("\nPeak live memory of the steps (XLA's live-range analysis, arguments excluded):\n")
    print(peaks)
    llama_table = harness.table(LLAMA_HEAD, llama_rows) if llama_rows else ""
    if llama_table:
        print(
            f"\nLlama-shaped model, rank {llm_step.RANK} on {', '.join(llm_step.TARGETS)}; "
            "bfloat16 base, float32 adapters; medians per step:\n"
        )
        print(llama_table)
    if skipped:
        print(f"\nskipped (over the {args.budget_s:.0f} s budget): {', '.join(skipped)}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n\n" + summary + "\n\n" + peaks + "\n")
            if llama_table:
                f.write("\n" + llama_table + "\n")
    if importlib.util.find_spec("qwix") is not None:
        import qwix_step  # DoRA / qwix-LoRA step time on float, int8 and NF4 bases

        print("\nDoRA through qwix against qwix's LoRA (benchmarks/qwix_step.py):\n", flush=True)
        qwix_step.main(
            ["--layers", "1", "--batch", "2", "--seq", "16", "--repeats", "2", "--steps", "1"]
            if args.cpu_smoke
            else ["--layers", "6", "--batch", "8", "--seq", "512", "--repeats", "5"]
        )
    print(f"\ntotal wall time {time.perf_counter() - start:.1f} s (after imports)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
