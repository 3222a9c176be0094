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

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from flax import nnx

import dora_jax
from dora_jax import train
from dora_jax.checkpoint import AdapterCheckpoints

qwix = pytest.importorskip("qwix")
dq = pytest.importorskip("dora_jax.qwix")

# qwix 0.1.8 reads flax's removed ``nnx.VariableState`` alias when it unboxes parameters
# and calls the deprecated ``Module.iter_modules`` method and ``Variable.value``.
pytestmark = [
    pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The 'm.iter_modules\\(\\)' method is deprecated"),
    pytest.mark.filterwarnings("ignore:'.value' access is now deprecated"),
]

TOL = 1e-5
RANK, ALPHA = 2, 4.0


def random_b(std=0.3):
    return jax.nn.initializers.normal(std)


def merged_params(provider, params):
    """``dq.merge_params``, compiled as one program (faster than op by op)."""
    return jax.jit(functools.partial(dq.merge_params, provider))(params)


@functools.partial(jax.jit, static_argnums=2)
def perturb(tree, key, std=0.1):
    """Every adapter leaf moved by noise."""
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
    variables = jax.jit(model.init)(jax.random.key(0), x)
    trainable, frozen = train.partition(variables)
    trainable = perturb(trainable, jax.random.key(2))
    return provider, model, train.combine(trainable, frozen), x


def test_dense_equals_wrap():
    _, model, variables, x = adapted_mlp()
    cotangent = jax.random.normal(jax.random.key(3), (3, 5))
    trainable, frozen = train.partition(variables)
    assert set(trainable["params"]["fc1"]) == {
        "kernel_lora_a",
        "kernel_lora_b",
        "kernel_dora_magnitude",
    }
    assert set(frozen["params"]["fc1"]) == {"kernel", "bias"}
    config = dora_jax.DoRAConfig(targets=["fc1", "fc2"], rank=RANK, alpha=ALPHA)
    wrapped = dora_jax.linen.wrap(Mlp(), config)
    wvars = dq.to_dora_variables(variables["params"])

    @jax.jit
    def outputs_and_grads(trainable, dora):
        def ours(t):
            y = model.apply(train.combine(t, frozen), x)
            return jnp.sum(y * cotangent), y

        def theirs(d):
            y = wrapped.apply({**wvars, "dora": d}, x)
            return jnp.sum(y * cotangent), y

        (_, y), grads = jax.value_and_grad(ours, has_aux=True)(trainable)
        (_, wy), wgrads = jax.value_and_grad(theirs, has_aux=True)(dora)
        return y, wy, grads["params"], wgrads

    y, wy, grads, wgrads = outputs_and_grads(trainable, wvars["dora"])
    assert ref.relative_error(y, wy) <= TOL
    for layer in ("fc1", "fc2"):
        for ours, theirs in (
            ("lora_a", "lora_a"),
            ("lora_b", "lora_b"),
            ("dora_magnitude", "magnitude"),
        ):
            got = grads[layer][f"kernel_{ours}"]
            assert ref.relative_error(got, wgrads[layer][theirs]) <= TOL, (layer, ours)


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

    def loss(t):
        y = model.apply(train.combine(t, frozen), x)
        return jnp.sum(y * cotangent), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    grads = grads["params"]["fc"]
    want_w = ref.merged_weight(w0, a, b, m, s)
    merged = merged_params(provider, variables["params"])
    assert ref.relative_error(merged["fc"]["kernel"], want_w) <= TOL
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
    assert ref.relative_error(got, jax.jit(model.apply)(variables, x)) <= TOL


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
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert variables["params"]["conv"]["kernel_dora_magnitude"].shape == (4,)
    wrapped = dora_jax.linen.wrap(
        ConvNet(), dora_jax.DoRAConfig(targets=["conv"], rank=RANK, alpha=ALPHA)
    )
    got, want = (
        jax.jit(model.apply)(variables, x),
        jax.jit(wrapped.apply)(dq.to_dora_variables(variables["params"]), x),
    )
    assert ref.relative_error(got, want) <= TOL
    merged = merged_params(provider, variables["params"])
    assert ref.relative_error(jax.jit(ConvNet().apply)({"params": merged}, x), got) <= TOL


# ------------------------------------------------------- a gemma-style decoder block
# Written the way Google's gemma library writes its layers: its own Einsum module holding
# one weight "w" used by jnp.einsum, attention weights with a heads axis.

