"""Sigma schedules of the two hosts and the sigma -> step mapping."""
import math

import numpy as np
import pytest
import torch

from know3d_core.mmdit import (QWEN_IMAGE_SCHEDULER_CONFIG, comfy_simple_flow_sigmas, flow_match_sigmas,
                               nearest_step, qwen_shift_mu)


@pytest.mark.parametrize("steps,tokens", [(40, 4096), (50, 4096), (8, 1024), (3, 24)])
def test_flow_match_sigmas_equal_diffusers_scheduler(steps, tokens):
    from diffusers import FlowMatchEulerDiscreteScheduler
    sch = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=qwen_shift_mu(tokens))
    ours = flow_match_sigmas(steps, tokens)
    assert torch.equal(ours, sch.sigmas)
    assert abs(ours[-2].item() - 0.02) < 1e-6   # shift_terminal


def test_qwen_mu_and_shift_formula_at_1024():
    mu = qwen_shift_mu(4096)
    assert math.isclose(mu, 0.5 + (0.9 - 0.5) * (4096 - 256) / (8192 - 256))
    s = flow_match_sigmas(40, 4096).double()
    # recompute in float64 from the definition: exponential shift, then stretch to the terminal
    base = np.linspace(1.0, 1 / 40, 40)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    stretched = 1 - (1 - shifted) / ((1 - shifted[-1]) / (1 - 0.02))
    assert np.allclose(s[:-1].numpy(), stretched, atol=1e-6)


def test_comfy_simple_schedule_closed_form():
    n, shift = 40, 3.1
    got = comfy_simple_flow_sigmas(n, shift)
    t = np.array([(1000 - math.floor(i * 1000 / n)) / 1000 for i in range(n)])
    assert np.allclose(got[:-1].numpy(), shift * t / (1 + (shift - 1) * t), atol=1e-6)
    assert got[-1] == 0 and got.shape == (n + 1,)


def _argmin_index(schedule, sigma):
    s = schedule[:-1].double()
    return int(torch.argmin((s - sigma).abs()))


@pytest.mark.parametrize("sigma", [0.85, 0.5, 0.25, 0.9, 0.03, 1.0])
def test_sigma_maps_to_nearest_step_in_both_hosts(sigma):
    diff = flow_match_sigmas(40, 4096)
    comfy = comfy_simple_flow_sigmas(40, 3.1)
    for sched in (diff, comfy):
        c = nearest_step(sched, sigma)
        assert c.index == _argmin_index(sched, sigma)
        assert c.sigma == sched[c.index].item() and c.num_steps == 40 and c.sigma_requested == sigma


def test_same_step_index_is_a_different_sigma_per_host():
    diff = flow_match_sigmas(40, 4096)
    comfy = comfy_simple_flow_sigmas(40, 3.1)
    # diffusers: mu = 0.5 + 0.4 * 3840 / 7936; t = 0.75 -> e^mu / (e^mu + 1/3) = 0.857, stretched to the
    # 0.02 terminal -> 0.853. ComfyUI: shift(t) = 3.1 t / (1 + 2.1 t) at t = 1 - i/40 -> 0.903 at i = 10.
    assert round(diff[10].item(), 2) == 0.85 and round(comfy[10].item(), 2) == 0.90
    # so sigma 0.85 is step 10 under diffusers but a later step under ComfyUI's shift 3.1:
    # shift(1 - 13/40) = 0.866, shift(1 - 14/40) = 0.852, shift(1 - 15/40) = 0.838 -> nearest is 14
    assert nearest_step(diff, 0.85).index == 10
    assert nearest_step(comfy, 0.85).index == 14


def test_nearest_step_edges():
    assert nearest_step([1.0, 0.5, 0.0], 0.0).index == 1          # terminal 0 never runs a forward
    assert nearest_step([1.0, 0.6, 0.4, 0.0], 0.5).index == 1     # tie -> earlier step
    with pytest.raises(ValueError):
        nearest_step([1.0, 0.5, 0.0], 1.5)
    with pytest.raises(ValueError):
        flow_match_sigmas(0, 16)
    with pytest.raises(ValueError, match="karras"):
        flow_match_sigmas(4, 16, {"use_karras_sigmas": True})
