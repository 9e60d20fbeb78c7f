"""Paths on any filesystem: local disks, network mounts and the URL-style stores ``etils.epath``
knows (``gs://``, ``s3://``, ...). Every workdir and dataset path goes through here.

``path(p)`` is an ``epath.Path``: a local path with ``~`` expanded and made absolute, a URL
kept exactly as given (``os.path.abspath("gs://b/x")`` would make it ``./gs:/b/x``, a
folder in the current directory). Paths stay strings everywhere else in the package;
``join`` builds one without touching a URL's ``//``.

Object stores have no rename and no append, so the writers here pick per path:
``write_text`` is a temporary file and a rename on a local disk, one whole-object upload
on a store (itself all-or-nothing); ``append_text`` appends locally and rewrites the
object on a store. ``local_file`` hands a writer that needs a real file (ffmpeg, PIL,
``np.savez``) a local path and copies the result to its destination when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from typing import Iterator

from etils import epath

from mmgen.errors import UserError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(p) -> bool:
    """Whether ``p`` names a location by URL (``gs://bucket/x``), not a local or mounted path."""
    return bool(_URL.match(os.fspath(p) if not isinstance(p, str) else p))


def is_local(p) -> bool:
    return not is_url(p)


def normalize(p) -> str:
    """``p`` as a string: a URL unchanged (no trailing slash), a local path absolute with ``~`` expanded."""
    s = os.fspath(p)
    if is_url(s):
        return s if s.endswith("://") else s.rstrip("/")
    return os.path.abspath(os.path.expanduser(s))


def path(p) -> epath.Path:
    """``p`` as an ``epath.Path`` (see ``normalize``); a ``UserError`` for a URL scheme epath does not know."""
    s = normalize(p)
    try:
        out = epath.Path(s)
    except (KeyError, ValueError, NotImplementedError):
        out = None
    if is_url(s) and str(out) != s:  # epath does not know the scheme (or read it as a local path)
        raise UserError(f"{s}: no filesystem for {s.split('://')[0]}:// (etils.epath knows gs://, s3://, az://, "
                        f"hf://; a network mount is a local path)")
    return out


def join(p, *parts: str) -> str:
    """``p/part/...`` as a string; a URL keeps its scheme and is not made absolute."""
    s = os.fspath(p)
    if is_url(s):
        return "/".join([s.rstrip("/"), *(str(x).strip("/") for x in parts)])
    return os.path.join(s, *map(str, parts))


def exists(p) -> bool:
    return path(p).exists()


def isdir(p) -> bool:
    return path(p).is_dir()


def listdir(p) -> list[str]:
    """The names in the folder ``p``, sorted."""
    return sorted(child.name for child in path(p).iterdir())


def makedirs(p) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def read_text(p) -> str:
    return path(p).read_text()


def read_bytes(p) -> bytes:
    return path(p).read_bytes()


def write_text(p, text: str) -> None:
    """Write ``text`` to ``p`` whole or not at all (a rename locally; one object upload on a store)."""
    write_bytes(p, text.encode("utf-8"))


def write_bytes(p, data: bytes) -> None:
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_url(target):
        target.write_bytes(data)
        return
    tmp = os.path.join(os.fspath(target.parent), f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask's permissions, as open() gives
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.fspath(target))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def append_text(p, text: str) -> None:
    """Append ``text`` to ``p`` (created when missing). On an object store the object is rewritten."""
    target = path(p)
    if is_url(target):
        old = target.read_bytes() if target.exists() else b""
        target.write_bytes(old + text.encode("utf-8"))
        return
    with open(os.fspath(target), "a") as f:
        f.write(text)


def remove(p, missing_ok: bool = True) -> None:
    path(p).unlink(missing_ok=missing_ok)


def copy(src, dst) -> None:
    """Copy the file ``src`` to ``dst`` (either may be local or a URL), replacing ``dst``."""
    s, d = path(src), path(dst)
    d.parent.mkdir(parents=True, exist_ok=True)
    if is_local(s) and is_local(d):
        shutil.copyfile(os.fspath(s), os.fspath(d))
    else:
        d.write_bytes(s.read_bytes())


@contextlib.contextmanager
def local_file(dst, suffix: str | None = None) -> Iterator[str]:
    """A local file path to write ``dst`` through: ``dst`` itself when local (its folder created),
    else a temporary file copied to ``dst`` when the block ends without an error."""
    if is_local(dst):
        target = normalize(dst)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        yield target
        return
    suffix = os.path.splitext(os.fspath(dst))[1] if suffix is None else suffix
    with tempfile.TemporaryDirectory(prefix="mmgen-out-") as tmp:
        local = os.path.join(tmp, "file" + suffix)
        yield local
        copy(local, dst)


@contextlib.contextmanager
def local_copy(src) -> Iterator[str]:
    """A local file holding ``src``'s bytes for a reader that needs one (``src`` itself when local)."""
    if is_local(src):
        yield normalize(src)
        return
    with tempfile.TemporaryDirectory(prefix="mmgen-in-") as tmp:
        local = os.path.join(tmp, "file" + os.path.splitext(os.fspath(src))[1])
        copy(src, local)
        yield local
