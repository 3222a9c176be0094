"""Training with a frozen base: partition, optimizer state, step equivalences.

References are independent of the code under test where it matters: the frozen base
is compared bitwise with its value before training; accumulated and data-parallel
steps are compared with one plain single-device step on the whole batch; the optimizer
state size with AdamW's known layout (two moments per trainable element); memory with
XLA's own analysis of a full fine-tuning step of the same model.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dora_jax
from dora_jax import train

WORKER = Path(__file__).with_name("distributed_worker.py")


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(48, name="fc1")(x))
        x = jnp.tanh(nn.Dense(48, name="fc2")(x))
        return nn.Dense(3, name="head")(x)


def _problem(modules_to_save=("head",)):
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (16, 24))
    targets = jax.random.normal(jax.random.key(1), (16, 3))
    config = dora_jax.DoRAConfig(
        targets=["fc1", "fc2"], rank=4, modules_to_save=list(modules_to_save)
    )
    wrapped = dora_jax.linen.wrap(model, config)
    params = model.init(jax.random.key(2), x)["params"]
    variables = wrapped.init_from_params(jax.random.key(3), params, x)
    batch = {"inputs": x, "targets": targets}
    return model, wrapped, config, params, variables, batch


def _mse(out, batch):
    return jnp.mean((out - batch["targets"]) ** 2)


def _max_rel(a_tree, b_tree) -> float:
    pairs = zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree), strict=True)
    return max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) for a, b in pairs)


def test_partition_splits_adapters_and_saved_modules():
    _, _, config, params, variables, _ = _problem()
    trainable, frozen = train.partition(variables, config)
    assert set(trainable) == {"dora", "params"}
    assert set(trainable["params"]) == {"head"}
    assert set(frozen["params"]) == {"fc1", "fc2"}
    assert "dora" not in frozen
    restored = train.combine(trainable, frozen)
    assert jax.tree.structure(restored) == jax.tree.structure(variables)


def test_optimizer_state_covers_only_trainable_leaves():
    _, _, config, params, variables, _ = _problem()
    trainable, frozen = train.partition(variables, config)
    state = train.init_state(trainable, optax.adamw(1e-3))
    trainable_size = train.tree_size(trainable)
    float_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    # AdamW: first and second moments per trainable element, plus scalar counters.
    assert sum(x.size for x in float_leaves) == 2 * trainable_size
    counters = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 0]
    assert 1 <= len(counters) <= 2
    adapters = 2 * (4 * (24 + 48) + 48) - 4 * 24 + 4 * 24  # fc1 and fc2: r(in+out)+out
    expected = (4 * (24 + 48) + 48) + (4 * (48 + 48) + 48) + 48 * 3 + 3
    assert trainable_size == expected and adapters > 0


def test_frozen_base_bitwise_unchanged_and_saved_modules_train():
    _, wrapped, config, params, variables, batch = _problem()
    trainable, frozen = train.partition(variables, config)
    frozen_before = jax.tree.map(np.array, frozen)
    optimizer = train.adamw(1e-2)
    step = train.jit_step(
        train.make_train_step(train.linen_forward(wrapped), _mse, optimizer, learning_rate=1e-2)
    )
    state = train.init_state(trainable, optimizer)
    losses = []
    for _ in range(5):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
        assert float(metrics["learning_rate"]) == pytest.approx(1e-2)
        assert float(metrics["grad_norm"]) > 0
    assert losses[-1] < losses[0]
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(before, np.asarray(after))
    head_before = variables["params"]["head"]["kernel"]
    assert np.abs(np.asarray(state.trainable["params"]["head"]["kernel"]) - head_before).max() > 0
    # The caller's variables survive buffer donation.
    np.testing.assert_array_equal(np.asarray(variables["params"]["head"]["kernel"]), head_before)


def test_freeze_masks_the_full_tree_without_state_or_clipping_share():
    _, wrapped, config, params, variables, batch = _problem()
    # Clip hard so the norm's membership matters: frozen gradients are huge here.
    optimizer = train.freeze(
        optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0)), variables, config
    )
    opt_state = optimizer.init(variables)
    state_leaves = [x for x in jax.tree.leaves(opt_state) if hasattr(x, "size")]
    assert sum(x.size for x in state_leaves) == 0  # sgd and set_to_zero keep no state

    def loss(variables):
        return _mse(wrapped.apply(variables, batch["inputs"]), batch)

    grads = jax.grad(loss)(variables)
    updates, _ = optimizer.update(grads, opt_state, variables)
    trainable_updates, frozen_updates = train.partition(updates, config)
    for leaf in jax.tree.leaves(frozen_updates):
        assert not np.any(np.asarray(leaf))
    trainable_grads, _ = train.partition(grads, config)
    expected = jax.tree.map(lambda g: -g * 1e-3 / optax.tree.norm(trainable_grads), trainable_grads)
    assert _max_rel(trainable_updates, expected) < 1e-5


def test_gradient_accumulation_equals_one_step_on_the_whole_batch():
    _, wrapped, config, params, variables, batch = _problem()
    trainable, frozen = train.partition(variables, config)
    optimizer = train.adamw(1e-2, max_grad_norm=1.0)
    forward = train.linen_forward(wrapped)
    whole = train.jit_step(train.make_train_step(forward, _mse, optimizer))
    micro = train.jit_step(train.make_train_step(forward, _mse, optimizer, accumulation_steps=4))
    a, metrics_a = whole(train.init_state(trainable, optimizer), frozen, batch)
    b, metrics_b = micro(train.init_state(trainable, optimizer), frozen, batch)
    assert _max_rel(b.trainable, a.trainable) < 1e-5
    assert float(metrics_b["loss"]) == pytest.approx(float(metrics_a["loss"]), rel=1e-5)


def test_bfloat16_compute_keeps_float32_adapters():
    _, wrapped, config, params, variables, batch = _problem()
    variables = dora_jax.linen.cache_base_norms(wrapped, variables, batch["inputs"])
    trainable, frozen = train.partition(variables, config)
    optimizer = train.adamw(1e-2)
    step = train.jit_step(train.make_train_step(train.linen_forward(wrapped), _mse, optimizer))
    low = train.cast_frozen(frozen, jnp.bfloat16)
    assert low["params"]["fc1"]["kernel"].dtype == jnp.bfloat16
    assert low["dora_cache"]["fc1"]["base_norm_sq"].dtype == jnp.float32
    state, metrics = step(train.init_state(trainable, optimizer), low, batch)
    reference, _ = step(train.init_state(trainable, optimizer), frozen, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.trainable))
    assert np.isfinite(float(metrics["loss"]))
    assert _max_rel(state.trainable, reference.trainable) < 2e-2


def test_step_holds_no_base_sized_gradient():
    """XLA's memory analysis: no W0-sized buffer beyond what full fine-tuning needs."""

    class Wide(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(256, name="fc2")(jnp.tanh(nn.Dense(256, name="fc1")(x)))

    model, x = Wide(), jax.random.normal(jax.random.key(0), (8, 256))
    batch = {"inputs": x, "targets": jnp.zeros((8, 256))}
    config = dora_jax.DoRAConfig(targets=["fc1", "fc2"], rank=4)
    wrapped = dora_jax.linen.wrap(model, config)
    params = model.init(jax.random.key(1), x)["params"]
    trainable, frozen = train.partition(wrapped.init_from_params(jax.random.key(2), params, x))
    optimizer = optax.adamw(1e-3)
    dora_step = jax.jit(train.make_train_step(train.linen_forward(wrapped), _mse, optimizer))
    full_step = jax.jit(
        train.make_train_step(lambda t, f, b, rng: model.apply(t, b["inputs"]), _mse, optimizer)
    )

    def memory(step, trainable, frozen):
        state = train.init_state(trainable, optimizer)
        return step.lower(state, frozen, batch).compile().memory_analysis()

    dora, full = memory(dora_step, trainable, frozen), memory(full_step, {"params": params}, {})
    kernel_bytes = params["fc1"]["kernel"].nbytes
    # DoRA: temporaries and outputs (adapters and their AdamW moments) stay below the size
    # of one frozen kernel, so no W0-sized gradient or moment exists.
    assert dora.temp_size_in_bytes < kernel_bytes
    assert dora.output_size_in_bytes < kernel_bytes
    # Full fine-tuning of the same model: new weights and two moments for both kernels.
    assert full.output_size_in_bytes >= 3 * 2 * kernel_bytes


def test_nnx_model_trains_with_the_same_step():
    model = nnx.Sequential(
        nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.tanh, nnx.Linear(16, 2, rngs=nnx.Rngs(1))
    )
    dora_jax.nnx.apply_dora(model, dora_jax.DoRAConfig(targets=["0"], rank=2), rngs=nnx.Rngs(2))
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    kernel_before = np.asarray(model.layers[0].kernel[...]).copy()
    optimizer = train.adamw(1e-2)
    step = train.jit_step(train.make_train_step(train.nnx_forward(graphdef), _mse, optimizer))
    batch = {
        "inputs": jax.random.normal(jax.random.key(0), (8, 8)),
        "targets": jax.random.normal(jax.random.key(1), (8, 2)),
    }
    state = train.init_state(trainable, optimizer)
    first = None
    for _ in range(10):
        state, metrics = step(state, frozen, batch)
        first = first if first is not None else float(metrics["loss"])
    assert float(metrics["loss"]) < first
    nnx.update(model, state.trainable)
    np.testing.assert_array_equal(np.asarray(model.layers[0].kernel[...]), kernel_before)
    assert np.abs(np.asarray(model.layers[0].lora_b[...])).max() > 0


def test_fit_logs_json_lines(tmp_path):
    _, wrapped, config, params, variables, batch = _problem()
    trainable, frozen = train.partition(variables, config)
    optimizer = train.adamw(1e-2)
    step = train.jit_step(
        train.make_train_step(train.linen_forward(wrapped), _mse, optimizer, learning_rate=1e-2)
    )
    log = tmp_path / "metrics.jsonl"
    state = train.fit(
        step,
        train.init_state(trainable, optimizer),
        frozen,
        iter(lambda: batch, None),
        num_steps=4,
        evaluate=lambda s: {"loss": 1.0},
        eval_every=2,
        log_path=str(log),
        progress=False,
    )
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "grad_norm", "learning_rate", "time"} <= set(records[0])
    assert "eval_loss" in records[1] and "eval_loss" not in records[0]
    assert int(state.step) == 4