D, HEADS, HEAD_DIM, HIDDEN = 8, 2, 4, 16
EQUATIONS = {  # weight: (shape, equation, contracted axes, remaining axes)
    "q_einsum": ((HEADS, D, HEAD_DIM), "BTD,NDH->BTNH", (1,), (0, 2)),
    "kv_einsum": ((2, HEADS, D, HEAD_DIM), "BSD,CKDH->CBSKH", (2,), (0, 1, 3)),
    "attn_vec_einsum": ((HEADS, HEAD_DIM, D), "BTNH,NHD->BTD", (0, 1), (2,)),
    "gating_einsum": ((2, D, HIDDEN), "...D,CDF->...CF", (1,), (0, 2)),
    "linear": ((HIDDEN, D), "...F,FD->...D", (0,), (1,)),
}
TARGETS = ".*(einsum|linear)"


def block(einsum, x):
    """The decoder block, given ``einsum(name, x)`` applying the named weight."""
    q = einsum("q_einsum", x)
    kv = einsum("kv_einsum", x)
    logits = jnp.einsum("BTNH,BSNH->BTNS", q, kv[0]) / np.sqrt(HEAD_DIM)
    x = x + einsum("attn_vec_einsum", jnp.einsum("BTNS,BSNH->BTNH", jax.nn.softmax(logits), kv[1]))
    gate = einsum("gating_einsum", x)
    return x + einsum("linear", jax.nn.gelu(gate[..., 0, :]) * gate[..., 1, :])


class LinenEinsum(nn.Module):
    shape: tuple

    @nn.compact
    def __call__(self, equation, x):
        w = self.param("w", nn.initializers.normal(0.3), self.shape)
        return jnp.einsum(equation, x, w)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = {k: LinenEinsum(v[0], name=k) for k, v in EQUATIONS.items()}
        return block(lambda name, v: layers[name](EQUATIONS[name][1], v), x)


class NnxEinsum(nnx.Module):
    def __init__(self, shape, rngs):
        self.w = nnx.Param(0.3 * jax.random.normal(rngs.params(), shape))

    def __call__(self, equation, x):
        return jnp.einsum(equation, x, self.w[...])


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        for name, (shape, *_) in EQUATIONS.items():
            setattr(self, name, NnxEinsum(shape, rngs))

    def __call__(self, x):
        return block(lambda name, v: getattr(self, name)(EQUATIONS[name][1], v), x)


def expected_merged(weight, a, b, m, contracted, remaining):
    """W' in float64 from qwix's stored einsum adapters (no batch axes): the norm over
    the contracted axes of the weight, one magnitude per element of the remaining ones."""
    v = ref.f64(weight) + (ALPHA / RANK) * ref.lora_delta_any_layout(
        a, b, (), contracted, remaining
    )
    norm = np.sqrt(np.sum(v * v, axis=contracted, keepdims=True))
    return ref.f64(m).reshape(norm.shape) * v / norm


def gemma_model(framework, provider, x):
    """``(adapted, base output, trainable, frozen, forward, merge)`` for one framework."""
    if framework == "linen":
        base_params = jax.jit(LinenBlock().init)(jax.random.key(0), x)["params"]
        model = qwix.apply_lora_to_model(LinenBlock(), provider)
        variables = jax.jit(model.init)(jax.random.key(0), x)
        variables["params"] = jax.tree.map(lambda v: v, variables["params"])
        for name in EQUATIONS:
            variables["params"][name]["w"] = base_params[name]["w"]
        trainable, frozen = train.partition(variables)
        forward = train.linen_forward(model, inputs=lambda batch: (batch["x"],))

        def merge(trainable, frozen):
            merged = merged_params(provider, train.combine(trainable, frozen)["params"])
            return merged, jax.jit(LinenBlock().apply)({"params": merged}, x)

        return (
            jax.jit(LinenBlock().apply)({"params": base_params}, x),
            trainable,
            frozen,
            forward,
            merge,
        )
    base = NnxBlock(nnx.Rngs(0))
    base_out = base(x)
    model = qwix.apply_lora_to_model(base, provider, x, rngs=nnx.Rngs(1))
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    forward = train.nnx_forward(graphdef, inputs=lambda batch: (batch["x"],))

    def merge(trainable, frozen):
        plain = dq.merge_model(provider, nnx.merge(graphdef, trainable, frozen))
        assert type(plain) is NnxBlock
        merged = {name: {"w": getattr(plain, name).w[...]} for name in EQUATIONS}
        return merged, plain(x)

    return base_out, trainable, frozen, forward, merge


