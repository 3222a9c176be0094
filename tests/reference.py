"""An independent float64 NumPy reference for DoRA, written from the paper's formulas.

Nothing here imports ``dora_jax``: the tests compare the library against these functions,
never against itself. Every linear layer is reduced to one matrix product

    y = X @ W' + bias          X: (N, fan_in) "design matrix", W': (fan_in, fan_out)

where ``X`` is the flattened input for Dense / DenseGeneral, the extracted patches for a
convolution, and the one-hot encoding of the ids for an embedding (``y = W'[ids]``). The
kernel, ``A`` and ``B`` are flattened the same way (``(fan_in, fan_out)``, ``(fan_in, r)``,
``(r, fan_out)``; C order, input axes before output axes).

DoRA (Liu et al., ICML 2024):

    V' = W0 + s * A @ B
    C  = ||V'||_c                       the L2 norm of each column (output feature),
                                        over every input axis; floored at ``eps``
    W' = m * V' / C

For the loss ``L = sum(y * cotangent)`` the gradient with respect to ``W'`` is
``G = X^T @ cotangent``, and

    detached norm (paper section 4.3):  grad_V' = (m / C) * G
    exact (projected):                  grad_V' = (m / C) * (G - V' * colsum(V' * G) / C^2)
                                                = (m / C) * (I - V'V'^T / C^2) G  per column
    grad_A = s * grad_V' @ B^T          grad_B = s * A^T @ grad_V'
    grad_m = colsum(V' * G) / C         (the same in both cases)

Relative error, as used by the tests: ``max|got - ref| / max|ref|`` over a whole array.
"""

from __future__ import annotations

import numpy as np


def f64(x) -> np.ndarray:
    """Any array (JAX, NumPy, bfloat16) as a float64 NumPy array."""
    return np.asarray(np.asarray(x).astype(np.float32) if _is_bf16(x) else x, dtype=np.float64)


def _is_bf16(x) -> bool:
    return getattr(getattr(x, "dtype", None), "name", "") == "bfloat16"


def relative_error(got, ref) -> float:
    """``max|got - ref| / max|ref|`` in float64 (``max|got - ref|`` if ``ref`` is all zero)."""
    got, ref = f64(got), f64(ref)
    if got.shape != ref.shape:
        raise AssertionError(f"shape mismatch: got {got.shape}, reference {ref.shape}")
    scale = np.max(np.abs(ref)) if ref.size else 0.0
    err = np.max(np.abs(got - ref)) if ref.size else 0.0
    return float(err / scale) if scale > 0 else float(err)


# --------------------------------------------------------------------------- the math


def direction(w0, a, b, scale: float) -> np.ndarray:
    """``V' = W0 + s * A @ B`` for flattened ``W0 (in, out)``, ``A (in, r)``, ``B (r, out)``."""
    return f64(w0) + scale * (f64(a) @ f64(b))


def column_norm(v, eps: float = 0.0) -> np.ndarray:
    """``max(||v[:, j]||_2, eps)`` for every column ``j`` of a flattened ``(in, out)`` kernel."""
    return np.maximum(np.sqrt(np.sum(f64(v) ** 2, axis=0)), eps)


def merged_weight(w0, a, b, m, scale: float, eps: float = 0.0) -> np.ndarray:
    """``W' = m * V' / ||V'||_c`` as a flattened ``(in, out)`` matrix."""
    v = direction(w0, a, b, scale)
    return f64(m).reshape(-1) * v / column_norm(v, eps)


def linear_forward(design, w_merged, bias=None) -> np.ndarray:
    """``X @ W' + bias`` with ``X (N, in)`` and ``W' (in, out)``: shape ``(N, out)``."""
    y = f64(design) @ f64(w_merged)
    return y if bias is None else y + f64(bias).reshape(-1)


def weight_gradient(design, cotangent) -> np.ndarray:
    """``G = dL/dW' = X^T @ cotangent`` for ``L = sum(y * cotangent)``, shape ``(in, out)``."""
    return f64(design).T @ f64(cotangent).reshape(f64(design).shape[0], -1)


def adapter_gradients(
    w0, a, b, m, scale: float, grad_w, *, detach_norm: bool, eps: float = 0.0
) -> dict[str, np.ndarray]:
    """Gradients of ``L`` with respect to ``A (in, r)``, ``B (r, out)`` and ``m (out,)``.

    ``grad_w`` is ``dL/dW'`` (flattened ``(in, out)``). ``detach_norm`` selects the paper's
    constant-C gradient; otherwise the exact projected gradient.
    """
    a, b, g = f64(a), f64(b), f64(grad_w)
    m = f64(m).reshape(-1)
    v = direction(w0, a, b, scale)
    c = column_norm(v, eps)
    v_dot_g = np.sum(v * g, axis=0)
    if detach_norm:
        grad_v = (m / c) * g
    else:
        grad_v = (m / c) * (g - v * v_dot_g / c**2)
    return {
        "lora_a": scale * grad_v @ b.T,
        "lora_b": scale * a.T @ grad_v,
        "magnitude": v_dot_g / c,
    }


# ------------------------------------------------------------------ design matrices


