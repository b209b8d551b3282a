"""A mixed CA-ToMe plan (one bucket calibrates to r = 0) is one graph: its unmerged bucket runs the graph's
``plain`` branch, not base.onnx beside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from export.build import build_plan
from export.report_quality import unmerged_view
from export.trt_build import graph_profiles
from passes.branch import VARIANT_COUNT
from passes.counts import count_input_name
from runtime.generate import sample_classes
from runtime.plan import Plan
from runtime.transformer import PlanTransformer
from tests.helpers import EXPORT_ATOL, METHOD_ATOL, tiny_dit

OPTIONS = {"threshold": 0.5, "statistic": "median", "calib_samples": 2, "calib_steps": 6}


def _mixed_build(d, options: dict, **kwargs) -> None:
    """Calibration that finds no match in the clean bucket (its counts zeroed): bucket 1 has r = 0."""
    from export.methods import catome

    if not (d / "model").is_dir():
        tiny_dit(sample_size=8, num_classes=10).save_pretrained(d / "model" / "transformer")
    real = catome.count_trajectories

    def none_in_the_clean_bucket(*args, **kw):
        counts = real(*args, **kw)
        counts[1] = {b: [0] * len(c) for b, c in counts[1].items()}
        return counts

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(catome, "count_trajectories", none_in_the_clean_bucket)
        build_plan(str(d / "model"), method="catome", buckets="0,0", options=options, repeats=1, quality_samples=0,
                   progress=False, **kwargs)


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("catome_mixed")
    _mixed_build(d, OPTIONS, out=d / "plan")
    return d / "plan"


def test_the_unmerged_bucket_is_the_plain_branch_of_the_one_graph(plan_dir):
    plan = Plan.load(plan_dir)
    merged, plain = plan.manifest["buckets"]
    assert merged["r"] > 0 and plain["r"] == 0
    graph = merged["graph"]
    assert {f for b in plan.manifest["buckets"] for f in (b["graph"], *(v["file"] for v in b["graphs"].values()))} == {graph}
    assert {f.name for f in plan_dir.glob("*.onnx")} == {"base.onnx", graph}  # base.onnx: as every plan keeps it
    assert plain["method_meta"]["branch"] == {"main": "plain"} and set(plain["graphs"]) == {"main"}
    assert plain["counts"] == dict.fromkeys(merged["counts"], 0) and plain["counts"]
    assert max(plain["fidelity"].values()) <= EXPORT_ATOL and max(merged["fidelity"].values()) <= METHOD_ATOL
    assert plain["tensorrt_check"] == [] == merged["tensorrt_check"]
    # one engine: a profile per variant of the merged bucket, and the plain branch's at counts 0
    profiles = graph_profiles(plan_dir, plan.manifest)[graph]
    assert {p[VARIANT_COUNT] for p in profiles} == {0, 1, 2}
    assert {k: v for p in profiles if p[VARIANT_COUNT] == 2 for k, v in p.items() if k != VARIANT_COUNT} == plain["counts"]


def test_the_unmerged_bucket_runs_the_plain_branch_at_the_unmerged_output(plan_dir):
    plan = Plan.load(plan_dir)
    tf = PlanTransformer(plan, backend="cpu")
    graph = plan.buckets[1].graph
    runner = tf.runner(graph)
    fed = []
    real = runner.infer
    runner.infer = lambda feed: fed.append(feed) or real(feed)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 10])
    got = tf(x, torch.tensor([100, 100]), class_labels=labels).sample
    want = PlanTransformer(unmerged_view(plan), backend="cpu")(x, torch.tensor([100, 100]), class_labels=labels).sample
    assert (got - want).abs().max().item() <= EXPORT_ATOL
    assert len(fed[-1][count_input_name(VARIANT_COUNT)]) == 2  # the plain branch ran, not apply at r = 0
    # a whole generation crosses both buckets on that one session: nothing runs base.onnx
    tf = runtime.load(plan_dir, backend="cpu", seed=3)
    sample_classes(tf, [1, 4], steps=10, progress=False)
    assert set(tf._runners) == {graph}
    assert {(b, v) for _, b, v in tf._gen.state.data["log"]} >= {(0, "match"), (0, "main"), (1, "main")}
    assert np.isfinite(sample_classes(tf, [2], steps=4, progress=False)).all()


def test_unmerged_base_keeps_base_onnx_beside_the_graph(plan_dir):
    _mixed_build(plan_dir.parent, {**OPTIONS, "unmerged": "base"}, out=plan_dir.parent / "base_plan", measure=False)
    merged, plain = Plan.load(plan_dir.parent / "base_plan").manifest["buckets"]
    assert plain["graph"] == "base.onnx" and plain["counts"] == {} and "branch" not in plain["method_meta"]
    assert set(merged["graphs"]) == {"main", "match"} and merged["graph"] != "base.onnx"
