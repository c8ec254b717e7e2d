"""Atomic file writes: a file is either the old one or the complete new one, never half-written.

Everything napari-retina saves (masks, ellipses, provenance, overlays) goes through here,
so an autosave interrupted by a crash, a full disk or a killed process loses nothing.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import RetinaInputError

__all__ = [
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "is_atomic_temporary",
    "remove_stale_temporaries",
]

# `.<stem>.<8 random characters of tempfile>.tmp<suffix>`, as atomic_path names its temporary files
_TEMPORARY_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[^.]+)?$")
# temporary files this process is writing now: never swept as leftovers
_in_flight: set[str] = set()
_in_flight_lock = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # os.umask can only be read by setting it; restore at once
    old = os.umask(0o022)
    os.umask(old)
    return old


def _reason(target: Path, err: OSError) -> str:
    """A short human reason, clearer than ENOENT for the usual folder mistakes."""
    parent = target.parent
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        if parent.exists() and not parent.is_dir():
            return f"{parent} is not a folder"
        if not parent.exists():
            return f"folder {parent} does not exist"
    return err.strerror or str(err)


def _cannot_write(target: Path, err: OSError) -> RetinaInputError:
    return RetinaInputError(f"cannot write {target}: {_reason(target, err)}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; not possible on every OS, so best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _final_mode(target: Path) -> int:
    """Keep an existing file's permissions; a new file gets 0o666 minus umask like open() would."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically.

    The temporary file is `.<stem>.<random>.tmp<suffix>` in the same folder (same file
    system, so `os.replace` is atomic; the real suffix is kept for writers that pick the
    format from it). It exists (empty) when yielded; the body overwrites it. On any error
    it is removed and `path` is untouched. OSErrors about the target (unwritable or missing
    folder, read-only file system, disk full) become `RetinaInputError`; an OSError that
    names some other file (e.g. a missing source being copied) passes through unchanged.
    """
    target = Path(path)
    try:
        fd, name = tempfile.mkstemp(
            prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent
        )
    except OSError as e:
        raise _cannot_write(target, e) from None
    os.close(fd)
    tmp = Path(name)
    with _in_flight_lock:
        _in_flight.add(os.path.abspath(name))
    try:
        yield tmp
        os.chmod(tmp, _final_mode(target))
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException as e:
        _remove_quietly(tmp)
        if isinstance(e, OSError) and e.filename in (None, name, str(target), tmp, target):
            raise _cannot_write(target, e) from None
        raise
    finally:
        with _in_flight_lock:
            _in_flight.discard(os.path.abspath(name))
    _fsync_dir(target.parent)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """Call `write_fn(tmp_path)` and move the result onto `path` atomically; returns `path`."""
    target = Path(path)
    with atomic_path(target) as tmp:
        write_fn(tmp)
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically, newlines as given (no platform translation)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding=encoding, newline="") as f:
            f.write(text)

    return atomic_write(path, write)


def is_atomic_temporary(name: str) -> bool:
    """True for the name of a temporary file `atomic_path` makes (left behind only by a killed process)."""
    return _TEMPORARY_NAME.match(name) is not None


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder`; returns those deleted.

    Only names of `atomic_path`'s pattern go, and never one this process is writing now.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        if not is_atomic_temporary(p.name):
            continue
        with _in_flight_lock:
            busy = os.path.abspath(p) in _in_flight
        if busy or not p.is_file():
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed
