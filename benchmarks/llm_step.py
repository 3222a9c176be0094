"""Training step of a Llama-shaped decoder: dora-jax DoRA / LoRA, and PEFT on the torch twin.

Run: ``python benchmarks/llm_step.py`` (80 s on a quiet 2-core CPU; 10 to 19 minutes on one
shared with other jobs, where torch's threads suffer most: run it on a quiet machine).

The model is ``examples/llama.py`` at width 1024: 4 decoder layers, 16 attention heads of
64 and 4 key-value heads (grouped-query attention, as Llama 3), SwiGLU MLP of 2816, an
untied head over a vocabulary of 4096, float32 (``--dtype bfloat16``: the frozen base
in bfloat16 on both sides, the adapters float32, PEFT's default); one sequence of 512
tokens. Adapters of rank 16 (alpha 16) sit on all seven projections (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``) of every
layer. The loss is the causal-LM cross-entropy of the sequence on itself (Hugging Face's
``labels=input_ids``); one AdamW step (lr 1e-3, weight decay 1e-2) over the adapters
only. Four variants, timed in one process in interleaved rounds:

* ``jax-lora`` / ``jax-dora``: ``dora_jax.nnx.apply_dora`` on the NNX model
  (``use_dora=False`` / ``True``; DoRA with ``cache_base_norms``), one step of
  ``dora_jax.train.make_train_step`` compiled by ``train.jit_step(donate=True)``, the
  frozen base an argument;
* ``peft-lora`` / ``peft-dora``: ``transformers.LlamaForCausalLM`` with the same weights
  (the JAX model is loaded from its ``save_pretrained`` folder) wrapped by
  ``peft.get_peft_model(LoraConfig(r=16, lora_alpha=16, target_modules=<the seven>,
  use_dora=...))``, ``torch.optim.AdamW`` over the trainable parameters,
  ``torch.set_num_threads(<CPUs available>)``, transformers' default attention (SDPA).

``lora_B`` is drawn from N(0, 0.02) rather than zero (so DoRA's norm is not trivially
``||W0||``) and the JAX adapters are loaded from PEFT's own folders
(``examples/hf_llm.py``'s ``load_adapter``), so both libraries start from the same
numbers: each variant's first-step loss is checked against its counterpart's.

Printed: median step times, DoRA / LoRA of each library and PEFT / dora-jax of each
method (ratios paired by round: the median over rounds of the ratio of the two
variants' medians in that round), process CPU time per step and the same ratios of it
(less sensitive to other processes on the cores; torch's count includes its threads'
spinning), and XLA's memory of the
compiled JAX steps (``jitted.lower(...).compile().memory_analysis()``: temporaries and
arguments). Goals: dora-jax DoRA / LoRA <= 1.08, PEFT DoRA / dora-jax DoRA >= 1.5.

Last, the bound this machine puts on any step: the rate of the step's largest product
(:func:`matmul_rate`, JAX and torch) and the time the step's matmul FLOPs
(:func:`step_flops`) take at the faster of the two, so PEFT DoRA over that time is the
largest speed-up over PEFT that any implementation could show here.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dora_jax
from dora_jax import train

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 16
ALPHA = 16
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-2
B_STD = 0.02
GOAL_RATIO = 1.08  # dora-jax DoRA / LoRA at most
GOAL_PEFT = 1.5  # PEFT DoRA / dora-jax DoRA at least


class Shape(NamedTuple):
    """A Llama-shaped decoder and its batch."""

    width: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    seq_len: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def hf(self) -> dict[str, Any]:
        """The ``config.json`` fields (Llama 3's, at this size)."""
        return {
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.width,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": max(self.seq_len, 2048),
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
        }

    def describe(self) -> str:
        return (
            f"width {self.width}, {self.layers} layers, {self.heads} heads "
            f"({self.kv_heads} key-value), MLP {self.intermediate}, vocabulary {self.vocab}, "
            f"{self.batch} x {self.seq_len} tokens"
        )


CPU_SHAPE = Shape(1024, 4, 16, 4, 2816, 4096, 1, 512)


def step_flops(shape: Shape, use_dora: bool, rank: int = RANK) -> float:
    """Matmul FLOPs of one adapter training step (elementwise work ignored).

    Forward: ``2 * tokens * (projections + head)`` plus attention's ``4 * layers *
    tokens * seq_len * heads * head_dim`` (the causal mask ignored); the backward pass
    computes input gradients only (the same again: no weight gradient of a frozen
    kernel). Each adapted ``in x out`` projection adds ``6 * tokens * r * (in + out)``
    (``x@A``, ``(xA)@B`` and their gradients) and, for DoRA, the norm's
    ``2 * r * in * out + 2 * r * r * (in + out)`` (``A^T W0``, ``A^T A``, ``(A^T A) B``).
    """
    n, d = shape.tokens, shape.width
    head_dim = d // shape.heads
    q, kv = shape.heads * head_dim, shape.kv_heads * head_dim
    projections = [(d, q), (d, kv), (d, kv), (q, d)] + [(d, shape.intermediate)] * 2
    projections += [(shape.intermediate, d)]
    base = sum(a * b for a, b in projections) * shape.layers + d * shape.vocab
    forward = 2 * n * base + 4 * shape.layers * n * shape.seq_len * q
    adapters = sum(6 * n * rank * (a + b) for a, b in projections) * shape.layers
    if use_dora:
        norms = sum(2 * rank * a * b + 2 * rank * rank * (a + b) for a, b in projections)
        adapters += norms * shape.layers
    return 2 * forward + adapters


def matmul_rate(shape: Shape, dtype: str = "float32", repeats: int = 20) -> dict[str, float]:
    """GFLOP/s of the step's largest product (``tokens x width`` times ``width x
    intermediate``, in ``dtype``, summed in float32) in JAX and in torch on this
    machine: medians of ``repeats`` calls. The faster of the two bounds any step here."""
    import torch

    rng = np.random.default_rng(0)
    lhs = rng.standard_normal((shape.tokens, shape.width), dtype=np.float32)
    rhs = rng.standard_normal((shape.width, shape.intermediate), dtype=np.float32)
    flops = 2 * lhs.shape[0] * lhs.shape[1] * rhs.shape[1]
    product = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
    jax_args = (jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype))
    torch_dtype = getattr(torch, dtype)
    torch_args = (torch.from_numpy(lhs).to(torch_dtype), torch.from_numpy(rhs).to(torch_dtype))
    calls = {
        "jax": lambda: product(*jax_args).block_until_ready(),
        "torch": lambda: torch.matmul(*torch_args),
    }
    rates = {}
    for name, call in calls.items():
        runner = harness.Timed(name, call)
        runner.run(2, record=False)
        runner.run(repeats)
        rates[name] = flops / runner.median_ms() / 1e6
    return rates


