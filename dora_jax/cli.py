"""The ``dora-jax`` command: look into adapters, merge them into a model, export them.

``dora-jax inspect PATH``
    A PEFT adapter folder or an adapter checkpoint folder (written by
    :class:`dora_jax.checkpoint.AdapterCheckpoints`): the method, rank / alpha / scaling
    per adapted layer, parameter counts, dtypes, the training step and the base it
    expects. ``--json`` prints the same as one JSON object.
``dora-jax merge --base HF_FOLDER --adapter PEFT_FOLDER --out FOLDER``
    Merges adapters into a Hugging Face model folder, shard by shard and tensor by
    tensor (:func:`dora_jax.merging.merge_folder`): the merged folder has the same
    files, tensor names, dtypes and index and loads as a plain model.
    ``--adapter`` again and ``--weights w1,w2`` merge a weighted combination;
    ``--combination`` chooses its definition.
``dora-jax export-peft CHECKPOINT --out FOLDER``
    Writes a checkpoint's adapters as a PEFT folder (``PeftModel.from_pretrained``).

Wrong inputs end with exit status 1 and one line naming the path and what is wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dora_jax import merging, ops

RECORD = ("meta", "dora_jax.json")  # a checkpoint step's record, relative to its folder

_EPILOG = {
    "inspect": """\
examples:
  dora-jax inspect run/adapter          a PEFT folder (adapter_config.json + weights)
  dora-jax inspect run/checkpoints      the newest step of an adapter checkpoint folder
  dora-jax inspect run/checkpoints --step 40 --json
""",
    "merge": """\
A Hugging Face model folder holds config.json and model.safetensors, or shards named by
model.safetensors.index.json (pickle files, pytorch_model.bin, are not read). A PEFT
folder holds adapter_config.json and adapter_model.safetensors (what save_pretrained
writes, from PEFT or from dora_jax.peft).

One adapter is merged as PEFT's merge_and_unload merges it:
  W' = m / ||W0 + s*B@A|| * (W0 + s*B@A)     (DoRA; W0 + s*B@A for LoRA)
computed in float32 and cast once to the weight's dtype; ||.|| is the L2 norm of each
output feature's weights (each row of a torch Linear weight).

