"""Where DoRA's training memory goes: XLA's temp allocation and its peak live set.

Run: ``python benchmarks/memory.py`` (about 10 seconds; compiles, never runs a step).

For the stacks of ``benchmarks/step_time.py`` it compiles LoRA's and DoRA's training step
and reports two exact, repeatable figures per step:

* **temp**: ``compiled.memory_analysis().temp_size_in_bytes``, the scratch allocation
  XLA's heap simulator packed all temporaries into (including any space lost to
  packing buffers of different sizes and lifetimes);
* **peak live**: the bytes of every buffer that is not an argument, alive at the
  program's point of peak memory, from XLA's own live-range analysis (the
  ``*-live-range.txt`` file XLA writes with ``--xla_dump_to``). This is what the step
  needs at its worst moment, independent of how the allocator packs it.

Both are compared with the allowance ``layers * tokens * out * itemsize`` bytes: the one
``tokens x out`` activation per adapted layer that the magnitude's gradient needs
(``--dtype bfloat16``: base weights and activations in bfloat16, 2 bytes).

:func:`dump_xla` and :func:`peak_live` are also used by ``benchmarks/gpu.py``.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

PARAMETER = re.compile(r"%(\S+) = \S+ parameter\(\d+\)")
SHAPE = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{[^}]*\})? ", re.MULTILINE)
LIVE = re.compile(r"^\s+(\S+)\{[^}]*\}: (\d+) bytes", re.MULTILINE)


def dump_xla(module_regex: str = "step") -> Path:
    """Make XLA dump the programs whose name matches ``module_regex`` to a temporary
    folder (removed at exit); return it. Call before JAX compiles anything: XLA reads
    its flags when the backend starts."""
    folder = Path(tempfile.mkdtemp(prefix="dora_jax_xla_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    flags = f" --xla_dump_to={folder} --xla_dump_hlo_module_re={module_regex}"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + flags
    return folder


class PeakLive(NamedTuple):
    """Non-argument buffers alive at a program's point of peak memory."""

    bytes: int
    buffers: tuple[tuple[str, int], ...]  # (shape, bytes), largest first

    def largest(self, at_least: int) -> str:
        """``"2 x f32[128,4096], 1 x bf16[...]"`` for the buffers of ``at_least`` bytes."""
        counts = collections.Counter(shape for shape, n in self.buffers if n >= at_least)
        return ", ".join(f"{count} x {shape}" for shape, count in counts.most_common())


def peak_live(folder: Path, module: str = "jit_step") -> PeakLive | None:
    """The peak live set of the newest program named ``module`` dumped to ``folder``.

    ``None`` where XLA wrote no live-range analysis (older or other backends).
    """
    newest = lambda suffix: max(folder.glob(f"*{module}*{suffix}"), default=None)  # noqa: E731
    ranges, program = newest("-live-range.txt"), newest("after_optimizations.txt")
    if ranges is None or program is None:
        return None
    text = ranges.read_text()
    start = text.find("(peak):")
    if start < 0:
        return None
    peak = text[start : text.find("Stack trace", start)]
    hlo = program.read_text()
    arguments = set(PARAMETER.findall(hlo[hlo.find("ENTRY") :]))
    shapes = dict(SHAPE.findall(hlo))
    buffers = sorted(
        (
            (shapes.get(name, name), int(n))
            for name, n in LIVE.findall(peak)
            if name not in arguments
        ),
        key=lambda item: -item[1],
    )
    return PeakLive(sum(n for _, n in buffers), tuple(buffers))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="base weights and computation (adapters stay float32)",
    )
    args = parser.parse_args(argv)
    folder = dump_xla()
    import harness
    import jax
    import jax.numpy as jnp
    import optax
    import step_time

    def measure(name: str, width: int, layers: int, tokens: int) -> tuple[int, int | None]:
        x = jax.random.normal(jax.random.key(1), (tokens, width), jnp.float32)
        x = x.astype(args.dtype)
        optimizer = optax.adamw(1e-3)
        apply, frozen, trainable = step_time.make_variant(name, width, layers, x)
        step, _ = step_time.make_step(apply, optimizer)
        compiled = step.lower(trainable, optimizer.init(trainable), frozen, x).compile()
        peak = peak_live(folder)
        return compiled.memory_analysis().temp_size_in_bytes, peak and peak.bytes

    itemsize = jnp.dtype(args.dtype).itemsize
    print(
        f"{harness.banner()}; rank {step_time.RANK}, {args.dtype}; "
        f"allowance = layers * tokens * out * {itemsize} B"
    )
    head = ["width", "layers", "tokens", "allowance B", "LoRA temp B", "DoRA temp B"]
    head += ["temp: DoRA - LoRA - allowance", "LoRA peak live B", "DoRA peak live B"]
    head += ["peak: DoRA - LoRA - allowance", "per layer, in units of out * 4 B"]
    head += ["peak: DoRA - LoRA, activations per layer"]
    rows = []
    for width, layers, tokens in step_time.SHAPES:
        lora_temp, lora_peak = measure("lora", width, layers, tokens)
        dora_temp, dora_peak = measure("dora", width, layers, tokens)
        allowance = layers * tokens * width * itemsize
        row = [width, layers, tokens, allowance, lora_temp, dora_temp]
        row.append(dora_temp - lora_temp - allowance)
        if lora_peak is None or dora_peak is None:
            row += ["-"] * 5
        else:
            excess = dora_peak - lora_peak - allowance
            row += [lora_peak, dora_peak, excess, f"{excess / (layers * width * 4):.2f}"]
            row.append(f"{(dora_peak - lora_peak) / allowance:.2f}")
        rows.append(row)
    print(harness.table(head, rows), flush=True)


if __name__ == "__main__":
    main()
