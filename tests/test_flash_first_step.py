"""A new token count's first sampler step on FlashAttention-2 (``sparse.flash_for_new_shapes``,
``Trellis2GeometryPipeline.flash_first_step``): only calls whose signature this thread has not yet run
with SDPA's default kernels change backend, and only while the switch is on.

On CUDA the default kernel (cuDNN) builds a plan per new signature; on the CPU there are no plans, so
these tests add "cpu" to ``attention.PLAN_DEVICES`` to drive the same bookkeeping. Which backends SDPA
was allowed is read inside each call from torch's own state (``sdpa_kernel``).
"""
import threading

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention import _cur_sdpa_kernel_backends

from know3d_core.geometry_pipeline import FLASH_FIRST_STEP_BY_DEFAULT, Trellis2GeometryPipeline
from know3d_core.plan import SS_STAGE
from know3d_core.sparse import attention, dense_attention, flash_for_new_shapes, record_attention_plans
from know3d_core.sparse.kernel_dispatch import wait_for_warmups

from _pipeline_helpers import cpu_geometry, geometry_demo, one_thread, tiny_geometry_bench_rows

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)
FLASH = set(attention.NO_PLAN_BACKENDS)


def _spy_backends(monkeypatch) -> list:
    """Per ``dense_attention`` call of this thread (the flows' attention; other SDPA users such as DINOv3,
    and other threads such as a kernel warm-up, are not counted), whether SDPA was restricted to the
    plan-free backends (True) or not (False)."""
    calls, seen_in_sdpa, me = [], [], threading.get_ident()
    real_sdpa, real_flows = F.scaled_dot_product_attention, attention._sdpa

    def sdpa(q, k, v, *args, **kwargs):
        if threading.get_ident() == me:
            seen_in_sdpa.append(set(_cur_sdpa_kernel_backends()) == FLASH)
        return real_sdpa(q, k, v, *args, **kwargs)

    def flows(q, k, v, scale):
        if threading.get_ident() != me:
            return real_flows(q, k, v, scale)
        n = len(seen_in_sdpa)
        out = real_flows(q, k, v, scale)
        calls.append(seen_in_sdpa[n])
        return out

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(attention, "_sdpa", flows)
    return calls


@pytest.fixture
def backends(monkeypatch):
    """Plan bookkeeping on the CPU, a fresh memory of seen signatures, and the backends of each call."""
    monkeypatch.setattr(attention, "PLAN_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(attention._new_shapes, "seen", set())
    return _spy_backends(monkeypatch)


def _qkv(B=2, L=6, H=2, D=8):
    return [torch.randn(B, L, H, D) for _ in range(3)]


def test_only_unseen_signatures_take_flash_while_on(backends):
    a, b = _qkv(L=6), _qkv(L=7)
    dense_attention(*a)  # run with the default kernels: its plan exists from now on
    with flash_for_new_shapes() as stop:
        dense_attention(*a)  # seen
        dense_attention(*b)  # new: flash, and not remembered (no plan was built)
        dense_attention(*b)
        stop()
        dense_attention(*b)  # after stop: the default kernels, remembered
    with flash_for_new_shapes():
        dense_attention(*b)
    assert backends == [False, False, True, True, False, False]


def test_flash_gives_the_same_attention(backends):
    q, k, v = _qkv()
    with flash_for_new_shapes():
        out = dense_attention(q, k, v)
    assert backends == [True]
    ref = F.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / 8 ** 0.5, -1) @ v.transpose(1, 2)
    torch.testing.assert_close(out, ref.transpose(1, 2))


def test_nothing_changes_off_plan_devices(monkeypatch):
    monkeypatch.setattr(attention._new_shapes, "seen", set())
    with flash_for_new_shapes():
        dense_attention(*_qkv())  # the CPU builds no plans (PLAN_DEVICES is CUDA only)
    assert attention.PLAN_DEVICES == ("cuda",) and attention._new_shapes.seen == set()


