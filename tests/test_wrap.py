"""Wrapping unmodified Linen models with ``dora_jax.linen.wrap``.

Models (``tests/models.py``): a BERT-style encoder (``nn.DenseGeneral`` attention, Flax's
``nn.MultiHeadDotProductAttention``, ``nn.Dense`` feed-forward, ``nn.Embed``), a GPT-style
decoder whose blocks are ``nn.scan(nn.remat(Block))`` (``nn.Einsum`` MLP, tied output
embeddings through ``nn.Embed.attend``) and a small CNN (``nn.Conv``, ``nn.Dense``). A
random init of the unwrapped model stands for the pretrained weights.

What is compared (relative error ``max|got - ref| / max|ref|``, float32):

* wrapped output at init vs the unwrapped model on the same params (<= 1e-6);
  ``variables["params"]`` is exactly the pretrained tree and the adapters are only in
  ``variables["dora"]`` (``lora_a``, ``lora_b``, ``magnitude`` per targeted path);
* after perturbing every adapter leaf, ``merge_params`` run in the *unwrapped* model vs
  the wrapped output (<= 1e-5), with the unwrapped model's exact tree and shapes;
* ``summary(variables, config).trainable`` vs ``r*(fan_in + fan_out) + out`` per target
  (times the layer count for scanned layers) plus ``modules_to_save``, computed here from
  the model's hyperparameters;
* regex vs suffix-list targeting, ``rank_pattern`` (adapter shapes), ``alpha_pattern``
  (scaling, and the output against a NumPy merge with each layer's own scaling),
  ``exclude`` winning over ``targets``;
* error messages: no match (closest paths first), unsupported module kinds, rank too
  large for a layer;
* gradients through the scanned decoder reach every magnitude of every layer; ``jax.jit``
  of ``apply`` equals eager; after loading new base weights, ``recompute_magnitudes``
  sets every (scanned) magnitude to the new column norms and gives the base model again.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
import reference as ref
from conftest import ARCH_RANK, lora_size

import dora_jax
from dora_jax import DoRAConfig
from dora_jax import linen as dora_linen

R = ARCH_RANK


@dataclasses.dataclass(frozen=True)
class Arch:
    model: nn.Module
    inputs: tuple
    config: DoRAConfig
    adapted: frozenset  # paths expected in variables["dora"]
    trainable: int  # expected trainable parameter count


def _bert() -> Arch:
    m = models.Bert()
    h, i, v, c = m.hidden, m.intermediate, m.vocab, m.num_classes
    per_layer = (
        2 * lora_size(h, h, h)  # query, value: (h) -> (heads, head_dim)
        + lora_size(h, h, h)  # out: (heads, head_dim) -> (h)
        + lora_size(h, i, i)  # intermediate
        + lora_size(i, h, h)  # output
    )
    trainable = m.num_layers * per_layer + lora_size(v, h, h) + (h * c + c)
    layers = [f"encoder/layer_{n}" for n in range(m.num_layers)]
    adapted = {"embeddings/word_embeddings"}
    for layer in layers:
        adapted |= {f"{layer}/attention/{p}" for p in ("query", "value", "out")}
        adapted |= {f"{layer}/intermediate", f"{layer}/output"}
    config = DoRAConfig(
        targets=["query", "value", "out", "intermediate", "output", "word_embeddings"],
        rank=R,
        alpha=4.0,
        modules_to_save=["classifier"],
    )
    ids = np.random.default_rng(0).integers(0, m.vocab, (2, 8))
    return Arch(m, (ids,), config, frozenset(adapted), trainable)


def _gpt() -> Arch:
    m = models.Gpt()
    d, h, v = m.d, m.mlp, m.vocab
    per_layer = 3 * lora_size(d, d, d) + lora_size(d, h, h) + lora_size(h, d, d)
    trainable = m.num_layers * per_layer + lora_size(v, d, d)  # wte is not scanned
    adapted = {"wte", "blocks/fc_in", "blocks/fc_out"}
    adapted |= {f"blocks/attn/{p}" for p in ("query", "value", "out")}
    config = DoRAConfig(
        targets=["query", "value", "out", "fc_in", "fc_out", "wte"], rank=R, alpha=4.0
    )
    ids = np.random.default_rng(0).integers(0, m.vocab, (2, 8))
    return Arch(m, (ids,), config, frozenset(adapted), trainable)


def _cnn() -> Arch:
    c0, c1, c2 = models.CNN_CHANNELS
    hidden, classes = models.CNN_HIDDEN, models.CNN_CLASSES
    trainable = (
        lora_size(9 * c0, c1, c1)
        + lora_size(9 * c1, c2, c2)
        + lora_size(c2, hidden, hidden)
        + (hidden * classes + classes)
    )
    config = DoRAConfig(targets="conv[12]|fc1", rank=R, alpha=4.0, modules_to_save=["head"])
    x = np.random.default_rng(0).standard_normal((2, 8, 8, c0)).astype(np.float32)
    return Arch(models.LinenCnn(), (x,), config, frozenset({"conv1", "conv2", "fc1"}), trainable)


ARCHS = {"bert": _bert, "gpt": _gpt, "cnn": _cnn}


@functools.cache
def arch(name: str) -> Arch:
    return ARCHS[name]()


@functools.cache
def pretrained(name: str) -> dict[str, Any]:
    a = arch(name)
    return jax.jit(a.model.init)(models.key(1), *a.inputs)["params"]


@functools.cache
def base_apply(name: str):
    """The unwrapped model's jitted ``apply``."""
    return jax.jit(arch(name).model.apply)


