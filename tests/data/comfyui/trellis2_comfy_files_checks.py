"""ComfyUI's own TRELLIS.2 classes on the Comfy-format test files (run by
tests/test_trellis2_comfy_files.py with COMFYUI_PYTHON; not collected by pytest).

Usage: python trellis2_comfy_files_checks.py COMFYUI_DIR SPEC_JSON OUT_STEM
SPEC_JSON names the files and the tiny constructor args; this writes OUT_STEM.json
({check: {"ok": bool, "detail": str}}) and OUT_STEM.safetensors (the outputs ComfyUI computed).
Nothing here is ComfyUI code: it only builds ComfyUI's classes and calls them.
"""
import json
import sys
import traceback

COMFYUI_DIR, SPEC, OUT = sys.argv[1:4]
sys.path.insert(0, COMFYUI_DIR)
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import torch  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.latent_formats  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.ldm.trellis2.model as cmodel  # noqa: E402
import comfy.ldm.trellis2.vae as cvae  # noqa: E402
import comfy.image_encoders.dino3 as cdino  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

with open(SPEC) as f:
    spec = json.load(f)
results, tensors = {}, {}


def check(name):
    def deco(fn):
        try:
            results[name] = {"ok": True, "detail": str(fn() or "")}
        except Exception:
            results[name] = {"ok": False, "detail": traceback.format_exc()[-3000:]}
        return fn
    return deco


def group(sd, prefix):
    return {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}


def comfy_decoders(vae_file, ss_args, shape_args):
    """ComfyUI's decoder classes built with the given args, strictly loaded from a Comfy VAE file (fp32)."""
    sd = load_file(vae_file)
    ss = cvae.SparseStructureDecoder(
        out_channels=ss_args["out_channels"], latent_channels=ss_args["latent_channels"],
        num_res_blocks=ss_args["num_res_blocks"], channels=ss_args["channels"],
        num_res_blocks_middle=ss_args["num_res_blocks_middle"]).float()
    ss.load_state_dict(group(sd, "struct_dec."), strict=True)
    levels = len(shape_args["num_blocks"])
    shape = cvae.FlexiDualGridVaeDecoder(
        resolution=shape_args["resolution"], model_channels=shape_args["model_channels"],
        latent_channels=shape_args["latent_channels"], num_blocks=shape_args["num_blocks"],
        block_type=shape_args["block_type"], up_block_type=shape_args["up_block_type"],
        block_args=[{}] * levels).float()  # ComfyUI passes block_args to the C2S blocks too: ratio 4 only
    shape.load_state_dict(group(sd, "shape_dec."), strict=True)
    return ss.eval(), shape.eval()


def run_decoders(tag, ss, shape, latent, feats, coords):
    with torch.no_grad():
        tensors[f"{tag}_ss_logits"] = ss(latent.float()).contiguous()
        x = cvae.SparseTensor(feats=feats.float(), coords=coords.int())
        head, subs = cvae.SparseUnetVaeDecoder.forward(shape, x, return_subs=True)
    tensors[f"{tag}_head_feats"] = head.feats.contiguous()
    tensors[f"{tag}_head_coords"] = head.coords.int().contiguous()
    for i, sub in enumerate(subs):
        tensors[f"{tag}_sub_feats_{i}"] = sub.feats.contiguous()
        tensors[f"{tag}_sub_coords_{i}"] = sub.coords.int().contiguous()


inputs = load_file(spec["inputs"])


@check("tiny_vae_file_loads_strictly_into_comfy_decoders")
def _tiny():
    ss, shape = comfy_decoders(spec["vae_file"], spec["ss_args"], spec["shape_args"])
    run_decoders("tiny", ss, shape, inputs["latent"], inputs["slat_feats"], inputs["slat_coords"])
    return f"{sum(p.numel() for p in ss.parameters())} + {sum(p.numel() for p in shape.parameters())} params"


@check("golden_vae_file_loads_strictly_into_comfy_decoders")
def _golden():
    ss, shape = comfy_decoders(spec["golden_vae_file"], spec["golden_ss_args"], spec["golden_shape_args"])
    run_decoders("golden", ss, shape, inputs["golden_latent"], inputs["golden_slat_feats"],
                 inputs["golden_slat_coords"])


@check("diffusion_file_keys_fit_comfy_flow_classes")
def _flows():
    sd = load_file(spec["diffusion_file"])
    classes = {"structure_model.": cmodel.SparseStructureFlowModel, "img2shape_512.": cmodel.SLatFlowModel,
               "img2shape.": cmodel.SLatFlowModel}
    done = []
    for prefix, args in spec["flow_args"].items():
        model = classes[prefix](**args, operations=comfy.ops.disable_weight_init)
        model.load_state_dict(group(sd, prefix), strict=True)
        done.append(prefix)
    config = comfy.model_detection.detect_unet_config(sd, "")
    assert config is not None and config.get("image_model") == "trellis2", config
    return f"{done}; detected {config}"


@check("shape_slat_normalization")
def _norm():
    fmt = comfy.latent_formats.Trellis2ShapeSLAT
    tensors["comfy_shape_slat_mean"] = fmt.latents_mean.reshape(-1).float().contiguous()
    tensors["comfy_shape_slat_std"] = fmt.latents_std.reshape(-1).float().contiguous()


@check("dinov3_clip_vision_file")
def _dino():
    config = dict(spec["dino_config"])
    model = cdino.DINOv3ViTModel(config, torch.float32, None, comfy.ops.manual_cast).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
        # The keys ComfyUI's clip_vision loader reads are exactly this module's state dict.
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, spec["dino_file"])
        tensors["dino_features"] = model(inputs["pixels"], skip_norm_elementwise=True)[0].float().contiguous()
    return f"{len(model.state_dict())} keys"


save_file(tensors, OUT + ".safetensors")
with open(OUT + ".json", "w") as f:
    json.dump(results, f, indent=1)
