"""Adapter-only Orbax checkpoints that resume training exactly, and say so when they cannot.

A checkpoint holds a :class:`~dora_jax.train.TrainState`: the step, the trainable tree
(adapters and ``modules_to_save``), its optimizer state and the rng key; never the
frozen base, which the user loads from the pretrained checkpoint as before. Restoring
into a state of the same structure and continuing gives the same adapters, bit for bit,
as never stopping.

Each step folder is written by Orbax (into a temporary folder, renamed when complete)
and holds two items::

    <step>/state/   the arrays (Orbax's StandardSave, OCDBT), plus ``dora_jax_stored.json``:
                    the sha256 of every stored value and every file, read back from disk
                    once Orbax has written them (before the rename)
    <step>/meta/    ``dora_jax.json``: step, data position, DoRA config, base fingerprint,
                    and per leaf its path, shape, dtype and the sha256 of its bytes

One process writes into a folder at a time (a lock file, see
:class:`AdapterCheckpoints`); saves can run in the background (``async_save=True``).
Restoring checks, in order: the record is readable; the config, the base fingerprint
and every leaf's shape and dtype match what is asked for (:class:`CheckpointMismatchError`);
every stored value and file still has its checksum; Orbax reads it; every restored leaf
has the checksum of the bytes that were saved (:class:`CorruptCheckpointError`). Each
error is one short message naming the folder, the step and the leaf; the underlying
error is chained as ``__cause__``.

>>> import tempfile, jax.numpy as jnp, optax
>>> from dora_jax import train
>>> state = train.init_state({"dora": {"lora_b": jnp.zeros((2, 3))}}, optax.adam(1e-3))
>>> with AdapterCheckpoints(tempfile.mkdtemp()) as checkpoints:
...     _ = checkpoints.save(state, data_position=0)
...     restored = checkpoints.restore(state)
...     position = checkpoints.data_position()
>>> int(restored.step), position
(0, 0)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts  # Orbax's storage layer (a dependency of orbax-checkpoint)

from dora_jax.config import DoRAConfig
from dora_jax.train import TrainState

FORMAT = 1
RECORD = "dora_jax.json"  # in <step>/meta/
STORED = "dora_jax_stored.json"  # in <step>/state/
LOCK = ".dora_jax.lock"
_TMP = getattr(ocp.utils, "TMP_DIR_SUFFIX", ".orbax-checkpoint-tmp")  # Orbax's temporary folders
_EMPTY = hashlib.sha256(b"").hexdigest()
# Files of Orbax's OCDBT store (data files, b-tree nodes, manifests).
_OCDBT = re.compile(r"(^|/)(d/|ocdbt\.process_\d+/)|(^|/)manifest\.ocdbt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or restored as asked (names folder and step)."""


class CorruptCheckpointError(CheckpointError):
    """A step folder that is damaged or incomplete; ``restore(fallback=True)`` skips it."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint that does not fit what it is restored into (shape, config or base)."""


