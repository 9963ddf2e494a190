"""Small cards in ComfyUI (issue 22, part 3): the ``know3d_full`` graph's nodes in one process under
ComfyUI's own model management, capped like a 24 GB card.

A full ComfyUI server cannot run on the lent GPU machine (not on its image, nothing can be fetched
there, and what travels is at most 64 MiB: the frontend, PyAV and comfy-kitchen's compiled kernels
alone are ~400 MB). What runs instead is the closest thing: ComfyUI's ``comfy`` package imported
in-process (its Python source and that of the few packages it imports, ``--make-min``), and the
nodes of ``example_workflows_api/know3d_full.json`` executed one by one in the graph's order with
their real classes: core's ``ModelSamplingAuraFlow``, ``CFGNorm``, ``TextEncodeQwenImageEditPlus``
(x2), ``FluxKontextMultiReferenceLatentMethod`` (x2), ``FluxKontextImageScale``, ``VAEEncode``,
``VAEDecode``, and ours: ``Know3DLoadQwenEditLoRA``, ``Know3DBackViewPrompt``,
``Know3DImageCondition``, ``Know3DBackViewSample``, ``Know3DExtractHiddenStates``,
``Know3DSparseStructure``, ``Know3DGeometry`` (1024 cascade). Every model is a ``ModelPatcher``
that ``comfy.model_management.load_models_gpu`` loads, partially loads or evicts; ours are the ones
``Know3DLoadModel`` makes (``nodes.trellis._wrap_pipeline``).

Models (RANDOM weights, full size):
* Qwen-Image-Edit-2511 MMDiT as ``qwen_image_edit_2511_fp8_e4m3fn.safetensors`` holds it (every 2-D
  weight of the 60 blocks in float8 e4m3, the rest bf16, the 2511 marker), handed to core's
  ``comfy.sd.load_diffusion_model_state_dict`` (what ``UNETLoader`` calls after reading the file).
* Qwen2.5-VL-7B text encoder as ``qwen_2.5_vl_7b_fp8_scaled.safetensors`` holds it (``scaled_fp8``
  marker, each language-model Linear in fp8 with ``scale_weight``), through core's
  ``convert_old_quants`` + ``load_text_encoder_state_dicts`` (``CLIPLoader``'s path), type qwen_image.
* Qwen-Image VAE (Wan 2.1, dim 96) through ``comfy.sd.VAE`` (``VAELoader``'s path).
* The back-view LoRA (rank ``--lora-rank`` on to_q/k/v of every block) written to a temporary file,
  which our LoRA node reads, and deleted.
* TRELLIS.2 4B with the Know3D branch (``bench_small_cards.build_geometry``), wrapped as
  ``Know3DLoadModel`` wraps what it loads. As in ``bench_geometry.py``, random weights make the
  occupancy meaningless, so the structure stage runs for real and its coords become a sphere shell.
Only the file read is skipped (no file is written but the LoRA): everything from the state dict on
is core's code. The state dicts are drawn on the GPU (before the cap) and kept in host RAM.

The card: ComfyUI sizes its loads from ``cudaMemGetInfo``, which sees the whole GPU, so the run
sets ``--reserve-vram`` to (GPU total - card + ComfyUI's default 0.4 GB) before model management
starts, AND caps torch's allocator at the card less the CUDA context
(``set_per_process_memory_fraction``): ComfyUI then plans for a 24 GB card and cannot use more.
DynamicVRAM (comfy-aimdo's allocator, which ComfyUI's main.py enables on NVIDIA) stays off:
``--disable-dynamic-vram``, the classic ``ModelPatcher`` path (partial "lowvram" loads).

Per node: seconds, peak allocated / reserved GiB (the peak over the whole node: the stages'
own peak resets are folded in), and ComfyUI's loaded models after it (loaded / total GiB each);
our stages also log their own line (``Know3D <stage>: s, peak VRAM``), collected verbatim.

    python benchmarks/bench_comfy_small_cards.py --comfyui COMFYUI_DIR --tiny --out tiny.json   # CPU check
    python benchmarks/bench_comfy_small_cards.py --make-min .comfy_min --comfyui COMFYUI_DIR --site SITE_PACKAGES
    python benchmarks/bench_comfy_small_cards.py --comfyui .comfy_min/ComfyUI --card 24 --out comfy.json  # GPU
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import importlib.abc
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GIB = 2 ** 30
PACK = "know3d_pack_comfy_bench"  # the package name ComfyUI would give the pack (its folder's)
PROMPT = "a hollow backrest with three vertical slats"
COMFY_DEFAULT_RESERVE_GB = 0.4  # ComfyUI's EXTRA_RESERVED_VRAM on Linux

# Tiny widths (CPU check): the MMDiT and VAE of the test pack (tests/data/comfyui/know3d_test_nodes), a
# text encoder whose k_proj bias keeps ComfyUI's Qwen2.5-7B detection (4 kv heads x 128).
TINY_QWEN = dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
TINY_QWEN_LAYERS = 3
TINY_TE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2)
FULL_QWEN_LAYERS = 60
VAE_DIM = {True: 8, False: 96}
SIZES = {True: dict(back_steps=2, trellis_steps=2, n_cascade=100, front=96),
         False: dict(back_steps=4, trellis_steps=4, n_cascade=2400, front=512)}


# ----------------------------------------------------------------------------------- ComfyUI in-process
def start_comfy(comfy_dir: str, tiny: bool, card: float) -> dict:
    """Put ComfyUI on sys.path, set its command-line args (before model management reads them),
    import ``comfy.model_management``. Returns what was set."""
    sys.path.insert(0, os.path.abspath(comfy_dir))
    stood_in = stand_in_for_absent_video()
    import comfy.cli_args

    a = comfy.cli_args.args
    a.disable_dynamic_vram = True
    setup = {"comfy_dir": os.path.abspath(comfy_dir), "dynamic_vram": False, "stood_in_for": stood_in}
    if tiny or not torch.cuda.is_available():
        a.cpu = True
        a.use_pytorch_cross_attention = True  # SDPA, as ComfyUI picks on an NVIDIA GPU (CPU default: sliced attention)
    elif card:
        total = torch.cuda.get_device_properties(0).total_memory
        a.reserve_vram = round((total - card * GIB) / GIB + COMFY_DEFAULT_RESERVE_GB, 3)
        setup["reserve_vram_gb"] = a.reserve_vram
    import comfy.model_management as mm  # noqa: F401
    import nodes  # noqa: F401 - ComfyUI's nodes.py, before the pack's root (which holds a nodes/ package) is on sys.path

    import comfyui_version

    setup["comfyui_version"] = comfyui_version.__version__
    setup["packages"] = {name: list(importlib.import_module(name).__path__)[0] for name in MIN_SITE_PACKAGES}
    return setup


def load_pack():
    """Import the repository as ComfyUI imports a custom node folder (a package of its own name), and
    make ``know3d_core`` (what the benchmarks import) the pack's own, so nodes and pipeline share classes."""
    spec = importlib.util.spec_from_file_location(PACK, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = pack
    spec.loader.exec_module(pack)
    sys.meta_path.insert(0, _PackAlias())
    return pack


class _PackAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import know3d_core.x`` -> the module ``know3d_pack_comfy_bench.know3d_core.x`` (one copy)."""

    def find_spec(self, name, path=None, target=None):
        if name == "know3d_core" or name.startswith("know3d_core."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(f"{PACK}.{spec.name}")

    def exec_module(self, module):
        return None


class _AbsentVideoLibrary(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``av`` (PyAV) where it is not installed: ``comfy_api.latest`` imports it for its video types (and
    reads a few enum members at import); no node of this graph touches video. Every name is a
    placeholder, and calling one raises ImportError naming this stand-in."""

    def find_spec(self, name, path=None, target=None):
        if name == "av" or name.startswith("av."):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        import types

        class Placeholder(type):
            def __getattr__(cls, attr):
                if attr.startswith("__"):
                    raise AttributeError(attr)
                value = Placeholder(f"{cls.__name__}.{attr}", (), {})
                setattr(cls, attr, value)
                return value

            def __call__(cls, *a, **k):
                raise ImportError(f"PyAV is not installed ({cls.__name__}): bench_comfy_small_cards stands in for it")

        mod = types.ModuleType(spec.name)
        mod.__path__ = []

        def placeholder(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            value = Placeholder(f"{spec.name}.{attr}", (), {})
            setattr(mod, attr, value)
            return value

        mod.__getattr__ = placeholder
        return mod

    def exec_module(self, module):
        return None


def stand_in_for_absent_video() -> list:
    """Install the ``av`` stand-in when PyAV is missing; returns what was stood in for."""
    if importlib.util.find_spec("av") is not None:
        return []
    sys.meta_path.append(_AbsentVideoLibrary())
    return ["av"]


# ----------------------------------------------------------------------------------- measuring
class Peaks:
    """Peak allocated / reserved over a span that contains other ``reset_peak_memory_stats`` calls
    (our stages reset it): each reset first folds the running peak in."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.alloc = self.reserved = 0
        if self.cuda:
            self._reset = torch.cuda.reset_peak_memory_stats
            torch.cuda.reset_peak_memory_stats = self._folding_reset

    def _fold(self):
        self.alloc = max(self.alloc, torch.cuda.max_memory_allocated(self.device))
        self.reserved = max(self.reserved, torch.cuda.max_memory_reserved(self.device))

    def _folding_reset(self, device=None):
        self._fold()
        self._reset(device)

    def start(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._reset(self.device)
        self.alloc = self.reserved = 0

    def stop(self) -> dict:
        if not self.cuda:
            return {}
        torch.cuda.synchronize(self.device)
        self._fold()
        return {"peak_allocated_gib": round(self.alloc / GIB, 3), "peak_reserved_gib": round(self.reserved / GIB, 3),
                "allocated_after_gib": round(torch.cuda.memory_allocated(self.device) / GIB, 3)}


def loaded_models() -> list:
    """ComfyUI's loaded models: name, GiB on the device, GiB in all."""
    import comfy.model_management as mm

    out = []
    for lm in mm.current_loaded_models:
        patcher = lm.model
        if patcher is None:
            continue
        out.append({"model": _model_name(patcher), "loaded_gib": round(lm.model_loaded_memory() / GIB, 3),
                    "size_gib": round(lm.model_memory() / GIB, 3)})
    return out


def _model_name(patcher) -> str:
    inner = getattr(patcher, "model", None)
    return type(getattr(inner, "net", inner)).__name__  # our _Holder's network, or core's model


class LoadCalls:
    """Records every ``load_models_gpu`` call (core's nodes' and ours): the models and the ``memory_required``
    asked for beside them (the working memory a stage keeps free; ComfyUI evicts other models for it)."""

    def __init__(self):
        import comfy.model_management as mm

        self.calls = []
        real = mm.load_models_gpu

        def recorded(models, memory_required=0, *args, **kwargs):
            self.calls.append({"models": sorted(_model_name(m) for m in models), "memory_required": int(memory_required)})
            return real(models, memory_required, *args, **kwargs)

        mm.load_models_gpu = recorded


class StageLog(logging.Handler):
    """Collects the ``know3d`` logger's stage lines (``Know3D <stage>: s, peak VRAM``)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def outputs(result) -> tuple:
    """A node's outputs: V3 ``NodeOutput.result`` or a V1 tuple."""
    return tuple(getattr(result, "result", result))


# ----------------------------------------------------------------------------------- random "files"
def _random(shape, dtype, std: float, gen_device: torch.device) -> torch.Tensor:
    """A random tensor drawn on ``gen_device`` (the GPU: fast), stored on the CPU in ``dtype``."""
    t = torch.empty(shape, device=gen_device, dtype=torch.float32 if dtype.itemsize > 2 else torch.bfloat16)
    t.normal_(0.0, std)
    return t.to(dtype).cpu()


def _state_dict_of(make) -> dict:
    """Names, shapes and dtypes of ``make()``'s state dict, built on the meta device."""
    with torch.device("meta"):
        net = make()
    return {k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()}


def _std(name: str, shape) -> float:
    """Weights 1/sqrt(fan_in) (activations stay O(1) through random layers), norms 1, biases small."""
    if len(shape) >= 2:
        return 1.0 / math.sqrt(math.prod(shape[1:]))
    return 0.02


def random_state_dict(layout: dict, fp8_key, gen_device: torch.device, scaled: bool = False) -> dict:
    """Random weights for ``layout`` (name -> (shape, dtype)): keys where ``fp8_key(name, shape)``
    holds in float8 e4m3 (``scaled``: plus ``<layer>.scale_weight``, fp32 scalar), the rest bf16."""
    fp8 = torch.float8_e4m3fn
    sd = {}
    for name, (shape, _dtype) in layout.items():
        std = _std(name, shape)
        if name.endswith("weight") and len(shape) == 1:
            sd[name] = torch.ones(shape, dtype=torch.bfloat16)
        elif fp8_key(name, shape):
            scale = std / 0.5 if scaled else 1.0  # scaled: stored values ~N(0, 0.5), inside e4m3's normal range
            sd[name] = _random(shape, fp8, std / scale, gen_device)
            if scaled:
                sd[name[: -len("weight")] + "scale_weight"] = torch.tensor(scale, dtype=torch.float32)
        else:
            sd[name] = _random(shape, torch.bfloat16, std, gen_device)
    return sd


def qwen_mmdit_state_dict(tiny: bool, gen_device: torch.device) -> dict:
    """``qwen_image_edit_2511_fp8_e4m3fn``'s layout: diffusers names, 2-D block weights in fp8, the 2511 marker."""
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    import comfy.ops

    cfg = dict(num_layers=TINY_QWEN_LAYERS if tiny else FULL_QWEN_LAYERS, default_ref_method="index_timestep_zero")
    if tiny:
        cfg.update(TINY_QWEN)
    layout = _state_dict_of(lambda: QwenImageTransformer2DModel(**cfg, dtype=torch.bfloat16,
                                                                operations=comfy.ops.disable_weight_init))
    sd = random_state_dict(layout, lambda k, s: k.startswith("transformer_blocks.") and len(s) == 2, gen_device)
    sd["__index_timestep_zero__"] = torch.empty(0, dtype=torch.bfloat16)
    return sd


def qwen_te_state_dict(tiny: bool, gen_device: torch.device) -> dict:
    """``qwen_2.5_vl_7b_fp8_scaled``'s layout: ComfyUI's names, language-model Linears in scaled fp8."""
    import comfy.ops
    from comfy.text_encoders.llama import Qwen25_7BVLI

    layout = _state_dict_of(lambda: Qwen25_7BVLI({}, dtype=torch.bfloat16, device="meta",
                                                 operations=comfy.ops.disable_weight_init))
    sd = random_state_dict(layout, lambda k, s: k.startswith("model.layers.") and len(s) == 2, gen_device, scaled=True)
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return sd


def qwen_vae_state_dict(tiny: bool, gen_device: torch.device) -> dict:
    """The Qwen-Image VAE (Wan 2.1 layout, 16 latent channels)."""
    from comfy.ldm.wan.vae import WanVAE

    layout = _state_dict_of(lambda: WanVAE(dim=VAE_DIM[tiny], z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                           attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0))
    sd = random_state_dict(layout, lambda k, s: False, gen_device)
    for k in sd:
        if k.endswith("gamma"):
            sd[k] = torch.ones_like(sd[k])
    return sd


def write_backview_lora(path: str, tiny: bool, rank: int) -> str:
    """A back-view LoRA for Qwen-Image-Edit at this width (to_q/k/v of every block; ComfyUI's key family)."""
    from safetensors.torch import save_file

    width = (TINY_QWEN["num_attention_heads"] * TINY_QWEN["attention_head_dim"]) if tiny else 3072
    layers = TINY_QWEN_LAYERS if tiny else FULL_QWEN_LAYERS
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for i in range(layers):
        for proj in ("to_q", "to_k", "to_v"):
            name = f"diffusion_model.transformer_blocks.{i}.attn.{proj}"
            tensors[f"{name}.lora_A.weight"] = (torch.randn(rank, width, generator=g) / math.sqrt(width)).bfloat16()
            tensors[f"{name}.lora_B.weight"] = (0.01 * torch.randn(width, rank, generator=g)).bfloat16()
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path)
    return path


@contextlib.contextmanager
def tiny_comfy_configs(tiny: bool):
    """Tiny only: ComfyUI's fixed full-size Qwen configs (MMDiT widths, Qwen2.5-VL text and vision
    towers) replaced by tiny ones for the duration; detection, loading and every forward stay core's."""
    if not tiny:
        yield
        return
    import comfy.model_detection as md
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_vl as qwen_vl

    real_detect, real_cfg, real_vision = md.detect_unet_config, llama.Qwen25_7BVLI_Config, qwen_vl.Qwen2VLVisionTransformer

    def detect(state_dict, key_prefix, *a, **k):
        cfg = real_detect(state_dict, key_prefix, *a, **k)
        if isinstance(cfg, dict) and cfg.get("image_model") == "qwen_image":
            cfg.update(TINY_QWEN)
        return cfg

    @dataclasses.dataclass
    class TinyTextConfig(real_cfg):
        hidden_size: int = TINY_TE["hidden_size"]
        intermediate_size: int = TINY_TE["intermediate_size"]
        num_hidden_layers: int = TINY_TE["num_hidden_layers"]
        num_attention_heads: int = TINY_TE["num_attention_heads"]
        num_key_value_heads: int = TINY_TE["num_key_value_heads"]

    class TinyVision(real_vision):
        def __init__(self, hidden_size=None, output_hidden_size=None, **kw):
            kw.update({k: v for k, v in TINY_VISION.items() if k != "hidden_size"})
            super().__init__(hidden_size=TINY_VISION["hidden_size"], output_hidden_size=output_hidden_size, **kw)

    md.detect_unet_config, llama.Qwen25_7BVLI_Config, qwen_vl.Qwen2VLVisionTransformer = detect, TinyTextConfig, TinyVision
    try:
        yield
    finally:
        md.detect_unet_config, llama.Qwen25_7BVLI_Config, qwen_vl.Qwen2VLVisionTransformer = real_detect, real_cfg, real_vision


# ----------------------------------------------------------------------------------- the graph
def fix_structure(geometry, n_tokens: int, base: int = 32) -> None:
    """The structure stage runs for real; its coords become a sphere shell of ~``n_tokens`` voxels on
    the ``base`` grid, each split into its children on the finer grid the node asks for (Geometry's
    cascade pools them back to that shell)."""
    from bench_geometry import sphere_shell

    real = geometry.sample_sparse_structure

    def shell(*args, resolution: int = base, **kwargs):
        try:
            real(*args, resolution=resolution, **kwargs)
        except RuntimeError as e:  # random weights may decode an empty structure (tiny)
            if "empty" not in str(e):
                raise
        coords = sphere_shell(min(base, resolution), n_tokens)
        f = resolution // base
        if f <= 1:
            return coords
        offsets = torch.stack(torch.meshgrid(*[torch.arange(f)] * 3, indexing="ij"), -1).reshape(-1, 3).int()
        xyz = (coords[:, None, 1:] * f + offsets[None]).reshape(-1, 3)
        return torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1)

    geometry.sample_sparse_structure = shell


