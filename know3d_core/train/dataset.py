"""The prepared dataset as training samples (layout: ``know3d_core.data.layout``).

- :class:`DatasetIndex`: the manifest's ``ok`` assets of one split and their front/back pairs,
  checked up front (missing or mismatched files raise :class:`UsageError` naming the file, before
  any model loads), plus a content hash recorded in every exported checkpoint.
- :func:`epoch_micro_batches` / :class:`MicroBatchPlan`: token-budget batching. Each epoch is a
  seeded permutation of the samples, cut greedily into micro-batches of at most ``batch_size``
  samples and ``max_tokens`` tokens (the reference's ``max_tokens``); the plan is a pure function
  of (seed, epoch), so position ``g`` (the g-th micro-batch of the run) is the same for any number
  of processes.
- :class:`RankBatchSampler`: the micro-batches of one process from a given step on; the DataLoader
  (with worker processes) reads them. Micro-batch ``g`` of step ``s`` goes to rank ``g % world``
  at accumulation index ``(g // world) % accum``: 2 processes x 1 accumulation and 1 process x 2
  accumulations see the same micro-batches in each step.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open

from ..data import layout as L
from ..errors import UsageError

__all__ = [
    "Pair", "DatasetIndex", "tensor_shapes", "epoch_micro_batches", "MicroBatchPlan", "RankBatchSampler",
    "micro_generator", "read_tensors", "open_view",
]


@dataclass(frozen=True)
class Pair:
    """One front/back pair of one asset (``pairs.json`` entry ``index``)."""

    sha256: str
    folder: str
    index: int
    front: int
    back: int
    set: str
    annotations: Tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Stable id ``<sha256>_<index>`` (cache file names, per-pair seeds)."""
        return f"{self.sha256}_{self.index:03d}"

    def view(self, which: str) -> str:
        return os.path.join(self.folder, L.view_file(self.front if which == "front" else self.back))


def tensor_shapes(path: str) -> Dict[str, Tuple[int, ...]]:
    """``{key: shape}`` of a safetensors file from its header (no tensor is read)."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad dataset file
        raise UsageError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
                         "re-run 'know3d data prepare' for this asset") from None


def read_tensors(path: str, keys: Sequence[str]) -> List[torch.Tensor]:
    with safe_open(path, framework="pt", device="cpu") as f:
        return [f.get_tensor(k) for k in keys]


def open_view(path: str):
    """A view PNG as a PIL RGBA image (loaded, file closed)."""
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGBA")


def _read_json(path: str, what: str):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {path}; run 'know3d data prepare' on the dataset") from None
    except ValueError as exc:
        raise UsageError(f"{path}: unreadable JSON ({exc})") from None


@dataclass
class DatasetIndex:
    """The ``ok`` assets of one split and their pairs (of the given pair sets)."""

    root: str
    split: str
    rows: List[dict]
    pairs: List[Pair]
    digest: str
    sets: Tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def load(cls, root: str, split: str = "train", sets: Sequence[str] = (L.SET_3D, L.SET_3D_PERTURBED)
             ) -> "DatasetIndex":
        """Read ``manifest.jsonl`` and every listed asset's ``pairs.json``; raise ``UsageError``
        naming the file on anything missing or malformed."""
        root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(root):
            raise UsageError(f"--data {root}: no such folder (make one with 'know3d data prepare')")
        manifest = L.manifest_path(root)
        if not os.path.isfile(manifest):
            raise UsageError(f"--data {root}: no {L.MANIFEST_NAME}; is it a dataset made by 'know3d data prepare'?")
        rows = []
        with open(manifest, "r", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise UsageError(f"{manifest}:{line_no}: unreadable JSON row ({exc})") from None
                if row.get("status") == L.STATUS_OK and row.get("split", "train") == split:
                    rows.append(row)
        if not rows:
            raise UsageError(f"{manifest}: no '{L.STATUS_OK}' assets in split {split!r}")
        rows.sort(key=lambda r: r["sha256"])
        pairs: List[Pair] = []
        h = hashlib.sha256()
        for row in rows:
            sha = row["sha256"]
            folder = L.asset_dir(root, sha)
            if not os.path.isdir(folder):
                raise UsageError(f"{manifest} lists asset {sha} but {folder} does not exist")
            raw = _read_json(os.path.join(folder, L.PAIRS_FILE), "pairs file")
            if not isinstance(raw, list):
                raise UsageError(f"{os.path.join(folder, L.PAIRS_FILE)}: expected a JSON list of pairs")
            for i, p in enumerate(raw):
                try:
                    pair = Pair(sha, folder, i, L.view_index(p["front"]), L.view_index(p["back"]), str(p["set"]),
                                tuple(str(a) for a in p.get("annotations") or ()))
                except (KeyError, TypeError, ValueError) as exc:
                    raise UsageError(f"{os.path.join(folder, L.PAIRS_FILE)}: pair {i} lacks front/back/set ({exc})") from None
                if pair.set in sets:
                    pairs.append(pair)
            h.update(json.dumps([sha, raw], sort_keys=True).encode())
        if not pairs:
            raise UsageError(f"--data {root}: no pairs of the sets {list(sets)} in split {split!r}")
        return cls(root, split, rows, pairs, h.hexdigest()[:16], tuple(sets))

    def asset_file(self, sha256: str, name: str) -> str:
        return os.path.join(L.asset_dir(self.root, sha256), name)

    def check_views(self) -> None:
        """Every pair's front and back PNG exists."""
        for pair in self.pairs:
            for which in ("front", "back"):
                path = pair.view(which)
                if not os.path.isfile(path):
                    raise UsageError(f"{path}: {which} view of pair {pair.index} of asset {pair.sha256} is missing; "
                                     "re-run 'know3d data prepare' (render step)")

    def check_latents(self, name: str, expect: Dict[str, Tuple[Optional[int], ...]], hint: str) -> Dict[str, int]:
        """Every asset has ``name`` with the keys/shapes of ``expect`` (None = any size; the same
        None-dim must agree between keys). Returns ``{sha256: size of the first None-dim}`` (token
        counts of sparse latents; 1 for dense)."""
        sizes = {}
        for row in self.rows:
            path = self.asset_file(row["sha256"], name)
            if not os.path.isfile(path):
                raise UsageError(f"{path} is missing; {hint}")
            shapes = tensor_shapes(path)
            n = None
            for key, want in expect.items():
                got = shapes.get(key)
                if got is None:
                    raise UsageError(f"{path}: no tensor {key!r} (has {sorted(shapes)}); {hint}")
                free = [g for g, w in zip(got, want) if w is None]
                ok = len(got) == len(want) and all(w is None or g == w for g, w in zip(got, want))
                if ok and free:
                    ok = n is None or free[0] == n
                    n = free[0]
                if not ok:
                    shown = tuple("N" if w is None else w for w in want)
                    raise UsageError(f"{path}: {key!r} has shape {list(got)}, this run needs {list(shown)}; {hint}")
            sizes[row["sha256"]] = 1 if n is None else int(n)
        return sizes


