"""Whole networks visiting the device (the ``model`` placement): pinned host copies through diffusers'
``ModuleGroup`` on CUDA (``know3d_core.device_visits``), and the back view's visits (the text encoder
once for both prompts)."""
import pytest
import torch

from know3d_core.device_visits import PinnedVisits, chunks, visits_for

from test_mmdit_memory import _backview
from test_mmdit_common import random_image

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 64)          # 16 KiB weight + bias
        self.b = torch.nn.Linear(64, 64)
        self.b.weight = self.a.weight              # tied: one tensor
        self.register_buffer("scale", torch.full((64,), 2.0))

    def forward(self, x):
        return self.b(self.a(x)) * self.scale


def test_chunks_cover_every_tensor_once_within_the_size():
    net = _Net()
    parts = chunks(net, max_bytes=16 * 1024 + 100)
    tensors = [t for params, bufs in parts for t in params + bufs]
    assert len(tensors) == len({id(t) for t in tensors}) == 4  # a.weight (tied), a.bias, b.bias, scale
    assert {id(t) for t in tensors} == {id(t) for t in list(net.parameters()) + list(net.buffers())}
    assert [len(p) + len(b) for p, b in parts] == [1, 3]       # the 16 KiB weight fills the first chunk
    assert all(sum(t.numel() * t.element_size() for t in p + b) <= 16 * 1024 + 100 for p, b in parts)


def test_pack_into_one_buffer_keeps_every_tensor():
    """Each chunk's tensors become views of one buffer (one pinned allocation on CUDA) with their dtypes,
    shapes and values: fp8 / bf16 / bool / 0-dim, tied weights once; the module computes the same."""
    from know3d_core.device_visits import ALIGN, pack_into, packed_bytes

    torch.manual_seed(0)
    net = _Net()
    net.register_buffer("flag", torch.tensor([True, False, True]))
    net.register_buffer("step", torch.tensor(3.5, dtype=torch.bfloat16))
    net.register_buffer("fp8", torch.randn(5, 3).to(torch.float8_e4m3fn))
    x = torch.randn(2, 64)
    want = net(x)
    before = {n: t.clone() for n, t in list(net.named_parameters()) + list(net.named_buffers())}
    (params, bufs), = chunks(net)
    tensors = params + bufs
    buf = torch.empty(packed_bytes(tensors), dtype=torch.uint8)
    pack_into(tensors, buf)
    start, end = buf.data_ptr(), buf.data_ptr() + buf.numel()
    for name, t in list(net.named_parameters()) + list(net.named_buffers()):
        assert start <= t.data_ptr() < end and (t.data_ptr() - start) % ALIGN == 0, name
        assert t.dtype == before[name].dtype and torch.equal(t.reshape(-1).view(torch.uint8), before[name].reshape(-1).view(torch.uint8)), name
    assert net.b.weight is net.a.weight and packed_bytes(tensors) == buf.numel()
    torch.testing.assert_close(net(x), want)


def test_no_pinned_visits_off_cuda():
    assert visits_for(_Net(), "cpu") is None
    assert visits_for(object(), "cpu") is None


def test_text_encoder_visits_once_for_both_prompts():
    """The positive and the negative prompt are encoded in one visit of the text encoder (each visit of
    a 16 GB card's fp8 text encoder moved 7.7 GiB in and out); the other networks visit as before."""
    bv = _backview()
    bv.place("cpu", offload=True)
    arrivals = []
    real = bv._arrive
    bv._arrive = lambda m: (arrivals.append(m), real(m))[1]
    bv([random_image(80, 64, seed=4)], "two straps", steps=2, height=64, width=64,
       generator=torch.Generator().manual_seed(1), decode=True)
    names = {id(bv.c.text_encoder): "text_encoder", id(bv.c.vae): "vae", id(bv.c.transformer): "transformer"}
    assert [names[id(m)] for m in arrivals] == ["text_encoder", "vae", "transformer", "vae"]
    assert not bv._visiting


