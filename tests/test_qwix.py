"""DoRA through qwix (``dora_jax.qwix``): any Linen or NNX model, float or quantised base.

* plain Flax layers: outputs, gradients of A, B and m and merged weights equal
  ``dora_jax.linen.wrap``'s and the float64 reference's (1e-5); PEFT loads the export;
* a decoder block written the way Google's ``gemma`` library writes one (its own ``Einsum``
  module: ``self.param("w", ...)`` with weights such as ``(heads, d_model, head_dim)`` and
  ``jnp.einsum``), in Linen and in NNX, adapted on its attention and MLP einsums: the
  adapted model starts equal to the base, every magnitude gets a gradient, a training step
  (``dora_jax.train``) changes the output, merged weights reproduce it in the plain model
  and equal the float64 reference over the right axes; adapter-only checkpoints restore;
* QDoRA: the quantised base's bytes (int8 <= 0.27x, NF4 <= 0.16x of float32, scales
  included) and outputs equal to DoRA on the dequantised float weights (1e-5).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import dora_jax
from dora_jax import train

qwix = pytest.importorskip("qwix")
dq = pytest.importorskip("dora_jax.qwix")

# qwix 0.1.8 reads flax's removed ``nnx.VariableState`` alias when it unboxes parameters.
pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")

TOL = 1e-5
RANK, ALPHA = 2, 4.0


def random_b(std=0.3):
    return jax.nn.initializers.normal(std)


def perturb(tree, key, std=0.1):
    """Every adapter leaf moved by noise (magnitudes multiplied by 1 + noise)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)],
    )


# ----------------------------------------------------------------- plain Flax layers


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="fc2")(jnp.tanh(nn.Dense(6, name="fc1")(x)))


class One(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="fc")(x)


def adapted_mlp(detach_norm=True, module=Mlp):
    provider = dq.DoraProvider(
        [
            dq.DoraRule(
                module_path="fc.*",
                rank=RANK,
                alpha=ALPHA,
                detach_norm=detach_norm,
                lora_b_initializer=random_b(),
            )
        ]
    )
    model = qwix.apply_lora_to_model(module(), provider)
    x = jax.random.normal(jax.random.key(1), (3, 4))
    variables = model.init(jax.random.key(0), x)
    trainable, frozen = train.partition(variables)
    trainable = perturb(trainable, jax.random.key(2))
    return provider, model, train.combine(trainable, frozen), x


@pytest.mark.parametrize("detach_norm", [True, False])
def test_dense_equals_wrap(detach_norm):
    provider, model, variables, x = adapted_mlp(detach_norm)
    cotangent = jax.random.normal(jax.random.key(3), (3, 5))
    trainable, frozen = train.partition(variables)
    assert set(trainable["params"]["fc1"]) == {
        "kernel_lora_a",
        "kernel_lora_b",
        "kernel_dora_magnitude",
    }
    assert set(frozen["params"]["fc1"]) == {"kernel", "bias"}

    def loss(t):
        return jnp.sum(model.apply(train.combine(t, frozen), x) * cotangent)

    config = dora_jax.DoRAConfig(
        targets=["fc1", "fc2"], rank=RANK, alpha=ALPHA, detach_norm=detach_norm
    )
    wrapped = dora_jax.linen.wrap(Mlp(), config)
    wvars = dq.to_dora_variables(variables["params"])

    def wrap_loss(dora):
        return jnp.sum(wrapped.apply({**wvars, "dora": dora}, x) * cotangent)

    assert ref.relative_error(model.apply(variables, x), wrapped.apply(wvars, x)) <= TOL
    grads, wgrads = jax.grad(loss)(trainable)["params"], jax.grad(wrap_loss)(wvars["dora"])
    for layer in ("fc1", "fc2"):
        for ours, theirs in (
            ("lora_a", "lora_a"),
            ("lora_b", "lora_b"),
            ("dora_magnitude", "magnitude"),
        ):
            got = grads[layer][f"kernel_{ours}"]
            assert ref.relative_error(got, wgrads[layer][theirs]) <= TOL, (layer, ours)
    merged = dq.merge_params(provider, variables["params"])
    wmerged = dora_jax.merge_params(wrapped, wvars, x)
    for layer in ("fc1", "fc2"):
        assert ref.relative_error(merged[layer]["kernel"], wmerged[layer]["kernel"]) <= TOL
    assert ref.relative_error(Mlp().apply({"params": merged}, x), model.apply(variables, x)) <= TOL


