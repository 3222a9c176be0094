"""Adapter checkpoints under faults made for real on disk.

Each fault (a flipped byte, a truncated or deleted file, garbage or missing metadata,
an empty step folder, a second writer, a full disk, a SIGKILL mid-save) must give one
short error naming the folder, the step and the leaf, with nothing on stderr, and leave
the good steps restorable.
"""

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from dora_jax import checkpoint as ckpt
from dora_jax import train
from dora_jax.checkpoint import (
    AdapterCheckpoints,
    CheckpointError,
    CheckpointMismatchError,
    CorruptCheckpointError,
)

WORKER = Path(__file__).with_name("checkpoint_worker.py")
LEAF_A = "trainable/dora/fc/lora_a"
MAX_MESSAGE = 700  # far below TensorStore's 1,900-character messages


def _state(step=1, rank=8, seed=0, inputs=256, out=16):
    """A small TrainState; random values so the stored data does not compress away, and
    ``lora_a`` big enough (8 KiB) to be stored in a data file of its own rather than
    inline in the store's index."""
    rng = np.random.default_rng(seed)
    trainable = {
        "dora": {
            "fc": {
                "lora_a": jnp.asarray(rng.normal(size=(inputs, rank)), jnp.float32),
                "lora_b": jnp.asarray(rng.normal(size=(rank, out)), jnp.float32),
                "magnitude": jnp.asarray(rng.normal(size=(out,)), jnp.float32),
            }
        }
    }
    state = train.init_state(trainable, train.adamw(1e-2), rng=seed)
    return state.replace(step=jnp.asarray(step, jnp.int32))


def _assert_same(a, b):
    a, b = (ckpt._plain(s) for s in (a, b))  # typed rng keys as their raw data
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _saved(tmp_path, steps=(1, 2)):
    states = {s: _state(step=s, seed=s) for s in steps}
    with AdapterCheckpoints(tmp_path) as checkpoints:
        for s in steps:
            checkpoints.save(states[s])
    return states


