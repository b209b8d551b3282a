"""AT-EDM: the pruned graph against its eager twin (DiT, PixArt), the math against its definition, DSAP.

before (eager) -> transform (ATEDMPass) -> structure (fused attention kept, later blocks on k tokens)
-> after (ORT) -> compare with the twin.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from export.buckets import BucketSpec
from export.measure import feed_of, max_abs
from export.methods import get_method
from export.methods.atedm import twin_forward
from export.onnx_export import example_inputs
from passes.atedm import ATEDMConfig, ATEDMPass, bucket_values, eager as atedm_math, find_blocks
from passes.counts import count_feed
from passes.errors import DitmergeError
from passes.locate import tensor_shapes
from passes.onnxutil import get_model_meta, infer_shapes, save_checked
from runtime.runners import OrtRunner, SharedWeights
from tests.count_profiles import assert_tensorrt_ok
from tests.helpers import METHOD_ATOL, assert_close

GRID = (6, 6)


def _runner(d, graph):
    return OrtRunner(d / graph, ["CPUExecutionProvider"], SharedWeights(d / "weights.bin"))


def _ops(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


@pytest.mark.parametrize("family", ["dit", "pixart"])
@pytest.mark.parametrize("importance,refill", [("gwpr", "delta"), ("gwpr", "copy"), ("static", "delta")])
def test_pruned_graph_equals_twin_and_differs_from_unpruned(exported, family, importance, refill):
    model, base, d = exported(family, GRID)
    cfg = ATEDMConfig(0.5, prune_layer=0, stride=4, iterations=5, importance=importance, refill=refill)
    res = ATEDMPass(cfg)(base)
    values = bucket_values(cfg, GRID)
    assert res.modified
    assert_tensorrt_ok(res.model, values["counts"])
    # the bucket's kept tokens are a count input, not in the graph's metadata
    meta = {**json.loads(get_model_meta(res.model)["atedm"]), **values}
    assert "kept" not in json.loads(get_model_meta(res.model)["atedm"])
    assert meta["kept"] == 18 and meta["sample_rows"] == 9 and meta["prune_block"] == "transformer_blocks.0"

    # the fused attention ops are all still there, and the only Softmax is the importance's (G-WPR only)
    assert len(_ops(res.model, "Attention")) == len(_ops(base, "Attention"))
    assert len(_ops(res.model, "Softmax")) - len(_ops(base, "Softmax")) == (importance == "gwpr")
    # the last block runs on the kept tokens, the output layer on the full grid again
    shapes = tensor_shapes(infer_shapes(res.model))
    last = find_blocks(infer_shapes(base), 36)[-1]
    assert shapes[last.output][1][2:] == [16]  # [B, kept, C]: kept follows the count input
    assert shapes["sample"][1][1:] == tensor_shapes(infer_shapes(base))["sample"][1][1:]

    save_checked(res.model, d / f"atedm_{importance}_{refill}.onnx")
    pruned, unpruned = _runner(d, f"atedm_{importance}_{refill}.onnx"), _runner(d, "base.onnx")
    for batch in (1, 2):
        inputs = example_inputs(model, batch, GRID, seed=20 + batch)
        out = pruned.infer({**feed_of(inputs), **count_feed(meta["counts"])})["sample"]
        assert_close(out, twin_forward(model, meta, inputs, GRID), METHOD_ATOL, f"{family} batch {batch} vs twin")
        diff = max_abs(out, unpruned.infer(feed_of(inputs))["sample"])
        assert diff > 1e-3, f"{family}: the pruned graph computes what the unpruned one does ({diff:.1e})"


def test_one_graph_serves_every_ratio(exported):
    """Configs that differ only in ratio give byte-identical graphs; each kept count matches its twin, and a
    count that is not the bucket's (the twin at 18, the graph fed 12) is caught."""
    model, base, d = exported("dit", GRID)
    cfgs = [ATEDMConfig(r, prune_layer=0, stride=2, iterations=3) for r in (0.3, 0.5, 0.7)]
    graphs = [ATEDMPass(c, bucket=i)(base).model for i, c in enumerate(cfgs)]
    assert len({g.SerializeToString() for g in graphs}) == 1
    save_checked(graphs[0], d / "atedm_shared.onnx")
    run = _runner(d, "atedm_shared.onnx")
    inputs = example_inputs(model, 2, GRID, seed=3)
    meta0 = json.loads(get_model_meta(graphs[0])["atedm"])
    outs = []
    for cfg in cfgs:
        meta = {**meta0, **bucket_values(cfg, GRID)}
        assert_tensorrt_ok(graphs[0], meta["counts"])
        out = run.infer({**feed_of(inputs), **count_feed(meta["counts"])})["sample"]
        assert_close(out, twin_forward(model, meta, inputs, GRID), METHOD_ATOL, f"ratio {cfg.ratio} vs twin")
        outs.append(out)
    assert max_abs(outs[0], outs[2]) > 1e-3
    wrong = {**meta0, **bucket_values(cfgs[1], GRID)}
    assert max_abs(run.infer({**feed_of(inputs), **count_feed(bucket_values(cfgs[2], GRID)["counts"])})["sample"],
                   twin_forward(model, wrong, inputs, GRID)) > 1e-3