class AdapterCheckpoints:
    """A folder of adapter-only checkpoints, one per saved step, the newest ``keep`` kept.

    Args:
      directory: where the checkpoints live (created if missing).
      keep: how many checkpoints to keep, counting the one just saved and older ones;
        steps newer than the one saved (possible only with ``save(force=True)``) are
        never deleted.
      config: the :class:`~dora_jax.DoRAConfig` of the adapters, recorded with every
        checkpoint and compared on restore (a different one is refused, naming both).
      base: the frozen tree (the ``frozen`` of :func:`dora_jax.train.partition`); the
        path, shape and dtype of each of its leaves are recorded and compared on restore.
      async_save: write in the background: ``save`` returns once the arrays are copied
        to host memory and their checksums taken; the next ``save``, ``restore``,
        :meth:`wait` or :meth:`close` waits for the write and raises its errors.

    Only one process may write into a folder: the first ``save`` takes a lock
    (``.dora_jax.lock``, holding the owner's pid and host; released by the kernel when
    the process dies, so a crashed writer's lock is taken over), and another writer's
    ``save`` is refused. Readers take no lock.
    """

    def __init__(
        self,
        directory: str | Path,
        keep: int = 3,
        *,
        config: DoRAConfig | None = None,
        base: Any = None,
        async_save: bool = False,
    ):
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"AdapterCheckpoints: keep must be an integer >= 1; got {keep!r}.")
        if config is not None and not isinstance(config, DoRAConfig):
            raise TypeError(f"AdapterCheckpoints: config must be a DoRAConfig; got {config!r}.")
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.async_save = async_save
        self._config = None if config is None else _config_record(config)
        self._base = None if base is None else _fingerprint(base)
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        state_handler, meta_handler = _StateHandler(), ocp.JsonCheckpointHandler(filename=RECORD)
        registry.add("state", ocp.args.StandardSave, state_handler)
        registry.add("state", ocp.args.StandardRestore, state_handler)
        registry.add("meta", ocp.args.JsonSave, meta_handler)
        registry.add("meta", ocp.args.JsonRestore, meta_handler)
        # No max_to_keep: Orbax's deletes by order of saving (a forced older step would
        # evict a newer one), and after a failed background save too.
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )
        self._lock_file = None
        self._pending: int | None = None  # step of an unfinished background save
        self._known: set[int] = set()  # steps this object saved or restored

    # Saving ------------------------------------------------------------------------

    def save(
        self,
        state: TrainState,
        *,
        data_position: int | None = None,
        force: bool = False,
        allow_nonfinite: bool = False,
    ) -> bool:
        """Save ``state`` under its step; returns whether a checkpoint was written.

        Args:
          state: the training state.
          data_position: how far into the data the run is (for example the number of
            batches consumed), recorded and returned by :meth:`data_position`.
          force: write even though the folder holds steps at or above this one (a
            fresh run into a used folder); those newer steps are kept, one of the same
            number is replaced.
          allow_nonfinite: save NaN or Inf values (refused by default).

        Returns ``False`` (writing nothing) for a step this object already saved or
        restored: the same state.

        Raises:
          CheckpointError: the folder holds steps at or above this one (without
            ``force``); another process writes into the folder; a leaf holds NaN or
            Inf; the write failed (the partial step folder is removed).
        """
        if data_position is not None and (
            not isinstance(data_position, int | np.integer) or data_position < 0
        ):
            raise ValueError(f"data_position must be an integer >= 0; got {data_position!r}.")
        self._finish_pending()
        step = int(np.max(jax.device_get(state.step)))
        if step in self._known:
            return False
        self._take_lock()
        folders = self._step_folders()
        newer = [s for s in folders if s >= step]
        if newer and not force:
            raise CheckpointError(
                f"{self.directory} already holds step(s) {newer} at or above step {step}: "
                "saving would mix two runs. Restore from them (restore(like)), use another "
                "folder, or pass force=True to write step "
                f"{step} beside them (newer steps are kept)."
            )
        host = _host_copy(_plain(state))
        if not allow_nonfinite:
            _check_finite(host, f"refusing to save step {step} to {self.directory}")
        record = {
            "format": FORMAT,
            "step": step,
            "data_position": None if data_position is None else int(data_position),
            "config": self._config,
            "base": self._base,
            "leaves": _leaf_records(host),
        }
        if step in folders:
            self.manager.delete(step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(record))
        try:
            # force: the checks above replace Orbax's should_save (which says a silent no).
            self.manager.save(step, args=args, force=True)
        except Exception as error:
            self._failed_save(step, error)
        self._known.add(step)
        if self.async_save:
            self._pending = step
        else:
            self._finish(step)
        return True

    def wait(self) -> None:
        """Wait for a background save to be written; raises its error, if any."""
        self._finish_pending()

    def _finish_pending(self) -> None:
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            self._known.discard(step)
            self._failed_save(step, error)
        self._finish(step)

    def _finish(self, step: int) -> None:
        """After ``step`` is complete: delete the older steps beyond ``keep``."""
        older = [s for s in self._step_folders() if s < step]
        for old in older[: max(0, len(older) - (self.keep - 1))]:
            self.manager.delete(old)

    def _failed_save(self, step: int, error: Exception):
        # We hold the lock, so every temporary folder here is a write of ours.
        if jax.process_index() == 0:
            self._remove_temporary_folders()
        self.manager.reload()
        raise CheckpointError(
            f"saving step {step} to {self.directory} failed ({_short(error)}); "
            "its partial folder was removed, earlier steps are untouched."
        ) from error

    def _take_lock(self) -> None:
        if self._lock_file is not None or jax.process_index() != 0:
            return
        path = self.directory / LOCK
        file = open(path, "a+")  # noqa: SIM115 (held until close)
        if not _try_lock(file):
            file.seek(0)
            owner = file.read().strip() or "an unknown process"
            file.close()
            if owner.startswith(f"pid {os.getpid()} "):
                owner = "another AdapterCheckpoints of this process, not closed"
            raise CheckpointError(
                f"{self.directory} is being written by another writer ({owner}, lock "
                f"{path}); two writers would delete each other's checkpoints. Use "
                "another folder, or close the other writer first."
            )
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self._lock_file = file
        self._remove_temporary_folders()  # left by a writer that was killed mid-save

    def _remove_temporary_folders(self) -> None:
        for path in self.directory.iterdir():
            if _TMP in path.name and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    # Reading -----------------------------------------------------------------------

    def restore(
        self, like: TrainState, step: int | None = None, *, fallback: bool = False
    ) -> TrainState:
        """The state saved at ``step`` (default: the newest step folder), shaped like ``like``.

        Args:
          like: a state of the structure, shapes, dtypes and shardings wanted.
          step: the step to restore; default the newest step folder (complete or not).
          fallback: when that step is damaged or incomplete, restore the newest intact
            older one instead, with a warning naming the steps skipped.

        Raises:
          FileNotFoundError: the folder holds no checkpoint (or not that step).
          CorruptCheckpointError: the step is damaged or incomplete (and no intact
            older one with ``fallback``).
          CheckpointMismatchError: a leaf's shape or dtype, the config or the base
            differ from the checkpoint's.
        """
        self._finish_pending()
        folders = self._step_folders()
        if step is None:
            wanted = folders[-1] if folders else None
        else:
            wanted = step if step in folders else None
        if wanted is None:
            raise FileNotFoundError(
                f"no adapter checkpoint for step {step} in {self.directory} "
                f"(steps there: {folders})."
            )
        candidates = [s for s in reversed(folders) if s <= wanted] if fallback else [wanted]
        skipped: list[str] = []
        for candidate in candidates:
            try:
                restored = self._restore_step(like, candidate)
            except CorruptCheckpointError as error:
                if not fallback:
                    error.args = (
                        f"{error} restore(..., fallback=True) restores the newest "
                        "intact step before it.",
                    )
                    raise
                skipped.append(str(error))
                continue
            if skipped:
                warnings.warn(
                    f"restored step {candidate} from {self.directory}; skipped "
                    f"{len(skipped)} damaged step(s):\n  " + "\n  ".join(skipped),
                    stacklevel=2,
                )
            self._known.add(candidate)
            return restored
        raise CorruptCheckpointError(
            f"no intact step in {self.directory} at or below step {wanted}:\n  "
            + "\n  ".join(skipped)
        )

    def _restore_step(self, like: TrainState, step: int) -> TrainState:
        where = f"step {step} in {self.directory}"
        record = self._record(step)
        self._check_fits(record, like, where)
        names = {leaf["key"]: path for path, leaf in record["leaves"].items()}
        _check_stored(self.directory / str(step) / "state", names, where)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _plain(like))
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )["state"]
        except Exception as error:
            leaf = re.search(r'Error reading "([^"/]+)/', _chain(error))
            what = f"leaf {names.get(leaf.group(1), leaf.group(1))!r}" if leaf else "it"
            raise CorruptCheckpointError(
                f"{where}: Orbax could not read {what} ({_short(error)})."
            ) from error
        for path, value in _flatten(restored):
            if _sha256(np.asarray(jax.device_get(value))) != record["leaves"][path]["sha256"]:
                raise CorruptCheckpointError(
                    f"{where}: leaf {path!r} restored with other bytes than were saved "
                    "(checksum mismatch)."
                )
        return like.replace(
            step=restored["step"],
            trainable=restored["trainable"],
            opt_state=restored["opt_state"],
            rng=jax.random.wrap_key_data(restored["rng"], impl=jax.random.key_impl(like.rng)),
        )

    def _record(self, step: int) -> dict:
        folder = self.directory / str(step)
        path = folder / "meta" / RECORD
        where = f"step {step} in {self.directory}"
        if not path.is_file():
            state = "is empty" if not any(folder.iterdir()) else f"has no {path.name} record"
            raise CorruptCheckpointError(
                f"{where} {state}: an incomplete or foreign step folder ({folder})."
            )
        try:
            record = json.loads(path.read_text())
            if record.get("format") != FORMAT or not isinstance(record.get("leaves"), dict):
                raise ValueError(f"format {record.get('format')!r}, expected {FORMAT}")
        except (ValueError, AttributeError, UnicodeDecodeError) as error:
            raise CorruptCheckpointError(
                f"{where}: its record {path} is unreadable ({_short(error)})."
            ) from error
        return record

    def _check_fits(self, record: dict, like: TrainState, where: str) -> None:
        if self._config is not None and record["config"] is not None:
            diff = [
                f"{k}: checkpoint {record['config'].get(k)!r}, given {v!r}"
                for k, v in self._config.items()
                if record["config"].get(k) != v
            ]
            if diff:
                raise CheckpointMismatchError(
                    f"{where} was saved with another DoRA config: " + "; ".join(diff) + "."
                )
        if self._base is not None and record["base"] is not None:
            diff = _compare(record["base"], self._base, "given base")
            if diff:
                raise CheckpointMismatchError(
                    f"{where} belongs to another base model: {_first_differences(diff)}."
                )
        wanted = _fingerprint(_plain(like))
        stored = {p: [leaf["shape"], leaf["dtype"]] for p, leaf in record["leaves"].items()}
        diff = _compare(stored, wanted, "requested")
        if diff:
            raise CheckpointMismatchError(
                f"{where} does not fit the state it is restored into: {_first_differences(diff)}."
            )

    def data_position(self, step: int | None = None) -> int | None:
        """The data position saved with ``step`` (default: the latest complete step).

        ``None`` when it was saved without one, or when the folder holds no checkpoint
        and no step is asked for.
        """
        self._finish_pending()
        if step is None:
            step = self.latest_step()
            if step is None:
                return None
        elif step not in self._step_folders():
            raise FileNotFoundError(f"no adapter checkpoint for step {step} in {self.directory}.")
        return self._record(step)["data_position"]

    def latest_step(self) -> int | None:
        """The newest complete step (empty or incomplete step folders do not count)."""
        complete = [s for s in self._step_folders() if _complete(self.directory / str(s))]
        return complete[-1] if complete else None

    def all_steps(self) -> list[int]:
        """Every step folder, complete or not, in increasing order."""
        return self._step_folders()

    def _step_folders(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def close(self) -> None:
        """Finish a background save, close Orbax's manager and release the lock."""
        try:
            self._finish_pending()
        finally:
            self.manager.close()
            if self._lock_file is not None:
                self._lock_file.close()  # releases the lock
                self._lock_file = None

    def __enter__(self) -> AdapterCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _StateHandler(ocp.StandardCheckpointHandler):
    """Orbax's StandardCheckpointHandler that, once the arrays are on disk and before the
    step folder is renamed into place, records the sha256 of every stored value."""

    def finalize(self, directory) -> None:
        super().finalize(directory)  # merges the per-process OCDBT stores
        if jax.process_index() != 0:
            return
        directory = Path(directory)
        stored: dict[str, dict[str, str]] = {"values": {}, "files": {}}
        if (directory / "manifest.ocdbt").is_file():
            store = _open_store(directory)
            keys = [k.decode() for k in store.list().result()]
            reads = {k: store.read(k) for k in keys}
            stored["values"] = {
                k: hashlib.sha256(r.result().value).hexdigest() for k, r in reads.items()
            }
        for path in sorted(directory.rglob("*")):
            name = path.relative_to(directory).as_posix()
            if path.is_file():
                stored["files"][name] = hashlib.sha256(path.read_bytes()).hexdigest()
        _write_json(directory / STORED, stored)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1))


