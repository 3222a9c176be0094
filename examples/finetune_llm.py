"""DoRA fine-tuning of a Llama-family decoder, from a Hugging Face folder to a PEFT adapter.

The model is ``examples/llama.py`` (Llama 2/3, Qwen 2/3, Mistral: whatever its
``LlamaConfig`` reads from ``config.json``), loaded by ``examples/hf_llm.py`` straight
onto a device mesh. DoRA goes on the attention and MLP projections
(``q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj``) by
``dora_jax.nnx.apply_dora``; the base stays frozen in ``--dtype`` (bfloat16 on
accelerators), the adapters are float32. The data are JSON lines of
``{"prompt": ..., "completion": ...}``; the loss is taken on the completion tokens only
(each sequence's mean over its completion tokens, averaged over the sequences, so that
accumulated and sharded steps equal one step on the whole batch). The held-out loss and
perplexity (a mean over all held-out completion tokens) and a few greedy generations
are shown before and after training.

A real checkpoint on a GPU or TPU host (one host, 8 accelerators, the frozen bfloat16
base sharded over all 8; the folder holds ``config.json``, the safetensors and
``tokenizer.json``, as on the Hugging Face Hub)::

    pip install -e ".[examples]"
    python examples/finetune_llm.py --model /models/Meta-Llama-3-8B \\
        --dataset train.jsonl --eval-dataset test.jsonl --out run/ \\
        --rank 16 --alpha 32 --lr 2e-4 --steps 1000 --batch 32 --accumulate 4 \\
        --max-len 1024 --eval-batch 16 --fsdp 8 --data 1 --remat --merged

Several hosts (a TPU pod slice, or GPU nodes): the same command on every host, with
``--distributed`` (``jax.distributed.initialize()`` finds the cluster on TPU pods and
SLURM; elsewhere add ``--coordinator HOST:PORT --num-processes N --process-id I``) and
``--fsdp``/``--data`` over all hosts' devices. Each process reads the data set and feeds
its own rows of every global batch.

Without ``--model`` (the CPU demonstration, no download): a tiny model of the same
architecture is pre-trained on the Python standard library's own source code for a few
minutes and cached (``--cache``, reused when its settings match), with a byte-level
BPE tokenizer trained on the same text; then DoRA fine-tunes it to a task it never saw:
given a function's signature, write the first sentence of its docstring, with training
pairs from most of the standard library and the held-out pairs from other modules.
This is the whole pipeline at toy scale, not a useful model::

    python examples/finetune_llm.py   # 15 min on 2 shared cores; 4 once pre-trained
    python examples/finetune_llm.py --out run/ --merged   # keeps checkpoints and folders

``--out run/`` writes ``run/checkpoints/`` (adapter-only training state every
``--save-every`` steps, with the data position: ``--resume`` continues exactly where an
interrupted run stopped), ``run/metrics.jsonl``, ``run/adapter/`` (a PEFT folder with
the Hugging Face module names: ``PeftModel.from_pretrained`` loads it onto
``AutoModelForCausalLM``) and, with ``--merged``, ``run/merged/`` (a plain model folder
in the input's layout).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_llm  # noqa: E402
import llama  # noqa: E402
from llama import Llama, LlamaConfig  # noqa: E402

import dora_jax  # noqa: E402
from dora_jax import train  # noqa: E402
from dora_jax.checkpoint import AdapterCheckpoints, check_run_folder  # noqa: E402

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
EOS = "<|endoftext|>"
CACHE_FORMAT = 1  # bump when the tiny model or its corpus changes meaning
DATA_AXES = ("fsdp", "data")
# Dense bfloat16 peak of one device, TFLOP/s (vendor figures), by device_kind substring.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6": 918.0,
}
CPU_CORE_GFLOPS = 100.0  # a nominal float32 figure per core (AVX2 FMA, ~3 GHz)


# ----------------------------------------------------------------------------- text


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted, without tests and third-party code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "dist-packages", "idle_test", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in skip]  # never walk site-packages
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def held_out(path: Path) -> bool:
    """One module in ten, by a hash of its name: never pre-trained on, never trained on."""
    return zlib.crc32(path.name.encode()) % 10 == 0


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def pretraining_text(max_bytes: int) -> str:
    """Standard-library source (held-out modules excluded), files joined by ``EOS``."""
    parts, size = [], 0
    for path in stdlib_files():
        if held_out(path):
            continue
        text = read(path)
        parts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return EOS.join(parts)[:max_bytes]


def signature_task(files: list[Path], per_file: int = 20) -> list[dict[str, str]]:
    """``{"prompt": "Signature: def f(x, y=1)\\nSummary:", "completion": " First line."}``.

    One pair per public function or method with a docstring whose first sentence is 10
    to 100 characters, at most ``per_file`` per file, parsed with ``ast`` (nothing imported).
    """
    pairs, seen = [], set()
    for path in files:
        try:
            tree = ast.parse(read(path))
        except SyntaxError:
            continue
        found = 0
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node)
            if node.name.startswith("_") or not doc:
                continue
            paragraph = " ".join(doc.split("\n\n")[0].split())
            first = paragraph.split(". ")[0].rstrip(".") + "."
            if not 10 <= len(first) <= 100:
                continue
            prompt = f"Signature: def {node.name}({ast.unparse(node.args)})\nSummary:"
            if prompt in seen or len(prompt) > 200:
                continue
            seen.add(prompt)
            pairs.append({"prompt": prompt, "completion": " " + first})
            found += 1
            if found == per_file:
                break
    return pairs


def builtin_task(cache: Path) -> tuple[list[dict], list[dict]]:
    """The signature -> summary pairs of the training and the held-out modules (cached)."""
    folder = cache / f"stdlib-task-{CACHE_FORMAT}-py{sys.version_info[0]}.{sys.version_info[1]}"
    if not (folder / "heldout.jsonl").exists():
        files = stdlib_files()
        staging = Path(tempfile.mkdtemp(dir=_made(cache)))
        write_jsonl(staging / "train.jsonl", signature_task([p for p in files if not held_out(p)]))
        write_jsonl(staging / "heldout.jsonl", signature_task([p for p in files if held_out(p)]))
        _publish(staging, folder)
    return read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "heldout.jsonl")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, str]]:
    """Rows of ``{"prompt", "completion"}``; anything else is refused, naming the line."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg}).") from None
        if not (
            isinstance(row, dict)
            and set(row) >= {"prompt", "completion"}
            and all(isinstance(row[k], str) for k in ("prompt", "completion"))
        ):
            raise ValueError(
                f'{path}:{number}: expected {{"prompt": str, "completion": str}}; got '
                f"{line[:80]!r}."
            )
        rows.append({"prompt": row["prompt"], "completion": row["completion"]})
    if not rows:
        raise ValueError(f"{path}: no examples.")
    return rows


