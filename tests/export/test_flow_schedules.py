"""Step schedules on flow matching (SD3's fixed shift, Flux's resolution-dependent shift): SDTM's stage
buckets and CA-ToMe's checkpoints land on the timesteps the scheduler itself gives the pipeline's steps
(``set_timesteps`` as diffusers' pipelines call it), not on DDIM "leading" ones; CA-ToMe calibrates on
those timesteps."""

from __future__ import annotations

import numpy as np
import pytest

from export.buckets import parse_buckets
from export.families import FAMILIES, reference_timesteps
from export.methods import get_method
from export.methods.sdtm import stage_buckets, step_timestep
from passes.errors import DitmergeError
from passes.catome.variants import PAPER_SCHEDULE

SD3, FLUX = FAMILIES["SD3Transformer2DModel"], FAMILIES["FluxTransformer2DModel"]


def _sd3_sched():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3-medium's


def _flux_sched():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1's


def _config(sched) -> dict:
    return {"_class_name": type(sched).__name__, **dict(sched.config)}


def _flux_own(steps: int, tokens: int) -> list[float]:
    """FluxPipeline's timesteps, through diffusers' own calculate_shift / retrieve_timesteps."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    sched = _flux_sched()
    c = sched.config
    mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    retrieve_timesteps(sched, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched.timesteps.tolist()


def _sd3_own(steps: int) -> list[float]:
    sched = _sd3_sched()
    sched.set_timesteps(steps)  # StableDiffusion3Pipeline: no sigmas, no mu (fixed shift)
    return sched.timesteps.tolist()


def _bucket_of(buckets, t: float) -> int:
    """The index of the bucket the runtime runs at ``t``: [t_lo, t_hi + 1), flow's t = T in the noisiest."""
    for i, b in enumerate(buckets):
        if b.spec.t_lo <= t < b.spec.t_hi + 1 or (i == 0 and b.spec.t_hi + 1 <= t <= 1000):
            return i
    raise AssertionError(f"t = {t} is in no bucket")


def test_reference_timesteps_are_the_pipelines():
    sd3 = reference_timesteps(_config(_sd3_sched()), 28, family=SD3)
    assert sd3 == _sd3_own(28) and sd3[0] == 1000.0  # sigma 1: t = T, outside DDPM's 0..999
    for tokens in (1024, 4096):
        assert reference_timesteps(_config(_flux_sched()), 28, family=FLUX, image_tokens=tokens) == _flux_own(28, tokens)
    # the shift follows the resolution: 4096 tokens (mu 1.15) stays noisier longer than 1024 (mu ~0.71)
    assert _flux_own(28, 4096)[10] > _flux_own(28, 1024)[10] + 20
    with pytest.raises(DitmergeError, match="image token count"):
        reference_timesteps(_config(_flux_sched()), 28, family=FLUX)


@pytest.mark.parametrize("kind", ["sd3", "flux-1024", "flux-4096"])
def test_sdtm_stages_land_on_the_flow_schedule(kind):
    own = _sd3_own if kind == "sd3" else (lambda n: _flux_own(n, int(kind.split("-")[1])))
    ref = own(50)
    buckets = stage_buckets(50, 20, 0.3, 0.2, 2, 1000, timesteps=ref)
    assert [(b.first, b.last) for b in buckets] == [(0, 9), (10, 19), (20, 34), (35, 49)]
    assert buckets[0].spec.t_hi == 999 and buckets[-1].spec.t_lo == 0
    for i, b in enumerate(buckets):  # every reference step (t = 1000.0 first) runs in its own bucket
        assert all(_bucket_of(buckets, ref[s]) == i for s in range(b.first, b.last + 1)), (i, b)
    # 28 steps (SD3's and Flux's default): the structure stage holds the steps noisier than step 20 of 50
    switch = buckets[2].spec.t_hi + 1
    run = own(28)
    structure = [t for t in run if t >= switch]
    assert len(structure) == sum(1 for k in range(28) if k / 27 < 20 / 49) == 12, (switch, run)
    # DDIM "leading" placement (switch above t(20) = 580) would put over 25 of the 50 flow steps (not 20) in
    # the structure stage: the flow schedule's shift keeps t high for longer
    leading = stage_buckets(50, 20, 0.3, 0.2, 2, 1000)
    assert leading[2].spec.t_hi + 1 == step_timestep(20, 50, 1000) + 1 == 581
    wrong = sum(1 for t in ref if t >= leading[2].spec.t_hi + 1)
    assert wrong > 25, wrong


def test_sdtm_method_places_its_buckets_from_the_saved_scheduler(tmp_path):
    _flux_sched().save_pretrained(tmp_path / "scheduler")
    specs = {g: get_method("sdtm").bucket_specs("0.3,0.2,0.1", 1000, str(tmp_path), family=FLUX, grid=g)
             for g in ((32, 32), (64, 64))}
    for g, s in specs.items():
        ref = _flux_own(50, g[0] * g[1])
        assert s[2].t_hi + 1 == int(np.floor(ref[20])) + 1, (g, s)
    assert specs[(64, 64)][2].t_hi > specs[(32, 32)][2].t_hi  # Flux's shift moves the switch with the grid
    with pytest.raises(DitmergeError, match="image token count"):
        get_method("sdtm").bucket_specs("0.3,0.2,0.1", 1000, str(tmp_path), family=FLUX)