@pytest.mark.parametrize("detach_norm", [True, False])
def test_dense_equals_float64_reference(detach_norm):
    provider, model, variables, x = adapted_mlp(detach_norm, One)
    p = variables["params"]["fc"]
    w0, a, b, m, bias = (
        p[k] for k in ("kernel", "kernel_lora_a", "kernel_lora_b", "kernel_dora_magnitude", "bias")
    )
    s = ALPHA / RANK
    cotangent = np.random.default_rng(0).normal(size=(3, 5))
    trainable, frozen = train.partition(variables)
    grads = jax.grad(lambda t: jnp.sum(model.apply(train.combine(t, frozen), x) * cotangent))(
        trainable
    )["params"]["fc"]
    want_w = ref.merged_weight(w0, a, b, m, s)
    merged = dq.merge_params(provider, variables["params"])
    assert ref.relative_error(merged["fc"]["kernel"], want_w) <= TOL
    y = model.apply(variables, x)
    assert ref.relative_error(y, ref.linear_forward(x, want_w, bias)) <= TOL
    want = ref.adapter_gradients(
        w0, a, b, m, s, ref.weight_gradient(x, cotangent), detach_norm=detach_norm
    )
    assert ref.relative_error(grads["kernel_lora_a"], want["lora_a"]) <= TOL
    assert ref.relative_error(grads["kernel_lora_b"], want["lora_b"]) <= TOL
    assert ref.relative_error(grads["kernel_dora_magnitude"], want["magnitude"]) <= TOL


def test_peft_loads_the_export(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    _, model, variables, x = adapted_mlp()
    rule = dq.DoraRule(module_path="fc.*", rank=RANK, alpha=ALPHA)
    dora_jax.peft.save_pretrained(
        tmp_path, dq.to_dora_variables(variables["params"]), rule.config(["fc1", "fc2"])
    )

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(4, 6), torch.nn.Linear(6, 5)

        def forward(self, v):
            return self.fc2(torch.tanh(self.fc1(v)))

    net = Net()
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            p = variables["params"][name]
            getattr(net, name).weight.copy_(torch.from_numpy(np.array(p["kernel"]).T))
            getattr(net, name).bias.copy_(torch.from_numpy(np.array(p["bias"])))
    peft_model = peft.PeftModel.from_pretrained(net, tmp_path)
    with torch.no_grad():
        got = peft_model(torch.from_numpy(np.array(x))).numpy()
    assert ref.relative_error(got, model.apply(variables, x)) <= TOL


def test_conv_equals_wrap():
    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3), name="conv")(x)

    provider = dq.DoraProvider(
        module_path="conv", rank=RANK, alpha=ALPHA, lora_b_initializer=random_b()
    )
    model = qwix.apply_lora_to_model(ConvNet(), provider)
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
    variables = model.init(jax.random.key(0), x)
    assert variables["params"]["conv"]["kernel_dora_magnitude"].shape == (4,)
    wrapped = dora_jax.linen.wrap(
        ConvNet(), dora_jax.DoRAConfig(targets=["conv"], rank=RANK, alpha=ALPHA)
    )
    got, want = (
        model.apply(variables, x),
        wrapped.apply(dq.to_dora_variables(variables["params"]), x),
    )
    assert ref.relative_error(got, want) <= TOL
    merged = dq.merge_params(provider, variables["params"])
    assert ref.relative_error(ConvNet().apply({"params": merged}, x), got) <= TOL
