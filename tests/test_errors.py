"""Bad configurations and bad variables raise a ValueError naming the layer and the shapes.

What is checked, for DoRADense, DoRADenseGeneral (2 input and 2 output axes), DoRAConv
and DoRAEmbed: a rank below 1 or above ``min(fan_in, fan_out)`` (or not an integer), an
integer kernel (``param_dtype=jnp.int32``), and adapters passed to ``apply`` whose
``lora_a``, ``lora_b``, ``magnitude`` (or cached ``base_norm_sq``) shapes do not fit the
kernel. Each message must contain the layer's class name (and its path when nested),
the kernel shape and the offending shape or value. Errors are raised while tracing, so
the adapter checks run both eagerly and under ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import dora_jax


@dataclasses.dataclass(frozen=True)
class Spec:
    """A layer, an input for it, and the shapes its variables must have."""

    name: str
    make: Callable[..., nn.Module]  # (rank=..., **kwargs) -> layer
    x: Callable[[], jax.Array]
    kernel_shape: tuple[int, ...]
    lora_a_shape: Callable[[int], tuple[int, ...]]
    lora_b_shape: Callable[[int], tuple[int, ...]]
    magnitude_shape: tuple[int, ...]
    max_rank: int  # min(fan_in, fan_out)
    zero_init: dict  # initializer override that also works for integer dtypes


ZEROS = nn.initializers.zeros_init()
SPECS = {
    s.name: s
    for s in [
        Spec(
            name="DoRADense",
            make=lambda **kw: dora_jax.DoRADense(4, **kw),
            x=lambda: jnp.ones((2, 3)),
            kernel_shape=(3, 4),
            lora_a_shape=lambda r: (3, r),
            lora_b_shape=lambda r: (r, 4),
            magnitude_shape=(4,),
            max_rank=3,
            zero_init={"kernel_init": ZEROS},
        ),
        Spec(
            name="DoRADenseGeneral",
            make=lambda **kw: dora_jax.DoRADenseGeneral((3, 2), axis=(-2, -1), **kw),
            x=lambda: jnp.ones((2, 2, 5)),
            kernel_shape=(2, 5, 3, 2),
            lora_a_shape=lambda r: (2, 5, r),
            lora_b_shape=lambda r: (r, 3, 2),
            magnitude_shape=(3, 2),
            max_rank=6,
            zero_init={"kernel_init": ZEROS},
        ),
        Spec(
            name="DoRAConv",
            make=lambda **kw: dora_jax.DoRAConv(4, kernel_size=(3, 3), **kw),
            x=lambda: jnp.ones((1, 5, 5, 2)),
            kernel_shape=(3, 3, 2, 4),
            lora_a_shape=lambda r: (3, 3, 2, r),
            lora_b_shape=lambda r: (r, 4),
            magnitude_shape=(4,),
            max_rank=4,
            zero_init={"kernel_init": ZEROS},
        ),
        Spec(
            name="DoRAEmbed",
            make=lambda **kw: dora_jax.DoRAEmbed(10, 4, **kw),
            x=lambda: jnp.zeros((2, 3), jnp.int32),
            kernel_shape=(10, 4),
            lora_a_shape=lambda r: (10, r),
            lora_b_shape=lambda r: (r, 4),
            magnitude_shape=(4,),
            max_rank=4,
            zero_init={"embedding_init": ZEROS},
        ),
    ]
}
spec_param = pytest.mark.parametrize("spec_name", list(SPECS))
jit_param = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def shape_text(shape) -> str:
    return re.escape(str(tuple(shape)))


# ------------------------------------------------------------------------------ rank


@spec_param
@pytest.mark.parametrize("bad", ["zero", "negative", "above_max", "not_integer"])
def test_bad_rank_names_layer_kernel_and_allowed_range(spec_name, bad):
    spec = SPECS[spec_name]
    rank = {"zero": 0, "negative": -1, "above_max": spec.max_rank + 1, "not_integer": 1.5}[bad]
    layer = spec.make(rank=rank)
    pattern = (
        rf"^{spec.name}\b.*rank.*\[1, {spec.max_rank}\].*kernel {shape_text(spec.kernel_shape)}"
        rf".*got {re.escape(repr(rank))}"
    )
    with pytest.raises(ValueError, match=pattern):
        layer.init(jax.random.key(0), spec.x())


@spec_param
def test_largest_rank_is_accepted(spec_name):
    spec = SPECS[spec_name]
    variables = spec.make(rank=spec.max_rank).init(jax.random.key(0), spec.x())
    assert variables["dora"]["lora_a"].shape == spec.lora_a_shape(spec.max_rank)


def test_nested_layer_error_names_its_path():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return dora_jax.DoRADense(4, rank=9, name="proj")(x)

    with pytest.raises(ValueError, match=r"^DoRADense 'proj'.*kernel \(3, 4\).*got 9"):
        Model().init(jax.random.key(0), jnp.ones((2, 3)))


# --------------------------------------------------------------------- integer kernels


@spec_param
def test_integer_kernel_from_param_dtype_names_layer_and_shape(spec_name):
    """``param_dtype=jnp.int32`` with an initializer that can make integers."""
    spec = SPECS[spec_name]
    layer = spec.make(rank=2, param_dtype=jnp.int32, **spec.zero_init)
    pattern = rf"^{spec.name}\b.*floating.*int32.*{shape_text(spec.kernel_shape)}"
    with pytest.raises(ValueError, match=pattern):
        layer.init(jax.random.key(0), spec.x())


@spec_param
def test_integer_param_dtype_with_default_init_names_layer_and_shape(spec_name):
    spec = SPECS[spec_name]
    layer = spec.make(rank=2, param_dtype=jnp.int32)
    pattern = rf"{spec.name}.*int32.*{shape_text(spec.kernel_shape)}"
    with pytest.raises(ValueError, match=pattern):
        layer.init(jax.random.key(0), spec.x())


@spec_param
@jit_param
def test_integer_kernel_passed_to_apply_names_layer_and_shape(spec_name, jit):
    spec = SPECS[spec_name]
    layer = spec.make(rank=2)
    variables = layer.init(jax.random.key(0), spec.x())
    params = {
        k: v.astype(jnp.int32) if v.ndim == len(spec.kernel_shape) else v
        for k, v in variables["params"].items()
    }
    apply = jax.jit(layer.apply) if jit else layer.apply
    pattern = rf"^{spec.name}\b.*floating.*int32.*{shape_text(spec.kernel_shape)}"
    with pytest.raises(ValueError, match=pattern):
        apply({"params": params, "dora": variables["dora"]}, spec.x())


# ------------------------------------------------------------------- adapter shapes


def wrong_shape(spec: Spec, leaf: str) -> tuple[int, ...]:
    rank = 2
    return {
        "lora_a": (*spec.lora_a_shape(rank)[:-2], spec.lora_a_shape(rank)[-2] + 1, rank),
        "lora_b": (*spec.lora_b_shape(rank)[:-1], spec.lora_b_shape(rank)[-1] + 1),
        "magnitude": (*spec.magnitude_shape[:-1], spec.magnitude_shape[-1] + 1),
    }[leaf]


@spec_param
@pytest.mark.parametrize("leaf", ["lora_a", "lora_b", "magnitude"])
@jit_param
def test_adapter_that_does_not_fit_kernel_names_layer_and_shapes(spec_name, leaf, jit):
    spec = SPECS[spec_name]
    layer = spec.make(rank=2)
    variables = layer.init(jax.random.key(0), spec.x())
    bad = wrong_shape(spec, leaf)
    dora = {**variables["dora"], leaf: jnp.ones(bad)}
    apply = jax.jit(layer.apply) if jit else layer.apply
    pattern = (
        rf"^{spec.name}\b.*adapters do not fit kernel {shape_text(spec.kernel_shape)}"
        rf".*expected.*{leaf} {shape_text(variables['dora'][leaf].shape)}"
        rf".*got.*{leaf} {shape_text(bad)}"
    )
    with pytest.raises(ValueError, match=pattern):
        apply({"params": variables["params"], "dora": dora}, spec.x())


@spec_param
@jit_param
def test_adapters_of_another_rank_name_layer_and_shapes(spec_name, jit):
    """``lora_a`` and ``lora_b`` consistent with each other, but not with ``rank=2``."""
    spec = SPECS[spec_name]
    layer = spec.make(rank=2)
    variables = layer.init(jax.random.key(0), spec.x())
    a_shape, b_shape = spec.lora_a_shape(1), spec.lora_b_shape(1)
    dora = {**variables["dora"], "lora_a": jnp.ones(a_shape), "lora_b": jnp.ones(b_shape)}
    apply = jax.jit(layer.apply) if jit else layer.apply
    pattern = (
        rf"^{spec.name}\b.*rank.*2.*lora_a {shape_text(a_shape)}.*lora_b {shape_text(b_shape)}"
    )
    with pytest.raises(ValueError, match=pattern):
        apply({"params": variables["params"], "dora": dora}, spec.x())


@spec_param
def test_cached_norm_of_wrong_shape_names_layer_and_shapes(spec_name):
    spec = SPECS[spec_name]
    layer = spec.make(rank=2)
    variables = layer.init(jax.random.key(0), spec.x())
    bad = wrong_shape(spec, "magnitude")
    variables = {**variables, "dora_cache": {"base_norm_sq": jnp.ones(bad)}}
    pattern = (
        rf"^{spec.name}\b.*base_norm_sq.*{shape_text(bad)}.*"
        rf"{shape_text(spec.magnitude_shape)}.*kernel {shape_text(spec.kernel_shape)}"
    )
    with pytest.raises(ValueError, match=pattern):
        layer.apply(variables, spec.x())
