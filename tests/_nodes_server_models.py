"""Tiny checkpoints and inputs for the ComfyUI integration test, written where users put the real
ones, under the names the example workflows use (random weights, real file formats; see
know3d_core.demo_models). The tiny Qwen-Image model itself is built by the test-only pack
tests/data/comfyui/know3d_test_nodes (3 blocks, width 2 x 16 = the demo's)."""
import os


def write_all(base):
    from know3d_core import demo_models as demo

    models = os.path.join(base, "models")
    for sub in ("trellis2", "loras", "know3d"):
        os.makedirs(os.path.join(models, sub), exist_ok=True)
    trellis = demo.write_demo_trellis2(os.path.join(models, "trellis2", "TRELLIS.2-4B"))
    demo.write_demo_dinov3(os.path.join(models, "trellis2", "dinov3-vitl16-pretrain-lvd1689m"))
    demo.write_demo_know3d(os.path.join(models, "know3d", "know3d.safetensors"), trellis)
    demo.write_demo_backview_lora(os.path.join(models, "loras", "know3d_backview_lora.safetensors"))
    demo.write_demo_image(os.path.join(base, "input", "know3d_example_front.png"), size=128)
