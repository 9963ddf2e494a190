"""Kernel warm-up started at load (issue 21: first call in a fresh process).

``KernelWarmup`` runs a network's warm-up (the decoder's precompile jobs, a flow's tiny forward) in a
background thread from load and the first forward joins it. CPU checks with the real decoder and
flows: the jobs run in the background thread before the first forward's body, the forward waits
for them, an error raised there surfaces at the first use, a warm-up that runs the forward itself
does not deadlock on its own join, results are unchanged, and the pipeline starts the warm-ups of
its networks at load (not with ``offload``). On CUDA the precompile covers the variants (see
test_decoder_fused's coverage test and the flow coverage test below).
"""
import copy
import os
import threading
import time

import pytest
import torch

from know3d_core.sparse import SparseTensor
from know3d_core.sparse.kernel_dispatch import KernelWarmup
from know3d_core.trellis2 import shape_decoder as shape_mod
from know3d_core.trellis2 import sparse_structure_flow as ssf_mod
from know3d_core.trellis2.modules import dit as dit_mod
from know3d_core.trellis2.modules import fused as fused_mod
from know3d_core.trellis2.slat_flow import SLatFlowModel
from know3d_core.trellis2.sparse_structure_flow import SparseStructureFlowModel
from know3d_core.trellis2.tiny import random_state_dict, tiny_flow_args

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
KEY = ("cpu", torch.float32)


# ----------------------------------------------------------------------------- KernelWarmup itself
def test_start_runs_in_the_background_and_ensure_joins_it():
    seen = {}
    began, gate = threading.Event(), threading.Event()

    def warm():
        began.set()
        gate.wait(120)
        seen["thread"] = threading.current_thread().name
        time.sleep(0.05)
        seen["done"] = True

    w = KernelWarmup()
    assert w.start(KEY, warm) and w.pending(KEY)
    assert not w.start(KEY, warm)  # once per key
    # running (a warm-up still queued would be run by the caller instead); the one background thread may
    # still be busy with an earlier test's warm-up on a loaded CI machine: wait long, fail clearly
    assert began.wait(120), "the background thread never started the warm-up"
    assert "done" not in seen  # start returned before the warm-up finished
    gate.set()
    w.ensure(KEY, lambda: pytest.fail("a started warm-up must be joined, not run again"))
    assert seen["done"] and seen["thread"] != threading.current_thread().name
    assert w.done(KEY) and not w.pending(KEY)
    w.ensure(KEY, lambda: pytest.fail("done: nothing runs"))


def test_wait_for_warmups_returns_once_every_started_warmup_has_run():
    from know3d_core.sparse.kernel_dispatch import wait_for_warmups

    gate, finished = threading.Event(), []
    first, second = KernelWarmup(), KernelWarmup()
    first.start(KEY, lambda: gate.wait(120) and finished.append("first"))
    second.start(KEY, lambda: finished.append("second"))
    waiter = threading.Thread(target=wait_for_warmups)
    waiter.start()
    time.sleep(0.1)
    assert waiter.is_alive() and finished == []  # the first is still held at its gate
    gate.set()
    waiter.join(120)
    assert not waiter.is_alive() and finished == ["first", "second"]  # both ran, in start order


def test_ensure_without_start_runs_the_warmup_in_the_caller_once():
    calls = []
    w = KernelWarmup()
    w.ensure(KEY, lambda: calls.append(threading.current_thread().name))
    w.ensure(KEY, lambda: calls.append("again"))
    assert calls == [threading.current_thread().name]


def test_an_error_in_the_background_surfaces_at_the_first_use_only():
    w, began = KernelWarmup(), threading.Event()

    def broken():
        began.set()
        raise ValueError("precompile broke")

    w.start(KEY, broken)
    began.wait(5)  # left the queue (a queued one would run in the caller instead)
    with pytest.raises(ValueError, match="precompile broke"):
        w.ensure(KEY, lambda: None)
    w.ensure(KEY, lambda: pytest.fail("reported once; later calls proceed"))


