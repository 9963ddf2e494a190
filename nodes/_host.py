"""The few places where nodes touch the ComfyUI host, each importing ``comfy`` lazily.

Every function works without ComfyUI too (plain Python, CI): progress and cancellation become
no-ops, models stay where they are, and host-only services (the output folder, model folders)
raise :class:`HostUnavailable` naming what is missing. Nothing here changes process-global
settings: model folders are only ever *added* (paths users set in extra_model_paths.yaml stay).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import logging
import os
import sys
import time
from typing import Any, Iterable, Optional

import torch

log = logging.getLogger("know3d")

# Model folders this pack adds (name -> (sub-folder of models/, extensions, what goes there)).
MODEL_FOLDERS = {
    "know3d": ("know3d", {".safetensors"}, "Know3D checkpoints (know3d_*.safetensors)"),
    "trellis2": ("trellis2", {".json", ".safetensors"},
                 "official TRELLIS.2 folders (a copy of microsoft/TRELLIS.2-4B: pipeline.json + ckpts/)"),
}


class HostUnavailable(RuntimeError):
    """A ComfyUI service was asked for outside ComfyUI."""


# ComfyUI's own top-level packages: only imported when ComfyUI's ``comfy`` is really there.
_COMFY_PACKAGES = ("comfy", "comfy_api", "comfy_extras", "comfy_execution")


def _is_comfyui() -> bool:
    """True when ComfyUI's ``comfy`` package is importable. ComfyUI's ``comfy`` is a namespace
    package, so any folder named ``comfy`` on sys.path would import too: look for its files, without
    importing anything."""
    mod = sys.modules.get("comfy")
    locations = getattr(mod, "__path__", None) if mod is not None else None
    if locations is None:
        spec = importlib.machinery.PathFinder.find_spec("comfy")
        locations = spec.submodule_search_locations if spec is not None else None
    return any(os.path.isfile(os.path.join(p, "model_management.py")) for p in (locations or []))


def _module(name: str):
    """``importlib.import_module(name)``, or None when it is not installed (ComfyUI's packages: when
    ComfyUI is not there)."""
    if name.split(".")[0] in _COMFY_PACKAGES and not _is_comfyui():
        return None
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def comfy_available() -> bool:
    return _module("comfy") is not None and _module("folder_paths") is not None


# ------------------------------------------------------------------------------ progress / cancel
class Progress:
    """A per-node progress bar: ComfyUI's ``ProgressBar`` when present (its hook also raises
    ComfyUI's interrupt between steps), else a counter."""

    def __init__(self, total: int):
        self.total = int(total)
        self.current = 0
        utils = _module("comfy.utils")
        self._bar = utils.ProgressBar(self.total) if utils is not None else None

    def update(self, n: int = 1) -> None:
        self.current += n
        if self._bar is not None:
            self._bar.update(n)
        check_interrupted()

    def callback(self, *_args, **_kwargs) -> None:
        """Drop-in for sampler callbacks: one step done."""
        self.update(1)


