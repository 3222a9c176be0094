"""Numerical parity of the Linen DoRA layers with HuggingFace PEFT (``use_dora=True``).

PEFT is the reference users compare against (docs/design.md section 2). For every case of
the shared catalogue that PEFT has a layer for (``conftest.PEFT_CASES``: ``nn.Linear``,
``nn.Conv2d`` with SAME, VALID, uneven and strided padding, ``nn.Embedding``), the case's
torch twin is wrapped by PEFT and the very same weights are copied into the case's Linen
layer (Flax <-> PEFT conventions: transposed kernels and factors, NHWC against NCHW);
then, in float32 on CPU, with and without bias and over several ranks, alphas, rsLoRA and
PEFT's initialisations:

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

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CASES, PEFT_CASES, make_inputs

import dora_jax
from dora_jax import ops

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

RTOL = 1e-5
ADAPTER = "default"
# torch pads an even kernel's "same" convolution through a padded copy, and says so.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


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
    return torch.from_numpy(np.array(x, np.float32))  # a writable copy


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


@dataclasses.dataclass
class ParityCase:
    """A catalogue case wrapped by PEFT and its Linen DoRA layer, with inputs and a
    cotangent in both layouts (torch: NCHW for convolutions; Flax: NHWC)."""

    kind: str  # PEFT's: "linear", "conv" or "embed"
    peft_model: torch.nn.Module
    layer: torch.nn.Module  # PEFT's DoRA layer
    module: nn.Module  # the Linen DoRA layer
    x: np.ndarray  # Flax layout
    cotangent: np.ndarray  # Flax layout
    rng: np.random.Generator

    def torch_input(self, x=None) -> torch.Tensor:
        x = self.x if x is None else x
        if self.kind == "embed":
            return torch.from_numpy(np.array(x, np.int64))
        return from_numpy(to_torch_layout(self.kind, x))


def to_torch_layout(kind: str, x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 3, 1, 2)) if kind == "conv" else x  # NHWC -> NCHW


def to_flax_layout(kind: str, x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 3, 1)) if kind == "conv" else x  # NCHW -> NHWC


def make_case(
    case_name, seed, *, bias=True, r, alpha, rslora=False, dropout=0.0, init=True, randomize=True
) -> ParityCase:
    """A seeded torch twin with random weights, wrapped by PEFT (adapters randomized unless
    ``randomize`` is false), and the catalogue's Linen layer with the same options."""
    case = CASES[case_name]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    base = case.torch_twin(bias)
    set_base_weights(base, rng)
    options = dict(rank=r, alpha=alpha, rslora=rslora)
    if dropout:
        options["dropout"] = dropout
    peft_model, layer = wrap_with_peft(
        base,
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        lora_dropout=dropout,
        init_lora_weights=init,
    )
    if randomize:
        randomize_adapters(layer, rng, b_std=0.5)
    module = case.make(**options, **({"use_bias": bias} if case.use_bias else {}))
    x = np.asarray(make_inputs(case, rng))
    cotangent = rng.normal(size=case.out_shape(x.shape)).astype(np.float32)
    return ParityCase(case.peft_kind, peft_model, layer, module, x, cotangent, rng)


def cache_from_layer(module, variables, x) -> dict:
    """The variables with the ``dora_cache`` collection the library makes on request."""
    return dora_jax.linen.cache_base_norms(module, variables, x)


def check_merge(case, peft_model, variables, r, alpha, rslora) -> None:
    """``merge_and_unload`` against ``ops.merge`` (in Flax orientation)."""
    scale = ops.scaling(r, alpha, rslora)
    expected_bias = variables["params"].get("bias")
    dora = variables["dora"]
    kernel = variables["params"][case.param]
    merged = ops.merge(
        kernel, dora["lora_a"], dora["lora_b"], dora["magnitude"], scale, case.layout
    )
    with torch.no_grad():
        unloaded = peft_model.merge_and_unload().layer
    assert type(unloaded) in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)
    want = kernel_to_flax(case.peft_kind, to_numpy(unloaded.weight))
    assert_matches(merged, want, f"{case.name} merged weight")
    assert_nontrivial(merged, kernel)
    if expected_bias is not None:
        np.testing.assert_array_equal(to_numpy(unloaded.bias), expected_bias)


def assert_nontrivial(y_adapted, y_base) -> None:
    """Guard against a vacuous comparison: DoRA must change the base layer's output."""
    diff = np.max(np.abs(np.asarray(y_adapted) - np.asarray(y_base)))
    assert diff > 0.1 * np.max(np.abs(np.asarray(y_base)))


# --------------------------------------------------------------------------- tests

HYPERPARAMETERS = pytest.mark.parametrize(
    "r, alpha, rslora, init",
    [(4, 8.0, False, True), (4, 8.0, True, "gaussian"), (3, 5.0, False, False)],
    ids=["r4", "r4-rslora", "r3-noinit"],
)


def _layer_configs():
    """(case, bias, jit, cached): each case with and without bias (where it has one), eager
    without the norm cache and jitted with it; the Linear case in every combination."""
    for name in PEFT_CASES:
        modes = [(False, False), (True, True)]
        if CASES[name].peft_kind == "linear":
            modes += [(False, True), (True, False)]
        for bias in (True, False) if CASES[name].use_bias else (False,):
            for jit, cached in modes:
                mode = f"{'jit' if jit else 'eager'}-{'cache' if cached else 'nocache'}"
                yield pytest.param(name, bias, jit, cached, id=f"{name}-bias{int(bias)}-{mode}")


