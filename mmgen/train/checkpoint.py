"""Orbax checkpoints of the training state and the input pipeline's position.

One ``CheckpointManager`` per workdir (``workdir/checkpoints/<step>/``) with three
items: ``state`` (the sharded NNX state, written asynchronously by every process),
``data`` (each process's iterator state as ``process_<i>-of-<n>.json``, with a CRC of
its payload) and ``integrity`` (written by process 0: a fingerprint of every array).
Keeps the newest ``keep_last`` and the best ``keep_best`` by ``best_metric``.
Orbax writes a step into a temporary directory and renames it only when every
item is complete, so a save killed half-way leaves no directory that looks like a
checkpoint; ``cleanup_tmp_directories`` removes such leftovers at the next start.
Restoring takes the target shardings, so a checkpoint written on one mesh loads on
any other (resharding restore).

Only finite states are written: ``save`` inspects the state it is given (one jitted
pass over every array, a few scalars back to the host) and refuses one holding a
NaN or an Inf (``NonFiniteState``). The same pass computes each array's fingerprint,
two 32-bit sums of its raw words with odd weights (any change inside one 32-bit word
always changes them, other damage with probability about 1 - 2**-64); the cost is
one read of the state in device memory per save and per restore, nothing on the
host and no extra file I/O. ``restore`` recomputes the fingerprints of what it read
and compares; an unreadable or mismatching step raises ``CheckpointDamaged``.
``restore_newest`` walks the steps newest first and takes the first that restores and
verifies, with one warning line per damaged step (moved aside to
``workdir/checkpoints.damaged/<step>``, never deleted, when the caller owns the
workdir); every process takes the same step. Steps written before fingerprints
existed load unverified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import shutil
import sys
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from mmgen import fs
from mmgen.errors import UserError
from mmgen.parallel import runtime

log = logging.getLogger(__name__)

DAMAGED = "checkpoints.damaged"  # beside checkpoints/: steps that failed to restore or verify
FINGERPRINT_VERSION = 1


class CheckpointDamaged(Exception):
    """A step that cannot be read back as it was written; ``reason`` is one line."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint step {step} is damaged: {reason}")
        self.step, self.reason = step, reason


class NoUsableCheckpoint(Exception):
    """Every step in the directory is damaged; the message (one line) names each with its reason."""


class NonFiniteState(RuntimeError):
    """A state with NaN/Inf values was about to be saved; nothing was written."""

    def __init__(self, step: int, names: list[str], total: int):
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        super().__init__(f"the state at step {step} holds non-finite values in {len(names)} of {total} arrays "
                         f"({shown})")
        self.step, self.names, self.total = step, names, total


_quieted = False


def _quiet_orbax_echoes() -> None:
    """Keep a failed read or write to the one line the caller reports.

    When a tensorstore read or write fails, Orbax logs the exception with its traceback
    (absl, "_SignalingThread.run() raised an exception") before raising it to us; the
    reads and writes still in flight complete later into a closed event loop (printed
    as unraisable "Event loop is closed" tracebacks), leave futures whose error is never
    retrieved (logged by asyncio) and coroutines that only die at interpreter exit.
    The failure itself reaches the caller as an exception, which reports it once.
    """
    global _quieted
    if _quieted:
        return
    _quieted = True
    previous = sys.unraisablehook

    def hook(unraisable):
        error, obj = unraisable.exc_value, unraisable.object
        code = getattr(obj, "cr_code", None)
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(lambda record: "exception was never retrieved" not in str(record.msg))
    dropped = ("_SignalingThread.run() raised an exception", "in background save thread", "Save Finalize thread",
               # and two notes on every read-only manager (eval, sample, a resume's step count)
               "read_only=True, setting save_interval_steps=0", "Given directory is read only")
    logging.getLogger("absl").addFilter(lambda record: not any(text in str(record.msg) for text in dropped))


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) says the disk or the quota is full."""
    for _ in range(10):
        if error is None:
            return False
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


class DiskFull(UserError):
    """Writing a checkpoint failed for want of space; the newest complete checkpoint is kept."""


def _one_line(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    text = f"{type(e).__name__}: {text}" if not isinstance(e, CheckpointDamaged) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- state inspection
def _words(x) -> jax.Array:
    """The raw bits of ``x`` as a flat uint32 vector (narrower types widened, wider ones split)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = jnp.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    bits = jax.lax.bitcast_convert_type(x, unsigned)
    return bits.astype(jnp.uint32).reshape(-1)


