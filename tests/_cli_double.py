"""TEST DOUBLE for the generation step of ``know3d`` (not a pipeline): returns a fixed cube mesh.

Used where a test is about the command around the pipeline (arguments, model check, batch planning,
resume, sharding, atomic outputs) and must not depend on model weights. Run as a script it is the
``know3d`` command with this double plugged in (``KNOW3D_TEST_DELAY`` seconds of sleep per item).
"""
import os
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from know3d_core.mesh import Mesh  # noqa: E402

CUBE_VERTICES = [[x, y, z] for x in (-0.3, 0.3) for y in (-0.3, 0.3) for z in (-0.3, 0.3)]
CUBE_FACES = [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
              [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]]


class DoublePipeline:
    """Stands in for ``Know3DPipeline.run``: checks its inputs, reports progress, returns a cube."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls = []

    def run(self, image, description, variant="hidden", *, mask=None, sigma=None, layers=None, seed=0,
            steps=40, pipeline_type=None, decode_back=False, callback=None, cancel=None, **kwargs):
        self.calls.append(dict(description=description, variant=variant, seed=seed, steps=steps,
                               pipeline_type=pipeline_type, mask=mask, image_size=image.size, **kwargs))
        if "FAIL" in description:
            raise RuntimeError("the double was asked to fail\nfor this prompt")
        for i in range(3):
            if callback is not None:
                callback("sparse_structure", i + 1, 3)
        time.sleep(self.delay)
        from PIL import Image

        back = Image.new("RGB", (32, 32), (0, 128, 255)) if decode_back or variant in ("image", "multiview") else None
        mesh = Mesh(torch.tensor(CUBE_VERTICES) * (1 + 0.1 * (seed % 3)), torch.tensor(CUBE_FACES))
        return SimpleNamespace(mesh=mesh, back_image=back, knowledge=None, variant=variant,
                               timings={"sparse_structure": 0.01, "shape_slat_512": 0.02},
                               peak_vram={"sparse_structure": 3 * 2**30})


def factory(delay: float = 0.0):
    pipe = DoublePipeline(delay)

    def make(opts, check):
        make.opts, make.check = opts, check
        return pipe
    make.pipe = pipe
    return make


if __name__ == "__main__":
    from know3d_core.cli import main

    sys.exit(main(sys.argv[1:], pipeline_factory=factory(float(os.environ.get("KNOW3D_TEST_DELAY", "0")))))
