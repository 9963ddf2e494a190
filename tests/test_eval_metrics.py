"""know3d_core.eval: metrics against values derived analytically (derivations in the docstrings)."""
import math

import pytest
import torch
import trimesh

from know3d_core.eval import geometry as G
from know3d_core.eval.evaluate import EvalSettings, Shape, aggregate, evaluate_pair
from know3d_core.mesh.render import camera_basis

# Small sample counts keep the suite fast; no expected value below depends on them except through
# the covering radius h, which each test measures.
FAST = EvalSettings(samples=40_000, points=2048, image_size=64, mesh_resolution=64)


def _sphere(radius, centre=(0.0, 0.0, 0.0), subdivisions=4):
    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return Shape(torch.tensor(s.vertices, dtype=torch.float32) + torch.tensor(centre), torch.tensor(s.faces))


def _box(extents, centre=(0.0, 0.0, 0.0)):
    b = trimesh.creation.box(extents=extents)
    return torch.tensor(b.vertices, dtype=torch.float32) + torch.tensor(centre), torch.tensor(b.faces)


def _union(*meshes):
    vs, fs, base = [], [], 0
    for v, f in meshes:
        vs.append(v)
        fs.append(f + base)
        base += v.shape[0]
    return Shape(torch.cat(vs), torch.cat(fs))


def _covering_radius(shape: Shape, settings: EvalSettings, seed: int = 123, mean: bool = False) -> float:
    """Largest (``mean``: mean) distance (unit-sphere units of ``shape`` itself) from a dense independent surface sample
    to the FPS subset the metric uses: the slack of a point-set distance against the true surface one."""
    centre, radius = G.unit_sphere_transform(shape.vertices)
    raw = (G.sample_surface(shape.vertices, shape.faces, settings.samples, torch.Generator().manual_seed(settings.seed)) - centre) / radius
    fps = raw[G.farthest_point_sampling(raw, settings.points)]
    probe = (G.sample_surface(shape.vertices, shape.faces, 5000, torch.Generator().manual_seed(seed)) - centre) / radius
    dist = G.nearest_distances(probe, fps)
    return float(dist.mean() if mean else dist.max())


def test_identical_meshes_iou_one_chamfer_zero():
    """Identical meshes draw identical samples (one seed per shape) and identical voxels: IoU 1, CD 0, F 1;
    identical renders: SSIM 1, PSNR infinite."""
    s = _sphere(0.4)
    m = evaluate_pair(s, s, FAST)
    assert m["iou_64"] == m["iou_64_back"] == m["iou_mesh"] == m["iou_mesh_back"] == 1.0
    assert m["chamfer"] == 0.0 and m["chamfer_back"] == 0.0
    assert m["fscore"] == m["fscore_back"] == 1.0
    assert m["ssim_back"] == pytest.approx(1.0, abs=1e-6) and math.isinf(m["psnr_back"])
    assert m["lpips_back"] is None


def test_sphere_against_shifted_sphere_chamfer_and_fscore_from_formula():
    """Two spheres of radius r whose centres are d apart (d <= r), after the ground truth's unit-sphere
    normalisation r = 1 and d = 0.04 / 0.4 = 0.1.

    Distance of a point p of sphere A to sphere B: |s - r| with s = |p - c_B|. For p uniform on A,
    s^2 = r^2 + d^2 - 2 r d u with u = cos(angle) uniform on [-1, 1] (Archimedes), so s^2 is uniform on
    [(r-d)^2, (r+d)^2] and s has density s / (2 r d) on [r-d, r+d]. Hence
      E|s - r| = 1/(2rd) * integral_{-d}^{d} |t| (r + t) dt = 1/(2rd) * r d^2 = d/2,
    the same from B to A by symmetry: the L1 Chamfer distance (sum of both means) is exactly d.
    F-score: P(|s - r| <= tau) = ((r+tau)^2 - (r-tau)^2) / ((r+d)^2 - (r-d)^2) = tau / d (tau <= d), in
    both directions, so precision = recall = F = tau / d = 0.5 at tau = 0.05.

    Sampling slack: the metric measures distances to an FPS subset B_s of B, and for a on A,
    d(a, B) <= d(a, B_s) <= d(a, B) + d(proj_B(a), B_s). The last term averages to about the mean
    distance h_mean of a surface point to B_s (measured), and is at most the covering radius h_max. So
    d <= CD <= d + 2 h_mean and (tau - h_max)/d <= F <= tau/d, up to how far the FPS points' empirical
    distribution departs from area-uniform (allowances 0.005 and 0.02) and the icosphere's sag below the
    true sphere (subdivision 4: < 1e-3 of r).
    """
    settings = EvalSettings(**{**FAST.as_dict(), "points": 8192})
    gt, pred = _sphere(0.4), _sphere(0.4, centre=(0.04, 0.0, 0.0))
    d, tau = 0.1, 0.05
    h_mean = max(_covering_radius(gt, settings, mean=True), _covering_radius(pred, settings, mean=True))
    h_max = max(_covering_radius(gt, settings), _covering_radius(pred, settings))
    assert h_max < tau  # the F-score bound below is only informative when the sampling is dense
    m = evaluate_pair(pred, gt, settings, with_images=False)
    assert d - 0.005 <= m["chamfer"] <= d + 2 * h_mean + 0.005
    assert (tau - h_max) / d - 0.02 <= m["fscore"] <= tau / d + 0.02
    assert m["precision"] == pytest.approx(m["recall"], abs=0.03)


