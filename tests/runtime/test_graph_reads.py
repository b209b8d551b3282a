"""Each graph file is parsed once (runtime.graphfile), and a branched graph's variant feed is made once per
shape signature (runtime.branches.variant_feed's cache)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.build import build_plan
from passes.branch import VARIANT_COUNT
from passes.counts import count_input_name
from runtime import graphfile
from runtime.branches import variant_feed
from runtime.plan import Plan
from runtime.transformer import PlanTransformer
from tests.helpers import tiny_dit


@pytest.fixture(scope="module")
def cache_plan(tmp_path_factory):
    """A two-bucket cache-method plan: each bucket's full and cached variants are one branched graph."""
    d = tmp_path_factory.mktemp("reads")
    tiny_dit(sample_size=8, num_classes=10).save_pretrained(d / "model" / "transformer")
    reads = Counter()
    real = graphfile._read

    def counted(path):
        reads[Path(path).name] += 1
        return real(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(graphfile, "_read", counted)
        build_plan(str(d / "model"), method="cache", buckets="0,0", out=d / "plan", repeats=1, quality_samples=0,
                   progress=False)
    return d / "plan", reads


def _loads(monkeypatch) -> Counter:
    seen = Counter()
    real = onnx.load

    def counted(f, *args, **kwargs):
        seen[Path(f).name] += 1
        return real(f, *args, **kwargs)

    monkeypatch.setattr(onnx, "load", counted)
    return seen


def test_the_build_measures_every_bucket_and_variant_from_one_read_per_graph(cache_plan):
    plan_dir, reads = cache_plan
    plan = Plan.load(plan_dir)
    graphs = {g for b in plan.buckets for g in b.graphs.values()}
    pairs = [(b.index, v) for b in plan.buckets for v in b.graphs]
    assert len(pairs) == 4 and len(graphs) < len(pairs)  # each file measured for 2 variants (or more)
    assert all(reads[g] == 1 for g in graphs) and set(reads.values()) == {1}


def test_a_runner_parses_its_graph_file_once(cache_plan, monkeypatch):
    plan_dir, _ = cache_plan
    plan = Plan.load(plan_dir)
    graph = plan.buckets[0].graph
    graphfile._CACHE.clear()
    loads = _loads(monkeypatch)
    tf = PlanTransformer(plan, backend="cpu")
    tf.runner(graph)
    assert loads[graph] == 1  # inputs and branches from one parse
    assert tf._inputs[graph] and tf._branches[graph]["variants"]
    PlanTransformer(plan, backend="cpu").runner(graph)  # a second transformer over the same, unchanged file
    assert loads[graph] == 1
    (plan_dir / graph).touch()  # a rewritten file is read again
    PlanTransformer(plan, backend="cpu").runner(graph)
    assert loads[graph] == 2


def test_the_variant_feed_cache_is_keyed_by_shapes(cache_plan):
    plan_dir, _ = cache_plan
    plan = Plan.load(plan_dir)
    graph = plan_dir / plan.buckets[0].graph
    facts = graphfile.graph_facts(graph)
    info, inputs = facts.branches, facts.inputs
    cache: dict = {}

    def given(batch: int) -> dict:
        return {"hidden_states": np.zeros((batch, 4, 8, 8), np.float32), "timestep": np.zeros(batch, np.int64),
                "class_labels": np.zeros(batch, np.int64)}

    for variant in info["variants"]:
        for batch in (2, 4, 2, 1):  # the same signature again, then others: cached must equal uncached
            want = variant_feed(info, variant, inputs, given(batch))
            got = variant_feed(info, variant, inputs, given(batch), cache)
            assert got.keys() == want.keys() and all(
                got[k].shape == want[k].shape and got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k])
                for k in want)
            assert len(got[count_input_name(VARIANT_COUNT)]) == info["variants"][variant]["index"]
            stand_ins = [k for k in got if inputs[k][1][:1] == inputs["hidden_states"][1][:1] and k != count_input_name(VARIANT_COUNT)]
            assert all(got[k].shape[0] == batch for k in stand_ins)  # sized by this call's batch
    assert len(cache) == 2 * 3  # one entry per (variant, batch)
    # through the transformer: a call at another batch after a cached one still runs (its stand-ins fit)
    tf = PlanTransformer(plan, backend="cpu")
    for batch in (2, 4):
        out = tf(torch.zeros(batch, 4, 8, 8), torch.tensor([500] * batch), class_labels=torch.zeros(batch, dtype=torch.long))
        assert out.sample.shape[0] == batch
