"""SparseTensor: features on a set of active voxels of a batch of 3-D grids.

Rows are voxels. ``coords[:, 0]`` is the batch index, ``coords[:, 1:]`` are (x, y, z) inside
``spatial_shape``. Rows of one batch item are contiguous and batch items come in ascending order,
so batch item ``b`` owns rows ``layout[b]``.

Tensors made with ``replace(feats)`` keep the same coords object and share one ``cache`` dict, so
neighbour maps and layouts are built once per coordinate set.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

__all__ = ["SparseTensor", "flat_keys", "sparse_cat", "sparse_cat_channels"]

Operand = Union["SparseTensor", torch.Tensor, float, int]


class SparseTensor:
    """Features ``feats [N, C, ...]`` at voxels ``coords [N, 4] int32 (b, x, y, z)``.

    Args:
        feats: ``[N, C]`` (extra trailing dims allowed, e.g. ``[N, H, D]``).
        coords: ``[N, 4]`` int32, contiguous per batch item, batch index ascending.
        spatial_shape: grid size ``(X, Y, Z)``; coords satisfy ``0 <= x < X`` etc.
        batch_size: number of batch items ``B``. Computed from coords (one host sync) when None.
        cache: dict to share with other tensors on the same coords (internal; use ``replace``).

    The constructor checks only metadata (shapes, dtypes, devices: no host sync). ``validate()``
    checks the values.
    """

    def __init__(
        self,
        feats: torch.Tensor,
        coords: torch.Tensor,
        spatial_shape: Sequence[int],
        batch_size: Optional[int] = None,
        cache: Optional[dict] = None,
    ):
        _check_metadata(feats, coords, spatial_shape)
        self.feats = feats
        self.coords = coords
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        self.cache = {} if cache is None else cache
        if batch_size is not None:
            self.cache.setdefault("batch_size", int(batch_size))

    # ------------------------------------------------------------------ basic properties
    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def num_voxels(self) -> int:
        return self.feats.shape[0]

    @property
    def batch_size(self) -> int:
        """Number of batch items B (from coords on first use: one host sync, then cached)."""
        if "batch_size" not in self.cache:
            n = self.coords.shape[0]
            self.cache["batch_size"] = int(self.coords[:, 0].max().item()) + 1 if n else 0
        return self.cache["batch_size"]

    @property
    def shape(self) -> torch.Size:
        """``[B, C, ...]`` like the reference implementation."""
        return torch.Size([self.batch_size, *self.feats.shape[1:]])

    @property
    def seqlens(self) -> torch.Tensor:
        """LongTensor[B]: voxels per batch item (on the tensor's device, cached)."""
        if "seqlens" not in self.cache:
            b = self.coords[:, 0].long()
            self.cache["seqlens"] = torch.bincount(b, minlength=self.batch_size)[: self.batch_size]
        return self.cache["seqlens"]

    @property
    def seqlens_list(self) -> list[int]:
        """Voxels per batch item as python ints (one host sync, cached)."""
        if "seqlens_list" not in self.cache:
            self.cache["seqlens_list"] = [int(v) for v in self.seqlens.tolist()]
        return self.cache["seqlens_list"]

    @property
    def layout(self) -> list[slice]:
        """Rows of each batch item: ``feats[layout[b]]`` belong to batch item b (cached)."""
        if "layout" not in self.cache:
            out, start = [], 0
            for n in self.seqlens_list:
                out.append(slice(start, start + n))
                start += n
            self.cache["layout"] = out
        return self.cache["layout"]

    @property
    def batch_index(self) -> torch.Tensor:
        """LongTensor[N]: batch item of each row (cached)."""
        if "batch_index" not in self.cache:
            self.cache["batch_index"] = self.coords[:, 0].long()
        return self.cache["batch_index"]

    # ------------------------------------------------------------------ construction
    def replace(
        self,
        feats: torch.Tensor,
        coords: Optional[torch.Tensor] = None,
        spatial_shape: Optional[Sequence[int]] = None,
    ) -> "SparseTensor":
        """New tensor with ``feats``; shares this tensor's cache when coords and shape are unchanged.

        Args:
            feats: ``[N', C', ...]`` new features (``N' == N`` when coords is None).
            coords: new ``[N', 4]`` coords, or None to keep these.
            spatial_shape: new grid size, or None to keep this one.
        """
        same_coords = coords is None or coords is self.coords
        shape = self.spatial_shape if spatial_shape is None else tuple(int(s) for s in spatial_shape)
        if same_coords and shape == self.spatial_shape:
            return SparseTensor(feats, self.coords, shape, cache=self.cache)
        return SparseTensor(feats, self.coords if coords is None else coords, shape)

    @staticmethod
    def from_lists(
        feats_list: Sequence[torch.Tensor],
        xyz_list: Sequence[torch.Tensor],
        spatial_shape: Sequence[int],
    ) -> "SparseTensor":
        """Build from per-item ``feats [N_b, C]`` and ``xyz [N_b, 3]`` (batch index added here)."""
        coords = [
            torch.cat([torch.full_like(xyz[:, :1], b), xyz], dim=1).to(torch.int32)
            for b, xyz in enumerate(xyz_list)
        ]
        return SparseTensor(
            torch.cat(list(feats_list), 0), torch.cat(coords, 0), spatial_shape, batch_size=len(xyz_list)
        )

    def to(self, *args, **kwargs) -> "SparseTensor":
        """Like ``Tensor.to`` on feats; coords follow a device change (then the cache is new)."""
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.coords.device:
            return self.replace(feats)
        out = SparseTensor(feats, self.coords.to(feats.device), self.spatial_shape)
        if "batch_size" in self.cache:
            out.cache["batch_size"] = self.cache["batch_size"]
        return out

    def half(self) -> "SparseTensor":
        return self.replace(self.feats.half())

    def float(self) -> "SparseTensor":
        return self.replace(self.feats.float())

    def double(self) -> "SparseTensor":
        return self.replace(self.feats.double())

    def bfloat16(self) -> "SparseTensor":
        return self.replace(self.feats.bfloat16())

    def type(self, dtype: torch.dtype) -> "SparseTensor":
        return self.replace(self.feats.type(dtype))

    def detach(self) -> "SparseTensor":
        return self.replace(self.feats.detach())

    def cpu(self) -> "SparseTensor":
        return self.to("cpu")

    def cuda(self) -> "SparseTensor":
        return self.to("cuda")

    def reshape(self, *shape: int) -> "SparseTensor":
        """Reshape the per-voxel part: ``feats.reshape(N, *shape)``."""
        return self.replace(self.feats.reshape(self.feats.shape[0], *shape))

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "SparseTensor":
        """``replace(fn(feats))``: run a row-wise function on the features."""
        return self.replace(fn(self.feats))

    def unbind(self) -> list["SparseTensor"]:
        """One SparseTensor per batch item (batch index 0, same spatial shape)."""
        out = []
        for s in self.layout:
            coords = self.coords[s].clone()
            coords[:, 0] = 0
            out.append(SparseTensor(self.feats[s], coords, self.spatial_shape, batch_size=1))
        return out

    # ------------------------------------------------------------------ arithmetic
    def _operand(self, other: Operand):
        """Other operand as something broadcastable against feats ``[N, ...]``.

        A SparseTensor contributes its feats; a tensor of shape ``[B, ...]`` (one row per batch
        item, same trailing dims as feats) is expanded to the rows; anything else broadcasts as-is.
        """
        if isinstance(other, SparseTensor):
            if other.feats.shape[0] != self.feats.shape[0]:
                raise ValueError(
                    f"SparseTensor arithmetic needs the same voxels: {other.feats.shape[0]} rows vs "
                    f"{self.feats.shape[0]}"
                )
            return other.feats
        if (
            isinstance(other, torch.Tensor)
            and other.dim() == self.feats.dim()
            and other.shape[0] != self.feats.shape[0]
            and other.shape[0] != 1
        ):
            if other.shape[0] != self.batch_size:
                raise ValueError(
                    f"SparseTensor arithmetic: operand has {other.shape[0]} rows; expected 1, the "
                    f"batch size {self.batch_size} or the voxel count {self.feats.shape[0]}"
                )
            return other[self.batch_index]
        return other

    def __neg__(self) -> "SparseTensor":
        return self.replace(-self.feats)

    def __add__(self, other: Operand) -> "SparseTensor":
        return self.replace(self.feats + self._operand(other))

    __radd__ = __add__

    def __sub__(self, other: Operand) -> "SparseTensor":
        return self.replace(self.feats - self._operand(other))

    def __rsub__(self, other: Operand) -> "SparseTensor":
        return self.replace(self._operand(other) - self.feats)

    def __mul__(self, other: Operand) -> "SparseTensor":
        return self.replace(self.feats * self._operand(other))

    __rmul__ = __mul__

    def __truediv__(self, other: Operand) -> "SparseTensor":
        return self.replace(self.feats / self._operand(other))

    # ------------------------------------------------------------------ checks and views
    def validate(self) -> "SparseTensor":
        """Check the values (host syncs). Returns self; raises ValueError naming the problem.

        Problems detected: wrong dtype/ndim/row count, negative batch index, coords outside
        ``spatial_shape``, batch items not contiguous / not ascending, duplicate coords, batch
        size smaller than the largest batch index.
        """
        _check_metadata(self.feats, self.coords, self.spatial_shape)
        c = self.coords
        if c.shape[0] == 0:
            return self
        b = c[:, 0]
        if bool((b < 0).any()):
            raise ValueError("SparseTensor coords: negative batch index in coords[:, 0]")
        lo = c[:, 1:].amin(0)
        hi = c[:, 1:].amax(0)
        for axis, name in enumerate("xyz"):
            if int(lo[axis]) < 0 or int(hi[axis]) >= self.spatial_shape[axis]:
                raise ValueError(
                    f"SparseTensor coords outside spatial shape {self.spatial_shape}: {name} spans "
                    f"[{int(lo[axis])}, {int(hi[axis])}]"
                )
        if c.shape[0] > 1 and bool((b[1:] < b[:-1]).any()):
            raise ValueError(
                "SparseTensor coords: batch not contiguous (rows of each batch item must be "
                "contiguous with batch index ascending); sort rows by coords[:, 0]"
            )
        max_b = int(b.max())
        if "batch_size" in self.cache and self.cache["batch_size"] <= max_b:
            raise ValueError(
                f"SparseTensor batch_size {self.cache['batch_size']} but coords hold batch index {max_b}"
            )
        keys = flat_keys(c, self.spatial_shape)
        if torch.unique(keys).numel() != keys.numel():
            raise ValueError(f"SparseTensor coords: duplicate coords ({keys.numel() - torch.unique(keys).numel()} repeated rows)")
        return self

    def to_dense(self) -> torch.Tensor:
        """Dense grid ``[B, C, X, Y, Z]`` (zeros at inactive voxels); feats must be 2-D."""
        if self.feats.dim() != 2:
            raise ValueError(f"to_dense needs 2-D feats, got shape {tuple(self.feats.shape)}")
        X, Y, Z = self.spatial_shape
        dense = self.feats.new_zeros(self.batch_size, X, Y, Z, self.feats.shape[1])
        c = self.coords.long()
        dense[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = self.feats
        return dense.permute(0, 4, 1, 2, 3).contiguous()

    def __repr__(self) -> str:
        return (
            f"SparseTensor(feats={tuple(self.feats.shape)} {self.dtype}, coords={tuple(self.coords.shape)}, "
            f"spatial_shape={self.spatial_shape}, device={self.device})"
        )


def flat_keys(coords: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """int64 key ``((b*X + x)*Y + y)*Z + z`` per row of ``coords [N, 4]``; ascending in (b, x, y, z)."""
    X, Y, Z = (int(s) for s in spatial_shape)
    c = coords.long()
    return ((c[:, 0] * X + c[:, 1]) * Y + c[:, 2]) * Z + c[:, 3]


def sparse_cat(tensors: Sequence[SparseTensor], dim: int = 0) -> SparseTensor:
    """Concatenate SparseTensors.

    ``dim=0``: stack batches (item b of tensor t gets batch index ``b + sum of earlier batch
    sizes``); spatial shapes must match. Any other dim: concatenate feats along it (same voxels).
    """
    if dim != 0:
        first = tensors[0]
        for t in tensors[1:]:
            if t.feats.shape[0] != first.feats.shape[0]:
                raise ValueError("sparse_cat along features needs tensors on the same voxels")
        return first.replace(torch.cat([t.feats for t in tensors], dim=dim))
    shape = tensors[0].spatial_shape
    coords, start = [], 0
    for t in tensors:
        if t.spatial_shape != shape:
            raise ValueError(f"sparse_cat: spatial shapes differ: {t.spatial_shape} vs {shape}")
        c = t.coords.clone()
        c[:, 0] += start
        coords.append(c)
        start += t.batch_size
    return SparseTensor(torch.cat([t.feats for t in tensors], 0), torch.cat(coords, 0), shape, batch_size=start)


def sparse_cat_channels(tensors: Sequence[SparseTensor]) -> SparseTensor:
    """Concatenate features of tensors on the same coords along dim 1 (keeps the first's cache)."""
    return sparse_cat(tensors, dim=1)


def _check_metadata(feats: torch.Tensor, coords: torch.Tensor, spatial_shape: Sequence[int]) -> None:
    """Shape/dtype/device checks that need no host sync; raise ValueError naming the problem."""
    if not isinstance(feats, torch.Tensor) or not isinstance(coords, torch.Tensor):
        raise ValueError("SparseTensor needs torch tensors for feats and coords")
    if coords.dtype != torch.int32:
        raise ValueError(f"SparseTensor coords dtype must be torch.int32, got {coords.dtype}")
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"SparseTensor coords must have ndim 2 and shape [N, 4] (b, x, y, z), got {tuple(coords.shape)}")
    if feats.dim() < 2:
        raise ValueError(f"SparseTensor feats must have ndim >= 2 ([N, C]), got shape {tuple(feats.shape)}")
    if feats.shape[0] != coords.shape[0]:
        raise ValueError(f"SparseTensor feats has {feats.shape[0]} rows but coords has {coords.shape[0]}")
    if feats.device != coords.device:
        raise ValueError(f"SparseTensor feats on {feats.device} but coords on {coords.device}")
    if len(tuple(spatial_shape)) != 3 or any(int(s) <= 0 for s in spatial_shape):
        raise ValueError(f"SparseTensor spatial_shape must be 3 positive ints (X, Y, Z), got {tuple(spatial_shape)}")