def front_inputs(size: int):
    """LoadImage + InvertMask of an RGBA front: IMAGE [1, H, W, 3], MASK [1, H, W] (1 = object)."""
    from bench_small_cards import front_image

    import numpy as np

    rgba = torch.from_numpy(np.asarray(front_image(size), dtype=np.float32) / 255.0)
    return rgba[None, :, :, :3].contiguous(), rgba[None, :, :, 3].contiguous()


PROMPT_ID = "know3d-small-cards"  # the prompt id the nodes see in their execution context


@contextlib.contextmanager
def executor_scope():
    """What ComfyUI 0.33.0's ``PromptExecutor.execute_async`` sets up around a prompt: the interrupt flag
    cleared, the whole prompt (loaders included) under ``torch.inference_mode()``, a model-management
    GC pass before the first node. Without it, tensors a node makes under core's own inference-mode
    code (the tiled VAE decode) fail their in-place updates outside it."""
    import comfy.model_management as mm
    import nodes as core

    core.interrupt_processing(False)
    with torch.inference_mode():
        mm.cleanup_models_gc()
        yield


def call_node(node_id: str, fn, *args, **kwargs):
    """One node's function as ``execution._async_map_node_over_list`` calls it: the interrupt check
    (``nodes.before_node_execution``), then the call inside its ``CurrentNodeContext``."""
    import nodes as core
    from comfy_execution.utils import CurrentNodeContext

    core.before_node_execution()
    with CurrentNodeContext(PROMPT_ID, node_id, 0):
        return fn(*args, **kwargs)


