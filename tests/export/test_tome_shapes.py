"""A ToMe plan holds one merged graph: buckets differ only in the count they feed (a bucket is a shape)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.build import build_plan
from runtime.plan import Plan
from tests.helpers import EXPORT_ATOL, METHOD_ATOL


BUCKETS = "999-600:0.5,599-300:0.3,299-0:0"


@pytest.fixture(scope="module")
def one_graph_plan(tmp_path_factory):
    """Merged and unmerged buckets, the default: the unmerged one runs the plain branch of the one graph.

    The other layouts (``unmerged=base``, ``merged``) run through whole plans in tests/trt/test_profiles.py."""
    out = tmp_path_factory.mktemp("tome_one_graph") / "plan"
    build_plan("builtin:tiny-dit", method="tome", buckets=BUCKETS, out=out, measure=True, repeats=2,
               quality_samples=0, progress=False)
    return out


def test_every_bucket_runs_one_graph_at_its_own_count(one_graph_plan):
    manifest = json.loads((one_graph_plan / "plan.json").read_text())
    graphs = {b["graph"] for b in manifest["buckets"]}
    assert graphs == {"bucket_0.onnx"}, graphs
    import onnx

    assert [n.op_type for n in onnx.load(one_graph_plan / "bucket_0.onnx", load_external_data=False).graph.node
            if n.op_type == "If"] == ["If"]  # If(r == 0): the plain graph, else the merge
    # FLOPs at each bucket's own r (the count fixed before shapes are inferred), the unmerged bucket's the plain graph's
    flops = [b["flops_rel"] for b in manifest["buckets"]]
    assert flops[0] < flops[1] < flops[2] == 1.0, flops
    assert not (one_graph_plan / "bucket_1.onnx").exists() and not (one_graph_plan / "bucket_2.onnx").exists()
    counts = [b["counts"]["tome_r"] for b in manifest["buckets"]]
    assert counts == [b["r"] for b in manifest["buckets"]] and counts[0] > counts[1] > counts[2] == 0
    for b in manifest["buckets"]:
        # the merged buckets against the eager twin, the r = 0 bucket against the eager model itself
        assert b["fidelity_max_abs"] <= (EXPORT_ATOL if b["r"] == 0 else METHOD_ATOL), b
    # each bucket's latency was measured at its own r, not once per graph file
    assert len({b["latency_ms"] for b in manifest["buckets"]}) == 3


def test_the_runtime_feeds_each_buckets_count(one_graph_plan):
    from export.report_quality import unmerged_view
    from runtime.transformer import PlanTransformer

    plan = Plan.load(one_graph_plan)
    tf = PlanTransformer(plan, backend="cpu", seed=0)
    ref = PlanTransformer(unmerged_view(plan), backend="cpu")
    cfg = plan.model["config"]
    hw = plan.model["grid"][0] * cfg["patch_size"]
    x = torch.randn(2, cfg["in_channels"], hw, hw, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    err = {}
    for t in (900, 400, 100):
        tf.reset(seed=3)
        got = tf(x, timestep=torch.tensor([t, t]), class_labels=labels).sample.numpy()
        want = ref(x, timestep=torch.tensor([t, t]), class_labels=labels).sample.numpy()
        err[t] = float(np.abs(got - want).max())
    assert {r.graph_path.name for r in tf._runners.values()} == {"bucket_0.onnx"}  # one session, every bucket
    # r = 0 through the merged graph is the unmerged forward; r > 0 merges, the more the larger r
    assert err[100] <= EXPORT_ATOL, err
    assert err[900] > err[400] > 1e-4, err
