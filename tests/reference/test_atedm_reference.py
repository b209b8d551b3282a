"""AT-EDM graphs against G-WPR pruning and nearest-kept refill written from the paper (tests.reference.atedm).

before (eager DiT with the reference's hooks) -> transform (ATEDMPass) -> after (onnxruntime) -> compare at
1e-4, fp32. Random activations: no ties in the top-k of the scores or in the nearest kept token.
"""

from __future__ import annotations

import json

import pytest

from passes.atedm import ATEDMConfig, ATEDMPass, bucket_values
from passes.counts import count_feed
from passes.onnxutil import get_model_meta
from tests.reference.atedm import ATEDMHooks
from tests.reference.common import check, eager, feed, inputs, max_err, runner

# grid, ratio, prune layer, stride (1: the paper's full attention map), iterations, refill
CASES = [((6, 6), 0.5, 0, 1, 5, "copy"),
         ((6, 6), 0.3, 0, 4, 5, "copy"),
         ((6, 6), 0.5, 0, 3, 2, "delta"),
         ((8, 8), 0.6, 0, 1, 5, "delta")]


def _graph(exported, case):
    grid, ratio, layer, stride, iters, refill = case
    model, base, d = exported("dit", grid)
    cfg = ATEDMConfig(ratio, prune_layer=layer, stride=stride, iterations=iters, refill=refill)
    res = ATEDMPass(cfg)(base)
    meta = {**json.loads(get_model_meta(res.model)["atedm"]), **bucket_values(cfg, grid)}  # kept: a count input
    name = f"ref_atedm_{grid[0]}_{ratio}_{stride}_{iters}_{refill}.onnx"
    return model, meta, runner(d, res.model, name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-{c[1]}-stride{c[3]}-it{c[4]}-{c[5]}")
def test_graph_equals_gwpr_reference(exported, case):
    grid, *_ = case
    model, meta, run = _graph(exported, case)
    for batch, seed in ((1, 11), (2, 12)):
        inp = inputs(model, batch, grid, seed)
        out = run.infer(feed(inp, **count_feed(meta["counts"])))["sample"]
        ref = ATEDMHooks(model, meta["prune_block"], meta["last_block"], meta["kept"], meta["stride"],
                         meta["iterations"], meta["refill"])
        with ref.installed():
            want = eager(model, inp)
        check(out, want, f"{case} batch {batch}: graph vs reference")


def test_a_wrong_reference_is_caught(exported):
    """One WPR iteration instead of five, or the other refill, is far from the graph."""
    case = ((6, 6), 0.5, 0, 1, 5, "copy")
    model, meta, run = _graph(exported, case)
    inp = inputs(model, 2, (6, 6), 12)
    out = run.infer(feed(inp, **count_feed(meta["counts"])))["sample"]
    for wrong in ({"iterations": 1}, {"refill": "delta"}):
        kw = {"stride": 1, "iterations": 5, "refill": "copy", **wrong}
        with ATEDMHooks(model, meta["prune_block"], meta["last_block"], meta["kept"], **kw).installed():
            bad = eager(model, inp)
        assert max_err(out, bad) > 1e-3, f"a reference with {wrong} agrees with the graph"