def test_fscore_of_concentric_spheres_is_a_step_at_the_gap():
    """Concentric spheres of radii r and 1.1 r: every point of either is exactly 0.1 (normalised by the
    ground truth's r) from the other surface. With distances to FPS points in [0.1, 0.1 + h]:
    F = 0 for tau < 0.1 and F = 1 for tau >= 0.1 + h; the Chamfer distance is in [0.2, 0.2 + 2h]."""
    gt, pred = _sphere(0.4), _sphere(0.44)
    h = max(_covering_radius(gt, FAST), _covering_radius(pred, FAST))
    below = evaluate_pair(pred, gt, EvalSettings(**{**FAST.as_dict(), "tau": 0.09}), with_images=False)
    above = evaluate_pair(pred, gt, EvalSettings(**{**FAST.as_dict(), "tau": 0.1 + h + 1e-3}), with_images=False)
    assert below["fscore"] == 0.0
    assert above["fscore"] == 1.0
    assert 0.2 - 0.002 <= above["chamfer"] <= 0.2 + 2 * h


def test_back_half_sees_only_the_back():
    """A box 0.6 x 0.4 x 0.6 with a bump 0.4 x 0.3 x 0.4 on its back (y from 0.2 to 0.5: the side the front
    camera at -Y cannot see), and the same box with the mirrored bump on its front.

    Front bump: no voxel with centre y > 0 changes, so the back-half IoUs are exactly 1, and the back-half
    Chamfer distance is sampling noise only (about 2 x 0.4 x the spacing of 2048 points over the back
    half's ~3.8 normalised units of area: ~0.035; bound 0.06).
    Back bump: of the prediction's back-half area (box half 0.84 + bump 0.16 far + 0.16 near + 0.48 sides
    = 1.64 model units), the far face lies 0.3 from the box and the sides 0.15 on average, so the mean
    distance prediction -> ground truth is >= (0.16 * 0.3 + 0.48 * 0.15) / 1.64 = 0.073 model units =
    0.156 after dividing by the box's radius sqrt(0.3^2 + 0.2^2 + 0.3^2) = 0.469; bound 0.12 allows for
    FPS not being exactly area-uniform. Mirror images have the same full-shape metrics up to sampling."""
    box = _box((0.6, 0.4, 0.6))
    gt = _union(box)
    back = _union(box, _box((0.4, 0.3, 0.4), centre=(0.0, 0.35, 0.0)))
    front = _union(box, _box((0.4, 0.3, 0.4), centre=(0.0, -0.35, 0.0)))
    mb, mf = evaluate_pair(back, gt, FAST, with_images=False), evaluate_pair(front, gt, FAST, with_images=False)
    assert mf["iou_64_back"] == 1.0 and mf["iou_mesh_back"] == 1.0
    assert mb["iou_64_back"] < 0.9 and mb["iou_mesh_back"] < 0.9
    assert mf["chamfer_back"] < 0.06 and mb["chamfer_back"] > 0.12
    assert mb["iou_64"] == pytest.approx(mf["iou_64"], abs=0.02)
    assert mb["chamfer"] == pytest.approx(mf["chamfer"], rel=0.2)


def test_back_half_is_the_side_of_the_back_camera():
    """The back half is where the back camera (render.VIEWS) is: a point there is closer to it."""
    toward_back = camera_basis("back")[2]
    p = torch.tensor([[0.0, 0.2, 0.0], [0.0, -0.2, 0.0]])
    assert G.back_half_mask(p).tolist() == [True, False]
    assert float(p[0] @ toward_back) > 0 > float(p[1] @ toward_back)
    grid = G.back_half_grid(64)
    assert bool(grid[:, 32:].all()) and not bool(grid[:, :32].any())


