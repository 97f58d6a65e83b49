"""Where run folders live: local folders, or any URL TensorFlow's file layer serves.

``path("runs/x")`` is a ``pathlib.Path``, as before; ``path("gs://bucket/runs/x")`` is a
``UrlPath`` with the part of the pathlib API the run folder needs, read and written
through ``tf.io.gfile``: the layer the data pipeline already reads gs:// shards with, and
the one ``etils.epath`` (orbax's path library) itself uses for gs:// when TensorFlow is
installed. Not epath itself: it knows only gs/s3/az/hf and folds other schemes into
local paths ("ram://x" becomes "ram:/x"), while gfile also serves ram:// (in memory,
what the tests use), hdfs:// and the schemes of its plugins.

Local paths never import TensorFlow (``clipctl runs`` and the TUI stay light); a URL
imports it, quietly, on its first file operation.

Object stores have no append and no rename (a "rename" is a copy and a delete), but
they replace a whole object atomically. So on a URL:

* ``Appender`` keeps the file's text and rewrites the whole file when it flushes: on an
  append that comes ``flush_s`` seconds or more after the last write, when its owner
  calls ``flush()`` (the run folder does at every checkpoint, evaluation and state
  change) and at a normal exit. Readers always see complete lines, and a store that
  allows about one update per second per object (GCS) is never flooded. This is how
  TensorFlow's own GCS file system appends (it re-uploads the file); one file, not
  numbered parts, so every reader of metrics.jsonl keeps working. A process killed
  outright (SIGKILL, a preempted VM) loses what was appended since the last write.
  One process owns such a file: what another process appends to it is overwritten by
  the owner's next rewrite (see ``Appender``).
* ``write_atomic`` writes the object in one piece (atomic on GCS and S3); locally it
  writes a temporary file and renames it into place.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from clip_jax.errors import PathError

_log = logging.getLogger(__name__)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# Least seconds between two rewrites of an appended file on a URL that appends alone
# cause (GCS allows about one update per second to an object). Not a bound on what a
# crash loses: nothing is written until the next append, flush() or exit comes.
FLUSH_S = 10.0


def is_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` names a URL (``gs://...``) rather than a local path."""
    return bool(_URL.match(os.fspath(location)))


def path(location: str | os.PathLike) -> Path | UrlPath:
    """A pathlib-like object for a local path or a URL (see the module docstring)."""
    if isinstance(location, UrlPath | Path):
        return location
    text = os.fspath(location)
    return UrlPath(text) if is_url(text) else Path(text)


def _tf() -> Any:
    from clip_jax.data.tf_setup import import_tf  # quiet, and off the accelerators

    return import_tf()


def _gfile() -> Any:
    return _tf().io.gfile


class StorageError(PathError, OSError):
    """A URL the store refused (no permission, no bucket, no credentials): the user's to
    fix, so clipctl prints it in one line; an OSError, as pathlib's failures are."""


@contextlib.contextmanager
def _os_errors(url: str) -> Iterator[None]:
    """TensorFlow's errors as the OSErrors pathlib raises, so callers catch one kind."""
    errors = _tf().errors
    try:
        yield
    except errors.NotFoundError as exc:
        raise FileNotFoundError(2, exc.message, url) from None
    except errors.OpError as exc:
        raise StorageError(exc.message or type(exc).__name__, key=url) from None


class UrlPath:
    """A URL (``scheme://bucket/key``) with pathlib's names, over ``tf.io.gfile``."""

    __slots__ = ("_url",)

    def __init__(self, url: str):
        scheme, _, rest = url.partition("://")
        self._url = f"{scheme}://{rest.rstrip('/')}"

    # ------------------------------------------------------------- pure parts
    def __truediv__(self, name: str | os.PathLike) -> UrlPath:
        return UrlPath(f"{self._url}/{os.fspath(name).lstrip('/')}")

    def __str__(self) -> str:
        return self._url

    def __fspath__(self) -> str:
        return self._url

    def __repr__(self) -> str:
        return f"UrlPath({self._url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UrlPath) and other._url == self._url

    def __hash__(self) -> int:
        return hash(self._url)

    @property
    def scheme(self) -> str:
        return self._url.partition("://")[0]

    @property
    def name(self) -> str:
        rest = self._url.partition("://")[2]
        return rest.rpartition("/")[2] if "/" in rest else ""

    @property
    def parent(self) -> UrlPath:
        scheme, _, rest = self._url.partition("://")
        return UrlPath(f"{scheme}://{rest.rpartition('/')[0]}") if "/" in rest else self

    def with_name(self, name: str) -> UrlPath:
        return self.parent / name

    def resolve(self) -> UrlPath:
        """Itself: a URL is absolute already."""
        return self

    absolute = expanduser = resolve

    # ------------------------------------------------------------ file system
    def exists(self) -> bool:
        with _os_errors(self._url):
            return _gfile().exists(self._url)

    def is_dir(self) -> bool:
        with _os_errors(self._url):
            return _gfile().isdir(self._url)

    def is_file(self) -> bool:
        return self.exists() and not self.is_dir()

    def iterdir(self) -> Iterator[UrlPath]:
        with _os_errors(self._url):
            names = _gfile().listdir(self._url)
        for name in names:
            yield self / name.rstrip("/")  # object stores list "folders" as "name/"

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Make the folder (a no-op on object stores, where folders are key prefixes)."""
        if self.is_dir():
            if not exist_ok:
                raise FileExistsError(17, "folder exists", self._url)
            return
        with _os_errors(self._url):
            (_gfile().makedirs if parents else _gfile().mkdir)(self._url)

    def open(self, mode: str = "r") -> IO[Any]:
        with _os_errors(self._url):
            return _gfile().GFile(self._url, mode)

    def read_bytes(self) -> bytes:
        with _os_errors(self._url), self.open("rb") as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def write_bytes(self, data: bytes) -> None:
        if self.scheme == "ram":  # TF's in-memory files keep their old bytes on "w"
            self.unlink(missing_ok=True)  # (object stores and local files are replaced)
        with _os_errors(self._url), self.open("wb") as f:
            f.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            with _os_errors(self._url):
                _gfile().remove(self._url)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def replace(self, target: str | os.PathLike) -> UrlPath:
        with _os_errors(self._url):
            _gfile().rename(self._url, os.fspath(target), overwrite=True)
        return path(target)


StoragePath = Path | UrlPath


def write_atomic(target: StoragePath, text: str) -> None:
    """Replace ``target``'s text so that a reader never sees half of it."""
    if isinstance(target, UrlPath):
        target.write_text(text)  # one object, replaced whole by the store
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # writers never share one
    tmp.write_text(text)
    os.replace(tmp, target)


