"""Neighbour map and tile layout of a submanifold conv in a few Triton launches (CUDA).

The PyTorch build (:func:`know3d_core.sparse.conv.build_neighbour_map` plus
:func:`know3d_core.sparse.conv_triton.tile_layout`) issues a few hundred small launches per
coordinate set (one lookup, compare and copy per kernel offset, per-offset pattern bits and tile
flags), which cost 6-13 ms per structure on an H200 (issue 21). Here (the idea of FlexGEMM's build):

1. an insert kernel puts every voxel's key (its cell on the grid padded by the kernel reach, as in the
   PyTorch build) into an open-addressing hash table (linear probing, ``atomic_cas``);
2. a lookup kernel writes ``nbr [N, K]`` (missing = N). By default the symmetric half lookup
   (:func:`_hash_insert_kernel`, :func:`_hash_lookup_half_flat_kernel`, :func:`_pattern_bits_kernel`:
   offsets before the centre only, each hit also writing its mirror entry; int32 keys packed with the
   row into int64 slots when the batch size is known); else the full lookup
   (:func:`_hash_insert_kernel`, :func:`_hash_lookup_kernel`: all ``K`` offsets, int64 keys). For
   ``K <= 31`` each row's pattern bits come with it (bit v: the neighbour at offset v exists);
3. after one stable sort of the pattern bits (torch), :func:`_tile_layout_kernel` writes the
   implicit GEMM's :class:`~know3d_core.sparse.conv_triton.TileLayout`: the ``[K, N]`` neighbour
   table in sorted row order, the sorted rows, and per tile the active offsets (OR of the tile's
   pattern bits, listed ascending, then the inactive ones) and their count.

:func:`children_triton` writes a subdivision's child coords and source rows in one launch (the
channel-to-space blocks; on by default, measured 10x faster than the PyTorch ops on an H100:
``CHILDREN_BY_DEFAULT``, :func:`set_triton_children`); :func:`child_map_triton` derives the children's
3x3x3 map from their parents' map in one launch (:mod:`.child_maps`; off until timed:
``CHILD_MAPS_BY_DEFAULT``). Results are identical to the PyTorch build and ops (tests/test_neighbour_triton.py,
tests/test_child_maps.py). Inference helper only: integer outputs, nothing to differentiate.
"""
from __future__ import annotations

from typing import ContextManager, Optional, Sequence, Tuple

import torch

from .kernel_dispatch import KernelSwitch
from .triton_launch import TritonLauncher, in_int32

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

__all__ = ["available", "use_triton_maps", "build_neighbour_map_triton", "tile_layout_triton", "child_tile_flags",
           "children_available", "children_triton", "use_triton_children", "set_triton_children", "CHILDREN_BY_DEFAULT",
           "child_maps_available", "child_map_triton", "use_triton_child_maps", "set_triton_child_maps",
           "CHILD_MAPS_BY_DEFAULT"]

