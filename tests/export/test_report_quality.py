"""compare_plans: several plans against one reference, same noise, one timing loop."""

from __future__ import annotations

import math

import pytest

from export.build import build_plan
from export.report_quality import compare_plans, measure_quality, unmerged_view
from runtime.plan import Plan


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Plan:
    out = tmp_path_factory.mktemp("plan") / "p"
    build_plan(model="bundled:tiny-dit", buckets="0.5", out=out, measure=False, quality_samples=0, progress=False)
    return Plan.load(out)


def test_the_reference_against_itself_is_exact_and_a_merged_plan_is_not(plan, tmp_path):
    ref = unmerged_view(plan)
    reports = compare_plans({"itself": unmerged_view(plan), "merged": plan}, ref, samples=3, steps=4,
                            latency_repeats=1, grid_png=tmp_path / "grid.png")
    same, merged = reports["itself"], reports["merged"]
    assert math.isinf(same["psnr_db"]["mean"]) and same["ssim"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert same["fid_merged"] == pytest.approx(same["fid_unmerged"], abs=1e-6)
    assert merged["psnr_db"]["mean"] < 60 and merged["ssim"]["mean"] < 1 - 1e-4
    # both rows share the reference's figures: one reference run, not one per plan
    assert merged["fid_unmerged"] == same["fid_unmerged"]
    assert merged["e2e_latency_s"]["unmerged"] == same["e2e_latency_s"]["unmerged"] > 0
    assert merged["e2e_speedup"] == pytest.approx(merged["e2e_latency_s"]["unmerged"] / merged["e2e_latency_s"]["merged"])
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_measure_quality_is_compare_plans_against_the_unmerged_view(plan):
    q = measure_quality(plan, samples=3, steps=4, latency_repeats=1)
    want = compare_plans({"merged": plan}, unmerged_view(plan), samples=3, steps=4, latency_repeats=1)["merged"]
    assert q["psnr_db"] == want["psnr_db"] and q["fid_merged"] == pytest.approx(want["fid_merged"])