def _open_store(directory: Path):
    return ts.KvStore.open({"driver": "ocdbt", "base": f"file://{directory}/"}).result()


def _check_stored(directory: Path, names: Mapping[str, str], where: str) -> None:
    """Raise if a stored value or file lost its checksum, naming the leaf it belongs to.

    Values first (each belongs to one leaf); then every file, which also catches damage
    in a part of the store that no value read touches.
    """
    path = directory / STORED
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(
            f"{where}: its record {path} is missing or unreadable ({_short(error)})."
        ) from error

    def owner(key: str) -> str:
        name = key.split("/")[0]
        if name in names:
            return f"leaf {names[name]!r}"
        return "the array store" if _OCDBT.search(key) else "the tree metadata"

    if stored["values"]:
        try:
            store = _open_store(directory)
            reads = {k: store.read(k) for k in stored["values"]}
        except Exception as error:
            raise CorruptCheckpointError(
                f"{where}: the array store in {directory} cannot be opened ({_short(error)})."
            ) from error
        damaged: list[tuple[str, str, Exception | None]] = []
        for key, digest in stored["values"].items():
            try:
                result = reads[key].result()
            except Exception as error:
                damaged.append((key, "cannot be read", error))
                continue
            if result.state != "value" or (not result.value and digest != _EMPTY):
                damaged.append((key, "is missing", None))  # a deleted data file reads empty
            elif hashlib.sha256(result.value).hexdigest() != digest:
                damaged.append((key, f"differs from what was written ({key})", None))
        unreadable = [d for d in damaged if d[2] is not None]
        if damaged and len(unreadable) == len(stored["values"]):
            raise CorruptCheckpointError(
                f"{where}: none of the stored values in {directory} can be read, the "
                f"store's index is damaged ({_short(unreadable[0][2])})."
            ) from unreadable[0][2]
        if damaged:
            key, what, error = damaged[0]
            leaves = {owner(k) for k, _, _ in damaged} - {owner(key)}
            more = f" (and {len(leaves)} more leaves)" if leaves else ""
            reason = f" ({_short(error)})" if error is not None else ""
            raise CorruptCheckpointError(
                f"{where}: {owner(key)} {what} in {directory}{more}{reason}."
            ) from error
    for name, digest in stored["files"].items():
        file = directory / name
        if not file.is_file():
            raise CorruptCheckpointError(f"{where}: {owner(name)}: file {file} is missing.")
        if hashlib.sha256(file.read_bytes()).hexdigest() != digest:
            raise CorruptCheckpointError(
                f"{where}: {owner(name)}: file {file} differs from what was written "
                "(checksum mismatch)."
            )


