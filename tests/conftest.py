"""The catalogue of layer cases shared by the test suites.

Each :class:`LayerCase` is one layer configuration (kind, shapes, options) with its Linen
DoRA layer, the plain Flax Linen layer, its NNX DoRA layer, how the float64 reference
(``tests/reference.py``) sees it and, where PEFT has the layer, its PyTorch twin. The
suites run over :data:`CASES`: the float64 reference of each front end
(``test_reference.py`` for Linen, ``test_nnx_reference.py`` for NNX), Linen against NNX
(``test_linen_nnx.py``) and PEFT parity over :data:`PEFT_CASES` (``test_peft_parity.py``).
The helpers below make random weights and the reference's results for a case.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import reference as ref
from flax import nnx

import dora_jax
from dora_jax import nnx as dora_nnx
from dora_jax import ops

F32_TOL = 1e-5
BF16_TOL = 2e-2
TOLERANCE = {"float32": F32_TOL, "bfloat16": BF16_TOL}
DTYPE_KWARGS = {
    "float32": {},
    "bfloat16": {"param_dtype": jnp.bfloat16, "dtype": jnp.bfloat16},
}
RANK, ALPHA = 3, 4.0


@dataclasses.dataclass(frozen=True)
class LayerCase:
    """One layer configuration and how the reference sees it.

    ``design`` turns the input into the reference's ``(N, fan_in)`` matrix and
    ``out_shape`` gives the output shape, both computed without the library.
    """

    name: str
    make: Callable[..., nn.Module]  # (**kwargs) -> Linen DoRA layer
    make_base: Callable[[], nn.Module]  # the plain Flax Linen layer
    make_nnx: Callable[..., nnx.Module]  # (rngs, **kwargs) -> NNX DoRA layer
    layout: ops.Layout
    x_shape: tuple[int, ...]
    design: Callable[[np.ndarray], np.ndarray]
    out_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    in_shape: tuple[int, ...]  # the kernel's input block (reduced by the norm)
    features: tuple[int, ...]  # the kernel's output block (one magnitude each)
    scale: float = ALPHA / RANK
    vocab: int | None = None  # integer inputs in [0, vocab) for embeddings
    param: str = "kernel"
    use_bias: bool = True
    # PEFT's layer kind ("linear", "conv", "embed") and its torch twin, ``(bias) -> module``
    # with this case's shapes and options; None where PEFT has no such layer.
    peft_kind: str | None = None
    torch_twin: Callable[[bool], object] | None = None


def _hyper(kw: dict, **case_options) -> dict:
    """The catalogue's rank and alpha, the case's own options, then the caller's."""
    return {"rank": RANK, "alpha": ALPHA, **case_options, **kw}


def _torch():
    import torch  # optional: only the PEFT parity suite builds torch twins

    return torch


def _conv_case(name, kernel_size, padding, strides=(1, 1), torch_padding=None) -> LayerCase:
    """A 4 -> 5 channel 2-d convolution; ``torch_padding`` is its twin's ``padding``."""
    return LayerCase(
        name=name,
        make=lambda **kw: dora_jax.DoRAConv(
            5, kernel_size=kernel_size, strides=strides, padding=padding, **_hyper(kw)
        ),
        make_base=lambda: nn.Conv(5, kernel_size=kernel_size, strides=strides, padding=padding),
        make_nnx=lambda rngs, **kw: dora_nnx.DoRAConv(
            4, 5, kernel_size, strides=strides, padding=padding, rngs=rngs, **_hyper(kw)
        ),
        layout=ops.conv_layout(2),
        x_shape=(2, 6, 5, 4),
        in_shape=(*kernel_size, 4),
        features=(5,),
        design=lambda x: ref.conv2d_design(x, kernel_size, padding, strides),
        out_shape=lambda s: ref.conv2d_output_shape(s, kernel_size, padding, 5, strides),
        peft_kind="conv",
        torch_twin=lambda bias: _torch().nn.Conv2d(
            4, 5, kernel_size, stride=strides, padding=torch_padding, bias=bias
        ),
    )


