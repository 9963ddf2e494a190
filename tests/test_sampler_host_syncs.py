"""The flows' sampling steps after the first make no host sync, so on a GPU the host can queue the next
step while the device still runs this one (then a cuDNN attention plan built at a later step, e.g. the
first unguided one, overlaps the queued work instead of stalling the device).

On the CPU the ops that would sync on CUDA are found with torch's profiler (nested calls included):
``item`` / ``_local_scalar_dense`` (a value read back), ``nonzero`` and friends (a size read back), and
``lift_fresh`` (a tensor made from host data: on CUDA a copy that waits for the stream). On CUDA,
torch's own sync debug mode raises on any synchronising call.
"""
import pytest
import torch
from PIL import Image
from torch.profiler import profile

from know3d_core.geometry_pipeline import Trellis2GeometryPipeline
from know3d_core.knowledge import MultiViewCondition, multi_view_model_fn
from know3d_core.sampling import FlowEulerGuidanceIntervalSampler, SamplerParams, host_time
from know3d_core.sparse.kernel_dispatch import wait_for_warmups

from _pipeline_helpers import geometry_demo, hidden_knowledge, one_thread, tiny_geometry_bench_rows

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::nonzero_static",
            "aten::lift_fresh", "aten::is_nonzero", "aten::equal", "aten::_unique2", "aten::unique_dim",
            "aten::unique_consecutive", "aten::masked_select", "aten::repeat_interleave"}
STEPS = {"steps": 3}


def _sync_ops(events) -> list:
    """Names (with their parent op) of the profiled ops that sync the host on CUDA.

    One exception, a CPU artefact: torch's CPU ``std`` of a single output (a batch of one) reduces
    through a whole-tensor path that reads the result back with ``item``; the CUDA kernel has no such
    read (a batch of two shows no ``item`` on the CPU either)."""
    found = []
    for e in events:
        if e.name not in SYNC_OPS:
            continue
        parent = e.cpu_parent
        while parent is not None and parent.name in {"aten::item", "aten::_local_scalar_dense"}:
            parent = parent.cpu_parent
        if parent is not None and parent.name == "aten::std":
            continue
        found.append(f"{e.name} in {parent.name if parent is not None else 'python'}")
    return found


class StepWindows:
    """A pipeline callback that profiles each stage from the end of its first step to the end of its
    last one (steps 2..n with their Euler updates) and keeps the sync ops seen per stage."""

    def __init__(self):
        self.found: dict = {}
        self._prof = None

    def __call__(self, stage: str, step: int, total: int) -> None:
        if step == 1:
            self._prof = profile()
            self._prof.start()
        if step == total and self._prof is not None:
            self._prof.stop()
            self.found[stage] = _sync_ops(self._prof.events())
            self._prof = None


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    demo = geometry_demo(tmp_path_factory)
    pipe = Trellis2GeometryPipeline.from_pretrained(demo.trellis2, device="cpu", dtype="float32",
                                                    know3d=demo.know3d, texture=True)
    return pipe, Image.open(demo.image)


@pytest.mark.parametrize("ptype", ["512", "1024_cascade"])
def test_flow_steps_after_the_first_make_no_host_sync(pipe, ptype):
    pipe, image = pipe
    windows = StepWindows()
    pipe.run(image, pipeline_type=ptype, seed=1, knowledge=hidden_knowledge(), ss_params=STEPS,
             shape_params=STEPS, tex_params=STEPS, texture=True, callback=windows)
    stages = {"512": ["sparse_structure", "shape_slat_512", "tex_slat"],
              "1024_cascade": ["sparse_structure", "shape_slat_512", "shape_slat_1024", "tex_slat"]}[ptype]
    assert sorted(windows.found) == sorted(stages)
    assert windows.found == {s: [] for s in stages}


def test_model_time_carries_its_value_and_fills_on_the_device():
    x = torch.zeros(3, 5)
    with profile() as prof:
        t = FlowEulerGuidanceIntervalSampler.model_time(x, 0.3)
    assert not _sync_ops(prof.events())
    assert host_time(t) == 1000 * 0.3 and torch.equal(t, torch.full((3,), 1000 * 0.3))
    assert host_time(torch.full((2,), 7.0)) == 7.0  # any other tensor: read back


def test_stochastic_views_read_the_time_without_a_sync():
    """The stochastic multi-view condition counts steps from the model time; with the sampler's time
    tensors it reads their carried value: no ``item`` per call, same views as reading the tensor."""
    views = [torch.full((1, 2, 4), float(v)) for v in range(3)]
    picked = []

    def model(x, t, cond):
        picked.append(next(i for i, v in enumerate(views) if cond is v))
        return torch.zeros_like(x)

    sampler = FlowEulerGuidanceIntervalSampler(SamplerParams(steps=5, guidance_strength=1.0))
    fn = multi_view_model_fn(model)
    cond = MultiViewCondition(views, "stochastic")
    with profile() as prof:
        sampler.sample(fn, torch.zeros(1, 4), cond, None)
    assert not _sync_ops(prof.events())
    assert picked == [0, 1, 2, 0, 1]  # guidance 1: one call a step, view = step % 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ptype", ["512", "1024_cascade"])
def test_flow_steps_after_the_first_never_sync_on_cuda(tmp_path_factory, ptype):
    """torch's sync debug mode set to error from the end of each stage's first step to the end of its
    last: any synchronising call in between raises inside the run. The mode is process-wide, so the
    kernel warm-ups (a background thread) finish first, and a first run makes every first call (compiles,
    plan builds) before the checked one."""
    demo = geometry_demo(tmp_path_factory)
    pipe = Trellis2GeometryPipeline.from_pretrained(demo.trellis2, device="cuda", know3d=demo.know3d, texture=True)
    wait_for_warmups()
    image = Image.open(demo.image)
    run = dict(pipeline_type=ptype, seed=1, knowledge=hidden_knowledge(), ss_params=STEPS, shape_params=STEPS,
               tex_params=STEPS, texture=True)
    pipe.run(image, **run)
    checked = []

    def callback(stage, step, total):
        if step == 1:
            torch.cuda.set_sync_debug_mode("error")
        if step == total:
            torch.cuda.set_sync_debug_mode("default")
            checked.append(stage)

    try:
        pipe.run(image, callback=callback, **run)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert "shape_slat_512" in checked and "sparse_structure" in checked and "tex_slat" in checked


def test_geometry_bench_has_the_per_step_sync_baseline_in_the_same_run(tmp_path):
    """``bench_geometry.py --host-sync both``: a row whose host waits for the device after every step
    (the baseline), then one as the pipeline runs, each on token counts no earlier row used."""
    rows = tiny_geometry_bench_rows(tmp_path, "--host-sync", "both")
    assert [r["host_sync_each_step"] for r in rows] == [True, False]
    tokens = [r["num_tokens"]["shape_slat_512"] for r in rows]
    assert rows[0]["warmup_tokens"] < tokens[0] < tokens[1]