class Graph:
    """Runs the nodes one at a time (inside :func:`executor_scope`), each measured; stops at the first
    failure or out of time."""

    def __init__(self, device: torch.device, deadline: float, log: StageLog, on_row=None):
        self.peaks = Peaks(device)
        self.deadline = deadline
        self.log = log
        self.rows = []
        self.failed = None
        self.on_row = on_row or (lambda rows: None)
        self.loads = LoadCalls()

    def node(self, node_id: str, class_type: str, fn, *args, **kwargs):
        if self.failed is not None:
            return None
        if time.perf_counter() > self.deadline:
            self.failed = f"out of time before node {node_id} {class_type}"
            self.rows.append({"node": node_id, "class_type": class_type, "ok": False, "error": "skipped: out of time"})
            return None
        first_line, first_load = len(self.log.lines), len(self.loads.calls)
        self.peaks.start()
        t0 = time.perf_counter()
        try:
            out = call_node(node_id, fn, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - an out-of-memory error is a result; the rest is skipped
            import traceback

            traceback.print_exc()
            self.failed = f"{class_type}: {type(e).__name__}: " + " ".join(str(e).split())[:300]
            out = None
        row = {"node": node_id, "class_type": class_type, "ok": self.failed is None,
               "seconds": round(time.perf_counter() - t0, 3), **self.peaks.stop()}
        if self.failed is not None:
            row["error"] = self.failed
        row["loaded_after"] = loaded_models()
        row["know3d_log"] = self.log.lines[first_line:]
        row["loads"] = self.loads.calls[first_load:]
        self.rows.append(row)
        self.on_row(self.rows)
        print(f"node {node_id:>3} {class_type:38} {row['seconds']:8.2f} s  peak {row.get('peak_allocated_gib', '-')} GiB"
              f"  loaded {[(m['model'], m['loaded_gib']) for m in row['loaded_after']]}", flush=True)
        return None if out is None else outputs(out)


def build_models(args, device: torch.device, gen_device: torch.device, result: dict):
    """Core's Qwen models from random state dicts (the loaders' own paths) and our TRELLIS.2 model."""
    import comfy.sd
    import comfy.utils

    from bench_small_cards import build_geometry
    from know3d_core.mmdit import CaptureSpec

    nodes_trellis = sys.modules[f"{PACK}.nodes.trellis"]
    t = {}
    t0 = time.perf_counter()
    with tiny_comfy_configs(args.tiny):
        sd = qwen_mmdit_state_dict(args.tiny, gen_device)
        t["mmdit_random_s"] = round(time.perf_counter() - t0, 2)
        t1 = time.perf_counter()
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={})
        del sd
        t["mmdit_load_s"] = round(time.perf_counter() - t1, 2)
        t1 = time.perf_counter()
        sd = qwen_te_state_dict(args.tiny, gen_device)
        sd, _ = comfy.utils.convert_old_quants(sd, model_prefix="", metadata={})
        clip = comfy.sd.load_text_encoder_state_dicts([sd], clip_type=comfy.sd.CLIPType.QWEN_IMAGE, model_options={})
        del sd
        t["text_encoder_s"] = round(time.perf_counter() - t1, 2)
        vae = comfy.sd.VAE(sd=qwen_vae_state_dict(args.tiny, gen_device))
    t1 = time.perf_counter()
    num_layers = TINY_QWEN_LAYERS if args.tiny else FULL_QWEN_LAYERS
    spec = CaptureSpec()
    layers = list(spec.resolve_layers(num_layers))
    width = model.model.diffusion_model.inner_dim
    geometry = build_geometry(args.tiny, gen_device, True, layers, spec.sigma, width * len(layers))
    for net in list(geometry.models.values()) + [geometry.image_cond_model.model]:
        net.to("cpu")
    fix_structure(geometry, SIZES[args.tiny]["n_cascade"])
    know3d_model = nodes_trellis._wrap_pipeline(geometry, {"know3d": "random_know3d.safetensors",
                                                           "dinov3": "random dinov3"})
    t["trellis2_s"] = round(time.perf_counter() - t1, 2)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["build"] = {**t, "capture_layers": layers, "sigma": spec.sigma, "mmdit_dtype": str(model.model.get_dtype()),
                       "mmdit_manual_cast": str(model.model.manual_cast_dtype),
                       "mmdit_size_gib": round(model.model_size() / GIB, 3),
                       "text_encoder_size_gib": round(clip.patcher.model_size() / GIB, 3),
                       "trellis2_size_gib": round(sum(m.patcher.model_size() for m in know3d_model.managed.values()
                                                      if m.patcher is not None) / GIB, 3)}
    print(f"built: {result['build']}", flush=True)
    return model, clip, vae, know3d_model