def test_pass_is_idempotent_and_refuses_a_second_pruning(exported):
    _, base, _ = exported("dit", GRID)
    once = ATEDMPass(ATEDMConfig(0.5, prune_layer=0))(base).model
    assert not ATEDMPass(ATEDMConfig(0.5, prune_layer=0))(once).modified
    # another ratio is the same graph (kept is a count input); another stride is another pruning
    assert not ATEDMPass(ATEDMConfig(0.25, prune_layer=0))(once).modified
    with pytest.raises(DitmergeError, match="already carries"):
        ATEDMPass(ATEDMConfig(0.5, prune_layer=0, stride=2))(once)
    assert not ATEDMPass(ATEDMConfig(0.0))(base).modified


@pytest.mark.parametrize("cfg,grid,message", [
    (ATEDMConfig(1.0), (6, 6), "ratio must be"),
    (ATEDMConfig(0.5, stride=0), (6, 6), "stride must be"),
    (ATEDMConfig(0.5, iterations=0), (6, 6), "iterations must be"),
    (ATEDMConfig(0.5, importance="magic"), (6, 6), "importance must be"),
    (ATEDMConfig(0.5, refill="magic"), (6, 6), "refill must be"),
    (ATEDMConfig(0.01), (64, 64), "TensorRT's TopK keeps at most 3840"),
])
def test_bad_options_are_user_errors(cfg, grid, message):
    with pytest.raises(DitmergeError, match=message):
        cfg.validate(grid)


def test_pruning_layer_must_leave_a_block_to_prune(exported):
    _, base, _ = exported("dit", GRID)
    with pytest.raises(DitmergeError, match="at least one must run on the kept tokens"):
        ATEDMPass(ATEDMConfig(0.5, prune_layer=1))(base)  # the tiny DiT has 2 blocks