def _single_process_reference(steps: int):
    import importlib.util

    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    trainable, frozen, optimizer, batches, make_step = worker.problem()
    step = train.jit_step(make_step())
    state = train.init_state(trainable, optimizer)
    for batch in batches[:steps]:
        state, _ = step(state, frozen, batch)
    return worker._flat(state.trainable)


def test_data_parallel_ways_agree_on_eight_devices(tmp_path):
    out = tmp_path / "devices.npz"
    subprocess.run([sys.executable, str(WORKER), "devices", str(out)], check=True, timeout=600)
    arrays = np.load(out)
    # FSDP: each device holds 1/8 of the frozen base (plus replicated state and batch)
    # and never more than one layer's kernel of temporaries: no full base is gathered.
    assert arrays["fsdp_argument_bytes"] <= arrays["base_bytes"] / 8 + arrays["state_bytes"] + 2**16
    assert arrays["fsdp_temp_bytes"] < arrays["layer_bytes"]
    reference = _single_process_reference(5)
    for way in ("single", "pmap", "data_mesh", "fsdp_mesh"):
        for key, want in reference.items():
            got = arrays[way + key]
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err <= 1e-5, (way, key, err)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "multihost.npz"
    port = _free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "process", str(i), "2", str(port), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = [w.communicate(timeout=600)[0].decode() for w in workers]
    assert all(w.returncode == 0 for w in workers), logs
    arrays = np.load(out)
    for key, want in _single_process_reference(3).items():
        err = np.abs(arrays[key] - want).max() / np.abs(want).max()
        assert err <= 1e-5, (key, err)


