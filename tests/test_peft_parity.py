"""Numerical parity of the Linen DoRA layers with HuggingFace PEFT (``use_dora=True``).

PEFT is the reference users compare against (docs/design.md section 2), so for ``nn.Linear``,
``nn.Conv2d`` and ``nn.Embedding`` wrapped by PEFT we copy the very same weights into
``DoRADense``, ``DoRAConv`` and ``DoRAEmbed`` (Flax <-> PEFT conventions: transposed
kernels and factors, NHWC against NCHW) and compare, in float32 on CPU:

* the outputs, in eval mode and in training mode with one dropout mask injected on both
  sides (PEFT's ``x@W0 + bias + (g-1)*(xd@W0) + g*s*(xd@A)@B``);
* the gradients of ``lora_A``, ``lora_B``, ``lora_magnitude_vector`` (and of the input)
  of ``sum(y * cotangent)``, which pins down the detached norm (constant-C gradient);
* the merged weight of ``merge_and_unload()`` against ``ops.merge``;
* PEFT's magnitude initialisation from nonzero factors against ``ops.init_magnitude``
  and ``recompute_magnitudes``.

The factors are random and ``B != 0``, so ``g = m / ||W0 + s*A@B||_c`` is far from 1 and
a wrong norm axis, scaling or dropout placement cannot pass. Errors are relative to the
largest reference value: ``|actual - expected| <= RTOL * (|expected| + max|expected|)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from dora_jax import ops

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

RTOL = 1e-5
ADAPTER = "default"


# --------------------------------------------------------------------------- helpers


class Holder(torch.nn.Module):
    """A minimal torch model with one target module named ``layer``."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class FixedMaskDropout(torch.nn.Module):
    """Inverted dropout with a given keep-mask, standing in for PEFT's ``nn.Dropout``."""

    def __init__(self, mask: np.ndarray, rate: float):
        super().__init__()
        self.mask = torch.from_numpy(mask)
        self.rate = rate

    def forward(self, x):
        return x * self.mask / (1.0 - self.rate)


def fixed_mask_dropout(mask: np.ndarray, rate: float):
    """A Flax method interceptor that replaces every ``nn.Dropout`` by the given mask."""

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
            return args[0] * jnp.asarray(mask) / (1.0 - rate)
        return next_fun(*args, **kwargs)

    return interceptor


def wrap_with_peft(base: torch.nn.Module, **lora_kwargs):
    """``get_peft_model`` on a one-layer model; returns ``(peft_model, lora_layer)``."""
    config = peft.LoraConfig(target_modules=["layer"], use_dora=True, **lora_kwargs)
    peft_model = peft.get_peft_model(Holder(base), config)
    return peft_model, peft_model.base_model.model.layer


def adapter_tensors(layer) -> tuple:
    """PEFT's ``(lora_A, lora_B, magnitude)`` parameters of the default adapter."""
    if hasattr(layer, "lora_embedding_A") and ADAPTER in layer.lora_embedding_A:
        lora_a, lora_b = layer.lora_embedding_A[ADAPTER], layer.lora_embedding_B[ADAPTER]
    else:
        lora_a, lora_b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    return lora_a, lora_b, layer.lora_magnitude_vector[ADAPTER].weight


def randomize_adapters(layer, rng: np.random.Generator, b_std: float) -> None:
    """Random ``A`` and ``B`` (B nonzero) and a magnitude perturbed by ``1 + 0.1*randn``."""
    lora_a, lora_b, magnitude = adapter_tensors(layer)
    fan_in = lora_a[0].numel()
    with torch.no_grad():
        lora_a.copy_(from_numpy(rng.normal(size=lora_a.shape) / np.sqrt(fan_in)))
        lora_b.copy_(from_numpy(rng.normal(size=lora_b.shape) * b_std))
        magnitude.mul_(from_numpy(1.0 + 0.1 * rng.normal(size=magnitude.shape)))


def set_base_weights(base: torch.nn.Module, rng: np.random.Generator) -> None:
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(from_numpy(rng.normal(size=p.shape) * 0.5))


