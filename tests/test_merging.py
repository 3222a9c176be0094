"""Exact merges and unmerges, weighted merges of several adapters, and the streaming
merge of safetensors folders (:mod:`dora_jax.merging`), against the float64 reference.

* Every layer kind of the catalogue (``conftest.CASES``), Linen and NNX: the merged
  layer's output equals the unmerged layer's and the reference's to 1e-5 (float32), and
  unmerging gives back the base bit for bit (float32 and bfloat16).
* The two weighted-merge definitions against their float64 formulas, and PEFT's
  ``add_weighted_adapter`` against both (what it computes is the third form, the
  combined delta with the magnitude left at ``||W0||``).
* ``merge_folder`` on a sharded folder written here with NumPy (bfloat16 and integer
  tensors, an index): the same file names, headers and index, merged tensors equal to
  the reference, the others byte for byte; its errors name the paths.
"""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from conftest import BASE_CASES, CASES, DTYPE_KWARGS, F32_TOL, make_cotangent, random_variables
from conftest import reference_results as reference
from flax import nnx
from safetensors.numpy import save_file

from dora_jax import merging, ops
from dora_jax.linen import models as linen_models
from dora_jax.nnx import surgery as nnx_surgery

DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16}


def _reference_y(case, variables, x):
    return reference(case, variables, x, make_cotangent(case, x), detach_norm=True)["y"]


def _bits(x) -> bytes:
    return np.ascontiguousarray(np.asarray(x)).tobytes()


# ------------------------------------------------------------- one adapter, every kind


@pytest.mark.parametrize(
    "case_name, dtype",
    [(name, "float32") for name in BASE_CASES] + [("dense_general", "bfloat16")],
)
def test_linen_merge_and_unmerge(case_name, dtype):
    """merge_params_exact: the merged layer equals the unmerged one and the reference;
    unmerge_params gives the base back bit for bit."""
    case = CASES[case_name]
    layer, x, variables = random_variables(case, dtype, seed=3)
    merged, records = linen_models.merge_params_exact(layer, variables, x)
    if dtype == "float32":
        plain = case.make_base().apply({"params": merged}, x)
        y = layer.apply(variables, x)
        assert ref.relative_error(plain, y) < F32_TOL
        assert ref.relative_error(plain, _reference_y(case, variables, x)) < F32_TOL
    back = linen_models.unmerge_params(layer, {**variables, "params": merged}, records, x)
    assert _bits(back[case.param]) == _bits(variables["params"][case.param])
    assert back[case.param].dtype == variables["params"][case.param].dtype


class Holder(nnx.Module):
    def __init__(self, layer):
        self.layer = layer


@pytest.mark.parametrize(
    "case_name", [n for n in BASE_CASES if not n.startswith("conv_") or n == "conv_same_2x3"]
)
def test_nnx_merge_and_unmerge(case_name):
    """merge_adapters_exact / unmerge_adapters on every NNX layer kind (float32)."""
    case = CASES[case_name]
    _, x, variables = random_variables(case, "float32", seed=4)
    layer = case.make_nnx(nnx.Rngs(0), **DTYPE_KWARGS["float32"])
    for tree in (variables["params"], variables["dora"]):
        for name, value in tree.items():
            getattr(layer, name).set_value(jnp.asarray(value))
    model = Holder(layer)
    y = model.layer(x)
    kept = nnx_surgery.merge_adapters_exact(model)
    assert not isinstance(model.layer, nnx_surgery.DoRALayer)
    y_merged = model.layer(x)
    assert ref.relative_error(y_merged, y) < F32_TOL
    assert ref.relative_error(y_merged, _reference_y(case, variables, x)) < F32_TOL
    assert 0 < kept.nbytes < 0.5 * np.asarray(variables["params"][case.param]).nbytes
    nnx_surgery.unmerge_adapters(model, kept)
    assert model.layer is layer
    assert _bits(getattr(layer, case.param)[...]) == _bits(variables["params"][case.param])
    assert _bits(model.layer(x)) == _bits(y)


