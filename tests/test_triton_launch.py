"""sparse.triton_launch: the launcher's bookkeeping on the CPU (its direct launch needs a GPU: the CUDA tests of
the fused flow kernels and of the neighbour maps run every launch through it there)."""
import torch

from know3d_core.sparse.triton_launch import TritonLauncher, in_int32


class _Jit:
    """Stands in for a ``@triton.jit`` function: ``fn[grid](*args, **kw)`` records the launch and returns a
    "compiled kernel" (one that cannot launch directly: there is no GPU driver here)."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            return object()
        return run


def test_in_int32_is_tritons_i32_range():
    assert in_int32(0, 2**31 - 1, -2**31) and not in_int32(2**31) and not in_int32(5, -2**31 - 1)


def test_first_launch_goes_through_the_jit_and_a_failing_direct_launch_falls_back_for_good():
    jit = _Jit()
    launch = TritonLauncher(jit)
    t = torch.zeros(4)
    launch(3, [t, 5], (True,), {"BLOCK": 8}, 4)
    assert jit.launches == [((3,), (t, 5), {"BLOCK": 8, "num_warps": 4})] and len(launch.compiled) == 1
    launch(2, [t, 6], (True,), {"BLOCK": 8}, 4)  # same key: direct launch tried, impossible here: JIT again
    assert not launch.direct and jit.launches[1] == ((2,), (t, 6), {"BLOCK": 8, "num_warps": 4})
    launch(2, [t, 6], (True,), {"BLOCK": 8}, 4)
    assert len(jit.launches) == 3


def test_the_key_separates_what_triton_specialises_on():
    launch = TritonLauncher(_Jit())
    base = torch.zeros(8)
    launch(1, [base, 1], (True,), {"BLOCK": 8}, 4)
    launch(1, [base.double(), 1], (True,), {"BLOCK": 8}, 4)  # dtype
    launch(1, [base[1:], 1], (True,), {"BLOCK": 8}, 4)  # 16-byte alignment of the pointer
    launch(1, [base, 1], (False,), {"BLOCK": 8}, 4)  # the caller's spec (an int past int32)
    launch(1, [base, 1], (True,), {"BLOCK": 16}, 4)  # a constexpr
    launch(1, [base, 1], (True,), {"BLOCK": 8}, 8)  # warps
    assert len(launch.compiled) == 6 and launch.direct


def test_direct_launches_can_be_switched_off_for_an_ab_run():
    from know3d_core.sparse.triton_launch import use_direct_launches

    launch = TritonLauncher(_Jit())
    t = torch.zeros(4)
    launch(1, [t], (True,), {}, 4)
    with use_direct_launches(False):
        launch(1, [t], (True,), {}, 4)
    # JIT again, with no direct attempt (here one would fail and turn it off for good)
    assert launch.direct and len(launch.fn.launches) == 2
