"""Every PEFT folder either loads with PEFT's own numbers or is refused by name.

The folders are written by PEFT itself (``get_peft_model`` + ``save_pretrained``) from
small torch models, or are such folders with one thing changed on disk. A folder that
loads is checked at the output level: the same base weights with the loaded adapter give
PEFT's output to 1e-5 (relative), from Linen (``dora_jax.linen.wrap``) and NNX
(``dora_jax.nnx.apply_dora``) models. A folder that cannot load must raise an error
whose text names the field or the tensor.
"""

from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dora_jax
from dora_jax import peft as dora_peft

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

PREFIX = "base_model.model."

# ------------------------------------------------------------------- the models


class TorchHead(torch.nn.Module):
    """A classifier head with submodules, like RoBERTa's (``dense``, ``out_proj``)."""

    def __init__(self):
        super().__init__()
        self.dense = torch.nn.Linear(10, 10)
        self.out_proj = torch.nn.Linear(10, 3)

    def forward(self, x):
        return self.out_proj(torch.tanh(self.dense(x)))


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(12, 8)
        self.conv = torch.nn.Conv2d(8, 6, 3, padding=1)
        self.fc1 = torch.nn.Linear(6, 10)
        self.norm = torch.nn.LayerNorm(10)
        self.fc2 = torch.nn.Linear(10, 10)
        self.classifier = TorchHead()

    def forward(self, input_ids, **_):
        x = self.emb(input_ids)  # (B, H, W, 8)
        x = torch.tanh(self.conv(x.permute(0, 3, 1, 2))).mean((2, 3))
        x = torch.tanh(self.fc2(self.norm(torch.tanh(self.fc1(x)))))
        return self.classifier(x)


