"""The mesh type passed between the pipeline, clean-up, export and rendering."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import torch

__all__ = ["Mesh"]


@dataclass
class Mesh:
    """Triangle mesh in TRELLIS model space: Z-up, inside the AABB ``[-0.5, 0.5]^3``.

    Attributes:
        vertices: ``[V, 3]`` float32.
        faces: ``[F, 3]`` int64 indices into ``vertices``.
        metadata: free-form JSON-serialisable info (seed, resolution, ...) written by exporters
            where the format allows.
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    metadata: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.vertices = torch.as_tensor(self.vertices)
        self.faces = torch.as_tensor(self.faces)
        if self.vertices.dim() != 2 or self.vertices.shape[1] != 3:
            raise ValueError(f"Mesh: vertices must be [V, 3], got {tuple(self.vertices.shape)}")
        if self.faces.dim() != 2 or self.faces.shape[1] != 3:
            raise ValueError(f"Mesh: faces must be [F, 3], got {tuple(self.faces.shape)}")
        if self.faces.is_floating_point():
            raise ValueError("Mesh: faces must be an integer tensor")
        if self.vertices.device != self.faces.device:
            raise ValueError(f"Mesh: vertices on {self.vertices.device} but faces on {self.faces.device}")
        self.vertices = self.vertices.float()
        self.faces = self.faces.long()

    @property
    def num_vertices(self) -> int:
        return self.vertices.shape[0]

    @property
    def num_faces(self) -> int:
        return self.faces.shape[0]

    @property
    def device(self) -> torch.device:
        return self.vertices.device

    def to(self, device) -> "Mesh":
        return Mesh(self.vertices.to(device), self.faces.to(device), dict(self.metadata))

    def cpu(self) -> "Mesh":
        return self.to("cpu")

    def validate(self) -> None:
        """Raise ValueError if a face index is out of range or a vertex is not finite."""
        if self.num_faces and (int(self.faces.min()) < 0 or int(self.faces.max()) >= self.num_vertices):
            raise ValueError(f"Mesh: face index out of range [0, {self.num_vertices})")
        if not bool(torch.isfinite(self.vertices).all()):
            raise ValueError("Mesh: vertices contain NaN or Inf")

    def face_normals(self) -> torch.Tensor:
        """Unit face normals ``[F, 3]`` from the winding (right-hand rule), zero for degenerate faces."""
        v = self.vertices[self.faces]
        n = torch.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1)
        return torch.nn.functional.normalize(n, dim=-1)

    def signed_volume(self) -> float:
        """Enclosed volume by the divergence theorem (positive for an outward-oriented closed mesh)."""
        v = self.vertices.double()[self.faces]
        return float((v[:, 0] * torch.cross(v[:, 1], v[:, 2], dim=-1)).sum() / 6.0)

    def area(self) -> float:
        v = self.vertices.double()[self.faces]
        return float(torch.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1).norm(dim=-1).sum() / 2.0)

    def to_trimesh(self):
        """A ``trimesh.Trimesh`` (same frame, no processing)."""
        import trimesh

        return trimesh.Trimesh(
            self.vertices.detach().cpu().numpy(), self.faces.detach().cpu().numpy(), process=False
        )