@functools.cache
def base_output(name: str) -> jax.Array:
    return base_apply(name)({"params": pretrained(name)}, *arch(name).inputs)


@dataclasses.dataclass(frozen=True)
class Wrapped:
    model: dora_linen.DoRAModel
    variables: dict[str, Any]  # from init_from_params(pretrained params)
    apply: Any  # jax.jit(model.apply), compiled once per model


@functools.cache
def wrapped(name: str, config: DoRAConfig | None = None) -> Wrapped:
    a = arch(name)
    model = dora_linen.wrap(a.model, config or a.config)
    variables = jax.jit(model.init_from_params)(models.key(2), pretrained(name), *a.inputs)
    return Wrapped(model, variables, jax.jit(model.apply))


@functools.cache
def perturbed(name: str, config: DoRAConfig | None = None):
    """``(variables, output)`` with every adapter leaf randomised."""
    w = wrapped(name, config)
    variables = {**w.variables, "dora": models.perturb(w.variables["dora"], seed=3)}
    return variables, w.apply(variables, *arch(name).inputs)


def adapter_paths(tree) -> set[str]:
    """The ``/``-paths of the subtrees that hold a ``lora_a``."""
    paths = set()

    def visit(node, path):
        if "lora_a" in node:
            paths.add("/".join(path))
        for key, value in node.items():
            if isinstance(value, dict):
                visit(value, (*path, key))

    visit(tree, ())
    return paths


