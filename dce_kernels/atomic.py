"""Crash-safe file writes: the one way this package writes a file.

A file is written to ``<path>.tmp`` next to it, flushed and fsynced, then moved over
``path`` with ``os.replace`` (atomic on POSIX and Windows), and the directory is
fsynced so that the rename itself survives a power loss. A reader, or a process resuming
after a crash, sees either the old file or the new one, never a part of one; a crash
leaves at most a stale ``.tmp``, which the next write of that file overwrites.

One writer per path at a time: callers that share a path between processes serialize
those writes themselves (the sweep's mutex, a run directory's lock).
"""
from __future__ import annotations

import os
from typing import IO, Callable

__all__ = ["write_atomic", "create_atomic", "TEMP_SUFFIX"]

TEMP_SUFFIX = ".tmp"


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a directory that cannot be opened (Windows): the rename is all we get
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; nothing more to do there
    finally:
        os.close(fd)


def _write_temp(path: str, write: Callable[[IO], None], binary: bool) -> str:
    tmp = path + TEMP_SUFFIX
    # newline="": text is written as given (the csv module writes its own line ends).
    with open(tmp, "wb") if binary else open(tmp, "w", newline="") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_atomic(path: str | os.PathLike, write: Callable[[IO], None],
                 binary: bool = False) -> None:
    """Writes ``path`` through ``write(file)`` (a text file, or binary with ``binary``),
    all or nothing (see the module docstring)."""
    path = os.fspath(path)
    tmp = _write_temp(path, write, binary)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def create_atomic(path: str | os.PathLike, text: str) -> bool:
    """Creates ``path`` holding ``text`` if it does not exist yet; False if it does.

    The file appears with its whole content at once (``os.link`` of a complete
    temporary file fails if ``path`` exists), so no process ever reads it empty."""
    path = os.fspath(path)
    tmp = _write_temp(path, lambda f: f.write(text), binary=False)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    _fsync_dir(os.path.dirname(path) or ".")
    return True