def run_graph(args, g: Graph, model, clip, vae, know3d_model, lora_path: str) -> None:
    """know3d_full.json's nodes in its order (node ids as in the API file); the Load* nodes are the
    models built above; no Save/Preview nodes (CPU only)."""
    import nodes as core
    from comfy_extras.nodes_cfg import CFGNorm
    from comfy_extras.nodes_flux import FluxKontextImageScale, FluxKontextMultiReferenceLatentMethod
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow
    from comfy_extras.nodes_qwen import TextEncodeQwenImageEditPlus

    qn = sys.modules[f"{PACK}.nodes.qwen"]
    tn = sys.modules[f"{PACK}.nodes.trellis"]
    size = SIZES[args.tiny]
    image, mask = front_inputs(size["front"])
    cond_front = g.node("5", "Know3DImageCondition", tn.Know3DImageCondition.execute, know3d_model, image, mask)
    (m7,) = g.node("7", "ModelSamplingAuraFlow", ModelSamplingAuraFlow().patch_aura, model, 3.1) or (None,)
    (m8,) = g.node("8", "CFGNorm", CFGNorm.execute, m7, 1.0, False) or (None,)
    (m9,) = g.node("9", "Know3DLoadQwenEditLoRA", qn.Know3DLoadQwenEditLoRA.execute, m8, lora_path, 1.0) or (None,)
    (prompt,) = g.node("12", "Know3DBackViewPrompt", qn.Know3DBackViewPrompt.execute, PROMPT,
                       qn.DEFAULT_CAMERA_PROMPT, "{camera} {description}") or (None,)
    condition, front = cond_front or (None, None)
    (c13,) = g.node("13", "TextEncodeQwenImageEditPlus", TextEncodeQwenImageEditPlus.execute, clip, prompt, vae, front) or (None,)
    (c14,) = g.node("14", "FluxKontextMultiReferenceLatentMethod", FluxKontextMultiReferenceLatentMethod.execute,
                    c13, "index_timestep_zero") or (None,)
    (c15,) = g.node("15", "TextEncodeQwenImageEditPlus", TextEncodeQwenImageEditPlus.execute, clip, "", vae, front) or (None,)
    (c16,) = g.node("16", "FluxKontextMultiReferenceLatentMethod", FluxKontextMultiReferenceLatentMethod.execute,
                    c15, "index_timestep_zero") or (None,)
    (scaled,) = g.node("17", "FluxKontextImageScale", FluxKontextImageScale.execute, front) or (None,)
    (latent,) = g.node("18", "VAEEncode", core.VAEEncode().encode, vae, scaled) or (None,)
    back, trajectory = g.node("19", "Know3DBackViewSample", qn.Know3DBackViewSample.execute, m9, c14, c16, latent, 0,
                              size["back_steps"], 4.0, "euler", "simple", 0.0) or (None, None)
    g.node("20", "VAEDecode", core.VAEDecode().decode, vae, back)
    (knowledge,) = g.node("22", "Know3DExtractHiddenStates", qn.Know3DExtractHiddenStates.execute, m9, trajectory, 0.0,
                          "auto", know3d_model) or (None,)
    if knowledge is not None:
        g.rows[-1]["knowledge_shape"] = list(knowledge.tensor.shape)
    steps = size["trellis_steps"]
    structure, _voxel = g.node("23", "Know3DSparseStructure", tn.Know3DSparseStructure.execute, know3d_model, condition,
                               0, steps, 7.5, 0.6, 1.0, 0.7, 5.0, knowledge) or (None, None)
    mesh, _latent = g.node("24", "Know3DGeometry", tn.Know3DGeometry.execute, know3d_model, structure, condition,
                           "1024_cascade", 0, steps, 7.5, 0.6, 1.0, 0.5, 3.0, 49152, knowledge) or (None, None)
    if mesh is not None:
        g.rows[-1]["faces"] = int(mesh.faces.shape[-2])


