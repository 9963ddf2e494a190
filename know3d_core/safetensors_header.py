"""The header of a ``.safetensors`` file (names, dtypes, shapes, metadata) without its tensors, and
why a file is unusable (not safetensors, truncated). Torch-free: the model check and the loaders
read headers through it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["SafetensorsInfo", "read_safetensors_header"]


@dataclass
class SafetensorsInfo:
    """Header of a safetensors file: ``keys`` -> (dtype, shape), ``metadata``, ``problem`` (None if sound)."""

    path: str
    tensors: Dict[str, Tuple[str, Tuple[int, ...]]]
    metadata: Dict[str, str]
    problem: Optional[str] = None


def read_safetensors_header(path: str) -> SafetensorsInfo:
    """Read only the header (``safetensors.safe_open``, no tensor data); ``problem`` says why the file
    is unusable (not safetensors, truncated: the data its header lists runs past the end)."""
    from safetensors import SafetensorError, safe_open

    try:
        size = os.path.getsize(path)
        if size < 8:
            return SafetensorsInfo(path, {}, {}, "not a safetensors file (shorter than 8 bytes)")
        with safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            slices = {key: f.get_slice(key) for key in f.keys()}
            tensors = {key: (sl.get_dtype(), tuple(sl.get_shape())) for key, sl in slices.items()}
    except OSError as e:
        return SafetensorsInfo(path, {}, {}, f"cannot be read: {e.strerror or e}")
    except SafetensorError as e:
        if "not fully covered" in str(e):  # the tensors listed end past (or before) the file's end
            return SafetensorsInfo(path, {}, {}, f"truncated or damaged: its header lists data that {size} bytes "
                                                 "do not hold (an interrupted download? download it again)")
        return SafetensorsInfo(path, {}, {}, f"not a safetensors file ({' '.join(str(e).split())})")
    return SafetensorsInfo(path, tensors, {str(k): str(v) for k, v in metadata.items()})
