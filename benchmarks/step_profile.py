"""Where the time of step_time.py's training steps goes, per XLA operation.

Run: ``python benchmarks/step_profile.py`` (about a minute on a 2-core CPU).

For one stack of ``benchmarks/step_time.py`` and each of its ``--patterns`` (the frozen
variables as arguments of the jitted step, closed over, or closed over with the batch),
compiles the training step of each variant, runs it under ``jax.profiler`` and sums the
time of every operation of the compiled program (XLA's CPU runtime records one event per
operation, named after the HLO instruction). Operations are sorted into:

* ``W0 ops``: those reading a frozen kernel ``(in, out)`` (an argument or, when closed
  over, a constant of the program): ``x @ W0``, ``dy @ W0^T``, ``A^T W0``, the stacked
  ``[x; A^T] @ W0`` and, without the cache, ``||W0||_c^2``;
* ``other products``: the rank-``r`` products (``x @ A``, ``(xA) @ B`` and their
  gradients);
* ``other``: elementwise passes, reductions, copies, the optimizer.

Besides times, it reads facts off the compiled program text
(``jitted.lower(...).compile().as_text()``): how many operations read a kernel, whether a
``[x; A^T]`` concatenation is there, and which ``(tokens, out)`` or ``(out,)`` constants
XLA computed at compile time (constant folding of ``x @ W0`` and of ``||W0||_c^2``).
A second table lists every operation that reads a kernel, with the layer and the
direction (forward or backward) from the operation's metadata.
"""

from __future__ import annotations

import argparse
import glob
import re
import statistics
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

# The repository's own package, also when it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_time import PATTERNS, Runner, fmt_row, load_average, parse_shapes  # noqa: E402

INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = (\S+) (\S+?)\((.*?)\)(?:,|$)")
OP_NAME = re.compile(r'op_name="([^"]*)"')


def entry_instructions(hlo_text: str) -> dict[str, dict]:
    """``{name: {"shape", "opcode", "operands", "op_name"}}`` of the entry computation."""
    entry = hlo_text[hlo_text.index("\nENTRY") :]
    found = {}
    for line in entry.splitlines()[1:]:
        match = INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, operands = match.groups()
        op_name = OP_NAME.search(line)
        found[name] = {
            "shape": shape.split("{")[0],
            "opcode": opcode,
            "operands": re.findall(r"%([\w.\-]+)", operands),
            "op_name": op_name.group(1) if op_name else "",
        }
    return found


def where(info: dict) -> str:
    """``layer_0 forward`` / ``layer_1 backward`` from an operation's metadata (or, for
    operations XLA made without any, ``layer_0`` from the names of their operands)."""
    op_name = info["op_name"]
    layer = re.search(r"layer_\d+", op_name or " ".join(info["operands"]))
    direction = "backward" if "transpose(" in op_name else "forward" if op_name else "?"
    return f"{layer.group(0) if layer else '-'} {direction}"


def profile_step(runner: Runner, steps: int) -> dict[str, float]:
    """Mean seconds per step of each HLO operation of ``runner``'s compiled step."""
    from jax.profiler import ProfileData

    runner.run(2, record=False)
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            runner.run(steps, record=False)
        (path,) = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)
        data = ProfileData.from_file(path)
    totals: dict[str, float] = {}
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if stats.get("hlo_module") == "jit_step" and "hlo_op" in stats:
                    op = stats["hlo_op"]
                    totals[op] = totals.get(op, 0.0) + event.duration_ns * 1e-9 / steps
    return totals


