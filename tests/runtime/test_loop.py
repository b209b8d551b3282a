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
def test_partitions_drawn_ahead_equal_draw_partition_step_by_step(grid, stride, bands):
    """Drawn k steps at a time, the partitions are those draw_partition gives call by call with the same seed."""
    draws = PartitionDraws(grid, stride, bands)
    for seed in range(3):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        got = [draws.draw_many(a, k) for k in (5, 1, 16)]  # chunk boundaries anywhere
        for parts, invs in got:
            for part, inv in zip(parts, invs):
                want_part, want_inv = draw_partition(grid, stride, b, bands)
                assert part.dtype == inv.dtype == np.int64
                assert np.array_equal(part, want_part) and np.array_equal(inv, want_inv)
    fixed = draws.draw_many(None, 3)
    want = draw_partition(grid, stride, None, bands)
    assert all(np.array_equal(fixed[0][i], want[0]) and np.array_equal(fixed[1][i], want[1]) for i in range(3))


def test_tome_policy_draws_the_stream_of_draw_partition():
    """Through the policy, across its look-ahead: step s gets the partition of the s-th draw_partition call."""
    from types import SimpleNamespace

    from runtime.policies import GenState
    from runtime.policies.tome import ToMePolicy

    plan = SimpleNamespace(record=SimpleNamespace(model=SimpleNamespace(grid=[16, 16]),
                                                  method=SimpleNamespace(name="tome", params={"stride": [2, 2]})))
    policy = ToMePolicy(plan)
    bucket = SimpleNamespace(meta={"r": 8, "sites": ["transformer_blocks.0.attn1"], "bands": 1})
    state = GenState(seed=3, rng=np.random.default_rng(3))
    ref = np.random.default_rng(3)
    for step in range(2 * ToMePolicy.AHEAD + 3):
        _, extra = policy.select(state, bucket, 2)
        want = draw_partition((16, 16), (2, 2), ref, 1)
        assert np.array_equal(extra["tome_partition"], want[0]), f"step {step}"
        assert np.array_equal(extra["tome_partition_inv"], want[1]), f"step {step}"
