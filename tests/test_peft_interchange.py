"""Adapters move between dora-jax and PEFT: files written by one load in the other.

Each direction is checked at the output level against PEFT itself: the same base weights
with the exchanged adapters give the same outputs (1e-5 relative) in torch and in Flax.
"""

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


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(12, 8)
        self.conv = torch.nn.Conv2d(8, 6, 3, padding=1)
        self.fc1 = torch.nn.Linear(6, 10)
        self.head = torch.nn.Linear(10, 3)

    def forward(self, ids):
        x = self.emb(ids)  # (B, H, W, 8)
        x = torch.tanh(self.conv(x.permute(0, 3, 1, 2))).mean((2, 3))
        return self.head(torch.tanh(self.fc1(x)))


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(12, 8, name="emb")(ids)
        x = jnp.tanh(nn.Conv(6, (3, 3), padding=((1, 1), (1, 1)), name="conv")(x)).mean((1, 2))
        return nn.Dense(3, name="head")(jnp.tanh(nn.Dense(10, name="fc1")(x)))


def _flax_params(net):
    p = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    return {
        "emb": {"embedding": p["emb.weight"]},
        "conv": {"kernel": p["conv.weight"].transpose(2, 3, 1, 0), "bias": p["conv.bias"]},
        "fc1": {"kernel": p["fc1.weight"].T, "bias": p["fc1.bias"]},
        "head": {"kernel": p["head.weight"].T, "bias": p["head.bias"]},
    }


def _ids():
    return np.random.default_rng(0).integers(0, 12, size=(2, 4, 4))


def _config(**kwargs):
    settings = dict(
        targets=["emb", "conv", "fc1"],
        rank=2,
        alpha=4.0,
        rank_pattern={"fc1": 3},
        alpha_pattern={"conv": 6.0},
        modules_to_save=["head"],
    )
    return dora_jax.DoRAConfig(**{**settings, **kwargs})


def _flax_side(net, config):
    wrapped = dora_jax.linen.wrap(FlaxNet(), config)
    variables = wrapped.init_from_params(jax.random.key(0), _flax_params(net), _ids())
    return wrapped, variables


