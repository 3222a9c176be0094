"""In-place DoRA surgery on unmodified NNX models (``dora_jax.nnx.apply_dora``), and the
Linen wrapper and NNX surgery on the same CNN.

Models (``tests/models.py``): an NNX encoder (``nnx.Embed``, ``nnx.LinearGeneral``
query/key/value/out, ``nnx.Linear`` feed-forward, layers in an ``nnx.List``, paths like
``layers/0/attention/query``) and a small CNN (``nnx.Conv``, ``nnx.Linear``) whose Linen
twin has the same parameter names. The model's random init stands for pretrained weights.

What is compared (relative error ``max|got - ref| / max|ref|``, float32):

* output after ``apply_dora`` vs before (<= 1e-6); the base kernels are untouched and
  ``nnx.LoRAParam`` selects exactly the adapters and the ``modules_to_save`` parameters;
* after perturbing every ``nnx.LoRAParam``, ``merge(model)`` vs the adapted output
  (<= 1e-5); the merged model has the unadapted model's graph and state (plain
  ``nnx.Param``), and its state loads into a fresh unadapted model;
* ``summary(model).trainable`` and the size of ``nnx.state(model, nnx.LoRAParam)`` vs
  ``r*(fan_in + fan_out) + out`` per target plus ``modules_to_save``, computed here;
* regex vs suffix-list targets, ``rank_pattern`` (shapes), ``alpha_pattern`` (scale, and
  the output against a NumPy merge with each layer's scaling), ``exclude`` over
  ``targets``; error messages (no match, unsupported kind, rank too large);
* Linen ``wrap`` and NNX ``apply_dora`` of the same CNN with the same base weights and
  the same (copied, perturbed) adapters: magnitudes at init, outputs (<= 1e-6) and
  merged kernels (<= 1e-6);
* gradients w.r.t. ``nnx.LoRAParam`` reach every magnitude; ``nnx.jit`` equals eager.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
from conftest import ARCH_RANK, lora_size
from flax import nnx

from dora_jax import DoRAConfig
from dora_jax import linen as dora_linen
from dora_jax import nnx as dora_nnx
from dora_jax.adapters import ADAPTER_LEAVES

R = ARCH_RANK
ADAPTERS = ADAPTER_LEAVES


@dataclasses.dataclass(frozen=True)
class Arch:
    make: Callable[[], nnx.Module]  # the "pretrained" model, the same every call
    inputs: tuple
    config: DoRAConfig
    adapted: frozenset
    saved: dict  # module path -> parameter count
    trainable: int


def _encoder() -> Arch:
    h, i, v, c, layers = 16, 32, 50, 3, 2  # NnxEncoder defaults
    per_layer = (
        2 * lora_size(h, h, h) + lora_size(h, h, h) + lora_size(h, i, i) + lora_size(i, h, h)
    )
    adapted = {"embed"}
    for n in range(layers):
        adapted |= {f"layers/{n}/attention/{p}" for p in ("query", "value", "out")}
        adapted |= {f"layers/{n}/intermediate", f"layers/{n}/output"}
    config = DoRAConfig(
        targets=["query", "value", "out", "intermediate", "output", "embed"],
        rank=R,
        alpha=4.0,
        modules_to_save=["classifier"],
    )
    return Arch(
        make=lambda: models.NnxEncoder(nnx.Rngs(models.key(1))),
        inputs=(np.random.default_rng(0).integers(0, v, (2, 8)),),
        config=config,
        adapted=frozenset(adapted),
        saved={"classifier": h * c + c},
        trainable=layers * per_layer + lora_size(v, h, h) + h * c + c,
    )


def _cnn() -> Arch:
    c0, c1, c2 = models.CNN_CHANNELS
    hidden, classes = models.CNN_HIDDEN, models.CNN_CLASSES
    return Arch(
        make=lambda: models.NnxCnn(nnx.Rngs(models.key(1))),
        inputs=(np.random.default_rng(0).standard_normal((2, 8, 8, c0)).astype(np.float32),),
        config=DoRAConfig(targets="conv[12]|fc1", rank=R, alpha=4.0, modules_to_save=["head"]),
        adapted=frozenset({"conv1", "conv2", "fc1"}),
        saved={"head": hidden * classes + classes},
        trainable=lora_size(9 * c0, c1, c1)
        + lora_size(9 * c1, c2, c2)
        + lora_size(c2, hidden, hidden)
        + hidden * classes
        + classes,
    )


ARCHS = {"encoder": _encoder(), "cnn": _cnn()}


def _module(root, path: str):
    for key in path.split("/"):
        root = root[int(key)] if key.isdigit() else getattr(root, key)
    return root


def adapted_paths(model) -> set[str]:
    return {
        "/".join(str(p) for p in path)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, dora_nnx.DoRALayer)
    }


def state_paths(state) -> set[str]:
    return {"/".join(str(k) for k in path) for path, _ in nnx.to_flat_state(state)}


def _adapt(name: str, config: DoRAConfig | None = None):
    """``(adapted_model, reference_output)`` for fresh pretrained weights."""
    a = ARCHS[name]
    model = a.make()
    reference = model(*a.inputs)
    dora_nnx.apply_dora(model, config or a.config, rngs=nnx.Rngs(models.key(2)))
    return model, reference


def _perturb(model, seed: int = 3) -> None:
    """Randomise every ``nnx.LoRAParam`` (adapters and saved modules), in place."""
    nnx.update(model, models.perturb(nnx.state(model, nnx.LoRAParam), seed))


# --------------------------------------------------------------------------------------
# Output at init, merge, counts.


@pytest.mark.parametrize("name", ARCHS)
def test_init_output_equals_base_and_kernels_unchanged(name):
    a = ARCHS[name]
    pristine = a.make()
    model, reference = _adapt(name)
    assert models.relative_error(model(*a.inputs), reference) <= 1e-6
    assert adapted_paths(model) == a.adapted
    for path in a.adapted:
        layer, base = _module(model, path), _module(pristine, path)
        assert isinstance(layer, type(base))  # a drop-in subclass of the Flax layer
        weight = layer.kernel_name
        np.testing.assert_array_equal(getattr(layer, weight)[...], getattr(base, weight)[...])
        assert type(getattr(layer, weight)) is nnx.Param  # frozen: not a LoRAParam
    trainable = state_paths(nnx.state(model, nnx.LoRAParam))
    assert trainable == {f"{p}/{n}" for p in a.adapted for n in ADAPTERS} | {
        f"{p}/{n}" for p in a.saved for n in ("kernel", "bias")
    }
    for path in a.saved:
        assert type(_module(model, path).kernel) is dora_nnx.SavedParam


@pytest.mark.parametrize("name", ARCHS)
def test_merge_reproduces_adapted_output(name):
    a = ARCHS[name]
    model, reference = _adapt(name)
    _perturb(model)
    out = model(*a.inputs)
    assert models.relative_error(out, reference) > 1e-2  # not a vacuous comparison
    assert dora_nnx.merge_adapters(model) is model
    pristine = a.make()
    assert nnx.graphdef(model) == nnx.graphdef(pristine)
    merged_state, pristine_state = nnx.state(model), nnx.state(pristine)
    assert jax.tree.structure(merged_state) == jax.tree.structure(pristine_state)
    assert jax.tree.map(jnp.shape, merged_state) == jax.tree.map(jnp.shape, pristine_state)
    assert {type(v) for _, v in nnx.to_flat_state(merged_state)} == {nnx.Param}
    assert not adapted_paths(model)
    assert models.relative_error(model(*a.inputs), out) <= 1e-5
    # The merged weights are a checkpoint for the unadapted model.
    nnx.update(pristine, merged_state)
    assert models.relative_error(pristine(*a.inputs), out) <= 1e-5


@pytest.mark.parametrize("name", ARCHS)
def test_trainable_parameter_count(name):
    a = ARCHS[name]
    model, _ = _adapt(name)
    summary = dora_nnx.summary(model)
    assert summary.trainable == a.trainable
    lora_state = nnx.state(model, nnx.LoRAParam)
    assert sum(x.size for x in jax.tree.leaves(lora_state)) == a.trainable
    assert {layer.path for layer in summary.layers} == a.adapted
    assert dict(summary.saved) == a.saved
    assert summary.total == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert f"trainable params: {a.trainable:,}" in str(summary)


# --------------------------------------------------------------------------------------
# Targeting.

ENC_QV = {f"layers/{n}/attention/{p}" for n in (0, 1) for p in ("query", "value")}


@pytest.mark.parametrize(
    "targets", [".*attention/(query|value)", ["query", "value"], r"layers/\d+/attention/(q|v).*"]
)
def test_regex_and_suffix_targets_select_the_same_layers(targets):
    model, _ = _adapt("encoder", DoRAConfig(targets=targets, rank=R))
    assert adapted_paths(model) == ENC_QV


def test_rank_pattern_sets_adapter_shapes_per_path():
    config = DoRAConfig(
        targets=["query", "value"],
        rank=R,
        rank_pattern={"layers/1/attention/query": 4, r"layers/\d/attention/value": 3, "query": 1},
    )
    model, _ = _adapt("encoder", config)
    expected = {
        "layers/0/attention/query": 1,
        "layers/1/attention/query": 4,
        "layers/0/attention/value": 3,
        "layers/1/attention/value": 3,
    }
    for path, rank in expected.items():
        layer = _module(model, path)
        assert layer.rank == config.settings(path).rank == rank
        assert layer.lora_a.shape == (16, rank)
        assert layer.lora_b.shape == (rank, 2, 8)
        assert layer.magnitude.shape == (2, 8)


def _dense_merge(kernel, lora_a, lora_b, magnitude, scale):
    """``m * (W0 + s*A@B) / ||W0 + s*A@B||_c`` for a Dense kernel, in float64 NumPy."""
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    w = f64(kernel) + scale * f64(lora_a) @ f64(lora_b)
    return f64(magnitude) * w / np.linalg.norm(w, axis=0)


def test_alpha_pattern_scales_each_layer():
    config = DoRAConfig(
        targets=["intermediate"], rank=R, alpha=2.0, alpha_pattern={"layers/1/intermediate": 16.0}
    )
    scales = {"layers/0/intermediate": 2.0 / R, "layers/1/intermediate": 16.0 / R}
    model, _ = _adapt("encoder", config)
    _perturb(model)
    for path, scale in scales.items():
        assert _module(model, path).scale == config.settings(path).scale == scale
    out = model(*ARCHS["encoder"].inputs)

    def reference(layer_scales):
        plain = ARCHS["encoder"].make()
        for path, scale in layer_scales.items():
            layer = _module(model, path)
            _module(plain, path).kernel[...] = _dense_merge(
                layer.kernel[...], layer.lora_a[...], layer.lora_b[...], layer.magnitude[...], scale
            ).astype(np.float32)
        return plain(*ARCHS["encoder"].inputs)

    assert models.relative_error(out, reference(scales)) <= 1e-5
    assert models.relative_error(out, reference(dict.fromkeys(scales, 2.0 / R))) > 1e-3


@pytest.mark.parametrize(
    "exclude, expected",
    [
        (["layers/0/attention/query"], ENC_QV - {"layers/0/attention/query"}),
        (".*layers/1/.*", {p for p in ENC_QV if p.startswith("layers/0")}),
        (["query"], {p for p in ENC_QV if p.endswith("value")}),
    ],
)
def test_exclude_wins_over_targets(exclude, expected):
    for targets in (".*attention/(query|value)", ["query", "value"]):
        model, _ = _adapt("encoder", DoRAConfig(targets=targets, exclude=exclude, rank=R))
        assert adapted_paths(model) == expected


def test_exclude_removes_an_unsupported_match():
    config = DoRAConfig(targets=".*attention/.*", exclude=["attention"], rank=R)
    model, _ = _adapt("encoder", config)
    assert adapted_paths(model) == {
        f"layers/{n}/attention/{p}" for n in (0, 1) for p in ("query", "key", "value", "out")
    }


# --------------------------------------------------------------------------------------
# Errors.


def _listed(message: str) -> list[str]:
    lines = [line.strip() for line in message.splitlines()[1:] if line.startswith("  ")]
    return [line.removesuffix("(excluded)").strip() for line in lines]


ENC_ADAPTABLE = {"embed", "classifier"} | {
    f"layers/{n}/{p}"
    for n in (0, 1)
    for p in (
        "attention/query",
        "attention/key",
        "attention/value",
        "attention/out",
        "intermediate",
        "output",
    )
}


@pytest.mark.parametrize(
    "targets, closest",
    [
        ("layers/0/attention/qurey", "layers/0/attention/query"),
        (["vaule"], "layers/1/attention/value"),
        (["intermedaite"], "layers/1/intermediate"),
    ],
)
def test_unmatched_target_lists_closest_paths_first(targets, closest):
    config = DoRAConfig(targets=targets)  # a list is stored as a tuple
    with pytest.raises(
        ValueError, match=re.escape(f"DoRAConfig targets {config.targets!r}")
    ) as info:
        _adapt("encoder", config)
    message = str(info.value)
    assert "match no adaptable layer. Adaptable layers, closest first:\n" in message
    listed = _listed(message)
    if isinstance(targets, str):  # a regex is compared with whole paths
        assert listed[0] == closest
    else:  # names are compared with path suffixes: any layer's copy is closest
        suffix = closest.split("/", 2)[-1]
        assert listed[0].endswith("/" + suffix)
    assert set(listed) == ENC_ADAPTABLE


def test_unmatched_target_in_cnn():
    with pytest.raises(ValueError, match=r"match no adaptable layer") as info:
        _adapt("cnn", DoRAConfig(targets=["conv3"]))
    listed = _listed(str(info.value))
    assert set(listed[:2]) == {"conv1", "conv2"}
    assert set(listed) == {"conv1", "conv2", "fc1", "head"}


@pytest.mark.parametrize(
    "flax_attention, targets, path, kind",
    [
        (
            False,
            ["attention_norm"],
            "layers/0/attention_norm",
            "flax.nnx.nn.normalization.LayerNorm",
        ),
        (False, "layers/0/attention", "layers/0/attention", "models.NnxSelfAttention"),
        (True, ".*1/attention", "layers/1/attention", "flax.nnx.nn.attention.MultiHeadAttention"),
    ],
)
def test_unsupported_module_kind_names_path_and_type(flax_attention, targets, path, kind):
    model = models.NnxEncoder(nnx.Rngs(models.key(1)), flax_attention=flax_attention)
    with pytest.raises(ValueError, match=re.escape(f"match {path!r}, a {kind}; DoRA adapts")):
        dora_nnx.apply_dora(model, DoRAConfig(targets=targets), rngs=nnx.Rngs(2))


@pytest.mark.parametrize(
    "name, config, message",
    [
        (
            "encoder",
            DoRAConfig(targets=["query"], rank_pattern={"layers/1/attention/query": 17}),
            "'layers/1/attention/query': DoRALinearGeneral: rank must be an integer in "
            "[1, min(fan_in, fan_out)] = [1, 16] for kernel (16, 2, 8) (fan_in=16, fan_out=16); "
            "got 17.",
        ),
        (
            "cnn",
            DoRAConfig(targets=["conv1"], rank=9),
            "'conv1': DoRAConv: rank must be an integer in [1, min(fan_in, fan_out)] = [1, 8] "
            "for kernel (3, 3, 3, 8) (fan_in=27, fan_out=8); got 9.",
        ),
    ],
)
def test_rank_too_large_names_path_and_shapes(name, config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _adapt(name, config)


@pytest.mark.parametrize(
    "config",
    [
        DoRAConfig(targets=["query"], rank_pattern={"layers/1/attention/query": 17}),
        DoRAConfig(targets=["qurey"], modules_to_save=["classifier"]),
    ],
)
def test_failed_surgery_leaves_the_model_unchanged(config):
    model = ARCHS["encoder"].make()
    graphdef = nnx.graphdef(model)
    with pytest.raises(ValueError):
        dora_nnx.apply_dora(model, config, rngs=nnx.Rngs(2))
    assert nnx.graphdef(model) == graphdef
    assert {type(v) for _, v in nnx.to_flat_state(nnx.state(model))} == {nnx.Param}


def test_surgery_inside_flax_multi_head_attention():
    a = ARCHS["encoder"]
    model = models.NnxEncoder(nnx.Rngs(models.key(1)), flax_attention=True)
    reference = model(*a.inputs)
    dora_nnx.apply_dora(model, DoRAConfig(targets=["query", "out"], rank=R), rngs=nnx.Rngs(2))
    assert adapted_paths(model) == {
        f"layers/{n}/attention/{p}" for n in (0, 1) for p in ("query", "out")
    }
    assert models.relative_error(model(*a.inputs), reference) <= 1e-6


# --------------------------------------------------------------------------------------
# Linen wrapper and NNX surgery on the same CNN.


def test_linen_wrapper_and_nnx_surgery_agree_on_the_same_cnn():
    (x,) = ARCHS["cnn"].inputs
    config = DoRAConfig(targets=list(models.CNN_LAYERS), rank=R, alpha=4.0)
    linen_model = models.LinenCnn()
    # Eager: the CNN's primitives are already compiled by the NNX model.
    params = linen_model.init(models.key(5), x)["params"]
    wrapped = dora_linen.wrap(linen_model, config)
    variables = wrapped.init_from_params(models.key(6), params, x)

    model = models.NnxCnn(nnx.Rngs(0))
    models.cnn_params_to_nnx(params, model)
    base = linen_model.apply({"params": params}, x)
    assert models.relative_error(model(x), base) <= 1e-6
    dora_nnx.apply_dora(model, config, rngs=nnx.Rngs(models.key(7)))
    assert adapted_paths(model) == set(models.CNN_LAYERS)

    # The "dora" collection mirrors the NNX layers; magnitudes and caches agree at init
    # (caches exist in neither until asked for).
    assert "dora_cache" not in variables
    assert all(getattr(model, name).base_norm_sq is None for name in models.CNN_LAYERS)
    variables = dora_linen.cache_base_norms(wrapped, variables, x)
    dora_nnx.cache_base_norms(model)
    for name in models.CNN_LAYERS:
        layer, dora = getattr(model, name), variables["dora"][name]
        assert set(dora) == set(ADAPTERS)
        for leaf in ADAPTERS:
            assert dora[leaf].shape == getattr(layer, leaf).shape, (name, leaf)
        assert models.relative_error(dora["magnitude"], layer.magnitude[...]) <= 1e-6
        assert (
            models.relative_error(
                variables["dora_cache"][name]["base_norm_sq"], layer.base_norm_sq[...]
            )
            <= 1e-6
        )

    # The same trained-looking adapters in both.
    dora = models.perturb(variables["dora"], seed=8)
    variables = {**variables, "dora": dora}
    for name in models.CNN_LAYERS:
        for leaf in ADAPTERS:
            getattr(getattr(model, name), leaf)[...] = dora[name][leaf]
    linen_out = wrapped.apply(variables, x)
    assert models.relative_error(linen_out, base) > 1e-2
    assert models.relative_error(model(x), linen_out) <= 1e-6

    merged = dora_linen.merge_params(wrapped, variables, x)
    dora_nnx.merge_adapters(model)
    for name in models.CNN_LAYERS:
        layer = getattr(model, name)
        assert models.relative_error(layer.kernel[...], merged[name]["kernel"]) <= 1e-6, name
        np.testing.assert_array_equal(layer.bias[...], merged[name]["bias"])


# --------------------------------------------------------------------------------------
# Gradients and jit.


@pytest.mark.parametrize("name", ARCHS)
def test_gradients_reach_every_magnitude(name):
    a = ARCHS[name]
    model, reference = _adapt(name)
    target = np.random.default_rng(4).standard_normal(reference.shape)

    def loss(model):
        return jnp.mean((model(*a.inputs) - target) ** 2)

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
    assert state_paths(grads) == state_paths(nnx.state(model, nnx.LoRAParam))
    for path in a.adapted:
        g = _module(grads, path)
        assert np.abs(g["magnitude"][...]).max() > 0, path
        factor = "lora_a" if path == "embed" else "lora_b"  # the one that starts at zero
        assert np.abs(g[factor][...]).max() > 0, path


def test_nnx_jit_equals_eager():
    a = ARCHS["encoder"]
    model, _ = _adapt("encoder")
    _perturb(model)
    eager = model(*a.inputs)
    jitted = nnx.jit(lambda m, *xs: m(*xs))(model, *a.inputs)
    assert models.relative_error(jitted, eager) <= 1e-6
