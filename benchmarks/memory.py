"""Where DoRA's training memory goes: XLA's temp allocation and its peak live set.

Run: ``python benchmarks/memory.py`` (about a minute; compiles, never runs a step).

For the stacks of ``benchmarks/step_time.py`` it compiles LoRA's and DoRA's training step
and reports two exact, repeatable figures per step:

* **temp**: ``compiled.memory_analysis().temp_size_in_bytes``, the scratch allocation
  XLA's heap simulator packed all temporaries into (including any space lost to
  packing buffers of different sizes and lifetimes);
* **peak live**: the bytes of every buffer that is not an argument, alive at the
  program's point of peak memory, from XLA's own live-range analysis (the
  ``*-live-range.txt`` file XLA writes with ``--xla_dump_to``). This is what the step
  needs at its worst moment, independent of how the allocator packs it.

Both are compared with the allowance ``layers * tokens * out * 4`` bytes: the one
``tokens x out`` activation per adapted layer that the magnitude's gradient needs.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

# XLA reads its flags when the backend starts: set them before importing jax.
DUMP_DIR = tempfile.mkdtemp(prefix="dora_jax_memory_")
atexit.register(shutil.rmtree, DUMP_DIR, ignore_errors=True)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP_DIR} --xla_dump_hlo_module_re=step"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # noqa: E402

PARAMETER = re.compile(r"%(\S+) = \S+ parameter\(\d+\)")
LIVE = re.compile(r"^\s+(\S+)\{[^}]*\}: (\d+) bytes", re.MULTILINE)


def newest_dump(suffix: str) -> Path | None:
    files = sorted(Path(DUMP_DIR).glob(f"*jit_step*{suffix}"))
    return files[-1] if files else None


def peak_live_bytes() -> int | None:
    """Bytes of non-argument buffers live at the peak of the last compiled step."""
    ranges, program = newest_dump("-live-range.txt"), newest_dump("after_optimizations.txt")
    if ranges is None or program is None:
        return None
    text = ranges.read_text()
    start = text.find("(peak):")
    if start < 0:
        return None
    peak = text[start : text.find("Stack trace", start)]
    entry = program.read_text()
    entry = entry[entry.find("ENTRY") :]
    arguments = set(PARAMETER.findall(entry))
    return sum(int(n) for name, n in LIVE.findall(peak) if name not in arguments)


def measure(name: str, width: int, layers: int, tokens: int) -> tuple[int, int | None]:
    x = jax.random.normal(jax.random.key(1), (tokens, width), jnp.float32)
    optimizer = optax.adamw(1e-3)
    apply, frozen, trainable = step_time.make_variant(name, width, layers, x)
    step, _ = step_time.make_step(apply, optimizer)
    compiled = step.lower(trainable, optimizer.init(trainable), frozen, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes, peak_live_bytes()


def main() -> None:
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, rank {step_time.RANK}")
    head = ["width", "layers", "tokens", "allowance B", "LoRA temp B", "DoRA temp B"]
    head += ["temp: DoRA - LoRA - allowance", "LoRA peak live B", "DoRA peak live B"]
    head += ["peak: DoRA - LoRA - allowance", "per layer, in units of out * 4 B"]
    print(step_time.fmt_row(head))
    print(step_time.fmt_row(["---"] * len(head)))
    for width, layers, tokens in step_time.SHAPES:
        lora_temp, lora_peak = measure("lora", width, layers, tokens)
        dora_temp, dora_peak = measure("dora", width, layers, tokens)
        allowance = layers * tokens * width * 4
        row = [width, layers, tokens, allowance, lora_temp, dora_temp]
        row.append(dora_temp - lora_temp - allowance)
        if lora_peak is None or dora_peak is None:
            row += ["-", "-", "-", "-"]
        else:
            excess = dora_peak - lora_peak - allowance
            row += [lora_peak, dora_peak, excess, f"{excess / (layers * width * 4):.2f}"]
        print(step_time.fmt_row([str(c) for c in row]), flush=True)


if __name__ == "__main__":
    main()
