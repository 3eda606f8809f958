"""Atomic file writes, advisory locks, and one line for an OS error.

Everything is written to a temporary name in the same directory and renamed into place;
``os.replace`` is atomic on POSIX file systems when source and target share a directory, so
a reader never sees a half-written file, even after SIGKILL or a full disk.

A run folder or a predictions table is owned by one process at a time
(:func:`exclusive_lock`): a second ``train`` into the same folder or ``predict`` to the same
table would otherwise both succeed and leave the files of one mixed with the other's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _WriteErrors:
    """A file object that remembers the first OSError of a write: torch.save reports a full
    disk as ``RuntimeError: unexpected pos ...``, which names neither the file nor the cause."""

    def __init__(self, fh: IO[bytes]):
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._fh.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str):
        return getattr(self._fh, name)


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` with ``path`` as its file name (a failed write(2) names no file)."""
    if err.filename is not None:
        return err
    return OSError(err.errno, err.strerror, str(path))


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it into place.

    A write that fails (a full disk, a folder made read-only) leaves ``path`` as it was and
    no temporary file behind, and raises an OSError naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _naming(err, path) from err
    try:
        # mkstemp creates 0600; results are meant to be shared like any file the user writes.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            recorder = _WriteErrors(fh)
            try:
                write(recorder)  # type: ignore[arg-type]
            except Exception as err:
                if isinstance(err, OSError) or recorder.error is None:
                    raise
                raise recorder.error from err
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(err, path) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    return atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False))


def atomic_write_csv(path: str | Path, frame: pd.DataFrame) -> Path:
    return atomic_write_text(path, frame.to_csv(index=False))


# --------------------------------------------------------------------------- ownership


class InUseError(RuntimeError):
    """A run folder or an output file that another process holds (:func:`exclusive_lock`)."""


class MissingPackageError(ImportError):
    """An optional dependency a command needs is not installed; the message names the extra
    that installs it (``pip install 'brainmets[onnx]'``)."""


def require_package(package: str, what: str, extra: str = "onnx"):
    """Import an optional dependency where it is used; its absence is one line naming the
    extra that installs it, not a traceback."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise MissingPackageError(
            f"{what} needs the {package} package: pip install 'brainmets[{extra}]'"
        ) from error


@contextlib.contextmanager
def exclusive_lock(lock_path: str | Path, what: str, *, remove: bool = False) -> Iterator[Path]:
    """Hold an advisory lock on ``lock_path`` (``what`` names the thing it guards) meanwhile.

    A second process is refused at once with :class:`InUseError`, which names the holder's
    PID; nobody waits on a run that may take days. The lock is ``flock``'s, so the kernel
    drops it when its holder dies, by ``kill -9`` too: a stale lock file refuses nobody.

    ``remove``: the holder unlinks the file when done (a lock file beside a user's output is
    litter). Unlinking alone would let a third process lock a new file while a second still
    holds the old one, so a lock counts only while the path still names the locked file
    (checked after locking; else the lock is taken again on the new file).

    Creating the lock file is also the first write into the folder: a folder that cannot be
    written is reported here, before any work.
    """
    lock_path = Path(lock_path)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _naming(err, lock_path) from err
    fd = _locked(lock_path, what)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_path
    finally:
        if remove:
            with contextlib.suppress(OSError):
                lock_path.unlink()  # while held: no one else can have locked this file
        os.close(fd)  # closing the only descriptor releases the flock


def _locked(lock_path: Path, what: str) -> int:
    """A descriptor of ``lock_path`` holding its flock; :class:`InUseError` when another
    process holds it."""
    import fcntl

    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as err:
            raise _naming(err, lock_path) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise InUseError(
                f"{what} is in use by another brainmets process (PID {holder}, lock file "
                f"{lock_path}); wait for it to finish, or choose another output"
            ) from None
        try:
            current = os.stat(lock_path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)  # its holder removed it as we locked it: lock the file there now


# --------------------------------------------------------------------------- OS errors

_WHAT_TO_DO = {
    errno.ENOSPC: "no space left on the device: free space there or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free space there or write elsewhere",
    errno.EACCES: "permission denied: choose a location you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a location you can write to",
    errno.EROFS: "read-only file system: choose a writable location",
    errno.ENAMETOOLONG: "file name too long: choose a shorter path",
}


def os_error_line(err: OSError) -> str:
    """One line for an OS error: the path, the cause, and what to do about it."""
    cause = _WHAT_TO_DO.get(err.errno) or (err.strerror or str(err))
    if err.filename is None:
        return cause
    where = str(err.filename)
    if err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    return f"{where}: {cause}"


_UNPICKLING_ADVICE = ("pickle", "weights_only", "weights only", "unsafe", "trust")


def safe_reason(err: BaseException) -> str:
    """An exception as a short reason for a message about a damaged or foreign file.

    numpy and torch answer a file they will not unpickle with advice to unpickle it
    (``allow_pickle=True``, ``pickle.load()``, ``weights_only=False``): for a file of unknown
    origin that is the unsafe path, so such text is left out, as is anything past one line.
    """
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if any(word in text.lower() for word in _UNPICKLING_ADVICE):
        text = ""
    name = type(err).__name__
    return f"{name}: {text[:200]}" if text else name


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (weights files are ~100 MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_format_json(
    path: str | Path, *, fmt: str, version: int, what: str, again: str
) -> dict[str, Any]:
    """A JSON file that names its ``format`` and ``format_version`` (a sidecar, an ensemble):
    parsed and checked to be ``what`` at ``version``; otherwise a ValueError naming the file
    and, for another version, what to do (``again``)."""
    from brainmets import __version__

    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not {what} ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise ValueError(f'{path}: not {what} (no "format": "{fmt}")')
    if meta.get("format_version") != version:
        raise ValueError(
            f"{path}: format_version {meta.get('format_version')!r} is not supported by "
            f"brainmets {__version__} (reads {version}); {again}"
        )
    return meta
