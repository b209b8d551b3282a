"""The loop around the forwards: its shortcuts give what the long way gives, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from passes.partition import draw_partition
from runtime.generate import DDIMUpdate, make_scheduler
from runtime.policies.tome import PartitionDraws

BUNDLED_SCHEDULER = Path(__file__).resolve().parents[2] / "export" / "bundled" / "scheduler" / "scheduler_config.json"


@pytest.mark.parametrize("config", ["bundled", "default"])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_update_equals_the_scheduler_step(config, steps):
    """Same samples as DDIMScheduler.step, exactly (tolerance 0), over a whole schedule; the bundled config clips."""
    cfg = json.loads(BUNDLED_SCHEDULER.read_text()) if config == "bundled" else None
    sched = make_scheduler(cfg)
    sched.set_timesteps(steps)
    assert DDIMUpdate.supports(sched)
    update = DDIMUpdate(sched)
    g = torch.Generator().manual_seed(steps)
    x = fast = 3 * torch.randn(2, 3, 8, 8, generator=g)  # large enough that clipping bites
    for t in sched.timesteps:
        eps = torch.randn(2, 3, 8, 8, generator=g)
        x = sched.step(eps, t, x).prev_sample
        fast = update.step(eps, t, fast)
        assert torch.equal(x, fast), f"step t={int(t)}: max diff {float((x - fast).abs().max()):.3e}"


def test_ddim_update_declines_what_it_does_not_compute():
    from diffusers import DDIMScheduler, DDPMScheduler

    for sched in (DDIMScheduler(prediction_type="v_prediction"), DDIMScheduler(thresholding=True), DDPMScheduler()):
        sched.set_timesteps(5)
        assert not DDIMUpdate.supports(sched), sched.config


@pytest.mark.parametrize("grid, stride, bands", [((16, 16), (2, 2), 1), ((16, 16), (2, 2), 2), ((7, 9), (2, 2), 1),
                                                 ((12, 8), (3, 2), 1)])
def test_partition_draws_equal_draw_partition(grid, stride, bands):
    """The policy's cached drawer consumes the stream as draw_partition does and gives the same arrays."""
    draws = PartitionDraws(grid, stride, bands)
    a, b = np.random.default_rng(4), np.random.default_rng(4)
    for _ in range(5):
        for got, want in zip(draws.draw(a), draw_partition(grid, stride, b, bands)):
            assert got.dtype == want.dtype == np.int64 and np.array_equal(got, want)
    fixed = draws.draw(None)
    for got, want in zip(fixed, draw_partition(grid, stride, None, bands)):
        assert np.array_equal(got, want)
    fixed[0][:] = 0  # callers get their own copy of the fixed partition
    assert np.array_equal(draws.draw(None)[0], draw_partition(grid, stride, None, bands)[0])
