"""Atomic writes: final name only when complete, permissions follow the umask, nothing left behind."""
import os
import stat

import pytest

from know3d_core.fileio import atomic_write_bytes, write_temp_file


def _umask() -> int:
    mask = os.umask(0o022)  # test-only read of the umask
    os.umask(mask)
    return mask


def test_atomic_write_creates_file_with_umask_mode(tmp_path):
    path = tmp_path / "sub" / "mesh.glb"
    atomic_write_bytes(str(path), b"abc")
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    assert sorted(os.listdir(path.parent)) == ["mesh.glb"]


def test_atomic_write_replaces_existing_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    atomic_write_bytes(str(path), b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["a.bin"]




def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(str(tmp_path / "x.glb"), b"data")
    assert os.listdir(tmp_path) == []


def test_temp_files_never_collide(tmp_path):
    names = {write_temp_file(str(tmp_path), ".t.", b"x") for _ in range(50)}
    assert len(names) == 50
