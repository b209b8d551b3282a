"""CA-ToMe's match and apply graph variants: structure, TensorRT, and equality with the eager twin.

before (eager twin) -> transform (CaToMePass) -> structure (index I/O) -> after (ORT) -> compare, fp32.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.measure import feed_of, max_abs
from export.methods.catome import apply_fidelity, match_fidelity, twin_forward
from export.onnx_export import example_inputs
from passes.tome import ToMeConfig, ToMePass, eager as tome_math
from passes.catome import INDEX_PREFIX, OUTPUT_PREFIX, CaToMePass, as_cache_feed
from passes.catome.twin import to_feed
from passes.errors import DitmergeError
from passes.onnxutil import PROVENANCE_KEY, get_model_meta, save_checked
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, draw_partition
from passes.trt_check import check_tensorrt
from runtime.runners import OrtRunner, SharedWeights
from tests.helpers import METHOD_ATOL

GRID = (4, 4)


def _variants(base, r: int, **cfg):
    return {v: CaToMePass(ToMeConfig(0.0, r=r, **cfg), v, bucket=0)(base).model for v in ("match", "apply")}


def _meta(model) -> dict:
    meta = json.loads(get_model_meta(model)["tome"])
    meta["blocks"] = list(json.loads(get_model_meta(model)["catome"])["indices"])
    return meta


def _runner(d, model, name):
    save_checked(model, d / name)
    return OrtRunner(d / name, ["CPUExecutionProvider"], SharedWeights(d / "weights.bin"))


def test_indices_rebuild_the_matching_they_came_from():
    torch.manual_seed(0)
    x = torch.randn(2, 36, 8)
    part, inv = (torch.from_numpy(a) for a in draw_partition((6, 6), rng=np.random.default_rng(1), bands=3))
    mt = tome_math.match(x, part, inv, num_src=27, r=9, bands=3)
    again = tome_math.from_indices(**mt.indices(), num_src=27)
    merged = tome_math.merge(x, mt)
    assert torch.equal(tome_math.merge(x, again), merged)
    assert torch.equal(tome_math.unmerge(merged, again), tome_math.unmerge(merged, mt))
    assert torch.equal(again.assign, mt.assign) and torch.equal(again.count, mt.count)


def test_variants_expose_and_take_the_indices_and_pass_the_tensorrt_check(exported):
    _, base, _ = exported("dit", GRID)
    g = _variants(base, r=5)
    blocks = ["transformer_blocks.0", "transformer_blocks.1"]
    names = {f"{INDEX_PREFIX}{b}/{k}" for b in blocks for k in ("order", "node_idx")} | {
        f"{INDEX_PREFIX}partition", f"{INDEX_PREFIX}partition_inv"}
    # match outputs catome_idx_out/..., apply takes the same tensors as catome_idx/...
    outs = {k: o for k, o in as_cache_feed({o.name: o for o in g["match"].graph.output}).items()}
    ins = {i.name: i for i in g["apply"].graph.input}
    assert set(outs) == names and {o.name for o in g["match"].graph.output} - {"sample"} == {
        n.replace(INDEX_PREFIX, OUTPUT_PREFIX) for n in names}
    assert names <= set(ins) and not {PARTITION_INPUT, PARTITION_INV_INPUT} & set(ins)
    assert {i.name for i in g["match"].graph.input} >= {PARTITION_INPUT, PARTITION_INV_INPUT}
    for name in names:  # static apart from the batch axis, int64, the same on both sides
        dims_in = [d.dim_value or d.dim_param for d in ins[name].type.tensor_type.shape.dim]
        dims_out = [d.dim_value or d.dim_param for d in outs[name].type.tensor_type.shape.dim]
        assert dims_in == dims_out and all(isinstance(d, int) for d in dims_in[1:])
        assert ins[name].type.tensor_type.elem_type == outs[name].type.tensor_type.elem_type == 7
    shapes = {n.split("/")[-1]: [d.dim_value or d.dim_param for d in ins[n].type.tensor_type.shape.dim]
              for n in names if n.startswith(f"{INDEX_PREFIX}{blocks[0]}/") or n.count("/") == 1}
    # what is cached does not depend on r: src order and best dst [B, K, Na], and the partition [N]
    assert shapes == {"order": ["batch", 1, 12], "node_idx": ["batch", 1, 12], "partition": [16], "partition_inv": [16]}
    # apply computes no similarity: no sort, no arg-max among the inserted nodes
    inserted = [n.op_type for n in g["apply"].graph.node if any(p.key == PROVENANCE_KEY for p in n.metadata_props)]
    assert inserted and not {"TopK", "ArgMax", "ReduceMax"} & set(inserted)
    assert check_tensorrt(g["match"]) == [] and check_tensorrt(g["apply"]) == []


def test_pass_contract(exported):
    _, base, _ = exported("dit", GRID)
    assert not CaToMePass(ToMeConfig(0.0, r=0), "match")(base).modified
    match = CaToMePass(ToMeConfig(0.0, r=5), "match")(base).model
    assert not CaToMePass(ToMeConfig(0.0, r=5), "match")(match).modified
    with pytest.raises(DitmergeError, match="already carries a ToMe merge"):
        CaToMePass(ToMeConfig(0.0, r=5), "apply")(match)
    with pytest.raises(DitmergeError, match="already carries a ToMe merge"):
        CaToMePass(ToMeConfig(0.0, r=5), "match")(ToMePass(ToMeConfig(0.5))(base).model)
    with pytest.raises(DitmergeError, match="unknown CA-ToMe variant"):
        CaToMePass(ToMeConfig(0.0, r=5), "cached")
    with pytest.raises(DitmergeError, match=r"r=13 is outside \[0, 12\]"):
        CaToMePass(ToMeConfig(0.0, r=13), "match")(base)


@pytest.mark.parametrize("family,grid,band_limit", [("dit", (4, 4), 3840), ("dit", (6, 6), 9), ("pixart", (4, 4), 3840)],
                         ids=["dit-4x4", "dit-6x6-banded", "pixart-4x4"])
def test_match_and_apply_equal_the_twin(exported, tmp_path, family, grid, band_limit):
    model, base, d = exported(family, grid)
    n = grid[0] * grid[1]
    g = _variants(base, r=n // 2 - n // 8, locations=("attn", "xattn", "joint", "mlp"), max_src_per_band=band_limit)
    meta = _meta(g["match"])
    assert meta["bands"] == (3 if band_limit == 9 else 1)
    match, apply = _runner(d, g["match"], f"m{band_limit}.onnx"), _runner(d, g["apply"], f"a{band_limit}.onnx")
    step_a = example_inputs(model, 2, grid, seed=21)  # the checkpoint step whose matching is cached
    step_b = example_inputs(model, 2, grid, seed=22)  # a later step that reuses it

    # match variant vs twin, same partition: the sample and every index tensor
    assert match_fidelity(model, match.infer, step_a, meta, grid, seed=3) <= METHOD_ATOL
    # apply variant with indices cached at step A, run on step B, vs the twin merging with the same indices
    _, cached = twin_forward(model, meta, grid, step_a, seed=3)
    err = apply_fidelity(model, apply.infer, step_b, meta, to_feed(cached))
    assert err <= METHOD_ATOL, f"{family} {grid}: apply vs twin max abs error {err:.2e}"

    # the graph's own outputs are the cache: apply on the same step with them reproduces match
    part, inv = draw_partition(grid, rng=np.random.default_rng(3), bands=meta["bands"])
    out_a = match.infer({**feed_of(step_a), PARTITION_INPUT: part, PARTITION_INV_INPUT: inv})
    cache = as_cache_feed(out_a)
    assert max_abs(apply.infer({**feed_of(step_a), **cache})["sample"], out_a["sample"]) <= METHOD_ATOL
    # ... and on step B it merges differently from a fresh matching (the cache is really used) and from no merge
    fresh = match.infer({**feed_of(step_b), PARTITION_INPUT: part, PARTITION_INV_INPUT: inv})["sample"]
    reused = apply.infer({**feed_of(step_b), **cache})["sample"]
    unmerged = OrtRunner(d / "base.onnx", ["CPUExecutionProvider"], SharedWeights(d / "weights.bin")).infer(
        feed_of(step_b))["sample"]
    assert max_abs(reused, fresh) > 1e-3 and max_abs(reused, unmerged) > 1e-3


def test_with_r_from_shapes_one_pair_of_graphs_serves_every_r(exported):
    """Per-block r as count inputs: graphs of different calibrations are identical and equal the baked ones."""
    from passes.counts import count_feed
    from passes.tome import strip_bucket_meta

    model, base, d = exported("dit", GRID)
    blocks = ["transformer_blocks.0", "transformer_blocks.1"]
    dyn = {v: [strip_bucket_meta(CaToMePass(ToMeConfig(0.0, r=4, r_blocks=dict(zip(blocks, rb)), dynamic=True), v)(base).model)
               for rb in ((4, 8), (2, 6))] for v in ("match", "apply")}
    for v, (a, b) in dyn.items():
        assert a.SerializeToString() == b.SerializeToString(), v
    r_blocks = dict(zip(blocks, (4, 8)))
    baked = {v: CaToMePass(ToMeConfig(0.0, r=6, r_blocks=r_blocks), v)(base).model for v in ("match", "apply")}
    counts = count_feed({"tome_r_0": 4, "tome_r_1": 8})
    step_a, step_b = feed_of(example_inputs(model, 2, GRID, seed=5)), feed_of(example_inputs(model, 2, GRID, seed=6))
    part, inv = draw_partition(GRID, rng=np.random.default_rng(1))
    run = {k: _runner(d, g, f"dyn_{k}.onnx") for k, g in (("match", dyn["match"][0]), ("apply", dyn["apply"][0]),
                                                           ("bmatch", baked["match"]), ("bapply", baked["apply"]))}
    got = run["match"].infer({**step_a, PARTITION_INPUT: part, PARTITION_INV_INPUT: inv, **counts})
    want = run["bmatch"].infer({**step_a, PARTITION_INPUT: part, PARTITION_INV_INPUT: inv})
    assert max_abs(got["sample"], want["sample"]) <= METHOD_ATOL
    cache = as_cache_feed(got)
    reused = run["apply"].infer({**step_b, **cache, **counts})["sample"]
    assert max_abs(reused, run["bapply"].infer({**step_b, **cache})["sample"]) <= METHOD_ATOL
    # the counts reach the apply graph: other r on the same cache merges differently
    other = run["apply"].infer({**step_b, **cache, **count_feed({"tome_r_0": 2, "tome_r_1": 2})})["sample"]
    assert max_abs(other, reused) > 1e-3