BLOCK_INSERT = 256
BLOCK_LOOKUP = 16  # voxels per program (x 32 offset lanes): the probe loop runs to the program's longest probe
LOOKUP_WARPS = 4
# Hash table of next_pow2(SLOTS_PER_VOXEL * N) slots (load <= 1/8: short probes; measured on an H100,
# session5/NOTES.md: 1M voxels 0.76 ms with 16 voxels per program vs 0.98 ms at 4 voxels and load 1/4,
# 1.8 ms at load 1/2); LARGE_SLOTS_PER_VOXEL above LARGE_BUILD voxels (the 1024 decoder's last level:
# a table of ~200 MB, as measured there).
SLOTS_PER_VOXEL = 8
LARGE_SLOTS_PER_VOXEL = 2
LARGE_BUILD = 1 << 21
# Load each probed slot's value together with its key (two independent loads, one memory round trip
# per probe) instead of after the key matched (two dependent ones); misses read a value they drop.
# Off: measured slower on the H100 (1M voxels 0.779 vs 0.762 ms, 200k 0.177 vs 0.169; session6/NOTES.md).
EAGER_VALUES = False
# Symmetric half lookup (the idea of FlexGEMM's build): a submanifold map is symmetric (j is i's
# neighbour at offset v exactly when i is j's at K-1-v), so each voxel looks up the offsets before the
# centre only and also writes its mirror entry into the neighbour's row: 13 probes a voxel instead of 26.
# With it, keys are int32 when the padded grid (times the batch) has fewer than 2^31 cells, packed with
# the row into one int64 slot. On: exact on CUDA (tests/test_neighbour_triton.py, every variant below) and
# measured on an H100 (session 11): map 0.545 against 0.802 ms at 1M voxels, 0.163 against 0.193 ms at
# 200k; the 1024 decoder 165.8 against 171.4 ms (512: 76.1 against 76.6, within the run's 1.3 ms noise).
# :func:`use_half_lookup` for A/B runs.
HALF_LOOKUP_BY_DEFAULT = True
# The half lookup's table and launch (A/B knobs, benchmarks/bench_vs_reference.py MAP_VARIANTS):
# - PACKED_TABLE: with int32 keys, one int64 slot holds ``key << 32 | row`` (one load per probe, one CAS
#   per insert, no separate row array); off (or batch size unknown): int64 keys plus an int32 row array;
# - HALF_SLOTS_PER_VOXEL: table of next_pow2(this * N) slots (FlexGEMM: 2 N, load 1/2);
# - HALF_BLOCK / HALF_WARPS: (voxel, offset) pairs per program, laid out flat (K // 2 + 1 per voxel, no
#   padding lanes) and warps per program; the probe loop runs to the program's longest probe.
# - HALF_INSERT_BLOCK / HALF_INSERT_WARPS: voxels and warps per program of its insert; the CAS loop runs
#   to the program's longest probe, so one warp a program retires like CUDA threads do;
# - HALF_FILL_IN_INSERT: the insert also sets its voxels' rows of ``nbr`` to N (else one fill before).
# Measured on an H100 (session 11, bench_vs_reference.py, 1M shell voxels): map 0.487 ms with these
# against 0.545 (insert 256 voxels / 4 warps), 0.541 (lookup 64 lanes / 2 warps), 0.654 (unpacked),
# 0.802 (full lookup); FlexGEMM 0.363. Kernel time of the insert 121 us against 183 us.
PACKED_TABLE = True
HALF_SLOTS_PER_VOXEL = 4
HALF_BLOCK = 256
HALF_WARPS = 4
HALF_INSERT_BLOCK = 32
HALF_INSERT_WARPS = 1
HALF_FILL_IN_INSERT = True
# HALF_BITS_IN_LOOKUP: the pattern bits ORed in by the lookup's hits (two relaxed atomics a hit; the insert
# starts each voxel's bits) instead of a pass over ``nbr`` after it (41 us of 487 at 1M voxels, and one of the
# three Triton launches that bound the 200k build, session 11). Exact in the interpreter; off until timed
# (the ``half_bits_in_lookup`` variant of benchmarks/bench_vs_reference.py).
HALF_BITS_IN_LOOKUP = False
_switch = KernelSwitch(True)
_half_switch = KernelSwitch(HALF_LOOKUP_BY_DEFAULT)


def available(coords: torch.Tensor) -> bool:
    """Triton present, ``coords`` on CUDA and the switch on (:func:`use_triton_maps`)."""
    return _switch.enabled and triton is not None and coords.is_cuda


def use_triton_maps(enabled: bool) -> ContextManager[None]:
    """Context manager: build neighbour maps with these kernels (default) or the PyTorch ops (A/B)."""
    return _switch.use(enabled)


def use_half_lookup(enabled: bool) -> ContextManager[None]:
    """Context manager: the symmetric half lookup (``HALF_LOOKUP_BY_DEFAULT``) on or off inside the block."""
    return _half_switch.use(enabled)


# On: measured on an H100 (session 9, benchmarks/bench_neighbour_map.py, baseline torch_children): 0.36 ms
# against 3.49 ms for the PyTorch ops at 1.25 M parents; the decoder 86.2 / 181.7 ms against 87.6 / 184.1 ms
# at 512 / 1024; same coords. Its CUDA test passed on an H200 (benchmarks/results/session8/cuda_all_h200.log).
CHILDREN_BY_DEFAULT = True
_children_switch = KernelSwitch(CHILDREN_BY_DEFAULT)


def set_triton_children(enabled: bool) -> None:
    """Switch :func:`children_triton` on or off for the rest of the process (see ``CHILDREN_BY_DEFAULT``)."""
    _children_switch.set(enabled)


def children_available(coords: torch.Tensor) -> bool:
    """:func:`children_triton` may run on ``coords`` (Triton present, contiguous int32 coords on CUDA,
    its switch on: :func:`use_triton_children`)."""
    return (_children_switch.enabled and triton is not None and coords.is_cuda and coords.dtype == torch.int32
            and coords.is_contiguous())


def use_triton_children(enabled: bool) -> ContextManager[None]:
    """Context manager: subdivision children with :func:`children_triton` or the PyTorch ops inside the block."""
    return _children_switch.use(enabled)


