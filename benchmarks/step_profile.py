"""Where the time of step_time.py's training steps goes, per XLA operation.

Run: ``python benchmarks/step_profile.py`` (about a minute on a 2-core CPU).

For one stack of ``benchmarks/step_time.py`` and each of its ``--patterns`` (the frozen
variables as arguments of the jitted step, closed over, or closed over with the batch),
compiles the training step of each variant, runs them all in interleaved rounds under
``jax.profiler`` and sums the time of every operation of the compiled programs (XLA's CPU
runtime records one event per operation, named after the HLO instruction). A plain
``dot`` (not one of the ``ynn_fusion`` products) runs on XLA's Eigen thread pool after its
event closes, so its time is not in the sums; the last table times the products alone
instead. Operations are sorted into:

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
import bisect
import functools
import glob
import re
import statistics
import sys
import tempfile

import harness
import jax
import jax.numpy as jnp
import optax
from step_time import PATTERNS, RANK, Runner, add_variant_arguments, chosen_variants, parse_shapes

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


def profile_interleaved(runners: list[Runner], rounds: int, steps: int) -> list[list[dict]]:
    """Per runner, per round: ``{HLO operation: seconds per step}``.

    All runners run in the same trace, in interleaved rounds (rotating order), each
    round's steps inside a ``TraceAnnotation``; an operation event belongs to the
    annotation its start falls in.
    """
    from jax.profiler import ProfileData

    for runner in runners:
        runner.run(2, record=False)
    spans: list[tuple[int, int]] = []  # (runner index, round) in annotation order
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for round_index, index in harness.rotations(range(len(runners)), rounds):
                with jax.profiler.TraceAnnotation(f"step_profile/{len(spans)}"):
                    runners[index].run(steps)
                spans.append((index, round_index))
        (path,) = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)
        data = ProfileData.from_file(path)
    windows, events = [], []
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name.startswith("step_profile/"):
                    windows.append((event.start_ns, event.end_ns, int(event.name.split("/")[1])))
                    continue
                stats = dict(event.stats)
                if stats.get("hlo_module") == "jit_step" and "hlo_op" in stats:
                    events.append((event.start_ns, stats["hlo_op"], event.duration_ns))
    windows.sort()
    times = [[{} for _ in range(rounds)] for _ in runners]
    starts = [w[0] for w in windows]
    for start, op, duration in events:
        i = bisect.bisect_right(starts, start) - 1
        if i < 0 or start > windows[i][1]:
            continue
        index, round_index = spans[windows[i][2]]
        per_op = times[index][round_index]
        per_op[op] = per_op.get(op, 0.0) + duration * 1e-9 / steps
    return times


def analyse(runner: Runner, rounds: list[dict], width: int, tokens: int) -> dict:
    """Facts of ``runner``'s compiled program and its time per step by kind of operation
    (medians over rounds)."""
    hlo = runner.compiled.as_text()
    ops = entry_instructions(hlo)
    kernel_shape = f"{jnp.dtype(runner.x.dtype).name.replace('float', 'f')}[{width},{width}]"

    def reads_kernel(info):
        return any(ops.get(o, {}).get("shape") == kernel_shape for o in info["operands"])

    kernel_ops = {n: i for n, i in ops.items() if i["opcode"] != "parameter" and reads_kernel(i)}
    products = {
        n
        for n, i in ops.items()
        if n not in kernel_ops
        and (i["opcode"] == "dot" or (i["opcode"] == "fusion" and n.startswith("ynn_fusion")))
        and not i["shape"].startswith("f32[]")
    }
    # Constants with an operation's metadata were computed by XLA, not closed over; XLA
    # may have moved them into a fused computation, so every computation is searched.
    computed = (f"[{tokens},{width}]", f"[{width}]")
    folded = []
    for line in hlo.splitlines():
        match, op_name = INSTRUCTION.match(line), OP_NAME.search(line)
        if match and op_name and match.group(3) == "constant":
            shape = match.group(2).split("{")[0]
            if shape.endswith(computed):
                info = {"op_name": op_name.group(1), "operands": []}
                folded.append(f"{shape} ({where(info)})")

    def median_ms(names) -> float:
        return 1e3 * statistics.median(sum(r.get(n, 0.0) for n in names) for r in rounds)

    return {
        "kernel_ops": [
            (n, i["shape"], where(i), i["opcode"], median_ms([n])) for n, i in kernel_ops.items()
        ],
        "w0_ms": median_ms(kernel_ops),
        "products_ms": median_ms(products),
        "total_ms": median_ms({op for r in rounds for op in r}),
        "wall_ms": 1e3 * statistics.median(runner.wall()),
        "concatenate": "concatenate" in hlo,
        "folded": folded,
    }


def product_times(width: int, tokens: int, rounds: int) -> dict[str, float]:
    """Median ms of the kernel products alone, with ``W0`` an argument or a constant."""
    keys = jax.random.split(jax.random.key(0), 3)
    w0 = jax.random.normal(keys[0], (width, width))
    x = jax.random.normal(keys[1], (tokens, width))
    a = jax.random.normal(keys[2], (width, RANK))
    a_t_w = functools.partial(jnp.einsum, "ir,io->ro")
    cases = {
        "x @ W0, W0 an argument": (jax.jit(lambda x, w: x @ w), (x, w0)),
        "x @ W0, W0 a constant": (jax.jit(lambda x: x @ w0), (x,)),
        "A^T W0, W0 an argument": (jax.jit(a_t_w), (a, w0)),
        "A^T W0, W0 a constant": (jax.jit(lambda a: a_t_w(a, w0)), (a,)),
        "[x; A^T] @ W0, W0 an argument": (
            jax.jit(lambda x, a, w: jnp.concatenate([x, a.T]) @ w),
            (x, a, w0),
        ),
    }
    timers = [
        harness.Timed(name, functools.partial(_blocking, fn, args))
        for name, (fn, args) in cases.items()
    ]
    harness.interleave(timers, rounds, steps=1, warmup=1)
    return {timer.name: timer.median_ms() for timer in timers}


def _blocking(fn, args):
    return fn(*args).block_until_ready()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape",
        type=parse_shapes,
        default=[(4096, 2, 128)],
        help="WIDTHxLAYERSxTOKENS (default: 4096x2x128)",
    )
    add_variant_arguments(parser, "lora,dora-stacked,dora,dora-nocache", ",".join(PATTERNS))
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds (default: %(default)s)"
    )
    parser.add_argument(
        "--steps", type=int, default=2, help="steps per variant per round (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    ((width, layers, tokens),) = args.shape
    variants, patterns = chosen_variants(parser, args)
    print(
        f"{harness.banner(load=True)}; stack {width}x{layers}x{tokens}, "
        f"{args.rounds} rounds x {args.steps} steps",
        flush=True,
    )
    x = jax.random.normal(jax.random.key(1), (tokens, width), jnp.float32)
    keys = [(pattern, name) for pattern in patterns for name in variants]
    runners = [Runner(name, width, layers, x, optax.adamw(1e-3), p) for p, name in keys]
    times = profile_interleaved(runners, args.rounds, args.steps)
    results = {
        key: analyse(runner, rounds, width, tokens)
        for key, runner, rounds in zip(keys, runners, times, strict=True)
    }
    head = ["pattern", "variant", "step ms (wall)", "sum of ops ms", "ops reading a W0"]
    head += ["their ms", "other products ms", "[x; A^T] stacked", "computed constants"]
    print("\nTime per step (medians over rounds; operations as jax.profiler times them):\n")
    rows = []
    for (pattern, name), r in results.items():
        row = [pattern, name, f"{r['wall_ms']:.1f}", f"{r['total_ms']:.1f}"]
        row += [str(len(r["kernel_ops"])), f"{r['w0_ms']:.1f}", f"{r['products_ms']:.1f}"]
        row += ["yes" if r["concatenate"] else "no", ", ".join(r["folded"]) or "none"]
        rows.append(row)
    print(harness.table(head, rows))
    head = ["pattern", "variant", "operation", "result", "where", "ms per step"]
    print("\nOperations reading a frozen kernel:\n")
    rows = []
    for (pattern, name), r in results.items():
        for op, shape, place, opcode, ms in sorted(r["kernel_ops"], key=lambda k: k[2]):
            # XLA's CPU runtime runs a plain dot on its Eigen pool after the event closes.
            timed = f"{ms:.1f}" if opcode != "dot" else "(not timed: asynchronous dot)"
            rows.append([pattern, name, op, shape, place, timed])
    print(harness.table(head, rows))
    print(f"\nThe kernel products alone ({width}x{width} kernel, {tokens} tokens, rank {RANK}):\n")
    products = product_times(width, tokens, args.rounds * args.steps)
    print(harness.table(["product", "median ms"], [[k, f"{v:.1f}"] for k, v in products.items()]))
    print(f"\nload average at end: {harness.load_average()}")


if __name__ == "__main__":
    sys.exit(main())
