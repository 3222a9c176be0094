"""``DoRAConfig`` refuses bad values on construction and settings that select nothing.

Construction: every field of the wrong type is a ``TypeError`` naming the field (a
string ``alpha="16"``, a bool where a number is wanted, a non-string target), and a NaN
or infinite ``alpha`` / ``eps`` / pattern value a ``ValueError``. Matching: an
``exclude``, ``rank_pattern``, ``alpha_pattern`` or ``modules_to_save`` entry that
selects nothing in the model is a ``ValueError`` naming the field and the entry and
listing the closest real paths first, raised by ``dora_jax.linen.wrap`` (at ``init``)
and by ``dora_jax.nnx.apply_dora`` alike.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
from flax import nnx

import dora_jax

# ----------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("alpha", "16", "alpha must be a real number; got '16' (str)"),
        ("alpha", True, "alpha must be a real number; got True (bool)"),
        ("alpha", None, "alpha must be a real number; got None (NoneType)"),
        ("rank", "8", "rank must be an integer >= 1; got '8' (str)"),
        ("rank", 8.0, "rank must be an integer >= 1; got 8.0 (float)"),
        ("rank", True, "rank must be an integer >= 1; got True (bool)"),
        ("dropout", "0.1", "dropout must be a real number; got '0.1' (str)"),
        ("eps", "1e-6", "eps must be a real number; got '1e-6' (str)"),
        ("rslora", "false", "rslora must be a bool; got 'false' (str)"),
        ("use_dora", 1, "use_dora must be a bool; got 1 (int)"),
        ("detach_norm", None, "detach_norm must be a bool; got None (NoneType)"),
        ("targets", 3, "targets must be a string or a list of strings; got 3 (int)"),
        ("targets", ["query", 3], "targets entry must be a string; got 3 (int)"),
        ("exclude", {"a": 1}, "exclude must be a string or a list of strings; got {'a': 1}"),
        ("modules_to_save", [None], "modules_to_save entry must be a string; got None"),
        ("rank_pattern", [("q", 2)], "rank_pattern must be a dict {pattern: value}"),
        ("rank_pattern", {"q": "2"}, "rank_pattern['q'] must be an integer >= 1; got '2'"),
        ("rank_pattern", {3: 2}, "rank_pattern key must be a regex string; got 3 (int)"),
        ("alpha_pattern", {"q": "32"}, "alpha_pattern['q'] must be a real number; got '32'"),
        ("adapter_dtype", jnp.int32, "adapter_dtype must be a floating dtype"),
        ("adapter_dtype", "int8", "adapter_dtype must be a floating dtype"),
    ],
)
def test_wrong_type_is_a_type_error_naming_the_field(field, value, message):
    with pytest.raises(TypeError, match="^DoRAConfig: " + re.escape(message)):
        dora_jax.DoRAConfig(**{"targets": ["query"], field: value})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("alpha", float("nan"), "alpha must be finite; got nan"),
        ("alpha", float("inf"), "alpha must be finite; got inf"),
        ("alpha", np.float32("-inf"), "alpha must be finite; got -inf"),
        ("eps", float("inf"), "eps must be finite; got inf"),
        ("eps", -1.0, "eps must be >= 0; got -1.0"),
        ("dropout", float("nan"), "dropout must be finite; got nan"),
        ("dropout", 1.0, "dropout must be in [0, 1); got 1.0"),
        ("rank", 0, "rank must be an integer >= 1; got 0"),
        ("alpha_pattern", {"q": float("nan")}, "alpha_pattern['q'] must be finite; got nan"),
        ("rank_pattern", {"q": 0}, "rank_pattern['q'] must be an integer >= 1; got 0"),
        ("rank_pattern", {"(": 2}, "rank_pattern key '(' is not a valid regular expression"),
        ("targets", "(query", "targets '(query' is not a valid regular expression"),
    ],
)
def test_bad_value_is_a_value_error_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match="^DoRAConfig: " + re.escape(message)):
        dora_jax.DoRAConfig(**{"targets": ["query"], field: value})


def test_numbers_are_normalised():
    """NumPy scalars are accepted and stored as Python numbers (hashable, printable)."""
    config = dora_jax.DoRAConfig(
        targets=("query",),
        rank=np.int64(4),
        alpha=np.float32(16),
        rank_pattern={"q": np.int32(2)},
        alpha_pattern={"q": 8},
        use_dora=np.bool_(True),
        adapter_dtype=jnp.bfloat16,
    )
    assert (config.rank, config.alpha) == (4, 16.0)
    assert type(config.rank) is int and type(config.alpha) is float
    assert config.rank_pattern == {"q": 2} and type(config.rank_pattern["q"]) is int
    assert config.alpha_pattern == {"q": 8.0} and config.use_dora is True
    assert hash(config) == hash(dora_jax.DoRAConfig(**{**config.__dict__}))


# --------------------------------------------------------------- check_matched

PATHS = [
    "embeddings/word_embeddings",
    "encoder",
    "encoder/layer_0",
    "encoder/layer_0/attention",
    "encoder/layer_0/attention/self/query",
    "encoder/layer_0/attention/self/value",
    "encoder/layer_1/attention/self/query",
    "encoder/layer_1/attention/self/value",
    "head",
]
ADAPTABLE = [p for p in PATHS if p.endswith(("query", "value", "head", "embeddings"))]


def _error(**kwargs) -> str:
    config = dora_jax.DoRAConfig(targets=["query", "value"], **kwargs)
    with pytest.raises(ValueError) as info:
        config.check_matched(PATHS, ADAPTABLE)
    return str(info.value)


def _listed(message: str) -> list[str]:
    return [line.strip() for line in message.splitlines()[1:] if line.startswith("  ")]


def test_exclude_entry_matching_nothing_lists_closest_module_paths():
    message = _error(exclude=["layer_0/attention/value"])  # the path has a /self/
    assert message.startswith(
        "DoRAConfig exclude entry 'layer_0/attention/value' matches no module. "
        "Module paths, closest first:\n  encoder/layer_0/attention/self/value\n"
    )
    assert sorted(_listed(message)) == sorted(PATHS)


def test_exclude_regex_matching_nothing_is_named():
    message = _error(exclude=".*layer_2/.*")
    assert message.startswith("DoRAConfig exclude entry '.*layer_2/.*' matches no module.")


def test_exclude_of_a_module_targets_would_wrongly_select_is_allowed():
    """Excluding a non-adaptable module (``attention``) is a use of ``exclude``."""
    config = dora_jax.DoRAConfig(targets=["query"], exclude=["layer_0/attention"])
    config.check_matched(PATHS, ADAPTABLE)


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_key_matching_no_adapted_layer_lists_closest_adapted_layers(field):
    message = _error(**{field: {"query": 4, "layer_1/attention/self/qurey": 4}})
    assert message.startswith(
        f"DoRAConfig {field} entry 'layer_1/attention/self/qurey' matches no adapted layer. "
        "Adapted layers, closest first:\n  encoder/layer_1/attention/self/query\n"
    )
    assert sorted(_listed(message)) == sorted(p for p in ADAPTABLE if p.endswith(("y", "e")))


def test_pattern_key_matching_only_an_untargeted_layer_is_an_error():
    """``head`` exists but is not adapted: its rank would never be used."""
    message = _error(rank_pattern={"head": 2})
    assert message.startswith("DoRAConfig rank_pattern entry 'head' matches no adapted layer.")


def test_modules_to_save_naming_no_module_lists_closest_module_paths():
    message = _error(modules_to_save=["haed"])
    assert message.startswith(
        "DoRAConfig modules_to_save entry 'haed' matches no module. "
        "Module paths, closest first:\n  head\n"
    )


def test_modules_to_save_naming_a_module_without_parameters_is_an_error():
    """A dropout module exists but holds no parameter: nothing would be trained."""
    paths = [*PATHS, "encoder/layer_0/dropout"]
    config = dora_jax.DoRAConfig(targets=["query"], modules_to_save=["dropout"])
    config.check_matched(paths, ADAPTABLE)  # a module, when parameter paths are not given
    with pytest.raises(ValueError) as info:
        config.check_matched(paths, ADAPTABLE, param_paths=ADAPTABLE)
    assert str(info.value).startswith(
        "DoRAConfig modules_to_save entry 'dropout' matches no module with parameters. "
        "Module paths, closest first:\n"
    )
    assert "encoder/layer_0/dropout" not in str(info.value)
    for ancestor in ("encoder", "attention", "layer_1"):  # their descendants hold parameters
        config = dora_jax.DoRAConfig(targets=["query"], modules_to_save=[ancestor])
        config.check_matched(paths, ADAPTABLE, param_paths=ADAPTABLE)


def test_everything_matched_passes():
    config = dora_jax.DoRAConfig(
        targets=["query", "value"],
        exclude=["layer_0/attention/self/value"],
        rank_pattern={r"layer_\d/attention/self/query": 2},
        alpha_pattern={"value": 4.0},
        modules_to_save=["head", "word_embeddings"],
    )
    config.check_matched(PATHS, ADAPTABLE)


# ------------------------------------------- the same errors from wrap and apply_dora


def _linen_init(name: str, config: dora_jax.DoRAConfig):
    model, inputs = {
        "bert": (models.Bert(), (jnp.zeros((2, 8), jnp.int32),)),
        "cnn": (models.LinenCnn(), (jnp.zeros((1, 8, 8, 3)),)),
    }[name]
    wrapped = dora_jax.linen.wrap(model, config)
    return jax.eval_shape(wrapped.init, models.key(0), *inputs)


def _nnx_apply(name: str, config: dora_jax.DoRAConfig):
    model = {"bert": models.NnxEncoder, "cnn": models.NnxCnn}[name](nnx.Rngs(0))
    return dora_jax.nnx.apply_dora(model, config, rngs=nnx.Rngs(1))


# (model, Linen prefix, NNX prefix, config kwargs, expected start of the message)
TYPOS = [
    (
        "bert",
        dict(targets=["query"], exclude=["{layer}/attention/valeu"]),
        "DoRAConfig exclude entry '{layer}/attention/valeu' matches no module. Module paths, "
        "closest first:\n  {prefix}{layer}/attention/value\n",
    ),
    (
        "bert",
        dict(targets=["query"], rank_pattern={"{layer}/attention/qurey": 2}),
        "DoRAConfig rank_pattern entry '{layer}/attention/qurey' matches no adapted layer. "
        "Adapted layers, closest first:\n  {prefix}{layer}/attention/query\n",
    ),
    (
        "bert",
        dict(targets=["query"], alpha_pattern={"{layer}/attention/value": 2.0}),
        "DoRAConfig alpha_pattern entry '{layer}/attention/value' matches no adapted layer. "
        "Adapted layers, closest first:\n  {prefix}{layer}/attention/query\n",
    ),
    (
        "cnn",
        dict(targets=["fc1"], modules_to_save=["haed"]),
        "DoRAConfig modules_to_save entry 'haed' matches no module with parameters. Module "
        "paths, closest first:\n  head\n",
    ),
]
NAMES = {"linen": ("encoder/", "layer_0"), "nnx": ("", "layers/0")}


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("name, kwargs, message", TYPOS, ids=["exclude", "rank", "alpha", "save"])
def test_wrap_and_apply_dora_refuse_entries_that_select_nothing(api, name, kwargs, message):
    prefix, layer = NAMES[api]

    def fill(value):
        if isinstance(value, dict):
            return {fill(k): v for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value.format(layer=layer, prefix=prefix)

    config = dora_jax.DoRAConfig(rank=2, **{k: fill(v) for k, v in kwargs.items()})
    with pytest.raises(ValueError) as info:
        (_linen_init if api == "linen" else _nnx_apply)(name, config)
    assert str(info.value).startswith(fill(message))