CASES = {
    c.name: c
    for c in [
        LayerCase(
            name="dense",
            make=lambda **kw: dora_jax.DoRADense(6, **_hyper(kw)),
            make_base=lambda: nn.Dense(6),
            make_nnx=lambda rngs, **kw: dora_nnx.DoRALinear(5, 6, rngs=rngs, **_hyper(kw)),
            layout=ops.dense_layout(),
            x_shape=(2, 3, 5),
            in_shape=(5,),
            features=(6,),
            design=lambda x: ref.dense_design(x, 1),
            out_shape=lambda s: (*s[:-1], 6),
            peft_kind="linear",
            torch_twin=lambda bias: _torch().nn.Linear(5, 6, bias=bias),
        ),
        LayerCase(
            name="dense_rslora",
            make=lambda **kw: dora_jax.DoRADense(6, **_hyper(kw, rslora=True)),
            make_base=lambda: nn.Dense(6),
            make_nnx=lambda rngs, **kw: dora_nnx.DoRALinear(
                5, 6, rngs=rngs, **_hyper(kw, rslora=True)
            ),
            layout=ops.dense_layout(),
            x_shape=(4, 5),
            in_shape=(5,),
            features=(6,),
            design=lambda x: ref.dense_design(x, 1),
            out_shape=lambda s: (*s[:-1], 6),
            scale=ALPHA / math.sqrt(RANK),
        ),
        LayerCase(
            name="dense_general",
            make=lambda **kw: dora_jax.DoRADenseGeneral(
                features=(3, 4), axis=(-2, -1), **_hyper(kw)
            ),
            make_base=lambda: nn.DenseGeneral(features=(3, 4), axis=(-2, -1)),
            make_nnx=lambda rngs, **kw: dora_nnx.DoRALinearGeneral(
                (4, 5), (3, 4), axis=(-2, -1), rngs=rngs, **_hyper(kw)
            ),
            layout=ops.dense_general_layout(0, 2, 2),
            x_shape=(3, 4, 5),
            in_shape=(4, 5),
            features=(3, 4),
            design=lambda x: ref.dense_design(x, 2),
            out_shape=lambda s: (*s[:-2], 3, 4),
        ),
        LayerCase(
            name="einsum",
            make=lambda **kw: dora_jax.DoRAEinsum(
                shape=(5, 3, 4), einsum_str="btd,dhk->bthk", **_hyper(kw)
            ),
            make_base=lambda: nn.Einsum(shape=(5, 3, 4), einsum_str="btd,dhk->bthk"),
            make_nnx=lambda rngs, **kw: dora_nnx.DoRAEinsum(
                "btd,dhk->bthk", (5, 3, 4), (3, 4), rngs=rngs, **_hyper(kw)
            ),
            layout=ops.einsum_layout("btd,dhk->bthk"),
            x_shape=(2, 3, 5),
            in_shape=(5,),
            features=(3, 4),
            design=lambda x: ref.dense_design(x, 1),
            out_shape=lambda s: (*s[:-1], 3, 4),
        ),
        _conv_case("conv_same_3x3", (3, 3), "SAME", torch_padding=1),
        _conv_case("conv_valid_3x3", (3, 3), "VALID", torch_padding=0),
        _conv_case("conv_same_2x3", (2, 3), "SAME", torch_padding="same"),
        # Flax's "SAME" pads differently from torch's symmetric padding at stride 2.
        _conv_case("conv_stride2_3x3", (3, 3), ((1, 1), (1, 1)), (2, 2), torch_padding=1),
        LayerCase(
            name="embed",
            make=lambda **kw: dora_jax.DoRAEmbed(11, 6, **_hyper(kw)),
            make_base=lambda: nn.Embed(11, 6),
            make_nnx=lambda rngs, **kw: dora_nnx.DoRAEmbed(11, 6, rngs=rngs, **_hyper(kw)),
            layout=ops.dense_layout(),
            x_shape=(3, 7),
            in_shape=(11,),
            features=(6,),
            design=lambda ids: ref.embed_design(ids, 11),
            out_shape=lambda s: (*s, 6),
            vocab=11,
            param="embedding",
            use_bias=False,
            peft_kind="embed",
            torch_twin=lambda bias: _torch().nn.Embedding(11, 6),
        ),
    ]
}
BASE_CASES = [n for n in CASES if n != "dense_rslora"]
PEFT_CASES = [n for n, c in CASES.items() if c.torch_twin is not None]


# ----------------------------------------------------------------------------- helpers


def make_inputs(case: LayerCase, rng: np.random.Generator, dtype: str = "float32"):
    if case.vocab is not None:
        ids = rng.integers(0, case.vocab, size=case.x_shape)
        ids.flat[: case.vocab] = np.arange(case.vocab)[: ids.size]  # touch every row
        return jnp.asarray(ids, jnp.int32)
    x = jnp.asarray(rng.standard_normal(case.x_shape), jnp.float32)
    # Round to the compute dtype so the reference sees exactly what the layer computes on.
    return x.astype(jnp.bfloat16).astype(jnp.float32) if dtype == "bfloat16" else x