def _dense_adapter(rng, fan_in, fan_out, rank=3, scale=1.5, magnitude=True):
    a = rng.standard_normal((fan_in, rank)) / math.sqrt(fan_in)
    b = rng.standard_normal((rank, fan_out)) * 0.3
    m = rng.uniform(0.5, 1.5, fan_out) if magnitude else None
    return merging.KernelAdapter(
        a.astype(np.float32),
        b.astype(np.float32),
        None if m is None else m.astype(np.float32),
        scale,
    )


@pytest.mark.parametrize("dtype", [np.float16, np.float64, jnp.bfloat16])
def test_unmerge_is_exact_with_zero_magnitudes_and_other_dtypes(dtype):
    """A zero magnitude (W' = 0 there: nothing to divide back) and tiny weights only
    add exceptions; float16, float64 and bfloat16 come back bit for bit too."""
    rng = np.random.default_rng(0)
    kernel = (rng.standard_normal((40, 24)) / 7).astype(dtype)
    kernel[:5, 3] = 0.0
    kernel[5, 4] = -0.0
    kernel[6, 5] = 1e-30 if dtype == np.float64 else 1e-3
    adapter = _dense_adapter(rng, 40, 24)
    adapter.magnitude[7] = 0.0
    merged, record = merging.merge_exact(kernel, adapter, ops.dense_layout())
    assert np.all(np.asarray(merged, np.float32)[:, 7] == 0)
    assert record.indices.size >= 40  # the whole zero-magnitude column
    back = merging.unmerge(merged, adapter, ops.dense_layout(), record)
    assert back.dtype == kernel.dtype and _bits(back) == _bits(kernel)


def test_unmerge_refuses_a_changed_kernel_or_another_adapter():
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((12, 10)).astype(np.float32)
    adapter = _dense_adapter(rng, 12, 10)
    merged, record = merging.merge_exact(kernel, adapter, ops.dense_layout())
    changed = merged.copy()
    changed[0, 0] += 1.0
    with pytest.raises(ValueError, match="not the one this record was made from"):
        merging.unmerge(changed, adapter, ops.dense_layout(), record)
    other = adapter._replace(lora_b=adapter.lora_b * 2)
    with pytest.raises(ValueError, match="the adapter given is not the one that was merged"):
        merging.unmerge(merged, other, ops.dense_layout(), record)


def test_linen_unmerge_names_the_layer_of_a_changed_kernel():
    case = CASES["dense"]
    layer, x, variables = random_variables(case, "float32", seed=5)
    merged, records = linen_models.merge_params_exact(layer, variables, x)
    merged = {**merged, "kernel": merged["kernel"] * 2}
    with pytest.raises(ValueError, match="record was made from"):
        linen_models.unmerge_params(layer, {**variables, "params": merged}, records, x)
    with pytest.raises(ValueError, match="no record for the adapted layer"):
        linen_models.unmerge_params(layer, {**variables, "params": merged}, {}, x)


# ---------------------------------------------------------------- weighted merges


def _reference_weighted(w0, adapters, weights, combination):
    """The two definitions in float64, on flattened (in, out) matrices."""
    w0 = ref.f64(w0)
    if combination == "merged":
        out = w0.copy()
        for k, w in zip(adapters, weights, strict=True):
            out += w * (ref.merged_weight(w0, k.lora_a, k.lora_b, k.magnitude, k.scale) - w0)
        return out
    v = w0 + sum(
        w * k.scale * ref.f64(k.lora_a) @ ref.f64(k.lora_b)
        for k, w in zip(adapters, weights, strict=True)
    )
    base = ref.column_norm(w0)
    m = base + sum(
        w * (ref.f64(k.magnitude) - base) for k, w in zip(adapters, weights, strict=True)
    )
    return m * v / ref.column_norm(v)