def from_numpy(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, np.float32))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def kernel_to_flax(kind: str, w: np.ndarray) -> np.ndarray:
    """A torch weight (or its gradient) in Flax orientation."""
    if kind == "linear":
        return w.T  # (out, in) -> (in, out)
    if kind == "conv":
        return w.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
    return w  # embedding (vocab, features) as is


def factors_to_flax(kind: str, lora_a, lora_b, magnitude) -> dict[str, np.ndarray]:
    """PEFT's ``(lora_A, lora_B, magnitude)`` (values or gradients) as the "dora" collection."""
    lora_a, lora_b, magnitude = (to_numpy(t) for t in (lora_a, lora_b, magnitude))
    if kind == "linear":
        a, b = lora_a.T, lora_b.T  # (r, in) -> (in, r); (out, r) -> (r, out)
    elif kind == "conv":
        a = lora_a.transpose(2, 3, 1, 0)  # (r, in, kh, kw) -> (kh, kw, in, r)
        b = lora_b[:, :, 0, 0].T  # 1x1 conv (out, r, 1, 1) -> (r, out)
    else:
        a, b = lora_a.T, lora_b.T  # (r, vocab) -> (vocab, r); (features, r) -> (r, features)
    return {"lora_a": a, "lora_b": b, "magnitude": magnitude.reshape(-1)}


def flax_variables(kind: str, layer) -> dict:
    """The PEFT layer's weights as Linen variables ``{"params": ..., "dora": ...}``."""
    base = layer.get_base_layer()
    weight = kernel_to_flax(kind, to_numpy(base.weight))
    params = {"embedding": weight} if kind == "embed" else {"kernel": weight}
    if getattr(base, "bias", None) is not None:
        params["bias"] = to_numpy(base.bias)
    dora = factors_to_flax(kind, *adapter_tensors(layer))
    return jax.tree.map(jnp.asarray, {"params": params, "dora": dora})


def torch_adapter_grads(kind: str, layer) -> dict[str, np.ndarray]:
    lora_a, lora_b, magnitude = adapter_tensors(layer)
    return factors_to_flax(kind, lora_a.grad, lora_b.grad, magnitude.grad)


def layout_of(kind: str) -> ops.Layout:
    return ops.conv_layout(2) if kind == "conv" else ops.dense_layout()


def assert_matches(actual, expected, what: str) -> None:
    """``|actual - expected| <= RTOL * (|expected| + max|expected|)``, elementwise."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * scale, err_msg=what)


def flax_output_and_grads(apply_fn, variables, x, cotangent, *, jit=False):
    """``y = apply_fn(variables, x)`` and the gradients of ``sum(y * cotangent)`` w.r.t.
    the "dora" collection (and ``x`` when it is a float array)."""
    wrt_input = jnp.issubdtype(x.dtype, jnp.floating)

    def loss(dora, x):
        y = apply_fn({**variables, "dora": dora}, x)
        return jnp.sum(y * cotangent), y

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1) if wrt_input else 0, has_aux=True)
    if jit:
        grad_fn = jax.jit(grad_fn)
    (_, y), grads = grad_fn(variables["dora"], x)
    if not wrt_input:
        grads = (grads, None)
    return y, grads[0], grads[1]


def torch_output_and_grads(layer, x: torch.Tensor, cotangent: torch.Tensor):
    """PEFT's ``y`` and the gradients of ``sum(y * cotangent)`` (adapters and float ``x``)."""
    layer.zero_grad(set_to_none=True)
    if x.is_floating_point():
        x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * cotangent).sum().backward()
    return y, x.grad


# --------------------------------------------------------------------------- cases


LINEAR = dict(in_features=12, out_features=10, batch=(3, 5))
CONV = dict(in_channels=3, out_channels=5, hw=(9, 8), batch=2)
EMBED = dict(vocab=11, features=7, batch=(2, 6))


