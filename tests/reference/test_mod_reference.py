"""MoD routing graphs against DiffCR's token routing as patched block forwards (tests.reference.mod).

before (eager DiT with the reference's routed forwards) -> transform (ModPass) -> after (onnxruntime) ->
compare at 1e-4, fp32. Random router weights: no ties in the top-k of the scores.
"""

from __future__ import annotations

import pytest
import torch

from passes.counts import count_feed
from passes.mod import ModConfig, ModPass, bucket_values
from tests.reference.common import check, eager, feed, inputs, max_err, runner
from tests.reference.mod import mod_routing

CHANNELS = 16  # tests.helpers.tiny_dit


def _routers(seed: int) -> tuple[list[torch.Tensor], list[float]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(CHANNELS, generator=g) * 0.5 for _ in range(2)], [0.1, -0.2]


@pytest.mark.parametrize("dynamic", [(), (0, 1)], ids=["constant-k", "count-k"])
@pytest.mark.parametrize("grid,caps", [((4, 4), [10, 5]), ((6, 6), [36, 12]), ((8, 8), [40, 20])],
                         ids=["4x4-10-5", "6x6-full-12", "8x8-40-20"])
def test_graph_equals_routing_reference(exported, grid, caps, dynamic):
    """Capacities as graph constants, and as count inputs (the plan's graphs: k = N is a TopK over all)."""
    model, base, d = exported("dit", grid)
    ws, bs = _routers(3)
    cfg = ModConfig(tuple(caps), tuple(w.numpy().copy() for w in ws), tuple(bs), dynamic)
    counts = count_feed(bucket_values(caps, dynamic)["counts"])
    run = runner(d, ModPass(cfg)(base).model, f"ref_mod_{'_'.join(map(str, caps))}_{len(dynamic)}.onnx")
    for batch, seed in ((1, 7), (2, 8)):
        inp = inputs(model, batch, grid, seed)
        out = run.infer(feed(inp, **counts))["sample"]
        with mod_routing(model, caps, ws, bs):
            want = eager(model, inp)
        check(out, want, f"{grid} {caps} batch {batch}: graph vs reference")
        if batch == 2:  # a router score that does not scale the update is far from the graph
            with mod_routing(model, caps, ws, bs, scale=False):
                assert max_err(out, eager(model, inp)) > 1e-3
    assert "forward" not in vars(model.transformer_blocks[0])
