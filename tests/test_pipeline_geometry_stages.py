"""The geometry stages as a host runs them one call at a time (the ComfyUI nodes): the structure in
one call, the shape in another, with one seed, give the numbers of ``run(seed=...)``;
``sample_geometry`` hands each shape stage the condition of its own size."""
import pytest
import torch
from PIL import Image

from know3d_core.plan import cond_resolutions, ss_resolution

from _pipeline_helpers import FAST, cpu_geometry, one_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return cpu_geometry(tmp_path_factory)


@pytest.mark.parametrize("ptype", ["512", "1024_cascade"])
def test_structure_and_shape_in_separate_calls_equal_one_run(plain, ptype):
    pipe, demo = plain
    image = Image.open(demo.image)
    ref = pipe.run(image, pipeline_type=ptype, seed=5, ss_params=FAST, shape_params=FAST)
    img = pipe.preprocess(image)
    conds = {size: pipe.get_cond(img, size) for size in cond_resolutions(ptype)}
    # The structure call: its own generator, the decoder's finest grid (a host does not know the type yet).
    fine = pipe.sample_sparse_structure(conds[512], resolution=pipe.structure_decoder_grid,
                                        generator=torch.Generator().manual_seed(5), params=FAST)
    assert pipe.structure_decoder_grid >= ss_resolution(ptype)
    factor = pipe.structure_decoder_grid // ss_resolution(ptype)
    coarse = torch.unique(torch.cat([fine[:, :1], fine[:, 1:] // factor], 1), dim=0).to(torch.int32)
    assert torch.equal(coarse, ref.coords)
    slat, res = pipe.sample_geometry(coarse, conds, None, ptype, generator=pipe.shape_generator(5), params=FAST)
    assert res == ref.resolution
    assert torch.equal(slat.feats.cpu(), ref.slat.feats) and torch.equal(slat.coords.cpu(), ref.slat.coords)


def test_sample_geometry_names_a_missing_condition_size(plain):
    pipe, demo = plain
    img = pipe.preprocess(Image.open(demo.image))
    coords = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"1024_cascade needs DINOv3 conditions at \[1024\] px"):
        pipe.sample_geometry(coords, {512: pipe.get_cond(img, 512)}, None, "1024_cascade")