def peft_case(seed, make_base, *, randomize, **lora_kwargs):
    """``(rng, base, peft_model, lora_layer)``: a seeded torch layer with random weights,
    wrapped by PEFT, its adapters randomized unless ``randomize`` is false."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    base = make_base()
    set_base_weights(base, rng)
    peft_model, layer = wrap_with_peft(base, **lora_kwargs)
    if randomize:
        randomize_adapters(layer, rng, b_std=0.5)
    return rng, base, peft_model, layer


def make_linear_case(seed, *, bias, r, alpha, rslora=False, dropout=0.0, init=True, randomize=True):
    rng, _, peft_model, layer = peft_case(
        seed,
        lambda: torch.nn.Linear(LINEAR["in_features"], LINEAR["out_features"], bias=bias),
        randomize=randomize,
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        lora_dropout=dropout,
        init_lora_weights=init,
    )
    module = dora_jax.DoRADense(
        features=LINEAR["out_features"],
        use_bias=bias,
        rank=r,
        alpha=alpha,
        rslora=rslora,
        dropout=dropout,
    )
    x = rng.normal(size=(*LINEAR["batch"], LINEAR["in_features"])).astype(np.float32)
    cotangent = rng.normal(size=(*LINEAR["batch"], LINEAR["out_features"])).astype(np.float32)
    return peft_model, layer, module, x, cotangent, rng


def make_conv_case(
    seed, *, stride, r, alpha, rslora=False, dropout=0.0, init=True, bias=True, randomize=True
):
    rng, base, peft_model, layer = peft_case(
        seed,
        lambda: torch.nn.Conv2d(
            CONV["in_channels"], CONV["out_channels"], 3, stride=stride, padding=1, bias=bias
        ),
        randomize=randomize,
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        lora_dropout=dropout,
        init_lora_weights=init,
    )
    module = dora_jax.DoRAConv(
        features=CONV["out_channels"],
        kernel_size=(3, 3),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),  # torch's symmetric padding=1 (Flax "SAME" differs at stride 2)
        use_bias=bias,
        rank=r,
        alpha=alpha,
        rslora=rslora,
        dropout=dropout,
    )
    x_nchw = rng.normal(size=(CONV["batch"], CONV["in_channels"], *CONV["hw"])).astype(np.float32)
    with torch.no_grad():
        out_shape = tuple(base(from_numpy(x_nchw)).shape)
    cotangent_nchw = rng.normal(size=out_shape).astype(np.float32)
    return peft_model, layer, module, x_nchw, cotangent_nchw, rng


def make_embed_case(seed, *, r, alpha, rslora=False, init=True, randomize=True):
    rng, _, peft_model, layer = peft_case(
        seed,
        lambda: torch.nn.Embedding(EMBED["vocab"], EMBED["features"]),
        randomize=randomize,
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        init_lora_weights=init,
    )
    module = dora_jax.DoRAEmbed(
        num_embeddings=EMBED["vocab"],
        features=EMBED["features"],
        rank=r,
        alpha=alpha,
        rslora=rslora,
    )
    ids = rng.integers(0, EMBED["vocab"], size=EMBED["batch"])
    cotangent = rng.normal(size=(*EMBED["batch"], EMBED["features"])).astype(np.float32)
    return peft_model, layer, module, ids, cotangent, rng


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 3, 1))


def cache_from_layer(module, variables, x) -> dict:
    """The variables with the ``dora_cache`` collection the library makes on request."""
    return dora_jax.linen.cache_base_norms(module, variables, x)


def check_merge(kind, peft_model, layer, variables, r, alpha, rslora) -> None:
    """``merge_and_unload`` against ``ops.merge`` (in Flax orientation)."""
    scale = ops.scaling(r, alpha, rslora)
    base_key = "embedding" if kind == "embed" else "kernel"
    expected_bias = variables["params"].get("bias")
    dora = variables["dora"]
    merged = ops.merge(
        variables["params"][base_key],
        dora["lora_a"],
        dora["lora_b"],
        dora["magnitude"],
        scale,
        layout_of(kind),
    )
    with torch.no_grad():
        unloaded = peft_model.merge_and_unload().layer
    assert type(unloaded) in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)
    assert_matches(merged, kernel_to_flax(kind, to_numpy(unloaded.weight)), f"{kind} merged weight")
    assert_nontrivial(merged, variables["params"][base_key])
    if expected_bias is not None:
        np.testing.assert_array_equal(to_numpy(unloaded.bias), expected_bias)


def assert_nontrivial(y_adapted, y_base) -> None:
    """Guard against a vacuous comparison: DoRA must change the base layer's output."""
    diff = np.max(np.abs(np.asarray(y_adapted) - np.asarray(y_base)))
    assert diff > 0.1 * np.max(np.abs(np.asarray(y_base)))


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("cached", [False, True], ids=["nocache", "cache"])
@pytest.mark.parametrize(
    "r, alpha, rslora, init",
    [(4, 8.0, False, True), (4, 8.0, True, "gaussian"), (3, 5.0, False, False)],
    ids=["r4", "r4-rslora", "r3-noinit"],
)
def test_linear_matches_peft(bias, jit, cached, r, alpha, rslora, init):
    peft_model, layer, module, x, cotangent, _ = make_linear_case(
        0, bias=bias, r=r, alpha=alpha, rslora=rslora, init=init
    )
    peft_model.eval()
    variables = flax_variables("linear", layer)
    if cached:
        variables = cache_from_layer(module, variables, x)
        assert set(variables) == {"params", "dora", "dora_cache"}

    y_t, x_grad_t = torch_output_and_grads(layer, from_numpy(x), from_numpy(cotangent))
    y, grads, x_grad = flax_output_and_grads(module.apply, variables, x, cotangent, jit=jit)

    assert_matches(y, to_numpy(y_t), "linear output")
    assert_nontrivial(y, to_numpy(layer.get_base_layer()(from_numpy(x))))
    for name, expected in torch_adapter_grads("linear", layer).items():
        assert_matches(grads[name], expected, f"linear grad {name}")
    assert_matches(x_grad, to_numpy(x_grad_t), "linear grad input")
    check_merge("linear", peft_model, layer, variables, r, alpha, rslora)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv2d_matches_peft(stride, bias):
    r, alpha = 2, 6.0
    peft_model, layer, module, x_nchw, cot_nchw, _ = make_conv_case(
        1, stride=stride, r=r, alpha=alpha, bias=bias
    )
    peft_model.eval()
    variables = flax_variables("conv", layer)
    x, cotangent = nchw_to_nhwc(x_nchw), nchw_to_nhwc(cot_nchw)

    y_t, x_grad_t = torch_output_and_grads(layer, from_numpy(x_nchw), from_numpy(cot_nchw))
    y, grads, x_grad = flax_output_and_grads(module.apply, variables, x, cotangent)

    assert_matches(y, nchw_to_nhwc(to_numpy(y_t)), "conv output")
    base_y = nchw_to_nhwc(to_numpy(layer.get_base_layer()(from_numpy(x_nchw))))
    assert_nontrivial(y, base_y)
    for name, expected in torch_adapter_grads("conv", layer).items():
        assert_matches(grads[name], expected, f"conv grad {name}")
    assert_matches(x_grad, nchw_to_nhwc(to_numpy(x_grad_t)), "conv grad input")
    check_merge("conv", peft_model, layer, variables, r, alpha, False)