def test_nnx_dropout_draws_new_masks_every_step():
    layer = dora_jax.nnx.DoRALinear(8, 4, rank=2, dropout=0.5, rngs=nnx.Rngs(0, dropout=1))
    layer.lora_b[...] = jax.random.normal(jax.random.key(2), layer.lora_b.shape)
    graphdef, trainable, frozen = nnx.split(layer, nnx.LoRAParam, ...)
    forward = train.nnx_forward(graphdef)
    batch = {"inputs": jnp.ones((3, 8))}
    first = forward(trainable, frozen, batch, jax.random.key(10))
    again = forward(trainable, frozen, batch, jax.random.key(10))
    other = forward(trainable, frozen, batch, jax.random.key(11))
    np.testing.assert_array_equal(first, again)
    assert np.abs(np.asarray(first - other)).max() > 0


def _strict_json(line: str) -> dict:
    """``json.loads`` that rejects NaN and Infinity, as strict JSON parsers do."""

    def reject(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=reject)


def _nan_batch(batch):
    return {**batch, "inputs": batch["inputs"].at[3, 5].set(jnp.nan)}


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_skip_nonfinite_leaves_adapters_and_optimizer_state_unchanged():
    _, wrapped, config, params, variables, batch = _problem()
    trainable, frozen = train.partition(variables, config)
    forward = train.linen_forward(wrapped)
    guarded = train.adamw(1e-2, max_grad_norm=1.0, skip_nonfinite=True)
    step = train.jit_step(train.make_train_step(forward, _mse, guarded))
    state, _ = step(train.init_state(trainable, guarded), frozen, batch)
    after_bad, metrics = step(state, frozen, _nan_batch(batch))
    assert np.isnan(float(metrics["loss"])) and float(metrics["skipped"]) == 1.0
    _assert_trees_equal(after_bad.trainable, state.trainable)
    _assert_trees_equal(after_bad.opt_state.inner_state, state.opt_state.inner_state)
    assert int(after_bad.opt_state.total_notfinite) == 1
    # The next good step is the one a run that never saw the bad batch takes.
    resumed, metrics = step(after_bad, frozen, batch)
    never_bad, _ = step(state, frozen, batch)
    assert float(metrics["skipped"]) == 0.0
    _assert_trees_equal(resumed.trainable, never_bad.trainable)
    # Without the guard the same batch poisons every adapter.
    plain = train.adamw(1e-2, max_grad_norm=1.0)
    step = train.jit_step(train.make_train_step(forward, _mse, plain))
    poisoned, _ = step(train.init_state(trainable, plain), frozen, _nan_batch(batch))
    assert all(np.isnan(np.asarray(x)).all() for x in jax.tree.leaves(poisoned.trainable))