def split_rows(rows: list[dict], fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    """A deterministic train / held-out split by a hash of each prompt."""
    test = [r for r in rows if zlib.crc32(r["prompt"].encode()) % 1000 < 1000 * fraction]
    return [r for r in rows if r not in test], test


# ----------------------------------------------------------------------------- tokens


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE (GPT-2 style, any text encodes) trained on ``text``, with ``EOS``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chunks = (text[i : i + 65536] for i in range(0, len(text), 65536))
    tokenizer.train_from_iterator(chunks, trainer=trainer)
    return tokenizer


def load_tokenizer(folder: Path):
    from tokenizers import Tokenizer

    file = Path(folder) / "tokenizer.json"
    if not file.exists():
        raise FileNotFoundError(f"{folder}: no tokenizer.json (the `tokenizers` format).")
    return Tokenizer.from_file(str(file))


def _listed_eos(folder: Path) -> list[int]:
    """``config.json``'s ``eos_token_id``: one id or a list (Llama 3 gives three)."""
    value = json.loads((Path(folder) / "config.json").read_text()).get("eos_token_id")
    if value is None:
        return []
    return [int(i) for i in (value if isinstance(value, list) else [value])]


def eos_id(folder: Path, tokenizer) -> int | None:
    """The end-of-sequence id: ``config.json``'s ``eos_token_id`` (the first of a list),
    else the tokenizer's ``EOS`` token, else ``None`` (completions then have no end)."""
    listed = _listed_eos(folder)
    return listed[0] if listed else tokenizer.token_to_id(EOS)


def end_ids(folder: Path, eos: int | None) -> tuple[int, ...]:
    """Every id that ends a generation: ``eos`` and all of ``config.json``'s
    ``eos_token_id`` list (Llama 3 Instruct's ends a turn with a later one)."""
    return tuple(dict.fromkeys(([] if eos is None else [eos]) + _listed_eos(folder)))


def encode(rows: list[dict], tokenizer, max_len: int, eos: int | None) -> dict[str, np.ndarray]:
    """Padded arrays for causal-LM training on the completions only.

    Returns ``tokens``, ``targets`` (``tokens`` shifted left by one), ``weights`` (1.0
    where the target is a completion token or the closing EOS) and ``attention_mask``,
    each ``(n, max_len)``. The prompt is encoded with the tokenizer's special tokens (a
    Llama or Mistral ``tokenizer.json`` puts BOS first), the completion without. A
    prompt is cut from the left to at most ``max_len - 1`` tokens, keeping its leading
    special tokens; the completion is cut from the right. A row with an empty
    completion and no EOS has nothing to learn and is dropped.
    """
    prompts = tokenizer.encode_batch([r["prompt"] for r in rows], add_special_tokens=True)
    completions = tokenizer.encode_batch([r["completion"] for r in rows], add_special_tokens=False)
    pad = 0 if eos is None else eos
    arrays = {k: [] for k in ("tokens", "targets", "weights", "attention_mask")}
    for prompt, completion in zip(prompts, completions, strict=True):
        p, c = _cut_prompt(prompt, max_len - 1), completion.ids + ([] if eos is None else [eos])
        if not c:
            continue
        c = c[: max_len + 1 - len(p)]
        sequence = p + c  # at most max_len + 1 tokens: inputs are all but the last
        n = len(sequence) - 1
        tokens = np.full(max_len, pad, np.int32)
        targets = np.full(max_len, pad, np.int32)
        weights = np.zeros(max_len, np.float32)
        mask = np.zeros(max_len, np.int32)
        tokens[:n], targets[:n], mask[:n] = sequence[:-1], sequence[1:], 1
        weights[len(p) - 1 : n] = 1.0  # targets at positions len(p)-1.. are the completion
        for key, value in zip(arrays, (tokens, targets, weights, mask), strict=True):
            arrays[key].append(value)
    if not arrays["tokens"]:
        raise ValueError(f"no example fits in --max-len {max_len} tokens.")
    return {k: np.stack(v) for k, v in arrays.items()}


def _cut_prompt(encoding, room: int) -> list[int]:
    """An encoded prompt's ids cut from the left to ``room`` tokens, keeping the leading
    special tokens (BOS) the tokenizer put first."""
    ids = encoding.ids
    if len(ids) <= room:
        return ids
    lead = next((i for i, s in enumerate(encoding.special_tokens_mask) if not s), len(ids))
    lead = min(lead, room)
    return ids[:lead] + ids[len(ids) - (room - lead) :]


# ----------------------------------------------------------------------------- loss


def completion_loss(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean over sequences of each sequence's mean cross-entropy on its weighted targets.

    ``logits (B, T, V)``, ``batch["targets"] (B, T)``, ``batch["weights"] (B, T)``. A
    mean of per-sequence means, so that a batch split into micro-batches (accumulation)
    or over devices gives the same loss and gradients as the whole batch.
    """
    total, count = sequence_sums(logits, batch)
    return jnp.mean(total / count)


def sequence_sums(logits, batch) -> tuple[jax.Array, jax.Array]:
    """Per sequence: the summed weighted cross-entropy ``(B,)`` and the weights' sum
    ``(B,)`` (at least 1, so an all-zero row gives 0 rather than NaN)."""
    logits = logits.astype(jnp.float32)
    target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target
    weights = batch["weights"].astype(jnp.float32)
    return jnp.sum(nll * weights, -1), jnp.maximum(jnp.sum(weights, -1), 1.0)


def model_inputs(batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    # Right padding: the model's default positions (real tokens before) are arange.
    return batch["tokens"], {"attention_mask": batch["attention_mask"]}


def make_forward(graphdef):
    """``(trainable, frozen, batch, rng) -> logits`` for :func:`dora_jax.train.make_train_step`."""

    def forward(trainable, frozen, batch, rng):
        del rng  # no dropout
        model = nnx.merge(graphdef, trainable, frozen)
        tokens, kwargs = model_inputs(batch)
        return model(tokens, **kwargs)

    return forward


# ----------------------------------------------------------------------------- batches


def batch_at(data: dict[str, np.ndarray], index: int, batch_size: int, seed: int) -> dict:
    """The ``index``-th batch of an endless shuffled stream: each epoch is a seeded
    permutation of the rows, so any batch is found without replaying the ones before."""
    n = len(data["tokens"])
    positions = np.arange(index * batch_size, (index + 1) * batch_size)
    epochs, offsets = np.divmod(positions, n)
    orders = {e: np.random.default_rng([seed, e]).permutation(n) for e in set(epochs.tolist())}
    rows = np.array([orders[e][o] for e, o in zip(epochs.tolist(), offsets, strict=True)])
    return {k: v[rows] for k, v in data.items()}


def local_rows(batch: dict, process: int, processes: int) -> dict:
    """This process's contiguous block of a global batch (the rows its devices hold)."""
    rows = len(batch["tokens"]) // processes
    return {k: v[process * rows : (process + 1) * rows] for k, v in batch.items()}


# ----------------------------------------------------------------------------- devices


def make_mesh(fsdp: int, data: int) -> Mesh:
    devices = jax.devices()
    if fsdp * data != len(devices):
        raise ValueError(
            f"--fsdp {fsdp} x --data {data} = {fsdp * data} devices, but JAX sees "
            f"{len(devices)} ({devices[0].platform}); choose sizes whose product is "
            f"{len(devices)}."
        )
    return Mesh(np.array(devices).reshape(fsdp, data), DATA_AXES)


def peak_flops(override_tflops: float | None) -> tuple[float, str]:
    """Peak FLOP/s of all devices together and where the figure comes from."""
    devices = jax.devices()
    if override_tflops:
        return override_tflops * 1e12 * len(devices), "--peak-tflops"
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        return cores * CPU_CORE_GFLOPS * 1e9, f"nominal {CPU_CORE_GFLOPS:g} GFLOP/s per core"
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12 * len(devices), f"{name} bfloat16 peak"
    return math.nan, f"unknown device {kind!r}: pass --peak-tflops"


def flops_per_token(config: LlamaConfig, context: int, full: bool) -> float:
    """Model FLOPs of one trained token (matmuls only, recomputation not counted).

    Forward: ``2 * (matmul parameters)`` plus attention's ``4 * layers * context *
    heads * head_dim`` (scores and values, causal mask ignored). Training adds the
    input gradients (one more forward's worth) and, for full fine-tuning only, the
    weight gradients (another): adapters leave the frozen weights without gradients.
    """
    layers, width = config.num_hidden_layers, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or width // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    per_layer = width * (2 * q + 2 * kv) + 3 * width * config.intermediate_size
    matmul = layers * per_layer + width * config.vocab_size
    forward = 2 * matmul + 4 * layers * context * q
    return forward * (3 if full else 2)


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class TinySettings:
    """The CPU demonstration's pre-trained model; the cache folder is keyed by all of it."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 2048
    corpus_bytes: int = 4_000_000
    steps: int = 300
    batch: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        record = {**dataclasses.asdict(self), "format": CACHE_FORMAT, "python": sys.version[:4]}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]

    def config(self) -> LlamaConfig:
        return llama_config(
            {
                "vocab_size": self.vocab,
                "hidden_size": self.width,
                "intermediate_size": 3 * self.width,
                "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads,
                "max_position_embeddings": max(self.seq_len, 512),
                "rope_theta": 10000.0,
                "tie_word_embeddings": False,
            }
        )


def llama_config(fields: dict) -> LlamaConfig:
    return LlamaConfig.from_hf({"model_type": "llama", **fields})


def pretrained_tiny(settings: TinySettings, cache: Path, *, progress: bool = True) -> Path:
    """The folder of the tiny pre-trained model (config.json, model.safetensors,
    tokenizer.json): from ``cache`` when there, else pre-trained now and cached."""
    folder = cache / f"tiny-llama-{settings.key()}"
    if (folder / "model.safetensors").exists():
        record = json.loads((folder / "pretraining.json").read_text())
        print(
            f"pre-trained tiny model from the cache: {folder} ({record['steps']} steps, "
            f"final loss {record['final_loss']:.3f}, made in {record['seconds']:.0f} s)"
        )
        return folder
    start = time.perf_counter()
    text = pretraining_text(settings.corpus_bytes)
    tokenizer = train_tokenizer(text, settings.vocab)
    ids = np.array(tokenizer.encode(text).ids, np.int32)
    config = settings.config()
    print(
        f"pre-training a tiny model ({settings.width} wide, {settings.layers} layers, "
        f"vocabulary {settings.vocab}) on {len(text) / 1e6:.1f} MB of standard-library "
        f"source ({len(ids):,} tokens) for {settings.steps} steps; cached in {folder}",
        flush=True,
    )
    model = Llama(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(settings.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.lr, max(settings.steps // 20, 1), settings.steps, settings.lr / 10
    )
    optimizer = train.adamw(schedule, weight_decay=0.1, max_grad_norm=1.0)

    def forward(params, rest, batch, rng):  # every parameter trains: no adapters here
        del rng
        tokens, kwargs = model_inputs(batch)
        return nnx.merge(graphdef, params, rest)(tokens, **kwargs)

    step = train.jit_step(train.make_train_step(forward, completion_loss, optimizer), donate=True)
    state = train.init_state(nnx.to_pure_dict(params), optimizer)
    rng = np.random.default_rng(settings.seed)
    losses = []
    bar = _bar(range(settings.steps), "pre-training", progress)
    for _ in bar:
        starts = rng.integers(0, len(ids) - settings.seq_len - 1, settings.batch)
        window = np.stack([ids[s : s + settings.seq_len + 1] for s in starts])
        batch = {
            "tokens": window[:, :-1],
            "targets": window[:, 1:],
            "weights": np.ones((settings.batch, settings.seq_len), np.float32),
            "attention_mask": np.ones((settings.batch, settings.seq_len), np.int32),
        }
        state, metrics = step(state, rest, batch)
        losses.append(float(metrics["loss"]))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    nnx.update(model, state.trainable)
    staging = Path(tempfile.mkdtemp(dir=_made(cache)))
    save_model(model, staging, tokenizer.token_to_id(EOS))
    tokenizer.save(str(staging / "tokenizer.json"))
    seconds = time.perf_counter() - start
    record = {
        "settings": dataclasses.asdict(settings),
        "steps": settings.steps,
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-10:])),
        "seconds": seconds,
    }
    (staging / "pretraining.json").write_text(json.dumps(record, indent=1))
    _publish(staging, folder)
    print(
        f"pre-trained in {seconds:.0f} s: loss {losses[0]:.3f} -> {record['final_loss']:.3f} "
        "(mean of the last 10 steps)"
    )
    return folder


def save_model(model, folder: Path, eos: int | None) -> None:
    """A Hugging Face folder of the model (``hf_llm.save_pretrained``: ``config.json``
    and ``model.safetensors``), with the tokenizer's end-of-sequence id in the config."""
    hf_llm.save_pretrained(model, folder)
    config = json.loads((folder / "config.json").read_text())
    if eos is not None:
        config.update(bos_token_id=eos, eos_token_id=eos)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_model(folder: Path, *, dtype, mesh: Mesh, remat: bool):
    """``(model, config)``: each device's shard of each tensor read from the folder
    (``hf_llm.fsdp_sharding``: split over ``"fsdp"``, replicated over ``"data"``)."""
    return hf_llm.load_pretrained(folder, dtype=dtype, mesh=mesh, remat=remat)


def frozen_shardings(frozen, mesh: Mesh):
    """The frozen leaves' shardings as loaded; leaves made since (the norm caches,
    ``(out,)`` vectors) replicated."""

    def sharding(x):
        own = getattr(x, "sharding", None)
        return own if isinstance(own, NamedSharding) and own.mesh == mesh else replicated

    replicated = NamedSharding(mesh, P())
    return jax.tree.map(sharding, frozen)


def place(tree, shardings):
    """``jax.device_put`` of every leaf onto its sharding (a tree of them, or one for all),
    typed PRNG keys included: across processes ``device_put`` refuses a key array (the
    layers' dropout keys, the step's key) for a mesh with other processes' devices, so a
    key travels as its raw data."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def one(x, sharding):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(x, sharding)

    return jax.tree.map(one, tree, shardings)


def generate(model, prompts: list[list[int]], max_new_tokens: int, ends: Sequence[int]) -> list:
    """Greedy continuations of the prompts (left-padded into one batch): per prompt, the
    new tokens up to (without) the first of ``ends``."""
    width = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, ids in enumerate(prompts):
        tokens[row, width - len(ids) :], mask[row, width - len(ids) :] = ids, True
    out = llama.generate(
        model,
        tokens,
        max_new_tokens,
        attention_mask=mask,
        eos_token_id=list(ends) or None,
        pad_token_id=ends[0] if ends else 0,
    )
    if jax.process_count() > 1:  # every process's copy of the (possibly sharded) result
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(out, tiled=True)
    news = [[int(t) for t in row[width:]] for row in np.asarray(out)]
    cut = [next((i for i, t in enumerate(new) if t in ends), len(new)) for new in news]
    return [new[:n] for new, n in zip(news, cut, strict=True)]


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _publish(staging: Path, folder: Path) -> None:
    """Move a finished folder into place; another process may have won the race."""
    try:
        staging.rename(folder)
    except OSError:
        if not folder.exists():
            raise
        shutil.rmtree(staging)


def _bar(iterable, description: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, disable=None if progress else True, dynamic_ncols=True)


# ----------------------------------------------------------------------------- evaluation


def make_evaluator(graphdef, data: dict[str, np.ndarray], batch_size: int, mesh=None):
    """``(trainable, frozen) -> (mean loss per completion token, perplexity)`` on ``data``,
    in fixed-size chunks (the last one padded with weightless rows: one compiled shape).
    With a ``mesh`` each chunk is split over its devices as the training batches are
    (``batch_size`` rounded up to a multiple of the device count)."""
    if mesh is not None:
        batch_size = -(-batch_size // mesh.size) * mesh.size

    @jax.jit
    def sums(trainable, frozen, batch):
        nll, count = sequence_sums(make_forward(graphdef)(trainable, frozen, batch, None), batch)
        real = jnp.sum(batch["weights"], -1) > 0
        return jnp.sum(jnp.where(real, nll, 0.0)), jnp.sum(jnp.where(real, count, 0.0))

    n = len(data["tokens"])

    def evaluate(trainable, frozen) -> tuple[float, float]:
        total = count = 0.0
        for start in range(0, n, batch_size):
            rows = np.minimum(np.arange(start, start + batch_size), n - 1)
            chunk = {k: v[rows] for k, v in data.items()}
            chunk["weights"] = (
                chunk["weights"] * (np.arange(start, start + batch_size) < n)[:, None]
            )
            if mesh is not None:
                chunk = local_rows(chunk, jax.process_index(), jax.process_count())
                chunk = train.global_batch(chunk, mesh, DATA_AXES)
            a, b = sums(trainable, frozen, chunk)
            total, count = total + float(a), count + float(b)
        loss = total / count
        return loss, math.exp(min(loss, 50.0))

    return evaluate


def show_generations(model, rows, tokenizer, ends, max_new_tokens: int, label: str, say):
    """Greedy completions of ``rows``' prompts (every process computes; ``say`` prints)."""
    prompts = [tokenizer.encode(r["prompt"], add_special_tokens=True).ids for r in rows]
    texts = [tokenizer.decode(ids) for ids in generate(model, prompts, max_new_tokens, ends)]
    say(f"greedy generations, {label}:")
    for row, text in zip(rows, texts, strict=True):
        say(f"  {row['prompt'].splitlines()[0][:76]}")
        say(f"    -> {text.strip()[:76]!r}")
        say(f"       reference: {row['completion'].strip()[:64]!r}")
    return texts


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,  # shows every default
    )
    add = parser.add_argument
    add(
        "--model",
        default=None,
        help="a Hugging Face model folder (config.json, "
        "*.safetensors, tokenizer.json); without it, the CPU demonstration's tiny "
        "pre-trained model (made once, then read from --cache)",
    )
    add(
        "--dataset",
        default=None,
        help='training data: JSON lines {"prompt": ..., '
        '"completion": ...}; default: the built-in signature -> docstring summary task',
    )
    add(
        "--eval-dataset",
        default=None,
        help="held-out data in the same format (default: "
        "one --dataset row in ten by a hash of its prompt, or the built-in task's "
        "held-out modules)",
    )
    add(
        "--cache",
        default=str(Path.home() / ".cache" / "dora-jax"),
        help="folder for the "
        "tiny pre-trained model and the built-in task (reused when the settings match)",
    )
    add(
        "--method",
        choices=("dora", "lora", "full"),
        default="dora",
        help="dora, lora (the same adapters without magnitudes) or full (every parameter trained)",
    )
    add(
        "--targets",
        default=TARGETS,
        help="comma-separated layers to adapt, as module names or path suffixes (PEFT style)",
    )
    add("--rank", type=int, default=8, help="adapter rank r")
    add("--alpha", type=float, default=16.0, help="adapter scale numerator: s = alpha / r")
    add("--steps", type=int, default=300, help="optimizer steps in all (the schedule's length)")
    add(
        "--batch",
        type=int,
        default=16,
        help="sequences per optimizer step (global, all processes and micro-batches together)",
    )
    add(
        "--accumulate",
        type=int,
        default=1,
        help="split each batch into this many "
        "micro-batches and average their gradients (memory for time)",
    )
    add(
        "--max-len",
        type=int,
        default=64,
        help="tokens per sequence (prompt cut from the left, completion from the right)",
    )
    add(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate of the warm-up cosine "
        "schedule (None: 2e-3 for dora and lora, 2e-4 for full)",
    )
    add("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    add("--seed", type=int, default=0, help="seed of the adapter init and the data order")
    add(
        "--dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="dtype of "
        "the frozen base and its computation (adapters stay float32); auto: bfloat16 on "
        "accelerators, float32 on the CPU (bfloat16 is faster there only on CPUs with "
        "bfloat16 dot instructions, such as AVX512-BF16 or AMX, and rounds more)",
    )
    add(
        "--remat",
        action="store_true",
        help="rematerialise each decoder block in the "
        "backward pass (jax.checkpoint): activation memory for one more forward",
    )
    add("--fsdp", type=int, default=1, help="mesh axis the frozen weights are sharded over")
    add(
        "--data",
        type=int,
        default=None,
        help="mesh axis of plain data parallelism "
        "(default: the devices left over by --fsdp); the batch is split over both axes",
    )
    add(
        "--cpu-devices",
        type=int,
        default=None,
        help="make this many CPU devices (XLA's "
        "host platform device count), to try a mesh on one machine",
    )
    add(
        "--distributed",
        action="store_true",
        help="join a multi-host run with "
        "jax.distributed.initialize() before anything else (arguments found "
        "automatically on TPU pods and SLURM, or given below)",
    )
    add("--coordinator", default=None, help="HOST:PORT of process 0 (with --distributed)")
    add("--num-processes", type=int, default=None, help="processes in all (--distributed)")
    add("--process-id", type=int, default=None, help="this process's index (--distributed)")
    add(
        "--peak-tflops",
        type=float,
        default=None,
        help="one device's peak TFLOP/s for the "
        "MFU estimate (default: a table of accelerators; nominal on CPUs)",
    )
    add(
        "--out",
        default=None,
        help="folder for checkpoints/, metrics.jsonl, adapter/ (a "
        "PEFT folder) and merged/ (with --merged)",
    )
    add(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint (same flags)",
    )
    add("--save-every", type=int, default=50, help="steps between checkpoints in --out")
    add(
        "--stop-after",
        type=int,
        default=None,
        help="stop this run after so many steps "
        "(saving a checkpoint), e.g. for jobs with a time limit; --resume continues",
    )
    add(
        "--merged",
        action="store_true",
        help="also write --out/merged/, the model with the "
        "adapters folded in, in the input's layout (AutoModelForCausalLM loads it)",
    )
    add(
        "--generations",
        type=int,
        default=3,
        help="held-out prompts to complete greedily before and after training (0: none)",
    )
    add("--max-new-tokens", type=int, default=24, help="tokens per greedy generation")
    add("--eval-batch", type=int, default=32, help="sequences per evaluation call")
    add("--eval-limit", type=int, default=256, help="held-out examples evaluated at most")
    tiny = TinySettings()
    add(
        "--pretrain-steps",
        type=int,
        default=tiny.steps,
        help="(no --model) steps of the tiny model's pre-training",
    )
    add(
        "--pretrain-width",
        type=int,
        default=tiny.width,
        help="(no --model) the tiny "
        "model's hidden size (intermediate size 3x, head size width / 4)",
    )
    add("--pretrain-layers", type=int, default=tiny.layers, help="(no --model) its layers")
    add(
        "--pretrain-bytes",
        type=int,
        default=tiny.corpus_bytes,
        help="(no --model) bytes of standard-library source it is pre-trained on",
    )
    add("--vocab", type=int, default=tiny.vocab, help="(no --model) its BPE vocabulary size")
    add("--log", default=None, help="metrics as JSON lines here (default: OUT/metrics.jsonl)")
    add("--quiet", action="store_true", help="no progress bars")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_run_folder(None if args.out is None else Path(args.out, "checkpoints"), args.resume)
    except ValueError as error:
        parser.error(f"--out, --resume: {error}")
    if args.merged and args.out is None:
        parser.error("--merged writes OUT/merged/: give --out DIR.")
    if args.merged and args.distributed:
        parser.error(
            "--merged reads every weight into one process, which a multi-host run cannot: "
            "merge afterwards on one host (hf_llm.load_pretrained, hf_llm.load_adapter, "
            "hf_llm.save_merged)."
        )
    if args.batch % args.accumulate:
        parser.error(f"--batch {args.batch} does not split into --accumulate {args.accumulate}.")
    if args.lr is None:
        args.lr = 2e-4 if args.method == "full" else 2e-3
    return args


def start_jax(args) -> None:
    """Device count and multi-host set-up: before JAX makes its first device."""
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.distributed:
        given = {
            "coordinator_address": args.coordinator,
            "num_processes": args.num_processes,
            "process_id": args.process_id,
        }
        jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    start_jax(args)
    start = time.perf_counter()
    leader = jax.process_index() == 0
    say = print if leader else (lambda *a, **k: None)
    progress = leader and not args.quiet
    cache = Path(args.cache).expanduser()

    if args.model is None:
        settings = TinySettings(
            width=args.pretrain_width,
            layers=args.pretrain_layers,
            vocab=args.vocab,
            corpus_bytes=args.pretrain_bytes,
            steps=args.pretrain_steps,
        )
        folder = pretrained_tiny(settings, cache, progress=progress)
    else:
        folder = Path(args.model)
    tokenizer = load_tokenizer(folder)
    eos = eos_id(folder, tokenizer)
    ends = end_ids(folder, eos)
    if args.dataset is None:
        train_rows, test_rows = builtin_task(cache)
        source = "the standard library (signature -> docstring summary)"
    else:
        train_rows = read_jsonl(Path(args.dataset))
        if args.eval_dataset is not None:
            test_rows = read_jsonl(Path(args.eval_dataset))
        else:
            train_rows, test_rows = split_rows(train_rows)
        source = args.dataset
    test_rows = test_rows[: args.eval_limit]
    data = encode(train_rows, tokenizer, args.max_len, eos)
    test = encode(test_rows, tokenizer, args.max_len, eos)
    say(
        f"{len(data['tokens'])} training and {len(test['tokens'])} held-out examples from "
        f"{source}, {args.max_len} tokens each"
    )

    fsdp = args.fsdp
    if args.data is None:
        if jax.device_count() % fsdp:
            raise ValueError(f"--fsdp {fsdp} does not divide the {jax.device_count()} devices.")
        args.data = jax.device_count() // fsdp
    mesh = make_mesh(fsdp, args.data)
    platform = jax.devices()[0].platform
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}.get(
        args.dtype, jnp.float32 if platform == "cpu" else jnp.bfloat16
    )
    if args.batch % mesh.size:
        raise ValueError(f"--batch {args.batch} does not split over the {mesh.size} devices.")
    model, config = load_model(folder, dtype=dtype, mesh=mesh, remat=args.remat)

    dora_config = None
    if args.method == "full":
        wrt = nnx.Param
    else:
        dora_config = dora_jax.DoRAConfig(
            targets=[t.strip() for t in args.targets.split(",") if t.strip()],
            rank=args.rank,
            alpha=args.alpha,
            use_dora=args.method == "dora",
        )
        dora_jax.nnx.apply_dora(model, dora_config, rngs=nnx.Rngs(args.seed))
        if args.method == "dora":
            dora_jax.nnx.cache_base_norms(model)  # ||W0||^2 once, not in every step
        say(str(dora_jax.nnx.summary(model)).splitlines()[-1])  # the totals
        wrt = nnx.LoRAParam
    graphdef, trainable, frozen = nnx.split(model, wrt, ...)
    # Replicated over the mesh (made from sharded kernels, a magnitude may be sharded).
    trainable = place(nnx.to_pure_dict(trainable), NamedSharding(mesh, P()))
    frozen_sharding = frozen_shardings(frozen, mesh)
    frozen = place(frozen, frozen_sharding)
    say(
        f"{config.num_hidden_layers} layers, width {config.hidden_size}, "
        f"base {jnp.dtype(dtype).name}, "
        f"mesh fsdp {fsdp} x data {args.data} ({mesh.size} {platform} device(s), "
        f"{jax.process_count()} process(es))"
    )

    evaluate = make_evaluator(graphdef, test, args.eval_batch, mesh)
    results: dict[str, Any] = {}
    results["before"] = evaluate(trainable, frozen)
    say(f"held-out loss before: {results['before'][0]:.4f} (perplexity {results['before'][1]:.2f})")
    # Prompts from across the held-out set (its rows come module by module).
    shown = test_rows[:: max(len(test_rows) // max(args.generations, 1), 1)][: args.generations]
    if shown:
        results["generations_before"] = show_generations(
            model, shown, tokenizer, ends, args.max_new_tokens, "before fine-tuning", say
        )

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, max(args.steps // 10, 1), args.steps, args.lr / 10
    )
    optimizer = train.adamw(schedule, weight_decay=args.weight_decay, max_grad_norm=1.0)
    step = train.jit_step(
        train.make_train_step(
            make_forward(graphdef), completion_loss, optimizer, accumulation_steps=args.accumulate
        ),
        donate=True,
        mesh=mesh,
        frozen_sharding=frozen_sharding,
        data_axes=DATA_AXES,
    )
    per_token = flops_per_token(config, args.max_len, args.method == "full")
    peak, peak_source = peak_flops(args.peak_tflops)
    say(f"MFU against {peak / 1e12:.3g} TFLOP/s ({peak_source}), {per_token / 1e6:.1f} MFLOP/token")
    out = Path(args.out) if args.out is not None else None
    log_path = args.log if args.log is not None or out is None else str(out / "metrics.jsonl")
    with contextlib.ExitStack() as stack:
        checkpoints = None
        if out is not None:
            checkpoints = stack.enter_context(
                AdapterCheckpoints(
                    out / "checkpoints",
                    keep=2,
                    config=dora_config,
                    base=nnx.to_pure_dict(
                        nnx.filter_state(frozen, nnx.Param)
                    ),  # the base, no rng keys
                )
            )
        state = place(
            train.init_state(trainable, optimizer, rng=args.seed), NamedSharding(mesh, P())
        )
        state, stopped = run_training(
            step, state, frozen, data, mesh, args, checkpoints, log_path, (per_token, peak), say
        )
    trainable = state.trainable
    nnx.update(model, trainable)
    results["steps"] = int(state.step)
    results["after"] = evaluate(trainable, frozen)
    say(
        f"held-out loss after {int(state.step)} {args.method.upper()} steps: "
        f"{results['after'][0]:.4f} (perplexity {results['after'][1]:.2f})"
    )
    if shown:
        results["generations_after"] = show_generations(
            model, shown, tokenizer, ends, args.max_new_tokens, "after fine-tuning", say
        )
    if out is not None and not stopped and leader:
        results.update(write_folders(model, dora_config, folder, out, args, say))
    results["trainable"] = trainable
    say(f"done in {time.perf_counter() - start:.0f} s")
    return results


def run_training(step, state, frozen, data, mesh, args, checkpoints, log_path, flops, say):
    """The loop: restore, train with a progress bar, log, save; ``(state, stopped)``."""
    from tqdm.auto import tqdm

    position = 0  # batches consumed
    if checkpoints is not None and checkpoints.latest_step() is not None:
        state = checkpoints.restore(state)
        position = checkpoints.data_position() or int(state.step)
        say(f"resuming from step {int(state.step)}")
    first = int(state.step)
    last = args.steps if args.stop_after is None else min(args.steps, first + args.stop_after)
    tokens_per_step = args.batch * args.max_len
    per_token, peak = flops
    progress = jax.process_index() == 0 and not args.quiet
    log = open(log_path, "a") if log_path and jax.process_index() == 0 else None  # noqa: SIM115
    bar = tqdm(
        total=args.steps,
        initial=first,
        desc=args.method,
        disable=None if progress else True,
        dynamic_ncols=True,
    )
    clock, timed = time.perf_counter(), []
    try:
        while int(state.step) < last:
            batch = batch_at(data, position, args.batch, args.seed)
            batch = local_rows(batch, jax.process_index(), jax.process_count())
            state, metrics = step(state, frozen, train.global_batch(batch, mesh, DATA_AXES))
            position += 1
            record = {k: float(np.mean(jax.device_get(v))) for k, v in metrics.items()}
            now = time.perf_counter()
            if int(state.step) > first + 1:  # the first step of a run compiles
                timed.append(now - clock)
            clock = now
            seconds = float(np.median(timed[-20:])) if timed else math.nan
            record.update(
                step=int(state.step),
                tokens_per_s=tokens_per_step / seconds,
                mfu=tokens_per_step * per_token / seconds / peak,
            )
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"step {record['step']}: the loss is {record['loss']}.")
            if log is not None:
                log.write(json.dumps({k: _finite(v) for k, v in record.items()}) + "\n")
                log.flush()
            bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                mfu=f"{record['mfu']:.1%}",
            )
            bar.update(1)
            if checkpoints is not None and int(state.step) % args.save_every == 0:
                checkpoints.save(state, data_position=position)
        if checkpoints is not None:
            checkpoints.save(state, data_position=position)  # a no-op if just saved
    finally:
        bar.close()
        if log is not None:
            log.close()
    stopped = int(state.step) < args.steps
    if stopped:
        say(
            f"stopped after step {int(state.step)} of {args.steps} (--stop-after); "
            "--resume continues"
        )
    return state, stopped


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_folders(model, dora_config, source: Path, out: Path, args, say) -> dict:
    """The adapter as a PEFT folder (the whole model, for ``full``); the merged model."""
    written = {}
    if args.method == "full":
        written["model_folder"] = hf_llm.save_merged(model, out / "model", like=source)
    else:
        written["adapter"] = out / "adapter"
        hf_llm.save_adapter(model, written["adapter"], dora_config)
        if args.merged:
            written["merged"] = hf_llm.save_merged(model, out / "merged", like=source)
    say("wrote " + ", ".join(str(p) for p in written.values()))
    return written


if __name__ == "__main__":
    main()
