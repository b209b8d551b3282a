"""SDTM bucket graphs (every variant) against the eager twin on tiny DiT and PixArt models, fp32.

before (eager twin) -> transform (SdtmPass) -> structure (inputs/outputs, TensorRT check) -> after (ORT) -> compare.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.measure import feed_of, max_abs
from export.onnx_export import eager_forward, example_inputs
from passes.onnxutil import get_model_meta, save_checked
from passes.counts import count_feed
from passes.sdtm import (
    COUNTER_INPUT,
    COUNTER_OUTPUT,
    SdtmConfig,
    SdtmPass,
    bucket_values,
    cache_input,
    meta_counts,
    partition_from_counter,
)
from passes.sdtm.twin import SdtmTwin
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT
from passes.trt_check import check_tensorrt
from runtime.runners import OrtRunner, SharedWeights
from tests.count_profiles import assert_tensorrt_ok
from tests.helpers import METHOD_ATOL, assert_close

CONFIGS = {
    "structure": SdtmConfig(merge="window", ratio=0.45, locations=("attn", "joint", "mlp")),
    "detail": SdtmConfig(merge="bipartite", ratio=0.35, locations=("mlp",)),
    "structure-nocache": SdtmConfig(merge="window", ratio=0.3, locations=("attn", "joint", "mlp"), blend=None),
    "detail-attn": SdtmConfig(merge="bipartite", ratio=0.3, locations=("attn", "joint", "mlp")),
}
CASES = [("dit", (6, 6), name) for name in CONFIGS] + [("pixart", (4, 4), "structure"), ("pixart", (4, 4), "detail"),
                                                       ("dit", (5, 5), "structure")]


def _meta(model, cfg: SdtmConfig, grid) -> dict:
    """A bucket's meta as the method writes it: the graph's metadata and the bucket's own values (k or r)."""
    meta = json.loads(get_model_meta(model)["sdtm"])
    return meta if meta["variant"] == "full" else {**meta, **bucket_values(cfg, grid)}


def _runner(d, graph):
    return OrtRunner(d / graph, ["CPUExecutionProvider"], SharedWeights(d / "weights.bin"))