def test_fit_stops_at_a_nonfinite_step_naming_it(tmp_path):
    _, wrapped, config, params, variables, batch = _problem()
    trainable, frozen = train.partition(variables, config)
    optimizer = train.adamw(1e-2)
    step = train.jit_step(train.make_train_step(train.linen_forward(wrapped), _mse, optimizer))
    log = tmp_path / "metrics.jsonl"
    batches = [batch, batch, _nan_batch(batch), batch]
    with pytest.raises(train.NonFiniteError) as error:
        train.fit(
            step,
            train.init_state(trainable, optimizer),
            frozen,
            batches,
            num_steps=4,
            log_path=str(log),
            progress=False,
        )
    message = str(error.value)
    assert "step 3 (batch 2 of `batches`): non-finite grad_norm = nan, loss = nan" in message
    assert "8 of 8 trainable leaves are now non-finite" in message
    assert "skip_nonfinite=True" in message
    assert error.value.step == 3 and int(error.value.state.step) == 2
    kept = (error.value.state.trainable, error.value.state.opt_state)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(kept))
    records = [_strict_json(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[2]["loss"] is None and records[2]["grad_norm"] is None


def test_fit_with_the_guard_warns_and_keeps_training():
    _, wrapped, config, params, variables, batch = _problem()
    trainable, frozen = train.partition(variables, config)
    optimizer = train.adamw(1e-2, skip_nonfinite=True)
    step = train.jit_step(train.make_train_step(train.linen_forward(wrapped), _mse, optimizer))
    batches = [batch, _nan_batch(batch), batch]
    with pytest.warns(RuntimeWarning, match=r"step 2 .*skipped this update"):
        state = train.fit(
            step,
            train.init_state(trainable, optimizer),
            frozen,
            batches,
            num_steps=3,
            progress=False,
        )
    assert int(state.step) == 3
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.trainable))
    with pytest.raises(ValueError, match="on_nonfinite must be 'raise' or 'warn'"):
        train.fit(step, state, frozen, batches, num_steps=1, on_nonfinite="ignore")