def walk(root: str | os.PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` for a local folder or a URL (prune ``dirs`` in place as with os.walk)."""
    if not is_url(root):
        yield from os.walk(root)
        return
    with _os_errors(os.fspath(root)):
        for here, dirs, files in _gfile().walk(os.fspath(root)):
            dirs[:] = [d.rstrip("/") for d in dirs]
            yield here.rstrip("/"), dirs, files


@contextlib.contextmanager
def local_copy(source: StoragePath | None) -> Iterator[Path | None]:
    """A local path holding ``source``'s bytes, for libraries that read only local files
    (the tokenizers library); a local ``source`` is itself, None stays None."""
    if not isinstance(source, UrlPath):
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="clip-jax-") as folder:
        local = Path(folder) / source.name
        local.write_bytes(source.read_bytes())
        yield local


@contextlib.contextmanager
def staged(target: StoragePath) -> Iterator[Path]:
    """A local path to write ``target`` at, for libraries that write only local files;
    on a URL the file is uploaded when the block ends without an error."""
    if not isinstance(target, UrlPath):
        yield target
        return
    with tempfile.TemporaryDirectory(prefix="clip-jax-") as folder:
        local = Path(folder) / target.name
        yield local
        target.write_bytes(local.read_bytes())


class Appender:
    """Appends text to one file: at once locally, by whole-file rewrites on a URL.

    On a URL the file's text is kept here (read once, at the first flush), so one
    process must own the file, as process 0 owns a run folder's files: lines another
    process appends to it meanwhile (``clipctl eval`` recording results in the folder
    of a run that trains) are lost at this one's next rewrite. Locally every append
    goes to the end of the file, so there they all stay.

    A rewrite that an append brings about and that fails (a transient store error) is
    one warning on the ``clip_jax.storage`` logger, and is tried again ``flush_s``
    later with everything still pending: tracking never kills the training it records.
    ``flush()`` called directly raises, so its caller knows the lines are not there.
    """

    def __init__(self, target: StoragePath, flush_s: float = FLUSH_S):
        self.target, self.flush_s = target, flush_s
        self._pending: list[str] = []
        self._text: str | None = None
        self._flushed = float("-inf")  # the first append is written at once
        self._failing = False  # the last rewrite failed: warned once, until one succeeds
        if isinstance(target, UrlPath):
            _unflushed.add(self)

    def append(self, text: str) -> None:
        if not isinstance(self.target, UrlPath):
            with open(self.target, "a") as f:
                f.write(text)
            return
        self._pending.append(text)
        if time.monotonic() - self._flushed >= self.flush_s:
            self.flush_or_warn()

    def flush_or_warn(self) -> bool:
        """``flush()``, with a failure as one warning (the lines stay pending and the next
        try waits ``flush_s``); whether the lines are written."""
        try:
            self.flush()
        except OSError as exc:  # StorageError is one; so is a FileNotFoundError (bucket)
            self._flushed = time.monotonic()  # no retry per append: the store is unwell
            if not self._failing:
                self._failing = True
                _log.warning(
                    "could not write %s (%s); trying again in %gs, nothing is lost yet",
                    self.target,
                    exc,
                    self.flush_s,
                )
            return False
        return True

    def flush(self) -> None:
        """Write what is pending (on a URL; local appends are written at once)."""
        if not self._pending:
            return
        if self._text is None:
            try:
                self._text = self.target.read_text(errors="replace")
            except FileNotFoundError:
                self._text = ""
        text = self._text + "".join(self._pending)
        self.target.write_text(text)  # may raise: then nothing here has changed
        self._text = text
        self._pending.clear()
        self._flushed = time.monotonic()
        self._failing = False

    def reset(self) -> None:
        """Forget the kept text: the file was rewritten by other means (truncated)."""
        self.flush()
        self._text = None

    @property
    def pending(self) -> bool:
        return bool(self._pending)


# Appenders on URLs, flushed when the interpreter exits: nothing appended is left behind.
_unflushed: weakref.WeakSet[Appender] = weakref.WeakSet()


@atexit.register
def flush_at_exit() -> None:
    """Also called by clipctl's exit after an interrupt, whose ``os._exit`` skips atexit."""
    for appender in list(_unflushed):
        with contextlib.suppress(Exception):  # a store gone at exit must not mask the exit
            appender.flush()
