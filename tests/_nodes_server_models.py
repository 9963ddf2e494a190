"""Tiny checkpoints and inputs for the ComfyUI integration test, written where users put the real
ones, under the names the example workflows use (random weights, real file formats; see
know3d_core.demo_models). The tiny Qwen-Image model itself is built by the test-only pack
tests/data/comfyui/know3d_test_nodes (3 blocks, width 2 x 16 = the demo's).

The demo TRELLIS.2 folder's networks are also written as Comfy-Org's TRELLIS.2 files (diffusion file,
shape VAE, texture VAE, DINOv3 in models/clip_vision; the layout ComfyUI 0.33.0 reads, see
know3d_core.trellis2.comfy_files), each with its networks' constructor args in the metadata
(``know3d_test_args``), for the test pack's stand-ins of core's TRELLIS.2 loaders."""
import json
import os


def write_all(base):
    from know3d_core import demo_models as demo

    models = os.path.join(base, "models")
    for sub in ("trellis2", "loras", "know3d"):
        os.makedirs(os.path.join(models, sub), exist_ok=True)
    trellis = demo.write_demo_trellis2(os.path.join(models, "trellis2", "TRELLIS.2-4B"))
    dino = demo.write_demo_dinov3(os.path.join(models, "trellis2", "dinov3-vitl16-pretrain-lvd1689m"))
    demo.write_demo_know3d(os.path.join(models, "know3d", "know3d.safetensors"), trellis)
    demo.write_demo_backview_lora(os.path.join(models, "loras", "know3d_backview_lora.safetensors"))
    demo.write_demo_image(os.path.join(base, "input", "know3d_example_front.png"), size=128)
    write_comfy_trellis2(models, trellis, dino)


def write_comfy_trellis2(models, trellis_folder, dino_folder):
    """Comfy-Org's TRELLIS.2 files (names from know3d_core.plan) holding the demo folder's networks."""
    from safetensors.torch import load_file, save_file

    from know3d_core import plan
    from know3d_core.trellis2.loading import read_pipeline_config, resolve_checkpoint

    config = read_pipeline_config(trellis_folder)

    def network(key):
        stem = resolve_checkpoint(trellis_folder, config.models[key])
        with open(stem + ".json", encoding="utf-8") as f:
            return load_file(stem + ".safetensors"), json.load(f)["args"]

    def save(role, prefixes):
        name, sub, _ = {**plan.COMFY_FILES, **plan.COMFY_TEXTURE_FILES}[role]
        tensors, args = {}, {}
        for prefix, key in prefixes.items():
            sd, args[prefix] = network(key)
            tensors.update({prefix + k: v.contiguous() for k, v in sd.items()})
        os.makedirs(os.path.join(models, sub), exist_ok=True)
        save_file(tensors, os.path.join(models, sub, name), metadata={"know3d_test_args": json.dumps(args)})

    save("flows", plan.COMFY_FLOW_PREFIXES)
    save("vae", {p: key for p, key in plan.COMFY_VAE_PREFIXES.items()})
    save("texture_vae", {plan.COMFY_TEXTURE_VAE_PREFIX: plan.TEX_DECODER})
    name, sub, _ = plan.COMFY_FILES["dinov3"]
    with open(os.path.join(dino_folder, "config.json"), encoding="utf-8") as f:
        dino_args = {k: v for k, v in json.load(f).items() if k not in ("model_type", "architectures", "torch_dtype")}
    os.makedirs(os.path.join(models, sub), exist_ok=True)
    save_file(load_file(os.path.join(dino_folder, "model.safetensors")), os.path.join(models, sub, name),
              metadata={"know3d_test_args": json.dumps(dino_args)})
