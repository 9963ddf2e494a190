"""Tiny TRELLIS.2 flow models and inputs for the knowledge tests (built with the trellis2 classes)."""
import torch

from know3d_core.knowledge import install_branch
from know3d_core.sparse import SparseTensor
from know3d_core.trellis2.slat_flow import SLatFlowModel
from know3d_core.trellis2.sparse_structure_flow import SparseStructureFlowModel
from know3d_core.trellis2.tiny import random_state_dict, tiny_flow_args

WIDTH = 64
HEADS = 4
BLOCKS = 2
COND = 32
SS_RES = 6          # 216 tokens: small enough for CPU, same code path as 16^3
KNOW_DIM = 48


def tiny_ss(dtype: str = "float32", seed: int = 0) -> SparseStructureFlowModel:
    """Tiny sparse-structure flow with non-trivial random weights (nothing zero)."""
    args = tiny_flow_args("ss", model_channels=WIDTH, num_blocks=BLOCKS, num_heads=HEADS,
                          cond_channels=COND, resolution=SS_RES)
    args["dtype"] = dtype
    model = SparseStructureFlowModel(**args)
    model.load_state_dict(random_state_dict(model, seed))
    return model.eval()


def tiny_slat(dtype: str = "float32", seed: int = 1) -> SLatFlowModel:
    """Tiny shape-SLat flow (512 layout) with non-trivial random weights."""
    args = tiny_flow_args("shape512", model_channels=WIDTH, num_blocks=BLOCKS, num_heads=HEADS,
                          cond_channels=COND)
    args["dtype"] = dtype
    model = SLatFlowModel(**args)
    model.load_state_dict(random_state_dict(model, seed))
    return model.eval()


def ss_inputs(batch: int = 1, cond_tokens: int = 5, seed: int = 0):
    """(x [B, 8, R, R, R], t [B] on the 1000 scale, cond [B, Lc, COND])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 8, SS_RES, SS_RES, SS_RES, generator=g)
    t = torch.full((batch,), 700.0)
    cond = torch.randn(batch, cond_tokens, COND, generator=g)
    return x, t, cond


def sparse_input(lengths, channels: int = 32, res: int = 32, seed: int = 0) -> SparseTensor:
    """SparseTensor with ``lengths[b]`` distinct voxels per sample (sorted), random feats."""
    g = torch.Generator().manual_seed(seed)
    coords = []
    for b, n in enumerate(lengths):
        flat = torch.randperm(res ** 3, generator=g)[:n].sort().values
        xyz = torch.stack([flat // (res * res), (flat // res) % res, flat % res], dim=1)
        coords.append(torch.cat([torch.full((n, 1), b), xyz], dim=1))
    coords = torch.cat(coords).to(torch.int32)
    feats = torch.randn(coords.shape[0], channels, generator=g)
    return SparseTensor(feats, coords, (res, res, res), batch_size=len(lengths))


def knowledge_tensor(batch: int = 1, tokens: int = 7, dim: int = KNOW_DIM, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, dim, generator=g)


def randomize_branch(model, seed: int = 0, out_std: float = 0.2):
    """Random values for every branch parameter, the zero-initialised output layer included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "knowledge_" not in name:
                continue
            if p.dim() >= 2:
                v = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
            elif name.endswith("gamma") or ".norm.weight" in name:
                v = 1 + 0.1 * torch.randn(p.shape, generator=g)
            else:
                v = out_std * torch.randn(p.shape, generator=g)
            if "to_out.weight" in name:
                v = out_std * torch.randn(p.shape, generator=g)
            p.copy_(v.to(p.dtype))
    return model


def with_branch(model, kind=None, dim: int = KNOW_DIM, seed: int = 0, zero: bool = False, **kwargs):
    """Install a branch; random weights unless ``zero`` (then the fresh zero-output branch)."""
    install_branch(model, dim, kind=kind, **kwargs)
    if not zero:
        randomize_branch(model, seed)
    return model
