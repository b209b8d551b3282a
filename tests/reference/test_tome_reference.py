"""The ToMe graph against tomesd's ``bipartite_soft_matching_random2d`` (tests.reference.tome), whole model.

before (eager DiT with the reference's hooks) -> transform (ToMePass) -> after (onnxruntime) -> compare at
1e-4, fp32, same dst per cell. Random activations: no ties in the similarity sort.
"""

from __future__ import annotations

import json

import pytest

from passes.onnxutil import get_model_meta
from passes.tome import ToMeConfig, ToMePass
from tests.reference.common import check, eager, feed, inputs, max_err, partition_feed, rand_idx, runner
from tests.reference.tome import ToMeHooks

# grid, ratio, locations, max src per band (-> bands)
CASES = [((4, 4), 0.5, ("attn",), 3840),
         ((6, 6), 0.3, ("attn",), 3840),
         ((6, 6), 0.4, ("attn", "mlp"), 3840),
         ((8, 8), 0.5, ("attn",), 24),   # 2 bands of 24 src, 16 merged each
         ((8, 8), 0.4, ("attn", "mlp"), 12)]  # 4 bands of 12 src


def _case_id(case) -> str:
    grid, ratio, locs, band = case
    return f"{grid[0]}x{grid[1]}-{ratio}-{'+'.join(locs)}" + ("-banded" if band < 3840 else "")


@pytest.mark.parametrize("metric", ["sublayer", "block"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_graph_equals_tomesd(exported, case, metric):
    grid, ratio, locations, band = case
    model, base, d = exported("dit", grid)
    res = ToMePass(ToMeConfig(ratio, locations=locations, max_src_per_band=band, metric=metric))(base)
    meta = json.loads(get_model_meta(res.model)["tome"])
    assert meta["metric"] == metric and (meta["bands"] > 1) == (band < 3840)
    run = runner(d, res.model, f"ref_tome_{_case_id(case)}_{metric}.onnx")
    for batch, seed in ((1, 5), (2, 6)):
        idx = rand_idx(grid, seed)
        inp = inputs(model, batch, grid, seed)
        out = run.infer(feed(inp, **partition_feed(grid, idx, meta["bands"])))["sample"]
        ref = ToMeHooks(model, meta["sites"], grid, meta["r"], idx, metric=metric, bands=meta["bands"])
        with ref.installed():
            want = eager(model, inp)
        check(out, want, f"{_case_id(case)} metric={metric} batch {batch}: graph vs tomesd")


def test_a_wrong_reference_is_caught(exported):
    """tomesd with a sum instead of a mean, or matched on the other metric, is far from the graph."""
    grid = (6, 6)
    model, base, d = exported("dit", grid)
    res = ToMePass(ToMeConfig(0.5, metric="sublayer"))(base)
    meta = json.loads(get_model_meta(res.model)["tome"])
    run = runner(d, res.model, "ref_tome_wrong.onnx")
    idx = rand_idx(grid, 1)
    inp = inputs(model, 2, grid, 1)
    out = run.infer(feed(inp, **partition_feed(grid, idx)))["sample"]
    for kwargs in ({"mode": "sum", "metric": "sublayer"}, {"metric": "block"}):
        with ToMeHooks(model, meta["sites"], grid, meta["r"], idx, **kwargs).installed():
            wrong = eager(model, inp)
        assert max_err(out, wrong) > 1e-3, f"a reference with {kwargs} agrees with the graph"
