"""DoRA on a small Flax MLP: the adapted model starts equal to the base and trains.

Run: ``python examples/quickstart.py``. A frozen random "pretrained" MLP is adapted to a
new regression target with DoRA and with plain LoRA (same rank, same steps), training
only the ``"dora"`` collection.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import dora_jax


class MLP(nn.Module):
    use_dora: bool = True

    @nn.compact
    def __call__(self, x):
        for width in (64, 64):
            x = jnp.tanh(dora_jax.DoRADense(width, rank=4, alpha=8.0, use_dora=self.use_dora)(x))
        return dora_jax.DoRADense(1, rank=1, use_dora=self.use_dora)(x)


def train(use_dora: bool, x, target, steps: int) -> tuple[float, float]:
    """Adapt the frozen MLP to ``target``; return the loss before and after."""
    model = MLP(use_dora=use_dora)
    variables = model.init(jax.random.key(1), x)  # params and dora
    # ||W0||^2 of the frozen weights, computed once instead of every step. It belongs to
    # these params: make it after the final (pretrained) weights are in place.
    variables = dora_jax.linen.cache_base_norms(model, variables, x)
    frozen = {k: v for k, v in variables.items() if k != "dora"}
    optimizer = optax.adam(1e-2)

    def loss_fn(adapters):
        return jnp.mean((model.apply({**frozen, "dora": adapters}, x) - target) ** 2)

    @jax.jit
    def step(adapters, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(adapters, updates), opt_state, loss

    adapters = variables["dora"]
    opt_state = optimizer.init(adapters)
    first = float(loss_fn(adapters))
    for _ in range(steps):
        adapters, opt_state, _ = step(adapters, opt_state)
    return first, float(loss_fn(adapters))


def main(steps: int = 300) -> None:
    key_data, key_target = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_data, (512, 16))
    target = jnp.sin(x @ jax.random.normal(key_target, (16, 1)))
    for use_dora in (True, False):
        first, last = train(use_dora, x, target, steps)
        name = "DoRA" if use_dora else "LoRA"
        print(f"{name}: loss {first:.4f} -> {last:.4f} after {steps} steps")


if __name__ == "__main__":
    main()