def test_memory_is_per_thread_bounded_and_counts_prebuilt_plans(backends, monkeypatch):
    a = _qkv()
    worker = threading.Thread(target=dense_attention, args=a)
    worker.start()
    worker.join()  # another thread's plan (torch's plan cache is per thread too); not counted here
    with flash_for_new_shapes():
        dense_attention(*a)
    assert backends == [True]  # new to this thread

    monkeypatch.setattr(attention, "SEEN_LIMIT", 2)
    for L in (3, 4, 5):
        dense_attention(*_qkv(L=L))
    assert len(attention._new_shapes.seen) == 1  # full at 2: forgotten, then the third remembered

    with record_attention_plans() as plans:
        dense_attention(*_qkv(B=4, L=9))
    plans.prebuild(2)  # builds batch 2's plan for L=9
    with flash_for_new_shapes():
        dense_attention(*_qkv(B=2, L=9))
    assert backends[-1] is False


# ----------------------------------------------------------------------------- in the pipeline
SHAPE = {"steps": 3}
STAGE = "shape_slat_512"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return cpu_geometry(tmp_path_factory)


def _run(pipe, demo, flash, calls):
    """One 512 run with ``flash_first_step`` set; returns (result, {step: [flash? per SDPA call]}) of its
    shape stage (a call belongs to the step whose callback comes next)."""
    pipe.flash_first_step = flash
    marks, start = [], len(calls)
    try:
        out = pipe.run(Image.open(demo.image), pipeline_type="512", seed=3, ss_params={"steps": 2},
                       shape_params=SHAPE, callback=lambda stage, step, total: marks.append((stage, step, len(calls))))
    finally:
        pipe.flash_first_step = FLASH_FIRST_STEP_BY_DEFAULT
    begins = [start] + [n for _, _, n in marks]
    steps = {(stage, step): calls[begin:end] for (stage, step, end), begin in zip(marks, begins)}
    return out, steps


def _first_step_only(steps) -> bool:
    """Each stage's first step made attention calls, all on flash; no later step made one on flash."""
    return all(calls and all(calls) if step == 1 else not any(calls) for (_, step), calls in steps.items())


def test_a_new_objects_first_steps_take_flash_and_a_seen_one_runs_as_without(pipe, backends):
    pipe, demo = pipe
    assert pipe.flash_first_step is FLASH_FIRST_STEP_BY_DEFAULT is False  # until timed on CUDA
    first, steps = _run(pipe, demo, True, backends)
    assert {stage for stage, _ in steps} == {SS_STAGE, STAGE}
    assert _first_step_only(steps)  # step 1: new shapes, all on flash; later steps: the default kernels
    again, steps = _run(pipe, demo, True, backends)
    assert not any(sum(steps.values(), []))  # the same token count again: every shape seen
    plain, _ = _run(pipe, demo, False, backends)
    assert torch.equal(again.slat.feats, plain.slat.feats)  # seen shapes: exactly the run without it
    torch.testing.assert_close(first.slat.feats, plain.slat.feats, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_first_step_on_flash_then_the_default_kernels(tmp_path_factory, monkeypatch):
    """On CUDA (the real plan-building device): step 1 of a new object on FlashAttention-2, later steps and
    the same object again on the default kernels, and the run again equal to one without the switch."""
    monkeypatch.setattr(attention._new_shapes, "seen", set())
    calls = _spy_backends(monkeypatch)
    demo = geometry_demo(tmp_path_factory)
    pipe = Trellis2GeometryPipeline.from_pretrained(demo.trellis2, device="cuda")
    wait_for_warmups()  # the warm-up thread's own forwards: not counted, but finished before any is
    first, steps = _run(pipe, demo, True, calls)
    assert _first_step_only(steps)
    again, steps = _run(pipe, demo, True, calls)
    assert not any(sum(steps.values(), []))
    plain, _ = _run(pipe, demo, False, calls)
    assert torch.equal(again.slat.feats, plain.slat.feats)
    assert (first.slat.feats.float() - plain.slat.feats.float()).abs().max().item() < 0.1


def test_geometry_bench_times_flash_first_step_off_then_on_each_on_new_tokens(tmp_path):
    """``bench_geometry.py --flash-first-step both`` (the A/B that decides the default): a row without, then
    one with, on token counts no earlier row used; each row counts its FlashAttention-2 calls."""
    rows = tiny_geometry_bench_rows(tmp_path, "--flash-first-step", "both")
    assert [r["flash_first_step"] for r in rows] == [False, True]
    assert [r["flash_calls"] for r in rows] == [0, 0]  # the CPU builds no plans: nothing to avoid
    tokens = [r["num_tokens"]["shape_slat_512"] for r in rows]
    assert rows[0]["warmup_tokens"] < tokens[0] < tokens[1]