def dense_design(x, n_in_axes: int = 1) -> np.ndarray:
    """Dense / DenseGeneral over the last ``n_in_axes`` axes: ``x`` flattened to ``(N, in)``."""
    x = f64(x)
    fan_in = int(np.prod(x.shape[x.ndim - n_in_axes :]))
    return x.reshape(-1, fan_in)


def same_padding(kernel_size: int) -> tuple[int, int]:
    """``(low, high)`` padding of a stride-1 'SAME' convolution (XLA's convention)."""
    total = kernel_size - 1
    return total // 2, total - total // 2


def conv2d_padding(kernel_size: tuple[int, int], padding, strides=(1, 1)):
    """``((low, high), (low, high))`` for ``padding`` 'SAME' (stride 1 only), 'VALID' or
    explicit pairs."""
    if padding == "SAME":
        if tuple(strides) != (1, 1):
            raise ValueError("'SAME' is implemented for stride 1 only; give explicit pairs")
        return same_padding(kernel_size[0]), same_padding(kernel_size[1])
    if padding == "VALID":
        return (0, 0), (0, 0)
    return tuple(tuple(p) for p in padding)


def conv2d_design(x, kernel_size: tuple[int, int], padding, strides=(1, 1)) -> np.ndarray:
    """Patches of an NHWC input for a 2-d convolution (``padding`` as in
    :func:`conv2d_padding`).

    Returns ``(N * H_out * W_out, kh * kw * C_in)``, ordered like a ``(kh, kw, C_in, C_out)``
    kernel flattened to ``(kh * kw * C_in, C_out)``.
    """
    x = f64(x)
    kh, kw = kernel_size
    sh, sw = strides
    x = np.pad(x, ((0, 0), *conv2d_padding(kernel_size, padding, strides), (0, 0)))
    n, h, w, c = x.shape
    h_out, w_out = (h - kh) // sh + 1, (w - kw) // sw + 1
    patches = np.empty((n, h_out, w_out, kh, kw, c))
    for i in range(kh):
        for j in range(kw):
            patches[:, :, :, i, j, :] = x[
                :, i : i + sh * (h_out - 1) + 1 : sh, j : j + sw * (w_out - 1) + 1 : sw, :
            ]
    return patches.reshape(n * h_out * w_out, kh * kw * c)


def conv2d_output_shape(
    x_shape, kernel_size, padding, features: int, strides=(1, 1)
) -> tuple[int, ...]:
    n, h, w, _ = x_shape
    (top, bottom), (left, right) = conv2d_padding(kernel_size, padding, strides)
    h_out = (h + top + bottom - kernel_size[0]) // strides[0] + 1
    w_out = (w + left + right - kernel_size[1]) // strides[1] + 1
    return (n, h_out, w_out, features)


def embed_design(ids, vocab: int) -> np.ndarray:
    """One-hot ``(N, vocab)`` encoding of integer ids, so ``W'[ids] = X @ W'``."""
    ids = np.asarray(ids).reshape(-1)
    return np.eye(vocab)[ids]


# --------------------------------------------------------------- general layouts


def canonical_matrices(kernel, batch_axes, in_axes, out_axes) -> np.ndarray:
    """A kernel of any axis layout as a stack ``(batch, in, out)`` of float64 matrices."""
    kernel = f64(kernel)
    order = (*batch_axes, *in_axes, *out_axes)
    size = lambda axes: int(np.prod([kernel.shape[i] for i in axes]))  # noqa: E731
    return np.transpose(kernel, order).reshape(size(batch_axes), size(in_axes), size(out_axes))


def dora_norm_any_layout(kernel, lora_a, lora_b, scale, batch_axes, in_axes, out_axes):
    """``||W0 + s*A@B||_c`` for a kernel of any layout, materialised in float64.

    ``lora_a`` is ``(*batch, *in, r)`` and ``lora_b`` ``(*batch, r, *out)`` (canonical
    order); the result has the magnitude shape ``(*batch, *out)``.
    """
    w = canonical_matrices(kernel, batch_axes, in_axes, out_axes)
    nb, fan_in, fan_out = w.shape
    a = f64(lora_a).reshape(nb, fan_in, -1)
    b = f64(lora_b).reshape(nb, -1, fan_out)
    v = w + scale * np.einsum("bir,bro->bio", a, b)
    norm = np.sqrt(np.sum(v * v, axis=1))
    shape = np.shape(kernel)
    return norm.reshape(*[shape[i] for i in batch_axes], *[shape[i] for i in out_axes])


def lora_delta_any_layout(lora_a, lora_b, batch_axes, in_axes, out_axes) -> np.ndarray:
    """``A @ B`` as a float64 kernel in the layout's own axis order."""
    a, b = f64(lora_a), f64(lora_b)
    nb = len(batch_axes)
    batch, in_shape, out_shape = a.shape[:nb], a.shape[nb:-1], b.shape[nb + 1 :]
    rank = a.shape[-1]
    delta = np.einsum(
        "bir,bro->bio",
        a.reshape(int(np.prod(batch)), -1, rank),
        b.reshape(int(np.prod(batch)), rank, -1),
    ).reshape(*batch, *in_shape, *out_shape)
    order = (*batch_axes, *in_axes, *out_axes)
    return np.transpose(delta, np.argsort(order))