def leaf_paths(tree) -> set[str]:
    """The ``/``-paths of every leaf."""
    return {
        "/".join(str(k.key) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def adapter_shapes(name: str, config: DoRAConfig) -> dict[str, Any]:
    """Shapes of ``variables["dora"]`` (traced only, nothing computed)."""
    a = arch(name)
    model = dora_linen.wrap(a.model, config)
    shapes = jax.eval_shape(model.init_from_params, models.key(2), pretrained(name), *a.inputs)
    return jax.tree.map(lambda s: s.shape, shapes["dora"])


def _get(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _shapes(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


# --------------------------------------------------------------------------------------
# Output at init, variables layout, merge, parameter counts.


@pytest.mark.parametrize("name", ARCHS)
def test_init_output_equals_base_and_params_unchanged(name):
    a = arch(name)
    w = wrapped(name)
    variables = w.variables
    assert set(variables) == {"params", "dora"}  # no cache unless asked for
    # A pretrained checkpoint loads unchanged: same tree, same values.
    params = pretrained(name)
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, variables["params"], params)
    # Adapters live only in "dora", one (lora_a, lora_b, magnitude) per targeted layer.
    assert leaf_paths(variables["dora"]) == {
        f"{path}/{leaf}" for path in a.adapted for leaf in ("lora_a", "lora_b", "magnitude")
    }
    assert not any("dora" in path for path in leaf_paths(variables["params"]))
    # The ||W0||^2 cache, made only on request, has one leaf per adapted layer.
    cached = jax.eval_shape(lambda v: dora_linen.cache_base_norms(w.model, v, *a.inputs), variables)
    assert leaf_paths(cached["dora_cache"]) == {f"{path}/base_norm_sq" for path in a.adapted}
    out = w.apply(variables, *a.inputs)
    assert models.relative_error(out, base_output(name)) <= 1e-6


def test_wrapped_init_has_the_models_params():
    """``wrapped.init`` (no pretrained weights) gives exactly the model's param tree."""
    a = arch("gpt")
    model = dora_linen.wrap(a.model, a.config)
    shapes = jax.eval_shape(model.init, models.key(0), *a.inputs)
    reference = jax.eval_shape(a.model.init, models.key(0), *a.inputs)
    assert _shapes(shapes["params"]) == _shapes(reference["params"])
    assert adapter_paths(shapes["dora"]) == a.adapted


@pytest.mark.parametrize("name", ARCHS)
def test_merged_params_reproduce_wrapped_output(name):
    a = arch(name)
    variables, out = perturbed(name)
    # The perturbation matters, so the comparison below is not vacuous.
    assert models.relative_error(out, base_output(name)) > 1e-2
    model = wrapped(name).model
    merge = jax.jit(lambda v, *xs: dora_linen.merge_params(model, v, *xs))
    merged = merge(variables, *a.inputs)
    params = pretrained(name)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert _shapes(merged) == _shapes(params)
    # Only the adapted kernels change.
    for path, leaf in jax.tree_util.tree_flatten_with_path(merged)[0]:
        keys = [k.key for k in path]
        owner, weight = "/".join(keys[:-1]), keys[-1]
        if owner in a.adapted and weight in ("kernel", "embedding"):
            assert not np.allclose(leaf, _get(params, "/".join(keys))), owner
        else:
            np.testing.assert_array_equal(leaf, _get(params, "/".join(keys)))
    got = base_apply(name)({"params": merged}, *a.inputs)
    assert models.relative_error(got, out) <= 1e-5


@pytest.mark.parametrize("name", ARCHS)
def test_trainable_parameter_count(name):
    a = arch(name)
    variables = wrapped(name).variables
    summary = dora_linen.summary(variables, a.config)
    assert summary.trainable == a.trainable
    assert {layer.path for layer in summary.layers} == a.adapted
    saved = sum(n for _, n in summary.saved)
    assert sum(x.size for x in jax.tree.leaves(variables["dora"])) + saved == a.trainable
    assert summary.total == sum(
        x.size for c in ("params", "dora") for x in jax.tree.leaves(variables[c])
    )
    assert f"trainable params: {a.trainable:,}" in str(summary)


# --------------------------------------------------------------------------------------
# Targeting.

BERT_QV = {f"encoder/layer_{n}/attention/{p}" for n in (0, 1) for p in ("query", "value")}


@pytest.mark.parametrize(
    "targets", [".*attention/(query|value)", ["query", "value"], ("value", "query")]
)
def test_regex_and_suffix_targets_select_the_same_layers(targets):
    shapes = adapter_shapes("bert", DoRAConfig(targets=targets, rank=R))
    assert adapter_paths(shapes) == BERT_QV


def test_targets_in_scanned_blocks():
    shapes = adapter_shapes("gpt", DoRAConfig(targets="blocks/attn/(query|value)", rank=R))
    assert adapter_paths(shapes) == {"blocks/attn/query", "blocks/attn/value"}
    layers = arch("gpt").model.num_layers
    assert shapes["blocks"]["attn"]["query"]["lora_a"] == (layers, 16, R)
    assert shapes["blocks"]["attn"]["query"]["lora_b"] == (layers, R, 2, 8)
    assert shapes["blocks"]["attn"]["query"]["magnitude"] == (layers, 2, 8)


def test_rank_pattern_sets_adapter_shapes_per_path():
    config = DoRAConfig(
        targets=["query", "value"],
        rank=R,
        rank_pattern={"layer_1/attention/query": 4, r"layer_\d/attention/value": 3, "query": 1},
    )
    shapes = adapter_shapes("bert", config)
    expected = {  # the first matching key wins, as PEFT
        "encoder/layer_0/attention/query": 1,
        "encoder/layer_1/attention/query": 4,
        "encoder/layer_0/attention/value": 3,
        "encoder/layer_1/attention/value": 3,
    }
    for path, rank in expected.items():
        assert config.settings(path).rank == rank
        assert _get(shapes, path)["lora_a"] == (16, rank)
        assert _get(shapes, path)["lora_b"] == (rank, 2, 8)
        assert _get(shapes, path)["magnitude"] == (2, 8)


def test_rank_pattern_in_scanned_blocks():
    config = DoRAConfig(targets=["fc_in", "fc_out"], rank=R, rank_pattern={"fc_in": 4})
    shapes = adapter_shapes("gpt", config)
    layers = arch("gpt").model.num_layers
    assert shapes["blocks"]["fc_in"] == {
        "lora_a": (layers, 16, 4),
        "lora_b": (layers, 4, 32),
        "magnitude": (layers, 32),
    }
    assert shapes["blocks"]["fc_out"]["lora_a"] == (layers, 32, R)


def _dense_merge(kernel, lora_a, lora_b, magnitude, scale):
    """``m * (W0 + s*A@B) / ||W0 + s*A@B||_c`` for a Dense kernel, in float64 NumPy."""
    w = np.asarray(kernel, np.float64) + scale * np.asarray(lora_a, np.float64) @ np.asarray(
        lora_b, np.float64
    )
    return np.asarray(magnitude, np.float64) * w / np.linalg.norm(w, axis=0)


def test_alpha_pattern_scales_each_layer():
    config = DoRAConfig(
        targets=["intermediate"], rank=R, alpha=2.0, alpha_pattern={"layer_1/intermediate": 16.0}
    )
    scales = {"encoder/layer_0/intermediate": 2.0 / R, "encoder/layer_1/intermediate": 16.0 / R}
    for path, scale in scales.items():
        assert config.settings(path).alpha == scale * R
        assert config.settings(path).scale == scale
    variables, out = perturbed("bert", config)
    inputs = arch("bert").inputs

    def reference(layer_scales):
        params = jax.tree.map(np.asarray, pretrained("bert"))
        for path, scale in layer_scales.items():
            dora = _get(variables["dora"], path)
            _get(params, path)["kernel"] = _dense_merge(
                _get(params, path)["kernel"],
                dora["lora_a"],
                dora["lora_b"],
                dora["magnitude"],
                scale,
            ).astype(np.float32)
        return base_apply("bert")({"params": params}, *inputs)

    # The output is the one of each layer's own scaling, not of the global alpha.
    assert models.relative_error(out, reference(scales)) <= 1e-5
    uniform = dict.fromkeys(scales, 2.0 / R)
    assert models.relative_error(out, reference(uniform)) > 1e-3


@pytest.mark.parametrize(
    "exclude, expected",
    [
        (["layer_0/attention/query"], BERT_QV - {"encoder/layer_0/attention/query"}),
        (".*layer_1/.*", {p for p in BERT_QV if "layer_0" in p}),
        (["query"], {p for p in BERT_QV if p.endswith("value")}),
    ],
)
def test_exclude_wins_over_targets(exclude, expected):
    for targets in (".*attention/(query|value)", ["query", "value"]):
        config = DoRAConfig(targets=targets, exclude=exclude, rank=R)
        assert adapter_paths(adapter_shapes("bert", config)) == expected
        for path in BERT_QV:
            assert config.is_target(path) == (path in expected)


def test_exclude_removes_an_unsupported_match():
    """``.*attention.*`` also matches the attention blocks; excluding them is enough."""
    config = DoRAConfig(targets=".*attention/.*", exclude=["attention"], rank=R)
    expected = {
        f"encoder/layer_{n}/attention/{p}" for n in (0, 1) for p in ("query", "key", "value", "out")
    }
    assert adapter_paths(adapter_shapes("bert", config)) == expected


# --------------------------------------------------------------------------------------
# Errors.


def _init(name: str, config: DoRAConfig):
    a = arch(name)
    model = dora_linen.wrap(a.model, config)
    return jax.eval_shape(model.init_from_params, models.key(2), pretrained(name), *a.inputs)


def _listed(message: str) -> list[str]:
    """The paths an unmatched-targets error lists, in order."""
    lines = [line.strip() for line in message.splitlines()[1:] if line.startswith("  ")]
    return [line.removesuffix("(excluded)").strip() for line in lines]


def test_unmatched_target_lists_closest_paths_first():
    with pytest.raises(ValueError, match=r"match no adaptable layer") as info:
        _init("bert", DoRAConfig(targets="encoder/layer_0/attention/qurey"))
    message = str(info.value)
    assert message.startswith(
        "DoRAConfig targets 'encoder/layer_0/attention/qurey' match no adaptable layer. "
        "Adaptable layers, closest first:\n  encoder/layer_0/attention/query\n"
    )
    listed = _listed(message)
    assert listed[0] == "encoder/layer_0/attention/query"
    assert set(listed) == {p for p, _ in _param_owners(pretrained("bert"))}  # all of them


@pytest.mark.parametrize("method", ["init", "init_from_params"])
def test_unmatched_target_raises_at_init(method):
    a = arch("cnn")
    model = dora_linen.wrap(a.model, DoRAConfig(targets=["conv3"], exclude=["head"]))
    args = (pretrained("cnn"),) if method == "init_from_params" else ()
    init = getattr(model, method)
    if method == "init":  # traced only: the error comes from the trace
        init = functools.partial(jax.eval_shape, init)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "DoRAConfig targets ('conv3',) match no adaptable layer (exclude=('head',)). "
            "Adaptable layers, closest first:\n"
        ),
    ) as info:
        init(models.key(2), *args, *a.inputs)
    listed = _listed(str(info.value))
    assert set(listed[:2]) == {"conv1", "conv2"}
    assert set(listed) == {"conv1", "conv2", "fc1", "head"}


def _param_owners(params, path=()):
    """``(path, leaf names)`` of every module owning a kernel or embedding."""
    for key, value in params.items():
        if not isinstance(value, dict):
            continue
        if "kernel" in value or "embedding" in value:
            yield "/".join((*path, key)), set(value)
        else:
            yield from _param_owners(value, (*path, key))


def test_unmatched_target_in_scanned_model_lists_scanned_paths():
    with pytest.raises(ValueError, match=r"match no adaptable layer") as info:
        _init("gpt", DoRAConfig(targets="blocks/attn/qurey"))
    listed = _listed(str(info.value))
    assert listed[0] == "blocks/attn/query"
    assert "blocks/fc_in" in listed and "wte" in listed


def test_unmatched_suffix_target_lists_closest_paths_first():
    with pytest.raises(ValueError, match=r"match no adaptable layer") as info:
        _init("bert", DoRAConfig(targets=["vaule"]))
    assert _listed(str(info.value))[0].endswith("/attention/value")


@pytest.mark.parametrize(
    "targets, path, kind",
    [
        (
            ["attention_norm"],
            "encoder/layer_0/attention_norm",
            "flax.linen.normalization.LayerNorm",
        ),
        (".*layer_0/attention", "encoder/layer_0/attention", "models.SelfAttention"),
        (
            ".*layer_1/attention",
            "encoder/layer_1/attention",
            "flax.linen.attention.MultiHeadDotProductAttention",
        ),
    ],
)
def test_unsupported_module_kind_names_path_and_type(targets, path, kind):
    with pytest.raises(ValueError, match=re.escape(f"match {path!r}, a {kind}")):
        _init("bert", DoRAConfig(targets=targets))


def test_unsupported_module_kind_in_scanned_block():
    with pytest.raises(ValueError, match=re.escape("match 'blocks/ln2', a flax.linen")):
        _init("gpt", DoRAConfig(targets=["ln2"]))


@pytest.mark.parametrize(
    "name, config, message",
    [
        (
            "bert",
            DoRAConfig(targets=["query"], rank_pattern={"layer_1/attention/query": 17}),
            "DenseGeneral 'encoder/layer_1/attention/query': rank must be an integer in "
            "[1, min(fan_in, fan_out)] = [1, 16] for kernel (16, 2, 8)",
        ),
        (
            "gpt",
            DoRAConfig(targets=["fc_in"], rank=17),
            "Einsum 'blocks/fc_in': rank must be an integer in [1, min(fan_in, fan_out)] = "
            "[1, 16] for kernel (16, 32)",
        ),
        (
            "cnn",
            DoRAConfig(targets=["conv1"], rank=9),
            "Conv 'conv1': rank must be an integer in [1, min(fan_in, fan_out)] = [1, 8] "
            "for kernel (3, 3, 3, 8)",
        ),
    ],
)
def test_rank_too_large_names_path_and_shapes(name, config, message):
    with pytest.raises(ValueError, match=re.escape(message) + r".*got (17|9)\."):
        _init(name, config)


# --------------------------------------------------------------------------------------
# Gradients, jit, loading weights after init.


def test_gradients_reach_every_magnitude_of_every_scanned_layer():
    a = arch("gpt")
    model, variables = wrapped("gpt").model, wrapped("gpt").variables
    target = np.random.default_rng(4).standard_normal(base_output("gpt").shape)

    @jax.jit
    def grad(dora, params):
        def loss(dora):
            out = model.apply({**variables, "params": params, "dora": dora}, *a.inputs)
            return jnp.mean((out - target) ** 2)

        return jax.grad(loss)(dora)

    def check(grads, leaves):
        """Every ``(path, leaf)`` gradient is nonzero, in every scanned layer."""
        assert jax.tree.structure(grads) == jax.tree.structure(variables["dora"])
        for path, leaf in leaves:
            g = np.abs(np.asarray(_get(grads, path)[leaf]))
            if path.startswith("blocks/"):  # one slice per scanned layer
                assert g.shape[0] == a.model.num_layers
                per_layer = g.reshape(g.shape[0], -1).max(axis=1)
                assert np.all(per_layer > 0), (path, leaf, per_layer)
            else:
                assert g.max() > 0, (path, leaf)

    # At init one factor is zero (B; A for the embedding), so the other factor's
    # gradient vanishes; the magnitude's and the zero factor's must not ...
    at_init = grad(variables["dora"], variables["params"])
    check(at_init, [(p, "magnitude") for p in a.adapted])
    check(at_init, [(p, "lora_a" if p == "wte" else "lora_b") for p in a.adapted])
    # ... and with trained-looking adapters, no gradient vanishes.
    moved, _ = perturbed("gpt")
    leaves = ("lora_a", "lora_b", "magnitude")
    check(grad(moved["dora"], moved["params"]), [(p, n) for p in a.adapted for n in leaves])


@pytest.mark.parametrize("name", ["gpt", "cnn"])
def test_jit_equals_eager(name):
    variables, jitted = perturbed(name)
    eager = wrapped(name).model.apply(variables, *arch(name).inputs)
    assert models.relative_error(jitted, eager) <= 1e-6


def test_recompute_magnitudes_after_loading_new_base_weights():
    """Variables made for one checkpoint, another checkpoint loaded into ``params``, then
    ``recompute_magnitudes``: every magnitude (per scanned layer) becomes the new column
    norm, and the wrapped model equals the new base model again."""
    a = arch("gpt")
    w = wrapped("gpt")
    new_params = models.perturb(pretrained("gpt"), seed=11)
    new_base = base_apply("gpt")({"params": new_params}, *a.inputs)
    # A cache of the old params: recompute_magnitudes must refresh it, never keep it.
    cached = dora_linen.cache_base_norms(w.model, w.variables, *a.inputs)
    loaded = {**cached, "params": new_params}
    recompute = jax.jit(lambda v, *xs: dora_jax.recompute_magnitudes(w.model, v, *xs))
    fixed = recompute(loaded, *a.inputs)
    assert set(fixed) == {"params", "dora", "dora_cache"}
    assert models.relative_error(w.apply(fixed, *a.inputs), new_base) <= 1e-6
    norm_axes = {  # the kernel axes each magnitude reduces (axis 0 of blocks is the layer)
        "wte": (0,),
        "blocks/attn/query": (1,),
        "blocks/attn/value": (1,),
        "blocks/attn/out": (1, 2),
        "blocks/fc_in": (1,),
        "blocks/fc_out": (1,),
    }
    assert set(norm_axes) == a.adapted
    for path, axes in norm_axes.items():
        weight = "embedding" if path == "wte" else "kernel"
        norm_sq = (np.asarray(_get(new_params, path)[weight], np.float64) ** 2).sum(axis=axes)
        dora = _get(fixed["dora"], path)
        assert models.relative_error(dora["magnitude"], np.sqrt(norm_sq)) <= 1e-6, path
        stale = _get(w.variables["dora"], path)["magnitude"]
        assert models.relative_error(stale, np.sqrt(norm_sq)) > 1e-3, path  # not vacuous
        cache = _get(fixed["dora_cache"], path)["base_norm_sq"]
        assert models.relative_error(cache, norm_sq) <= 1e-6, path
        for factor in ("lora_a", "lora_b"):  # kept
            np.testing.assert_array_equal(dora[factor], _get(w.variables["dora"], path)[factor])


class _TwoStage(nn.Module):
    """A model with a second method, ``encode``, to call through ``method=``."""

    def setup(self):
        self.enc = nn.Dense(8)
        self.head = nn.Dense(2)

    def encode(self, x):
        return self.enc(x)

    def __call__(self, x):
        return self.head(jnp.tanh(self.encode(x)))


def _encoder_forward(module, x):
    """A function given as ``method=`` (as Hugging Face's T5 ``encode`` passes one)."""
    return 2.0 * module.enc(x)


def _merged_dense(params, dora, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A Dense layer's float64 merged kernel ``m * V' / ||V'||_c`` and its bias."""
    kernel = ref.merged_weight(
        params["kernel"], dora["lora_a"], dora["lora_b"], dora["magnitude"], scale
    )
    return kernel, ref.f64(params["bias"])


@pytest.mark.parametrize(
    "method, factor",
    [("encode", 1.0), (_TwoStage.encode, 1.0), (_encoder_forward, 2.0)],
    ids=["name", "unbound-method", "function"],
)
def test_method_argument_runs_the_wrapped_models_method(method, factor):
    model, x = _TwoStage(), jax.random.normal(models.key(0), (3, 4))
    wrapped = dora_linen.wrap(model, DoRAConfig(targets=["enc"], rank=2, alpha=4.0))
    variables = wrapped.init(models.key(1), x, method=method)
    assert set(variables["dora"]) == {"enc"}
    assert set(variables["params"]) == {"enc"}  # only what the method touched
    variables["dora"] = jax.tree.map(lambda a: a + 0.3, variables["dora"])
    encoded = wrapped.apply(variables, x, method=method)
    kernel, bias = _merged_dense(variables["params"]["enc"], variables["dora"]["enc"], 2.0)
    assert encoded.shape == (3, 8)
    assert ref.relative_error(encoded, factor * (ref.f64(x) @ kernel + bias)) <= 1e-5
    merged = dora_linen.merge_params(wrapped, variables, x, method=method)
    expected = model.apply({"params": merged}, x, method=method)
    assert models.relative_error(encoded, expected) <= 1e-5


class _Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="q")(x)


class _CausalLmLike(nn.Module):
    """Holds ``self.model`` as every Hugging Face Flax causal LM does."""

    def setup(self):
        self.model = _Inner()
        self.lm_head = nn.Dense(3)

    def __call__(self, x):
        return self.lm_head(jnp.tanh(self.model(x)))


# "model" and "config" are the wrapper's fields, the others its methods.
_WRAPPER_NAMES = ("model", "config", "init", "apply", "init_from_params", "_adapting")


class _NamedLikeTheWrapper(nn.Module):
    """Compact submodules named like every field and method of the wrapper."""

    @nn.compact
    def __call__(self, x):
        for name in _WRAPPER_NAMES:
            x = jnp.tanh(nn.Dense(4, name=name)(x))
        return x


@pytest.mark.parametrize(
    "model, order, tanh_last",
    [
        (_CausalLmLike(), ("model/q", "lm_head"), False),
        (_NamedLikeTheWrapper(), _WRAPPER_NAMES, True),
    ],
    ids=["setup-self.model", "compact-wrapper-names"],
)
def test_wrap_reserves_no_name_of_the_model(model, order, tanh_last):
    x = jax.random.normal(models.key(0), (2, 5))
    wrapped = dora_linen.wrap(model, DoRAConfig(targets=list(order), rank=2, alpha=2.0))
    variables = wrapped.init(models.key(1), x)
    assert adapter_paths(variables["dora"]) == set(order)
    base = model.apply({"params": variables["params"]}, x)
    assert models.relative_error(wrapped.apply(variables, x), base) <= 1e-6
    variables["dora"] = models.perturb(variables["dora"], seed=4)
    h = ref.f64(x)
    for index, path in enumerate(order):  # every layer adapted, tanh between them
        kernel, bias = _merged_dense(
            _get(variables["params"], path), _get(variables["dora"], path), 1.0
        )
        h = h @ kernel + bias
        h = np.tanh(h) if tanh_last or index < len(order) - 1 else h
    assert ref.relative_error(wrapped.apply(variables, x), h) <= 1e-5
    assert models.relative_error(wrapped.apply(variables, x), base) > 1e-2


def test_wrap_refuses_what_it_cannot_run():
    config = DoRAConfig(targets=["q"])
    with pytest.raises(TypeError, match="wrap needs a flax.linen Module; got dict"):
        dora_linen.wrap({"q": 1}, config)
    with pytest.raises(TypeError, match="wrap needs a DoRAConfig; got dict"):
        dora_linen.wrap(_Inner(), {"targets": ["q"]})
    bound = _Inner().bind({"params": {"q": {"kernel": jnp.ones((2, 4)), "bias": jnp.ones(4)}}})
    with pytest.raises(ValueError, match="unbound _Inner .* bound to a scope"):
        dora_linen.wrap(bound, config)


def test_subclasses_of_flax_layers_are_not_taken_for_plain_layers():
    class Custom(nn.Dense):
        pass

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Custom(3, name="mine")(x)

    wrapped = dora_linen.wrap(Model(), DoRAConfig(targets=["mine"]))
    with pytest.raises(ValueError, match=r"'mine', a .*Custom; DoRA adapts nn.Dense"):
        wrapped.init(models.key(0), jnp.ones((2, 4)))


def test_vmapped_ensemble_gets_per_member_adapters():
    class Member(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="fc")(x)

    class Ensemble(nn.Module):
        @nn.compact
        def __call__(self, x):
            members = nn.vmap(
                Member,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=None,
                axis_size=3,
            )
            return members(name="members")(x)

    model, x = Ensemble(), jax.random.normal(models.key(0), (2, 5))
    params = model.init(models.key(1), x)["params"]
    wrapped = dora_linen.wrap(model, DoRAConfig(targets=["fc"], rank=2))
    variables = wrapped.init_from_params(models.key(2), params, x)
    shapes = jax.tree.map(jnp.shape, variables["dora"])
    assert shapes == {
        "members": {"fc": {"lora_a": (3, 5, 2), "lora_b": (3, 2, 4), "magnitude": (3, 4)}}
    }
    base = model.apply({"params": params}, x)
    assert models.relative_error(wrapped.apply(variables, x), base) <= 1e-6
    variables["dora"] = jax.tree.map(lambda a: a + 0.2, variables["dora"])
    merged = dora_linen.merge_params(wrapped, variables, x)
    adapted = wrapped.apply(variables, x)
    assert models.relative_error(model.apply({"params": merged}, x), adapted) <= 1e-5
    assert models.relative_error(adapted, base) > 1e-2