def test_a_boundary_inside_one_integer_timestep_is_refused():
    ts = [1000.0, 999.7, 999.2, 10.0]  # steps 1 and 2 share the integer timestep 999
    with pytest.raises(DitmergeError, match="one integer timestep"):
        stage_buckets(4, 2, 0.3, 0.2, 1, 1000, timesteps=ts)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_catome_checkpoints_are_the_flow_timesteps_of_the_paper_steps(kind, tmp_path):
    sched, family, grid = (_sd3_sched(), SD3, None) if kind == "sd3" else (_flux_sched(), FLUX, (64, 64))
    sched.save_pretrained(tmp_path / "scheduler")
    meth = get_method("catome")
    meth.bucket_specs("0,0", 1000, str(tmp_path), family=family, grid=grid)
    ref = _sd3_own(50) if kind == "sd3" else _flux_own(50, 4096)
    assert meth.checkpoint_timesteps == [ref[s] for s in PAPER_SCHEDULE]
    assert meth.checkpoint_timesteps[0] == 1000.0
    leading = [step_timestep(s, 50, 1000) for s in PAPER_SCHEDULE]  # DDIM's would match at other steps
    assert sum(1 for a, b in zip(ref, leading) if abs(a - b) < 1) <= 1


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_catome_calibration_samples_the_flow_schedule(kind):
    """Calibration runs the family's own scheduler and inputs: the model sees the pipeline's timesteps
    (times Flux's 1/1000), and every step counts in the bucket that covers it (t = 1000 in the noisiest)."""
    from export.catome_calib import count_trajectories
    from tests.pipelines.components import RECIPES

    model = RECIPES[kind].make_transformer()
    family = SD3 if kind == "sd3" else FLUX
    grid = (4, 4) if kind == "sd3" else (8, 8)
    sched = _sd3_sched() if kind == "sd3" else _flux_sched()
    block = "transformer_blocks.0"
    blocks = {block: f"{block}.attn" if kind == "sd3" else f"{block}.ff"}
    seen: list[float] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(float(kw["timestep"][0])), with_kwargs=True)
    try:
        counts = count_trajectories(model, family, blocks, parse_buckets("0,0"), grid, (2, 2), 1, threshold=-2.0,
                                    samples=2, steps=6, guidance=4.0, seed=0, scheduler_config=_config(sched))
    finally:
        hook.remove()
    n = grid[0] * grid[1]
    want = _sd3_own(6) if kind == "sd3" else _flux_own(6, n)
    assert np.allclose(np.asarray(seen) / family.timestep_scale, want, atol=1e-3), (seen, want)
    num_src = n - n // 4
    per_bucket = [sum(1 for t in want if t >= 500), sum(1 for t in want if t < 500)]
    assert [len(c[block]) for c in counts] == [2 * k for k in per_bucket]  # 2 samples per step
    assert all(v == num_src for c in counts for v in c[block])  # threshold -2: every src token matches


def test_catome_policy_matches_at_the_paper_steps_of_a_50_step_flux_run():
    """The runtime reads t back from Flux's ``t / 1000`` (fp32, ~3e-5 off): a 50-step run still matches at
    exactly the paper's steps, with the cached matching in between."""
    import types

    import torch

    from runtime.policies import GenState
    from runtime.policies.catome import CaToMePolicy

    ref = _flux_own(50, 4096)
    params = {"checkpoint_timesteps": [ref[s] for s in PAPER_SCHEDULE], "schedule": list(PAPER_SCHEDULE),
              "schedule_steps": 50, "cache": True}
    plan = types.SimpleNamespace(record=types.SimpleNamespace(
        model=types.SimpleNamespace(grid=[64, 64], num_train_timesteps=1000),
        method=types.SimpleNamespace(name="catome", params=params)))
    policy = CaToMePolicy(plan, deterministic=True)
    bucket = types.SimpleNamespace(index=0, meta={"r": 8, "bands": 1}, graphs={"main": {}, "match": {}})
    state = GenState(seed=0, rng=np.random.default_rng(0))
    matched = []
    for step, t in enumerate(ref):
        sent = torch.tensor([t], dtype=torch.float32) / 1000  # what FluxPipeline passes as timestep
        state.t, state.steps = float(sent[0]) / FLUX.timestep_scale, step  # as runtime/transformer.py reads it
        variant, _ = policy.select(state, bucket, 2)
        if variant == "match":
            matched.append(step)
            state.data["cache"] = {"bucket": 0, "batch": 2, "indices": {}}
    assert matched == list(PAPER_SCHEDULE)
