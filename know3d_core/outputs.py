"""Safe output files: counter-suffixed names under one output folder, written atomically.

A save name (``"know3d/chair"``) is a relative prefix: an optional sub-folder plus a base name.
Files are named ``{base}_{counter:05d}_.{ext}`` like ComfyUI's save nodes; the counter continues
after the highest one already in the folder for that base name. A name that is absolute or has a
``..`` part is refused before anything touches the disk, and the resolved folder must stay inside
the output folder (symlinks included). Data is written to a hidden temp file in the target folder
and published with a hard link, which never replaces an existing file; so a crash leaves no
half-written file under the final name and two savers never overwrite each other.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .fileio import write_temp_file

__all__ = ["UnsafeSaveName", "SavedFile", "split_save_name", "next_counter", "write_new_file"]

_COUNTER = re.compile(r"^(?P<base>.*)_(?P<n>\d+)_\.[^.]+$")


class UnsafeSaveName(ValueError):
    """A save name that would leave the output folder (absolute, ``..``) or is empty."""


@dataclass(frozen=True)
class SavedFile:
    path: str        # absolute path written
    filename: str    # base file name
    subfolder: str   # folder relative to the output folder ("" for the top), '/'-separated


def split_save_name(name: str) -> tuple[str, str]:
    """``"sub/dir/base"`` -> ``("sub/dir", "base")``; raises :class:`UnsafeSaveName`.

    Refused: empty names, absolute paths (``/x``, ``\\x``, ``C:x``), any ``..`` part, NUL bytes,
    a trailing separator (no base name).
    """
    if not isinstance(name, str) or not name.strip():
        raise UnsafeSaveName("save name is empty; give a relative name such as 'know3d/mesh'")
    if "\0" in name:
        raise UnsafeSaveName(f"save name {name!r} contains a NUL byte")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or os.path.isabs(name) or re.match(r"^[A-Za-z]:", norm):
        raise UnsafeSaveName(
            f"save name {name!r} is an absolute path; files are only written under the output "
            "folder: give a relative name such as 'know3d/mesh'"
        )
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeSaveName(f"save name {name!r} contains '..'; files are only written under the output folder")
    if not parts or norm.endswith("/"):
        raise UnsafeSaveName(f"save name {name!r} has no file name after the folder")
    return "/".join(parts[:-1]), parts[-1]


def next_counter(folder: str, base: str) -> int:
    """1 + the highest counter of ``{base}_{n}_.*`` files in ``folder`` (1 if none)."""
    best = 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 1
    for f in names:
        m = _COUNTER.match(f)
        if m and os.path.normcase(m.group("base")) == os.path.normcase(base):
            best = max(best, int(m.group("n")))
    return best + 1


def _inside(root: str, path: str) -> bool:
    root, path = os.path.realpath(root), os.path.realpath(path)
    return os.path.commonpath([root, path]) == root


def _publish(tmp: str, final: str) -> bool:
    """Make ``tmp`` visible as ``final`` unless ``final`` exists; True on success."""
    try:
        os.link(tmp, final)
        return True
    except FileExistsError:
        return False
    except OSError:
        # No hard links here (some network / FAT file systems): reserve the name, then replace.
        try:
            fd = os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        os.replace(tmp, final)
        return True


def write_new_file(output_dir: str, name: str, ext: str, data: bytes, max_tries: int = 1000) -> SavedFile:
    """Write ``data`` as ``output_dir/{sub}/{base}_{counter:05d}_.{ext}`` (a new file, atomically).

    Raises:
        UnsafeSaveName: the name is unsafe or resolves outside ``output_dir``; nothing is written.
    """
    sub, base = split_save_name(name)
    ext = ext.lower().lstrip(".")
    if not re.fullmatch(r"[a-z0-9]+", ext):
        raise ValueError(f"bad file extension {ext!r}")
    output_dir = os.path.abspath(output_dir)
    folder = os.path.join(output_dir, *sub.split("/")) if sub else output_dir
    # Check the deepest existing ancestor too, so a symlinked sub-folder cannot lead outside.
    probe = folder
    while not os.path.exists(probe) and probe != output_dir:
        probe = os.path.dirname(probe)
    if not _inside(output_dir, probe):
        raise UnsafeSaveName(f"save name {name!r} resolves outside the output folder {output_dir}")
    os.makedirs(folder, exist_ok=True)
    if not _inside(output_dir, folder):
        raise UnsafeSaveName(f"save name {name!r} resolves outside the output folder {output_dir}")
    tmp = write_temp_file(folder, f".{base}.", data)
    try:
        counter = next_counter(folder, base)
        for _ in range(max_tries):
            filename = f"{base}_{counter:05d}_.{ext}"
            final = os.path.join(folder, filename)
            if _publish(tmp, final):
                return SavedFile(path=final, filename=filename, subfolder=sub)
            counter += 1
        raise FileExistsError(f"no free file name for {name!r} in {folder} after {max_tries} tries")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