def test_learning_rate_is_read_from_the_optimizer_state(tmp_path):
    _, wrapped, config, params, variables, batch = _problem()
    trainable, frozen = train.partition(variables, config)
    schedule = optax.linear_schedule(1e-2, 1e-3, 4)
    optimizer = train.adamw(schedule)
    step = train.jit_step(train.make_train_step(train.linen_forward(wrapped), _mse, optimizer))
    state = train.init_state(trainable, optimizer)
    for i in range(4):
        state, metrics = step(state, frozen, batch)
        assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(i)), rel=1e-6)
    # The injected schedule trains exactly as the schedule handed to optax.adamw.
    reference = optax.adamw(schedule, weight_decay=0.0)
    ref_step = train.jit_step(train.make_train_step(train.linen_forward(wrapped), _mse, reference))
    ref_state = train.init_state(trainable, reference)
    for _ in range(4):
        ref_state, ref_metrics = ref_step(ref_state, frozen, batch)
    assert _max_rel(state.trainable, ref_state.trainable) < 1e-6
    # An optimizer that does not hold its rate: no learning_rate key, and strict JSON lines.
    assert "learning_rate" not in ref_metrics
    log = tmp_path / "metrics.jsonl"
    train.fit(ref_step, ref_state, frozen, [batch], num_steps=5, log_path=str(log), progress=False)
    (record,) = [_strict_json(line) for line in log.read_text().splitlines()]
    assert set(record) == {"step", "time", "loss", "grad_norm"}


def test_jit_step_keeps_its_input_state_unless_asked_to_donate():
    _, wrapped, config, params, variables, batch = _problem()
    trainable, frozen = train.partition(variables, config)
    optimizer = train.adamw(1e-2)
    make = train.make_train_step(train.linen_forward(wrapped), _mse, optimizer)
    state = train.init_state(trainable, optimizer)
    step = train.jit_step(make)
    first, _ = step(state, frozen, batch)
    again, _ = step(state, frozen, batch)  # the same state, used twice
    _assert_trees_equal(first.trainable, again.trainable)
    donating = train.jit_step(make, donate=True)
    donated, _ = donating(state, frozen, batch)
    _assert_trees_equal(donated.trainable, first.trainable)
    assert all(x.is_deleted() for x in jax.tree.leaves(state.trainable))