def saved_steps(directory: str | Path) -> list[int]:
    """The complete steps saved in ``directory`` (an :class:`AdapterCheckpoints` folder),
    in increasing order, read from the file system alone: no Orbax manager, no lock.
    Empty when the folder does not exist. For "is this folder already used?" before
    opening it."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and _complete(p))


def check_run_folder(directory: str | Path | None, resume: bool) -> None:
    """Before a training run: refuse to resume without a folder, and to start afresh in a
    folder that holds another run's complete steps (which :func:`~dora_jax.train.fit`
    would silently continue instead).

    Args:
      directory: the run's :class:`AdapterCheckpoints` folder, or ``None`` for no
        checkpoints.
      resume: the run means to continue the one saved in ``directory``.
    Raises:
      ValueError: naming the folder and its saved steps.
    """
    if resume and directory is None:
        raise ValueError("resuming continues the run saved in a checkpoint folder; none given.")
    steps = [] if directory is None or resume else saved_steps(directory)
    if steps:
        raise ValueError(
            f"{directory} holds checkpoints of an earlier run (steps {steps}): resume it, "
            "or choose another folder."
        )


def _complete(folder: Path) -> bool:
    return (folder / "meta" / RECORD).is_file() and (folder / "state" / STORED).is_file()


def _try_lock(file) -> bool:
    """An exclusive, non-blocking lock on ``file`` held until it is closed."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _plain(state: TrainState) -> dict:
    """The state as a tree of plain arrays (typed rng keys become their raw data)."""
    return {
        "step": state.step,
        "trainable": state.trainable,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng),
    }