@pytest.mark.parametrize("combination", merging.COMBINATIONS)
@pytest.mark.parametrize("weights", [(0.6, 0.4), (1.0, 1.0), (0.8, -0.3, 0.5)])
def test_weighted_merge_matches_its_definition(combination, weights):
    rng = np.random.default_rng(2)
    kernel = (rng.standard_normal((20, 16)) / 4.5).astype(np.float32)
    adapters = [
        _dense_adapter(rng, 20, 16, rank=r, scale=s)
        for r, s in zip((2, 3, 4), (2.0, 1.0, 0.5), strict=True)
    ]
    adapters = adapters[: len(weights)]
    got = merging.weighted_merge(
        kernel, adapters, weights, ops.dense_layout(), combination=combination
    )
    want = _reference_weighted(kernel, adapters, weights, combination)
    assert got.dtype == jnp.float32
    assert ref.relative_error(got, want) < F32_TOL


def test_weighted_merge_on_batch_axes_and_a_torch_layout():
    """A layout with a batch axis (a scanned layer) and the torch (out, in) orientation
    give the per-matrix definition."""
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((2, 6, 5)).astype(np.float32)  # (layers, in, out)
    layout = ops.Layout((0,), (1,), (2,))
    adapters = []
    for scale in (1.0, 2.0):
        a = rng.standard_normal((2, 6, 2)).astype(np.float32) / 3
        b = rng.standard_normal((2, 2, 5)).astype(np.float32) / 3
        adapters.append(
            merging.KernelAdapter(a, b, rng.uniform(1, 3, (2, 5)).astype(np.float32), scale)
        )
    for combination in merging.COMBINATIONS:
        got = merging.weighted_merge(kernel, adapters, [0.3, 0.9], layout, combination=combination)
        for i in range(2):
            layer = [
                merging.KernelAdapter(k.lora_a[i], k.lora_b[i], k.magnitude[i], k.scale)
                for k in adapters
            ]
            want = _reference_weighted(kernel[i], layer, [0.3, 0.9], combination)
            assert ref.relative_error(got[i], want) < F32_TOL
            torch_layout = ops.Layout((), (1,), (0,))
            got_t = merging.weighted_merge(
                kernel[i].T, layer, [0.3, 0.9], torch_layout, combination=combination
            )
            assert ref.relative_error(np.asarray(got_t).T, want) < F32_TOL


def test_weighted_merge_definitions_differ_for_dora_and_agree_for_lora():
    rng = np.random.default_rng(4)
    kernel = (rng.standard_normal((20, 16)) / 4.5).astype(np.float32)
    dora = [_dense_adapter(rng, 20, 16) for _ in range(2)]
    merged, combined = (
        merging.weighted_merge(kernel, dora, [0.5, 0.5], ops.dense_layout(), combination=c)
        for c in merging.COMBINATIONS
    )
    assert ref.relative_error(combined, merged) > 1e-2
    lora = [k._replace(magnitude=None) for k in dora]
    merged, combined = (
        merging.weighted_merge(kernel, lora, [0.5, 0.5], ops.dense_layout(), combination=c)
        for c in merging.COMBINATIONS
    )
    assert ref.relative_error(combined, merged) < F32_TOL
    one = merging.weighted_merge(kernel, dora[:1], [1.0], ops.dense_layout(), combination="dora")
    assert _bits(one) == _bits(merging.merge_exact(kernel, dora[0], ops.dense_layout())[0])


