"""In-process checks of the Qwen-side nodes on real ComfyUI classes (run by
tests/test_nodes_comfy_host.py with COMFYUI_PYTHON; not collected by pytest).

Usage: python host_checks.py COMFYUI_DIR PACK_ROOT WORK_DIR OUT_JSON
Prints nothing useful; writes {check: {"ok": bool, "detail": str}} to OUT_JSON.
"""
import importlib.util
import json
import math
import os
import sys
import traceback

COMFYUI_DIR, PACK_ROOT, WORK, OUT = sys.argv[1:5]
sys.path.insert(0, COMFYUI_DIR)
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import torch  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import nodes as comfy_nodes  # noqa: E402


def load(name, path, package_dir=None):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[package_dir] if package_dir else None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


pack = load("know3d_pack_host_checks", os.path.join(PACK_ROOT, "__init__.py"), PACK_ROOT)
tiny = load("know3d_test_nodes_host", os.path.join(PACK_ROOT, "tests", "data", "comfyui", "know3d_test_nodes", "__init__.py"))
qwen_nodes = sys.modules["know3d_pack_host_checks.nodes.qwen"]
host = sys.modules["know3d_pack_host_checks.nodes._host"]
demo = importlib.import_module("know3d_pack_host_checks.know3d_core.demo_models")
from safetensors.torch import save_file  # noqa: E402

results = {}


def check(name):
    def deco(fn):
        try:
            detail = fn()
            results[name] = {"ok": True, "detail": str(detail or "")}
        except Exception:
            results[name] = {"ok": False, "detail": traceback.format_exc()[-3000:]}
        return fn
    return deco


# ------------------------------------------------------------------------------ fixtures
model, vae = tiny.Know3DTestTinyQwen().build(0)
g = torch.Generator().manual_seed(1)
front = torch.rand(1, 64, 64, 3, generator=g)
(positive,) = tiny.Know3DTestTinyQwenEncode().encode(vae, front, "rotate to the back: three slats")
(negative,) = tiny.Know3DTestTinyQwenEncode().encode(vae, front, "")
latent = {"samples": vae.encode(front)}
# Loras folder for the node's file lookup: point folder_paths at WORK/loras.
import folder_paths  # noqa: E402

loras = os.path.join(WORK, "loras")
os.makedirs(loras, exist_ok=True)
folder_paths.add_model_folder_path("loras", loras)
lora_path = demo.write_demo_backview_lora(os.path.join(loras, "backview.safetensors"), seed=3, rank=2)
STEPS = 4


def weight_of(patcher, key):
    mm.load_models_gpu([patcher], force_full_load=True)
    w = patcher.model.state_dict()[key].detach().clone()
    mm.unload_all_models()
    return w


@check("lora_adds_strength_scaled_delta_on_a_clone")
def _():
    from safetensors.torch import load_file

    key = "diffusion_model.transformer_blocks.1.attn.to_q.weight"
    before = weight_of(model, key)
    (patched,) = qwen_nodes.Know3DLoadQwenEditLoRA.execute(model, "backview.safetensors", 0.7)
    after = weight_of(patched, key)
    sd = load_file(lora_path)
    a = sd["diffusion_model.transformer_blocks.1.attn.to_q.lora_A.weight"].double()
    b = sd["diffusion_model.transformer_blocks.1.attn.to_q.lora_B.weight"].double()
    alpha = float(sd["diffusion_model.transformer_blocks.1.attn.to_q.alpha"])
    expected = before.double() + 0.7 * (alpha / a.shape[0]) * (b @ a)
    err = float((after.double() - expected).abs().max())
    assert err < 1e-5, err
    assert torch.equal(weight_of(model, key), before), "the input MODEL changed"
    return f"max err {err:.2e}"


@check("lora_for_another_architecture_is_a_clear_error")
def _():
    flux = os.path.join(loras, "flux_style.safetensors")
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(8, 2)}, flux)
    try:
        qwen_nodes.Know3DLoadQwenEditLoRA.execute(model, "flux_style.safetensors", 1.0)
    except ValueError as e:
        msg = str(e)
        assert "flux_style.safetensors" in msg and "Flux" in msg, msg
        return msg
    raise AssertionError("no error")


@check("missing_lora_file_names_file_folder_and_source")
def _():
    try:
        qwen_nodes.Know3DLoadQwenEditLoRA.execute(model, "absent.safetensors", 1.0)
    except FileNotFoundError as e:
        msg = str(e)
        assert "absent.safetensors" in msg and loras in msg and "Know3D release" in msg, msg
        return msg
    raise AssertionError("no error")