def _save_random_peft_adapter(net, use_dora, path):
    """Wrap ``net`` with PEFT (random A, B; perturbed magnitudes and head), save it to
    ``path``, and return PEFT's output."""
    peft_config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["emb", "conv", "fc1"],
        rank_pattern={"fc1": 3},
        alpha_pattern={"conv": 6},
        modules_to_save=["head"],
        use_dora=use_dora,
        init_lora_weights=False,  # random A and B, so every adapter matters
    )
    model = peft.get_peft_model(net, peft_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                param.mul_(1.0 + 0.1 * torch.randn_like(param))
        expected = model(torch.as_tensor(_ids())).numpy()
    model.save_pretrained(path)
    return expected


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
def test_peft_adapter_loads_into_flax(tmp_path, use_dora):
    torch.manual_seed(0)
    net = TorchNet()
    base_params = _flax_params(net)  # before PEFT wraps the layers in place
    base = FlaxNet().apply({"params": base_params}, _ids())
    expected = _save_random_peft_adapter(net, use_dora, tmp_path)

    config = dora_peft.load_config(tmp_path)
    assert config.use_dora is use_dora and config.rank == 2
    wrapped, variables = _flax_side(TorchNet(), config)  # other base weights: replaced below
    variables["params"] = {**base_params, "head": variables["params"]["head"]}
    variables.pop("dora_cache", None)  # it belonged to the other base weights
    loaded = dora_peft.load_pretrained(tmp_path, variables, config)
    got = wrapped.apply(loaded, _ids())
    assert _rel(got, expected) <= 1e-5
    assert _rel(got, base) > 1e-2  # the adapters changed the output


def test_flax_adapter_loads_into_peft(tmp_path):
    torch.manual_seed(1)
    net = TorchNet()
    config = _config()
    wrapped, variables = _flax_side(net, config)
    leaves, treedef = jax.tree.flatten(variables["dora"])
    keys = jax.random.split(jax.random.key(5), len(leaves))
    noisy = [a + 0.2 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    variables["dora"] = jax.tree.unflatten(treedef, noisy)
    variables["params"]["head"]["bias"] = variables["params"]["head"]["bias"] + 0.5
    expected = wrapped.apply(variables, _ids())
    dora_peft.save_pretrained(tmp_path, variables, config)

    model = peft.PeftModel.from_pretrained(net, tmp_path)
    with torch.no_grad():
        got = model(torch.as_tensor(_ids())).numpy()
    assert _rel(got, expected) <= 1e-5


def test_round_trip_and_errors(tmp_path):
    torch.manual_seed(2)
    net = TorchNet()
    config = _config()
    _, variables = _flax_side(net, config)
    variables["dora"] = jax.tree.map(lambda a: a + 0.1, variables["dora"])
    dora_peft.save_pretrained(tmp_path, variables, config)
    _, fresh = _flax_side(net, config)
    loaded = dora_peft.load_pretrained(tmp_path, fresh, config)
    for got, want in zip(
        jax.tree.leaves(loaded["dora"]), jax.tree.leaves(variables["dora"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    reloaded = dora_peft.load_config(tmp_path)
    assert reloaded.rank_pattern == {"fc1": 3} and reloaded.alpha_pattern == {"conv": 6.0}

    _, fewer = _flax_side(net, _config(targets=["fc1"], alpha_pattern={}))
    with pytest.raises(ValueError, match=r"modules the model has none for: \['conv', 'emb'\]"):
        dora_peft.load_pretrained(tmp_path, fewer, config)
    _, other_rank = _flax_side(net, _config(rank_pattern={}))
    with pytest.raises(ValueError, match=r"'fc1': PEFT's lora_a converts to shape \(6, 3\)"):
        dora_peft.load_pretrained(tmp_path, other_rank, config)


def test_load_config_reads_patterns_as_flax_paths(tmp_path):
    import json

    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "use_dora": True,
                "r": 8,
                "lora_alpha": 16,
                "target_modules": ["query", "value"],
                "rank_pattern": {"encoder.layer.0.attention.self.query": 4, "layer.*value": 2},
                "alpha_pattern": {r"encoder\.layer\.11\.output\.dense": 32},
            }
        )
    )
    config = dora_peft.load_config(tmp_path)
    assert config.targets == ("query", "value")  # plain names stay path suffixes
    assert config.rank_pattern == {
        "encoder/layer[/_]0/attention/self/query": 4,
        "layer.*value": 2,
    }
    assert config.alpha_pattern == {"encoder/layer[/_]11/output/dense": 32}
    assert config.settings("encoder/layer_0/attention/self/query").rank == 4  # Linen
    assert config.settings("encoder/layer/0/attention/self/query").rank == 4  # NNX list
    assert config.settings("encoder/layer_3/attention/self/value").rank == 2
    assert config.settings("encoder/layer_11/output/dense").alpha == 32


def test_load_config_reads_torch_module_names_as_flax_paths(tmp_path):
    """save_pretrained writes full torch names (``encoder.layer.0.query``); they must
    select the same Flax layers again, Linen (``layer_0``) or NNX (``layer/0``)."""
    import json

    names = ["encoder.layer.0.attention.query", "encoder.layer.11.attention.query", "head"]
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": names})
    )
    config = dora_peft.load_config(tmp_path)
    for path in (
        "encoder/layer_0/attention/query",
        "encoder/layer/11/attention/query",
        "model/encoder/layer_11/attention/query",
        "head",
    ):
        assert config.is_target(path), path
    for path in ("encoder/layer_1/attention/query", "encoder/layer_0/attention/key", "heads"):
        assert not config.is_target(path), path


# ----- NNX models move the same way -----------------------------------------------------


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(12, 8, rngs=rngs)
        self.conv = nnx.Conv(8, 6, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.fc1 = nnx.Linear(6, 10, rngs=rngs)
        self.head = nnx.Linear(10, 3, rngs=rngs)

    def __call__(self, ids):
        x = jnp.tanh(self.conv(self.emb(ids))).mean((1, 2))
        return self.head(jnp.tanh(self.fc1(x)))


def _nnx_side(net, config):
    """An NNX model with ``net``'s base weights and DoRA from ``config``."""
    model = NNXNet(nnx.Rngs(0))
    for name, layer in _flax_params(net).items():
        for key, value in layer.items():
            getattr(getattr(model, name), key).set_value(jnp.asarray(value))
    return dora_jax.nnx.apply_dora(model, config, rngs=nnx.Rngs(1))


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
def test_peft_adapter_loads_into_nnx(tmp_path, use_dora):
    torch.manual_seed(3)
    net = TorchNet()
    model = _nnx_side(net, _config(use_dora=use_dora))  # before PEFT wraps net in place
    base = model(_ids())
    expected = _save_random_peft_adapter(net, use_dora, tmp_path)

    assert dora_peft.load_pretrained(tmp_path, model, dora_peft.load_config(tmp_path)) is model
    assert _rel(model(_ids()), expected) <= 1e-5
    assert _rel(model(_ids()), base) > 1e-2


def test_nnx_adapter_loads_into_peft(tmp_path):
    torch.manual_seed(4)
    net = TorchNet()
    config = _config()
    model = _nnx_side(net, config)
    trainable = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(6), len(leaves))
    noisy = [a + 0.2 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))  # adapters and the saved head
    expected = model(_ids())
    dora_peft.save_pretrained(tmp_path, model, config)

    peft_model = peft.PeftModel.from_pretrained(net, tmp_path)
    with torch.no_grad():
        got = peft_model(torch.as_tensor(_ids())).numpy()
    assert _rel(got, expected) <= 1e-5

    # And back into a fresh NNX model: the same adapters, bit for bit.
    fresh = _nnx_side(TorchNet(), config)
    dora_peft.load_pretrained(tmp_path, fresh, config)
    for got, want in zip(jax.tree.leaves(nnx.state(fresh, nnx.LoRAParam)), noisy, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_nnx_update_checks_everything_before_changing_anything():
    config = _config()
    model = _nnx_side(TorchNet(), config)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    variables = dora_jax.nnx.as_linen_variables(model)
    assert set(variables["dora"]) == {"emb", "conv", "fc1"}
    assert set(variables["params"]["head"]) == {"kernel", "bias"}
    variables["dora"]["emb"]["lora_a"] = variables["dora"]["emb"]["lora_a"] + 1.0
    variables["dora"]["fc1"]["lora_b"] = np.zeros((2, 10), np.float32)  # rank 3 in the model
    with pytest.raises(ValueError, match=r"'fc1/lora_b': expected shape \(3, 10\); got shape"):
        dora_jax.nnx.update_from_linen_variables(model, variables)
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    jax.tree.map(np.testing.assert_array_equal, after, before)