def _data_files(folder: Path) -> list[Path]:
    """The data files of a step, biggest (the one holding ``lora_a``) first."""
    files = [p for p in (folder / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: -p.stat().st_size)


def _data_file(folder: Path) -> Path:
    return _data_files(folder)[0]


def _flip(path: Path, count: int = 1) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _check_message(error, tmp_path, step, leaf=None):
    text = str(error.value)
    assert str(tmp_path) in text and f"step {step}" in text, text
    if leaf is not None:
        assert repr(leaf) in text, text
    assert len(text) < MAX_MESSAGE, len(text)


@pytest.mark.parametrize("flipped", [1, 8])
def test_flipped_bytes_are_named(tmp_path, capfd, flipped):
    states = _saved(tmp_path)
    _flip(_data_file(tmp_path / "2"), flipped)
    with AdapterCheckpoints(tmp_path) as checkpoints:
        with pytest.raises(CorruptCheckpointError) as error:
            checkpoints.restore(_state())
        _check_message(error, tmp_path, 2, LEAF_A)
        # The same object still restores the intact step, and falls back to it.
        _assert_same(checkpoints.restore(_state(), step=1), states[1])
        with pytest.warns(UserWarning, match=r"restored step 1 .* skipped 1 damaged step"):
            _assert_same(checkpoints.restore(_state(), fallback=True), states[1])
    assert capfd.readouterr().err == ""


def test_a_flip_in_any_data_file_is_caught(tmp_path, capfd):
    _saved(tmp_path, steps=(1,))
    files = _data_files(tmp_path / "1")
    assert len(files) >= 3  # the value, the index, the per-process store
    with AdapterCheckpoints(tmp_path) as checkpoints:
        for path in files:
            original = path.read_bytes()
            _flip(path)
            with pytest.raises(CorruptCheckpointError) as error:
                checkpoints.restore(_state())
            _check_message(error, tmp_path, 1)
            path.write_bytes(original)
        checkpoints.restore(_state())
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("fault", ["truncate", "delete"])
def test_truncated_or_deleted_data_file(tmp_path, capfd, fault):
    states = _saved(tmp_path)
    data = _data_file(tmp_path / "2")
    if fault == "truncate":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    else:
        data.unlink()
    with AdapterCheckpoints(tmp_path) as checkpoints:
        with pytest.raises(CorruptCheckpointError, match="cannot be read|missing") as error:
            checkpoints.restore(_state())
        _check_message(error, tmp_path, 2, LEAF_A)
        _assert_same(checkpoints.restore(_state(), step=1), states[1])
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("fault", ["garbage", "delete"])
def test_damaged_tree_metadata(tmp_path, capfd, fault):
    states = _saved(tmp_path)
    metadata = tmp_path / "2" / "state" / "_METADATA"
    if fault == "garbage":
        metadata.write_text("{not json")
    else:
        metadata.unlink()
    with AdapterCheckpoints(tmp_path) as checkpoints:
        with pytest.raises(CorruptCheckpointError, match="tree metadata.*_METADATA") as error:
            checkpoints.restore(_state())
        _check_message(error, tmp_path, 2)
        _assert_same(checkpoints.restore(_state(), step=1), states[1])
    assert capfd.readouterr().err == ""


def test_run_folder_check_refuses_a_fresh_start_over_saved_steps(tmp_path):
    _saved(tmp_path)
    (tmp_path / "3").mkdir()  # an incomplete step does not count
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(steps \[1, 2\]\)"):
        ckpt.check_run_folder(tmp_path, resume=False)
    with pytest.raises(ValueError, match="none given"):
        ckpt.check_run_folder(None, resume=True)
    ckpt.check_run_folder(tmp_path, resume=True)  # continuing it is what resume means
    ckpt.check_run_folder(tmp_path / "absent", resume=False)
    ckpt.check_run_folder(None, resume=False)


def test_garbage_record_is_named(tmp_path, capfd):
    _saved(tmp_path)
    (tmp_path / "2" / "meta" / "dora_jax.json").write_text("{not json")
    with AdapterCheckpoints(tmp_path) as checkpoints:
        with pytest.raises(CorruptCheckpointError, match="unreadable") as error:
            checkpoints.restore(_state())
        _check_message(error, tmp_path, 2)
    assert capfd.readouterr().err == ""


def test_empty_latest_step_folder(tmp_path, capfd):
    states = _saved(tmp_path)
    (tmp_path / "3").mkdir()
    assert ckpt.saved_steps(tmp_path) == [1, 2]  # from the files alone, no lock taken
    assert ckpt.saved_steps(tmp_path / "absent") == []
    with AdapterCheckpoints(tmp_path) as checkpoints:
        assert checkpoints.latest_step() == 2  # not the empty folder
        with pytest.raises(CorruptCheckpointError, match="is empty") as error:
            checkpoints.restore(_state())
        _check_message(error, tmp_path, 3)
        _assert_same(checkpoints.restore(_state(), step=2), states[2])
        with pytest.warns(UserWarning, match="restored step 2"):
            _assert_same(checkpoints.restore(_state(), fallback=True), states[2])
    assert capfd.readouterr().err == ""


def test_no_intact_step_left(tmp_path):
    _saved(tmp_path, steps=(1,))
    _data_file(tmp_path / "1").unlink()
    with AdapterCheckpoints(tmp_path) as checkpoints:
        with pytest.raises(CorruptCheckpointError, match="no intact step.*step 1"):
            checkpoints.restore(_state(), fallback=True)


def test_other_rank_is_refused_naming_the_leaf(tmp_path, capfd):
    _saved(tmp_path, steps=(1,))
    with AdapterCheckpoints(tmp_path) as checkpoints:
        with pytest.raises(CheckpointMismatchError) as error:
            checkpoints.restore(_state(rank=4))
    text = str(error.value)
    assert f"leaf {LEAF_A!r}: stored shape (256, 8) float32, requested shape (256, 4)" in text
    _check_message(error, tmp_path, 1)
    assert capfd.readouterr().err == ""


def test_other_config_or_base_is_refused(tmp_path):
    config = dora_jax.DoRAConfig(targets=["fc"], rank=2, alpha=8.0)
    base = {"params": {"fc": {"kernel": jnp.zeros((6, 64)), "bias": jnp.zeros((64,))}}}
    state = _state()
    with AdapterCheckpoints(tmp_path, config=config, base=base) as checkpoints:
        checkpoints.save(state)
        _assert_same(checkpoints.restore(_state(seed=5)), state)
    other = dora_jax.DoRAConfig(targets=["fc"], rank=2, alpha=16.0)
    with (
        AdapterCheckpoints(tmp_path, config=other, base=base) as checkpoints,
        pytest.raises(CheckpointMismatchError, match="alpha: checkpoint 8.0, given 16.0"),
    ):
        checkpoints.restore(state)
    other_base = {"params": {"fc": {"kernel": jnp.zeros((7, 64)), "bias": jnp.zeros((64,))}}}
    with (
        AdapterCheckpoints(tmp_path, config=config, base=other_base) as checkpoints,
        pytest.raises(
            CheckpointMismatchError,
            match=r"another base model: leaf 'params/fc/kernel': stored shape \(6, 64\) "
            r"float32, given base shape \(7, 64\) float32",
        ),
    ):
        checkpoints.restore(state)


def test_nonfinite_adapters_are_refused(tmp_path):
    state = _state()
    bad = state.trainable["dora"]["fc"]["lora_b"].at[0, 3].set(jnp.nan).at[1, 0].set(jnp.inf)
    state = state.replace(
        trainable={"dora": {"fc": {**state.trainable["dora"]["fc"], "lora_b": bad}}}
    )
    with AdapterCheckpoints(tmp_path) as checkpoints:
        with pytest.raises(
            CheckpointError, match=r"NaN or Inf in leaf trainable/dora/fc/lora_b \(2 of 128"
        ):
            checkpoints.save(state)
        assert checkpoints.all_steps() == [] and checkpoints.latest_step() is None
        assert checkpoints.save(state, allow_nonfinite=True)
        restored = checkpoints.restore(_state())
    assert np.isnan(restored.trainable["dora"]["fc"]["lora_b"][0, 3])


def test_used_folder_is_refused_and_force_keeps_newer_steps(tmp_path):
    _saved(tmp_path, steps=(5, 6))
    with AdapterCheckpoints(tmp_path, keep=2) as checkpoints:
        with pytest.raises(CheckpointError, match=r"already holds step\(s\) \[5, 6\] at or above"):
            checkpoints.save(_state(step=5, seed=9))
        assert checkpoints.save(_state(step=1, seed=9), force=True)
        assert checkpoints.save(_state(step=2, seed=9), force=True)
        assert checkpoints.save(_state(step=3, seed=9), force=True)
        assert checkpoints.all_steps() == [2, 3, 5, 6]  # 1 is beyond keep; 5, 6 are newer
        _assert_same(checkpoints.restore(_state(), step=3), _state(step=3, seed=9))
        # A step this object saved is not written twice.
        assert checkpoints.save(_state(step=3, seed=9)) is False


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_leaves_no_temporary_folder(tmp_path, monkeypatch, async_save):
    states = _saved(tmp_path, steps=(1,))

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt, "_write_json", full)
    with AdapterCheckpoints(tmp_path, async_save=async_save) as checkpoints:
        with pytest.raises(CheckpointError, match="saving step 2 to .* failed") as error:
            checkpoints.save(_state(step=2))
            checkpoints.wait()
        assert str(tmp_path) in str(error.value) and "No space left" in str(error.value)
        assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []
        assert checkpoints.all_steps() == [1]
        monkeypatch.undo()
        _assert_same(checkpoints.restore(_state()), states[1])
        assert checkpoints.save(_state(step=2))  # the same step can be written again