Several adapters (--adapter A --adapter B --weights 0.7,0.3) combine by --combination:
  merged  W = W0 + sum_k w_k (W'_k - W0): the weighted sum of the adapters' merged
          weights (with weights summing to 1, sum_k w_k W'_k). The default.
  dora    one DoRA adapter from the combined delta and magnitude:
          V = W0 + sum_k w_k s_k B_k@A_k,  m = ||W0|| + sum_k w_k (m_k - ||W0||),
          W = m / ||V|| * V.
For DoRA the two differ (a norm of a sum is not a sum of norms).

examples:
  dora-jax merge --base minilm/ --adapter run/adapter --out minilm-merged/
  dora-jax merge --base minilm/ --adapter a/ --adapter b/ --weights 0.5,0.5 --out ab/
""",
    "export-peft": """\
The checkpoint records its DoRA config and, when it was saved with
AdapterCheckpoints(..., base=frozen), the shapes of the base weights, which say which
adapted layers are embeddings. Without that record pass --assume-dense: every 2-d
adapter is then written as a Linear layer's.

examples:
  dora-jax export-peft run/checkpoints --out run/adapter-from-checkpoint
  dora-jax export-peft run/checkpoints --step 40 --out adapter40/
""",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dora-jax",
        description="Inspect, merge and export DoRA / LoRA adapters (PEFT folders and "
        "dora-jax adapter checkpoints).",
        epilog="Run 'dora-jax COMMAND --help' for a command's options and examples.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    formatter = argparse.RawDescriptionHelpFormatter

    inspect = commands.add_parser(
        "inspect",
        help="describe a PEFT adapter folder or an adapter checkpoint",
        description=_fill(
            "Describe a PEFT adapter folder or an adapter checkpoint folder: method, "
            "rank / alpha per adapted layer, parameter counts, dtypes, step, and the base "
            "model it expects."
        ),
        epilog=_EPILOG["inspect"],
        formatter_class=formatter,
    )
    inspect.add_argument("path", type=Path, help="a PEFT folder or a checkpoint folder")
    inspect.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")

    merge = commands.add_parser(
        "merge",
        help="merge adapters into a Hugging Face safetensors model folder",
        description=_fill(
            "Merge one or more PEFT adapters into a Hugging Face model folder, "
            "streaming its safetensors shards tensor by tensor; the output folder has the same "
            "files, names, dtypes and index."
        ),
        epilog=_EPILOG["merge"],
        formatter_class=formatter,
    )
    merge.add_argument("--base", type=Path, required=True, help="the model folder")
    merge.add_argument(
        "--adapter",
        type=Path,
        action="append",
        required=True,
        help="a PEFT adapter folder (repeat for a weighted merge of several)",
    )
    merge.add_argument(
        "--weights", help="comma-separated weights, one per --adapter (e.g. 0.7,0.3)"
    )
    merge.add_argument(
        "--combination",
        choices=merging.COMBINATIONS,
        default="merged",
        help="how several adapters combine (see below; default: merged)",
    )
    merge.add_argument("--out", type=Path, required=True, help="the folder to write (new)")

    export = commands.add_parser(
        "export-peft",
        help="write a checkpoint's adapters as a PEFT folder",
        description=_fill(
            "Write the adapters (and modules_to_save) of an adapter checkpoint "
            "folder as a PEFT adapter folder."
        ),
        epilog=_EPILOG["export-peft"],
        formatter_class=formatter,
    )
    export.add_argument("checkpoint", type=Path, help="an adapter checkpoint folder")
    export.add_argument("--out", type=Path, required=True, help="the PEFT folder to write")
    export.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    export.add_argument(
        "--assume-dense",
        action="store_true",
        help="the checkpoint records no base: write every 2-d adapter as a Linear layer's",
    )
    return parser


def _fill(text: str) -> str:
    return textwrap.fill(text, 88)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 1 for a wrong input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = {"inspect": _inspect, "merge": _merge, "export-peft": _export}[args.command]
    try:
        run(args)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, TypeError) as e:
        print(f"dora-jax {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- inspect


def _inspect(args) -> None:
    path = args.path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder.")
    if not path.is_dir():
        raise NotADirectoryError(
            f"{path}: not a folder (a PEFT adapter folder or an adapter checkpoint folder)."
        )
    if (path / merging.PEFT_CONFIG).is_file():
        if args.step is not None:
            raise ValueError(f"{path}: --step is for checkpoint folders; this is a PEFT folder.")
        info = describe_peft(path)
    elif _checkpoint_steps(path) or (path.joinpath(*RECORD)).is_file():
        info = describe_checkpoint(path, args.step)
    else:
        raise ValueError(
            f"{path}: neither a PEFT adapter folder (no {merging.PEFT_CONFIG}) nor an adapter "
            f"checkpoint folder (no step folders with {'/'.join(RECORD)})."
        )
    print(json.dumps(info, indent=1) if args.json else _as_text(info))


def describe_peft(path: Path) -> dict[str, Any]:
    """What ``inspect`` reports on a PEFT folder, as a dict."""
    adapter = merging.read_peft_folder(path)
    config = adapter.config
    layers = []
    for name, module in sorted(adapter.modules.items()):
        a = module.adapter
        count = sum(int(np.size(x)) for x in (a.lora_a, a.lora_b, a.magnitude) if x is not None)
        layers.append(
            {
                "name": name,
                "kind": module.kind,
                "rank": module.rank,
                "alpha": module.alpha,
                "scale": a.scale,
                "parameters": count,
                "base_weight": list(module.weight_shape()),
            }
        )
    full = {k: list(v.shape) for k, v in sorted(adapter.full.items())}
    return {
        "kind": "PEFT adapter folder",
        "path": str(path),
        "method": "DoRA" if adapter.use_dora else "LoRA",
        "rslora": config.get("use_rslora") is True,
        "rank": config["r"],
        "alpha": config["lora_alpha"],
        "step": None,
        "dtypes": list(adapter.dtypes),
        "layers": layers,
        "adapter_parameters": sum(layer["parameters"] for layer in layers),
        "full_weights": full,
        "full_weight_parameters": sum(int(np.prod(s)) for s in full.values()),
        "base": {
            "name_or_path": config.get("base_model_name_or_path"),
            "weights": {f"{layer['name']}.weight": layer["base_weight"] for layer in layers},
        },
    }


def _checkpoint_steps(path: Path) -> list[int]:
    return sorted(
        int(p.name) for p in path.iterdir() if p.name.isdigit() and p.joinpath(*RECORD).is_file()
    )


def _checkpoint_record(path: Path, step: int | None) -> tuple[Path, dict[str, Any], list[int]]:
    """``(step folder, record, steps)`` of a checkpoint folder or of one step folder."""
    if path.joinpath(*RECORD).is_file() and not _checkpoint_steps(path):
        folder, steps = path, [int(path.name)] if path.name.isdigit() else []
        if step is not None and str(step) != path.name:
            raise ValueError(f"{path}: a step folder of step {path.name}, not {step}.")
    else:
        steps = _checkpoint_steps(path)
        if not steps:
            raise ValueError(
                f"{path}: not an adapter checkpoint folder (no step folders with "
                f"{'/'.join(RECORD)})."
            )
        if step is not None and step not in steps:
            raise FileNotFoundError(f"{path}: no checkpoint of step {step} (steps: {steps}).")
        folder = path / str(steps[-1] if step is None else step)
    file = folder.joinpath(*RECORD)
    try:
        record = json.loads(file.read_text())
        record["leaves"].items()  # noqa: B018
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{file}: not a readable checkpoint record ({error}).") from None
    return folder, record, steps


def _adapted_paths(leaves: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{layer path: {leaf: leaf record}}`` of the trainable adapters."""
    layers: dict[str, dict[str, Any]] = {}
    for key, leaf in leaves.items():
        parts = key.split("/")
        if parts[0] != "trainable" or parts[-1] not in ("lora_a", "lora_b", "magnitude"):
            continue
        inner = parts[2:-1] if parts[1] == "dora" else parts[1:-1]
        layers.setdefault("/".join(inner), {})[parts[-1]] = leaf
    return layers


def _config(record: dict[str, Any], file: Path):
    from dora_jax.config import DoRAConfig

    if not isinstance(record.get("config"), dict):
        raise ValueError(
            f"{file}: the checkpoint records no DoRA config (saved without "
            "AdapterCheckpoints(..., config=...))."
        )
    try:
        return DoRAConfig(**record["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{file}: its DoRA config cannot be read ({error}).") from None


def describe_checkpoint(path: Path, step: int | None) -> dict[str, Any]:
    """What ``inspect`` reports on an adapter checkpoint, as a dict."""
    folder, record, steps = _checkpoint_record(path, step)
    config = _config(record, folder.joinpath(*RECORD))
    leaves = record["leaves"]
    layers = []
    for name, parts in sorted(_adapted_paths(leaves).items()):
        settings = config.settings(name)
        rank = parts["lora_a"]["shape"][-1]
        count = sum(int(np.prod(leaf["shape"])) for leaf in parts.values())
        layers.append(
            {
                "name": name,
                "rank": rank,
                "alpha": settings.alpha,
                "scale": ops.scaling(rank, settings.alpha, settings.rslora),
                "parameters": count,
                "dtype": parts["lora_a"]["dtype"],
                "base_weight": _base_shape(record.get("base"), name),
            }
        )
    size = lambda prefix: sum(  # noqa: E731
        int(np.prod(leaf["shape"])) for key, leaf in leaves.items() if key.startswith(prefix)
    )
    base = record.get("base")
    return {
        "kind": "adapter checkpoint",
        "path": str(folder),
        "steps": steps,
        "step": record.get("step"),
        "data_position": record.get("data_position"),
        "method": "DoRA" if config.use_dora else "LoRA",
        "rslora": config.rslora,
        "rank": config.rank,
        "alpha": config.alpha,
        "targets": config.targets if isinstance(config.targets, str) else list(config.targets),
        "dtypes": sorted({v["dtype"] for k, v in leaves.items() if k.startswith("trainable/")}),
        "layers": layers,
        "adapter_parameters": sum(layer["parameters"] for layer in layers),
        "modules_to_save": list(config.modules_to_save),
        "full_weight_parameters": size("trainable/") - sum(layer["parameters"] for layer in layers),
        "optimizer_state_values": size("opt_state/"),
        "base": None
        if base is None
        else {
            "leaves": len(base),
            "parameters": sum(int(np.prod(shape)) for shape, _ in base.values()),
            "dtypes": sorted({dtype for _, dtype in base.values()}),
        },
    }


def _base_shape(base: dict[str, Any] | None, layer: str) -> list[int] | None:
    for key, (shape, _) in (base or {}).items():
        if key.endswith((f"{layer}/kernel", f"{layer}/embedding")):
            return list(shape)
    return None


def _as_text(info: dict[str, Any]) -> str:
    lines = [f"{info['kind']}: {info['path']}"]
    method = info["method"] + (" (rsLoRA scaling)" if info["rslora"] else "")
    lines.append(f"  method: {method}, rank {info['rank']}, alpha {info['alpha']:g}")
    if info["kind"] == "adapter checkpoint":
        lines.append(
            f"  step: {info['step']} (steps in the folder: {info['steps']}), "
            f"data position: {info['data_position']}"
        )
        lines.append(f"  targets: {info['targets']}")
    else:
        lines.append("  step: not recorded (a PEFT folder holds no training step)")
    lines.append(f"  dtypes: {', '.join(info['dtypes'])}")
    header = ("layer", "rank", "alpha", "scale", "params", "base weight")
    rows = [
        (
            layer["name"],
            str(layer["rank"]),
            f"{layer['alpha']:g}",
            f"{layer['scale']:.4g}",
            f"{layer['parameters']:,}",
            "?" if layer["base_weight"] is None else str(tuple(layer["base_weight"])),
        )
        for layer in info["layers"]
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
        lines.append(("  " + cells).rstrip())
    lines.append(
        f"  {_count(len(rows), 'adapted layer')}, {info['adapter_parameters']:,} adapter parameters"
        f" and {info['full_weight_parameters']:,} full-weight parameters"
        + (" (modules_to_save, biases)" if info["full_weight_parameters"] else "")
    )
    base = info["base"]
    if info["kind"] == "adapter checkpoint":
        lines.append(f"  optimizer state: {info['optimizer_state_values']:,} values")
        if base is None:
            lines.append("  base: not recorded (saved without AdapterCheckpoints(base=...))")
        else:
            lines.append(
                f"  base: {base['leaves']} frozen arrays, {base['parameters']:,} parameters "
                f"({', '.join(base['dtypes'])})"
            )
    else:
        name = base["name_or_path"] or "not recorded"
        lines.append(
            f"  base: {name}; it must hold the {_count(len(base['weights']), 'weight')} "
            "listed above"
        )
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# ------------------------------------------------------------------------------ merge


def _merge(args) -> None:
    from dora_jax import peft as dora_peft

    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise ValueError(
                f"--weights {args.weights!r}: expected comma-separated numbers, e.g. 0.7,0.3."
            ) from None
        merging.check_weights(weights, len(args.adapter), "--weights")
    elif len(args.adapter) > 1:
        raise ValueError(
            f"{len(args.adapter)} adapters need --weights, one per adapter (e.g. "
            f"--weights {','.join(['0.5'] * len(args.adapter))})."
        )
    merging.base_files(args.base)  # the base's errors before the adapters'
    adapters = []
    for folder in args.adapter:
        adapter = merging.read_peft_folder(folder)
        dora_peft.load_config(folder)  # refuses every config field not understood
        adapters.append(adapter)
    start = time.perf_counter()
    result = merging.merge_folder(
        args.base,
        adapters,
        args.out,
        weights=weights,
        combination=args.combination,
        progress=print,
    )
    print(
        f"merged {_count(len(result.merged), 'weight')}"
        + (f" and replaced {len(result.replaced)}" if result.replaced else "")
        + f" into {len(result.files)} safetensors file(s) in {args.out} "
        f"({time.perf_counter() - start:.1f} s)"
    )


# ------------------------------------------------------------------------ export-peft


def _export(args) -> None:
    from dora_jax import peft as dora_peft

    if not args.checkpoint.is_dir():
        raise FileNotFoundError(f"{args.checkpoint}: no such checkpoint folder.")
    folder, record, _ = _checkpoint_record(args.checkpoint, args.step)
    config = _config(record, folder.joinpath(*RECORD))
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise FileExistsError(f"{args.out}: exists and is not an empty folder.")
    trainable = _restore_trainable(folder, record)
    dora = trainable.get("dora")
    if not isinstance(dora, dict) or not dora:
        raise ValueError(
            f"{folder}: its trainable tree holds no 'dora' adapters (an NNX state or another "
            "structure); export it with dora_jax.peft.save_pretrained from the model."
        )
    base = record.get("base")
    params: dict[str, Any] = {}
    for name, parts in _adapted_paths(record["leaves"]).items():
        a, b = parts["lora_a"]["shape"], parts["lora_b"]["shape"]
        kernel_name, shape = "kernel", (*a[:-1], b[-1])
        if base is not None:
            found = [k for k in base if k.endswith((f"{name}/kernel", f"{name}/embedding"))]
            if not found:
                raise ValueError(
                    f"{folder}: the recorded base has no kernel or embedding for the adapted "
                    f"layer {name!r}."
                )
            kernel_name = found[0].rsplit("/", 1)[1]
            shape = tuple(base[found[0]][0])
        elif len(a) == 2 and not args.assume_dense:
            raise ValueError(
                f"{folder}: the checkpoint records no base model (saved without "
                f"AdapterCheckpoints(base=...)), so whether the 2-d adapter {name!r} belongs "
                "to a Dense or an Embed layer is unknown; pass --assume-dense if every 2-d "
                "adapter is a Dense layer's."
            )
        node = params
        for key in name.split("/"):
            node = node.setdefault(key, {})
        # Zero-stride stand-ins: only the kind and shape of the base are read.
        node[kernel_name] = np.broadcast_to(np.zeros((), np.float32), shape)
    saved = trainable.get("params", {})
    variables = {"params": _merged(params, saved), "dora": dora}
    dora_peft.save_pretrained(args.out, variables, config)
    print(f"wrote {args.out} (PEFT folder) from step {record.get('step')} of {folder.parent}")


def _merged(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _restore_trainable(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's trainable arrays, each checked against its recorded sha256."""
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as checkpointer:
            state = checkpointer.restore((folder / "state").absolute())
    except Exception as error:  # Orbax raises many types; name the folder
        raise ValueError(f"{folder / 'state'}: Orbax cannot read it ({error}).") from None
    trainable = state.get("trainable", {}) if isinstance(state, dict) else {}

    def check(tree, path):
        for key, value in tree.items():
            where = f"{path}/{key}"
            if isinstance(value, dict):
                check(value, where)
                continue
            leaf = record["leaves"].get(where)
            data = np.ascontiguousarray(np.asarray(value)).tobytes()
            if leaf is None or hashlib.sha256(data).hexdigest() != leaf["sha256"]:
                raise ValueError(
                    f"{folder}: leaf {where!r} does not match its recorded checksum "
                    "(damaged checkpoint)."
                )

    check(trainable, "trainable")
    return trainable


if __name__ == "__main__":
    sys.exit(main())