@pytest.mark.parametrize("case_name, bias, jit, cached", list(_layer_configs()))
@HYPERPARAMETERS
def test_layer_matches_peft(case_name, bias, jit, cached, r, alpha, rslora, init):
    c = make_case(case_name, 0, bias=bias, r=r, alpha=alpha, rslora=rslora, init=init)
    c.peft_model.eval()
    variables = flax_variables(c.kind, c.layer)
    x = jnp.asarray(c.x)
    if cached:
        variables = cache_from_layer(c.module, variables, x)
        assert set(variables) == {"params", "dora", "dora_cache"}

    y_t, x_grad_t = torch_output_and_grads(
        c.layer, c.torch_input(), from_numpy(to_torch_layout(c.kind, c.cotangent))
    )
    y, grads, x_grad = flax_output_and_grads(c.module.apply, variables, x, c.cotangent, jit=jit)

    assert_matches(y, to_flax_layout(c.kind, to_numpy(y_t)), f"{case_name} output")
    base_y = to_numpy(c.layer.get_base_layer()(c.torch_input()))
    assert_nontrivial(y, to_flax_layout(c.kind, base_y))
    for name, expected in torch_adapter_grads(c.kind, c.layer).items():
        assert_matches(grads[name], expected, f"{case_name} grad {name}")
    if x_grad is not None:
        want = to_flax_layout(c.kind, to_numpy(x_grad_t))
        assert_matches(x_grad, want, f"{case_name} grad input")
    check_merge(CASES[case_name], c.peft_model, variables, r, alpha, rslora)


@pytest.mark.parametrize("case_name", [n for n in PEFT_CASES if CASES[n].peft_kind != "embed"])
def test_dropout_training_matches_peft(case_name):
    """One keep-mask injected into both PEFT's and the Linen layer's adapter dropout."""
    rate, r, alpha = 0.3, 3, 6.0
    c = make_case(case_name, 3, r=r, alpha=alpha, dropout=rate)
    assert isinstance(c.layer.lora_dropout[ADAPTER], torch.nn.Dropout)
    flax_mask = (c.rng.random(size=c.x.shape) >= rate).astype(np.float32)
    variables = flax_variables(c.kind, c.layer)
    x, to_flax = jnp.asarray(c.x), functools.partial(to_flax_layout, c.kind)
    torch_cotangent = from_numpy(to_torch_layout(c.kind, c.cotangent))

    # Eval mode: dropout off on both sides.
    c.peft_model.eval()
    with torch.no_grad():
        y_eval_t = to_numpy(c.layer(c.torch_input()))
    y_eval = c.module.apply(variables, x, deterministic=True)
    assert_matches(y_eval, to_flax(y_eval_t), f"{case_name} eval output with dropout configured")

    # Training mode, the same mask on both sides.
    torch_mask = to_torch_layout(c.kind, flax_mask)
    c.layer.lora_dropout[ADAPTER] = FixedMaskDropout(torch_mask, rate)
    c.peft_model.train()
    y_t, x_grad_t = torch_output_and_grads(c.layer, c.torch_input(), torch_cotangent)

    def train_apply(variables, x):
        with nn.intercept_methods(fixed_mask_dropout(flax_mask, rate)):
            return c.module.apply(
                variables, x, deterministic=False, rngs={"dropout": jax.random.key(0)}
            )

    y, grads, x_grad = flax_output_and_grads(train_apply, variables, x, c.cotangent)

    assert_matches(y, to_flax(to_numpy(y_t)), f"{case_name} training output")
    assert_nontrivial(y, y_eval)  # the mask matters
    for name, expected in torch_adapter_grads(c.kind, c.layer).items():
        assert_matches(grads[name], expected, f"{case_name} training grad {name}")
    assert_matches(x_grad, to_flax(to_numpy(x_grad_t)), f"{case_name} training grad input")


@pytest.mark.parametrize("case_name", PEFT_CASES)
def test_magnitude_init_matches_peft(case_name):
    """With ``init_lora_weights=False`` PEFT's factors start nonzero and its magnitude is
    ``||W0 + s*A@B||_c`` of them, not ``||W0||_c``."""
    r, alpha = 3, 6.0
    case = CASES[case_name]
    c = make_case(case_name, 4, r=r, alpha=alpha, init=False, randomize=False)
    variables = flax_variables(c.kind, c.layer)
    dora = variables["dora"]
    peft_magnitude = np.asarray(dora["magnitude"])
    kernel = variables["params"][case.param]
    base_norm = np.asarray(ops.column_norm(kernel, case.layout))
    assert not np.allclose(peft_magnitude, base_norm, rtol=1e-3)  # B really is nonzero

    scale = ops.scaling(r, alpha, False)
    from_ops = ops.init_magnitude(kernel, dora["lora_a"], dora["lora_b"], scale, case.layout)
    assert_matches(from_ops, peft_magnitude, f"{case_name} ops.init_magnitude")

    stale = {**variables, "dora": {**dora, "magnitude": jnp.ones_like(dora["magnitude"])}}
    recomputed = dora_jax.recompute_magnitudes(c.module, stale, jnp.asarray(c.x))
    assert_matches(
        recomputed["dora"]["magnitude"], peft_magnitude, f"{case_name} recompute_magnitudes"
    )
    np.testing.assert_array_equal(recomputed["dora"]["lora_a"], dora["lora_a"])
    np.testing.assert_array_equal(recomputed["dora"]["lora_b"], dora["lora_b"])