def test_surface_voxels_of_a_plate():
    """A square plate at z = 0.01 over x, y in [-0.24, 0.24] on an 8^3 grid: voxel index floor((c + 0.5) * 8)
    gives x, y in floor(0.26*8) = 2 .. floor(0.74*8) = 5 and z = floor(0.51*8) = 4: exactly 16 voxels."""
    v = torch.tensor([[-0.24, -0.24, 0.01], [0.24, -0.24, 0.01], [0.24, 0.24, 0.01], [-0.24, 0.24, 0.01]])
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    grid = G.surface_voxels(v, f, 8)
    expected = torch.zeros(8, 8, 8, dtype=torch.bool)
    expected[2:6, 2:6, 4] = True
    assert torch.equal(grid, expected)


def test_voxel_iou_counts():
    """A = 4 voxels, B = 2 of them + 2 others: |A & B| = 2, |A | B| = 6."""
    a = G.coords_to_grid(torch.tensor([[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]]), 8)
    b = G.coords_to_grid(torch.tensor([[0, 2, 0, 0], [0, 3, 0, 0], [0, 4, 0, 0], [0, 5, 0, 0]]), 8)  # (b, x, y, z)
    assert G.voxel_iou(a, b) == pytest.approx(2 / 6)
    assert G.voxel_iou(a, a) == 1.0
    assert G.voxel_iou(torch.zeros_like(a), torch.zeros_like(a)) == 1.0
    with pytest.raises(ValueError, match="outside"):
        G.coords_to_grid(torch.tensor([[8, 0, 0]]), 8)


@pytest.mark.parametrize("backend", ["torch", "fpsample"])
def test_farthest_point_sampling_covers_within_its_separation(backend):
    """Greedy FPS: every point is within the covering radius of the subset, and that radius is at most
    the smallest distance between two selected points (each selected point was the farthest when chosen)."""
    if backend == "fpsample":
        pytest.importorskip("fpsample")
    pts = torch.rand(5000, 3, generator=torch.Generator().manual_seed(1))
    idx = G.farthest_point_sampling(pts, 256, backend=backend)
    assert idx.shape == (256,) and len(set(idx.tolist())) == 256
    sel = pts[idx]
    cover = float(G.nearest_distances(pts, sel).max())
    sep = torch.cdist(sel, sel) + torch.eye(256) * 10
    assert cover <= float(sep.min()) + 1e-6
    if backend == "torch":
        assert int(idx[0]) == 0


def test_occupancy_only_items_use_voxel_centres():
    """Stage-1 predictions have only a 64^3 occupancy. The same grid against itself: IoU 1 and CD 0;
    shifted by one voxel along x (1/64 in model space, 1/(64 * radius) normalised) the point sets are
    the same lattice moved by one spacing, so CD <= 2 / (64 * radius) and > 0."""
    grid = G.surface_voxels(*(_sphere(0.3).vertices, _sphere(0.3).faces), 64)
    shifted = torch.roll(grid, 1, dims=0)
    a, b = Shape(occupancy=grid), Shape(occupancy=shifted)
    same = evaluate_pair(a, a, FAST)
    assert same["iou_64"] == 1.0 and same["chamfer"] == 0.0 and same["iou_mesh"] is None and same["psnr_back"] is None
    moved = evaluate_pair(b, a, FAST)
    _, radius = G.unit_sphere_transform((grid.nonzero().float() + 0.5) / 64 - 0.5)
    assert 0 < moved["chamfer"] <= 2 / (64 * radius) + 1e-6
    assert moved["iou_64"] < 1.0


def test_aggregate_skips_missing_and_infinite():
    rows = [{"chamfer": 0.1, "psnr_back": float("inf")}, {"chamfer": 0.3, "psnr_back": 20.0}, {"chamfer": None}]
    agg = aggregate(rows)
    assert agg["chamfer"]["mean"] == pytest.approx(0.2) and agg["chamfer"]["n"] == 2 and agg["chamfer"]["n_missing"] == 1
    assert agg["psnr_back"]["mean"] == 20.0 and agg["psnr_back"]["n_missing"] == 2
    assert "iou_64" not in agg


def test_extra_metric_hook_adds_a_column():
    """The extra_metrics hook: a function of (pred, gt) becomes a metric, aggregated like the others."""
    s = _sphere(0.3, subdivisions=2)
    m = evaluate_pair(s, s, FAST, with_images=False, extra_metrics={"faces_ratio": lambda p, g: p.faces.shape[0] / g.faces.shape[0]})
    assert m["faces_ratio"] == 1.0
    assert aggregate([m], ("faces_ratio",))["faces_ratio"]["mean"] == 1.0