def test_a_queued_warmup_runs_in_the_caller_instead_of_waiting_behind_others():
    """All warm-ups share one background thread; one that has not started when its network is
    called is taken out of the queue and run by the caller."""
    blocker, release = KernelWarmup(), threading.Event()
    blocker.start(KEY, lambda: release.wait(5))
    queued, where = KernelWarmup(), []
    queued.start(KEY, lambda: where.append("background"))
    queued.ensure(KEY, lambda: where.append("caller"))
    release.set()
    blocker.ensure(KEY, lambda: None)
    assert where == ["caller"]


def test_nested_ensure_inside_a_warmup_returns_at_once():
    w, inner, began = KernelWarmup(), [], threading.Event()

    def warm():  # a flow's warm-up calls its own forward, which calls ensure
        began.set()
        w.ensure(KEY, lambda: pytest.fail("nested"))
        inner.append(True)

    w.start(KEY, warm)
    began.wait(5)
    w.ensure(KEY, lambda: None)
    assert inner == [True]


def test_copies_start_cold_and_cuda_keys_name_the_index():
    w = KernelWarmup()
    w.start(KEY, lambda: None)
    w.ensure(KEY, lambda: None)
    assert not copy.deepcopy(w).done(KEY) and w.done(KEY)
    assert KernelWarmup.key("cpu", torch.float16) == ("cpu", torch.float16)


# ----------------------------------------------------------------------------- the shape decoder
def _decoder():
    torch.manual_seed(0)
    model = shape_mod.FlexiDualGridVaeDecoder(**shape_mod.TINY_ARGS).eval()
    model.convert_to(torch.float32)
    return model


def _decoder_input():
    torch.manual_seed(1)
    r = torch.arange(4)
    grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.zeros(len(grid), 1, dtype=grid.dtype), grid], 1).int()
    return SparseTensor(torch.randn(len(coords), 32), coords, (4, 4, 4), batch_size=1)


def test_decoder_precompile_starts_in_the_background_and_the_first_forward_waits(monkeypatch):
    """The precompile jobs (here: CPU stand-ins through the real precompile_kernels) run in the
    background thread started at load, and the first forward's body runs only after all of them."""
    model, log, began = _decoder(), [], threading.Event()

    def slow_job():
        time.sleep(0.2)
        log.append(("job", threading.current_thread().name.startswith("know3d-kernel-warmup")
                    or threading.current_thread().name.startswith("ThreadPool")))

    monkeypatch.setattr(model, "_kernel_jobs", lambda device: (began.set(), [slow_job, slow_job])[1])
    original = model._from_latent
    monkeypatch.setattr(model, "_from_latent", lambda x: (log.append(("body", None)), original(x))[1])
    assert model.start_kernel_precompile(torch.device("cpu"))
    assert not model.start_kernel_precompile(torch.device("cpu"))
    began.wait(5)
    model(_decoder_input())
    assert log == [("job", True), ("job", True), ("body", None)]
    model(_decoder_input())  # joined once: no second precompile
    assert log.count(("body", None)) == 2 and len(log) == 4


def test_decoder_precompile_error_surfaces_at_the_first_forward(monkeypatch):
    model = _decoder()

    def broken(device):  # where the real _kernel_jobs raises for a config it cannot precompile
        raise ValueError("shape decoder precompile: 3x3x3 convs expected")

    monkeypatch.setattr(model, "_kernel_jobs", broken)
    model.start_kernel_precompile(torch.device("cpu"))
    with pytest.raises(ValueError, match="3x3x3 convs expected"):
        model(_decoder_input())
    assert torch.isfinite(model(_decoder_input()).feats).all()  # then the forward proceeds


def test_decoder_output_is_the_same_with_the_background_precompile():
    a, b, x = _decoder(), _decoder(), _decoder_input()
    b.load_state_dict(a.state_dict())
    b.start_kernel_precompile(torch.device("cpu"))
    ra, rb = a(x), b(x)
    assert torch.equal(ra.coords, rb.coords) and torch.equal(ra.feats, rb.feats)


