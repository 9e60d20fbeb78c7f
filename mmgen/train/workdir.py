"""The one reader and writer of a workdir's side files.

A workdir holds ``config.json`` (the resolved config, written atomically),
``checkpoints/`` (Orbax, ``mmgen.train.checkpoint``), ``metrics.jsonl`` and
``tensorboard/`` (``mmgen.train.metrics``), ``samples/``, and evaluation results
(``eval.json`` + ``eval/`` for the newest checkpoint, ``eval_step{S}.json`` +
``eval_step{S}/`` for an older one), ``checkpoints.damaged/`` (steps that failed to
restore, moved aside by ``mmgen.train.checkpoint``) and ``train.lock`` while a
``train`` runs. Everything downstream asks this module for them, so a layout change
touches one file. Restoring a whole training state is ``mmgen.train.loop.load_state``.

A workdir is any path ``mmgen.fs`` knows (local, a network mount, ``gs://bucket/x``);
``path(p)`` is it as an ``epath.Path`` and every file here goes through ``mmgen.fs``, so a
URL is never turned into a local path.

Before a run writes anything, ``check_workdir`` makes sure the workdir is (or can be
made) a writable directory, by writing and removing a probe file, and
``check_free_space`` warns when the disk cannot hold the checkpoints the run keeps
(a bucket has no disk to measure). With several processes ``check_shared`` makes sure
every process sees what process 0 writes there (one line naming the hosts that do not).
``WorkdirLock`` makes one ``train`` the only writer of a workdir; readers (``eval``,
``sample``, ``tokenize``) take no lock.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from mmgen import config as config_lib
from mmgen import fs
from mmgen.errors import UserError
from mmgen.train.checkpoint import Checkpointer

log = logging.getLogger(__name__)

CONFIG = "config.json"
LOCK = "train.lock"


def path(p) -> epath.Path:
    """A workdir (or a file in one) as an ``epath.Path``: local paths absolute, URLs (``gs://``) as given."""
    return fs.path(p)


def config_path(workdir: str) -> str:
    return fs.join(workdir, CONFIG)


def has_config(workdir: str) -> bool:
    return fs.exists(config_path(workdir))


def read_config(workdir: str, families: tuple[str, ...] = (), what: str = "") -> ml_collections.ConfigDict:
    """``workdir``'s config; a ``UserError`` when there is none or its family is not in ``families``.

    ``what`` names the expected run in the error ("a tokenizer", ...); default: the families.
    """
    if not fs.isdir(workdir):
        raise UserError(f"{workdir}: no such workdir")
    if not has_config(workdir):
        raise UserError(f"{workdir} is not a workdir (no {CONFIG}): train into it first or check the path")
    try:
        cfg = config_lib.from_json_file(config_path(workdir))
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, not UTF-8, not an object
        raise UserError(
            f"{config_path(workdir)} is damaged ({' '.join(str(e).split())[:120]}): rewrite it with "
            f"`mmgen train --config CONFIG --workdir {workdir}` (the same config; checkpoints are kept) "
            f"or restore it from a copy") from None
    _move_old_keys(cfg)
    if families and cfg.get("family") not in families:
        want = what or " or ".join(repr(f) for f in families)
        raise UserError(f"{workdir} holds a {cfg.get('family')!r} run, not {want}")
    return cfg


def _move_old_keys(cfg: ml_collections.ConfigDict) -> None:
    """Read a config written before a key moved as one written after.

    An audio tokenizer kept its discriminator under ``model.discriminator``; both
    tokenizers now read the top-level ``discriminator``.
    """
    model = cfg.get("model")
    if cfg.get("family") == "tokenizer" and isinstance(model, ml_collections.ConfigDict) \
            and "discriminator" in model and "discriminator" not in cfg:
        cfg.discriminator = model.discriminator
        del model["discriminator"]


def write_config(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """Write the resolved config to ``workdir/config.json`` (whole or not at all: ``fs.write_text``)."""
    fs.makedirs(workdir)
    target = config_path(workdir)
    fs.write_text(target, config_lib.to_json(cfg))
    return target


def has_checkpoints(workdir: str) -> bool:
    return fs.isdir(fs.join(workdir, "checkpoints"))


def all_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in ``workdir``, oldest first ([] when none)."""
    if not has_checkpoints(workdir):
        return []
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        return sorted(ckpt.all_steps())
    finally:
        ckpt.close()


def latest_step(workdir: str) -> int | None:
    steps = all_steps(workdir)
    return steps[-1] if steps else None


def check_step(workdir: str, step: int | None) -> None:
    """One line when ``workdir`` holds no checkpoint at ``step`` (None: nothing to check)."""
    if step is None:
        return
    steps = all_steps(workdir)
    if step not in steps:
        raise UserError(f"--step {step}: {workdir} has checkpoints at steps {steps or 'none'}")


def output_paths(workdir: str, step: int | None = None) -> tuple[str, str]:
    """(result json, folder for images and sounds) of an evaluation of ``step`` (None: the newest)."""
    name = "eval" if step is None else f"eval_step{int(step)}"
    return fs.join(workdir, f"{name}.json"), fs.join(workdir, name)


# ---------------------------------------------------------------- before anything is written
def check_workdir(workdir: str) -> None:
    """One line unless ``workdir`` is a directory this process can write, or can be created as one.

    Writes a probe file into the workdir (or its nearest existing parent, when the workdir
    does not exist yet) and removes it again: nothing is left behind either way. A URL
    (``gs://bucket/run``) is probed in place: an object store has no folders to create.
    """
    if fs.is_url(workdir):
        _check_url_workdir(workdir)
        return
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--workdir {workdir} is a file, not a directory")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"--workdir {workdir} cannot be created: {parent} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mmgen-probe-", dir=parent)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        if parent != path:
            raise UserError(f"--workdir {workdir} cannot be created: {parent} is not writable "
                            f"({e.strerror or e})") from None
        raise UserError(f"--workdir {workdir} is not writable ({e.strerror or e})") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:200]


def _check_url_workdir(workdir: str) -> None:
    root = path(workdir)  # a UserError for a scheme epath does not know
    try:
        if root.exists() and not root.is_dir():
            raise UserError(f"--workdir {workdir} is a file, not a directory")
        probe = root / f".mmgen-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"probe")
        probe.unlink()
    except UserError:
        raise
    except Exception as e:  # no client library (gcsfs, s3fs), no credentials, no bucket, no permission
        raise UserError(f"--workdir {workdir} is not writable ({_one_line(e)})") from None


SHARED_PROBE = ".mmgen-shared-probe-"  # + a random token per check
SHARED_WAIT_S = 10.0  # how long a process looks for the probe (a network mount may show a new file late)


def unseen_message(workdir: str, seen: list[bool], hosts: list[str]) -> str | None:
    """The one line for processes that do not see process 0's probe (None when all do).

    ``seen[i]``/``hosts[i]``: whether process ``i`` read the probe, and its host name.
    """
    missing = [i for i, ok in enumerate(seen) if not ok]
    if not missing:
        return None
    named = ", ".join(f"{i} ({hosts[i]})" for i in missing[:8]) + (", ..." if len(missing) > 8 else "")
    return (f"--workdir {workdir} is not shared by every host: process{'es' if len(missing) > 1 else ''} {named} "
            f"of {len(seen)} cannot see what process 0 ({hosts[0]}) writes there; give every host the same "
            f"filesystem (a network mount at the same path, or a bucket: gs://...)")


def _host_names() -> list[str]:
    """Every process's host name (an all-gather of fixed-width bytes)."""
    name = np.frombuffer(socket.gethostname().encode()[:64].ljust(64, b"\0"), np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(name)).reshape(jax.process_count(), 64)
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in gathered]


def check_shared(workdir: str) -> None:
    """Multi-process: one line (``UserError``, on every process) unless every process sees the
    file process 0 writes into ``workdir``; nothing to check with one process.

    Process 0 creates the workdir and writes a random token into ``workdir/.mmgen-shared-probe-<token>``
    (a new name each time, so no cached lookup of an earlier one answers); after a barrier every
    process reads it back, looking again for up to ``SHARED_WAIT_S`` (NFS caches a missing name for
    a while); the answers are all-gathered, so every process raises the same error, naming the
    processes (and hosts) that do not see it.
    """
    if jax.process_count() == 1:
        return
    token = multihost_utils.broadcast_one_to_all(np.frombuffer(uuid.uuid4().bytes, np.uint8))
    token = bytes(np.asarray(token, np.uint8)).hex()
    probe = fs.join(workdir, SHARED_PROBE + token)
    created = False
    if jax.process_index() == 0:
        try:
            created = not fs.exists(workdir)
            fs.makedirs(workdir)
            fs.write_text(probe, token)
        except Exception as e:  # process 0 then does not see it either, and every process says so
            log.debug("writing %s failed: %s", probe, e)
    multihost_utils.sync_global_devices("mmgen_shared_probe_written")
    deadline = time.monotonic() + SHARED_WAIT_S
    while True:
        try:
            seen = fs.read_text(probe) == token
        except Exception:  # absent (not shared), unreadable
            seen = False
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    seen_all = [bool(x) for x in np.asarray(multihost_utils.process_allgather(np.int32(seen))).reshape(-1)]
    message = unseen_message(workdir, seen_all, _host_names()) if not all(seen_all) else None
    multihost_utils.sync_global_devices("mmgen_shared_probe_read")
    if jax.process_index() == 0:
        try:
            fs.remove(probe)
            if message and created:  # leave no empty workdir behind a run that does not start
                path(workdir).rmdir()
        except Exception:
            pass
    if message:
        raise UserError(message)


def check_free_space(workdir: str, checkpoint_bytes: int, keep: int) -> None:
    """Warn (one line) when the disk under ``workdir`` cannot hold ``keep + 1`` checkpoints of about
    ``checkpoint_bytes`` each (the newest is written before the oldest is removed). A bucket
    (a URL workdir) has no disk to measure: nothing to check."""
    if fs.is_url(workdir):
        return
    parent = os.path.abspath(os.path.expanduser(workdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    need = int(checkpoint_bytes) * (max(int(keep), 1) + 1)
    if free < need:
        log.warning("%s has %s free; the checkpoints this run keeps need about %s (keep_checkpoints + 1 = %d "
                    "of %s): saving may fail with a full disk", workdir, human_bytes(free), human_bytes(need),
                    max(int(keep), 1) + 1, human_bytes(checkpoint_bytes))


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


# ---------------------------------------------------------------- one writer per workdir
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """When ``pid`` started (clock ticks since boot, Linux), so a reused pid is not taken for the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return "" if fields[0] == "Z" else fields[19]  # a zombie is dead already
    except (OSError, IndexError):
        return ""


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if os.path.exists(f"/proc/{pid}"):
        now = _process_start(pid)
        return bool(now) and (not start or now == start)
    return True


def _mtime(p: str) -> float:
    return float(fs.path(p).stat().mtime)


def _create_exclusive(p: str, data: bytes) -> bool:
    """Create the file ``p`` holding ``data`` unless it exists; whether this call created it.

    Atomic on a local or network disk (``O_EXCL``). An object store has no exclusive create:
    there the file is written when absent and read back, so of two writers racing within
    one upload the later one wins and the earlier one finds out."""
    if fs.is_url(p):
        if fs.exists(p):
            return False
        fs.write_bytes(p, data)
        return fs.read_bytes(p) == data
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


class WorkdirLocked(UserError):
    """Another ``train`` holds the workdir."""


class WorkdirLock:
    """``workdir/train.lock``: the one writer of a workdir, for the length of a ``with`` block.

    The file holds the holder's host, pid and a heartbeat (rewritten every
    ``heartbeat_s`` by a daemon thread). Creating it is atomic (``O_EXCL``), so of two
    runs started together exactly one gets it; the other stops with one line naming
    the holder (``WorkdirLocked``). A lock left by a crashed run is stale and taken
    over: on the same machine when its pid is gone (or reused), from another machine
    when its heartbeat is older than ``stale_after_s``. Multi-host: process 0 holds it
    and every process learns whether it got it.
    """

    def __init__(self, workdir: str, *, heartbeat_s: float = 30.0, stale_after_s: float = 300.0):
        self.workdir = workdir
        self.path = fs.join(workdir, LOCK)
        self.heartbeat_s, self.stale_after_s = float(heartbeat_s), float(stale_after_s)
        self.token = uuid.uuid4().hex
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the record
    def _record(self) -> dict:
        now = time.time()
        return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
                "pid_start": _process_start(os.getpid()), "started": getattr(self, "_started", now),
                "heartbeat": now, "token": self.token, "command": " ".join(sys.argv)[:300]}

    def _read(self) -> dict | None:
        """The current holder's record; {} when the file is unreadable or half-written; None when absent."""
        try:
            data = fs.read_bytes(self.path)
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            record = json.loads(data.decode())
            return record if isinstance(record, dict) else {}
        except ValueError:
            return {}

    def _stale(self, record: dict) -> bool:
        if not record:  # unreadable: stale once nobody has touched the file for stale_after_s
            try:
                return time.time() - _mtime(self.path) > self.stale_after_s
            except OSError:
                return True
        same_machine = record.get("host") == socket.gethostname() and record.get("boot_id", "") == _boot_id()
        if same_machine and isinstance(record.get("pid"), int):
            return not _alive(record["pid"], str(record.get("pid_start", "")))
        return time.time() - float(record.get("heartbeat", 0)) > self.stale_after_s

    def describe(self, record: dict | None) -> str:
        if not record:
            return f"another process (its lock file {self.path} is unreadable)"
        age = time.time() - float(record.get("heartbeat", 0))
        return (f"pid {record.get('pid')} on {record.get('host')} (heartbeat {age:.0f}s ago; "
                f"{record.get('command', '')!s:.80})")

    def _create(self) -> bool:
        return _create_exclusive(self.path, json.dumps(self._record()).encode())

    def _take_over(self, stale: dict) -> bool:
        """Replace a stale lock, one contender at a time (``train.lock.takeover``, itself ``O_EXCL``)."""
        mutex = self.path + ".takeover"
        try:
            if time.time() - _mtime(mutex) > max(self.stale_after_s, 60.0):
                fs.remove(mutex)  # left by a contender that died taking over
        except OSError:
            pass
        if not _create_exclusive(mutex, self.token.encode()):
            return False
        try:
            if self._read() != stale:  # it changed: someone is alive after all
                return False
            fs.remove(self.path)
            return self._create()
        finally:
            fs.remove(mutex)

    def _acquire_here(self) -> str | None:
        """Take the lock in this process; None when taken, else who holds it."""
        fs.makedirs(self.workdir)
        self._started = time.time()
        for _ in range(3):
            if self._create():
                return None
            record = self._read()
            if record is None:
                continue  # released meanwhile
            if not self._stale(record):
                return self.describe(record)
            log.warning("taking over the stale lock of %s", self.describe(record))
            if self._take_over(record):
                return None
        return self.describe(self._read())

    def acquire(self) -> "WorkdirLock":
        holder = self._acquire_here() if jax.process_index() == 0 else None
        ok = holder is None
        if jax.process_count() > 1:
            ok = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
        if not ok:
            raise WorkdirLocked(
                f"{self.workdir} is in use by another train run, {holder or 'held by process 0'}: wait for it to "
                f"finish or stop it (a lock left by a run that died is taken over at once on the same machine, "
                f"after {self.stale_after_s:.0f}s without a heartbeat from another)")
        if jax.process_index() == 0:
            self.held = True
            _HELD.add(self)
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="mmgen-workdir-lock", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            record = self._read()
            if record is not None and record.get("token") != self.token:
                log.error("the lock %s was taken over by %s; this run no longer owns the workdir",
                          self.path, self.describe(record))
                return
            try:
                fs.write_text(self.path, json.dumps(self._record()))
            except OSError as e:  # a full or flaky disk: the next beat tries again
                log.debug("lock heartbeat failed: %s", e)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _HELD.discard(self)
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        record = self._read()
        if record is not None and record.get("token") == self.token:
            try:
                fs.remove(self.path)
            except OSError:
                pass

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: set[WorkdirLock] = set()


def release_all_locks() -> None:
    """Release every workdir lock this process holds (before an immediate exit)."""
    for lock in list(_HELD):
        lock.release()