def test_data_position_is_recorded(tmp_path):
    with AdapterCheckpoints(tmp_path) as checkpoints:
        assert checkpoints.data_position() is None
        checkpoints.save(_state(step=1), data_position=10)
        checkpoints.save(_state(step=2), data_position=20)
        checkpoints.save(_state(step=3))
        assert checkpoints.data_position(1) == 10 and checkpoints.data_position(2) == 20
        assert checkpoints.data_position() is None
    with AdapterCheckpoints(tmp_path) as checkpoints:
        assert checkpoints.data_position(2) == 20


def test_background_save_while_training_goes_on(tmp_path):
    @jax.jit
    def update(state):  # stands for a train step that donates its state
        return state.replace(
            step=state.step + 1, trainable=jax.tree.map(lambda x: x * 1.5, state.trainable)
        )

    update = jax.jit(update, donate_argnums=0)
    state = _state(step=1)
    snapshot = jax.device_get(state)
    with AdapterCheckpoints(tmp_path, async_save=True) as checkpoints:
        assert checkpoints.save(state, data_position=7)
        for _ in range(3):  # training goes on; the donated buffers are reused
            state = update(state)
        checkpoints.wait()
        assert checkpoints.latest_step() == 1
        restored = checkpoints.restore(_state(seed=3))
        assert checkpoints.data_position() == 7
        assert checkpoints.save(state)  # step 4, finished by close()
    _assert_same(restored, snapshot)
    with AdapterCheckpoints(tmp_path) as checkpoints:
        _assert_same(checkpoints.restore(_state()), jax.device_get(state))