@pytest.mark.parametrize("rslora", [False, True], ids=["plain", "rslora"])
@pytest.mark.parametrize("cached", [False, True], ids=["nocache", "cache"])
def test_embedding_matches_peft(rslora, cached):
    r, alpha = 3, 4.0
    peft_model, layer, module, ids, cotangent, _ = make_embed_case(
        2, r=r, alpha=alpha, rslora=rslora
    )
    peft_model.eval()
    variables = flax_variables("embed", layer)
    ids_jax = jnp.asarray(ids, jnp.int32)
    if cached:
        variables = cache_from_layer(module, variables, ids_jax)

    y_t, _ = torch_output_and_grads(layer, torch.from_numpy(ids), from_numpy(cotangent))
    y, grads, _ = flax_output_and_grads(module.apply, variables, ids_jax, cotangent)

    assert_matches(y, to_numpy(y_t), "embedding output")
    assert_nontrivial(y, to_numpy(layer.get_base_layer()(torch.from_numpy(ids))))
    for name, expected in torch_adapter_grads("embed", layer).items():
        assert_matches(grads[name], expected, f"embedding grad {name}")
    check_merge("embed", peft_model, layer, variables, r, alpha, rslora)


@pytest.mark.parametrize("kind", ["linear", "conv-stride1", "conv-stride2"])
def test_dropout_training_matches_peft(kind):
    """One keep-mask injected into both PEFT's and the Linen layer's adapter dropout."""
    rate, r, alpha = 0.3, 3, 6.0
    if kind == "linear":
        peft_model, layer, module, x_t, cot_t, rng = make_linear_case(
            3, bias=True, r=r, alpha=alpha, dropout=rate
        )
        to_flax = lambda a: a  # noqa: E731
    else:
        stride = int(kind[-1])
        peft_model, layer, module, x_t, cot_t, rng = make_conv_case(
            3, stride=stride, r=r, alpha=alpha, dropout=rate
        )
        to_flax = nchw_to_nhwc
    assert isinstance(layer.lora_dropout[ADAPTER], torch.nn.Dropout)
    mask = (rng.random(size=x_t.shape) >= rate).astype(np.float32)
    variables = flax_variables(kind.split("-")[0], layer)
    x, cotangent, flax_mask = to_flax(x_t), to_flax(cot_t), to_flax(mask)

    # Eval mode: dropout off on both sides.
    peft_model.eval()
    with torch.no_grad():
        y_eval_t = to_numpy(layer(from_numpy(x_t)))
    y_eval = module.apply(variables, x, deterministic=True)
    assert_matches(y_eval, to_flax(y_eval_t), f"{kind} eval output with dropout configured")

    # Training mode, the same mask on both sides.
    layer.lora_dropout[ADAPTER] = FixedMaskDropout(mask, rate)
    peft_model.train()
    y_t, x_grad_t = torch_output_and_grads(layer, from_numpy(x_t), from_numpy(cot_t))

    def train_apply(variables, x):
        with nn.intercept_methods(fixed_mask_dropout(flax_mask, rate)):
            return module.apply(
                variables, x, deterministic=False, rngs={"dropout": jax.random.key(0)}
            )

    y, grads, x_grad = flax_output_and_grads(train_apply, variables, x, cotangent)

    assert_matches(y, to_flax(to_numpy(y_t)), f"{kind} training output")
    assert_nontrivial(y, y_eval)  # the mask matters
    for name, expected in torch_adapter_grads(kind.split("-")[0], layer).items():
        assert_matches(grads[name], expected, f"{kind} training grad {name}")
    assert_matches(x_grad, to_flax(to_numpy(x_grad_t)), f"{kind} training grad input")


