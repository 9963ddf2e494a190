"""LPIPS (Zhang et al. 2018, "v0.1") from files the user supplies; nothing is downloaded.

LPIPS needs two pretrained parts, which this package cannot fetch:

* the backbone: torchvision's ImageNet checkpoint of AlexNet (``alexnet-owt-7be5be79.pth``) or
  VGG16 (``vgg16-397923af.pth``); only its ``features.*`` tensors are used (the classifier's are
  ignored by design), and those must match exactly;
* the linear heads of the ``lpips`` package (``lpips/weights/v0.1/alex.pth`` or ``vgg.pth``): keys
  ``lin{k}.model.1.weight`` of shape ``[1, C_k, 1, 1]``, k = 0..4, exactly these.

``.pth`` files are read with ``torch.load(weights_only=True)`` (tensors only, no code);
``.safetensors`` works too. ``LPIPS.from_files(backbone, heads, net="alex")`` loads both strictly;
a missing, unexpected or misshaped key raises ``ValueError`` naming the file.

Forward: images ``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B]`` distances (the package's ``normalize=True``
input path: ``x * 2 - 1``, then its fixed scaling layer), channel-unit-normalised features of five
ReLU taps, squared difference, non-negative 1x1 heads, spatial mean, sum over taps.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

__all__ = ["LPIPS", "NETS", "load_state_file"]

# net -> (features layer spec, tap indices (exclusive end of each slice), channels per tap)
# spec: ("conv", in, out, kernel, stride, padding) | ("relu",) | ("pool", kernel, stride)
_ALEX = [("conv", 3, 64, 11, 4, 2), ("relu",), ("pool", 3, 2), ("conv", 64, 192, 5, 1, 2), ("relu",),
         ("pool", 3, 2), ("conv", 192, 384, 3, 1, 1), ("relu",), ("conv", 384, 256, 3, 1, 1), ("relu",),
         ("conv", 256, 256, 3, 1, 1), ("relu",)]


def _vgg16() -> List[tuple]:
    spec, c_in = [], 3
    for block, (c, n) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
        if block:
            spec.append(("pool", 2, 2))
        for _ in range(n):
            spec += [("conv", c_in, c, 3, 1, 1), ("relu",)]
            c_in = c
    return spec


NETS: Dict[str, Tuple[List[tuple], Tuple[int, ...], Tuple[int, ...]]] = {
    "alex": (_ALEX, (2, 5, 8, 10, 12), (64, 192, 384, 256, 256)),
    "vgg": (_vgg16(), (4, 9, 16, 23, 30), (64, 128, 256, 512, 512)),
}


def _layer(spec: tuple) -> nn.Module:
    if spec[0] == "conv":
        _, c_in, c_out, k, s, p = spec
        return nn.Conv2d(c_in, c_out, k, s, p)
    if spec[0] == "relu":
        return nn.ReLU(inplace=False)
    return nn.MaxPool2d(spec[1], spec[2])


class _Head(nn.Module):
    """The package's ``NetLinLayer``: ``model = Sequential(Dropout, Conv2d(C, 1, 1, bias=False))``."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS v0.1 with an AlexNet or VGG16 backbone (module names = the official checkpoints' keys)."""

    shift = (-0.030, -0.088, -0.188)
    scale = (0.458, 0.448, 0.450)

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"LPIPS: unknown net {net!r}; choose from {', '.join(NETS)}")
        spec, self.taps, channels = NETS[net]
        self.net = net
        self.features = nn.Sequential(*[_layer(s) for s in spec])
        for k, c in enumerate(channels):
            self.add_module(f"lin{k}", _Head(c))
        self.register_buffer("_shift", torch.tensor(self.shift).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_scale", torch.tensor(self.scale).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    @classmethod
    def from_files(cls, backbone: str, heads: str, net: str = "alex") -> "LPIPS":
        """Strictly load torchvision's backbone checkpoint and the lpips package's head file."""
        model = cls(net)
        feats = {k: v for k, v in load_state_file(backbone).items() if k.startswith("features.")}
        _load_exact(model.features, {k[len("features."):]: v for k, v in feats.items()}, backbone,
                    "torchvision " + ("alexnet" if net == "alex" else "vgg16") + " checkpoint", prefix="features.")
        heads_module = nn.ModuleDict({f"lin{k}": getattr(model, f"lin{k}") for k in range(len(model.taps))})
        _load_exact(heads_module, load_state_file(heads), heads, f"lpips v0.1 {net}.pth")
        return model

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a, b [B, 3, H, W]`` in ``[0, 1]`` -> ``[B]`` LPIPS distances."""
        fa, fb = self._taps(a), self._taps(b)
        total = a.new_zeros(a.shape[0])
        for k, (x, y) in enumerate(zip(fa, fb)):
            d = (_unit(x) - _unit(y)).square()
            total = total + getattr(self, f"lin{k}").model(d).mean(dim=(1, 2, 3))
        return total

    def _taps(self, x: torch.Tensor) -> List[torch.Tensor]:
        h = ((x * 2 - 1) - self._shift) / self._scale
        out, start = [], 0
        for end in self.taps:
            h = self.features[start:end](h)
            out.append(h)
            start = end
        return out


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.square().sum(dim=1, keepdim=True).sqrt() + eps)


def load_state_file(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a tensors-only ``.pth`` (``weights_only=True``)."""
    if not os.path.isfile(path):
        raise ValueError(f"LPIPS weights {path} do not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"LPIPS weights {path}: expected a state dict of tensors")
    return state


def _load_exact(module: nn.Module, state: Dict[str, torch.Tensor], path: str, what: str, prefix: str = "") -> None:
    expected = module.state_dict()
    missing = sorted(prefix + k for k in set(expected) - set(state))
    unexpected = sorted(prefix + k for k in set(state) - set(expected))
    shapes = [f"{prefix}{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(unexpected)}"] if unexpected else []) \
            + ([f"wrong shapes {_few(shapes)}"] if shapes else [])
        raise ValueError(f"LPIPS weights {path} are not a {what}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def _few(items: Sequence[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