def test_importance_with_every_row_is_weighted_pagerank():
    """stride 1: the score is s M^t (row-stochastic M = head-mean softmax), as ZeroTPrune's WPR."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 10, 4, generator=g), torch.randn(2, 3, 10, 4, generator=g)
    s = atedm_math.importance(q, k, 0.5, stride=1, iterations=3)
    m = ((q @ k.transpose(-1, -2)) * 0.5).softmax(-1).mean(1).double()
    ref = torch.full((2, 1, 10), 0.1, dtype=torch.float64) @ m @ m @ m
    assert torch.allclose(s.double(), ref, atol=1e-6)
    # strided: only every 3rd query votes; it equals power iteration on M with the other rows zeroed
    s3 = atedm_math.importance(q, k, 0.5, stride=3, iterations=3)
    p = ((q[:, :, ::3] @ k.transpose(-1, -2)) * 0.5).softmax(-1).mean(1).double()
    mz = torch.zeros(2, 10, 10, dtype=torch.float64)
    mz[:, ::3] = p
    v = torch.full((2, 1, 10), 0.1, dtype=torch.float64)
    for _ in range(3):
        v = v @ mz
        v = v / v.sum(-1, keepdim=True)
    assert torch.allclose(s3.double(), v, atol=1e-6)


def test_refill_copies_the_most_similar_kept_token():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 5, generator=g)
    scores = torch.rand(2, 1, 12, generator=g)
    pr = atedm_math.select(x, scores, kept=4)
    assert torch.equal(pr.keep, scores.squeeze(1).topk(4, -1).indices)
    y = atedm_math.prune(x, pr) * 2 + 1  # what the later blocks make of the kept tokens
    copy, delta = atedm_math.refill(y, pr), atedm_math.refill(y, pr, x)
    for b in range(2):
        kept = pr.keep[b].tolist()
        for p in range(12):
            if p in kept:
                assert torch.equal(copy[b, p], y[b, kept.index(p)])
                assert torch.allclose(delta[b, p], y[b, kept.index(p)], atol=1e-6)
            else:
                cos = torch.nn.functional.cosine_similarity(x[b, p][None], x[b, kept], dim=-1)
                j = int(cos.argmax())
                assert torch.equal(copy[b, p], y[b, j])
                assert torch.allclose(delta[b, p], x[b, p] + y[b, j] - x[b, kept[j]], atol=1e-6)


def test_dsap_prunes_later_in_the_early_buckets():
    specs = [BucketSpec(667, 999, 0.5), BucketSpec(334, 666, 0.5), BucketSpec(0, 333, 0.5)]
    on = get_method("atedm", {"prune_layer": "1"})
    assert [(c.prune_layer, c.ratio) for c in (on.config(s, i) for i, s in enumerate(specs))] == [
        (2, 0.5), (1, 0.5), (1, 0.5)]
    scaled = get_method("atedm", {"dsap_buckets": "2", "dsap_shift": "0", "dsap_scale": "0.5"})
    assert [scaled.config(s, i).ratio for i, s in enumerate(specs)] == [0.25, 0.25, 0.5]
    off = get_method("atedm", {"dsap": "off"})
    assert {(off.config(s, i).prune_layer, off.config(s, i).ratio) for i, s in enumerate(specs)} == {(1, 0.5)}
    assert on.stamp(specs[0], 0) != off.stamp(specs[0], 0)
    with pytest.raises(DitmergeError, match="DSAP prunes less"):
        get_method("atedm", {"dsap_scale": "2"}).validate(specs, (16, 16))


def test_plan_with_dsap_builds_and_measures(tmp_path):
    """build_plan end to end: per-bucket pruning layers (DSAP), fidelity against the twin, TensorRT check.

    A three-block DiT: the early bucket prunes after block 1, the late one after block 0.
    """
    from export.build import build_plan
    from tests.helpers import tiny_dit

    tiny_dit(sample_size=GRID[0] * 2, layers=3, seed=1).save_pretrained(tmp_path / "model")
    manifest = build_plan(str(tmp_path / "model"), method="atedm", buckets="0.3,0.5", out=tmp_path / "plan",
                          options={"prune_layer": 0, "stride": 1, "iterations": 2}, measure=True, repeats=1,
                          quality_samples=0, progress=False)
    b0, b1 = manifest["buckets"]
    assert b0["method_meta"]["prune_block"] == "transformer_blocks.1" and b0["method_meta"]["dsap_early"]
    assert b1["method_meta"]["prune_block"] == "transformer_blocks.0" and not b1["method_meta"]["dsap_early"]
    assert (b0["kept_tokens"], b1["kept_tokens"]) == (26, 18)
    for b in (b0, b1):
        assert b["fidelity_max_abs"] <= METHOD_ATOL and b["flops_rel"] < 1
        assert_tensorrt_ok(onnx.load(tmp_path / "plan" / b["graph"], load_external_data=False), b["counts"])
    assert manifest["method"]["params"]["dsap"] is True


def test_buckets_that_differ_in_ratio_share_one_graph_file(tmp_path):
    """build_plan on builtin:tiny-dit, 4 buckets: the DSAP bucket prunes one block later (its own graph),
    the other 3 differ only in ratio and store one graph; every bucket matches its twin."""
    from export.build import build_plan

    out = tmp_path / "plan"
    manifest = build_plan("builtin:tiny-dit", method="atedm", buckets="0.3,0.5,0.4,0.2", out=out, measure=True,
                          repeats=2, quality_samples=0, progress=False)
    buckets = manifest["buckets"]
    files = {b["graph"] for b in buckets}
    assert len(files) == 2 < len(buckets), files
    assert len({b["graph"] for b in buckets[1:]}) == 1 and buckets[0]["graph"] != buckets[1]["graph"]
    assert len({b["counts"]["atedm_kept"] for b in buckets[1:]}) == 3
    for b in buckets:
        assert b["fidelity_max_abs"] <= METHOD_ATOL, (b["index"], b["fidelity"])
        assert b["counts"] == {"atedm_kept": b["kept_tokens"]}
        assert_tensorrt_ok(onnx.load(out / b["graph"], load_external_data=False), b["counts"])
    assert sorted(f.name for f in out.glob("bucket_*.onnx")) == sorted(files)