def pure(tree):
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree["params"]


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_gemma_style_block(framework, tmp_path):
    x = jax.random.normal(jax.random.key(1), (2, 3, D))
    provider = dq.DoraProvider(module_path=TARGETS, rank=RANK, alpha=ALPHA)
    base_out, trainable, frozen, forward, merge = gemma_model(framework, provider, x)
    forward = jax.jit(forward)
    batch = {"x": x, "y": jax.random.normal(jax.random.key(2), x.shape)}
    rng = jax.random.key(0)
    out0 = forward(trainable, frozen, batch, rng)
    assert ref.relative_error(out0, base_out) <= TOL

    def loss_fn(out, batch):
        return jnp.mean((out - batch["y"]) ** 2)

    optimizer = optax.adam(0.05)
    state = train.init_state(trainable, optimizer)
    step = jax.jit(train.make_train_step(forward, loss_fn, optimizer))
    state, metrics = step(state, frozen, batch)
    out1 = forward(state.trainable, frozen, batch, rng)
    assert ref.relative_error(out1, out0) > 1e-3
    # Adam's first update is lr * g / (|g| + eps): a magnitude moves where its gradient
    # is nonzero, and only there.
    before, after = pure(trainable), pure(state.trainable)
    assert set(after) == set(EQUATIONS)
    for name, (shape, _, _, remaining) in EQUATIONS.items():
        moved = np.abs(after[name]["w_dora_magnitude"] - before[name]["w_dora_magnitude"])
        assert moved.shape == (int(np.prod([shape[i] for i in remaining])),)
        assert np.all(moved > 0.01), name

    if framework == "linen":  # adapter-only checkpoints: the adapters restored exactly
        with AdapterCheckpoints(tmp_path, base=frozen) as checkpoints:
            checkpoints.save(state, force=True)
            restored = checkpoints.restore(train.init_state(trainable, optimizer))
        for got, want in zip(
            jax.tree.leaves(restored.trainable), jax.tree.leaves(state.trainable), strict=True
        ):
            np.testing.assert_array_equal(got, want)

    merged, merged_out = merge(state.trainable, frozen)
    assert ref.relative_error(merged_out, out1) <= TOL
    adapters, base = pure(state.trainable), pure(frozen)
    for name, (_, _, contracted, remaining) in EQUATIONS.items():
        a, b, m = (adapters[name][f"w_{k}"] for k in ("lora_a", "lora_b", "dora_magnitude"))
        want = expected_merged(base[name]["w"], a, b, m, contracted, remaining)
        assert ref.relative_error(merged[name]["w"], want) <= TOL, name


@pytest.mark.parametrize(
    "equation, shape, batch, contracted, remaining",
    [
        ("BND,NDH->BNH", (2, 5, 3), (0,), (1,), (2,)),
        ("BTNH,NHD->BTD", (2, 3, 5), (), (0, 1), (2,)),
    ],
)
def test_einsum_equals_float64_reference(equation, shape, batch, contracted, remaining):
    lhs = equation.split(",")[0]
    sizes = {c: n for c, n in zip(equation.split(",")[1].split("-")[0], shape, strict=True)}
    x = jax.random.normal(jax.random.key(1), [sizes.get(c, 4) for c in lhs])

    class One(nn.Module):
        @nn.compact
        def __call__(self, v):
            return LinenEinsum(shape, name="e")(equation, v)

    provider = dq.DoraProvider(
        module_path="e", rank=RANK, alpha=ALPHA, lora_b_initializer=random_b()
    )
    model = qwix.apply_lora_to_model(One(), provider)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    trainable, frozen = train.partition(variables)
    variables = train.combine(perturb(trainable, jax.random.key(3)), frozen)
    p = variables["params"]["e"]
    w, a, b, m = (p[k] for k in ("w", "w_lora_a", "w_lora_b", "w_dora_magnitude"))
    # qwix's A holds the batch and contracted axes in the weight's order, B no batch axes.
    kept = [i for i in range(len(shape)) if i not in remaining]
    a_c = np.transpose(ref.f64(a), [kept.index(i) for i in (*batch, *contracted)] + [len(kept)])
    b_c = np.broadcast_to(ref.f64(b), (*[shape[i] for i in batch], *b.shape))
    v = ref.f64(w) + (ALPHA / RANK) * ref.lora_delta_any_layout(
        a_c, b_c, batch, contracted, remaining
    )
    norm = np.sqrt(np.sum(v * v, axis=contracted, keepdims=True))
    want_w = ref.f64(m).reshape(norm.shape) * v / norm
    assert (
        ref.relative_error(
            jax.jit(model.apply)(variables, x), np.einsum(equation, ref.f64(x), want_w)
        )
        <= TOL
    )
    merged = merged_params(provider, variables["params"])
    assert ref.relative_error(merged["e"]["w"], want_w) <= TOL
    assert m.shape == (*[shape[i] for i in batch], int(np.prod([shape[i] for i in remaining])))


# ----------------------------------------------------------------------- QDoRA