def _resumable_problem():
    model, wrapped, config, params, variables, batch = _problem()
    config = dora_jax.DoRAConfig(targets=["fc1", "fc2"], rank=4, dropout=0.1)
    wrapped = dora_jax.linen.wrap(model, config)
    variables = wrapped.init_from_params(jax.random.key(3), params, batch["inputs"])
    trainable, frozen = train.partition(variables, config)
    optimizer = train.adamw(optax.cosine_decay_schedule(1e-2, 6), max_grad_norm=1.0)
    step = train.jit_step(train.make_train_step(train.linen_forward(wrapped), _mse, optimizer))
    batches = [
        {"inputs": batch["inputs"] + 0.1 * i, "targets": batch["targets"] * (1 + 0.1 * i)}
        for i in range(6)
    ]
    return trainable, frozen, optimizer, step, batches


def _crash_after(batches, n):
    """The batches, then a crash when batch ``n`` is requested."""
    for i, batch in enumerate(batches):
        if i == n:
            raise KeyboardInterrupt("interrupted")
        yield batch


def test_fit_resumes_from_checkpoints_where_the_data_left_off(tmp_path):
    from dora_jax.checkpoint import AdapterCheckpoints

    trainable, frozen, optimizer, step, batches = _resumable_problem()
    state = train.init_state(trainable, optimizer, rng=5)
    uninterrupted = train.fit(step, state, frozen, batches, num_steps=6, progress=False)

    with AdapterCheckpoints(tmp_path / "run") as checkpoints:
        with pytest.raises(KeyboardInterrupt):  # the run dies during step 5
            train.fit(
                step,
                state,
                frozen,
                _crash_after(batches, 4),
                num_steps=6,
                checkpoints=checkpoints,
                save_every=3,
                progress=False,
            )
        assert checkpoints.latest_step() == 3 and checkpoints.data_position(3) == 3
    with AdapterCheckpoints(tmp_path / "run") as checkpoints:
        fresh = train.init_state(trainable, optimizer, rng=5)
        resumed = train.fit(
            step,
            fresh,
            frozen,
            batches,
            num_steps=6,
            checkpoints=checkpoints,
            save_every=3,
            progress=False,
        )
        assert checkpoints.latest_step() == 6 and checkpoints.data_position(6) == 6
    assert int(resumed.step) == 6
    _assert_trees_equal(resumed.trainable, uninterrupted.trainable)
    _assert_trees_equal(resumed.opt_state, uninterrupted.opt_state)
    # Without the skip the resumed run would see batches 0-2 again: a different result.
    again = train.fit(
        step,
        train.init_state(trainable, optimizer, rng=5),
        frozen,
        batches[:3] * 2,
        num_steps=6,
        progress=False,
    )
    assert _max_rel(again.trainable, uninterrupted.trainable) > 1e-4


def test_fit_prints_small_learning_rates_readably(capsys):
    _, wrapped, config, params, variables, batch = _problem()
    trainable, frozen = train.partition(variables, config)
    optimizer = train.adamw(5e-5)
    step = train.jit_step(train.make_train_step(train.linen_forward(wrapped), _mse, optimizer))
    state = train.init_state(trainable, optimizer)
    train.fit(step, state, frozen, [batch], num_steps=1, evaluate=lambda s: {}, eval_every=1)
    printed = capsys.readouterr().out
    assert "step 1 " in printed and "learning_rate 5e-05" in printed


def test_fit_refuses_what_it_cannot_do():
    _, wrapped, config, params, variables, batch = _problem()
    trainable, frozen = train.partition(variables, config)
    optimizer = train.adamw(1e-2)
    step = train.jit_step(train.make_train_step(train.linen_forward(wrapped), _mse, optimizer))
    state = train.init_state(trainable, optimizer)
    with pytest.raises(ValueError, match="save_every=5 needs .* checkpoints="):
        train.fit(step, state, frozen, [batch], num_steps=1, save_every=5, progress=False)
    with pytest.raises(ValueError, match=r"`batches` ran out after 2 batches, at step 2 of num"):
        train.fit(step, state, frozen, [batch, batch], num_steps=3, progress=False)
