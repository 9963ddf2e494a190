"""Write tests/data/golden_texture/: outputs of the reference TRELLIS.2 texture networks on tiny
random weights, for the parity tests in CI (tests/test_trellis2_texture.py).

    python benchmarks/make_texture_goldens.py --trellis2-src /path/to/TRELLIS.2 [--out DIR]

Runs the reference classes (5565d24) unmodified on the CPU:

* ``trellis2.models.sc_vaes.sparse_unet_vae.SparseUnetVaeDecoder`` with ``pred_subdiv=False`` and 6
  output channels (the texture decoder, ``configs/scvae/tex_vae_next_dc_f16c32_fp16.json`` at the
  tiny widths of ``know3d_core.trellis2.tex_decoder.TINY_ARGS``), guided by the subdivisions of the
  reference shape decoder stored in ``tests/data/golden_decoders/shape_decoder_io.safetensors``
  (``subdiv_logits_i`` on ``subdiv_coords_i``), on that file's SLat coords;
* ``trellis2.models.structured_latent_flow.SLatFlowModel`` with in_channels 64 / out_channels 32
  (the texture flow, ``configs/gen/slat_flow_imgshape2tex_dit_1_3B_512_bf16.json`` at the tiny
  widths of tests/data/golden_flows/configs.json) called with ``concat_cond`` (the shape latent).

Substitutions (nothing else): those of ``make_encoder_goldens.import_reference`` (FlexGEMM's
submanifold conv by its dense ``conv3d`` equivalent; mesh-only imports stubbed) and, for the sparse
attention, a ``flash_attn`` module whose varlen functions run ``scaled_dot_product_attention`` on
each sample's segment (given by ``cu_seqlens``) separately, as for tests/data/golden_flows.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import types

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "tests", "data", "golden_texture")
DECODER_GOLDEN = os.path.join(HERE, "..", "tests", "data", "golden_decoders", "shape_decoder_io.safetensors")
FLOW_CONFIGS = os.path.join(HERE, "..", "tests", "data", "golden_flows", "configs.json")
SEED = 23


def _segments(cu):
    cu = cu.tolist()
    return list(zip(cu[:-1], cu[1:]))


def _sdpa(q, k, v):  # [T, H, D] each -> [T, H, D]
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)


def _flash_attn_stub():
    fa = types.ModuleType("flash_attn")

    def varlen(q, k, v, cu_q, cu_k, *args, **kwargs):
        return torch.cat([_sdpa(q[a:b], k[c:d], v[c:d]) for (a, b), (c, d) in zip(_segments(cu_q), _segments(cu_k))])

    fa.flash_attn_varlen_func = varlen
    fa.flash_attn_varlen_kvpacked_func = lambda q, kv, cu_q, cu_k, *a, **k: varlen(q, kv[:, 0], kv[:, 1], cu_q, cu_k)
    fa.flash_attn_varlen_qkvpacked_func = lambda qkv, cu, *a, **k: varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu)
    return fa


def random_weights(model: torch.nn.Module, seed: int, storage: torch.dtype):
    """Every parameter seeded-random (the reference's zero-initialised layers too): matrices /
    kernels N(0, 1/fan_in), norm weights and RMS gammas 1 + 0.2 N, biases 0.2 N, other 1-D entries
    (``modulation``) 0.1 N; rounded to ``storage`` (the reference then runs those values in fp32)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        leaf = key.rsplit(".", 1)[-1]
        if value.dim() >= 2 and leaf != "gamma":
            v = torch.randn(value.shape, generator=gen) / math.sqrt(value.numel() // value.shape[0])
        elif leaf == "bias":
            v = 0.2 * torch.randn(value.shape, generator=gen)
        elif leaf in ("weight", "gamma"):
            v = 1 + 0.2 * torch.randn(value.shape, generator=gen)
        else:
            v = 0.1 * torch.randn(value.shape, generator=gen)
        out[key] = v.to(storage)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trellis2-src", required=True, help="TRELLIS.2 checkout (5565d24)")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    sys.path.insert(0, os.path.join(HERE, ".."))
    sys.path.insert(0, HERE)
    from make_encoder_goldens import import_reference

    sys.modules["flash_attn"] = _flash_attn_stub()
    os.environ["SPARSE_ATTN_BACKEND"] = "flash_attn"
    os.environ["ATTN_BACKEND"] = "sdpa"
    _, _, sp = import_reference(args.trellis2_src)
    from trellis2.models.sc_vaes.sparse_unet_vae import SparseUnetVaeDecoder
    from trellis2.models.structured_latent_flow import SLatFlowModel
    from know3d_core.trellis2.tex_decoder import TINY_ARGS

    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)
    # texture decoder, guided by the reference shape decoder's subdivisions
    shape_io = load_file(DECODER_GOLDEN)
    coords = shape_io["coords"].int()
    feats = torch.randn(coords.shape[0], TINY_ARGS["latent_channels"], generator=gen)
    subs = [sp.SparseTensor(shape_io[f"subdiv_logits_{i}"].float(), shape_io[f"subdiv_coords_{i}"].int())
            for i in range(4)]
    io = {"coords": coords, "feats": feats}
    weights = None
    for mode in ("fp32", "fp16_mode"):
        model = SparseUnetVaeDecoder(**{**TINY_ARGS, "use_fp16": mode == "fp16_mode"}).eval()
        if weights is None:
            weights = random_weights(model, SEED + 1, torch.float16)
        model.load_state_dict(weights, strict=True)  # cast to each parameter's dtype
        out = model(sp.SparseTensor(feats, coords), guide_subs=subs)
        io[f"out_feats_{mode}"] = out.feats.float().contiguous()
        io["out_coords"] = out.coords.int().contiguous()
    save_file(weights, os.path.join(args.out, "tex_decoder_weights.safetensors"))
    save_file(io, os.path.join(args.out, "tex_decoder_io.safetensors"))

    # texture flow: x [N, 32] noisy texture latent + concat_cond [N, 32] shape latent
    with open(FLOW_CONFIGS, "r", encoding="utf-8") as f:
        flow_args = {**json.load(f)["SLatFlowModel"], "in_channels": 64, "out_channels": 32}
    lens = (29, 19)
    rows = []
    for b, n in enumerate(lens):
        idx = torch.randperm(512, generator=gen)[:n].sort().values
        rows.append(torch.stack([torch.full_like(idx, b), idx // 64, (idx // 8) % 8, idx % 8], 1))
    fcoords = torch.cat(rows).int()
    x = torch.randn(fcoords.shape[0], 32, generator=gen)
    shape = torch.randn(fcoords.shape[0], 32, generator=gen)
    t = torch.tensor([800.0, 350.0])
    cond = torch.randn(2, 11, flow_args["cond_channels"], generator=gen)
    fio = {"coords": fcoords, "x": x, "shape": shape, "t": t, "cond": cond}
    fweights = None
    for dtype in ("float32", "bfloat16"):
        model = SLatFlowModel(**{**flow_args, "dtype": dtype}).eval()
        if fweights is None:
            fweights = random_weights(model, SEED + 2, torch.bfloat16)
        model.load_state_dict(fweights, strict=True)
        out = model(sp.SparseTensor(x, fcoords), t, cond, concat_cond=sp.SparseTensor(shape, fcoords))
        fio[f"out_{'fp32' if dtype == 'float32' else 'bf16'}"] = out.feats.float().contiguous()
    save_file(fweights, os.path.join(args.out, "tex_flow_weights.safetensors"))
    save_file(fio, os.path.join(args.out, "tex_flow_io.safetensors"))
    with open(os.path.join(args.out, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"SparseUnetVaeDecoder": TINY_ARGS, "SLatFlowModel": flow_args, "seed": SEED}, f, indent=1)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
