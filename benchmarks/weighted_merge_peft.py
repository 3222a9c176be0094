"""Weighted merges of two DoRA adapters: dora-jax's two definitions and PEFT's
``add_weighted_adapter``, on the same adapters.

A torch model of three ``nn.Linear`` layers gets two DoRA adapters with trained-looking
weights (random ``A`` and ``B``, ``s*B@A`` about a third of ``W0``, magnitudes 0.8 to
1.2 times the initial ones). For
each PEFT combination type (``cat``, ``svd``, ``linear``) and each pair of weights,
PEFT's combined adapter is merged (``merge_and_unload``) and its weights compared with

* ``merged``: ``W0 + sum_k w_k (W'_k - W0)``, the weighted sum of the merged weights;
* ``dora``: one DoRA adapter from ``sum_k w_k s_k B_k A_k`` and
  ``||W0|| + sum_k w_k (m_k - ||W0||)``;
* ``delta, m = ||W0||``: the combined delta with the magnitude left at ``||W0||_c``
  (what PEFT's ``cat`` computes: its new adapter's magnitude is never set).

Numbers are ``max |W_peft - W_def| / max |W_def|`` over every layer's weight, and the
same for the model's outputs on a random batch.

    python benchmarks/weighted_merge_peft.py
"""

from __future__ import annotations

import copy

import harness
import numpy as np
import peft
import torch

from dora_jax import merging, ops

TORCH_LINEAR = ops.Layout((), (1,), (0,))  # a torch weight (out, in)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 48), torch.nn.GELU(),
        torch.nn.Linear(48, 16),
    ).eval()  # fmt: skip


def adapters(net: torch.nn.Module) -> peft.PeftModel:
    """``net`` with two trained-looking DoRA adapters, ``a`` (rank 4) and ``b`` (rank 4)."""
    config = dict(target_modules=["0", "2", "4"], use_dora=True, r=4)
    wrapped = peft.get_peft_model(net, peft.LoraConfig(lora_alpha=8, **config), adapter_name="a")
    wrapped.add_adapter("b", peft.LoraConfig(lora_alpha=4, **config))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_A" in name:  # (r, in)
                std = param.shape[1] ** -0.5
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            elif "lora_magnitude_vector" in name:
                param.mul_(0.8 + 0.4 * torch.rand(param.shape, generator=generator))
    return wrapped


def layer_adapter(layer, name: str) -> merging.KernelAdapter:
    a = layer.lora_A[name].weight.detach().numpy()
    b = layer.lora_B[name].weight.detach().numpy()
    m = layer.lora_magnitude_vector[name].weight.detach().numpy()
    return merging.KernelAdapter(a.T, b.T, m, layer.scaling[name])


def definitions(wrapped, weights) -> dict[str, dict[str, np.ndarray]]:
    """Every layer's weight by each definition, computed by dora_jax."""
    out: dict[str, dict[str, np.ndarray]] = {"merged": {}, "dora": {}, "delta, m = ||W0||": {}}
    for name, layer in wrapped.named_modules():
        if not hasattr(layer, "lora_magnitude_vector") or "a" not in layer.lora_A:
            continue
        w0 = layer.base_layer.weight.detach().numpy()
        both = [layer_adapter(layer, "a"), layer_adapter(layer, "b")]
        for kind in ("merged", "dora"):
            out[kind][name] = np.asarray(
                merging.weighted_merge(w0, both, weights, TORCH_LINEAR, combination=kind)
            )
        base_norm = np.linalg.norm(w0.astype(np.float64), axis=1)
        # m_k = ||W0|| for both adapters makes the "dora" magnitude ||W0||.
        plain = [k._replace(magnitude=base_norm.astype(np.float32)) for k in both]
        out["delta, m = ||W0||"][name] = np.asarray(
            merging.weighted_merge(w0, plain, weights, TORCH_LINEAR, combination="dora")
        )
    return out


def peft_weights(wrapped, weights, combination: str):
    wrapped = copy.deepcopy(wrapped)
    wrapped.add_weighted_adapter(["a", "b"], weights, "ab", combination_type=combination)
    wrapped.set_adapter("ab")
    merged = wrapped.merge_and_unload(adapter_names=["ab"])
    return {f"base_model.model.{n}": merged.get_submodule(n).weight.detach().numpy()
            for n in ("0", "2", "4")}, merged  # fmt: skip


def forward(weights: dict[str, np.ndarray], x: torch.Tensor) -> np.ndarray:
    net = model()
    with torch.no_grad():
        for name, w in weights.items():
            net.get_submodule(name.removeprefix("base_model.model.")).weight.copy_(torch.tensor(w))
        return net(x).numpy()


def relative(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def main() -> None:
    print(harness.banner("jax", "torch", "peft"))
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    rows, between = [], []
    for weights in ([0.5, 0.5], [0.7, 0.3], [1.0, 1.0]):
        wrapped = adapters(model())
        ours = definitions(wrapped, weights)
        w_err = max(relative(ours["dora"][k], ours["merged"][k]) for k in ours["merged"])
        y_err = relative(forward(ours["dora"], x), forward(ours["merged"], x))
        between.append([f"{weights}", f"{w_err:.2e} / {y_err:.2e}"])
        for combination in ("cat", "svd", "linear"):
            theirs, merged = peft_weights(wrapped, weights, combination)
            with torch.no_grad():
                y_peft = merged(x).numpy()
            row = [f"{weights}", combination]
            for tree in ours.values():
                w_err = max(relative(theirs[k], tree[k]) for k in tree)
                y_err = relative(y_peft, forward(tree, x))
                row.append(f"{w_err:.2e} / {y_err:.2e}")
            rows.append(row)
    print("max relative difference of PEFT's merged adapter from each definition, "
          "weights / outputs:")  # fmt: skip
    print(harness.table(["weights", "PEFT combination", *ours], rows))
    print("\n'dora' against 'merged', weights / outputs:")
    print(harness.table(["weights", "dora vs merged"], between))


if __name__ == "__main__":
    main()