def _extra(meta: dict, batch: int, grid, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = grid[0] * grid[1]
    counter = rng.integers(0, 6, (batch, n)).astype(np.float32)
    feed = {COUNTER_INPUT: counter, **count_feed(meta_counts(meta))}
    if meta["merge"] == "bipartite":
        feed[PARTITION_INPUT], feed[PARTITION_INV_INPUT] = partition_from_counter(grid, counter, rng, meta["bands"])
    for path, name in meta["cache_inputs"].items():
        feed[name] = rng.standard_normal((batch, n, _width(meta, path))).astype(np.float32)
    return feed


def _width(meta, path):
    return meta["widths"][path]


def _twin_run(model, meta, inputs, extra):
    twin = SdtmTwin(model, meta)
    part = (extra[PARTITION_INPUT], extra[PARTITION_INV_INPUT]) if PARTITION_INPUT in extra else None
    twin.set_inputs(counter=extra.get(COUNTER_INPUT), partition=part,
                    caches={p: extra[cache_input(p)] for p in meta.get("cache_inputs", {})})
    with twin.installed():
        ref = eager_forward(model, inputs).numpy()
    return ref, twin.outputs


@pytest.mark.parametrize("family,grid,name", CASES, ids=[f"{f}-{g[0]}x{g[1]}-{n}" for f, g, n in CASES])
def test_merged_graph_equals_twin(exported, family, grid, name):
    model, base, d = exported(family, grid)
    res = SdtmPass(CONFIGS[name])(base)
    assert res.modified
    meta = _meta(res.model, CONFIGS[name], grid)
    assert_tensorrt_ok(res.model, meta["counts"])
    kinds = {s.rsplit(".", 1)[1] for s in meta["sites"]}
    assert kinds == ({"ff"} if CONFIGS[name].locations == ("mlp",) else {"attn1", "ff"}), meta["sites"]
    save_checked(res.model, d / f"sdtm_{name}.onnx")
    merged, unmerged = _runner(d, f"sdtm_{name}.onnx"), _runner(d, "base.onnx")
    rng = np.random.default_rng(7)
    for batch in (1, 2):
        inputs = example_inputs(model, batch, grid, seed=20 + batch)
        extra = _extra(meta, batch, grid, rng)
        out = merged.infer({**feed_of(inputs), **extra})
        ref, twin_out = _twin_run(model, meta, inputs, extra)
        assert_close(out["sample"], ref, METHOD_ATOL, f"{family} {name} batch {batch}: graph vs twin")
        assert_close(out[COUNTER_OUTPUT], twin_out[COUNTER_OUTPUT].numpy(), 0, f"{family} {name}: counters")
        diff = max_abs(out["sample"], unmerged.infer(feed_of(inputs))["sample"])
        assert diff > 1e-3, f"{family} {name}: the merged graph computes what the unmerged one does ({diff:.1e})"
        # every block advanced the counters: each token is either reset to 0 or one call staler
        blocks = len(meta["metric_sites"])
        assert out[COUNTER_OUTPUT].max() <= extra[COUNTER_INPUT].max() + blocks
        assert (out[COUNTER_OUTPUT] == 0).any() and (out[COUNTER_OUTPUT] > 0).any()


@pytest.mark.parametrize("family,grid", [("dit", (6, 6)), ("pixart", (4, 4))])
def test_full_variant_outputs_caches(exported, family, grid):
    model, base, d = exported(family, grid)
    res = SdtmPass(SdtmConfig(variant="full"))(base)
    assert check_tensorrt(res.model) == []
    meta = _meta(res.model, SdtmConfig(variant="full"), grid)
    save_checked(res.model, d / "sdtm_full.onnx")
    inputs = example_inputs(model, 2, grid, seed=5)
    out = _runner(d, "sdtm_full.onnx").infer(feed_of(inputs))
    ref, twin_out = _twin_run(model, meta, inputs, {})
    assert_close(out["sample"], ref, METHOD_ATOL, "full variant vs eager")
    assert set(twin_out) == {k for k in out if k != "sample"} and len(twin_out) == 2 * model.config.num_layers
    for k, v in twin_out.items():
        assert_close(out[k], v.numpy(), METHOD_ATOL, k)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    assert meta["cache_bytes_per_sample"] == 4 * grid[0] * grid[1] * width * 2 * model.config.num_layers


def test_pass_is_idempotent_and_ratio_zero_is_a_noop(exported):
    _, base, _ = exported("dit", (6, 6))
    cfg = SdtmConfig(merge="window", ratio=0.3)
    once = SdtmPass(cfg, bucket=1)(base).model
    assert not SdtmPass(cfg, bucket=1)(once).modified
    assert not SdtmPass(SdtmConfig(merge="window", ratio=0.0))(base).modified


def test_partition_from_counter_puts_dst_on_the_stalest_token():
    grid = (4, 4)
    counter = np.zeros((2, 16), np.float32)
    counter[0, 5] = 3  # window (0, 0) holds positions 0, 1, 4, 5
    counter[1, 10] = 2  # window (1, 1) holds 10, 11, 14, 15
    part, inv = partition_from_counter(grid, counter, None)
    dst = set(part[12:].tolist())
    assert {5, 10} <= dst and len(dst) == 4
    assert (part[inv] == np.arange(16)).all()
    rng = np.random.default_rng(0)
    drawn = {tuple(partition_from_counter(grid, np.zeros((1, 16)), rng)[0][12:]) for _ in range(8)}
    assert len(drawn) > 1  # no history: random dst


def test_twin_counter_semantics(exported, monkeypatch):
    """Structure stage: the tokens of chosen windows get one call staler per block, the others reset.

    The windows each block chose are recorded; the counters are replayed from them here and must equal the
    twin's exactly, from zero counters and from random ones."""
    from passes.sdtm import eager as sdtm_math

    model, base, _ = exported("dit", (6, 6))
    cfg = SdtmConfig(merge="window", ratio=0.3, blend=None)
    meta = _meta(SdtmPass(cfg)(base).model, cfg, (6, 6))
    blocks = len(meta["metric_sites"])
    assert blocks == model.config.num_layers >= 2
    chosen: list[np.ndarray] = []  # per block: [B, N] bool, the position lies in a chosen window

    window_match = sdtm_math.window_match

    def recording(x, counter, geo, a_s):
        mt = window_match(x, counter, geo, a_s)
        mask = np.zeros(tuple(counter.shape), bool)
        for b, wins in enumerate(mt.win.numpy()):
            mask[b, wins.reshape(-1)] = True
        chosen.append(mask)
        return mt

    monkeypatch.setattr(sdtm_math, "window_match", recording)
    inputs = example_inputs(model, 2, (6, 6), seed=1)
    for start in (np.zeros((2, 36), np.float32), np.random.default_rng(2).integers(0, 5, (2, 36)).astype(np.float32)):
        chosen.clear()
        _, out = _twin_run(model, meta, inputs, {COUNTER_INPUT: start})
        assert len(chosen) == blocks
        want = start.copy()
        for mask in chosen:
            assert (mask.sum(1) == 4 * meta["k"]).all(), "each block merges k whole 2x2 windows"
            want = np.where(mask, want + 1, 0)
        got = out[COUNTER_OUTPUT].numpy()
        assert np.array_equal(got, want), f"counters {got} != replayed {want}"
        # the case has teeth: some tokens were merged by every block (start + blocks), some reset by the last
        assert (got == start + blocks).any() and (got == 0).any() and got.max() >= blocks


def test_prompt_reweighting_equals_twin_on_pixart(exported):
    from export.methods.sdtm import sdtm_extra_feed, sdtm_fidelity
    from passes.errors import DitmergeError
    from passes.sdtm import PromptWeightPass

    grid = (4, 4)
    model, base, d = exported("pixart", grid)
    merged = SdtmPass(CONFIGS["structure"])(base).model
    weighted = PromptWeightPass(2.0)(merged).model
    meta = _meta(weighted, CONFIGS["structure"], grid)
    assert_tensorrt_ok(weighted, meta["counts"])
    prompt = json.loads(get_model_meta(weighted)["sdtm_prompt"])
    assert [s.rsplit(".", 1)[1] for s in prompt["sites"]] == ["attn2", "attn2"]
    save_checked(weighted, d / "sdtm_prompt.onnx")
    save_checked(merged, d / "sdtm_noprompt.onnx")
    inputs = example_inputs(model, 2, grid, seed=4)
    extra = sdtm_extra_feed(meta, 2, np.random.default_rng(3))
    run = _runner(d, "sdtm_prompt.onnx").infer
    assert sdtm_fidelity(model, run, inputs, meta, extra, prompt) <= METHOD_ATOL
    diff = max_abs(run({**feed_of(inputs), **extra})["sample"],  # extra holds the count inputs
                   _runner(d, "sdtm_noprompt.onnx").infer({**feed_of(inputs), **extra})["sample"])
    assert diff > 1e-3, f"prompt weight 2 changed nothing ({diff:.1e})"
    assert not PromptWeightPass(1.0)(base).modified
    with pytest.raises(DitmergeError, match="cross-attention"):
        PromptWeightPass(2.0)(exported("dit", (6, 6))[1])


def test_method_bucket_with_prompt_weight_matches_twin_in_every_variant(exported):
    """The method's wiring: a PixArt bucket with a prompt weight, merged and full variants, via Method.fidelity."""
    from export.buckets import BucketSpec
    from export.families import family_of
    from export.methods import BuildContext, get_method

    grid = (4, 4)
    model, base, d = exported("pixart", grid)
    meth = get_method("sdtm", {"prompt_weight_structure": "1.5"})
    ctx = BuildContext(torch_model=model, family=family_of(model), grid=grid, text_len=8, num_train_timesteps=1000,
                       base=base, stage=d)
    bg = meth.build_bucket(ctx, BucketSpec(600, 999, 0.45), 0)
    assert bg.meta["stage"] == "structure" and bg.meta["prompt"]["weight"] == 1.5 and set(bg.graphs) == {"main", "full"}
    inputs = example_inputs(model, 2, grid, seed=8)
    for variant, g in bg.graphs.items():
        save_checked(g, d / f"method_{variant}.onnx")
        err = meth.fidelity(ctx, bg.meta, variant, _runner(d, f"method_{variant}.onnx").infer, inputs)
        assert err <= METHOD_ATOL, f"{variant}: {err:.2e}"


@pytest.mark.parametrize("grid,bands", [((4, 4), 1), ((5, 7), 1), ((8, 8), 2), ((8, 6), 4)])
def test_device_partition_equals_the_host_one(grid, bands):
    """The TensorRT path draws the detail partition on the counter's device: the same partition as numpy,
    with integer counters (ties in every window), with and without the tie-breaking noise."""
    from passes.sdtm import partition_from_counter_torch, tie_noise

    n = grid[0] * grid[1]
    for seed in range(4):
        counter = np.random.default_rng(seed).integers(0, 3, (2, n)).astype(np.float32)
        for noisy in (False, True):
            rng_a, rng_b = np.random.default_rng(100 + seed), np.random.default_rng(100 + seed)
            want = partition_from_counter(grid, counter, rng_a if noisy else None, bands)
            got = partition_from_counter_torch(grid, torch.from_numpy(counter),
                                               tie_noise(grid, rng_b) if noisy else None, bands)
            for w, g in zip(want, got):
                assert g.dtype == torch.int64 and np.array_equal(g.numpy(), w), (grid, bands, seed, noisy)
    # teeth: a stale token in window (0, 0) moves that window's dst from its first slot to it
    counter = np.zeros((1, n), np.float32)
    base = partition_from_counter_torch(grid, torch.from_numpy(counter), None, bands)[0]
    counter[0, grid[1] + 1] = 5  # slot (1, 1) of window (0, 0)
    moved = partition_from_counter_torch(grid, torch.from_numpy(counter), None, bands)[0]
    assert not torch.equal(base, moved)