def load_examples():
    """``(llama, hf_llm)``: the example modules (``examples/`` is not a package)."""
    return harness.load_example("llama"), harness.load_example("hf_llm")


# ----- the JAX step ---------------------------------------------------------------------


def lm_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Next-token targets of every position but the last (Hugging Face's ``labels=tokens``)."""
    weights = np.ones(tokens.shape, np.float32)
    weights[:, -1] = 0.0
    return {
        "tokens": tokens.astype(np.int32),
        "targets": np.roll(tokens, -1, axis=1).astype(np.int32),
        "weights": weights,
    }


def lm_loss(logits: jax.Array, batch) -> jax.Array:
    """Mean cross-entropy over the weighted targets (all sequences have equal weights)."""
    logits = logits.astype(jnp.float32)
    target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target
    return jnp.sum(nll * batch["weights"]) / jnp.sum(batch["weights"])


class JaxStep(harness.Timed):
    """A jitted, donating training step of an adapted NNX model and its rolling state."""

    def __init__(self, name: str, model, batch, optimizer):
        super().__init__(name)
        graphdef, trainable, self.frozen = nnx.split(model, nnx.LoRAParam, ...)

        def forward(trainable, frozen, batch, rng):
            del rng
            return nnx.merge(graphdef, trainable, frozen)(batch["tokens"])

        step = train.make_train_step(forward, lm_loss, optimizer)
        self.state = train.init_state(nnx.to_pure_dict(trainable), optimizer)
        self.batch = jax.tree.map(jnp.asarray, batch)
        start = time.perf_counter()
        self.compiled = (
            train.jit_step(step, donate=True).lower(self.state, self.frozen, self.batch).compile()
        )
        self.compile_s = time.perf_counter() - start
        memory = self.compiled.memory_analysis()
        self.temp_bytes = float(getattr(memory, "temp_size_in_bytes", math.nan))
        self.arg_bytes = float(getattr(memory, "argument_size_in_bytes", math.nan))

    def step(self):
        self.state, metrics = self.compiled(self.state, self.frozen, self.batch)
        return jax.block_until_ready(metrics["loss"])


def adapted_jax_model(llama, shape: Shape, use_dora: bool, dtype, rngs: nnx.Rngs):
    """A randomly initialised model with adapters on the seven projections (B nonzero)."""
    config = llama.LlamaConfig.from_hf(shape.hf())
    model = llama.Llama(config, dtype=dtype, param_dtype=dtype, rngs=rngs)
    adapt(model, use_dora, rngs)
    for _, layer in nnx.iter_graph(model):
        if isinstance(layer, dora_jax.nnx.DoRALayer):
            b = layer.lora_b[...]
            layer.lora_b[...] = B_STD * jax.random.normal(rngs.params(), b.shape, b.dtype)
    return model


def adapt(model, use_dora: bool, rngs: nnx.Rngs):
    config = dora_jax.DoRAConfig(targets=list(TARGETS), rank=RANK, alpha=ALPHA, use_dora=use_dora)
    dora_jax.nnx.apply_dora(model, config, rngs=rngs)
    return config


# ----- the PyTorch twin -------------------------------------------------------------------


class TorchStep(harness.Timed):
    """A PEFT model's training step (``torch.optim.AdamW`` over the trainable parameters)."""

    def __init__(self, name: str, model, tokens):
        import torch

        super().__init__(name)
        self.model, self.tokens = model, torch.as_tensor(tokens, dtype=torch.long)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(input_ids=self.tokens, labels=self.tokens).loss
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def torch_twins(shape: Shape, seed: int, folder: Path, dtype: str = "float32"):
    """The transformers model (saved to ``folder/base`` in float32, then in ``dtype``)
    and its PEFT LoRA and DoRA models (float32 adapters saved to ``folder/lora`` and
    ``folder/dora``), same weights."""
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    fields = {k: v for k, v in shape.hf().items() if k != "model_type"}
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    base.save_pretrained(folder / "base")
    base = base.to(getattr(torch, dtype))  # PEFT keeps the adapters float32
    models = {}
    for kind in ("lora", "dora"):
        torch.manual_seed(seed + 1)  # the same A in both
        config = peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), use_dora=kind == "dora"
        )
        model = peft.get_peft_model(copy.deepcopy(base), config)
        generator = torch.Generator().manual_seed(seed + 2)  # the same B in both
        with torch.no_grad():
            for name, parameter in sorted(model.named_parameters()):
                if "lora_B" in name:
                    parameter.copy_(B_STD * torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(folder / kind)
        model.train()
        models[kind] = model
    return models


# ----- measurement ------------------------------------------------------------------------


def measure(
    shape: Shape, rounds: int, steps: int, seed: int, dtype: str = "float32"
) -> dict[str, harness.Timed]:
    llama, hf_llm = load_examples()
    tokens = np.random.default_rng(seed).integers(0, shape.vocab, (shape.batch, shape.seq_len))
    runners: dict[str, harness.Timed] = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        twins = torch_twins(shape, seed, folder, dtype)
        for kind in ("lora", "dora"):
            runners[f"peft-{kind}"] = TorchStep(f"peft-{kind}", twins[kind], tokens)
            model, _ = hf_llm.load_pretrained(folder / "base", dtype=jnp.dtype(dtype))
            hf_llm.load_adapter(model, folder / kind)  # PEFT's own adapters
            if kind == "dora":
                dora_jax.nnx.cache_base_norms(model)
            optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
            runners[f"jax-{kind}"] = JaxStep(f"jax-{kind}", model, lm_batch(tokens), optimizer)
            del model
    gc.collect()
    for name in ("jax-lora", "jax-dora"):
        print(f"  compiled {name} in {runners[name].compile_s:.1f} s", flush=True)
    for runner in runners.values():
        runner.run(1, record=False)
    check_first_losses(runners, 1e-4 if dtype == "float32" else 1e-3)
    harness.interleave(list(runners.values()), rounds, steps, warmup=1)
    return runners


def check_first_losses(runners, tolerance: float) -> None:
    notes = []
    for kind in ("lora", "dora"):
        mine, theirs = runners[f"jax-{kind}"].first_loss, float(runners[f"peft-{kind}"].first_loss)
        error = abs(mine - theirs) / abs(theirs)
        if not error <= tolerance:
            raise AssertionError(f"first-step loss of {kind}: dora-jax {mine}, PEFT {theirs}")
        notes.append(f"{kind} {theirs:.5f} (rel. diff {error:.1e})")
    print("  first-step losses agree with PEFT's: " + ", ".join(notes), flush=True)


def mib(n: float) -> str:
    return "-" if math.isnan(n) else f"{n / 2**20:.0f}"


def report(runners) -> str:
    head = ["variant", "median ms", "min ms", "CPU ms", "DoRA / LoRA", "PEFT / dora-jax"]
    head += ["DoRA / LoRA CPU", "PEFT / dora-jax CPU", "XLA temp MiB", "XLA argument MiB"]
    rows = []
    for name in ("peft-lora", "peft-dora", "jax-lora", "jax-dora"):
        runner = runners[name]
        library, kind = name.split("-")
        row = [f"{'PEFT' if library == 'peft' else 'dora-jax'} {kind.upper()}"]
        row += [f"{runner.median_ms():.0f}", f"{1e3 * min(runner.wall()):.0f}"]
        row += [f"{runner.cpu_ms():.0f}"]
        dora_lora = harness.paired_ratio(runner, runners[f"{library}-lora"])
        row += [f"{dora_lora:.3f}" if kind == "dora" else ""]
        versus = harness.paired_ratio(runners[f"peft-{kind}"], runner)
        row += [f"{versus:.2f}" if library == "jax" else ""]
        cpu_ratio = runner.cpu_ms() / runners[f"{library}-lora"].cpu_ms()
        row += [f"{cpu_ratio:.3f}" if kind == "dora" else ""]
        cpu_versus = runners[f"peft-{kind}"].cpu_ms() / runner.cpu_ms()
        row += [f"{cpu_versus:.2f}" if library == "jax" else ""]
        row += [mib(getattr(runner, "temp_bytes", math.nan))]
        row += [mib(getattr(runner, "arg_bytes", math.nan))]
        rows.append(row)
    return harness.table(head, rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    options = {  # flag: (type, default, help)
        "--rounds": (int, 6, "interleaved rounds"),
        "--steps": (int, 3, "steps per variant per round"),
        "--seed": (int, 0, "seed of the weights and the tokens"),
        "--torch-threads": (int, 0, "torch.set_num_threads (0: the CPUs available)"),
        "--markdown": (str, None, "also write the table to this file"),
    }
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the frozen base's dtype on both sides; adapters stay float32 (%(default)s)",
    )
    for flag, (kind, default, text) in options.items():
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (%(default)s)")
    args = parser.parse_args(argv)
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")  # torch runs on the CPU: like for like
    import torch

    torch.set_num_threads(args.torch_threads or harness.cpu_count())
    print(harness.banner("jax", "flax", "optax", "torch", "transformers", "peft", load=True))
    print(
        f"{CPU_SHAPE.describe()}; rank {RANK}, alpha {ALPHA} on {', '.join(TARGETS)}; "
        f"{args.dtype} base, float32 adapters, AdamW; torch threads "
        f"{torch.get_num_threads()}; {args.rounds} rounds x {args.steps} steps per variant",
        flush=True,
    )
    start = time.perf_counter()
    runners = measure(CPU_SHAPE, args.rounds, args.steps, args.seed, args.dtype)
    rates = matmul_rate(CPU_SHAPE, args.dtype)
    table = report(runners)
    dora_lora = harness.paired_ratio(runners["jax-dora"], runners["jax-lora"])
    versus = harness.paired_ratio(runners["peft-dora"], runners["jax-dora"])
    print(f"\nload average at end: {harness.load_average()}\n")
    print(table)
    peak = max(rates.values())
    floor_ms = step_flops(CPU_SHAPE, use_dora=True) / peak / 1e6
    print(
        f"\nmatmul rate ({CPU_SHAPE.tokens} x {CPU_SHAPE.width} @ {CPU_SHAPE.width} x "
        f"{CPU_SHAPE.intermediate}, {args.dtype}): "
        + ", ".join(f"{name} {rate:.0f} GFLOP/s" for name, rate in rates.items())
        + f"; the DoRA step's {step_flops(CPU_SHAPE, use_dora=True) / 1e9:.1f} GFLOP of "
        f"products alone take {floor_ms:.0f} ms at the faster rate, so no step here beats "
        f"PEFT's DoRA by more than {runners['peft-dora'].median_ms() / floor_ms:.2f}x"
    )
    print(
        f"\ndora-jax DoRA / LoRA {dora_lora:.3f} (goal <= {GOAL_RATIO}: "
        f"{'met' if dora_lora <= GOAL_RATIO else 'NOT met'}); PEFT DoRA / dora-jax DoRA "
        f"{versus:.2f} (goal >= {GOAL_PEFT}: {'met' if versus >= GOAL_PEFT else 'NOT met'})"
    )
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
