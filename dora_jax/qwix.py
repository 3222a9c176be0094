"""DoRA for any Linen or NNX model, on a float or a quantised base, through qwix.

qwix (Google's JAX quantisation library) adds LoRA to a model by intercepting
``jax.lax.dot_general``, ``jnp.einsum`` and ``jax.lax.conv_general_dilated`` on
parameters, selected by a module-path regex, on a float or an int8 / int4 / NF4 frozen base
(QLoRA). :class:`DoraProvider` is its DoRA counterpart (QDoRA on a quantised base), used
exactly as qwix's ``LoraProvider``::

    model = qwix.apply_lora_to_model(model, DoraProvider([DoraRule(...)]), *inputs)

For a weight ``w`` it adds qwix's ``w_lora_a`` and ``w_lora_b`` (qwix's shapes) and a
magnitude ``w_dora_magnitude`` of shape ``(*batch axes, prod(remaining axes))`` of ``w`` in
the op, all in the ``"params"`` collection (Linen) or as ``nnx.LoRAParam`` (NNX), so code
written for qwix LoRA trains and saves DoRA unchanged. The norm is taken over each output
feature's weights (the contracting axes of the weight operand) with
:func:`dora_jax.ops.dora_norm`'s factored form and the constant-C gradient: no step forms
``W0 + s*A@B``. On a quantised base ``A^T W0`` goes through the same quantised product as
the base ``x @ W0`` and ``||W0||^2`` is read once per step from the stored quantised
values; the magnitude starts from the dequantised weight, so the adapted model starts equal
to the quantised base.

:func:`merge_params` (Linen) and :func:`merge_model` (NNX) fold the adapters into a float
model (Linen params can be re-quantised); :func:`to_dora_variables` gives the library's
Linen layout (``"params"`` + ``"dora"``) for :func:`dora_jax.peft.save_pretrained`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from flax import linen as nn
from flax import nnx
from qwix._src.core import einsum_info, qarray
from qwix._src.providers import lora as qwix_lora
from qwix._src.providers import ptq
from qwix._src.utils import flax_util

from dora_jax import adapters, ops
from dora_jax.config import DoRAConfig

Array = jax.Array

LORA_A, LORA_B, MAGNITUDE = "_lora_a", "_lora_b", "_dora_magnitude"
SUFFIXES = (LORA_A, LORA_B, MAGNITUDE)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoraRule(qwix.LoraRule):
    """qwix's ``LoraRule`` (``module_path``, ``op_names``, ``rank``, ``alpha``,
    ``dropout``, ``weight_qtype``, ``tile_size``, the initialisers, ...) plus DoRA's options.

    Attributes:
      use_dora: ``False`` gives qwix's plain LoRA on the matched ops.
      detach_norm: the paper's constant-C gradient (default, PEFT's) or the exact one.
      rslora: scaling ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
      eps: floor of the DoRA norm.
      adapter_dtype: dtype of ``lora_a``, ``lora_b`` and the magnitude; float32 by default
        (PEFT's convention on a bfloat16 base); ``None`` takes qwix's choice, the weight's
        dtype (the scale's on a quantised base).

    Activation quantisation (``act_qtype``) is refused: DoRA's norm needs ``A^T W0`` from
    the weight alone.
    """

    use_dora: bool = True
    detach_norm: bool = True
    rslora: bool = False
    eps: float = ops.DEFAULT_EPS
    adapter_dtype: Any = jnp.float32

    def __post_init__(self):
        where = f"DoraRule(module_path={self.module_path!r})"
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"{where}: rank must be an integer >= 1; got {self.rank!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{where}: dropout must be in [0, 1); got {self.dropout!r}.")
        if not self.eps >= 0.0:
            raise ValueError(f"{where}: eps must be >= 0; got {self.eps!r}.")
        if self.act_qtype is not None:
            raise ValueError(
                f"{where}: act_qtype={self.act_qtype!r} is not supported; DoRA quantises "
                f"weights only (weight_qtype)."
            )
        if self.adapter_dtype is not None and not jnp.issubdtype(
            jnp.dtype(self.adapter_dtype), jnp.floating
        ):
            raise ValueError(f"{where}: adapter_dtype must be floating; got {self.adapter_dtype}.")

    @property
    def scale(self) -> float:
        """The LoRA scaling ``s``."""
        return ops.scaling(self.rank, self.alpha, self.rslora)

    def config(self, targets: str | Sequence[str] | None = None) -> DoRAConfig:
        """The :class:`~dora_jax.DoRAConfig` of these settings (for PEFT export).

        ``targets`` defaults to the rule's ``module_path`` regex.
        """
        return DoRAConfig(
            targets=self.module_path if targets is None else targets,
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            rslora=self.rslora,
            use_dora=self.use_dora,
            detach_norm=self.detach_norm,
            eps=self.eps,
            adapter_dtype=self.adapter_dtype or jnp.float32,
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one adapted weight's qwix adapters map onto :mod:`dora_jax.ops`' layout.

    ``layout`` describes the weight operand (batch, contracted and remaining axes).
    ``a_split`` reshapes the stored ``w_lora_a`` and ``a_perm`` transposes it to the
    canonical ``(*batch, *in, r)``; ``b_split`` reshapes ``w_lora_b``, which is broadcast
    to ``(*batch, r, *out)`` (qwix's einsum ``B`` has no batch axes); the magnitude is
    stored as ``(*batch, prod(out))``.
    """

    layout: ops.Layout
    kernel_shape: tuple[int, ...]
    rank: int
    a_split: tuple[int, ...]
    a_perm: tuple[int, ...]
    b_split: tuple[int, ...]
    scale: float
    eps: float
    use_dora: bool = True

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.layout.split(self.kernel_shape)[0]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.layout.split(self.kernel_shape)[2]

    @property
    def magnitude_shape(self) -> tuple[int, ...]:
        return (*self.batch_shape, math.prod(self.out_shape))

    def canonical(self, lora_a: Array, lora_b: Array) -> tuple[Array, Array]:
        """``(A (*batch, *in, r), B (*batch, r, *out))`` from qwix's stored adapters."""
        a = jnp.transpose(jnp.reshape(lora_a, self.a_split), self.a_perm)
        b = jnp.reshape(lora_b, self.b_split)
        return a, jnp.broadcast_to(b, (*self.batch_shape, self.rank, *self.out_shape))

    def per_feature(self, magnitude: Array) -> Array:
        """A stored magnitude ``(*batch, prod(out))`` as ``(*batch, *out)``."""
        return jnp.reshape(magnitude, (*self.batch_shape, *self.out_shape))

    def merged(self, kernel: Array, lora_a, lora_b, magnitude) -> Array:
        """``W' = m / ||W0 + s*A@B||_c * (W0 + s*A@B)`` in ``kernel``'s dtype."""
        a, b = self.canonical(lora_a, lora_b)
        m = self.per_feature(magnitude) if self.use_dora else None
        return ops.merge(kernel, a, b, m, self.scale, self.layout, eps=self.eps)


def _dot_general_plan(rhs_shape, dimension_numbers, rule: DoraRule, where: str) -> Plan:
    (_, rhs_ca), (_, rhs_ba) = dimension_numbers
    rhs_ra = tuple(i for i in range(len(rhs_shape)) if i not in rhs_ca and i not in rhs_ba)
    layout = _layout(tuple(rhs_ba), tuple(rhs_ca), rhs_ra, rhs_shape, where)
    batch, contract, remain = layout.split(rhs_shape)
    n = len(batch) + len(contract)
    return Plan(
        layout=layout,
        kernel_shape=tuple(rhs_shape),
        rank=rule.rank,
        a_split=(*batch, *contract, rule.rank),
        a_perm=tuple(range(n + 1)),
        b_split=(*batch, rule.rank, *remain),
        scale=rule.scale,
        eps=rule.eps,
        use_dora=rule.use_dora,
    )


def _einsum_plan(info, rhs_shape, rule: DoraRule, where: str) -> tuple[Plan, Any]:
    equation = f"{info.lhs},{info.rhs}->{info.out}"
    extra = [c for c in info.rhs if c not in info.lhs and c not in info.out]
    if extra:
        raise ValueError(
            f"{where}: einsum {equation!r} sums the weight's axes {extra} on their own; DoRA "
            f"needs every weight axis contracted with the input or kept in the output."
        )
    rhs, lhs, out = info.rhs, info.lhs, info.out
    layout = _layout(
        tuple(i for i, c in enumerate(rhs) if c in lhs and c in out),
        tuple(i for i, c in enumerate(rhs) if c in lhs and c not in out),
        tuple(i for i, c in enumerate(rhs) if c not in lhs),
        rhs_shape,
        where,
    )
    plan = adapters.einsum_plan(equation, rhs_shape)
    # qwix's A keeps the weight's batch and contracted axes in the weight's order.
    kept = [i for i, c in enumerate(info.rhs) if c in info.lhs]
    order = (*layout.batch_axes, *layout.in_axes)
    return (
        Plan(
            layout=layout,
            kernel_shape=tuple(rhs_shape),
            rank=rule.rank,
            a_split=(*(rhs_shape[i] for i in kept), rule.rank),
            a_perm=(*(kept.index(i) for i in order), len(kept)),
            b_split=(rule.rank, *(rhs_shape[i] for i in layout.out_axes)),
            scale=rule.scale,
            eps=rule.eps,
            use_dora=rule.use_dora,
        ),
        plan,
    )


def _layout(batch, contract, remain, shape, where) -> ops.Layout:
    if not contract or not remain:
        raise ValueError(
            f"{where}: DoRA needs a weight with contracted and remaining (output) axes; the "
            f"weight of shape {tuple(shape)} has contracted axes {contract} and remaining "
            f"axes {remain}."
        )
    return ops.Layout(batch_axes=batch, in_axes=contract, out_axes=remain)


@functools.partial(jax.jit, static_argnames=("plan",))
def _norm_from_parts(plan: Plan, lora_a, lora_b, a_t_w, base_norm_sq):
    """:func:`ops.dora_norm` from ``A^T W0`` and ``||W0||^2`` computed by the caller.

    Jitted so that the placeholder kernel (its shape is all ``dora_norm`` reads when both
    parts are given) is never allocated.
    """
    placeholder = jnp.zeros(plan.kernel_shape, jnp.float32)
    return ops.dora_norm(
        placeholder,
        lora_a,
        lora_b,
        plan.scale,
        plan.layout,
        base_norm_sq=base_norm_sq,
        a_t_w=a_t_w,
        eps=plan.eps,
    )


def _float_kernel(weight) -> Array:
    """The weight as a float array (dequantised when quantised)."""
    if isinstance(weight, ptq.WithAux):
        weight = weight.array
    return qarray.dequantize(weight) if isinstance(weight, qarray.QArray) else weight


def _path_name(module) -> str:
    if isinstance(module, nn.Module):
        return "/".join(map(str, module.path))
    return "/".join(map(str, getattr(module, "qwix_path", ())))


class DoraProvider(qwix.LoraProvider):
    """qwix's provider for DoRA (QDoRA with ``weight_qtype``), Linen and NNX.

    ``DoraProvider([DoraRule(module_path=".*attn.*", rank=8, alpha=16.0)])``; a plain
    ``qwix.LoraRule`` in the list gives qwix's LoRA on the modules it matches. The provider
    records how each adapted weight maps onto the DoRA layout (:class:`Plan`) as the
    model runs; :func:`merge_params` and :func:`merge_model` read it.
    """

    def __init__(self, rules=None, *, disable_jit: bool = False, **kwargs):
        if rules is None:
            rules = [DoraRule(**kwargs)]
        elif kwargs:
            raise ValueError("DoraProvider: give rules or one rule's keyword arguments, not both.")
        super().__init__(rules, disable_jit=disable_jit)
        self.plans: dict[tuple[str, str], Plan] = {}

    # ---------------------------------------------------------------- the three ops

    def _dora_rule(self, op: str) -> DoraRule | None:
        rule, _ = self._get_current_rule_and_op_id(op, only_rule=True)
        return rule if isinstance(rule, DoraRule) and rule.use_dora else None

    def dot_general(
        self,
        lhs,
        rhs,
        dimension_numbers,
        precision=None,
        preferred_element_type=None,
        out_sharding=None,
    ):
        """DoRA ``dot_general``: ``g * (x@W0 + s*(x@A)@B)`` on a weight operand."""
        rule = self._dora_rule("dot_general")
        args = (lhs, rhs, dimension_numbers, precision, preferred_element_type)
        if rule is None:
            return super().dot_general(*args, out_sharding=out_sharding)
        base = ptq.PtqProvider.dot_general(self, *args, out_sharding=out_sharding)
        name = flax_util.find_param(rhs, ptq.WithAux)
        if name is None:  # not a weight
            return base
        where = self._where(name)
        plan = _dot_general_plan(rhs.shape, dimension_numbers, rule, where)
        (lhs_ca, _), (lhs_ba, _) = dimension_numbers
        n_batch, n_in = len(plan.layout.batch_axes), len(plan.layout.in_axes)
        a_dims = (
            (tuple(range(n_batch, n_batch + n_in)), plan.layout.in_axes),
            (tuple(range(n_batch)), plan.layout.batch_axes),
        )

        def product(x, w, dims, result_type=preferred_element_type):
            if isinstance(w, qarray.QArray):
                return self._dot_general_fn(x, w, dims, preferred_element_type=jnp.float32)
            return jax.lax.dot_general(
                x, w, dims, precision=precision, preferred_element_type=result_type
            )

        def lora(x, a, b):
            batch, contract, _ = plan.layout.split(plan.kernel_shape)
            return qwix_lora._compute_lora_delta(
                x, a, b, lhs_ca, lhs_ba, contract, batch, plan.out_shape, rule.rank, precision
            )

        (_, rhs_ca), (_, rhs_ba) = dimension_numbers
        batch, contract, _ = plan.layout.split(plan.kernel_shape)
        a_shape, a_tr, b_shape, b_tr = qwix_lora._create_lora_layer_shapes(
            rhs_ca, rhs_ba, plan.layout.out_axes, contract, batch, plan.out_shape, rule.rank
        )
        n_lhs_free = lhs.ndim - len(lhs_ca) - len(lhs_ba)
        broadcast = (*plan.batch_shape, *(1,) * n_lhs_free, *plan.out_shape)
        maps = (
            lambda x, w: product(x, w, dimension_numbers),
            lambda a, w: product(a, w, a_dims, jnp.float32),
            lora,
            lambda g: jnp.reshape(g, broadcast),
        )
        shapes = (a_shape, a_tr, b_shape, b_tr)
        return self._adapted(rule, plan, name, (lhs, rhs, base), shapes, maps)

    def einsum(self, einsum_str, *operands, **kwargs):
        """DoRA ``einsum`` on a weight operand (the right-hand one, as qwix)."""
        rule = self._dora_rule("einsum")
        if rule is None:
            return super().einsum(einsum_str, *operands, **kwargs)
        base = ptq.PtqProvider.einsum(self, einsum_str, *operands, **kwargs)
        if len(operands) != 2:
            raise ValueError(f"DoRA einsum needs two operands; got {einsum_str!r}.")
        lhs, rhs = operands
        name = flax_util.find_param(rhs, ptq.WithAux)
        if name is None:
            return base
        where = self._where(name)
        info = einsum_info.EinsumInfo.parse(einsum_str, ndims=(lhs.ndim, rhs.ndim))
        plan, eplan = _einsum_plan(info, rhs.shape, rule, where)
        a_shape, b_shape, lora_equation, a_tr, b_tr = qwix_lora._parse_einsum_str_for_lora(
            lhs.shape, rhs.shape, einsum_str, rule.rank
        )
        r = lora_equation.split(",")[1][-1]
        pick = lambda axes: "".join(info.rhs[i] for i in axes)  # noqa: E731
        batch, contract, remain = (
            pick(plan.layout.batch_axes),
            pick(plan.layout.in_axes),
            pick(plan.layout.out_axes),
        )
        a_t_w_equation = f"{batch}{contract}{r},{info.rhs}->{batch}{r}{remain}"
        equation = f"{info.lhs},{info.rhs}->{info.out}"

        def product(eq, x, w, **options):
            if isinstance(w, qarray.QArray):
                return self._einsum_fn(eq, x, w, preferred_element_type=jnp.float32)
            return jnp.einsum(eq, x, w, **{**kwargs, **options})

        maps = (
            functools.partial(product, equation),
            functools.partial(product, a_t_w_equation, preferred_element_type=jnp.float32),
            functools.partial(jnp.einsum, lora_equation, **kwargs),
            eplan.to_output,
        )
        shapes = (a_shape, a_tr, b_shape, b_tr)
        return self._adapted(rule, plan, name, (lhs, rhs, base), shapes, maps)

    def conv_general_dilated(
        self,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=None,
        feature_group_count=1,
        batch_group_count=1,
        precision=None,
        preferred_element_type=None,
        out_sharding=None,
    ):
        """DoRA convolution: the norm over every kernel axis but the output channels."""
        rule = self._dora_rule("conv_general_dilated")
        options = dict(
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
        if rule is None:
            return super().conv_general_dilated(
                lhs, rhs, window_strides, padding, out_sharding=out_sharding, **options
            )
        name = flax_util.find_param(rhs, ptq.WithAux)
        if name is None:  # not a weight
            return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
        where = self._where(name)
        if rule.weight_qtype is not None:
            raise ValueError(
                f"{where}: DoRA on a quantised convolution is not supported (qwix quantises "
                f"convolutions only together with their activations)."
            )
        if feature_group_count != 1 or batch_group_count != 1:
            raise ValueError(
                f"{where}: DoRA convolutions need feature_group_count == batch_group_count == "
                f"1; got {feature_group_count} and {batch_group_count}."
            )
        numbers = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        if numbers.rhs_spec[0] != rhs.ndim - 1 or numbers.out_spec[1] != lhs.ndim - 1:
            raise ValueError(
                f"{where}: DoRA convolutions need the output features last in the kernel and "
                f"the output (NHWC / HWIO); got {numbers}."
            )
        options["dimension_numbers"] = numbers
        n_in = rhs.ndim - 1
        plan = Plan(
            layout=ops.Layout(batch_axes=(), in_axes=tuple(range(n_in)), out_axes=(n_in,)),
            kernel_shape=tuple(rhs.shape),
            rank=rule.rank,
            a_split=(*rhs.shape[:-1], rule.rank),
            a_perm=tuple(range(rhs.ndim)),
            b_split=(rule.rank, rhs.shape[-1]),
            scale=rule.scale,
            eps=rule.eps,
        )
        a_dims = ((tuple(range(n_in)), tuple(range(n_in))), ((), ()))

        def conv(x, w):
            return jax.lax.conv_general_dilated(x, w, window_strides, padding, **options)

        maps = (
            conv,
            lambda a, w: jax.lax.dot_general(
                a, w, a_dims, precision=precision, preferred_element_type=jnp.float32
            ),
            lambda x, a, b: conv(x, a) @ b,
            lambda g: g,
        )
        shapes = (plan.a_split, (*range(n_in), None), plan.b_split, (None, n_in))
        return self._adapted(rule, plan, name, (lhs, rhs, conv(lhs, rhs)), shapes, maps)

    # ---------------------------------------------------------------- shared

    def _where(self, name: str) -> str:
        path = _path_name(flax_util.get_current_module())
        return f"DoRA weight {path + '/' if path else ''}{name}"

    def _weight(self, rhs, name: str, rule: DoraRule):
        """The weight operand as the base product used it: an array or a ``QArray``."""
        if isinstance(rhs, ptq.WithAux):
            return rhs.array
        if rule.weight_qtype is None:
            return rhs
        # At init the base op has just replaced the float weight by its quantised form.
        module = flax_util.get_current_module()
        if isinstance(module, nn.Module):
            stored = flax_util.unbox(module.get_variable("params", name))
        else:
            stored = getattr(module, name)
        return stored.array if isinstance(stored, ptq.WithAux) else rhs

    def _record(self, name: str, plan: Plan) -> None:
        key = (_path_name(flax_util.get_current_module()), name)
        known = self.plans.setdefault(key, plan)
        if known != plan:
            raise ValueError(
                f"DoRA weight {key[0]}/{name} is used by two different products ({known} and "
                f"{plan}); adapt it in one of them only (op_names in the rule)."
            )

    def _adapted(
        self,
        rule: DoraRule,
        plan: Plan,
        name: str,
        operands: tuple,
        lora_shapes: tuple,
        maps: tuple[Callable, Callable, Callable, Callable],
    ) -> Array:
        """``g * (x@W0 + s*(x@A)@B)`` (PEFT's form with dropout) for one adapted weight.

        ``operands`` are ``(x, the weight operand, x@W0)``; ``lora_shapes`` qwix's
        ``(A shape, A sharding transpose, B shape, B sharding transpose)``; ``maps`` the
        op's ``(x, W0) -> x@W0``, ``(A, W0) -> A^T W0 (*batch, r, *out)``,
        ``(x, A, B) -> (x@A)@B`` and ``g (*batch, *out) -> broadcastable to the output``.
        """
        lhs, rhs, base = operands
        base_of, a_t_w_of, lora_of, to_output = maps
        self._record(name, plan)
        weight = self._weight(rhs, name, rule)
        quantised = isinstance(weight, qarray.QArray)
        lora_a, lora_b = self._lora_params(rule, name, lora_shapes)

        def initial_magnitude():
            a, b = plan.canonical(lora_a, lora_b)
            m = ops.init_magnitude(_float_kernel(weight), a, b, plan.scale, plan.layout)
            dtype = rule.adapter_dtype or lora_a.dtype
            return jnp.reshape(m, plan.magnitude_shape).astype(dtype)

        magnitude = flax_util.get_or_create_param(
            name + MAGNITUDE, initial_magnitude, nnx_param_type=nnx.LoRAParam
        )
        a, b = plan.canonical(lora_a, lora_b)
        a_for_norm = jax.lax.stop_gradient(a) if rule.detach_norm else a
        # A^T W0 through the base's own product (a quantised weight read as the base reads
        # it), in the weight's dtype with float32 results, as ops.dora_norm takes it.
        dtype = jnp.float32 if quantised else weight.dtype
        a_t_w = a_t_w_of(a_for_norm.astype(dtype), weight).astype(jnp.float32)
        # ||W0||^2 from the weight as stored: a quantised one is dequantised inside the
        # fused reduction, never kept as a float copy.
        base_norm_sq = ops.column_norm_sq(_float_kernel(weight), plan.layout)
        norm = _norm_from_parts(plan, a, b, a_t_w, base_norm_sq)
        g = ops.magnitude_scale(plan.per_feature(magnitude), norm, rule.detach_norm)
        x = lhs
        base_dropped = None
        if rule.dropout > 0:
            x = nnx.Dropout(rule.dropout, deterministic=False)(
                lhs, rngs=flax_util.make_rng("dropout")
            )
            base_dropped = base_of(x, weight)
        return ops.adapted_layer_output(
            base,
            lora_of(x, lora_a, lora_b),
            plan.scale,
            to_output(g),
            base_out_dropped=base_dropped,
        )

    def _lora_params(self, rule: DoraRule, name: str, shapes):
        """qwix's ``w_lora_a`` / ``w_lora_b``: its shapes, sharding and boxing, and the
        rule's adapter dtype."""
        dtype = rule.adapter_dtype

        def cast(init):
            return init if dtype is None else (lambda key, shape, _: init(key, shape, dtype))

        creating = dataclasses.replace(
            rule,
            lora_a_initializer=cast(rule.lora_a_initializer),
            lora_b_initializer=cast(rule.lora_b_initializer),
        )
        keys = ("a_shape", "a_sharding_transpose", "b_shape", "b_sharding_transpose")
        return qwix_lora._get_or_create_lora_params(
            name=name, rule=creating, **dict(zip(keys, shapes, strict=True))
        )


# ------------------------------------------------------------------------------ merging


def _adapted_names(leaves: Mapping[str, Any]) -> list[str]:
    """The weights of one module's leaves that carry DoRA adapters."""
    return [k[: -len(LORA_A)] for k in leaves if k.endswith(LORA_A) and k[: -len(LORA_A)] in leaves]


def _plan(provider: DoraProvider, path: str, name: str) -> Plan:
    plan = provider.plans.get((path, name))
    if plan is None:
        where = f"{path + '/' if path else ''}{name}"
        raise ValueError(
            f"the provider has no record of the weight {where!r}; run the model once with "
            f"this provider (init, apply or qwix.apply_lora_to_model) first."
        )
    return plan


def _merged_weight(provider: DoraProvider, path: str, name: str, leaves, requantize: bool):
    plan = _plan(provider, path, name)
    where = f"{path + '/' if path else ''}{name}"
    get = lambda key: flax_util.unbox(leaves[key])  # noqa: E731
    weight = get(name)
    if plan.use_dora and (name + MAGNITUDE) not in leaves:
        raise ValueError(f"merge: {where!r} has adapters but no {name + MAGNITUDE!r}.")
    magnitude = get(name + MAGNITUDE) if plan.use_dora else None
    merged = plan.merged(_float_kernel(weight), get(name + LORA_A), get(name + LORA_B), magnitude)
    if requantize and isinstance(weight, ptq.WithAux):
        return weight.replace(array=qarray.quantize(merged, weight.how))
    return merged


def merge_params(
    provider: DoraProvider, params: Mapping[str, Any], *, requantize: bool = False
) -> dict[str, Any]:
    """Fold the adapters of a provider-adapted Linen model's ``params`` into its weights.

    Args:
      provider: the :class:`DoraProvider` the model ran with (it knows each weight's axes).
      params: the ``"params"`` collection (``w``, ``w_lora_a``, ``w_lora_b``,
        ``w_dora_magnitude``; ``w`` float or quantised).
      requantize: re-quantise the merged weights of a quantised base with their own
        ``HowToQuantize`` (for a ``qwix.PtqProvider`` model); by default they are float,
        for the plain model.
    Returns:
      the params without adapters, ``W' = m / ||W0 + s*A@B||_c * (W0 + s*A@B)`` in place
      of each adapted weight (float32 from a quantised base) and, unless ``requantize``,
      every other quantised weight dequantised.
    """

    def visit(tree: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        names = _adapted_names(tree)
        drop = {n + suffix for n in names for suffix in SUFFIXES}
        out = {}
        for key, value in tree.items():
            if key in drop:
                continue
            if key in names:
                out[key] = _merged_weight(provider, "/".join(path), key, tree, requantize)
            elif isinstance(value, Mapping):
                out[key] = visit(value, (*path, key))
            elif isinstance(flax_util.unbox(value), ptq.WithAux) and not requantize:
                out[key] = _float_kernel(flax_util.unbox(value))  # quantised, not adapted
            else:
                out[key] = value
        return out

    return visit(params, ())


def recompute_magnitudes(provider: DoraProvider, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with every magnitude set to ``||W0 + s*A@B||_c`` of the weights present.

    Call it after putting pretrained weights into params made by ``init`` (for a quantised
    base: after ``qwix.quantize_params``): ``init`` took the magnitudes from the weights it
    made. The norm is of the dequantised weight, so the adapted model (with ``B = 0``)
    equals the base it now holds.
    """

    def visit(tree: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        out = {k: visit(v, (*path, k)) if isinstance(v, Mapping) else v for k, v in tree.items()}
        for name in _adapted_names(tree):
            if name + MAGNITUDE not in tree:
                continue
            plan = _plan(provider, "/".join(path), name)
            a, b = plan.canonical(*(flax_util.unbox(tree[name + s]) for s in (LORA_A, LORA_B)))
            kernel = _float_kernel(flax_util.unbox(tree[name]))
            m = ops.init_magnitude(kernel, a, b, plan.scale, plan.layout)
            old = flax_util.unbox(tree[name + MAGNITUDE])
            out[name + MAGNITUDE] = jnp.reshape(m, old.shape).astype(old.dtype)
        return out

    return visit(params, ())


def merge_model(provider: DoraProvider, model: nnx.Module) -> nnx.Module:
    """A plain NNX model (the original class) with every adapted weight merged and every
    other quantised weight dequantised (float).

    ``model`` (from ``qwix.apply_lora_to_model(..., provider, ...)``) is not changed.
    """
    merged = nnx.clone(model)
    for path, module in nnx.iter_modules(merged):
        leaves = vars(module)
        for name in _adapted_names(leaves):
            weight = _merged_weight(provider, "/".join(map(str, path)), name, leaves, False)
            for suffix in SUFFIXES:
                if hasattr(module, name + suffix):
                    delattr(module, name + suffix)
            setattr(module, name, nnx.Param(weight))
        for name, value in list(vars(module).items()):
            if isinstance(value, ptq.WithAux):  # quantised, not adapted
                setattr(module, name, nnx.Param(_float_kernel(value)))
    plain = getattr(type(merged), "_unquantized_type", None)
    if plain is not None:
        merged.__class__ = plain
    return merged


# --------------------------------------------------------------------- interoperation


def to_dora_variables(params: Mapping[str, Any]) -> dict[str, Any]:
    """The library's Linen layout of a provider-adapted model's ``params``.

    Returns ``{"params": base params (quantised weights dequantised), "dora": {module:
    {"lora_a", "lora_b", "magnitude"}}}``, what :func:`dora_jax.peft.save_pretrained`
    reads. Only weights named ``kernel`` (``nn.Dense``, ``nn.Conv``: ``A (*in, r)``,
    ``B (r, out)``, the layouts PEFT has) are accepted; any other adapted weight is
    refused by name.
    """
    dora: dict[str, Any] = {}

    def visit(tree: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        names = _adapted_names(tree)
        for name in names:
            where = "/".join((*path, name))
            kernel = flax_util.unbox(tree[name])
            a, b = (flax_util.unbox(tree[name + s]) for s in (LORA_A, LORA_B))
            if name != "kernel" or a.ndim != kernel.ndim or b.ndim != 2:
                raise ValueError(
                    f"to_dora_variables: {where!r} (weight {tuple(kernel.shape)}, lora_a "
                    f"{tuple(a.shape)}, lora_b {tuple(b.shape)}) is not a Dense or Conv "
                    f"kernel; PEFT has no layer for it."
                )
            node = dora
            for key in path:
                node = node.setdefault(key, {})
            node.update(lora_a=a, lora_b=b)
            if name + MAGNITUDE in tree:
                node["magnitude"] = flax_util.unbox(tree[name + MAGNITUDE])
        drop = {n + s for n in names for s in SUFFIXES}
        out = {}
        for key, value in tree.items():
            if key in drop:
                continue
            value = flax_util.unbox(value)
            if isinstance(value, Mapping):
                out[key] = visit(value, (*path, key))
            else:
                out[key] = _float_kernel(value)
        return out

    base = visit(params, ())
    return {"params": base, adapters.DORA: dora}


def dequantize_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with every quantised weight replaced by its float (dequantised) value."""
    return {
        key: dequantize_params(value) if isinstance(value, Mapping) else _float_kernel(value)
        for key, value in ((k, flax_util.unbox(v)) for k, v in params.items())
    }


def weight_bytes(tree: Any) -> int:
    """Bytes of every weight in ``tree`` as stored: a quantised weight's values at their
    bit width (4 bits for int4 / NF4) plus its scales and zero points."""
    total = 0
    for leaf in jax.tree.leaves(flax_util.unbox(tree)):
        dtype = jnp.dtype(leaf.dtype)
        bits = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else dtype.itemsize * 8
        total += math.ceil(math.prod(leaf.shape) * bits / 8)
    return total
