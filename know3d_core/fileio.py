"""Atomic file output shared by the mesh export, the CLI and the ComfyUI save nodes.

Files are written under a temporary name in the destination folder, flushed to disk, then renamed
into place, so a crash or Ctrl-C never leaves a half-written file under the final name. Temporary
files are created with mode 0o666 and the process umask applies (``tempfile.mkstemp`` would make
them private, 0o600); the umask itself is never changed.
"""
from __future__ import annotations

import contextlib
import os
import secrets

__all__ = ["write_temp_file", "atomic_write_bytes"]


def _open_new(folder: str, prefix: str, suffix: str) -> tuple[int, str]:
    for _ in range(100):
        path = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {folder}")


def write_temp_file(folder: str, prefix: str, data: bytes, suffix: str = ".tmp") -> str:
    """Write ``data`` to a new temporary file in ``folder`` (flushed and fsynced); return its path.

    The caller renames or links it into place and removes it on failure.
    """
    fd, tmp = _open_new(folder, prefix, suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write_bytes(path: str, data: bytes, tmp_prefix: str | None = None) -> str:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = tmp_prefix if tmp_prefix is not None else "." + os.path.basename(path) + "."
    tmp = write_temp_file(folder, prefix, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