@pytest.mark.parametrize("kind", ["linear", "conv", "embed"])
def test_magnitude_init_matches_peft(kind):
    """With ``init_lora_weights=False`` PEFT's factors start nonzero and its magnitude is
    ``||W0 + s*A@B||_c`` of them, not ``||W0||_c``."""
    r, alpha = 3, 6.0
    common = dict(r=r, alpha=alpha, init=False, randomize=False)
    if kind == "linear":
        _, layer, module, x, _, _ = make_linear_case(4, bias=True, **common)
    elif kind == "conv":
        _, layer, module, x, _, _ = make_conv_case(4, stride=1, **common)
        x = nchw_to_nhwc(x)
    else:
        _, layer, module, x, _, _ = make_embed_case(4, **common)
        x = jnp.asarray(x, jnp.int32)
    variables = flax_variables(kind, layer)
    dora = variables["dora"]
    peft_magnitude = np.asarray(dora["magnitude"])
    kernel = variables["params"]["embedding" if kind == "embed" else "kernel"]
    base_norm = np.asarray(ops.column_norm(kernel, layout_of(kind)))
    assert not np.allclose(peft_magnitude, base_norm, rtol=1e-3)  # B really is nonzero

    scale = ops.scaling(r, alpha, False)
    from_ops = ops.init_magnitude(kernel, dora["lora_a"], dora["lora_b"], scale, layout_of(kind))
    assert_matches(from_ops, peft_magnitude, f"{kind} ops.init_magnitude")

    stale = {**variables, "dora": {**dora, "magnitude": jnp.ones_like(dora["magnitude"])}}
    recomputed = dora_jax.recompute_magnitudes(module, stale, x)
    assert_matches(recomputed["dora"]["magnitude"], peft_magnitude, f"{kind} recompute_magnitudes")
    np.testing.assert_array_equal(recomputed["dora"]["lora_a"], dora["lora_a"])
    np.testing.assert_array_equal(recomputed["dora"]["lora_b"], dora["lora_b"])
