"""compare_plans: several plans against one reference, same noise, one timing loop."""

from __future__ import annotations

import math

import numpy as np
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


def test_measure_quality_scores_the_plan_against_its_unmerged_model(plan, tmp_path):
    """measure_quality's figures, recomputed here: the reference is a separately built ratio-0 plan of the same
    model, the images come straight from sample_classes, PSNR is written out (images in [-1, 1])."""
    from export.classifier import load_classifier, predict
    from export.photos import heldout
    from export.quality import frechet_distance
    from runtime.generate import sample_classes
    from runtime.transformer import PlanTransformer

    build_plan(model="bundled:tiny-dit", buckets="0", out=tmp_path / "p0", measure=False, quality_samples=0,
               progress=False)
    q = measure_quality(plan, samples=3, steps=4, latency_repeats=1)
    labels = np.arange(3)
    gen = lambda p: sample_classes(PlanTransformer(p, backend="cpu"), labels, steps=4, guidance=4.0, seed=0,
                                   scheduler_config=p.model.get("scheduler"), progress=False)
    merged, ref = gen(plan), gen(Plan.load(tmp_path / "p0"))
    mse = ((merged.astype(np.float64) - ref) ** 2).reshape(3, -1).mean(1)
    want = 10 * np.log10(2.0**2 / mse)
    assert np.isfinite(want).all() and want.max() < 60, want  # the merged plan really differs
    assert q["psnr_db"]["mean"] == pytest.approx(want.mean(), abs=1e-3)  # dB
    assert q["psnr_db"]["worst"] == pytest.approx(want.min(), abs=1e-3)
    clf = load_classifier()
    (pred_m, feat_m), (pred_r, feat_r) = predict(clf, merged), predict(clf, ref)
    assert q["class_accuracy_merged"] == float((pred_m == labels).mean())
    assert q["class_accuracy_unmerged"] == float((pred_r == labels).mean())
    _, real = predict(clf, heldout()[0])
    assert q["fid_unmerged"] == pytest.approx(frechet_distance(feat_r, real), rel=1e-4)
    assert q["fid_merged"] == pytest.approx(frechet_distance(feat_m, real), rel=1e-4)
    lat = q["e2e_latency_s"]
    assert all(math.isfinite(v) and v > 0 for v in lat.values())
    assert q["e2e_speedup"] == pytest.approx(lat["unmerged"] / lat["merged"], rel=1e-12)