@cuda
@pytest.mark.cuda
def test_pinned_visit_moves_in_and_points_back_without_copying():
    """On CUDA: the host copies are pinned; a visit puts every tensor on the device with the same values
    and the forward matches the CPU's; leaving points each tensor back at the same pinned storage."""
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(3, 64)
    want = net(x)
    visits = PinnedVisits(net, torch.device("cuda"), max_bytes=16 * 1024 + 100)
    host = {name: t.data_ptr() for name, t in list(net.named_parameters()) + list(net.named_buffers())}
    assert all(t.is_pinned() for t in list(net.parameters()) + list(net.buffers()))
    raw = sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(net.buffers()))
    assert raw <= visits.host_bytes <= 2 * raw and len(visits.groups) == 2  # two chunks, each one buffer
    for _ in range(2):
        visits.onload()
        assert all(t.device.type == "cuda" for t in list(net.parameters()) + list(net.buffers()))
        torch.testing.assert_close(net(x.cuda()).cpu(), want)
        visits.offload()
        now = {name: t.data_ptr() for name, t in list(net.named_parameters()) + list(net.named_buffers())}
        assert now == host
    torch.testing.assert_close(net(x), want)


def test_pin_host_is_a_setting_of_the_pipeline_off_by_default():
    """Pinning is opt-in: ``Know3DPipeline(pin_host=...)`` hands it to the back view's placement and the
    geometry's offload; without it (or on the CPU) every network moves with ``.to``."""
    from types import SimpleNamespace

    from know3d_core.pipeline import Know3DPipeline

    calls = []
    geometry = SimpleNamespace(device=torch.device("cpu"), pin_host_copies=lambda: calls.append("geometry"))
    for pin in (False, True):
        bv = _backview()
        places = []
        real = bv.place
        bv.place = lambda *a, **k: (places.append(k.get("pin_host")), real(*a, **k))[1]
        pipe = Know3DPipeline(geometry, bv, offload=True, **({"pin_host": True} if pin else {}))  # default: off
        assert pipe.pin_host is pin and places == [pin] and bv.visits == {}  # CPU: nothing to pin
    assert calls == ["geometry"]


@cuda
@pytest.mark.cuda
def test_offloaded_pipeline_on_cuda_visits_from_pinned_copies(tmp_path_factory):
    """The demo models, ``offload=True, pin_host=True`` on CUDA: every network (Qwen and TRELLIS.2, the DINOv3 model too)
    has pinned host copies, the run gives the resident run's knowledge and mesh size, and afterwards every
    weight is back on its pinned host copy."""
    from PIL import Image

    from know3d_core.demo_models import DEMO_RUN_SETTINGS
    from know3d_core.pipeline import Know3DPipeline

    from _pipeline_helpers import full_demo

    demo = full_demo(tmp_path_factory)
    run = dict(steps=DEMO_RUN_SETTINGS["steps"], pipeline_type="512", back_view_size=DEMO_RUN_SETTINGS["back_view_size"],
               trellis_steps=3)
    image = Image.open(demo.image)
    results = {}
    for offload in (False, True):
        pipe = Know3DPipeline.from_pretrained(
            demo.trellis2, qwen=demo.qwen, know3d=demo.know3d, backview_loras=[demo.backview_lora], device="cuda",
            dtype="float32", offload=offload, pin_host=offload, vae_image_area=DEMO_RUN_SETTINGS["vae_image_area"])
        results[offload] = pipe.run(image, "a hollow backrest", "hidden", seed=2, **run)
    nets = list(pipe.geometry.models.values()) + [pipe.geometry.image_cond_model.model] + pipe.backview.networks()
    assert len(pipe.geometry.visits) + len(pipe.backview.visits) == len(nets)
    assert all(t.is_pinned() for n in nets for t in list(n.parameters()) + list(n.buffers()))
    a, b = results[True], results[False]
    assert a.knowledge == b.knowledge and a.mesh.num_faces == b.mesh.num_faces
    torch.testing.assert_close(a.geometry.slat.feats.float().cpu(), b.geometry.slat.feats.float().cpu(),
                               atol=1e-3, rtol=1e-3)