def sample(stop=0.0, seed=5):
    return qwen_nodes.Know3DBackViewSample.execute(model, positive, negative, latent, seed, STEPS, 2.5, "euler",
                                                    "simple", stop)


@check("back_view_sample_equals_core_ksampler_and_records_every_step")
def _():
    out, traj = sample()
    (core,) = comfy_nodes.common_ksampler(model, 5, STEPS, 2.5, "euler", "simple", positive, negative, latent)
    err = float((out["samples"] - core["samples"].float()).abs().max())
    assert err < 1e-5, f"differs from core KSampler: {err}"
    assert [s.index for s in traj.steps] == list(range(STEPS)) and not traj.stopped_early
    assert traj.steps[0].sigma == float(traj.sigmas[0]) == 1.0
    return f"max diff vs KSampler {err:.1e}; sigmas {[round(float(s), 3) for s in traj.sigmas]}"


@check("early_exit_records_the_same_latent_as_the_full_run")
def _():
    _, full = sample()
    k = 2
    stop_sigma = full.steps[k].sigma
    early_out, early = sample(stop=stop_sigma)
    assert early.stopped_early and early.steps[-1].index == k and len(early.steps) == k + 1
    err = float((early.steps[-1].latent - full.steps[k].latent).abs().max())
    assert err < 1e-4, err
    for a, b in zip(early.steps[:k], full.steps[:k]):
        assert torch.equal(a.latent, b.latent)
    return f"latent at step {k} (sigma {stop_sigma:.3f}) max diff {err:.1e}"


def hooked_block_outputs(layers, fn):
    """Image-stream outputs of blocks ``layers`` (forward hooks, removed afterwards) while fn runs."""
    blocks = model.model.diffusion_model.transformer_blocks
    seen, handles = {}, []

    def hook_for(i):
        def hook(mod, args, out):  # returns None: the block output is left as it is
            seen.setdefault(i, out[1].detach().clone())
        return hook

    for i in layers:
        handles.append(blocks[i].register_forward_hook(hook_for(i)))
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return seen


@check("hidden_states_are_the_cond_target_tokens_of_the_chosen_blocks")
def _():
    _, traj = sample()
    (knowledge,) = qwen_nodes.Know3DExtractHiddenStates.execute(model, traj, 0.3, "1, 2")
    step = traj.nearest(0.3)
    hooked = hooked_block_outputs((1, 2), lambda: qwen_nodes.run_one_forward(
        model, traj.positive, step.latent, step.sigma, lambda args: args))
    n = knowledge.tensor.shape[1]
    h, w = step.latent.shape[-2:]
    assert n == math.ceil(h / 2) * math.ceil(w / 2), (n, h, w)
    want = torch.cat([hooked[1][:, :n], hooked[2][:, :n]], dim=-1).float()
    err = float((knowledge.tensor.float() - want).abs().max())
    assert err == 0.0, err
    assert hooked[1].shape[1] > n, "reference tokens were expected after the target tokens"
    prov = knowledge.provenance
    assert prov["layers"] == [1, 2] and prov["sigma"] == 0.3 and prov["sigma_actual"] == step.sigma
    assert prov["step_index"] == step.index
    (again,) = qwen_nodes.Know3DExtractHiddenStates.execute(model, traj, 0.3, "1, 2")
    assert torch.equal(again.tensor, knowledge.tensor)
    return f"tokens {n} of {hooked[1].shape[1]}, step {step.index} sigma {step.sigma:.3f}"