def apply_cap(card: float, device: torch.device, result: dict) -> None:
    """The allocator capped at the card less this process's CUDA context (bench_small_cards' rule)."""
    from bench_small_cards import apply_cap as cap

    row = {}
    cap(card, device, row)
    result["cap"] = row


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    deadline = time.perf_counter() + args.budget
    result = {"tiny": args.tiny, "card_gib": args.card if device.type == "cuda" else None, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "sizes": SIZES[args.tiny], "lora_rank": args.lora_rank, "prompt": PROMPT}
    result["comfy"] = start_comfy(args.comfyui, args.tiny, args.card)
    load_pack()
    sys.path.insert(0, HERE)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # ComfyUI's load / evict lines
    log = StageLog()
    logging.getLogger("know3d").addHandler(log)
    logging.getLogger("know3d").setLevel(logging.INFO)
    import comfy.model_management as mm

    result["comfy"].update(vram_state=mm.vram_state.name, torch_device=str(mm.get_torch_device()),
                           total_vram_mb=round(mm.total_vram))
    result["executor"] = {"inference_mode": True, "node_context": True, "prompt_id": PROMPT_ID}
    with executor_scope():  # the loaders run inside the prompt too, as ComfyUI runs them
        run_prompt(args, device, deadline, log, result)
    return result


