"""Each Flax Linen layer's parameters, created exactly as Flax does, then the adapted
forward: one function per kind (``dense_call``, ``conv_call``, ...), shared by the DoRA
layers and by wrapped models."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dora_jax import ops
from dora_jax.adapters import (
    Adapters,
    as_tuple,
    dense_general_output_shape,
    normalize_axes,
)
from dora_jax.linen.maps import einsum_maps, kernel_map, rank_map
from dora_jax.linen.variables import BoundAdapter, describe

Array = jax.Array


def kernel_param(module: nn.Module, init, shape, name: str = "kernel") -> Array:
    """``module.param(name, ...)``, refusing a non-float kernel before initialising it."""
    if not module.has_variable("params", name):
        ops.check_kernel(jax.ShapeDtypeStruct(tuple(shape), module.param_dtype), describe(module))
    return module.param(name, init, tuple(shape), module.param_dtype)


def _bias_param(module: nn.Module, init, shape) -> Array | None:
    """The layer's ``bias`` exactly as Flax creates it, or ``None`` without one."""
    return module.param("bias", init, tuple(shape), module.param_dtype) if module.use_bias else None


def _add_bias(y: Array, bias: Array | None, to_output=lambda v: v) -> Array:
    return y if bias is None else y + to_output(bias).astype(y.dtype)


def dense_call(module: nn.Dense, inputs: Array, adapter: BoundAdapter) -> Array:
    kernel = kernel_param(module, module.kernel_init, (jnp.shape(inputs)[-1], module.features))
    bias = _bias_param(module, module.bias_init, (module.features,))
    y = adapter(
        inputs,
        kernel,
        ops.dense_layout(),
        kernel_map(nn.Dense, module, 1),
        rank_map(module),
        # A custom product (say, quantised) sees x alone, never x stacked with A^T, and
        # is never replaced by ops' own product.
        dense_like=module.dot_general is None
        and module.dot_general_cls is None
        and module.promote_dtype is nn.Dense.promote_dtype,
    )
    return _add_bias(y, bias)


def dense_general_call(module: nn.DenseGeneral, inputs: Array, adapter: BoundAdapter) -> Array:
    features = as_tuple(module.features)
    axis = normalize_axes(as_tuple(module.axis), inputs.ndim)
    batch_dims = normalize_axes(as_tuple(module.batch_dims), inputs.ndim)
    if batch_dims and batch_dims != tuple(range(len(batch_dims))):
        raise ValueError(
            f"{describe(module)}: batch_dims {batch_dims} must be consecutive leading "
            f"dimensions starting from 0."
        )
    n_batch, n_in, n_out = len(batch_dims), len(axis), len(features)
    batch_shape = tuple(inputs.shape[ax] for ax in batch_dims)
    in_shape = tuple(inputs.shape[ax] for ax in axis)
    kernel = kernel_param(
        module,
        _flat_init(module.kernel_init, n_batch, n_in, n_out),
        batch_shape + in_shape + features,
    )
    bias = _bias_param(
        module, _flat_init(module.bias_init, n_batch, 0, n_out), batch_shape + features
    )
    # (*batch, *out) values -> broadcastable against the output (*batch, *other, *out).
    shape = dense_general_output_shape(inputs.shape, axis, batch_dims, features)
    to_output = lambda v: jnp.reshape(v, shape)  # noqa: E731
    y = adapter(
        inputs,
        kernel,
        ops.dense_general_layout(n_batch, n_in, n_out),
        kernel_map(nn.DenseGeneral, module, n_batch + n_in),
        rank_map(module, n_batch),
        to_output,
    )
    return _add_bias(y, bias, to_output)


def conv_call(module: nn.Conv, inputs: Array, adapter: BoundAdapter) -> Array:
    kernel_size = (
        (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
    )
    if module.feature_group_count != 1 or module.mask is not None:
        raise ValueError(
            f"{describe(module)}: DoRA supports convolutions with feature_group_count=1 and "
            f"no mask; got feature_group_count={module.feature_group_count}, "
            f"mask={'set' if module.mask is not None else None}."
        )
    kernel_shape = (*kernel_size, jnp.shape(inputs)[-1], module.features)
    kernel = kernel_param(module, module.kernel_init, kernel_shape)
    bias = _bias_param(module, module.bias_init, (module.features,))
    y = adapter(
        inputs,
        kernel,
        ops.conv_layout(len(kernel_size)),
        kernel_map(nn.Conv, module, len(kernel_size) + 1),
        rank_map(module),
    )
    return _add_bias(y, bias)


def einsum_call(
    module: nn.Einsum, inputs: Array, einsum_str: str | None, adapter: BoundAdapter
) -> Array:
    equation = nn.merge_param("einsum_str", module.einsum_str, einsum_str).replace(" ", "")
    kernel = kernel_param(module, module.kernel_init, module.shape)
    try:
        maps = einsum_maps(equation, kernel.shape, module)
    except ValueError as error:
        raise ValueError(f"{describe(module)}: {error}") from None
    bias = _bias_param(module, module.bias_init, maps.bias_shape)
    y = adapter(
        inputs,
        kernel,
        maps.layout,
        maps.apply_kernel,
        maps.apply_lora_b,
        maps.to_output,
        apply_lora_a=maps.apply_lora_a,
    )
    return y if bias is None else y + jnp.reshape(bias, maps.bias_broadcast).astype(y.dtype)


def embed_call(module: nn.Embed, inputs: Array, adapter: BoundAdapter, adapters) -> Array:
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
        raise ValueError(f"{describe(module)}: input type must be an integer; got {inputs.dtype}.")
    lookup = kernel_map(
        nn.Embed, module, 1, param="embedding", num_embeddings=module.num_embeddings
    )
    # PEFT applies no dropout to embeddings.
    adapter = dataclasses.replace(adapter, dropout=lambda x: None, kernel_name="embedding")
    return adapter(
        inputs, module.embedding, ops.dense_layout(), lookup, rank_map(module), adapters=adapters
    )


def embed_attend(
    module: nn.Embed, query: Array, adapter: BoundAdapter, adapters: Adapters
) -> Array:
    lora_a, lora_b, magnitude, base_norm_sq, norm = adapters
    settings = adapter.settings
    return ops.embed_attend(
        query,
        module.embedding,
        lora_a,
        lora_b,
        magnitude,
        settings.scale,
        detach_norm=settings.detach_norm,
        base_norm_sq=base_norm_sq,
        norm=norm,
        eps=settings.eps,
    )


def _flat_init(init, n_batch: int, n_in: int, n_out: int):
    """Initialise a DenseGeneral parameter as Flax does: on its flattened 2-d view."""

    def wrapped(key, shape, dtype=jnp.float32):
        batch = int(np.prod(shape[:n_batch]))
        fan_in = int(np.prod(shape[n_batch : n_batch + n_in]))
        fan_out = int(np.prod(shape[len(shape) - n_out :]))
        flat = (batch * fan_in, fan_out) if n_in else (batch * fan_out,)
        return jnp.reshape(init(key, flat, dtype), shape)

    return wrapped