def _host_copy(tree: Any) -> Any:
    """Host copies of every leaf: what is checksummed is what is written, and a donating
    train step run meanwhile cannot touch them."""
    return jax.tree.map(lambda x: np.array(jax.device_get(x), copy=True), tree)


def _path(keys) -> str:
    parts = []
    for key in keys:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _flatten(tree: Any) -> list[tuple[str, Any]]:
    return [(_path(keys), leaf) for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _leaf_records(host: Any) -> dict[str, dict]:
    names = jax.tree.leaves(ocp.tree.get_param_names(host, include_empty_nodes=False))
    return {
        path: {
            "shape": list(value.shape),
            "dtype": value.dtype.name,
            "sha256": _sha256(value),
            "key": name,
        }
        for (path, value), name in zip(_flatten(host), names, strict=True)
    }


def _check_finite(host: Any, what: str) -> None:
    bad = [
        f"{path} ({int(np.sum(~np.isfinite(v)))} of {v.size} values)"
        for path, v in _flatten(host)
        if jnp.issubdtype(v.dtype, jnp.inexact) and not np.all(np.isfinite(v))
    ]
    if bad:
        raise CheckpointError(
            f"{what}: NaN or Inf in leaf "
            + ", ".join(bad[:5])
            + (f" and {len(bad) - 5} more leaves" if len(bad) > 5 else "")
            + ". Pass allow_nonfinite=True to save it anyway."
        )


def _fingerprint(tree: Any) -> dict[str, list]:
    """``{leaf path: [shape, dtype]}``: what a tree is made of, without its values."""
    return {
        path: [list(np.shape(leaf)), jnp.dtype(leaf.dtype).name]
        for path, leaf in _flatten(tree)
        if hasattr(leaf, "dtype")
    }


def _compare(stored: Mapping[str, list], given: Mapping[str, list], name: str) -> list[str]:
    """Differences between two fingerprints, one line each."""
    diff = [
        f"leaf {p!r}: stored shape {tuple(stored[p][0])} {stored[p][1]}, "
        f"{name} shape {tuple(given[p][0])} {given[p][1]}"
        for p in stored
        if p in given and [list(stored[p][0]), stored[p][1]] != [list(given[p][0]), given[p][1]]
    ]
    diff += [f"leaf {p!r} only in the checkpoint" for p in stored if p not in given]
    diff += [f"leaf {p!r} only in the {name} tree" for p in given if p not in stored]
    return diff


def _first_differences(diff: list[str], shown: int = 5) -> str:
    more = f"; ... {len(diff) - shown} more" if len(diff) > shown else ""
    return "; ".join(diff[:shown]) + more


def _config_record(config: DoRAConfig) -> dict:
    record = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "adapter_dtype":
            value = jnp.dtype(value).name
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        record[field.name] = value
    return json.loads(json.dumps(record))  # the form it takes after a round trip


def _chain(error: BaseException) -> str:
    texts = []
    while error is not None and len(texts) < 8:
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


def _short(error: BaseException) -> str:
    """The first line of the error's root cause, shortened (TensorStore's run to 2,000
    characters)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
