"""CA-ToMe end to end on a tiny DiT: calibration recorded in the plan, both variants per bucket, and the
runtime matching at the checkpoint steps and applying the cached matching in between."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import runtime
from export.buckets import parse_buckets
from export.build import build_plan
from export.catome_calib import check_statistic, count_trajectories, derive_r, summarize
from export.families import family_of
from export.methods import get_method
from export.methods.catome import PAPER_SCHEDULE
from passes.errors import DitmergeError
from runtime.generate import sample_classes
from runtime.plan import Plan
from runtime.transformer import PlanTransformer
from tests.helpers import METHOD_ATOL, tiny_dit

OPTIONS = {"threshold": 0.5, "statistic": "median", "calib_samples": 3, "calib_steps": 10}
BLOCKS = {"transformer_blocks.0": "transformer_blocks.0.attn1", "transformer_blocks.1": "transformer_blocks.1.attn1"}


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("catome")
    tiny_dit(sample_size=8, num_classes=10).save_pretrained(d / "model" / "transformer")
    build_plan(str(d / "model"), method="catome", buckets="0,0", out=d / "plan", options=OPTIONS, repeats=1,
               quality_samples=0, progress=False)
    return d / "plan"


def _log(tf) -> list[tuple[int, int, str]]:
    return list(tf._gen.state.data["log"])


def test_statistics_and_r():
    counts = {"a": [1, 2, 3, 10], "b": [4]}
    assert summarize([1, 2, 3, 10, 4], "mean") == 4.0 and summarize([1, 2, 3, 10, 4], "median") == 3.0
    assert summarize([1, 2, 3, 10, 4], "p100") == 10.0
    assert derive_r(counts, "mean", num_src=12, bands=1) == (4, 4.0)
    assert derive_r(counts, "max", num_src=6, bands=1)[0] == 6  # clamped to the src count
    assert derive_r(counts, "mean", num_src=12, bands=3)[0] == 3  # a multiple of the band count
    for bad in ("mode", "p101", "p"):
        with pytest.raises(DitmergeError, match="statistic"):
            check_statistic(bad)


def test_calibration_counts_follow_the_threshold():
    model = tiny_dit(sample_size=8, num_classes=10)
    specs = parse_buckets("0,0")
    args = {"model": model, "family": family_of(model), "blocks": BLOCKS, "specs": specs, "grid": (4, 4),
            "stride": (2, 2), "bands": 1, "samples": 2, "steps": 4, "guidance": 4.0, "seed": 0, "scheduler_config": None}
    every = count_trajectories(threshold=-2.0, **args)
    none = count_trajectories(threshold=2.0, **args)
    for per_block in every:  # 2 samples x 2 of the 4 steps per bucket, per merge point
        assert per_block.keys() == BLOCKS.keys() and all(c == [12] * 4 for c in per_block.values())
    assert all(c == [0] * 4 for per_block in none for c in per_block.values())
    with pytest.raises(DitmergeError, match="no calibration step"):
        count_trajectories(threshold=0.5, **{**args, "specs": parse_buckets("0,0,0,0,0"), "steps": 2})


def test_calibration_runs_on_a_text_conditioned_family():
    from tests.helpers import tiny_pixart

    model = tiny_pixart(sample_size=8)
    counts = count_trajectories(model, family_of(model), BLOCKS, parse_buckets("0"), (4, 4), (2, 2), 1, threshold=-2.0,
                                samples=2, steps=3, guidance=4.0, seed=0, scheduler_config=None)
    assert all(c == [12] * 6 for c in counts[0].values())


def test_options_are_checked():
    meth = get_method("catome", {"schedule": "0,5", "schedule_steps": "10", "cache": "false"})
    assert meth.options["schedule"] == (0, 5) and meth.options["cache"] is False
    with pytest.raises(DitmergeError, match="schedule"):
        get_method("catome", {"schedule": "0,50"}).validate([], (4, 4))
    with pytest.raises(DitmergeError, match="statistic"):
        get_method("catome", {"statistic": "mode"}).validate([], (4, 4))


def test_plan_records_calibration_and_both_variants(plan_dir):
    plan = Plan.load(plan_dir)
    buckets = plan.manifest["buckets"]
    assert [(b["t_lo"], b["t_hi"]) for b in buckets] == [(500, 999), (0, 499)]
    for b in buckets:
        calib = b["method_meta"]["calibration"]
        counts = {k: v["counts"] for k, v in calib["merge_points"].items()}
        assert counts.keys() == BLOCKS.keys()
        assert all(len(c) == OPTIONS["calib_samples"] * 5 for c in counts.values())  # 5 of 10 steps per bucket
        # one r per block from that block's counts (r_per_block, the default); the bucket's r is their mean
        r_blocks = {k: derive_r({k: c}, "median", num_src=12, bands=1)[0] for k, c in counts.items()}
        assert calib["r_blocks"] == r_blocks == b["method_meta"]["r_blocks"]
        assert calib["r"] == round(sum(r_blocks.values()) / len(r_blocks)) == b["r"]
        assert 0 < b["r"] and b["ratio"] == b["r"] / 16 and b["kept_tokens"] == 16 - b["r"]
        assert set(b["graphs"]) == {"main", "match"}
        assert b["tensorrt_check"] == []
        assert max(b["fidelity"].values()) <= METHOD_ATOL, b["fidelity"]
        assert set(b["variant_latency_ms"]) == {"main", "match"}


def test_runtime_matches_at_checkpoints_and_applies_between(plan_dir):
    tf = runtime.load(plan_dir, backend="cpu", seed=3)
    first = sample_classes(tf, [1, 4], steps=50, progress=False)
    log = _log(tf)
    # 50 DDIM steps: exactly the paper's checkpoint steps (the bucket switch at step 25 is one of them)
    assert [s for s, _, v in log if v == "match"] == list(PAPER_SCHEDULE)
    assert all(v == "main" for s, _, v in log if s not in PAPER_SCHEDULE)
    assert {b for _, b, _ in log} == {0, 1}
    # a new generation starts with an empty cache: same seed, same matches, same image
    again = sample_classes(tf, [1, 4], steps=50, progress=False)
    assert _log(tf) == log and np.array_equal(first, again)


def test_without_the_cache_every_step_matches(plan_dir):
    plan = Plan.load(plan_dir)
    manifest = copy.deepcopy(plan.manifest)
    manifest["method"]["params"]["cache"] = False
    no_cache = PlanTransformer(Plan(plan.dir, manifest), backend="cpu", seed=3)
    cached = PlanTransformer(plan, backend="cpu", seed=3)
    a = sample_classes(no_cache, [1, 4], steps=10, progress=False)
    b = sample_classes(cached, [1, 4], steps=10, progress=False)
    assert {v for _, _, v in _log(no_cache)} == {"match"} and "main" in {v for _, _, v in _log(cached)}
    assert not np.array_equal(a, b)
    # a different batch size cannot use a cache taken at batch 2 (CFG): it matches again
    x = torch.randn(1, 4, 8, 8)
    cached(x, timestep=torch.tensor([990]), class_labels=torch.tensor([1]))
    cached(torch.randn(2, 4, 8, 8), timestep=torch.tensor([980, 980]), class_labels=torch.tensor([1, 10]))
    assert [v for _, _, v in _log(cached)] == ["match", "match"]