def epoch_micro_batches(tokens: Sequence[int], batch_size: int, max_tokens: int, seed: int, epoch: int
                        ) -> List[List[int]]:
    """One epoch: a seeded permutation of ``range(len(tokens))`` cut greedily into micro-batches of at
    most ``batch_size`` samples and ``max_tokens`` tokens (a sample above ``max_tokens`` alone)."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (1 << 62))
    order = torch.randperm(len(tokens), generator=gen).tolist()
    out, cur, used = [], [], 0
    for i in order:
        t = int(tokens[i])
        if cur and (len(cur) >= batch_size or used + t > max_tokens):
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += t
    if cur:
        out.append(cur)
    return out


class MicroBatchPlan:
    """The run's micro-batch sequence: epoch after epoch of :func:`epoch_micro_batches`."""

    def __init__(self, tokens: Sequence[int], batch_size: int, max_tokens: int, seed: int):
        over = [i for i, t in enumerate(tokens) if t > max_tokens]
        if over:
            raise UsageError(f"sample {over[0]} has {tokens[over[0]]} tokens, more than --max-tokens {max_tokens}; "
                             "raise --max-tokens")
        self.tokens = [int(t) for t in tokens]
        self.batch_size = int(batch_size)
        self.max_tokens = int(max_tokens)
        self.seed = int(seed)
        self._epochs: Dict[int, List[List[int]]] = {}
        self._starts: List[int] = [0]  # first global micro index of each epoch computed so far

    def _epoch(self, e: int) -> List[List[int]]:
        if e not in self._epochs:
            self._epochs = {k: v for k, v in self._epochs.items() if k >= e - 1}
            self._epochs[e] = epoch_micro_batches(self.tokens, self.batch_size, self.max_tokens, self.seed, e)
        return self._epochs[e]

    def locate(self, g: int) -> Tuple[int, int]:
        """Global micro index -> (epoch, index within the epoch)."""
        while self._starts[-1] <= g:
            self._starts.append(self._starts[-1] + len(self._epoch(len(self._starts) - 1)))
        e = bisect.bisect_right(self._starts, g) - 1
        return e, g - self._starts[e]

    def __getitem__(self, g: int) -> List[int]:
        e, j = self.locate(g)
        return self._epoch(e)[j]


class RankBatchSampler:
    """Batch sampler of one process: its micro-batches for steps ``start_step, start_step + 1, ...``."""

    def __init__(self, plan: MicroBatchPlan, rank: int, world: int, accum: int, start_step: int,
                 end_step: int):
        self.plan, self.rank, self.world, self.accum = plan, rank, world, accum
        self.start_step, self.end_step = start_step, end_step

    def global_index(self, step: int, a: int) -> int:
        return step * self.world * self.accum + a * self.world + self.rank

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(self.start_step, self.end_step):
            for a in range(self.accum):
                yield list(self.plan[self.global_index(step, a)])

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step) * self.accum


def micro_generator(seed: int, g: int) -> torch.Generator:
    """The CPU generator of global micro-batch ``g`` (noise, t, condition dropout)."""
    return torch.Generator().manual_seed((int(seed) * 7_919 + 104_729 * int(g) + 1) % (1 << 62))


def pair_seed(seed: int, key: str) -> int:
    """A per-pair seed (back-view sampling noise, knowledge noise): stable across runs and processes."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16)