# ----------------------------------------------------------------------------- the flows
def _flow(cls, kind):
    model = cls(**{**tiny_flow_args(kind), "dtype": "float32"}).eval()
    model.load_state_dict(random_state_dict(model, 0))
    return model


@pytest.mark.parametrize("cls,kind", [(SparseStructureFlowModel, "ss"), (SLatFlowModel, "shape512")])
def test_flow_warmup_forward_runs_in_the_background_without_deadlock(monkeypatch, cls, kind):
    """Where the fused kernels run (forced here on the CPU, so the real warm-up forward runs), the
    warm-up is one tiny forward in the background thread; that forward's own ensure returns at once
    and the first real forward joins it."""
    model, threads, began = _flow(cls, kind), [], threading.Event()
    monkeypatch.setattr(dit_mod, "fused_enabled", lambda x: True)
    original = model._warmup_inputs
    monkeypatch.setattr(model, "_warmup_inputs", lambda device: (
        threads.append(threading.current_thread().name), began.set(), original(device))[2])
    assert model.start_kernel_precompile(torch.device("cpu"))
    began.wait(5)
    x, t, cond = original(torch.device("cpu"))
    model(x, t, cond)
    assert model._warmup.done(KEY) and len(threads) == 1 and threads[0].startswith("know3d-kernel-warmup")


