"""Accuracy against eager PyTorch, all four families, two grids, batch 1 and 2 (CFG), fp32.

before (eager) -> transform (export + passes) -> structure (sites merged) -> after (ORT) -> compare.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.measure import export_fidelity, max_abs, tome_fidelity
from export.onnx_export import example_inputs
from passes.onnxutil import get_model_meta, save_checked
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, draw_partition
from passes.tome import ToMeConfig, ToMePass
from runtime.runners import OrtRunner, SharedWeights
from tests.helpers import EXPORT_ATOL, FAMILIES, METHOD_ATOL

CASES = [(family, grid) for family, (_, grids) in FAMILIES.items() for grid in grids]
# where each family is merged: DiT/PixArt self-attention (+ PixArt cross-attention queries) and MLP;
# SD3 the joint attention (image stream) and MLP; Flux the image-stream MLP (rotary joint attention: not yet)
EXPECTED_KINDS = {"dit": {"attn1", "ff"}, "pixart": {"attn1", "attn2", "ff"}, "sd3": {"attn", "ff"}, "flux": {"ff"}}


def _runner(d, graph):
    return OrtRunner(d / graph, ["CPUExecutionProvider"], SharedWeights(d / "weights.bin"))


@pytest.mark.parametrize("family,grid", CASES, ids=[f"{f}-{g[0]}x{g[1]}" for f, g in CASES])
@pytest.mark.parametrize("batch", [1, 2])
def test_unmerged_graph_equals_eager(exported, family, grid, batch):
    model, _, d = exported(family, grid)
    err = export_fidelity(model, _runner(d, "base.onnx"), example_inputs(model, batch, grid, seed=batch))
    assert err <= EXPORT_ATOL, f"{family} {grid} batch {batch}: max abs error {err:.2e}"


@pytest.mark.parametrize("family,grid", CASES, ids=[f"{f}-{g[0]}x{g[1]}" for f, g in CASES])
def test_merged_graph_equals_twin_and_differs_from_unmerged(exported, family, grid):
    model, base, d = exported(family, grid)
    res = ToMePass(ToMeConfig(0.5, locations=("attn", "xattn", "joint", "mlp")))(base)
    assert res.modified
    save_checked(res.model, d / "merged.onnx")
    meta = json.loads(get_model_meta(res.model)["tome"])
    kinds = {s.rsplit(".", 1)[1] for s in meta["sites"]}
    assert EXPECTED_KINDS[family] <= kinds, f"{family}: merged {meta['sites']}"
    merged, unmerged = _runner(d, "merged.onnx"), _runner(d, "base.onnx")
    for batch in (1, 2):
        inputs = example_inputs(model, batch, grid, seed=10 + batch)
        err = tome_fidelity(model, merged, inputs, meta, grid, seed=batch)
        assert err <= METHOD_ATOL, f"{family} {grid} batch {batch}: merged vs twin max abs error {err:.2e}"
        feed = {k: v.numpy() for k, v in inputs.items()}
        part, inv = draw_partition(grid, rng=np.random.default_rng(0))
        diff = max_abs(merged.infer({**feed, PARTITION_INPUT: part, PARTITION_INV_INPUT: inv})["sample"],
                       unmerged.infer(feed)["sample"])
        assert diff > 1e-3, f"{family}: the merged graph computes what the unmerged one does ({diff:.1e})"


def test_banded_merge_equals_twin(exported):
    """Large grids match within bands (TensorRT's TopK limit); forced here with a small band limit."""
    grid = (6, 6)
    model, base, d = exported("dit", grid)
    res = ToMePass(ToMeConfig(0.5, max_src_per_band=9))(base)
    meta = json.loads(get_model_meta(res.model)["tome"])
    assert meta["bands"] == 3 and meta["r"] == 18
    save_checked(res.model, d / "banded.onnx")
    inputs = example_inputs(model, 2, grid, seed=3)
    err = tome_fidelity(model, _runner(d, "banded.onnx"), inputs, meta, grid, seed=1)
    assert err <= METHOD_ATOL, f"banded merge vs twin max abs error {err:.2e}"