class LinenHead(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out_proj")(jnp.tanh(nn.Dense(10, name="dense")(x)))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(12, 8, name="emb")(ids)
        x = jnp.tanh(nn.Conv(6, (3, 3), padding=((1, 1), (1, 1)), name="conv")(x)).mean((1, 2))
        x = nn.LayerNorm(epsilon=1e-5, name="norm")(jnp.tanh(nn.Dense(10, name="fc1")(x)))
        return LinenHead(name="classifier")(jnp.tanh(nn.Dense(10, name="fc2")(x)))


class NnxHead(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(10, 10, rngs=rngs)
        self.out_proj = nnx.Linear(10, 3, rngs=rngs)

    def __call__(self, x):
        return self.out_proj(jnp.tanh(self.dense(x)))


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(12, 8, rngs=rngs)
        self.conv = nnx.Conv(8, 6, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.fc1 = nnx.Linear(6, 10, rngs=rngs)
        self.norm = nnx.LayerNorm(10, epsilon=1e-5, rngs=rngs)
        self.fc2 = nnx.Linear(10, 10, rngs=rngs)
        self.classifier = NnxHead(rngs)

    def __call__(self, ids):
        x = jnp.tanh(self.conv(self.emb(ids))).mean((1, 2))
        x = jnp.tanh(self.fc2(self.norm(jnp.tanh(self.fc1(x)))))
        return self.classifier(x)


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 8)

    def forward(self, x):
        return x + self.out(torch.tanh(self.fc(x)))


class TorchBody(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([TorchBlock() for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TorchStack(torch.nn.Module):
    """``body.layers.<n>.fc`` / ``.out``: what ``layers_to_transform`` selects in (PEFT
    finds the layer index after two names)."""

    def __init__(self):
        super().__init__()
        self.body = TorchBody()

    def forward(self, x):
        return self.body(x)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(8, name="out")(jnp.tanh(nn.Dense(8, name="fc")(x)))


class LinenBody(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = LinenBlock(name=f"layers_{i}")(x)
        return x


class LinenStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        return LinenBody(name="body")(x)


def _ids():
    return np.random.default_rng(0).integers(0, 12, size=(2, 4, 4))


def _x():
    return np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)


def _flax_params(net, linen: bool = True):
    """The torch model's weights as a Flax params tree (Linen ``layers_0`` or NNX
    ``layers/0`` paths)."""
    params: dict = {}
    for name, module in net.named_modules():
        if not name or not any(True for _ in module.parameters(recurse=False)):
            continue
        keys = (re.sub(r"\.(\d+)", r"_\1", name) if linen else name).split(".")
        w = module.weight.detach().numpy()
        if isinstance(module, torch.nn.Linear):
            leaves = {"kernel": w.T}
        elif isinstance(module, torch.nn.Conv2d):
            leaves = {"kernel": w.transpose(2, 3, 1, 0)}
        elif isinstance(module, torch.nn.Embedding):
            leaves = {"embedding": w}
        else:
            leaves = {"scale": w}
        if getattr(module, "bias", None) is not None:
            leaves["bias"] = module.bias.detach().numpy()
        tree = params
        for key in keys:
            tree = tree.setdefault(key, {})
        tree.update(leaves)
    return params


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


NET_TARGETS = ["emb", "conv", "fc1", "fc2"]


def _peft_folder(path, net, inputs, perturb=("lora_magnitude_vector", "modules_to_save"), **kw):
    """Wrap ``net`` (in place) with PEFT, random adapters, the parameters whose names
    contain an entry of ``perturb`` moved; save to ``path``; return PEFT's output."""
    settings = dict(r=2, lora_alpha=4, init_lora_weights=False, use_dora=True)
    model = peft.get_peft_model(net, peft.LoraConfig(**{**settings, **kw}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(p in name for p in perturb):
                param.add_(0.3 * torch.randn_like(param))
        expected = model.get_base_model()(torch.as_tensor(inputs)).numpy()
    model.save_pretrained(path)
    return expected


def _net_folder(path, seed=0, **kw):
    """A PEFT folder of :class:`TorchNet`: (base params Linen, base params NNX, PEFT output)."""
    torch.manual_seed(seed)
    net = TorchNet()
    linen, nnx_params = _flax_params(net), _flax_params(net, linen=False)
    kw.setdefault("target_modules", NET_TARGETS)
    expected = _peft_folder(path, net, _ids(), **kw)
    return linen, nnx_params, expected


def _linen_output(folder, module, params, inputs, config=None):
    config = config or dora_peft.load_config(folder)
    wrapped = dora_jax.linen.wrap(module, config)
    variables = wrapped.init_from_params(jax.random.key(0), params, inputs)
    return wrapped.apply(dora_peft.load_pretrained(folder, variables, config), inputs)


def _set_nnx(model, params):
    for key, value in params.items():
        child = model[int(key)] if key.isdigit() else getattr(model, key)
        if isinstance(value, dict):
            _set_nnx(child, value)
        else:
            child.set_value(jnp.asarray(value))


def _nnx_output(folder, params, inputs):
    config = dora_peft.load_config(folder)
    model = NnxNet(nnx.Rngs(0))
    _set_nnx(model, params)
    dora_jax.nnx.apply_dora(model, config, rngs=nnx.Rngs(1))
    assert dora_peft.load_pretrained(folder, model, config) is model
    return model(inputs)


def _edit_tensors(folder, change):
    file = folder / "adapter_model.safetensors"
    tensors = safetensors_numpy.load_file(str(file))
    change(tensors)
    safetensors_numpy.save_file(tensors, str(file))


def _edit_config(folder, **fields):
    file = folder / "adapter_config.json"
    data = json.loads(file.read_text())
    for key, value in fields.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    file.write_text(json.dumps(data))


# ------------------------------------------------------------------------ biases


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_folders_load_the_trained_biases(tmp_path, bias):
    """PEFT trains and saves the biases (``<layer>.base_layer.bias`` of adapted layers,
    ``<module>.bias`` of the others with "all", LayerNorm's included); they replace the
    model's, as in PEFT."""
    linen, nnx_params, expected = _net_folder(
        tmp_path, bias=bias, modules_to_save=["classifier"], perturb=("lora_magnitude", "bias")
    )
    names = safetensors_numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert PREFIX + "fc1.base_layer.bias" in names
    assert (PREFIX + "norm.bias" in names) == (bias == "all")
    got = _linen_output(tmp_path, LinenNet(), linen, _ids())
    assert _rel(got, expected) <= 1e-5
    assert _rel(_nnx_output(tmp_path, nnx_params, _ids()), expected) <= 1e-5
    # Without the biases the output is far off (what ignoring them gave).
    assert _rel(LinenNet().apply({"params": linen}, _ids()), expected) > 1e-2


def test_bias_all_saved_by_dora_jax_loads_in_peft(tmp_path):
    linen, _, _ = _net_folder(tmp_path / "peft", bias="all", perturb=("lora_magnitude", "bias"))
    config = dora_peft.load_config(tmp_path / "peft")
    wrapped = dora_jax.linen.wrap(LinenNet(), config)
    variables = wrapped.init_from_params(jax.random.key(0), linen, _ids())
    variables = dora_peft.load_pretrained(tmp_path / "peft", variables, config)
    expected = wrapped.apply(variables, _ids())
    dora_peft.save_pretrained(tmp_path / "ours", variables, config, bias="all")

    torch.manual_seed(0)  # the same base weights as the folder's
    model = peft.PeftModel.from_pretrained(TorchNet(), tmp_path / "ours")
    with torch.no_grad():
        got = model.get_base_model()(torch.as_tensor(_ids())).numpy()
    assert _rel(got, expected) <= 1e-5
    with pytest.raises(ValueError, match="bias must be 'none', 'all' or 'lora_only'; got 'some'"):
        dora_peft.save_pretrained(tmp_path / "bad", variables, config, bias="some")


@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")  # PEFT's own check
def test_lora_bias_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    _peft_folder(tmp_path, TorchNet(), _ids(), target_modules=["fc1"], use_dora=False,
                 lora_bias=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"lora_bias=True is not supported: lora_B\.bias"):
        dora_peft.load_config(tmp_path)
    # The tensor is refused even where the config does not say lora_bias.
    _edit_config(tmp_path, lora_bias=False)
    config = dora_peft.load_config(tmp_path)
    wrapped = dora_jax.linen.wrap(LinenNet(), config)
    variables = wrapped.init(jax.random.key(0), _ids())
    with pytest.raises(
        ValueError, match=r"'base_model\.model\.fc1\.lora_B\.bias' is a lora_B bias"
    ):
        dora_peft.load_pretrained(tmp_path, variables, config)


# -------------------------------------------------------------- modules_to_save


def test_seq_cls_folder_loads_the_nested_classifier(tmp_path):
    """``task_type="SEQ_CLS"`` saves the whole ``classifier`` (``dense``, ``out_proj``)
    and lists ``"score"`` too, a module the model does not have."""
    linen, nnx_params, expected = _net_folder(tmp_path, task_type="SEQ_CLS")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    assert sorted(saved) == ["classifier", "score"]
    config = dora_peft.load_config(tmp_path)
    assert config.modules_to_save == ("classifier",)  # "score" held no tensor
    assert _rel(_linen_output(tmp_path, LinenNet(), linen, _ids()), expected) <= 1e-5
    assert _rel(_nnx_output(tmp_path, nnx_params, _ids()), expected) <= 1e-5


def test_nested_saved_module_round_trips_through_peft(tmp_path):
    linen, _, _ = _net_folder(tmp_path / "peft", task_type="SEQ_CLS")
    config = dora_peft.load_config(tmp_path / "peft")
    wrapped = dora_jax.linen.wrap(LinenNet(), config)
    variables = wrapped.init_from_params(jax.random.key(0), linen, _ids())
    variables = dora_peft.load_pretrained(tmp_path / "peft", variables, config)
    dora_peft.save_pretrained(tmp_path / "ours", variables, config)
    torch.manual_seed(0)
    model = peft.PeftModel.from_pretrained(TorchNet(), tmp_path / "ours")
    with torch.no_grad():
        got = model.get_base_model()(torch.as_tensor(_ids())).numpy()
    assert _rel(got, wrapped.apply(variables, _ids())) <= 1e-5


# ------------------------------------------------------- which modules PEFT adapted


@pytest.mark.parametrize(
    "selection",
    [
        dict(target_modules=["fc", "out"], layers_to_transform=[0, 2], layers_pattern="layers"),
        dict(target_modules=["fc", "out"], layers_to_transform=1),
        dict(target_modules=["fc", "out"], exclude_modules=["layers.1.out", "body.layers.0.fc"]),
        dict(target_modules=r".*\.(0|2)\.fc"),
        dict(target_modules="all-linear"),
    ],
    ids=["layers_to_transform", "one_layer", "exclude_modules", "regex", "all_linear"],
)
def test_selection_fields_adapt_what_peft_adapted(tmp_path, selection):
    torch.manual_seed(0)
    net = TorchStack()
    params = _flax_params(net)
    expected = _peft_folder(tmp_path, net, _x(), **selection)
    names = safetensors_numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    adapted = sorted({k[len(PREFIX) :].split(".lora_")[0] for k in names})
    config = dora_peft.load_config(tmp_path)
    paths = [f"body/layers_{i}/{m}" for i in range(3) for m in ("fc", "out")]
    flax_adapted = [p for p in paths if config.is_target(p)]
    assert [dora_peft.module_name(p) for p in flax_adapted] == adapted
    assert 0 < len(adapted) < len(paths) or selection.get("target_modules") == "all-linear"
    assert _rel(_linen_output(tmp_path, LinenStack(), params, _x(), config), expected) <= 1e-5


def test_selection_fields_without_the_weights_file_are_named(tmp_path):
    torch.manual_seed(0)
    _peft_folder(tmp_path, TorchStack(), _x(), target_modules=["fc"], layers_to_transform=[1])
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(
        ValueError, match=r"with layers_to_transform, the adapted modules are read from adapter"
    ):
        dora_peft.load_config(tmp_path)


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")
def test_rank_pattern_keys_of_untransformed_layers_are_left_out(tmp_path):
    torch.manual_seed(0)
    net = TorchStack()
    params = _flax_params(net)
    expected = _peft_folder(
        tmp_path,
        net,
        _x(),
        target_modules=["fc"],
        layers_to_transform=[0],
        rank_pattern={"layers.0.fc": 3, "layers.1.fc": 4},
        layers_pattern="layers",
    )
    config = dora_peft.load_config(tmp_path)
    assert config.rank_pattern == {"layers[/_]0/fc": 3}
    assert _rel(_linen_output(tmp_path, LinenStack(), params, _x(), config), expected) <= 1e-5


# ------------------------------------------------------------- refused tensors


def _dora_folder(tmp_path):
    torch.manual_seed(0)
    _peft_folder(tmp_path, TorchNet(), _ids(), target_modules=["fc1", "fc2"])
    config = dora_peft.load_config(tmp_path)
    wrapped = dora_jax.linen.wrap(LinenNet(), config)
    return config, wrapped.init(jax.random.key(0), _ids())


def _refused(tmp_path, config, variables, pattern):
    with pytest.raises(ValueError, match=pattern):
        dora_peft.load_pretrained(tmp_path, variables, config)


def test_magnitudes_in_a_folder_that_says_lora_are_refused(tmp_path):
    _dora_folder(tmp_path)
    _edit_config(tmp_path, use_dora=False)
    config = dora_peft.load_config(tmp_path)
    assert config.use_dora is False
    variables = dora_jax.linen.wrap(LinenNet(), config).init(jax.random.key(0), _ids())
    _refused(
        tmp_path,
        config,
        variables,
        r"adapter_model\.safetensors: tensor 'base_model\.model\.fc1\.lora_magnitude_vector' is "
        r"a DoRA magnitude, but the folder's adapter_config\.json says use_dora=false",
    )


def test_extra_tensor_is_refused_naming_file_and_key(tmp_path):
    config, variables = _dora_folder(tmp_path)

    def add(tensors):
        tensors[PREFIX + "fc1.extra_scale"] = np.ones(10, np.float32)
        tensors[PREFIX + "pooler.weight"] = np.ones((3, 3), np.float32)

    _edit_tensors(tmp_path, add)
    _refused(
        tmp_path,
        config,
        variables,
        r"adapter_model\.safetensors: tensors that match no parameter of the model \(refused "
        r"rather than dropped\): \['base_model\.model\.fc1\.extra_scale', "
        r"'base_model\.model\.pooler\.weight'\]",
    )


def test_adapter_of_a_module_without_adapters_is_named(tmp_path):
    config, variables = _dora_folder(tmp_path)

    def add(tensors):
        tensors[PREFIX + "fc3.lora_A.weight"] = np.ones((2, 10), np.float32)

    _edit_tensors(tmp_path, add)
    _refused(tmp_path, config, variables, r"adapters for modules the model has none for: \['fc3'\]")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_tensor_is_refused_naming_file_and_key(tmp_path, value):
    config, variables = _dora_folder(tmp_path)

    def poison(tensors):
        tensors[PREFIX + "fc2.lora_B.weight"][3, 1] = value

    _edit_tensors(tmp_path, poison)
    _refused(
        tmp_path,
        config,
        variables,
        r"adapter_model\.safetensors: tensor 'base_model\.model\.fc2\.lora_B\.weight' \(10, 2\) "
        r"holds 1 NaN or infinite values",
    )


def test_integer_tensor_is_refused_naming_file_key_and_dtype(tmp_path):
    config, variables = _dora_folder(tmp_path)

    def to_int(tensors):
        key = PREFIX + "fc1.lora_A.weight"
        tensors[key] = np.round(tensors[key] * 10).astype(np.int32)

    _edit_tensors(tmp_path, to_int)
    _refused(
        tmp_path,
        config,
        variables,
        r"adapter_model\.safetensors: tensor 'base_model\.model\.fc1\.lora_A\.weight' has dtype "
        r"I32; adapter tensors must be floating point",
    )


def test_bfloat16_folder_loads(tmp_path):
    """safetensors' NumPy reader cannot read bfloat16; PEFT folders of bfloat16 models
    hold it."""
    from safetensors.torch import load_file, save_file

    config, variables = _dora_folder(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(file).items()}
    save_file(tensors, file)
    loaded = dora_peft.load_pretrained(tmp_path, variables, config)
    want = tensors[PREFIX + "fc2.lora_B.weight"].float().numpy().T
    np.testing.assert_array_equal(np.asarray(loaded["dora"]["fc2"]["lora_b"]), want)


def test_base_weights_of_adapted_layers_must_equal_the_models(tmp_path):
    """PEFT's ``save_embedding_layers`` writes ``<layer>.base_layer.weight``: accepted when
    it is the model's own weight, refused when it would change it."""
    torch.manual_seed(0)
    net = TorchNet()
    params = _flax_params(net)
    _peft_folder(tmp_path, net, _ids(), target_modules=["emb", "fc1"])
    config = dora_peft.load_config(tmp_path)
    wrapped = dora_jax.linen.wrap(LinenNet(), config)
    variables = wrapped.init_from_params(jax.random.key(0), params, _ids())
    base = params["emb"]["embedding"]
    _edit_tensors(tmp_path, lambda t: t.update({PREFIX + "emb.base_layer.weight": base}))
    dora_peft.load_pretrained(tmp_path, variables, config)
    _edit_tensors(tmp_path, lambda t: t.update({PREFIX + "emb.base_layer.weight": base + 1}))
    _refused(
        tmp_path,
        config,
        variables,
        r"tensor 'base_model\.model\.emb\.base_layer\.weight' holds base weights that differ "
        r"from the model's emb/embedding",
    )


# --------------------------------------------------------------- refused fields


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("fan_in_fan_out", True, r"fan_in_fan_out=True is not supported: it stores weights as"),
        ("init_lora_weights", "pissa", r"init_lora_weights='pissa' is not supported: PiSSA"),
        ("init_lora_weights", "olora", r"init_lora_weights='olora' is not supported"),
        ("init_lora_weights", "loftq", r"init_lora_weights='loftq' is not supported"),
        ("init_lora_weights", "mica", r"init_lora_weights='mica' is not supported"),
        ("bias", "some", r"bias='some' is not supported.*Supported: 'none', 'all', 'lora_only'"),
        ("peft_type", "LOHA", r"peft_type='LOHA' is not supported: only LoRA"),
        ("trainable_token_indices", [1, 2], r"trainable_token_indices=\[1, 2\] is not supported"),
        ("layer_replication", [[0, 1]], r"layer_replication=\[\[0, 1\]\] is not supported"),
        ("use_qalora", True, r"use_qalora=True is not supported"),
        ("brand_new_option", 3, r"unknown PEFT config field 'brand_new_option' = 3; refused"),
        ("brand_new_option", 0, r"unknown PEFT config field 'brand_new_option' = 0; refused"),
        ("r", ..., r"the required field 'r' is missing"),
        ("lora_alpha", ..., r"the required field 'lora_alpha' is missing"),
        ("r", "8", r"DoRAConfig: rank must be an integer >= 1; got '8' \(str\)"),
        ("lora_alpha", None, r"DoRAConfig: alpha must be a real number; got None"),
        ("use_rslora", "yes", r"DoRAConfig: rslora must be a bool; got 'yes'"),
        ("target_modules", ["fc1", 3], r"target_modules must be a list of strings"),
    ],
)
def test_unsupported_config_is_refused_naming_file_and_field(tmp_path, field, value, message):
    _dora_folder(tmp_path)
    _edit_config(tmp_path, **{field: value})
    with pytest.raises((TypeError, ValueError), match=r"adapter_config\.json: .*" + message):
        dora_peft.load_config(tmp_path)


@pytest.mark.parametrize(
    "field, value",
    [
        ("init_lora_weights", "gaussian"),
        ("init_lora_weights", True),
        ("init_lora_weights", "eva"),
        ("task_type", "CAUSAL_LM"),
        ("a_field_from_a_newer_peft", None),
        ("another_newer_field", False),
    ],
)
def test_fields_that_do_not_change_the_numbers_are_accepted(tmp_path, field, value):
    config, variables = _dora_folder(tmp_path)
    _edit_config(tmp_path, **{field: value})
    assert dora_peft.load_config(tmp_path) == config
    dora_peft.load_pretrained(tmp_path, variables, config)


def test_refused_field_is_refused_with_an_explicit_config_too(tmp_path):
    """The folder's config describes its tensors, so it is checked even when the caller
    passes a DoRAConfig."""
    config, variables = _dora_folder(tmp_path)
    _edit_config(tmp_path, fan_in_fan_out=True)
    _refused(tmp_path, config, variables, r"fan_in_fan_out=True is not supported")


# --------------------------------------------------- a HuggingFace model's folders


def _example_bert(monkeypatch):
    """``examples/bert.py`` (the plain Flax BERT with HuggingFace's parameter names)."""
    import importlib.util
    import sys
    from pathlib import Path

    file = Path(__file__).resolve().parents[1] / "examples" / "bert.py"
    spec = importlib.util.spec_from_file_location("example_bert", file)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "selection",
    [
        dict(target_modules=["query", "value"], bias="all"),
        dict(
            target_modules=["query", "value", "dense"],
            exclude_modules=["output.dense"],
            layers_to_transform=[0, 2],
            bias="lora_only",
        ),
    ],
    ids=["bias_all", "exclude_layers_lora_only"],
)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_huggingface_bert_folder_loads_into_the_flax_bert(tmp_path, monkeypatch, selection):
    """A transformers ``BertModel``'s PEFT folder into ``examples/bert.py``, whose paths
    are HuggingFace's (``encoder/layer_0/attention/self/query``)."""
    transformers = pytest.importorskip("transformers")
    bert = _example_bert(monkeypatch)
    sizes = dict(vocab_size=50, hidden_size=16, num_heads=2, intermediate_size=32)
    hf = transformers.BertConfig(
        num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=16,
        **{k: v for k, v in sizes.items() if k != "num_heads"},
    )  # fmt: skip
    config = bert.BertConfig(num_layers=3, max_position=16, **sizes)
    torch.manual_seed(0)
    net = transformers.BertModel(hf, add_pooling_layer=False).eval()
    params: dict = {}
    for key, value in net.state_dict().items():
        if key.endswith(("weight", "bias")):
            *module, leaf = bert._flax_path(key.split("."))
            node = params
            for name in module:
                node = node.setdefault(name, {})
            node[leaf] = bert._flax_value(module, leaf, value.numpy())
    ids = np.random.default_rng(0).integers(0, 50, (2, 7))
    model = peft.get_peft_model(
        net, peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, init_lora_weights=False, **selection)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "magnitude" in name or name.endswith("bias"):
                param.add_(0.2 * torch.randn_like(param))
        expected = model.get_base_model()(torch.as_tensor(ids)).last_hidden_state.numpy()
    model.save_pretrained(tmp_path)
    mask = np.ones_like(ids)
    dora_config = dora_peft.load_config(tmp_path)
    wrapped = dora_jax.linen.wrap(bert.Bert(config), dora_config)
    variables = wrapped.init_from_params(jax.random.key(0), params, ids, mask)
    got = wrapped.apply(dora_peft.load_pretrained(tmp_path, variables, dora_config), ids, mask)
    assert _rel(got, expected) <= 1e-5