def _inspect_one(x) -> jax.Array:
    """``[a, b, bad]`` (uint32) of one array in one reduction: its fingerprint ``(a, b)``,
    two weighted sums of its words (mod 2^32), and its count of NaN/Inf elements
    (arrays under 2^32 words, as the word index).

    One reduction over three rows rather than three reductions: with a state's hundreds of
    arrays, the number of reductions sets this function's compile time. A sum mod 2^32 does
    not depend on the order of its terms, so the fingerprint is exactly the two sums'."""
    w = _words(x)
    i = jax.lax.iota(jnp.uint32, w.shape[0])
    rows = [w * (2 * i + 1), w * ((i * jnp.uint32(0x9E3779B9)) | 1)]
    if jnp.issubdtype(x.dtype, jnp.inexact):  # 64-bit elements are two words: each counted twice
        bad = (~jnp.isfinite(x)).reshape(-1).astype(jnp.uint32)
        rows.append(jnp.repeat(bad, w.shape[0] // max(bad.shape[0], 1)))
    else:
        rows.append(jnp.zeros_like(w))
    return jnp.sum(jnp.stack(rows), axis=1, dtype=jnp.uint32)


@functools.lru_cache(maxsize=8)
def _inspector(out_sharding):
    def inspect(leaves):
        if not leaves:
            return jnp.zeros((0, 2), jnp.uint32), jnp.zeros((0,), jnp.bool_)
        rows = jnp.stack([_inspect_one(x) for x in leaves])
        return rows[:, :2], rows[:, 2] == 0

    return jax.jit(inspect, out_shardings=out_sharding, compiler_options=runtime.one_shot())


@dataclasses.dataclass(frozen=True)
class StateReport:
    """Per array (by path): its fingerprint (hex) and whether it is finite."""

    fingerprints: dict[str, str]
    nonfinite: list[str]

    @property
    def finite(self) -> bool:
        return not self.nonfinite


def inspect_state(state) -> StateReport:
    """Fingerprint and finiteness of every array of ``state`` (one jitted pass; the same on every process)."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in flat]
    leaves = [leaf for _, leaf in flat]
    sharding = next((x.sharding for x in leaves if isinstance(getattr(x, "sharding", None),
                                                              jax.sharding.NamedSharding)), None)
    out = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
           if sharding is not None else None)
    prints, finite = jax.device_get(_inspector(out)(leaves))
    return StateReport(
        fingerprints={n: f"{int(p[0]):08x}{int(p[1]):08x}" for n, p in zip(names, prints)},
        nonfinite=[n for n, ok in zip(names, finite) if not ok])


def _all_processes_agree(ok: bool) -> bool:
    """True only when ``ok`` holds on every process (the same answer everywhere)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


# ---------------------------------------------------------------- the data item
class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves/restores an iterator's ``get_state()`` (bytes or JSON-able) per process, with a CRC."""

    def save(self, directory: epath.Path, args: "DataIteratorSave"):
        state = args.iterator.get_state()
        payload = {"bytes": state.decode()} if isinstance(state, bytes) else {"json": state}
        payload["crc32"] = zlib.crc32(json.dumps(payload, sort_keys=True).encode())
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(payload))

    def restore(self, directory: epath.Path, args: "DataIteratorRestore"):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            # Written by a different number of processes: the caller re-positions the
            # pipeline from the step count instead.
            return False
        payload = json.loads(path.read_text())
        if not isinstance(payload, dict) or not ("bytes" in payload or "json" in payload):
            raise ValueError(f"{name} holds no iterator state")
        crc = payload.pop("crc32", None)
        if crc is not None and crc != zlib.crc32(json.dumps(payload, sort_keys=True).encode()):
            raise ValueError(f"{name} does not match its CRC")
        state = payload["bytes"].encode() if "bytes" in payload else payload["json"]
        args.iterator.set_state(state)
        return True

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: Any


class Checkpointer:
    """The workdir's checkpoints: save (async, finite states only), keep last/best N, restore
    (verified, falling back to older steps) onto any mesh."""

    def __init__(self, workdir: str, *, keep_last: int = 3, keep_best: int = 0,
                 best_metric: str | None = None, best_mode: str = "min", async_save: bool = True,
                 read_only: bool = False):
        _quiet_orbax_echoes()
        self.directory = fs.normalize(fs.join(workdir, "checkpoints"))  # a URL (gs://) stays one
        self.damaged_directory = fs.normalize(fs.join(workdir, DAMAGED))
        self.best_metric = best_metric
        self.read_only = read_only
        keep = [policies.LatestN(n=max(int(keep_last), 1))]
        if keep_best and best_metric:
            keep.append(policies.BestN(
                get_metric_fn=lambda m: m[best_metric], reverse=(best_mode == "min"),
                n=int(keep_best), keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(
            fs.path(self.directory), options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": DataIteratorHandler(),
                           "integrity": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator=None, metrics: dict | None = None, force: bool = False,
             report: StateReport | None = None) -> bool:
        """Write ``state`` (and the iterator's position) as ``step``; ``NonFiniteState`` if it holds NaN/Inf.

        ``report``: ``inspect_state(state)`` when the caller already has it.
        """
        report = report or inspect_state(state)
        if not report.finite:
            raise NonFiniteState(step, report.nonfinite, len(report.fingerprints))
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None and hasattr(data_iterator, "get_state"):
            items["data"] = DataIteratorSave(data_iterator)
        items["integrity"] = ocp.args.JsonSave({
            "version": FINGERPRINT_VERSION, "fingerprints": report.fingerprints, "data": "data" in items})
        if metrics is not None and self.best_metric and self.best_metric not in metrics:
            metrics = None
        with self._disk_full_is_one_line():
            return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

    @contextlib.contextmanager
    def _disk_full_is_one_line(self):
        """A save that fails for want of space (now, or in the background: it surfaces at the next
        save, wait or close) becomes ``DiskFull``, one line naming what is kept."""
        try:
            yield
        except Exception as e:
            if not is_disk_full(e):
                raise
            try:
                free = f"{shutil.disk_usage(self.directory).free / 1e6:.1f} MB free"
            except OSError:
                free = "free space unknown"
            kept = list(self.manager.all_steps()) if fs.isdir(self.directory) else []
            raise DiskFull(
                f"saving a checkpoint in {self.directory} failed: no space left on device ({free}); "
                + (f"the newest complete checkpoint is step {max(kept)}" if kept else "no checkpoint was completed")
                + ": free some space (or lower keep_checkpoints) and run again to resume") from None

    def _integrity(self, step: int) -> dict | None:
        """The step's integrity record (its fingerprints), or None for a step saved before
        they existed; ``ValueError`` (or the reader's error) when it is unreadable."""
        if not (fs.path(self.directory) / str(step) / "integrity").exists():
            return None
        integrity = self.manager.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))["integrity"]
        if not isinstance(integrity, dict) or not isinstance(integrity.get("fingerprints"), dict):
            raise ValueError("integrity record holds no fingerprints")
        return integrity

    def _read_verified(self, step: int, read, parts=None) -> tuple:
        """``(state, integrity)``: ``read()`` of the step's arrays, checked against the step's
        fingerprints (those under ``parts`` only, when given); ``integrity`` is None for a step
        saved before fingerprints existed (loaded unverified). ``CheckpointDamaged`` on every
        process alike when any process cannot read it, or when an array differs."""
        state, integrity, error = None, None, None
        try:
            integrity = self._integrity(step)
            state = read()
        except Exception as e:  # tensorstore, JSON and file errors alike: the step is unreadable
            error = _one_line(e)
        if not _all_processes_agree(error is None):
            raise CheckpointDamaged(step, error or "unreadable on another process")
        if integrity is None:
            log.info("checkpoint step %d has no fingerprints (written before they existed): loaded unverified", step)
            return state, None
        report = inspect_state(state)
        expected = integrity["fingerprints"]
        if parts is not None:
            expected = {n: v for n, v in expected.items() if n.split("/", 1)[0] in parts}
        wrong = sorted(n for n in set(expected) | set(report.fingerprints)
                       if expected.get(n) != report.fingerprints.get(n))
        if wrong:
            raise CheckpointDamaged(step, f"{len(wrong)} array(s) differ from what was saved ({', '.join(wrong[:3])}"
                                          f"{', ...' if len(wrong) > 3 else ''})")
        return state, integrity

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restore ``state`` into the shapes/shardings of ``abstract_state`` and verify it.

        Returns ``(state, data_restored)``; ``data_restored`` is False when the
        checkpoint holds no iterator state for this process layout (the iterator is
        only touched once the state has verified). ``CheckpointDamaged`` when the step
        cannot be read or does not match its fingerprints (on every process alike).
        """
        state, integrity = self._read_verified(step, lambda: self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"])
        data_restored, error = False, None
        has_data = (fs.path(self.directory) / str(step) / "data").exists()
        if integrity is not None and integrity.get("data") and not has_data:
            error = "its data item (the input pipeline's position) is missing"
        elif data_iterator is not None and has_data and hasattr(data_iterator, "set_state"):
            try:
                data_restored = bool(self.manager.restore(step, args=ocp.args.Composite(
                    data=DataIteratorRestore(data_iterator)))["data"])
            except Exception as e:
                error = f"data item: {_one_line(e)}"
        if not _all_processes_agree(error is None):
            raise CheckpointDamaged(step, error or "data item unreadable on another process")
        return state, data_restored

    def restore_newest(self, abstract_state, data_iterator=None, *, set_aside: bool = False,
                       below: int | None = None):
        """The newest step that restores and verifies: ``(step, state, data_restored)``, or None
        when there is no checkpoint at all.

        Each damaged step newer than it gets one warning line; with ``set_aside`` (the
        caller owns the workdir) it is moved to ``checkpoints.damaged/`` so a resumed
        run can write that step again. ``NoUsableCheckpoint`` when every step is damaged
        (nothing is moved then: a config that no longer matches the checkpoints looks
        the same). ``below``: only steps up to this one.
        """
        steps = sorted((s for s in self.all_steps() if below is None or s <= below), reverse=True)
        if not steps:
            return None
        damaged: list[CheckpointDamaged] = []
        for step in steps:
            try:
                state, data_restored = self.restore(step, abstract_state, data_iterator)
            except CheckpointDamaged as e:
                damaged.append(e)
                continue
            for bad in damaged:
                where = self._set_aside(bad.step) if set_aside and not self.read_only else None
                log.warning("checkpoint step %d in %s is damaged (%s); %susing step %d", bad.step, self.directory,
                            bad.reason, f"moved it to {where}; " if where else "", step)
            if damaged and set_aside:
                self.manager.reload()
            return step, state, data_restored
        raise NoUsableCheckpoint(
            f"no usable checkpoint in {self.directory}: " + "; ".join(f"step {e.step}: {e.reason}" for e in damaged)
            + " (nothing was moved; if the config changed since, resume with the workdir's own config.json)")

    def _set_aside(self, step: int) -> str:
        """Move step ``step`` out of the managed directory (process 0; every process waits for it)."""
        target = fs.join(self.damaged_directory, str(step))
        if jax.process_index() == 0:
            fs.makedirs(self.damaged_directory)
            if fs.exists(target):
                target = f"{target}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            fs.path(fs.join(self.directory, str(step))).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"mmgen_set_aside_{step}")
        return target

    def restore_parts(self, step: int, abstract_state, parts) -> nnx.State:
        """Only the entries ``parts`` of a saved state (e.g. ``("model", "ema")``), into the
        shapes/shardings of ``abstract_state[part]``.

        Reads just those arrays (an Orbax partial restore), from a whole training state or
        from a weights-only one (``adapters merge``); a part the checkpoint lacks is an error.
        """
        item = nnx.State({p: abstract_state[p] for p in parts})
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        item_dir = fs.path(fs.join(self.directory, str(step), "state"))
        restored = ocp.PyTreeCheckpointer().restore(
            item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
        missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(restored)
                   if isinstance(leaf, jax.ShapeDtypeStruct)]  # targets a partial restore did not find
        if missing:
            raise ValueError(f"checkpoint {item_dir} lacks {len(missing)} arrays of {list(parts)}, e.g. {missing[0]}")
        return restored

    def restore_weights(self, step: int, abstract_state, parts) -> nnx.State:
        """``restore_parts`` (only ``parts``' arrays are read, e.g. ``("ema",)``) verified against the
        step's fingerprints of those arrays; ``CheckpointDamaged`` when unreadable or different.

        What inference needs (``sample``, ``eval``, ``tokenize``, ``export``): a third to a
        quarter of the training state's memory (no optimizer moments, no discriminator).
        """
        return self._read_verified(step, lambda: self.restore_parts(step, abstract_state, parts), parts)[0]

    def restore_newest_weights(self, abstract_state, parts, step: int | None = None):
        """``(step, weights)``: ``restore_weights`` of ``step``, or of the newest step that restores
        and verifies (a damaged newer one gets one warning line and is left where it is);
        None without checkpoints, ``NoUsableCheckpoint`` when every step is damaged."""
        if step is not None:
            return step, self.restore_weights(step, abstract_state, parts)
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        damaged: list[CheckpointDamaged] = []
        for s in steps:
            try:
                weights = self.restore_weights(s, abstract_state, parts)
            except CheckpointDamaged as e:
                damaged.append(e)
                continue
            for bad in damaged:
                log.warning("checkpoint step %d in %s is damaged (%s); using step %d", bad.step, self.directory,
                            bad.reason, s)
            return s, weights
        raise NoUsableCheckpoint(
            f"no usable checkpoint in {self.directory}: " + "; ".join(f"step {e.step}: {e.reason}" for e in damaged)
            + " (nothing was moved; if the config changed since, resume with the workdir's own config.json)")

    def wait(self) -> None:
        with self._disk_full_is_one_line():
            self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        try:
            return self.manager.reached_preemption(step)
        except Exception:  # no preemption service outside multi-process jobs
            return False

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception as e:  # the error wait() reports, raised again
                log.debug("closing the checkpoint manager: %s", e)
