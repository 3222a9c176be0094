"""Peak host memory of loading a Llama-shaped checkpoint onto an 8-device CPU mesh.

Run: ``python benchmarks/llm_load_memory.py`` (about 2 minutes on 2 cores; writes a
1.5 GB checkpoint to a temporary folder and deletes it at the end, ``--keep DIR`` keeps
it there and reuses it on the next run).

A random bfloat16 checkpoint of a Llama shape (default: hidden 2048, 12 layers,
intermediate 5632, vocab 32000: 748M parameters, 1.5 GB) is written as a Hugging Face
folder in two shard files with an index. Each loading method then runs in a fresh
process with 8 forced CPU devices and reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
(the peak resident set, which on a CPU "device" includes the parameters themselves):

* ``hf_llm.load_pretrained`` (``examples/hf_llm.py``) in bfloat16 onto an fsdp mesh of 8
  (each device one eighth of every large tensor): each device's shard read from the
  memory-mapped file, one tensor at a time;
* the same in float32 (the devices hold twice the file);
* a naive load: ``safetensors.numpy.load_file`` of every shard (the whole model in host
  memory), every tensor cast to float32, then ``jax.device_put`` onto the same rule's
  shardings (kernels left in torch's layout: a transpose would only add to it).

The baseline is the process after importing JAX and Flax and creating the devices.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
GB = 1e9


def _shapes(args) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and torch shapes of a Llama model."""
    h, i, v, heads, kv = args.hidden, args.intermediate, args.vocab, args.heads, args.kv_heads
    d = h // heads
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(args.layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (heads * d, h),
            p + "self_attn.k_proj.weight": (kv * d, h),
            p + "self_attn.v_proj.weight": (kv * d, h),
            p + "self_attn.o_proj.weight": (h, heads * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (v, h)}


def write_checkpoint(folder: Path, args) -> int:
    """A random bfloat16 Llama checkpoint in two shards with an index; returns its bytes."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = list(_shapes(args).items())
    halves = [shapes[: len(shapes) // 2], shapes[len(shapes) // 2 :]]
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for n, half in enumerate(halves, 1):
        name = f"model-{n:05d}-of-00002.safetensors"
        tensors = {}
        for key, shape in half:
            values = rng.standard_normal(shape, np.float32) * 0.02
            tensors[key] = values.astype(ml_dtypes.bfloat16)
            weight_map[key] = name
            total += tensors[key].nbytes
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(method: str, folder: str) -> None:
    """One load in this (fresh) process; prints a JSON line of peak RSS figures."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import importlib.util

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding

    spec = importlib.util.spec_from_file_location("hf_llm", EXAMPLES / "hf_llm.py")
    hf_llm = importlib.util.module_from_spec(spec)
    sys.modules["hf_llm"] = hf_llm
    spec.loader.exec_module(hf_llm)
    mesh = Mesh(np.array(jax.devices()).reshape(8, 1), ("fsdp", "data"))
    jax.device_put(jnp.zeros(8), NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))
    baseline = _maxrss()
    if method == "naive":
        from safetensors.numpy import load_file

        rule = hf_llm.fsdp_sharding(mesh)
        host = {}
        for file in hf_llm.checkpoint_files(folder):
            host.update(load_file(str(file)))  # the whole model in host memory
        host = {name: value.astype(np.float32) for name, value in host.items()}
        arrays = {
            name: jax.device_put(value, NamedSharding(mesh, rule(name, value.shape)))
            for name, value in host.items()
        }
        del host
        leaves = list(arrays.values())
    else:
        dtype = jnp.bfloat16 if method == "streamed_bf16" else jnp.float32
        model, _ = hf_llm.load_pretrained(folder, dtype=dtype, mesh=mesh)
        from flax import nnx

        leaves = jax.tree.leaves(nnx.state(model))
    jax.block_until_ready(leaves)
    on_devices = sum(x.nbytes for x in leaves)
    print(json.dumps({"baseline": baseline, "peak": _maxrss(), "on_devices": on_devices}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--keep", type=Path, help="write (or reuse) the checkpoint here")
    args = parser.parse_args(argv)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="llm_load_memory_"))
    try:
        if not (folder / "model.safetensors.index.json").is_file():
            # In its own process: Linux carries a process's peak RSS across exec, so the
            # processes that measure must be started by one that stayed small.
            shape = json.dumps({k: v for k, v in vars(args).items() if k != "keep"})
            subprocess.run([sys.executable, __file__, "--write", shape, str(folder)], check=True)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(harness.banner("jax", "flax", "safetensors", load=True))
        print(
            f"checkpoint: hidden {args.hidden}, {args.layers} layers, intermediate "
            f"{args.intermediate}, vocab {args.vocab}: {size / GB:.2f} GB of bfloat16 "
            f"safetensors in 2 files; 8 CPU devices, fsdp 8\n"
        )
        rows = []
        for method, label in [
            ("streamed_bf16", "`load_pretrained`, bfloat16"),
            ("streamed_f32", "`load_pretrained`, float32"),
            ("naive", "naive: `load_file`, float32, `device_put`"),
        ]:
            out = subprocess.run(
                [sys.executable, __file__, "--child", method, str(folder)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            grown = r["peak"] - r["baseline"]
            rows.append(
                [
                    label,
                    f"{r['on_devices'] / GB:.2f}",
                    f"{r['peak'] / GB:.2f}",
                    f"{grown / GB:.2f}",
                    f"{grown / r['on_devices']:.2f}",
                    f"{grown / size:.2f}",
                ]
            )
        head = [
            "method",
            "on devices (GB)",
            "peak RSS (GB)",
            "peak - baseline (GB)",
            "/ on devices",
            "/ file size",
        ]
        print(harness.table(head, rows))
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "--write":
        write_checkpoint(Path(sys.argv[3]), argparse.Namespace(**json.loads(sys.argv[2])))
    else:
        main()
