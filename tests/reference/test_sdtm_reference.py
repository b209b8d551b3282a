"""SDTM bucket graphs against the released code's window merge (SSM) and detail merge (FIDM), whole model.

before (eager DiT with tests.reference.sdtm's hooks) -> transform (SdtmPass) -> after (onnxruntime) ->
compare ``sample`` at 1e-4 and the counters exactly, fp32. Counters are random reals (no ties in the
window scores or in the stalest-token choice); activations random (no ties in the similarity sort).
"""

from __future__ import annotations

import json

import pytest
import torch

from passes.onnxutil import get_model_meta
from passes.counts import count_feed
from passes.sdtm import (
    COUNTER_INPUT,
    COUNTER_OUTPUT,
    SdtmConfig,
    SdtmPass,
    bucket_values,
    cache_input,
    partition_from_counter,
)
from tests.helpers import assert_close
from tests.reference.common import check, eager, feed, inputs, max_err, partition_feed, runner
from tests.reference.sdtm import SdtmHooks, stalest_dst

ALL = ("attn", "joint", "mlp")
CASES = {
    "window-attn+mlp-blend": ((6, 6), SdtmConfig(merge="window", ratio=0.45, locations=ALL)),
    "window-nocache": ((4, 4), SdtmConfig(merge="window", ratio=0.5, locations=ALL, blend=None, a_s=0.5)),
    "detail-mlp-blend": ((6, 6), SdtmConfig(merge="bipartite", ratio=0.35, locations=("mlp",))),
    "detail-attn+mlp": ((6, 6), SdtmConfig(merge="bipartite", ratio=0.3, locations=ALL, blend=None)),
    "detail-banded": ((8, 8), SdtmConfig(merge="bipartite", ratio=0.4, locations=("mlp",), max_src_per_band=12)),
}


def _run_case(exported, name: str, batch: int, seed: int, reference_kwargs: dict | None = None):
    grid, cfg = CASES[name]
    model, base, d = exported("dit", grid)
    res = SdtmPass(cfg)(base)
    # the bucket's k or r: a count input of the graph, in the bucket's meta
    values = bucket_values(cfg, grid)
    meta = {**json.loads(get_model_meta(res.model)["sdtm"]), **values}
    run = runner(d, res.model, f"ref_sdtm_{name}.onnx")
    n = grid[0] * grid[1]
    g = torch.Generator().manual_seed(seed)
    counter = torch.rand(batch, n, generator=g) * 5
    caches = {p: torch.randn(batch, n, meta["widths"][p], generator=g) for p in meta["cache_inputs"]}
    extra = {COUNTER_INPUT: counter.numpy(), **{cache_input(p): c.numpy() for p, c in caches.items()},
             **count_feed(values["counts"])}
    idx = None
    if meta["merge"] == "bipartite":
        # the runtime's dst choice sums the counters over the batch (CFG halves share one partition)
        idx = stalest_dst(counter.sum(0), grid)
        extra.update(partition_feed(grid, idx, meta["bands"]))
        part, _ = partition_from_counter(grid, counter.numpy(), None, meta["bands"])
        assert (part == extra["tome_partition"]).all(), "the runtime's dst is not the stalest token"
    inp = inputs(model, batch, grid, seed)
    out = run.infer(feed(inp, **extra))
    ref = SdtmHooks(model, {**meta, **(reference_kwargs or {})}, counter, idx, caches)
    with ref.installed():
        want = eager(model, inp)
    return meta, out, want, ref.counter


@pytest.mark.parametrize("name", list(CASES))
def test_graph_equals_released_sdtm(exported, name):
    for batch, seed in ((1, 3), (2, 4)):
        meta, out, want, counter = _run_case(exported, name, batch, seed)
        assert (meta["merge"] == "bipartite") == name.startswith("detail")
        check(out["sample"], want, f"{name} batch {batch}: graph vs reference")
        assert_close(out[COUNTER_OUTPUT], counter.numpy(), 1e-5, f"{name} batch {batch}: counters")


def test_a_wrong_reference_is_caught(exported):
    """The window merge without the staleness term, or a different blend weight, is far from the graph."""
    for name, wrong in (("window-nocache", {"a_s": 0.0}), ("window-attn+mlp-blend", {"blend": 0.5})):
        _, out, want, _ = _run_case(exported, name, 2, 4, wrong)
        assert max_err(out["sample"], want) > 1e-3, f"{name}: a reference with {wrong} agrees with the graph"