def test_weighted_merge_errors():
    rng = np.random.default_rng(5)
    kernel = rng.standard_normal((8, 6)).astype(np.float32)
    adapters = [_dense_adapter(rng, 8, 6), _dense_adapter(rng, 8, 6, magnitude=False)]
    with pytest.raises(ValueError, match="2 weights for 1 adapters"):
        merging.weighted_merge(kernel, adapters[:1], [0.5, 0.5], ops.dense_layout())
    with pytest.raises(ValueError, match="1 of the 2 adapters are plain LoRA"):
        merging.weighted_merge(kernel, adapters, [0.5, 0.5], ops.dense_layout(), combination="dora")
    with pytest.raises(ValueError, match="combination must be one of"):
        merging.weighted_merge(kernel, adapters, [0.5, 0.5], ops.dense_layout(), combination="cat")
    with pytest.raises(ValueError, match="finite"):
        merging.weighted_merge(kernel, adapters, [0.5, math.nan], ops.dense_layout())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_add_weighted_adapter_keeps_the_initial_magnitude():
    """What PEFT 0.21's add_weighted_adapter computes for two DoRA adapters ("cat"): the
    combined delta with the new adapter's magnitude left at ||W0||, neither definition
    (benchmarks/weighted_merge_peft.py prints the differences)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 10))
    config = dict(target_modules=["0"], use_dora=True, r=2)
    model = peft.get_peft_model(net, peft.LoraConfig(lora_alpha=4, **config), adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(lora_alpha=2, **config))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            elif "lora_magnitude_vector" in name:
                param.mul_(0.6 + 0.8 * torch.rand(param.shape, generator=generator))
    layer = model.base_model.model[0]
    w0 = layer.base_layer.weight.detach().numpy().copy()
    adapters = [
        merging.KernelAdapter(
            layer.lora_A[n].weight.detach().numpy().T,
            layer.lora_B[n].weight.detach().numpy().T,
            layer.lora_magnitude_vector[n].weight.detach().numpy(),
            layer.scaling[n],
        )
        for n in ("a", "b")
    ]
    weights = [0.7, 0.3]
    model.add_weighted_adapter(["a", "b"], weights, "ab", combination_type="cat")
    model.set_adapter("ab")
    theirs = model.merge_and_unload(adapter_names=["ab"])[0].weight.detach().numpy()
    torch_layout = ops.Layout((), (1,), (0,))
    base_norm = np.linalg.norm(w0.astype(np.float64), axis=1).astype(np.float32)
    initial = [k._replace(magnitude=base_norm) for k in adapters]
    third = merging.weighted_merge(w0, initial, weights, torch_layout, combination="dora")
    assert ref.relative_error(theirs, third) < F32_TOL
    for combination in merging.COMBINATIONS:
        ours = merging.weighted_merge(w0, adapters, weights, torch_layout, combination=combination)
        assert ref.relative_error(theirs, ours) > 1e-2


# ------------------------------------------------------------------- folder merges


def _peft_folder(path, modules, *, use_dora=True, r=2, alpha=4.0, extra=None, config=None):
    """A PEFT folder written with NumPy: ``modules`` maps a module name to (lora_A, lora_B,
    magnitude) in torch layout (an ``emb`` module is an embedding's)."""
    path.mkdir(parents=True)
    tensors = dict(extra or {})
    for name, (a, b, m) in modules.items():
        kind = (
            ("lora_embedding_A", "lora_embedding_B")
            if name == "emb"
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{name}.{kind[0]}"] = a
        tensors[f"{name}.{kind[1]}"] = b
        if m is not None:
            tensors[f"{name}.lora_magnitude_vector"] = m
    save_file(
        {merging.PEFT_PREFIX + k: np.ascontiguousarray(v) for k, v in tensors.items()},
        str(path / merging.PEFT_WEIGHTS),
    )
    body = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_dora": use_dora,
        "target_modules": sorted(modules),
    }
    (path / merging.PEFT_CONFIG).write_text(json.dumps({**body, **(config or {})}))
    return path


@pytest.fixture
def sharded_base(tmp_path):
    """Two shards and an index: float32 and bfloat16 Linear weights, an int64 buffer."""
    rng = np.random.default_rng(6)
    base = tmp_path / "base"
    base.mkdir()
    shards = {
        "model-00001-of-00002.safetensors": {
            "a.weight": rng.standard_normal((6, 8)).astype(np.float32),
            "a.bias": rng.standard_normal(6).astype(np.float32),
            "position_ids": np.arange(7, dtype=np.int64),
            "emb.weight": rng.standard_normal((9, 4)).astype(np.float32),
        },
        "model-00002-of-00002.safetensors": {
            "b.weight": rng.standard_normal((5, 6)).astype(jnp.bfloat16),
            "c.weight": rng.standard_normal((5, 5)).astype(np.float32),
            "conv.weight": rng.standard_normal((5, 3, 2, 2)).astype(np.float32),
        },
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(base / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (base / merging.SAFETENSORS_INDEX).write_text(json.dumps(index))
    (base / "config.json").write_text("{}")
    tensors = {k: v for shard in shards.values() for k, v in shard.items()}
    return base, tensors


def _torch_adapter(rng, out, fan_in, r=2, dora=True):
    a = (rng.standard_normal((r, fan_in)) / math.sqrt(fan_in)).astype(np.float32)
    b = (rng.standard_normal((out, r)) * 0.3).astype(np.float32)
    return a, b, rng.uniform(0.5, 2.0, out).astype(np.float32) if dora else None


@pytest.mark.parametrize("combination", merging.COMBINATIONS)
def test_merge_folder_streams_shards_and_matches_the_reference(tmp_path, sharded_base, combination):
    base, tensors = sharded_base
    rng = np.random.default_rng(7)
    one = {"a": _torch_adapter(rng, 6, 8), "b": _torch_adapter(rng, 5, 6)}
    one["emb"] = _torch_adapter(rng, 4, 9)  # lora_embedding_B (4, r), lora_embedding_A (r, 9)
    two = {"a": _torch_adapter(rng, 6, 8), "emb": _torch_adapter(rng, 4, 9)}
    a, b, m = _torch_adapter(rng, 5, 12)  # a Conv2d: lora_A (r, 3, 2, 2), lora_B (5, r, 1, 1)
    two["conv"] = (a.reshape(2, 3, 2, 2), b.reshape(5, 2, 1, 1), m.reshape(1, 5, 1, 1))
    folders = [
        _peft_folder(tmp_path / "one", one, config={"alpha_pattern": {"b": 8.0}}),
        _peft_folder(tmp_path / "two", two, alpha=2.0),
    ]
    weights = [0.75, 0.5]
    # 40 bytes: Linear and Conv weights merged one row (output feature) at a time, the
    # embedding table two rows at a time, in two passes.
    result = merging.merge_folder(
        base, folders, tmp_path / "out", weights=weights, combination=combination, block_bytes=40
    )
    assert result.largest_block_bytes == 4 * 12  # one row of the Conv weight
    assert result.merged == ("a.weight", "b.weight", "conv.weight", "emb.weight")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    assert (out / merging.SAFETENSORS_INDEX).read_bytes() == (
        base / merging.SAFETENSORS_INDEX
    ).read_bytes()
    for shard in result.files:
        head, infos = merging.read_header(out / shard)
        assert head == merging.read_header(base / shard)[0]  # same names, dtypes, offsets
        assert (out / shard).stat().st_size == (base / shard).stat().st_size
    merged = {}
    for shard in result.files:
        merged.update(merging.read_tensors(out / shard))
    for name in ("a.bias", "position_ids", "c.weight"):
        assert _bits(merged[name]) == _bits(tensors[name])
    assert merged["b.weight"].dtype == jnp.bfloat16

    def flax(adapter, alpha):  # torch layout -> the reference's (in, out)
        a, b, m = adapter
        return merging.KernelAdapter(a.T, b.T, m, alpha / 2)

    want_a = _reference_weighted(
        tensors["a.weight"].T, [flax(one["a"], 4.0), flax(two["a"], 2.0)], weights, combination
    )
    want_b = _reference_weighted(
        tensors["b.weight"].T, [flax(one["b"], 8.0)], weights[:1], combination
    )
    emb = [
        merging.KernelAdapter(a.T, b.T, m, s)
        for (a, b, m), s in ((one["emb"], 2.0), (two["emb"], 1.0))
    ]
    want_emb = _reference_weighted(tensors["emb.weight"], emb, weights, combination)
    assert ref.relative_error(merged["emb.weight"], want_emb) < F32_TOL
    a, b, m = two["conv"]  # the reference's (in, out): torch (out, in * kh * kw) transposed
    conv = merging.KernelAdapter(a.reshape(2, -1).T, b.reshape(5, 2).T, m.reshape(5), 1.0)
    want_conv = _reference_weighted(
        tensors["conv.weight"].reshape(5, -1).T, [conv], weights[1:], combination
    )
    assert ref.relative_error(merged["conv.weight"].reshape(5, -1).T, want_conv) < F32_TOL
    assert ref.relative_error(merged["a.weight"].T, want_a) < F32_TOL
    assert ref.relative_error(merged["b.weight"].T, want_b) < 2e-2  # bfloat16


def test_merge_folder_replaces_saved_modules_and_biases(tmp_path, sharded_base):
    base, tensors = sharded_base
    rng = np.random.default_rng(8)
    extra = {
        "c.weight": np.ones((5, 5), np.float32),
        "a.base_layer.bias": np.full(6, 2.0, np.float32),
        "c.original_module.weight": tensors["c.weight"],
    }
    folder = _peft_folder(tmp_path / "ad", {"a": _torch_adapter(rng, 6, 8)}, extra=extra)
    result = merging.merge_folder(base, [folder], tmp_path / "out")
    assert result.replaced == ("a.bias", "c.weight")
    merged = merging.read_tensors(tmp_path / "out" / "model-00002-of-00002.safetensors")
    assert np.all(merged["c.weight"] == 1.0)
    with pytest.raises(ValueError, match="a weighted merge cannot combine"):
        merging.merge_folder(base, [folder, folder], tmp_path / "out2", weights=[0.5, 0.5])


def test_merge_folder_errors_name_the_path(tmp_path, sharded_base):
    base, _ = sharded_base
    rng = np.random.default_rng(9)
    good = _peft_folder(tmp_path / "good", {"a": _torch_adapter(rng, 6, 8)})
    absent = _peft_folder(tmp_path / "absent", {"encoder.q": _torch_adapter(rng, 6, 8)})
    wrong = _peft_folder(tmp_path / "wrong", {"a": _torch_adapter(rng, 6, 7)})
    lora = _peft_folder(
        tmp_path / "lora", {"a": _torch_adapter(rng, 6, 8, dora=False)}, use_dora=False
    )
    cases = [
        ((tmp_path / "nope", [good]), FileNotFoundError, "nope: no such folder"),
        ((tmp_path / "good", [good]), ValueError, "good: a PEFT adapter folder .*, not a Hugging"),
        ((base, [tmp_path / "missing"]), FileNotFoundError, "missing: no such folder"),
        ((base, [base]), FileNotFoundError, "base: not a PEFT adapter folder"),
        (
            (base, [absent]),
            ValueError,
            "absent: adapts module 'encoder.q', but the base .* has no tensor",
        ),
        (
            (base, [wrong]),
            ValueError,
            r"wrong: module 'a' .* expects a base weight of shape \(6, 7\)",
        ),
        ((base, [good, lora]), ValueError, "2 adapters need one weight each"),
    ]
    for (folder, adapters), error, message in cases:
        with pytest.raises(error, match=message):
            merging.merge_folder(folder, adapters, tmp_path / "out")
    with pytest.raises(ValueError, match="3 weights for 2 adapters"):
        merging.merge_folder(base, [good, lora], tmp_path / "out", weights=[1, 2, 3])
    with pytest.raises(ValueError, match="'a.weight'.*plain LoRA"):
        merging.merge_folder(
            base, [good, lora], tmp_path / "out", weights=[1, 2], combination="dora"
        )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="full: exists and is not an empty folder"):
        merging.merge_folder(base, [good], tmp_path / "full")
    bad = _peft_folder(
        tmp_path / "bad", {"a": _torch_adapter(rng, 6, 8)}, config={"fan_in_fan_out": True}
    )
    with pytest.raises(ValueError, match="fan_in_fan_out=True is not supported"):
        merging.merge_folder(base, [bad], tmp_path / "out")
