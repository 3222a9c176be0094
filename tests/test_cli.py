"""The ``dora-jax`` command end to end: ``inspect``, ``merge``, ``export-peft``, ``--help``
and the errors of each, against PEFT, transformers and the files themselves.

``merge`` runs once as a subprocess (``python -m dora_jax.cli``) on a PEFT DoRA adapter
of a small random transformers ``BertModel`` saved in three shards: the merged folder
loads with transformers as a plain model and gives PEFT's ``merge_and_unload()``
outputs. The other commands run in-process through :func:`dora_jax.cli.main`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from safetensors.numpy import load_file, save_file

import dora_jax
from dora_jax import cli, merging, train
from dora_jax import peft as dora_peft
from dora_jax.checkpoint import AdapterCheckpoints

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
IDS = [[2, 7, 11, 5, 31, 3], [2, 40, 9, 9, 17, 3]]
pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning"
)


def _bert():
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def _hidden(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).last_hidden_state.numpy()


def _peft_adapter(base: Path, seed: int, **config):
    """A PEFT DoRA adapter of the base folder with trained-looking weights."""
    model = peft.get_peft_model(
        transformers.BertModel.from_pretrained(base, add_pooling_layer=False),
        peft.LoraConfig(use_dora=True, **config),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A three-shard BertModel folder, two PEFT DoRA adapters of it, and PEFT's merged
    outputs for the first."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    _bert().save_pretrained(root / "base", max_shard_size="8KB")
    first = _peft_adapter(
        root / "base", 1, r=4, lora_alpha=8,
        target_modules=["query", "value", "word_embeddings"],
        rank_pattern={"value": 2}, alpha_pattern={"query": 16},
    )  # fmt: skip
    first.save_pretrained(root / "first")
    second = _peft_adapter(root / "base", 2, r=2, lora_alpha=4, target_modules=["query"])
    second.save_pretrained(root / "second")
    merged = _hidden(first.merge_and_unload())
    return root, merged


def _run(capsys, *argv) -> tuple[int, str, str]:
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_merge_command_gives_peft_merge_and_unload(folders, tmp_path):
    root, peft_merged = folders
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "dora_jax.cli", "merge", "--base", root / "base",
               "--adapter", root / "first", "--out", tmp_path / "merged"]  # fmt: skip
    done = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "merged 5 weights into 3 safetensors file(s)" in done.stdout
    base_files = sorted(p.name for p in (root / "base").iterdir())
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == base_files
    assert len([f for f in base_files if f.endswith(".safetensors")]) == 3
    plain = transformers.BertModel.from_pretrained(tmp_path / "merged", add_pooling_layer=False)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    assert ref.relative_error(_hidden(plain.eval()), peft_merged) < 1e-5
    assert ref.relative_error(_hidden(_bert_from(root / "base")), peft_merged) > 1e-2


def _bert_from(folder):
    return transformers.BertModel.from_pretrained(folder, add_pooling_layer=False).eval()


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_weighted_merge_command_combines_the_merged_weights(folders, tmp_path, capsys):
    """--combination merged with weights 0.3, 0.7 is 0.3 W'_1 + 0.7 W'_2 of the adapters
    merged one at a time; --combination dora differs from it."""
    root, _ = folders
    for name in ("first", "second"):
        assert _run(capsys, "merge", "--base", root / "base", "--adapter", root / name,
                    "--out", tmp_path / name)[0] == 0  # fmt: skip
    status, out, _ = _run(capsys, "merge", "--base", root / "base", "--adapter", root / "first",
                          "--adapter", root / "second", "--weights", "0.3,0.7",
                          "--out", tmp_path / "both")  # fmt: skip
    assert status == 0 and "merged 5 weights" in out
    base, first, second, both = (
        _tensors(p)
        for p in (root / "base", tmp_path / "first", tmp_path / "second", tmp_path / "both")
    )
    for key in base:
        want = 0.3 * ref.f64(first[key]) + 0.7 * ref.f64(second[key])
        assert ref.relative_error(both[key], want) < 1e-6, key
    status, _, _ = _run(capsys, "merge", "--base", root / "base", "--adapter", root / "first",
                        "--adapter", root / "second", "--weights", "0.3,0.7",
                        "--combination", "dora", "--out", tmp_path / "dora")  # fmt: skip
    key = "encoder.layer.0.attention.self.query.weight"
    assert status == 0 and ref.relative_error(_tensors(tmp_path / "dora")[key], both[key]) > 1e-3


def test_inspect_peft_folder(folders, capsys):
    root, _ = folders
    status, out, _ = _run(capsys, "inspect", root / "first", "--json")
    assert status == 0
    info = json.loads(out)
    tensors = load_file(root / "first" / merging.PEFT_WEIGHTS)
    base = _tensors(root / "base")
    assert info["method"] == "DoRA" and info["step"] is None
    assert info["adapter_parameters"] == sum(v.size for v in tensors.values())
    layers = {layer["name"]: layer for layer in info["layers"]}
    assert len(layers) == 5  # query, value in two layers and the word embeddings
    query, value = (layers[f"encoder.layer.1.attention.self.{n}"] for n in ("query", "value"))
    assert (query["rank"], query["alpha"], query["scale"]) == (4, 16, 4.0)
    assert (value["rank"], value["alpha"], value["scale"]) == (2, 8, 4.0)
    for name, layer in layers.items():
        assert tuple(layer["base_weight"]) == base[f"{name}.weight"].shape
    status, text, _ = _run(capsys, "inspect", root / "first")
    assert "method: DoRA, rank 4, alpha 8" in text
    assert re.search(r"\n  embeddings\.word_embeddings +4 +8 +2 +", text)
    assert "5 adapted layers, " + f"{info['adapter_parameters']:,}" in text


class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
        hidden = nn.Dense(8, name="encoder")(nn.Embed(20, 8, name="embed")(ids))
        return nn.Dense(3, name="head")(hidden)


def _checkpoint(folder: Path, *, base: bool, targets=("embed", "encoder")):
    """An adapter checkpoint of Net at steps 3 and 5, and its variables."""
    ids = jnp.arange(6).reshape(2, 3)
    config = dora_jax.DoRAConfig(
        targets=list(targets), rank=2, alpha=4.0, alpha_pattern={"encoder": 8.0},
        modules_to_save=["head"],
    )  # fmt: skip
    wrapped = dora_jax.linen.wrap(Net(), config)
    variables = wrapped.init_from_params(
        jax.random.key(0), Net().init(jax.random.key(1), ids)["params"], ids
    )
    variables = {**variables, "dora": jax.tree.map(lambda x: x + 0.1, variables["dora"])}
    trainable, frozen = train.partition(variables, config)
    with AdapterCheckpoints(folder, config=config, base=frozen if base else None) as checkpoints:
        for step in (3, 5):
            state = train.init_state(trainable, optax.adam(1e-3)).replace(step=jnp.asarray(step))
            checkpoints.save(state, data_position=10 * step)
    return config, wrapped, variables, ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint") / "ck"
    return folder, *_checkpoint(folder, base=True)


def test_inspect_checkpoint(checkpoint, capsys):
    folder, config, _, variables, _ = checkpoint
    status, out, _ = _run(capsys, "inspect", folder, "--json")
    assert status == 0
    info = json.loads(out)
    assert (info["steps"], info["step"], info["data_position"]) == ([3, 5], 5, 50)
    layers = {layer["name"]: layer for layer in info["layers"]}
    assert (layers["encoder"]["alpha"], layers["encoder"]["scale"]) == (8.0, 4.0)
    assert (layers["embed"]["alpha"], layers["embed"]["base_weight"]) == (4.0, [20, 8])
    sizes = jax.tree.map(np.size, variables["dora"])
    assert info["adapter_parameters"] == sum(jax.tree.leaves(sizes))
    assert info["full_weight_parameters"] == 8 * 3 + 3  # the head
    assert info["base"]["parameters"] == 20 * 8 + 8 * 8 + 8
    status, out, _ = _run(capsys, "inspect", folder, "--step", "3")
    assert "step: 3 (steps in the folder: [3, 5]), data position: 30" in out
    assert "base: 3 frozen arrays, 232 parameters (float32)" in out


def test_export_peft_writes_what_save_pretrained_writes(checkpoint, tmp_path, capsys):
    folder, config, wrapped, variables, ids = checkpoint
    status, out, _ = _run(capsys, "export-peft", folder, "--out", tmp_path / "peft")
    assert status == 0 and "from step 5" in out
    dora_peft.save_pretrained(tmp_path / "direct", variables, config)
    exported = load_file(tmp_path / "peft" / merging.PEFT_WEIGHTS)
    direct = load_file(tmp_path / "direct" / merging.PEFT_WEIGHTS)
    assert sorted(exported) == sorted(direct)
    assert any("lora_embedding_A" in key for key in exported)
    for key, value in direct.items():
        assert value.tobytes() == exported[key].tobytes(), key
    loaded = dora_peft.load_pretrained(tmp_path / "peft", wrapped.init(jax.random.key(9), ids))
    for got, want in zip(
        jax.tree.leaves(loaded["dora"]), jax.tree.leaves(variables["dora"]), strict=True
    ):
        assert np.array_equal(got, want)


def test_export_peft_without_a_recorded_base(tmp_path, capsys):
    _checkpoint(tmp_path / "ck", base=False, targets=("encoder",))
    status, _, err = _run(capsys, "export-peft", tmp_path / "ck", "--out", tmp_path / "peft")
    assert status == 1
    assert "records no base model" in err and "--assume-dense" in err and "'encoder'" in err
    status, _, _ = _run(
        capsys, "export-peft", tmp_path / "ck", "--out", tmp_path / "peft", "--assume-dense"
    )
    assert status == 0
    assert "base_model.model.encoder.lora_A.weight" in load_file(
        tmp_path / "peft" / merging.PEFT_WEIGHTS
    )


def test_errors_name_the_path(folders, tmp_path, capsys):
    root, _ = folders
    lora = {"peft_type": "LORA", "r": 2, "lora_alpha": 2}
    other = tmp_path / "other"  # an adapter of a module the base lacks
    other.mkdir()
    name = "base_model.model.decoder.q"
    save_file(
        {f"{name}.lora_A.weight": np.ones((2, 16), np.float32),
         f"{name}.lora_B.weight": np.ones((16, 2), np.float32)},
        str(other / merging.PEFT_WEIGHTS),
    )  # fmt: skip
    (other / merging.PEFT_CONFIG).write_text(json.dumps({**lora, "target_modules": ["q"]}))
    wide = tmp_path / "wide"  # the right module with the wrong input size
    wide.mkdir()
    name = "base_model.model.encoder.layer.0.attention.self.query"
    save_file(
        {f"{name}.lora_A.weight": np.ones((2, 12), np.float32),
         f"{name}.lora_B.weight": np.ones((16, 2), np.float32)},
        str(wide / merging.PEFT_WEIGHTS),
    )  # fmt: skip
    (wide / merging.PEFT_CONFIG).write_text(json.dumps({**lora, "target_modules": ["query"]}))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("")
    base, first, out = root / "base", root / "first", tmp_path / "out"

    def merge(*argv, base=base, out=out):
        return ("merge", "--base", base, *argv, "--out", out)

    cases = [
        (("inspect", tmp_path / "nowhere"), f"{tmp_path / 'nowhere'}: no such file or folder"),
        (("inspect", base / "config.json"), "config.json: not a folder"),
        (("inspect", base), f"{base}: neither a PEFT adapter folder"),
        (("inspect", first, "--step", "3"), "--step is for checkpoint folders"),
        (merge("--adapter", first, base=tmp_path / "nobase"), "nobase: no such folder"),
        (merge("--adapter", base), f"{base}: not a PEFT adapter folder"),
        (merge("--adapter", other), "other: adapts module 'decoder.q', but the base"),
        (merge("--adapter", wide), "expects a base weight of shape (16, 12)"),
        (merge("--adapter", first, "--adapter", first, "--weights", "1"), "1 weights for 2"),
        (merge("--adapter", first, "--adapter", first), "2 adapters need --weights"),
        (merge("--adapter", first, "--weights", "a,b"), "expected comma-separated numbers"),
        (merge("--adapter", first, out=tmp_path / "used"), "used: exists and is not an empty"),
        (("export-peft", tmp_path / "nock", "--out", out), "nock: no such checkpoint folder"),
        (("export-peft", first, "--out", out), f"{first}: not an adapter checkpoint folder"),
    ]
    for argv, message in cases:
        status, _, err = _run(capsys, *argv)
        assert status == 1, argv
        assert err.startswith(f"dora-jax {argv[0]}: error: ") and message in err, (argv, err)
    assert not out.exists()


def test_help_a_newcomer_can_follow(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for command in ("inspect", "merge", "export-peft"):
        assert command in text
    with pytest.raises(SystemExit):
        cli.main(["merge", "--help"])
    text = capsys.readouterr().out
    assert "W' = m / ||W0 + s*B@A|| * (W0 + s*B@A)" in text
    assert "--weights 0.5,0.5" in text and "merged  W = W0 + sum_k w_k (W'_k - W0)" in text
    with pytest.raises(SystemExit) as done:
        cli.main(["merge", "--base", "x"])
    assert done.value.code == 2 and "--adapter" in capsys.readouterr().err
