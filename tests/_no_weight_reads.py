"""Asserts that no model weight is read: every ``.safetensors`` file may be read only up to the end of
its header; safetensors' ``safe_open`` may list keys, metadata, dtypes and shapes but read no tensor;
the tensor readers (``safetensors.torch``'s ``safe_open`` / ``load_file``, ``torch.load``) must not
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
_REAL_SAFE_OPEN = safetensors.safe_open


class _HeaderOnly:
    """``safetensors.safe_open`` that answers from the header (keys, metadata, dtypes, shapes) and
    refuses to read a tensor."""

    def __init__(self, f, path):
        self._f, self._path = f, path

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def keys(self):
        return self._f.keys()

    def metadata(self):
        return self._f.metadata()

    def get_slice(self, key):
        return _ShapeOnly(self._f.get_slice(key), self._path, key)

    def get_tensor(self, key):
        raise WeightRead(f"safe_open({self._path}).get_tensor({key!r}) was called: a weight would be read")


class _ShapeOnly:
    def __init__(self, sl, path, key):
        self._sl, self._what = sl, f"{path}[{key!r}]"

    def get_dtype(self):
        return self._sl.get_dtype()

    def get_shape(self):
        return self._sl.get_shape()

    def __getitem__(self, index):
        raise WeightRead(f"a slice of {self._what} was read: a weight would be read")


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

    def header_only_safe_open(path, *args, **kwargs):
        opened.append(str(path))
        return _HeaderOnly(_REAL_SAFE_OPEN(path, *args, **kwargs), str(path))

    def refuse(name):
        def reader(*args, **kwargs):
            raise WeightRead(f"{name}{args[:1]} was called: weights would be read")
        return reader

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(safetensors, "safe_open", header_only_safe_open)
    monkeypatch.setattr(safetensors.torch, "safe_open", refuse("safe_open"))
    monkeypatch.setattr(safetensors.torch, "load_file", refuse("load_file"))
    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    for name, mod in list(sys.modules.items()):
        if name.startswith(("know3d_core", "nodes")) and mod is not None:
            for attr in ("safe_open", "load_file"):
                if callable(getattr(mod, attr, None)):
                    monkeypatch.setattr(mod, attr, refuse(f"{name}.{attr}"))
    return opened
