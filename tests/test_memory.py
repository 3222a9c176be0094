"""DoRA's training step at its peak holds LoRA's buffers plus one activation per layer.

``benchmarks/memory.py`` reads XLA's live-range analysis, which XLA only writes when its
flags are set before the backend starts, so it runs in a subprocess.
"""

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"


def test_peak_memory_is_lora_plus_one_activation_per_layer():
    run = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600, check=True
    )
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in run.stdout.splitlines()
        if line.startswith("| ") and line.split("|")[1].strip().isdigit()
    ]
    assert len(rows) == 3, run.stdout
    for width, layers, tokens, allowance, *_, peak_excess, per_layer, activations in rows:
        if peak_excess == "-":
            pytest.skip("this XLA build wrote no live-range analysis")
        assert int(allowance) == int(layers) * int(tokens) * int(width) * 4
        # Beyond the allowance: g and the norm, two float32 (out,) vectors per layer,
        # and a few scalars.
        assert 0 <= int(peak_excess) <= 2 * int(layers) * int(width) * 4 + 64, run.stdout
        assert float(per_layer) <= 2.01
        assert 1.0 <= float(activations) <= 1.05


def test_benchmark_steps_get_the_norm_cache_of_their_own_params():
    """``init`` makes no ``dora_cache``: the benchmarks' DoRA steps (memory.py and
    step_time.py share them) must be given ``||W0||_c^2`` of the params they train on,
    or they would time and size a step that squares ``W0`` every time."""
    sys.path.insert(0, str(SCRIPT.parent))  # step_time.py and harness.py
    try:
        import step_time
    finally:
        sys.path.remove(str(SCRIPT.parent))
    x = jnp.ones((4, 32))
    _, frozen, _ = step_time.make_variant("dora", 32, 2, x)
    for name, layer in frozen["params"].items():
        want = jnp.sum(jnp.square(layer["kernel"]), axis=0)
        got = frozen["dora_cache"][name]["base_norm_sq"]
        assert jnp.allclose(got, want, rtol=1e-6), name
    for name in ("lora", "dora-nocache"):
        _, frozen, _ = step_time.make_variant(name, 32, 2, x)
        assert "dora_cache" not in frozen, name
