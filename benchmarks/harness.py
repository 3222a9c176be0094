"""What every benchmark shares: the environment banner, the interleaved timer, tables.

* :func:`banner`: one line naming the package versions, the backend, the CPUs and the
  Python version, so a printed table says where it was measured;
* :class:`Timed` and :func:`interleave`: steps timed in interleaved rounds (each round
  runs every variant a few steps, in a rotating order, so background load hits all of
  them alike), with wall and process CPU seconds per step and medians over rounds;
* :func:`table`: a Markdown table.

Each script imports it as ``import harness`` (a script's own folder is on ``sys.path``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


def cpu_count() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, or ``"unknown"``."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def banner(*packages: str, backend: bool = True, load: bool = False) -> str:
    """``"jax 0.x, flax 0.y, backend cpu (cpu), 2 CPUs, Python 3.z"``.

    Args:
      packages: distributions to name with their versions (default: jax).
      backend: also name JAX's default backend and its first device's kind.
      load: also give the load average.
    """
    parts = [f"{name} {version(name)}" for name in packages or ("jax",)]
    if backend:
        import jax

        parts.append(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})")
    parts += [f"{cpu_count()} CPUs", f"Python {platform.python_version()}"]
    if load:
        parts.append(f"load average {load_average()}")
    return ", ".join(parts)


def table(head: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; cells are printed with ``str``."""
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    return "\n".join([line(head), line(["---"] * len(head)), *map(line, rows)])


class Timed:
    """One variant's step, timed in rounds: ``(wall s, CPU s)`` per step, a list per round.

    ``step()`` runs ``inner`` calls of the variant to completion (blocking once) and
    returns its loss or output; a recorded time is the batch's time over ``inner``.
    Give ``step`` to the constructor or define it in a subclass.
    """

    first_loss = float("nan")  # what the very first step returned, if a scalar
    last = None  # what the latest step returned

    def __init__(self, name: str = "", step: Callable[[], Any] | None = None):
        self.name = name
        if step is not None:
            self.step = step
        self.inner = 1
        self.rounds: list[list[tuple[float, float]]] = []
        self.steps_done = 0

    def step(self):
        raise NotImplementedError

    def run(self, steps: int, record: bool = True) -> list[tuple[float, float]]:
        """Run ``steps`` timed batches; keep them as one round unless ``record=False``."""
        times = []
        for _ in range(steps):
            wall, cpu = time.perf_counter(), time.process_time()
            self.last = self.step()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            times.append((wall / self.inner, cpu / self.inner))
            if self.steps_done == 0 and getattr(self.last, "ndim", None) == 0:
                self.first_loss = float(self.last)
            self.steps_done += 1
        if record:
            self.rounds.append(times)
        return times

    def wall(self) -> list[float]:
        return [w for r in self.rounds for w, _ in r]

    def cpu(self) -> list[float]:
        return [c for r in self.rounds for _, c in r]

    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.wall())

    def cpu_ms(self) -> float:
        return 1e3 * statistics.median(self.cpu())


def rotations(items: Sequence, rounds: int) -> Iterator[tuple[int, Any]]:
    """``(round, item)`` for every item in every round, each round's order rotated by one."""
    items = list(items)
    for index in range(rounds):
        shift = index % len(items)
        for item in items[shift:] + items[:shift]:
            yield index, item


def interleave(timers: Sequence[Timed], rounds: int, steps: int, warmup: int = 2) -> None:
    """Warm every timer up (``warmup`` untimed steps), then time ``rounds`` rounds of
    ``steps`` steps each, rotating the order so that background load hits all alike."""
    for timer in timers:
        timer.run(warmup, record=False)
    for _, timer in rotations(timers, rounds):
        timer.run(steps)


def round_ratios(num: Timed, den: Timed) -> list[float]:
    """Per round: ``num``'s median wall time over ``den``'s in the same round."""
    return [
        statistics.median(w for w, _ in a) / statistics.median(w for w, _ in b)
        for a, b in zip(num.rounds, den.rounds, strict=True)
    ]


def paired_ratio(num: Timed, den: Timed) -> float:
    """Median over rounds of :func:`round_ratios`: robust to load that changes over time."""
    return statistics.median(round_ratios(num, den))


def load_example(name: str):
    """The module ``examples/<name>.py`` of this repository (not a package, not on the
    path), imported by file."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
