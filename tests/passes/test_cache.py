"""The step-cache pass on tiny models of all four families, against its eager twin, fp32.

before (eager twin) -> transform (CachePass full / cached) -> structure (streams, span removed, TensorRT
check) -> after (ORT) -> compare. The key property: a cached step fed the residual of a full step on
the same inputs gives the full step's output (what is reused is exactly what was skipped).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.measure import feed_of
from export.onnx_export import eager_forward, example_inputs
from passes.cache import (
    CHANGE_OUTPUT,
    FRONT_INPUT,
    FRONT_OUTPUT,
    CacheConfig,
    CachePass,
    block_paths,
    cache_input,
    cache_output,
    span_counts,
)
from passes.cache.twin import CacheTwin
from passes.errors import DitmergeError
from passes.onnxutil import get_model_meta, save_checked
from passes.trt_check import check_tensorrt
from runtime.runners import OrtRunner, SharedWeights
from tests.helpers import METHOD_ATOL, assert_close

# (family, grid, span start, end, streams the span carries)
CASES = [
    ("dit", (4, 4), 1, 2, {"image"}),
    ("dit", (4, 4), 0, 1, {"image"}),
    ("pixart", (4, 4), 1, 2, {"image"}),  # the caption enters every block but is no stream
    ("sd3", (4, 4), 0, 1, {"image", "text"}),  # joint block: both streams
    ("sd3", (4, 4), 1, 2, {"image"}),  # the last block drops the text stream (context_pre_only)
    ("flux", (4, 4), 0, 1, {"image", "text"}),  # the joint block: both streams, split sizes from the prompt length
    ("flux", (4, 4), 1, 2, {"image"}),  # the single block: its text output is dropped after the last block
    ("flux", (4, 6), 0, 2, {"image"}),  # joint and single blocks in one span
]


def test_flux_spans_need_the_folded_shape_arithmetic(exported):
    """Flux computes its joint split sizes from the prompt length at run time; ONNX shape inference alone gives
    the span's streams no shape, so the locator folds that arithmetic (with the lengths fixed) to find them."""
    from passes.cache.rewrite import _locate_span, _static_prompt, locate_span
    from passes.onnxutil import infer_shapes

    _, base, _ = exported("flux", (4, 4))
    shaped = infer_shapes(base)
    _, fixed = _static_prompt(shaped, 16)
    assert not _locate_span(fixed, 16, 0, 1).ok  # what the locator had before the fold
    span = locate_span(shaped, 16, 0, 1)
    assert span.ok and {s.name: s.tokens for s in span.streams} == {"image": 16, "text": "text"}


def _save(d, model, name):
    save_checked(model, d / name)
    return OrtRunner(d / name, ["CPUExecutionProvider"], SharedWeights(d / "weights.bin"))


