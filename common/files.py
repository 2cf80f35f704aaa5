"""Atomic file writes (write a temporary sibling, fsync, then rename over the target), and a lock
for work that processes sharing a folder should do once.

A reader (a user, TensorBoard, a server polling a directory) never sees a half-written file, and a
crash mid-write leaves the previous version intact.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

Result = TypeVar("Result")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` atomically; creates the parent directory. Returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(temporary_name, 0o644)  # mkstemp makes it private; the target is an ordinary readable file
        with os.fdopen(handle, "wb") as temporary_file:
            temporary_file.write(data)
            temporary_file.flush()
            os.fsync(temporary_file.fileno())
        os.replace(temporary_name, target)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise
    return target


def write_npz_atomic(path: str | os.PathLike, **arrays) -> Path:
    """Writes `arrays` as one uncompressed .npz file (read back with `np.load(allow_pickle=False)`), atomically."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes_atomic(path, buffer.getvalue())


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """Writes `payload` as pretty, key-sorted JSON, atomically."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, on_wait: Callable[[], None] = lambda: None) -> Iterator[bool]:
    """Holds an exclusive advisory lock on the file `path` (created if missing) for the `with` block.

    Processes that share a folder (two trainings, the workers of a multi-worker job) prepare a shared
    file under it and read it after: the first one does the work, the others wait, then find it
    done. `on_wait` is called once if another process holds the lock. The lock goes with the
    process, so a killed holder never leaves it stuck. Yields False, and locks nothing, where the
    file cannot be created (a read-only folder): the work is then done without it, as before.
    """
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError:
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def read_or_make_once(read: Callable[[], Result | None], make: Callable[[], Result], lock_path: str | os.PathLike,
                      on_wait: Callable[[], None] = lambda: None) -> Result:
    """`read()`, or else `make()` under `exclusive_lock(lock_path)`: of processes that find nothing to read
    at the same time, the first makes it and the others wait, then read what it made."""
    found = read()
    if found is not None:
        return found
    with exclusive_lock(lock_path, on_wait=on_wait):
        found = read()  # another process may have made it while this one waited
        return found if found is not None else make()