class Wide(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(256, name="dense")(x)
        y = LinenEinsum((4, 256, 64), name="einsum")("BTD,NDH->BTNH", h)
        return nn.Dense(8, name="head")(y)  # quantised, not adapted


@pytest.mark.parametrize(
    "qtype, tile_size, limit", [("int8", None, 0.27), ("int4", None, 0.16), ("nf4", 64, 0.16)]
)
def test_quantised_base(qtype, tile_size, limit):
    x = jax.random.normal(jax.random.key(1), (2, 3, 256))
    rule = dict(
        module_path="dense|einsum", rank=RANK, alpha=ALPHA, lora_b_initializer=random_b(0.05)
    )
    quantise = dict(weight_qtype=qtype, tile_size=tile_size)
    head = qwix.QuantizationRule(module_path="head", **quantise)
    provider = dq.DoraProvider([dq.DoraRule(**rule, **quantise), head])
    model = qwix.apply_lora_to_model(Wide(), provider)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    trainable, frozen = train.partition(variables)
    float_base = jax.eval_shape(Wide().init, jax.random.key(0), x)["params"]  # shapes suffice
    ratio = dq.weight_bytes(frozen) / dq.weight_bytes(float_base)
    assert ratio <= limit, ratio
    stored = frozen["params"]["dense"]["kernel"].array.qvalue
    assert jnp.dtype(stored.dtype).itemsize == 1 and stored.dtype != jnp.float32

    # The magnitude starts at the dequantised weight's norm: the model starts equal to
    # the quantised base.
    dequantised = dq.dequantize_params(frozen["params"])
    for name, weight in (("dense", "kernel"), ("einsum", "w")):
        w = ref.f64(dequantised[name][weight])
        axis = 0 if name == "dense" else 1
        b = ref.f64(trainable["params"][name][weight + "_lora_b"])
        if not np.any(b):
            want = np.sqrt(np.sum(w * w, axis=axis)).reshape(-1)
            got = trainable["params"][name][weight + "_dora_magnitude"]
            assert ref.relative_error(got, want) <= TOL

    # The same adapters on the dequantised float weights give the same outputs.
    variables = train.combine(perturb(trainable, jax.random.key(3), 0.05), frozen)
    float_model = qwix.apply_lora_to_model(Wide(), dq.DoraProvider(**rule))
    assert frozen["params"]["head"]["kernel"].array.qvalue.dtype == stored.dtype
    float_vars = {
        "params": train.combine(train.partition(variables)[0], {"params": dequantised})["params"]
    }
    adapted = jax.jit(model.apply)(variables, x)
    assert ref.relative_error(adapted, jax.jit(float_model.apply)(float_vars, x)) <= TOL

    # Merging gives float weights for the plain model, or re-quantised ones on request.
    merged = merged_params(provider, variables["params"])
    assert merged["dense"]["kernel"].dtype == jnp.float32
    assert ref.relative_error(jax.jit(Wide().apply)({"params": merged}, x), adapted) <= TOL
    if qtype != "nf4":  # re-quantising: once, on the tiled NF4 base
        return
    requantised = dq.merge_params(provider, variables["params"], requantize=True)
    qvalue = requantised["dense"]["kernel"].array.qvalue
    assert qvalue.dtype == stored.dtype and "kernel_lora_a" not in requantised["dense"]
    rules = [qwix.QuantizationRule(module_path="dense|einsum|head", **quantise)]
    quantised_plain = qwix.quantize_model(Wide(), qwix.PtqProvider(rules))
    got = jax.jit(quantised_plain.apply)({"params": requantised}, x)
    assert ref.relative_error(got, adapted) <= 0.2  # the error of a second rounding


# ----------------------------------------------------------------------- errors


def test_refusals():
    with pytest.raises(ValueError, match="act_qtype='int8' is not supported"):
        dq.DoraRule(module_path=".*", rank=2, alpha=2.0, act_qtype="int8")
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        dq.DoraRule(module_path=".*", rank=0, alpha=2.0)

    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, v):
            return nn.Conv(4, (3, 3), name="conv")(v)

    x = jnp.ones((1, 5, 5, 3))
    quantised = dq.DoraProvider(module_path="conv", rank=2, alpha=2.0, weight_qtype="int8")
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="conv/kernel: DoRA on a quantised convolution"):
        jax.eval_shape(qwix.apply_lora_to_model(ConvNet(), quantised).init, key, x)
    # Shapes are all these refusals need (eval_shape: nothing is computed).
    dense = qwix.apply_lora_to_model(One(), dq.DoraProvider(module_path="fc", rank=2, alpha=2.0))
    shapes = jax.eval_shape(dense.init, key, jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="no record of the weight 'fc/kernel'"):
        dq.merge_params(dq.DoraProvider(module_path="fc", rank=2, alpha=2.0), shapes["params"])
    einsum_model = qwix.apply_lora_to_model(
        LinenBlock(), dq.DoraProvider(module_path=TARGETS, rank=2, alpha=2.0)
    )
    einsum_vars = jax.eval_shape(einsum_model.init, key, jnp.ones((2, 3, D)))
    with pytest.raises(
        ValueError, match="'attn_vec_einsum/w' .weight .2, 4, 8.*not a Dense or Conv"
    ):
        dq.to_dora_variables(einsum_vars["params"])