@check("cond_rows_under_batched_cfg_equal_the_cond_only_capture")
def _():
    from know3d_pack_host_checks.know3d_core.mmdit.capture import CaptureSpec
    from know3d_pack_host_checks.know3d_core.mmdit.comfy_patch import ComfyQwenCapture

    _, traj = sample()
    step = traj.nearest(0.5)
    solo = ComfyQwenCapture(CaptureSpec(layers=(0, 2), sigma=step.sigma))
    qwen_nodes.run_one_forward(model, traj.positive, step.latent, step.sigma, solo)
    batched = ComfyQwenCapture(CaptureSpec(layers=(0, 2), sigma=step.sigma))
    m = model.clone()
    m.set_model_double_block_patch(batched)
    guider = comfy.samplers.CFGGuider(m)
    guider.set_conds(traj.positive, traj.negative)
    guider.set_cfg(3.0)

    def one_call(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        model_k(step.latent.to(x), sigmas[0] * x.new_ones([x.shape[0]]), **extra_args)
        return x

    zeros = torch.zeros_like(step.latent)
    guider.sample(zeros, zeros, comfy.samplers.KSAMPLER(one_call), torch.tensor([step.sigma, 0.0]),
                  disable_pbar=True, seed=0)
    a, b = solo.knowledge().hidden, batched.knowledge().hidden
    assert a.shape == b.shape and a.shape[0] == 1, (a.shape, b.shape)
    err = float((a - b).abs().max())
    assert err < 1e-4, err
    return f"max diff {err:.1e}"


class Hook:
    """Stands in for ComfyUI's progress hook (main.py's hijack_progress): counts updates and, like
    the real one, raises the interrupt when the user pressed cancel; cancels at update ``cancel_at``."""

    def __init__(self, cancel_at=None):
        self.values, self.cancel_at = [], cancel_at

    def __call__(self, value, total, preview, node_id=None):
        self.values.append((value, total))
        if self.cancel_at is not None and len(self.values) == self.cancel_at:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()


def with_hook(hook, fn):
    import comfy.utils

    old = comfy.utils.PROGRESS_BAR_HOOK
    throttle = comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL, comfy.utils.PROGRESS_THROTTLE_MIN_PERCENT
    comfy.utils.set_progress_bar_global_hook(hook)
    # Unthrottled, so every step's update reaches the hook (the UI gets them >= 100 ms apart).
    comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL, comfy.utils.PROGRESS_THROTTLE_MIN_PERCENT = 0.0, 0.0
    try:
        return fn()
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL, comfy.utils.PROGRESS_THROTTLE_MIN_PERCENT = throttle
        mm.interrupt_current_processing(False)


@check("back_view_sample_progress_per_step_and_cancel")
def _():
    hook = Hook()
    with_hook(hook, lambda: sample())
    assert hook.values == [(i + 1, STEPS) for i in range(STEPS)], hook.values
    cancel = Hook(cancel_at=1)
    try:
        with_hook(cancel, lambda: sample())
    except mm.InterruptProcessingException:
        assert len(cancel.values) == 1
        return f"updates {hook.values}; cancelled after step 1"
    raise AssertionError("not cancelled")


@check("trellis_stages_progress_per_step_and_cancel")
def _():
    tr = sys.modules["know3d_pack_host_checks.nodes.trellis"]
    root = os.path.join(WORK, "demo")
    trellis = demo.write_demo_trellis2(os.path.join(root, "TRELLIS.2-4B"))
    demo.write_demo_dinov3(os.path.join(root, "dinov3-vitl16-pretrain-lvd1689m"))
    image = demo.write_demo_image(os.path.join(root, "front.png"), size=96)
    import numpy as np
    from PIL import Image

    (k3d,) = tr.Know3DLoadModel.execute(trellis + "/", tr.FROM_FOLDER, tr.FROM_FOLDER, tr.NONE, "float32")
    assert all(m.patcher is not None for m in k3d.managed.values()), "not under model management"
    rgba = torch.from_numpy(np.asarray(Image.open(image)).astype(np.float32) / 255)[None]
    cond, _ = tr.Know3DImageCondition.execute(k3d, rgba)
    ss = dict(steps=3, cfg=7.5, guidance_interval_start=0.6, guidance_interval_end=1.0, guidance_rescale=0.7,
              rescale_t=5.0)
    hook = Hook()
    structure, _ = with_hook(hook, lambda: tr.Know3DSparseStructure.execute(k3d, cond, 0, **ss))
    assert hook.values == [(1, 3), (2, 3), (3, 3)], hook.values
    shape = dict(ss, guidance_rescale=0.5, rescale_t=3.0, max_num_tokens=49152)
    hook2 = Hook()
    with_hook(hook2, lambda: tr.Know3DGeometry.execute(k3d, structure, cond, "1024_cascade", 0, **shape))
    assert hook2.values == [(i + 1, 6) for i in range(6)], hook2.values
    cancel = Hook(cancel_at=1)
    try:
        with_hook(cancel, lambda: tr.Know3DSparseStructure.execute(k3d, cond, 1, **ss))
    except mm.InterruptProcessingException:
        assert len(cancel.values) == 1
        loaded = [type(m.model).__name__ for m in mm.current_loaded_models]
        return f"ss updates {hook.values}, cascade {len(hook2.values)}; cancelled after 1; loaded {loaded}"
    raise AssertionError("not cancelled")


with open(OUT, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
