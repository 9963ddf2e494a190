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


_FAKES = {}  # id(stand-in) -> (stand-in, the real object it replaces)
# Modules that bind a safetensors reader by name when first imported: imported before the patch, so
# none of them keeps a stand-in after it (uninstall() also repairs any module imported meanwhile).
_PRELOAD = ("know3d_core.safetensors_header", "know3d_core.model_shapes", "know3d_core.trellis2.loading",
            "know3d_core.trellis2.comfy_files", "know3d_core.mmdit.lora", "know3d_core.mmdit.loading",
            "know3d_core.knowledge.checkpoint", "know3d_core.conditioning.dinov3", "transformers.modeling_utils",
            "diffusers.models.model_loading_utils")


def _fake(monkeypatch, owner, name, stand_in):
    _FAKES[id(stand_in)] = (stand_in, getattr(owner, name))
    monkeypatch.setattr(owner, name, stand_in)


def uninstall(monkeypatch):
    """Undo :func:`install`, including stand-ins bound by modules first imported while it was on."""
    monkeypatch.undo()
    for mod in list(sys.modules.values()):
        names = getattr(mod, "__dict__", None)
        if not isinstance(names, dict):
            continue
        for key, value in list(names.items()):
            fake = _FAKES.get(id(value))
            if fake is not None and fake[0] is value:
                setattr(mod, key, fake[1])


def install(monkeypatch):
    """Patch every reader; returns the list of ``.safetensors`` paths opened (headers only).
    End it with :func:`uninstall` (not only ``monkeypatch.undo()``)."""
    import importlib

    for name in _PRELOAD:
        importlib.import_module(name)
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

    _fake(monkeypatch, builtins, "open", guarded_open)
    _fake(monkeypatch, safetensors, "safe_open", header_only_safe_open)
    _fake(monkeypatch, safetensors.torch, "safe_open", refuse("safe_open"))
    _fake(monkeypatch, safetensors.torch, "load_file", refuse("load_file"))
    _fake(monkeypatch, torch, "load", refuse("torch.load"))
    for name, mod in list(sys.modules.items()):
        if name.startswith(("know3d_core", "nodes")) and mod is not None:
            for attr in ("safe_open", "load_file"):
                if callable(getattr(mod, attr, None)):
                    _fake(monkeypatch, mod, attr, refuse(f"{name}.{attr}"))
    return opened