def simulate_vae_oom_once(vae) -> None:
    """The first VAE decode raises torch's out-of-memory error, as the 24 GB card's regular decode did on
    the H100: ComfyUI's ``VAE.decode`` then falls back to its tiled decode (``--vae-oom-once``, CPU check)."""
    inner = vae.first_stage_model
    real = inner.decode

    def decode(*args, **kwargs):
        inner.decode = real
        raise torch.OutOfMemoryError("simulated: CUDA out of memory (bench_comfy_small_cards --vae-oom-once)")

    inner.decode = decode


def run_prompt(args, device: torch.device, deadline: float, log: StageLog, result: dict) -> None:
    """Build the models (the Load* nodes' work), cap the card, run the graph; ``result`` filled in place."""
    t0 = time.perf_counter()
    result.update(ok=False, error="stopped while building the models", rows=[])
    write_result(args.out, result)
    model, clip, vae, know3d_model = build_models(args, device, device, result)
    result["build_s"] = round(time.perf_counter() - t0, 2)
    if args.vae_oom_once:
        simulate_vae_oom_once(vae)
        result["vae_oom_simulated"] = True
    if device.type == "cuda" and args.card:
        apply_cap(args.card, device, result)
    result["error"] = "stopped during the graph (the last row is the last node that finished)"
    write_result(args.out, result)

    def on_row(rows):
        result["rows"] = rows
        write_result(args.out, result)

    g = Graph(device, deadline, log, on_row)
    with tempfile.TemporaryDirectory() as tmp:
        lora = write_backview_lora(os.path.join(tmp, "know3d_backview_lora.safetensors"), args.tiny, args.lora_rank)
        t0 = time.perf_counter()
        try:
            run_graph(args, g, model, clip, vae, know3d_model, lora)
        finally:
            result["graph_s"] = round(time.perf_counter() - t0, 2)
            result["rows"] = g.rows
            result["ok"] = g.failed is None and len(g.rows) > 0
            result["error"] = g.failed


