"""Asserts that no model weight is read: every ``.safetensors`` file may be read only up to the end of
its header, and the tensor readers (safetensors ``safe_open`` / ``load_file``, ``torch.load``) must not
be called at all. Used by the issue-16 tests of ``know3d models`` and of the pre-load validation."""
import builtins
import struct
import sys

import safetensors
import safetensors.torch
import torch

READERS = ("safe_open", "load_file", "load")


class WeightRead(AssertionError):
    pass


def _header_end(path: str) -> int:
    with _REAL_OPEN(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


_REAL_OPEN = builtins.open


class _CountingFile:
    def __init__(self, f, limit, path):
        self._f, self._limit, self._path = f, limit, path

    def read(self, n=-1):
        data = self._f.read(n)
        if self._f.tell() > self._limit:
            raise WeightRead(f"read {self._path} past its header ({self._f.tell()} > {self._limit} bytes)")
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def install(monkeypatch):
    """Patch every reader; returns the list of ``.safetensors`` paths opened (headers only)."""
    opened = []

    def guarded_open(file, mode="r", *args, **kwargs):
        f = _REAL_OPEN(file, mode, *args, **kwargs)
        if isinstance(file, (str, bytes)) or hasattr(file, "__fspath__"):
            path = str(file)
            if path.endswith(".safetensors") and "r" in mode:
                opened.append(path)
                return _CountingFile(f, _header_end(path), path)
        return f

    def refuse(name):
        def reader(*args, **kwargs):
            raise WeightRead(f"{name}{args[:1]} was called: weights would be read")
        return reader

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(safetensors, "safe_open", refuse("safe_open"))
    monkeypatch.setattr(safetensors.torch, "safe_open", refuse("safe_open"))
    monkeypatch.setattr(safetensors.torch, "load_file", refuse("load_file"))
    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    for name, mod in list(sys.modules.items()):
        if name.startswith(("know3d_core", "nodes")) and mod is not None:
            for attr in ("safe_open", "load_file"):
                if callable(getattr(mod, attr, None)):
                    monkeypatch.setattr(mod, attr, refuse(f"{name}.{attr}"))
    return opened