if triton is not None:

    @triton.jit
    def _hash(key, mask):
        """Slot of an int64 key (xor-shift multiply mix, then the low bits)."""
        h = key ^ (key >> 17)
        h = h * 0x45D9F3B
        h = h ^ (h >> 15)
        h = h * 0x2C1B3C6D
        h = h ^ (h >> 13)
        return h & mask

    @triton.jit
    def _hash32(key, mask):
        """Slot of a non-negative int32 key (32-bit murmur3 finaliser on the unsigned bits, then the low bits)."""
        h = key.to(tl.uint32, bitcast=True)
        h = h ^ (h >> 16)
        h = h * 0x85EBCA6B
        h = h ^ (h >> 13)
        h = h * 0xC2B2AE35
        h = h ^ (h >> 16)
        return h.to(tl.int32, bitcast=True) & mask

    @triton.jit
    def _voxel_keys(coords_ptr, i, ok, X, Y, Z, pad, KEY32: tl.constexpr):
        """Keys of voxels ``i`` on the padded grid ``(X, Y, Z)`` (each side padded by ``pad``): int64, or
        int32 with ``KEY32`` (the caller checked that ``batch * X * Y * Z < 2^31``)."""
        base = coords_ptr + i.to(tl.int64) * 4
        b = tl.load(base, mask=ok, other=0)
        x = tl.load(base + 1, mask=ok, other=0)
        y = tl.load(base + 2, mask=ok, other=0)
        z = tl.load(base + 3, mask=ok, other=0)
        if not KEY32:
            b, x, y, z = b.to(tl.int64), x.to(tl.int64), y.to(tl.int64), z.to(tl.int64)
        return ((b * X + x + pad) * Y + y + pad) * Z + z + pad

    @triton.jit
    def _fill_rows(nbr_ptr, i, ok, N, K, KP: tl.constexpr):
        """Rows ``i`` of ``nbr [N, K]`` set to N (missing); ``KP``: a power of two >= K."""
        v = tl.arange(0, KP)
        tl.store(nbr_ptr + i.to(tl.int64)[:, None] * K + v[None, :], tl.full((i.shape[0], KP), N, tl.int32),
                 mask=ok[:, None] & (v < K)[None, :])

    @triton.jit(do_not_specialize=["N", "X", "Y", "Z", "pad", "mask", "K"])
    def _hash_insert_kernel(coords_ptr, keys_ptr, vals_ptr, nbr_ptr, bits_ptr, N, X, Y, Z, pad, mask, K,
                            BLOCK: tl.constexpr, KP: tl.constexpr, FILL: tl.constexpr, PACKED: tl.constexpr,
                            BITS: tl.constexpr):
        """Voxels ``i`` into the table of int64 slots (empty = -1): int64 keys and int32 rows ``vals``, or with
        ``PACKED`` int32 keys packed as ``key << 32 | i`` (``vals_ptr`` unused). ``FILL``: also their rows of
        ``nbr [N, K]`` set to N (``KP``: a power of two >= K; unused otherwise). ``BITS``: their pattern bits
        started as the centre's alone (the half lookup ORs in the rest)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < N
        if FILL:
            _fill_rows(nbr_ptr, i, ok, N, K, KP)
        if BITS:
            tl.store(bits_ptr + i, tl.full((BLOCK,), 1, tl.int32) << (K // 2), mask=ok)
        key = _voxel_keys(coords_ptr, i, ok, X, Y, Z, pad, PACKED)
        if PACKED:
            slot = _hash32(key, mask)
            entry = (key.to(tl.int64) << 32) | i.to(tl.int64)
        else:
            slot = _hash(key, mask)
            entry = key
        active = ok
        empty = tl.full((BLOCK,), -1, tl.int64)
        never = tl.full((BLOCK,), -2, tl.int64)  # no slot holds -2: a compare that never swaps
        while tl.max(active.to(tl.int32), axis=0) > 0:
            # atomic_cas takes no mask: finished lanes compare their own slot against -2 (no write,
            # no shared address to contend for)
            prev = tl.atomic_cas(keys_ptr + slot, tl.where(active, empty, never), tl.where(active, entry, never))
            if PACKED:
                done = active & ((prev == -1) | ((prev >> 32) == key))
            else:
                done = active & ((prev == -1) | (prev == key))
                tl.store(vals_ptr + slot, i, mask=done)
            active = active & (~done)
            slot = tl.where(active, (slot + 1) & mask, slot)

    @triton.jit(do_not_specialize=["N", "X", "Y", "Z", "pad", "mask", "K", "ksize", "dilation"])
    def _hash_lookup_kernel(coords_ptr, keys_ptr, vals_ptr, nbr_ptr, bits_ptr,
                            N, X, Y, Z, pad, mask, K, ksize, dilation,
                            BLOCK: tl.constexpr, KP: tl.constexpr, BITS: tl.constexpr, EAGER: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < N
        key = _voxel_keys(coords_ptr, i, ok, X, Y, Z, pad, False)
        v = tl.arange(0, KP)
        v_ok = v < K
        r = ksize // 2
        dx = (v // (ksize * ksize) - r) * dilation
        dy = ((v // ksize) % ksize - r) * dilation
        dz = (v % ksize - r) * dilation
        delta = (dx.to(tl.int64) * Y + dy) * Z + dz
        target = key[:, None] + delta[None, :]
        slot = _hash(target, mask)
        active = ok[:, None] & v_ok[None, :]
        res = tl.full((BLOCK, KP), N, tl.int32)
        while tl.max(tl.max(active.to(tl.int32), axis=1), axis=0) > 0:
            k = tl.load(keys_ptr + slot, mask=active, other=-1)
            if EAGER:
                val = tl.load(vals_ptr + slot, mask=active, other=0)
                hit = active & (k == target)
            else:
                hit = active & (k == target)
                val = tl.load(vals_ptr + slot, mask=hit, other=0)
            res = tl.where(hit, val, res)
            active = active & (k != -1) & (~hit)  # an empty slot ends the probe: not present
            slot = (slot + 1) & mask
        tl.store(nbr_ptr + i.to(tl.int64)[:, None] * K + v[None, :], res, mask=ok[:, None] & v_ok[None, :])
        if BITS:
            bits = tl.sum(tl.where((res < N) & v_ok[None, :], 1 << v[None, :], 0), axis=1)
            tl.store(bits_ptr + i, bits, mask=ok)

    @triton.jit(do_not_specialize=["N", "X", "Y", "Z", "pad", "mask", "K", "ksize", "dilation"])
    def _hash_lookup_half_flat_kernel(coords_ptr, keys_ptr, vals_ptr, nbr_ptr, bits_ptr, N, X, Y, Z, pad, mask, K,
                                      ksize, dilation, BLOCK: tl.constexpr, PACKED: tl.constexpr,
                                      BITS: tl.constexpr):
        """The symmetric half lookup, one lane per (voxel ``i``, offset ``v <= K // 2``) pair laid out flat:
        offsets ``v < K // 2`` looked up, the centre written as the voxel itself, and for each hit ``j``
        the mirror entry ``nbr[j, K - 1 - v] = i``; ``nbr [N, K]`` must hold N (missing) before (the
        insert fills it: ``HALF_FILL_IN_INSERT``). ``PACKED``: ``keys_ptr`` is the packed table of int32
        keys hashed with :func:`_hash32` (``vals_ptr`` unused); else int64 keys and int32 rows. ``BITS``: each
        hit also ORs bit v into ``bits[i]`` and bit ``K - 1 - v`` into ``bits[j]`` (started by the insert)."""
        H = K // 2 + 1
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        i = (e // H).to(tl.int32)
        v = (e % H).to(tl.int32)
        ok = i < N
        c = K // 2
        r = ksize // 2
        dx = (v // (ksize * ksize) - r) * dilation
        dy = ((v // ksize) % ksize - r) * dilation
        dz = (v % ksize - r) * dilation
        key = _voxel_keys(coords_ptr, i, ok, X, Y, Z, pad, PACKED)
        if PACKED:
            target = key + (dx * Y + dy) * Z + dz
            slot = _hash32(target, mask)
        else:
            target = key + (dx.to(tl.int64) * Y + dy) * Z + dz
            slot = _hash(target, mask)
        active = ok & (v < c)
        res = tl.full((BLOCK,), N, tl.int32)
        while tl.max(active.to(tl.int32), axis=0) > 0:
            if PACKED:
                p = tl.load(keys_ptr + slot, mask=active, other=-1)
                hit = active & ((p >> 32).to(tl.int32) == target)
                res = tl.where(hit, p.to(tl.int32), res)  # the low 32 bits: the row
                gone = p == -1
            else:
                k = tl.load(keys_ptr + slot, mask=active, other=-1)
                hit = active & (k == target)
                res = tl.where(hit, tl.load(vals_ptr + slot, mask=hit, other=0), res)
                gone = k == -1
            active = active & (~gone) & (~hit)  # an empty slot ends the probe: not present
            slot = (slot + 1) & mask
        res = tl.where(v == c, i, res)
        tl.store(nbr_ptr + i.to(tl.int64) * K + v, res, mask=ok)
        found = ok & (v < c) & (res < N)
        tl.store(nbr_ptr + res.to(tl.int64) * K + (K - 1 - v), i, mask=found)
        if BITS:
            one = tl.full((BLOCK,), 1, tl.int32)
            tl.atomic_or(bits_ptr + i, one << v, mask=found, sem="relaxed")
            tl.atomic_or(bits_ptr + res, one << (K - 1 - v), mask=found, sem="relaxed")

    @triton.jit(do_not_specialize=["N", "K"])
    def _pattern_bits_kernel(nbr_ptr, bits_ptr, N, K, BLOCK: tl.constexpr, KP: tl.constexpr):
        """``bits[i]``: bit v set where ``nbr[i, v]`` exists (K <= 31)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < N
        v = tl.arange(0, KP)
        both = ok[:, None] & (v < K)[None, :]
        row = tl.load(nbr_ptr + i.to(tl.int64)[:, None] * K + v[None, :], mask=both, other=N)
        tl.store(bits_ptr + i, tl.sum(tl.where(row < N, 1 << v[None, :], 0), axis=1), mask=ok)

    @triton.jit
    def _or(a, b):
        return a | b

    @triton.jit(do_not_specialize=["N", "K"])
    def _tile_layout_kernel(nbr_ptr, order_ptr, bits_ptr, nbr_sorted_ptr, rows_ptr, offsets_ptr, counts_ptr,
                            N, K, BM: tl.constexpr, KP: tl.constexpr):
        t = tl.program_id(0)
        pos = t * BM + tl.arange(0, BM)
        ok = pos < N
        v = tl.arange(0, KP)
        v_ok = v < K
        src = tl.load(order_ptr + pos, mask=ok, other=0).to(tl.int64)
        both = ok[:, None] & v_ok[None, :]
        tile = tl.load(nbr_ptr + src[:, None] * K + v[None, :], mask=both, other=0)
        tl.store(nbr_sorted_ptr + v[None, :].to(tl.int64) * N + pos[:, None], tile, mask=both)
        tl.store(rows_ptr + pos, src.to(tl.int32), mask=ok)
        bits = tl.load(bits_ptr + pos, mask=ok, other=0)
        _store_tile_offsets(bits, t, offsets_ptr, counts_ptr, K, KP)

    @triton.jit
    def _store_tile_offsets(bits, t, offsets_ptr, counts_ptr, K, KP: tl.constexpr):
        """Tile t's active offsets (OR of its rows' pattern ``bits``) ascending, then the rest; the count."""
        v = tl.arange(0, KP)
        v_ok = v < K
        tile_bits = tl.reduce(bits, 0, _or)
        act = ((tile_bits >> v) & 1) * v_ok.to(tl.int32)
        ca = tl.cumsum(act, 0)
        count = tl.sum(act, axis=0)
        slot = tl.where(act == 1, ca - 1, count + v - ca)  # active offsets first, then the rest
        tl.store(offsets_ptr + t * K + slot, v, mask=v_ok)
        tl.store(counts_ptr + t, count)

    @triton.jit(do_not_specialize=["N", "K"])
    def _child_tile_kernel(par_ptr, bits_ptr, offsets_ptr, counts_ptr, N, K, BM: tl.constexpr, KP: tl.constexpr):
        t = tl.program_id(0)
        par = tl.load(par_ptr + t * BM + tl.arange(0, BM))  # padded to whole tiles; N = padding
        bits = tl.load(bits_ptr + par, mask=par < N, other=0)
        _store_tile_offsets(bits, t, offsets_ptr, counts_ptr, K, KP)


if triton is not None:  # direct launches (kernels of the default build; the full lookup stays the A/B baseline)
    _insert_launch = TritonLauncher(_hash_insert_kernel)
    _half_lookup_launch = TritonLauncher(_hash_lookup_half_flat_kernel)
    _pattern_bits_launch = TritonLauncher(_pattern_bits_kernel)
    _tile_layout_launch = TritonLauncher(_tile_layout_kernel)
    _child_tiles_launch = TritonLauncher(_child_tile_kernel)


def build_neighbour_map_triton(
    coords: torch.Tensor, spatial_shape: Sequence[int], kernel_size: int = 3, dilation: int = 1,
    batch_size: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(nbr [N, K] int32 (missing = N), bits [N] int32 or None)``; as
    :func:`know3d_core.sparse.conv.build_neighbour_map`, plus the pattern bits when ``K <= 31``.
    ``batch_size`` (known without a host sync, or None): with the half lookup, int32 keys in a packed
    table (``PACKED_TABLE``) when ``batch_size`` times the padded grid's cells fit."""
    N = coords.shape[0]
    K = kernel_size ** 3
    device = coords.device
    nbr = torch.empty((N, K), dtype=torch.int32, device=device)
    with_bits = K <= 31
    bits = torch.empty(N, dtype=torch.int32, device=device) if with_bits else None
    if N == 0:
        return nbr, bits
    if N >= 2**30:
        raise ValueError(f"neighbour map: {N} voxels exceed the int32 row indices")
    coords = coords.to(torch.int32).contiguous()
    pad = dilation * (kernel_size // 2)
    X, Y, Z = (int(s) + 2 * pad for s in spatial_shape)
    if _half_switch.enabled:
        key32 = batch_size is not None and batch_size * X * Y * Z < 2**31 - 1
        return _build_half(coords, nbr, bits, X, Y, Z, pad, kernel_size, dilation, key32)
    slots = triton.next_power_of_2((SLOTS_PER_VOXEL if N <= LARGE_BUILD else LARGE_SLOTS_PER_VOXEL) * N)
    keys = torch.full((slots,), -1, dtype=torch.int64, device=device)
    vals = torch.empty(slots, dtype=torch.int32, device=device)
    _hash_insert_kernel[(triton.cdiv(N, BLOCK_INSERT),)](
        coords, keys, vals, nbr, nbr, N, X, Y, Z, pad, slots - 1, K, BLOCK=BLOCK_INSERT, KP=1, FILL=False,
        PACKED=False, BITS=False, num_warps=4)
    _hash_lookup_kernel[(triton.cdiv(N, BLOCK_LOOKUP),)](
        coords, keys, vals, nbr, bits if with_bits else nbr, N, X, Y, Z, pad, slots - 1, K, kernel_size, dilation,
        BLOCK=BLOCK_LOOKUP, KP=triton.next_power_of_2(K), BITS=with_bits, EAGER=EAGER_VALUES, num_warps=LOOKUP_WARPS)
    return nbr, bits


def _build_half(coords, nbr, bits, X: int, Y: int, Z: int, pad: int, kernel_size: int, dilation: int, key32: bool):
    """The symmetric half lookup's build into ``nbr`` (and ``bits`` when not None); ``key32``: int32 hash keys."""
    N, K = nbr.shape
    per_voxel = HALF_SLOTS_PER_VOXEL if N <= LARGE_BUILD else min(HALF_SLOTS_PER_VOXEL, LARGE_SLOTS_PER_VOXEL)
    slots = triton.next_power_of_2(per_voxel * N)
    packed = PACKED_TABLE and key32
    keys = torch.full((slots,), -1, dtype=torch.int64, device=coords.device)
    fill = HALF_FILL_IN_INSERT
    KP = triton.next_power_of_2(K) if fill else 1
    if not fill:
        nbr.fill_(N)
    vals = keys if packed else torch.empty(slots, dtype=torch.int32, device=coords.device)
    bits_in_lookup = bits is not None and HALF_BITS_IN_LOOKUP
    bits_arg = bits if bits_in_lookup else nbr
    spec = (in_int32(N * K, X * Y * Z, slots),)  # every int argument is do_not_specialize: only its width
    _insert_launch(triton.cdiv(N, HALF_INSERT_BLOCK),
                   [coords, keys, vals, nbr, bits_arg, N, X, Y, Z, pad, slots - 1, K], spec,
                   {"BLOCK": HALF_INSERT_BLOCK, "KP": KP, "FILL": fill, "PACKED": packed, "BITS": bits_in_lookup},
                   HALF_INSERT_WARPS)
    H = K // 2 + 1
    _half_lookup_launch(triton.cdiv(N * H, HALF_BLOCK),
                        [coords, keys, vals, nbr, bits_arg, N, X, Y, Z, pad, slots - 1, K, kernel_size, dilation],
                        spec, {"BLOCK": HALF_BLOCK, "PACKED": packed, "BITS": bits_in_lookup}, HALF_WARPS)
    if bits is not None and not bits_in_lookup:
        _pattern_bits_launch(triton.cdiv(N, 64), [nbr, bits, N, K], spec,
                             {"BLOCK": 64, "KP": triton.next_power_of_2(K)}, 4)
    return nbr, bits


def tile_layout_triton(nbr: torch.Tensor, bits: torch.Tensor, bm: int):
    """:class:`~know3d_core.sparse.conv_triton.TileLayout` of ``nbr [N, K]`` from its pattern bits
    (one stable sort + one launch); equal to ``conv_triton.tile_layout(nbr, bm)``."""
    from .conv_triton import TileLayout

    N, K = nbr.shape
    device = nbr.device
    T = -(-N // bm)
    bits_sorted, order = torch.sort(bits, stable=True)
    nbr_sorted = torch.empty((K, N), dtype=torch.int32, device=device)
    rows = torch.empty(N, dtype=torch.int32, device=device)
    offsets = torch.empty((T, K), dtype=torch.int32, device=device)
    counts = torch.empty(T, dtype=torch.int32, device=device)
    if N:
        _tile_layout_launch(T, [nbr, order, bits_sorted, nbr_sorted, rows, offsets, counts, N, K], (in_int32(N * K),),
                            {"BM": bm, "KP": triton.next_power_of_2(K)}, 4)
    return TileLayout(bm, T, rows, nbr_sorted, offsets, counts)


def child_tile_flags(parents: torch.Tensor, bits: torch.Tensor, N: int, K: int, bm: int):
    """``(offsets [T, K] int32, counts [T] int32)`` of a child tile layout (``parents [T * bm]``, N =
    padding; parent pattern ``bits [N]``): one launch, for :func:`.conv_triton.child_tile_layout`."""
    T = parents.shape[0] // bm
    offsets = torch.empty((T, K), dtype=torch.int32, device=parents.device)
    counts = torch.empty(T, dtype=torch.int32, device=parents.device)
    if T:
        _child_tiles_launch(T, [parents, bits, offsets, counts, N, K], (in_int32(N),),
                            {"BM": bm, "KP": triton.next_power_of_2(K)}, 4)
    return offsets, counts


if triton is not None:

    @triton.jit(do_not_specialize=["n"])
    def _children_kernel(coords_ptr, pk_ptr, out_ptr, src_ptr, n, BLOCK: tl.constexpr):
        """Child ``i`` of ``pk [n, 2]`` (parent row, child k): coords ``(b, 2x + k&1, 2y + k>>1&1,
        2z + k>>2&1)`` of its parent's ``(b, x, y, z)``, and ``src = parent * 8 + k``."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        p = tl.load(pk_ptr + 2 * i, mask=ok, other=0)
        k = tl.load(pk_ptr + 2 * i + 1, mask=ok, other=0)
        base = coords_ptr + p * 4
        dst = out_ptr + i * 4
        tl.store(dst, tl.load(base, mask=ok, other=0), mask=ok)
        tl.store(dst + 1, (tl.load(base + 1, mask=ok, other=0) * 2 + (k & 1)).to(tl.int32), mask=ok)
        tl.store(dst + 2, (tl.load(base + 2, mask=ok, other=0) * 2 + ((k >> 1) & 1)).to(tl.int32), mask=ok)
        tl.store(dst + 3, (tl.load(base + 3, mask=ok, other=0) * 2 + ((k >> 2) & 1)).to(tl.int32), mask=ok)
        tl.store(src_ptr + i, p * 8 + k, mask=ok)


BLOCK_CHILDREN = 512
if triton is not None:
    _children_launch = TritonLauncher(_children_kernel)


def children_triton(coords: torch.Tensor, pk: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Children of a subdivision in one launch: ``coords [N, 4]`` int32 (b, x, y, z) of the parents and
    ``pk [N', 2]`` int64 (parent row, child k; ``mask.nonzero()`` of the ``[N, 8]`` mask) ->
    ``(child coords [N', 4] int32, src [N'] int64 = parent * 8 + k)``, equal to the PyTorch ops of
    :func:`know3d_core.sparse.spatial._subdivide` (which index rows through ``index_select``: 2.9 ms
    for 1.2 M -> 4.9 M rows in the H100 profile of the 1024 decoder, session6/NOTES.md)."""
    if triton is None:
        raise RuntimeError("children_triton needs Triton")
    if coords.dtype != torch.int32 or coords.dim() != 2 or coords.shape[1] != 4 or not coords.is_contiguous():
        raise ValueError(f"children_triton: coords must be contiguous int32 [N, 4], got {coords.dtype} {tuple(coords.shape)}")
    if pk.dtype != torch.int64 or pk.dim() != 2 or pk.shape[1] != 2:
        raise ValueError(f"children_triton: pk must be int64 [N', 2], got {pk.dtype} {tuple(pk.shape)}")
    pk = pk.contiguous()  # (nonzero's result is a transposed view on the CPU)
    n = pk.shape[0]
    out = torch.empty(n, 4, dtype=torch.int32, device=coords.device)
    src = torch.empty(n, dtype=torch.int64, device=coords.device)
    if n:
        _children_launch(triton.cdiv(n, BLOCK_CHILDREN), [coords, pk, out, src, n], (in_int32(n),),
                         {"BLOCK": BLOCK_CHILDREN}, 4)
    return out, src


# Children's 3x3x3 maps derived from the parent map (:func:`child_map_triton`, used by
# :func:`know3d_core.sparse.child_maps.inherit_child_map`): exact in Triton's interpreter
# (tests/test_child_maps.py); off until its CUDA test and the decoder A/B (benchmarks/bench_neighbour_map.py)
# have run on a GPU.
CHILD_MAPS_BY_DEFAULT = False
_child_maps_switch = KernelSwitch(CHILD_MAPS_BY_DEFAULT)
BLOCK_CHILD_MAP = 32  # children per program (x 32 offset lanes)


def child_maps_available(nbr: torch.Tensor) -> bool:
    """:func:`child_map_triton` may run on the parent map ``nbr`` (Triton present, CUDA, its switch on)."""
    return _child_maps_switch.enabled and triton is not None and nbr.is_cuda


def set_triton_child_maps(enabled: bool) -> None:
    """Switch :func:`child_map_triton` on or off for the rest of the process (see ``CHILD_MAPS_BY_DEFAULT``)."""
    _child_maps_switch.set(enabled)


def use_triton_child_maps(enabled: bool) -> ContextManager[None]:
    """Context manager: children's maps derived by :func:`child_map_triton` inside the block (A/B runs, tests)."""
    return _child_maps_switch.use(enabled)


if triton is not None:

    @triton.jit
    def _parent_step(o, d):
        """Child bit ``o`` (0/1) moved by ``d`` (-1/0/1) -> (parent step + 1 in 0..2, new child bit)."""
        s = o + d + 2  # 1..4: non-negative, so // and & are floor division and the parity
        return s // 2, s & 1

    @triton.jit(do_not_specialize=["n", "M"])
    def _child_map_kernel(parent_nbr_ptr, src_ptr, child_rows_ptr, nbr_ptr, bits_ptr, n, M, BLOCK: tl.constexpr):
        """Row ``i`` of the children's 3x3x3 map: child ``src[i] = p * 8 + k`` sits at ``2 * P + bits(k)``
        (``P`` its parent's voxel); its neighbour at offset ``d`` is child ``k'`` of the parent at offset
        ``e = floor((bits(k) + d) / 2)`` from ``P``, with ``bits(k') = bits(k) + d - 2 e``: one entry of the
        parent map ``[M, 27]`` (missing = M), then one of ``child_rows [M * 8]`` (missing = n)."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        s = tl.load(src_ptr + i, mask=ok, other=0).to(tl.int64)
        p = s >> 3
        k = (s & 7).to(tl.int32)
        v = tl.arange(0, 32)
        v_ok = v < 27
        ex, ox = _parent_step((k & 1)[:, None], (v // 9 - 1)[None, :])
        ey, oy = _parent_step(((k >> 1) & 1)[:, None], ((v // 3) % 3 - 1)[None, :])
        ez, oz = _parent_step(((k >> 2) & 1)[:, None], (v % 3 - 1)[None, :])
        both = ok[:, None] & v_ok[None, :]
        q = tl.load(parent_nbr_ptr + p[:, None] * 27 + (ex * 9 + ey * 3 + ez), mask=both, other=M)
        found = both & (q < M)
        row = tl.load(child_rows_ptr + q.to(tl.int64) * 8 + (ox + 2 * oy + 4 * oz), mask=found, other=n)
        tl.store(nbr_ptr + i[:, None] * 27 + v[None, :], row, mask=both)
        tl.store(bits_ptr + i, tl.sum(tl.where(row < n, 1 << v[None, :], 0), axis=1), mask=ok)


if triton is not None:
    _child_map_launch = TritonLauncher(_child_map_kernel)


def child_map_triton(parent_nbr: torch.Tensor, src: torch.Tensor, child_rows: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The children's 3x3x3 map in one launch: ``parent_nbr [M, 27]`` int32 (missing = M), ``src [n]``
    (``parent * 8 + k`` per child, in child order), ``child_rows [M * 8]`` int32 (the child row of
    ``parent * 8 + k``, or n) -> ``(nbr [n, 27] int32 (missing = n), bits [n] int32)``, equal to the
    hashed build on the children's coords (tests/test_child_maps.py)."""
    if triton is None:
        raise RuntimeError("child_map_triton needs Triton")
    M, K = parent_nbr.shape
    if K != 27 or parent_nbr.dtype != torch.int32 or child_rows.shape != (M * 8,) or child_rows.dtype != torch.int32:
        raise ValueError(f"child_map_triton: need parent_nbr int32 [M, 27] and child_rows int32 [M * 8], got "
                         f"{parent_nbr.dtype} {tuple(parent_nbr.shape)} and "
                         f"{child_rows.dtype} {tuple(child_rows.shape)}")
    n = src.shape[0]
    nbr = torch.empty((n, K), dtype=torch.int32, device=parent_nbr.device)
    bits = torch.empty(n, dtype=torch.int32, device=parent_nbr.device)
    if n:
        _child_map_launch(triton.cdiv(n, BLOCK_CHILD_MAP),
                          [parent_nbr.contiguous(), src.contiguous(), child_rows, nbr, bits, n, M],
                          (in_int32(n, M),), {"BLOCK": BLOCK_CHILD_MAP}, 4)
    return nbr, bits


def warmup_jobs(device: torch.device, bm: int = 128, kernel_size: int = 3) -> list:
    """One call per kernel of the build (as the forward specialises them), each runnable on its
    own thread on dummy inputs, so that first-use compiles run side by side (CUDA; the tensors of
    ``device``, any device Triton runs on)."""
    if triton is None:
        return []
    K = kernel_size ** 3
    KP = triton.next_power_of_2(K)
    coords = torch.zeros(4, 4, dtype=torch.int32, device=device)
    coords[:, 3] = torch.arange(4, device=device, dtype=torch.int32)
    keys = torch.full((8,), -1, dtype=torch.int64, device=device)  # an empty table: every probe ends at once
    vals = torch.zeros(8, dtype=torch.int32, device=device)
    nbr = torch.full((4, K), 4, dtype=torch.int32, device=device)
    bits = torch.zeros(4, dtype=torch.int32, device=device)

    def insert():
        _hash_insert_kernel[(1,)](coords, keys.clone(), vals.clone(), nbr, nbr, 4, 6, 6, 6, 1, 7, K,
                                  BLOCK=BLOCK_INSERT, KP=1, FILL=False, PACKED=False, BITS=False, num_warps=4)

    def lookup():
        _hash_lookup_kernel[(1,)](coords, keys, vals, nbr.clone(), bits.clone(), 4, 6, 6, 6, 1, 7, K, kernel_size,
                                  1, BLOCK=BLOCK_LOOKUP, KP=KP, BITS=K <= 31, EAGER=EAGER_VALUES,
                                  num_warps=LOOKUP_WARPS)

    def half():  # the half lookup's kernels as the decoders reach them (batch size known: int32 keys)
        _build_half(coords, nbr.clone(), bits.clone() if K <= 31 else None, 6, 6, 6, 1, kernel_size, 1, True)

    def layout():
        tile_layout_triton(nbr, bits, bm)

    def child_tiles():
        child_tile_flags(torch.full((bm,), 4, dtype=torch.int32, device=device), bits, 4, K, bm)

    def children():
        children_triton(coords, torch.zeros(4, 2, dtype=torch.int64, device=device))

    def child_maps():  # src as the decoders pass it (int32 child ids)
        child_map_triton(torch.full((4, 27), 4, dtype=torch.int32, device=device),
                         torch.arange(4, dtype=torch.int32, device=device) * 8,
                         torch.full((32,), 4, dtype=torch.int32, device=device))

    build = [half] if _half_switch.enabled else [insert, lookup]
    jobs = build + [layout, child_tiles] if K <= 31 else build
    if _children_switch.enabled:
        jobs.append(children)
    if kernel_size == 3 and _child_maps_switch.enabled:
        jobs.append(child_maps)
    return jobs