def write_result(path, result: dict) -> None:
    """The JSON so far (rewritten after every node: a run cut by the wall limit keeps what finished)."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


def print_table(result: dict) -> None:
    print(f"\n{result['device']}, card {result.get('card_gib')} GiB, ComfyUI {result['comfy'].get('comfyui_version')} "
          f"(reserve-vram {result['comfy'].get('reserve_vram_gb')}, allocator cap {result.get('cap', {}).get('allocator_cap_gib')})")
    print("node | class | ok | s | peak alloc / reserved GiB | loaded after (GiB on card / size)")
    for r in result.get("rows", []):
        loaded = ", ".join(f"{m['model']} {m['loaded_gib']}/{m['size_gib']}" for m in r.get("loaded_after", []))
        print(f"{r['node']:>3} | {r['class_type']:38} | {'y' if r['ok'] else 'n'} | {r.get('seconds', '-')} | "
              f"{r.get('peak_allocated_gib', '-')} / {r.get('peak_reserved_gib', '-')} | {loaded}")
        for line in r.get("know3d_log", []):
            print(f"      {line}")
        for call in (c for c in r.get("loads", []) if c["memory_required"]):
            print(f"      loads {', '.join(call['models'])} keeping {call['memory_required'] / GIB:.4g} GiB free beside them")
    print(f"ok {result.get('ok')} error {result.get('error')} graph {result.get('graph_s')} s build {result.get('build_s')} s")


# ----------------------------------------------------------------------------------- the minimum to carry
# Third-party packages ComfyUI's import of model_management / sd / samplers / nodes_qwen needs beyond the
# device image (KINDS.md): pure Python, copied from a ComfyUI venv. comfy-kitchen without its compiled
# CUDA / HIP kernels (176 + 59 MB; its cuda backend then reports itself unavailable and the eager one runs);
# comfy-aimdo without its allocator library (only DynamicVRAM loads it, and that stays off).
MIN_SITE_PACKAGES = ("comfy_kitchen", "comfy_aimdo", "einops", "torchsde", "trampoline")
MIN_SKIP_SUFFIXES = (".so", ".pyd", ".cuh", ".h", ".pyc")
# ComfyUI: its Python packages whole (5 MB of .py), the few top-level modules and comfy_extras modules the
# graph imports, and the one tokenizer the Qwen text encoder reads.
MIN_COMFY_PACKAGES = ("comfy", "comfy_api", "comfy_execution", "comfy_config")
MIN_COMFY_FILES = ("comfyui_version.py", "folder_paths.py", "node_helpers.py", "latent_preview.py", "nodes.py",
                   "protocol.py", "comfy_extras/nodes_qwen.py", "comfy_extras/nodes_flux.py",
                   "comfy_extras/nodes_cfg.py", "comfy_extras/nodes_model_advanced.py")
MIN_COMFY_DATA = ("comfy/text_encoders/qwen25_tokenizer",)


def _copy_tree(src: str, dst: str, keep) -> None:
    for base, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            path = os.path.join(base, f)
            if keep(path):
                out = os.path.join(dst, os.path.relpath(path, src))
                os.makedirs(os.path.dirname(out), exist_ok=True)
                shutil.copy2(path, out)


def make_min(comfy_dir: str, site: str, out: str) -> dict:
    """``out``/ComfyUI (ComfyUI's Python source the graph needs + the Qwen tokenizer) and ``out``/site
    (the pure-Python packages above), to travel to the GPU machine; returns the sizes."""
    if os.path.exists(out):
        shutil.rmtree(out)
    comfy_out = os.path.join(out, "ComfyUI")
    for pkg in MIN_COMFY_PACKAGES:
        src = os.path.join(comfy_dir, pkg)
        if os.path.isdir(src):
            _copy_tree(src, os.path.join(comfy_out, pkg), lambda p: p.endswith(".py"))
    for rel in MIN_COMFY_FILES + MIN_COMFY_DATA:
        src = os.path.join(comfy_dir, rel)
        if os.path.isdir(src):
            _copy_tree(src, os.path.join(comfy_out, rel), lambda p: True)
        else:
            os.makedirs(os.path.dirname(os.path.join(comfy_out, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(comfy_out, rel))
    for pkg in MIN_SITE_PACKAGES:
        _copy_tree(os.path.join(site, pkg), os.path.join(out, "site", pkg), lambda p: not p.endswith(MIN_SKIP_SUFFIXES))
    sizes = {}
    for part in ("ComfyUI", "site"):
        total = 0
        for base, _dirs, files in os.walk(os.path.join(out, part)):
            total += sum(os.path.getsize(os.path.join(base, f)) for f in files)
        sizes[part] = total
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR", ""), help="a ComfyUI 0.33.0 checkout (or --make-min's copy)")
    p.add_argument("--tiny", action="store_true", help="tiny networks on the CPU (checks the script against a real ComfyUI)")
    p.add_argument("--card", type=float, default=24.0, help="card size in GiB (0: uncapped)")
    p.add_argument("--budget", type=float, default=220.0,
                   help="seconds for the whole run, building included: nodes not started by then are skipped")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--vae-oom-once", action="store_true",
                   help="the first VAE decode raises out-of-memory (ComfyUI then decodes tiled), as on the 24 GB card")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--make-min", metavar="DIR", help="write the minimum ComfyUI copy to carry into DIR and exit")
    p.add_argument("--site", help="with --make-min: the site-packages of a ComfyUI venv")
    args = p.parse_args(argv)
    if not args.comfyui or not os.path.isfile(os.path.join(args.comfyui, "comfy", "model_management.py")):
        p.error(f"--comfyui {args.comfyui!r} is not a ComfyUI folder (comfy/model_management.py missing); set it or COMFYUI_DIR")
    if args.make_min:
        if not args.site or not os.path.isdir(os.path.join(args.site, "comfy_kitchen")):
            p.error("--make-min needs --site: the site-packages folder of a ComfyUI venv (with comfy_kitchen)")
        sizes = make_min(args.comfyui, args.site, args.make_min)
        print(json.dumps({k: f"{v / 2**20:.1f} MiB" for k, v in sizes.items()}))
        return 0
    result = run(args)
    write_result(args.out, result)
    print_table(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
