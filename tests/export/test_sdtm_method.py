"""SDTM as a plan method: the stage/ratio schedule, a built plan's variants, and the runtime policy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from export.methods import get_method
from export.methods.sdtm import rho, stage_buckets, step_timestep
from passes.errors import DitmergeError


def test_default_schedule_matches_the_released_code():
    # released code: rho = 0.50, 0.48, 0.42, 0.33, 0.21, 0.10 at steps 0, 10, 20, 30, 40, 49 of 50
    assert [round(rho(s, 50, 0.3, 0.2), 2) for s in (0, 10, 20, 30, 40, 49)] == [0.5, 0.48, 0.42, 0.33, 0.21, 0.1]
    buckets = stage_buckets(50, 20, 0.3, 0.2, 2, 1000)
    assert [b.stage for b in buckets] == ["structure"] * 2 + ["detail"] * 2
    assert [(b.first, b.last) for b in buckets] == [(0, 9), (10, 19), (20, 34), (35, 49)]
    assert buckets[0].spec.t_hi == 999 and buckets[-1].spec.t_lo == 0
    for a, b in itertools.pairwise(buckets):
        assert b.spec.t_hi == a.spec.t_lo - 1
    for b in buckets:
        want = np.mean([rho(s, 50, 0.3, 0.2) for s in range(b.first, b.last + 1)])
        assert b.spec.ratio == pytest.approx(want, abs=1e-4)
        # each step of the reference schedule falls in its own bucket
        for s in range(b.first, b.last + 1):
            assert b.spec.t_lo <= step_timestep(s, 50, 1000) <= b.spec.t_hi
    assert buckets[0].spec.ratio > buckets[1].spec.ratio > buckets[2].spec.ratio > buckets[3].spec.ratio


def test_stage_switch_stays_at_forty_percent_with_fewer_steps():
    from diffusers import DDIMScheduler

    buckets = stage_buckets(50, 20, 0.3, 0.2, 1, 1000)
    boundary = buckets[0].spec.t_lo
    sched = DDIMScheduler(timestep_spacing="leading")
    sched.set_timesteps(25)
    structure = [int(t) for t in sched.timesteps if int(t) >= boundary]
    assert len(structure) == 10  # 40 % of 25


def test_options_are_checked():
    with pytest.raises(DitmergeError, match="drop --buckets"):
        get_method("sdtm").bucket_specs("0.5", 1000, "")
    with pytest.raises(DitmergeError, match="switch_step"):
        get_method("sdtm", {"switch_step": "60"}).bucket_specs("0.3,0.2,0.1", 1000, "")
    with pytest.raises(DitmergeError, match="structure_merge"):
        get_method("sdtm", {"structure_merge": "pool"}).validate([], (8, 8))
    with pytest.raises(DitmergeError, match="TopK"):
        get_method("sdtm").validate([], (128, 128))
    get_method("sdtm", {"structure_merge": "bipartite"}).validate([], (128, 128))


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory):
    from export.build import build_plan

    out = tmp_path_factory.mktemp("sdtm") / "plan"
    build_plan("builtin:tiny-dit", method="sdtm", out=out, options={"steps": "10", "switch_step": "4"},
               measure=True, repeats=2, quality_samples=0, progress=False)
    return out


def test_built_plan_has_both_stages_and_every_variant_matches_its_twin(plan_dir):
    import json

    manifest = json.loads((plan_dir / "plan.json").read_text())
    stages = [b["method_meta"]["stage"] for b in manifest["buckets"]]
    assert stages == ["structure", "structure", "detail", "detail"]
    for b in manifest["buckets"]:
        assert set(b["graphs"]) == {"main", "full"}
        assert b["r"] > 0 and b["method_meta"]["cache_bytes_per_sample"] > 0
        for variant, err in b["fidelity"].items():
            assert err <= 1e-4, f"bucket {b['index']} {variant}: {err:.2e}"
    detail = manifest["buckets"][-1]["method_meta"]
    assert detail["merge"] == "bipartite" and all(s.endswith(".ff") for s in detail["sites"])


def test_buckets_that_differ_in_ratio_share_one_graph_per_stage(plan_dir):
    """4 buckets x 2 variants reference 2 files, one per stage: the window graph (k a count) and the
    bipartite graph (r a count), each with the full variant as a branch (passes/branch.py); each bucket
    feeds its own count, and every profile passes the TensorRT check."""
    import json

    import onnx

    from passes.sdtm import K_COUNT, R_COUNT
    from tests.count_profiles import assert_tensorrt_ok

    manifest = json.loads((plan_dir / "plan.json").read_text())
    buckets = manifest["buckets"]
    files = {v["file"] for b in buckets for v in b["graphs"].values()}
    assert len(files) == 2 < len(buckets) * 2, files
    for stage, key in (("structure", K_COUNT), ("detail", R_COUNT)):
        same = [b for b in buckets if b["method_meta"]["stage"] == stage]
        assert len({g["file"] for b in same for g in b["graphs"].values()}) == 1
        # the buckets differ in ratio and in count: one graph serves both counts
        assert len({b["ratio"] for b in same}) == 2 and len({b["counts"][key] for b in same}) == 2, same
        for b in same:
            assert b["counts"] == {key: b["method_meta"]["k" if key == K_COUNT else "r"]}
    from passes.branch import VARIANT_COUNT, branch_info

    for b in buckets:
        model = onnx.load(plan_dir / b["graphs"]["main"]["file"], load_external_data=False)
        variants = branch_info(model)["variants"]
        assert set(variants) == {"main", "full"}
        for variant in variants:  # each profile: the bucket's count and the variant's index
            assert_tensorrt_ok(model, {**b["counts"], VARIANT_COUNT: variants[variant]["index"]})


def test_runtime_runs_protected_steps_and_carries_counters(plan_dir):
    import runtime
    from runtime.generate import sample_classes

    tf = runtime.load(plan_dir, backend="cpu")
    seen = []
    select = tf.policy.select

    def spy(state, bucket, batch):
        variant, feed = select(state, bucket, batch)
        seen.append((state.steps, bucket.meta["stage"], variant, feed.get("sdtm_counter")))
        return variant, feed

    tf.policy.select = spy
    out = sample_classes(tf, [1], steps=8, guidance=2.0, progress=False)
    assert np.isfinite(out).all()
    assert [s[2] for s in seen] == ["full", "main", "main", "full", "main", "main", "full", "main"]
    assert {s[1] for s in seen} == {"structure", "detail"}
    counters = [s[3] for s in seen if s[3] is not None]
    assert counters[0].max() == 0 and counters[-1].max() > 0  # fresh at the start, carried after
    seen.clear()
    sample_classes(tf, [1], steps=8, guidance=2.0, progress=False)
    assert next(s[3] for s in seen if s[3] is not None).max() == 0  # reset per generation


def test_policy_draws_the_detail_partition_without_a_host_copy(plan_dir, monkeypatch):
    """A device counter (torch, as TensorRT steps return it) gives a torch partition drawn where the counter
    is, equal to the numpy partition drawn from the same seeded stream; the counter is never copied to
    the host (Tensor.cpu / .numpy raise during select)."""
    import torch

    from runtime.plan import Plan
    from runtime.policies import GenState
    from runtime.policies.sdtm import SdtmPolicy

    plan = Plan.load(plan_dir)
    policy = SdtmPolicy(plan)
    detail = next(b for b in plan.buckets if b.meta.get("merge") == "bipartite")
    n = policy.tokens
    counter = np.random.default_rng(0).integers(0, 3, (2, n)).astype(np.float32)
    feeds = {}
    for kind in ("host", "device"):
        state = GenState(seed=0, rng=np.random.default_rng(5), steps=1)
        state.data.update(counter=counter.copy() if kind == "host" else torch.from_numpy(counter.copy()),
                          cache={p: np.zeros((2, n, w), np.float32) for p, w in detail.meta["widths"].items()})
        if kind == "device":
            for name in ("cpu", "numpy"):
                monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("host copy")))
        variant, feeds[kind] = policy.select(state, detail, 2)
        monkeypatch.undo()
        assert variant == "main"
    for name in ("tome_partition", "tome_partition_inv"):
        assert isinstance(feeds["device"][name], torch.Tensor)
        assert np.array_equal(feeds["device"][name].numpy(), feeds["host"][name]), name


def test_flux_merges_its_image_mlp_and_refuses_attention_only(tmp_path, caplog):
    """Flux: the joint attention (rotary embeddings over the joint sequence) and the single-stream blocks
    are skipped with a DEBUG line; with attention as the only location nothing is left, and the build says so."""
    import logging

    from export.build import build_plan
    from tests.pipelines.components import RECIPES

    RECIPES["flux"].make_transformer().save_pretrained(tmp_path / "m" / "transformer")
    RECIPES["flux"].make_scheduler().save_pretrained(tmp_path / "m" / "scheduler")
    with caplog.at_level(logging.DEBUG, logger="passes.sdtm"):
        manifest = build_plan(str(tmp_path / "m"), method="sdtm", grid=(8, 8), out=tmp_path / "plan", measure=False,
                              progress=False)
    sites = {s for b in manifest["buckets"] for s in b["method_meta"].get("sites", [])}
    assert sites == {"transformer_blocks.0.ff"}, sites
    assert "single_transformer_blocks.0.attn" in caplog.text and "rotary" in caplog.text
    with pytest.raises(DitmergeError, match="no module to merge at attn, joint"):
        build_plan(str(tmp_path / "m"), method="sdtm", grid=(8, 8), out=tmp_path / "p2", measure=False, progress=False,
                   options={"structure_locations": "attn,joint", "detail_locations": "attn,joint"})