def check_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed cancel."""
    mm = _model_management()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def interrupted() -> bool:
    """True once the user pressed cancel (does not clear the flag; for cancel() polls)."""
    mm = _model_management()
    return bool(mm.processing_interrupted()) if mm is not None else False


def _model_management():
    # comfy.model_management needs a working device at import; ComfyUI itself imported it first.
    if _module("comfy") is None:
        return None
    return _module("comfy.model_management")


# ------------------------------------------------------------------------------ folders and files
def output_directory() -> str:
    fp = _module("folder_paths")
    if fp is None:
        raise HostUnavailable("the output folder is ComfyUI's (folder_paths); not running inside ComfyUI")
    return fp.get_output_directory()


def register_model_folders() -> None:
    """Add ``models/know3d`` and ``models/trellis2`` without dropping paths from extra_model_paths.yaml.

    ``add_model_folder_path`` appends to an entry the YAML may already have made; the extension
    set is widened in place (reassigning the entry would drop the YAML's paths).
    """
    fp = _module("folder_paths")
    if fp is None:
        return
    for name, (sub, exts, _what) in MODEL_FOLDERS.items():
        fp.add_model_folder_path(name, os.path.join(fp.models_dir, sub))
        fp.folder_names_and_paths[name][1].update(exts)


def _folder_paths_for(folder: str):
    """ComfyUI's ``folder_paths`` with our model folders registered when ``folder`` is one of them
    (None outside ComfyUI)."""
    fp = _module("folder_paths")
    if fp is not None and folder in MODEL_FOLDERS:
        register_model_folders()
    return fp


def filename_list(folder: str) -> list[str]:
    """Files ComfyUI lists for a model folder ([] outside ComfyUI)."""
    fp = _folder_paths_for(folder)
    if fp is None:
        return []
    try:
        return list(fp.get_filename_list(folder))
    except KeyError:
        return []


def trellis2_folders() -> list[str]:
    """Official TRELLIS.2 folders under models/trellis2, as ``relative/dir/`` (trailing slash)."""
    out = []
    for f in filename_list("trellis2"):
        f = f.replace(os.sep, "/")
        if f.endswith("pipeline.json"):
            d = f[: -len("pipeline.json")]
            out.append(d if d else "./")
    return sorted(out)


def folder_paths_of(folder: str) -> list[str]:
    fp = _folder_paths_for(folder)
    if fp is None:
        return []
    try:
        return fp.get_folder_paths(folder)
    except KeyError:
        return []


def full_path(folder: str, name: str, source: str) -> str:
    """Absolute path of ``name`` in a model folder, or FileNotFoundError naming the file, the
    folders searched and ``source`` (where the file comes from). A name that is already an
    existing absolute path is returned as is (tests, headless use)."""
    if os.path.isabs(name) and os.path.exists(name):
        return name
    fp = _folder_paths_for(folder)
    found = None
    if fp is not None:
        if name.endswith("/"):
            for base in folder_paths_of(folder):
                cand = os.path.join(base, name)
                if os.path.isfile(os.path.join(cand, "pipeline.json")):
                    found = os.path.normpath(cand)
                    break
        else:
            found = fp.get_full_path(folder, name)
    if found is None:
        where = ", ".join(folder_paths_of(folder)) or f"models/{folder}"
        raise FileNotFoundError(
            f"Know3D: {name!r} not found in the {folder!r} model folder ({where}). "
            f"Expected: {name}. It comes from {source}."
        )
    return found


# ------------------------------------------------------------------------------ devices and models
def torch_device() -> torch.device:
    mm = _model_management()
    return mm.get_torch_device() if mm is not None else torch.device("cpu")


def intermediate_device() -> torch.device:
    mm = _model_management()
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


class _Holder(torch.nn.Module):
    """Wraps one network so the host may set bookkeeping attributes (``device``, ...) on it."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net


class ManagedModel:
    """One network under ComfyUI's model management (a ``ModelPatcher``), or plain outside it.

    :func:`load_models` loads it to the compute device (evicting other models if needed, e.g. the Qwen
    MMDiT on a 24 GB card). The network itself is never mutated by nodes; it is shared, read-only, by
    every node that receives the KNOW3D_MODEL.
    """

    def __init__(self, net: torch.nn.Module, name: str):
        self.name = name
        self.net = net.eval().requires_grad_(False)
        self.patcher = None
        mm = _model_management()
        mp = _module("comfy.model_patcher") if mm is not None else None
        if mp is not None:
            holder = _Holder(self.net)
            self.patcher = mp.ModelPatcher(holder, load_device=mm.get_torch_device(),
                                           offload_device=mm.unet_offload_device())

    @property
    def device(self) -> torch.device:
        if self.patcher is not None:
            return self.patcher.load_device
        return next(self.net.parameters()).device


def load_models(models: Iterable[Optional[ManagedModel]], memory_required: int = 0) -> None:
    """Load several managed models at once (so they do not evict each other), keeping ``memory_required``
    bytes free beside them for what runs next (ComfyUI evicts other models for it; also when every one of
    them is already loaded, so a stage with more tokens than the last gets its room)."""
    models = [m for m in models if m is not None]
    patchers = [m.patcher for m in models if m.patcher is not None]
    if patchers:
        _model_management().load_models_gpu(patchers, memory_required=int(memory_required), force_full_load=True)


@contextlib.contextmanager
def stage(name: str, device: Optional[torch.device] = None):
    """Log wall time and peak VRAM of a stage (CUDA only) as one line."""
    dev = torch.device(device) if device is not None else torch_device()
    cuda = dev.type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated(dev) / 2**30
        log.info("Know3D %s: %.2f s, peak VRAM %.2f GiB", name, dt, peak)
    else:
        log.info("Know3D %s: %.2f s", name, dt)


# ------------------------------------------------------------------------------ core 3D types
class HostlessMesh:
    """Stand-in for ComfyUI's ``Types.MESH`` outside ComfyUI (same attribute names)."""

    def __init__(self, vertices, faces, vertex_counts=None, face_counts=None, **_):
        self.vertices = vertices
        self.faces = faces
        self.vertex_counts = vertex_counts
        self.face_counts = face_counts
        self.uvs = self.vertex_colors = self.normals = self.texture = None


class HostlessVoxel:
    """Stand-in for ComfyUI's ``Types.VOXEL`` outside ComfyUI."""

    def __init__(self, data, voxel_colors=None, resolution=None):
        self.data = data
        self.voxel_colors = voxel_colors
        self.resolution = resolution


def _types():
    latest = _module("comfy_api.latest")
    return getattr(latest, "Types", None) if latest is not None else None


def make_mesh(vertices: list[torch.Tensor], faces: list[torch.Tensor], metadata: Optional[dict] = None):
    """Core MESH from per-item Y-up ``[V_i, 3]`` float / ``[F_i, 3]`` int tensors (CPU).

    Ragged batches are zero-padded with ``vertex_counts`` / ``face_counts`` as core expects.
    ``metadata`` (seed, prompt, ...) rides along as ``know3d_metadata`` for Save Mesh.
    """
    types = _types()
    cls = types.MESH if types is not None else HostlessMesh
    vertices = [v.detach().float().cpu() for v in vertices]
    faces = [f.detach().to(torch.int64).cpu() for f in faces]
    same = all(v.shape == vertices[0].shape for v in vertices) and all(f.shape == faces[0].shape for f in faces)
    if same:
        mesh = cls(vertices=torch.stack(vertices), faces=torch.stack(faces))
    else:
        nv, nf = max(v.shape[0] for v in vertices), max(f.shape[0] for f in faces)
        pv = torch.zeros(len(vertices), nv, 3)
        pf = torch.zeros(len(faces), nf, 3, dtype=torch.int64)
        for i, (v, f) in enumerate(zip(vertices, faces)):
            pv[i, : v.shape[0]] = v
            pf[i, : f.shape[0]] = f
        mesh = cls(vertices=pv, faces=pf,
                   vertex_counts=torch.tensor([v.shape[0] for v in vertices], dtype=torch.int64),
                   face_counts=torch.tensor([f.shape[0] for f in faces], dtype=torch.int64))
    mesh.know3d_metadata = dict(metadata or {})
    return mesh


def mesh_items(mesh: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-item ``(vertices [V, 3], faces [F, 3])`` of a core MESH (padding removed), Y-up."""
    v, f = mesh.vertices, mesh.faces
    if v.dim() == 2:
        return [(v, f)]
    vc, fc = getattr(mesh, "vertex_counts", None), getattr(mesh, "face_counts", None)
    out = []
    for i in range(v.shape[0]):
        if vc is not None and fc is not None:
            out.append((v[i, : int(vc[i])], f[i, : int(fc[i])]))
        else:
            out.append((v[i], f[i]))
    return out


def make_voxel(data: torch.Tensor, resolution: Optional[int] = None):
    types = _types()
    cls = types.VOXEL if types is not None else HostlessVoxel
    return cls(data, resolution=resolution)


def disable_metadata() -> bool:
    """ComfyUI's ``--disable-metadata`` flag (False outside ComfyUI)."""
    cli = _module("comfy.cli_args") if _module("comfy") is not None else None
    return bool(getattr(getattr(cli, "args", None), "disable_metadata", False))