@pytest.mark.skipif(fused_mod.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs Triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("cls,kind", [(SparseStructureFlowModel, "ss"), (SLatFlowModel, "shape512")])
def test_flow_kernel_jobs_are_the_fused_calls_in_the_interpreter(cls, kind):
    """Each warm-up job (the block's fused calls on 16 tokens) runs the kernels (one at a time: the
    interpreter is not thread-safe)."""
    model = cls(**{**tiny_flow_args(kind), "dtype": "bfloat16"})
    jobs = model._kernel_jobs(torch.device("cpu"))
    assert len(jobs) == 6
    with torch.no_grad():
        for job in jobs:
            job()


@pytest.mark.parametrize("on", [False, True])
def test_flow_without_a_started_warmup_compiles_its_kernels_side_by_side_at_the_first_forward(monkeypatch, on):
    """With the switch on (off by default until measured on CUDA): once, on a pool's threads."""
    model, ran = _flow(SparseStructureFlowModel, "ss"), []
    monkeypatch.setattr(dit_mod, "fused_enabled", lambda x: True)
    job = lambda: ran.append(threading.current_thread().name)  # noqa: E731
    monkeypatch.setattr(model, "_kernel_jobs", lambda device: [job, job])
    x, t, cond = model._warmup_inputs(torch.device("cpu"))
    with dit_mod.use_block_precompile(on):
        model(x, t, cond)
        model(x, t, cond)
    assert len(ran) == (2 if on else 0) and threading.current_thread().name not in ran


def test_flow_warmup_error_surfaces_at_the_first_forward(monkeypatch):
    model = _flow(SparseStructureFlowModel, "ss")
    began = threading.Event()

    def broken(device):
        began.set()
        raise RuntimeError("warm-up broke")

    monkeypatch.setattr(model, "_warm_kernels", broken)
    model.start_kernel_precompile(torch.device("cpu"))
    began.wait(5)
    x, t, cond = model._warmup_inputs(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="warm-up broke"):
        model(x, t, cond)
    assert torch.isfinite(model(x, t, cond)).all()


def test_flow_warmup_does_nothing_where_the_fused_kernels_do_not_run():
    model = _flow(SparseStructureFlowModel, "ss")
    assert model._warm_kernels(torch.device("cpu")) is False
    model.start_kernel_precompile(torch.device("cpu"))
    x, t, cond = model._warmup_inputs(torch.device("cpu"))
    ref = _flow(SparseStructureFlowModel, "ss")(x, t, cond)
    assert torch.equal(model(x, t, cond), ref)


# ----------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from _pipeline_helpers import geometry_demo

    return geometry_demo(tmp_path_factory)


@pytest.mark.parametrize("offload", [False, True])
def test_pipeline_starts_each_networks_warmup_when_asked_unless_offloaded(demo, offload):
    """``kernel_warmup=True`` starts them (not with offload); the default starts them on CUDA only (measured
    faster there, session 9), so this CPU pipeline starts none unless asked."""
    from know3d_core.geometry_pipeline import Trellis2GeometryPipeline, kernel_warmup_by_default

    assert kernel_warmup_by_default(torch.device("cuda", 0)) and not kernel_warmup_by_default("cpu")

    loaded = Trellis2GeometryPipeline.from_pretrained(demo.trellis2, device="cpu", dtype="float32",
                                                      pipeline_types=["512"], offload=offload)
    warm = {k: m._warmup for k, m in loaded.models.items() if hasattr(m, "_warmup")}
    assert len(warm) == 3  # the structure flow, the shape flow, the shape decoder
    keys = {k: KernelWarmup.key("cpu", loaded.models[k].dtype) for k in warm}
    assert not any(w.pending(keys[k]) or w.done(keys[k]) for k, w in warm.items())  # default: nothing started
    Trellis2GeometryPipeline(loaded.models, loaded.config, device="cpu", offload=offload, kernel_warmup=True)
    for k, w in warm.items():
        assert (w.pending(keys[k]) or w.done(keys[k])) != offload, k
    assert loaded.start_kernel_warmups() == 0  # once per network (or none with offload)


# ----------------------------------------------------------------------------- Triton's own start
def test_triton_start_is_queued_once_on_the_warmup_thread_and_only_on_cuda(monkeypatch):
    from know3d_core.sparse import triton_start

    ran, done = [], threading.Event()
    monkeypatch.setattr(triton_start, "_RUNTIME", KernelWarmup())
    monkeypatch.setattr(triton_start, "_start_runtime",
                        lambda: (ran.append(threading.current_thread().name), done.set()))
    monkeypatch.setattr(triton_start, "triton_available", lambda: True)
    def started():
        return triton_start._RUNTIME.pending(triton_start._KEY) or triton_start._RUNTIME.done(triton_start._KEY)

    assert not triton_start.start_triton_runtime("cpu") and not started()
    assert triton_start.start_triton_runtime(torch.device("cuda", 0))
    assert not triton_start.start_triton_runtime("cuda")  # once per process
    assert started()
    # the one background thread may still run an earlier test's warm-up on a loaded CI machine: wait long
    assert done.wait(120), "the background thread never ran Triton's start"
    triton_start._RUNTIME.ensure(triton_start._KEY, lambda: pytest.fail("queued: joined, not run again"))
    assert ran and ran[0].startswith("know3d-kernel-warmup")
    monkeypatch.setattr(triton_start, "triton_available", lambda: False)
    monkeypatch.setattr(triton_start, "_RUNTIME", KernelWarmup())
    assert not triton_start.start_triton_runtime("cuda")  # no Triton: nothing to start


def test_triton_start_without_its_internals_is_skipped_not_raised(monkeypatch):
    """``_start_runtime`` uses two Triton internals; where they are missing it returns False (logged)."""
    import builtins

    from know3d_core.sparse import triton_start

    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name.startswith("triton"):
            raise ImportError(f"no module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    assert triton_start._start_runtime() is False


@pytest.mark.parametrize("entry", ["from_pretrained", "from_comfy_files"])
def test_loading_starts_triton_before_reading_the_weights(monkeypatch, entry):
    """Both loaders queue Triton's start first, so that it overlaps the reading of the weights."""
    from know3d_core import geometry_pipeline as gp
    from know3d_core.trellis2 import comfy_files

    order = []

    def stop(*a, **k):
        order.append("read")
        raise RuntimeError("stop here")

    monkeypatch.setattr(gp, "start_triton_runtime", lambda device: order.append(("start", str(device))))
    monkeypatch.setattr(gp, "read_pipeline_config", stop)
    monkeypatch.setattr(comfy_files, "load_comfy_model_set", stop)
    with pytest.raises(RuntimeError, match="stop here"):
        if entry == "from_pretrained":
            gp.Trellis2GeometryPipeline.from_pretrained("folder", device="cuda:0")
        else:
            gp.Trellis2GeometryPipeline.from_comfy_files("d.safetensors", "v.safetensors", device="cuda:0")
    assert order == [("start", "cuda:0"), "read"]


_TRITON_START_SCRIPT = """
import torch
from triton.runtime.cache import triton_key
from know3d_core.sparse import triton_start
assert triton_start.start_triton_runtime("cuda")
triton_start._RUNTIME.ensure(triton_start._KEY, lambda: None)
assert triton_key.cache_info().currsize == 1, triton_key.cache_info()
print("ok")
"""


@cuda
@pytest.mark.cuda
def test_triton_start_computes_the_compiler_hash_in_the_background():
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _TRITON_START_SCRIPT], env=env, cwd=here, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


# ----------------------------------------------------------------------------- CUDA: coverage
_FLOW_SCRIPT = """
import glob, os, torch
from know3d_core.trellis2.sparse_structure_flow import SparseStructureFlowModel
from know3d_core.trellis2.slat_flow import SLatFlowModel
from know3d_core.trellis2.tiny import random_state_dict, tiny_flow_args
from know3d_core.sparse import SparseTensor

def variants():
    root = os.environ["TRITON_CACHE_DIR"]
    return sorted(p for p in glob.glob(os.path.join(root, "*", "*.json")) if not os.path.basename(p).startswith("__grp__"))

ss = SparseStructureFlowModel(**{**tiny_flow_args("ss", model_channels=128, num_heads=2), "dtype": "bfloat16"}).cuda()
ss.load_state_dict(random_state_dict(ss, 0))
assert ss.start_kernel_precompile()
ss._ensure_kernels(torch.device("cuda"))  # joins the warm-up
compiled = variants()
x, t, cond = ss._warmup_inputs(torch.device("cuda"))
ss(torch.randn(2, *x.shape[1:], device="cuda"), torch.full((2,), 700.0, device="cuda"),
   torch.randn(2, 40, cond.shape[2], device="cuda"))
sl = SLatFlowModel(**{**tiny_flow_args("shape512", model_channels=128, num_heads=2), "dtype": "bfloat16"}).cuda()
sl.load_state_dict(random_state_dict(sl, 1))
coords = torch.randint(0, 32, (2 * 300, 3), device="cuda")
coords = torch.cat([torch.arange(2, device="cuda").repeat_interleave(300)[:, None], coords], 1).int()
sl(SparseTensor(torch.randn(600, 32, device="cuda"), coords, (32, 32, 32), batch_size=2),
   torch.full((2,), 700.0, device="cuda"), torch.randn(2, 40, cond.shape[2], device="cuda"))
torch.cuda.synchronize()
print("compiled by the warm-up", len(compiled), "after both B=2 forwards", len(variants()))
assert compiled and variants() == compiled, sorted(set(variants()) - set(compiled))
"""


@cuda
@pytest.mark.cuda
def test_flow_warmup_covers_the_kernels_of_a_cfg_pair_forward(tmp_path):
    """In a fresh process with an empty kernel cache: after the structure flow's warm-up (B=1, short
    condition), its B=2 forward and a B=2 shape-flow forward of the same width compile nothing new."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"),
               PYTHONPATH=os.pathsep.join([os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _FLOW_SCRIPT], env=env, cwd=here, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_exit_waits_for_the_running_warmup_only(tmp_path):
    """A process that ends while warm-ups are queued does not run them first (only the running one
    finishes)."""
    import subprocess
    import sys
    flag = tmp_path / "queued_ran"
    script = f"""
import time
from know3d_core.sparse.kernel_dispatch import KernelWarmup
a, b = KernelWarmup(), KernelWarmup()
a.start("k", lambda: time.sleep(0.5))
b.start("k", lambda: open({str(flag)!r}, "w").write("ran"))
"""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not flag.exists()