def _worker(mode, directory):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), mode, str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def test_second_writer_is_refused_and_a_dead_writers_lock_taken_over(tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    from checkpoint_worker import state_at

    writer = _worker("hold", tmp_path)
    try:
        assert writer.stdout.readline().strip() == "ready"
        with AdapterCheckpoints(tmp_path, keep=2) as checkpoints:
            with pytest.raises(CheckpointError, match=f"another writer \\(pid {writer.pid} on"):
                checkpoints.save(state_at(2))
            assert checkpoints.latest_step() == 1  # reading needs no lock
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()
    # The dead writer's lock file is still there, with its pid; it is taken over.
    assert f"pid {writer.pid}" in (tmp_path / ckpt.LOCK).read_text()
    with AdapterCheckpoints(tmp_path, keep=2) as checkpoints:
        assert checkpoints.save(state_at(2))
        assert f"pid {os.getpid()}" in (tmp_path / ckpt.LOCK).read_text()


def test_second_writer_in_the_same_process_is_refused(tmp_path):
    first = AdapterCheckpoints(tmp_path)
    first.save(_state(step=1))
    with (
        AdapterCheckpoints(tmp_path) as second,
        pytest.raises(CheckpointError, match="another AdapterCheckpoints of this process"),
    ):
        second.save(_state(step=2))
    first.close()  # releases the lock
    with AdapterCheckpoints(tmp_path) as second:
        assert second.save(_state(step=2))


def test_sigkill_during_saves_keeps_earlier_steps(tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    from checkpoint_worker import state_at

    writer = _worker("loop", tmp_path)
    try:
        for line in writer.stdout:
            if line.strip() == "saved 3":
                break
        writer.send_signal(signal.SIGKILL)  # somewhere in the save of step 4 or 5
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()
    with AdapterCheckpoints(tmp_path, keep=2) as checkpoints:
        latest = checkpoints.latest_step()
        assert latest >= 3
        like = state_at(0)
        _assert_same(checkpoints.restore(like, step=latest), state_at(latest))
        # A new writer takes over, removes the killed save's temporary folder and goes on.
        assert checkpoints.save(state_at(latest + 1))
        assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]
        _assert_same(checkpoints.restore(like), state_at(latest + 1))