def analyse(runner: Runner, steps: int, width: int, tokens: int) -> dict:
    hlo = runner.compiled.as_text()
    ops = entry_instructions(hlo)
    kernel_shape = f"{jnp.dtype(runner.x.dtype).name.replace('float', 'f')}[{width},{width}]"

    def reads_kernel(info):
        return any(ops.get(o, {}).get("shape") == kernel_shape for o in info["operands"])

    times = profile_step(runner, steps)
    kernel_ops = {n: i for n, i in ops.items() if i["opcode"] != "parameter" and reads_kernel(i)}
    products = {
        n
        for n, i in ops.items()
        if n not in kernel_ops
        and (i["opcode"] == "dot" or (i["opcode"] == "fusion" and n.startswith("ynn_fusion")))
        and not i["shape"].startswith("f32[]")
    }
    # Constants with an operation's metadata were computed by XLA, not closed over.
    computed = (f"[{tokens},{width}]", f"[{width}]")
    folded = [
        f"{i['shape']} ({where(i)})"
        for i in ops.values()
        if i["opcode"] == "constant" and i["op_name"] and i["shape"].endswith(computed)
    ]
    total = sum(times.values())
    w0 = sum(times.get(n, 0.0) for n in kernel_ops)
    other_products = sum(times.get(n, 0.0) for n in products)
    return {
        "kernel_ops": [(n, i["shape"], where(i), times.get(n, 0.0)) for n, i in kernel_ops.items()],
        "w0_ms": 1e3 * w0,
        "products_ms": 1e3 * other_products,
        "other_ms": 1e3 * (total - w0 - other_products),
        "total_ms": 1e3 * total,
        "concatenate": "concatenate" in hlo,
        "folded": folded,
        "wall_ms": 1e3 * statistics.median(runner.wall()) if runner.rounds else float("nan"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape",
        type=parse_shapes,
        default=[(4096, 2, 128)],
        help="WIDTHxLAYERSxTOKENS (default: 4096x2x128)",
    )
    parser.add_argument(
        "--patterns",
        default=",".join(PATTERNS),
        help=f"comma-separated, from {', '.join(PATTERNS)} (default: all)",
    )
    parser.add_argument(
        "--variants",
        default="lora,dora-stacked,dora,dora-nocache",
        help="step_time.py variants (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="profiled steps per variant (default: 10)"
    )
    args = parser.parse_args(argv)
    ((width, layers, tokens),) = args.shape
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    if set(patterns) - set(PATTERNS):
        parser.error(f"--patterns takes {', '.join(PATTERNS)}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, stack {width}x{layers}x"
        f"{tokens}, {args.steps} profiled steps, load average {load_average()}",
        flush=True,
    )
    x = jax.random.normal(jax.random.key(1), (tokens, width), jnp.float32)
    results = {}
    for pattern in patterns:
        for name in variants:
            runner = Runner(name, width, layers, x, optax.adamw(1e-3), pattern)
            results[pattern, name] = analyse(runner, args.steps, width, tokens)
            del runner
    head = ["pattern", "variant", "ops reading a W0", "W0 ops ms", "other products ms"]
    head += ["other ms", "sum of ops ms", "[x; A^T] stacked", "folded constants"]
    print("\nTime per step by kind of operation (jax.profiler, summed per operation):\n")
    print(fmt_row(head))
    print(fmt_row(["---"] * len(head)))
    for (pattern, name), r in results.items():
        folded = ", ".join(r["folded"]) or "none"
        row = [pattern, name, str(len(r["kernel_ops"])), f"{r['w0_ms']:.1f}"]
        row += [f"{r['products_ms']:.1f}", f"{r['other_ms']:.1f}", f"{r['total_ms']:.1f}"]
        row += ["yes" if r["concatenate"] else "no", folded]
        print(fmt_row(row))
    head = ["pattern", "variant", "operation", "result", "where", "ms per step"]
    print("\nOperations reading a frozen kernel:\n")
    print(fmt_row(head))
    print(fmt_row(["---"] * len(head)))
    for (pattern, name), r in results.items():
        for op, shape, place, seconds in sorted(r["kernel_ops"], key=lambda k: k[2]):
            print(fmt_row([pattern, name, op, shape, place, f"{1e3 * seconds:.1f}"]))
    print(f"\nload average at end: {load_average()}")


if __name__ == "__main__":
    sys.exit(main())