@pytest.mark.parametrize("family,grid,start,end,streams", CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES])
def test_variants_match_the_twin_and_cached_reuses_exactly_the_skipped_span(exported, family, grid, start, end, streams):
    model, base, d = exported(family, grid)
    inputs = example_inputs(model, 2, grid, seed=3)
    full = CachePass(CacheConfig("full", start, end, adaptive=start > 0), bucket="t")(base).model
    cached = CachePass(CacheConfig("cached", start, end, adaptive=start > 0), bucket="t")(base).model
    info = json.loads(get_model_meta(cached)["cache"])
    assert set(info["streams"]) == streams
    assert check_tensorrt(full) == [] and check_tensorrt(cached) == []
    # the span's blocks are gone from the cached graph (DiT's block 0 keeps the final layer's conditioning)
    counts, paths = span_counts(cached), block_paths(base)
    for path in paths[start:end]:
        assert counts[path] <= info["span_nodes_kept"], path
    _no_token_work_kept(cached, paths[start:end], grid[0] * grid[1])
    for path in paths[end:]:  # back blocks are untouched; front blocks may lose work only the span read
        assert counts[path] == span_counts(base)[path], path
    for path in paths[:start]:
        assert 0 < counts[path] <= span_counts(base)[path], path

    # full: the sample and every stream's residual against the twin
    out = _save(d, full, f"cache_full_{start}_{end}.onnx").infer(feed_of(inputs))
    twin = CacheTwin(model, start, end, "full")
    with twin.installed():
        ref = eager_forward(model, inputs).numpy()
    assert_close(out["sample"], ref, METHOD_ATOL, "full sample")
    for s in streams:
        assert_close(out[cache_output(s)], twin.outputs[s].numpy(), METHOD_ATOL, f"residual {s}")
    assert np.abs(out[cache_output("image")]).max() > 1e-3  # a real residual, not zeros

    # cached with random residuals: against the twin that adds the same
    rn = _save(d, cached, f"cache_cached_{start}_{end}.onnx")
    rng = np.random.default_rng(0)
    extra = {cache_input(s): rng.standard_normal(out[cache_output(s)].shape).astype(np.float32) for s in streams}
    if start > 0:
        extra[FRONT_INPUT] = rng.standard_normal(out[cache_output("image")].shape).astype(np.float32)
    got = rn.infer({**feed_of(inputs), **extra})
    twin = CacheTwin(model, start, end, "cached", {s: torch.from_numpy(extra[cache_input(s)]) for s in streams},
                     torch.from_numpy(extra[FRONT_INPUT]) if start > 0 else None)
    with twin.installed():
        ref_cached = eager_forward(model, inputs).numpy()
    assert_close(got["sample"], ref_cached, METHOD_ATOL, "cached sample")
    if start > 0:
        assert_close(got[CHANGE_OUTPUT], twin.outputs["change"].numpy(), METHOD_ATOL, "relative change")
    assert np.abs(got["sample"] - out["sample"]).max() > 1e-3  # random residuals do change the output

    # cached fed the full step's own residual (and front) on the same inputs == the full step
    own = {cache_input(s): out[cache_output(s)] for s in streams}
    if start > 0:
        own[FRONT_INPUT] = out[FRONT_OUTPUT]
    same = rn.infer({**feed_of(inputs), **own})
    assert_close(same["sample"], out["sample"], METHOD_ATOL, "cached with its own residual vs full")
    if start > 0:
        assert float(np.abs(same[CHANGE_OUTPUT]).max()) <= 1e-6


def _no_token_work_kept(model, span_paths, tokens):
    """Nodes of the span that stay in a cached graph produce no [B, tokens, C] tensor (only conditioning)."""
    from passes.locate import _node_scopes, tensor_shapes
    from passes.onnxutil import infer_shapes

    shapes = tensor_shapes(infer_shapes(model))
    for node in model.graph.node:
        if any(sc == p or sc.endswith("." + p) for sc in _node_scopes(node)[0] for p in span_paths):
            for o in node.output:
                dims = shapes.get(o, (0, []))[1]
                assert not (len(dims) == 3 and dims[1] == tokens), f"{node.name} still computes tokens: {o} {dims}"


def test_cached_variant_removes_the_work(exported):
    from passes.flops import count_flops

    _, base, _ = exported("dit", (6, 6))
    cached = CachePass(CacheConfig("cached", 1, 2))(base).model
    # 2 blocks, one skipped: about half the block FLOPs remain
    assert count_flops(cached) < 0.7 * count_flops(base)


def test_rejects_bad_spans_and_double_application(exported):
    _, base, _ = exported("dit", (4, 4))
    with pytest.raises(DitmergeError, match="not inside"):
        CachePass(CacheConfig("cached", 1, 5))(base)
    with pytest.raises(DitmergeError, match="block 1 or later"):
        CachePass(CacheConfig("full", 0, 1, adaptive=True))(base)
    once = CachePass(CacheConfig("cached", 1, 2))(base)
    assert CachePass(CacheConfig("cached", 1, 2))(once.model).modified is False
    with pytest.raises(DitmergeError, match="already carries"):
        CachePass(CacheConfig("full", 1, 2))(once.model)