def fans(case: LayerCase) -> tuple[int, int]:
    return math.prod(case.in_shape), math.prod(case.features)


def flat_adapters(case: LayerCase, params, dora):
    """Kernel, A, B, m, bias flattened to the reference's matrices (float64)."""
    kernel = params[case.param]
    fan_in, fan_out = fans(case)
    w0 = ref.f64(kernel).reshape(fan_in, fan_out)
    a = ref.f64(dora["lora_a"]).reshape(fan_in, -1)
    b = ref.f64(dora["lora_b"]).reshape(-1, fan_out)
    m = ref.f64(dora["magnitude"]).reshape(fan_out)
    bias = ref.f64(params["bias"]) if "bias" in params else None
    return w0, a, b, m, bias


def random_variables(
    case: LayerCase, dtype: str = "float32", seed: int = 0, zero_column: int | None = None
):
    """A model, inputs and variables with random base weights and trained-looking adapters.

    ``A`` and ``B`` are dense random (``s*A@B`` about half of ``W0`` per column) and the
    magnitude is the reference norm times a factor in [0.6, 1.4]. With ``zero_column`` the
    kernel and ``B`` are zero for that output feature (flat index), so its norm is 0.
    No ``"dora_cache"`` is returned (the layer recomputes ``||W0||``).
    """
    rng = np.random.default_rng(seed)
    model = case.make(**DTYPE_KWARGS[dtype])
    x = make_inputs(case, rng, dtype)
    param_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    fan_in, fan_out = fans(case)
    w0 = rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)
    a = rng.standard_normal((fan_in, RANK)) / math.sqrt(fan_in)
    b = rng.standard_normal((RANK, fan_out)) * 0.5 / (math.sqrt(RANK) * case.scale)
    if zero_column is not None:
        w0[:, zero_column] = 0.0
        b[:, zero_column] = 0.0
    params = {case.param: jnp.asarray(w0.reshape(*case.in_shape, *case.features), param_dtype)}
    if case.use_bias:
        params["bias"] = jnp.asarray(rng.standard_normal(case.features), param_dtype)
    w0_rounded = ref.f64(params[case.param]).reshape(fan_in, fan_out)
    m = ref.column_norm(ref.direction(w0_rounded, a, b, case.scale))
    m *= rng.uniform(0.6, 1.4, size=fan_out)
    if zero_column is not None:
        m[zero_column] = 0.8
    dora = {
        "lora_a": jnp.asarray(a.reshape(*case.in_shape, RANK), jnp.float32),
        "lora_b": jnp.asarray(b.reshape(RANK, *case.features), jnp.float32),
        "magnitude": jnp.asarray(m.reshape(case.features), jnp.float32),
    }
    return model, x, {"params": params, "dora": dora}


def reference_results(case, variables, x, cotangent, *, detach_norm: bool, eps: float = 0.0):
    """The same quantities from the float64 NumPy reference, in the library's shapes."""
    params, dora = variables["params"], variables["dora"]
    w0, a, b, m, bias = flat_adapters(case, params, dora)
    design = case.design(np.asarray(x))
    w_merged = ref.merged_weight(w0, a, b, m, case.scale, eps)
    y = ref.linear_forward(design, w_merged, bias).reshape(case.out_shape(x.shape))
    grad_w = ref.weight_gradient(design, cotangent)
    grads = ref.adapter_gradients(w0, a, b, m, case.scale, grad_w, detach_norm=detach_norm, eps=eps)
    return {
        "y": y,
        "merged": w_merged.reshape(params[case.param].shape),
        "grads": {k: v.reshape(dora[k].shape) for k, v in grads.items()},
    }


def make_cotangent(case: LayerCase, x, seed: int = 1) -> np.ndarray:
    shape = case.out_shape(tuple(x.shape))
    return np.asarray(np.random.default_rng(seed).standard_normal(shape), np.float32)


ARCH_RANK = 2  # the default rank of the architecture configs in test_wrap / test_surgery_nnx


def lora_size(fan_in: int, fan_out: int, out: int, rank: int = ARCH_RANK) -> int:
    """Trainable size of one adapted layer: ``A``, ``B`` and the magnitude."""
    return rank * (fan_in + fan_out) + out


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """``examples/<name>.py`` as the module ``name`` (``examples/`` is not a package),
    loaded once: dataclasses (Flax modules among them) look their module up in
    ``sys.modules``."""
    file = EXAMPLES / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is None or Path(getattr(loaded, "__file__", "")).resolve() != file:
        spec = importlib.util.spec_from_file_location(name, file)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        spec.loader.exec_module(loaded)
    return loaded
