"""The MoD routing pass: graph vs the eager routed model, structure, TensorRT, refusals, bin arithmetic.

before (eager routed model) -> transform (ModPass) -> structure -> after (ORT) -> compare.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from export.onnx_export import eager_forward, example_inputs
from passes.errors import DitmergeError
from passes.counts import count_feed
from passes.mod import ModConfig, ModPass, bucket_values, find_blocks
from passes.mod.eager import MoDRouting, capacity, neighbours, region_bounds, region_of, snap
from passes.onnxutil import PROVENANCE_KEY, get_model_meta, infer_shapes, provenance, save_checked
from passes.trt_check import check_tensorrt
from runtime.runners import OrtRunner, SharedWeights
from tests.count_profiles import assert_tensorrt_ok
from tests.helpers import METHOD_ATOL, assert_close

CHANNELS = 16  # tests.helpers.tiny_dit: 2 heads x 8


def _routing(seed: int = 1) -> MoDRouting:
    """Random routers around 0.5 (bias 0), so scores spread and the selection matters."""
    return MoDRouting(CHANNELS, 2, regions=4, init_bias=0.0, seed=seed).eval()


def _config(routing: MoDRouting, caps: list[int], dynamic: tuple[int, ...] = ()) -> ModConfig:
    return ModConfig(tuple(caps), tuple(r.weight.detach().numpy().reshape(-1).copy() for r in routing.routers),
                     tuple(float(r.bias.detach()) for r in routing.routers), dynamic)


def _inserted(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if any(p.key == PROVENANCE_KEY for p in n.metadata_props)]


def _runner(d, graph):
    return OrtRunner(d / graph, ["CPUExecutionProvider"], SharedWeights(d / "weights.bin"))


@pytest.mark.parametrize("grid,caps", [((4, 4), [10, 5]), ((4, 4), [16, 7]), ((4, 4), [16, 16]), ((6, 6), [27, 18])],
                         ids=["4x4-10-5", "4x4-full-7", "4x4-full-full", "6x6-27-18"])
def test_routed_graph_equals_eager_routed_model(exported, grid, caps):
    model, base, d = exported("dit", grid)
    routing = _routing()
    res = ModPass(_config(routing, caps), bucket=0)(base)
    assert res.modified
    name = f"mod_{'_'.join(map(str, caps))}.onnx"
    save_checked(res.model, d / name)
    routed, unrouted = _runner(d, name), _runner(d, "base.onnx")
    routing.fixed = caps
    for batch in (1, 2):
        inputs = example_inputs(model, batch, grid, seed=20 + batch)
        feed = {k: v.numpy() for k, v in inputs.items()}
        out = routed.infer(feed)["sample"]
        with routing.installed(model):
            ref = eager_forward(model, inputs).numpy()
        assert_close(out, ref, METHOD_ATOL, f"{grid} capacities {caps} batch {batch}: routed graph vs eager")
        diff = np.abs(out - unrouted.infer(feed)["sample"]).max()
        assert diff > 1e-3, f"the routed graph computes what the unrouted one does ({diff:.1e})"
    # the patched forwards are gone once the context closes
    assert "forward" not in vars(model.transformer_blocks[0])


def test_structure_stamps_and_tensorrt(exported):
    _, base, _ = exported("dit", (4, 4))
    res = ModPass(_config(_routing(), [10, 5]), bucket=2)(base)
    assert check_tensorrt(res.model) == []
    ops = [n.op_type for n in _inserted(res.model)]
    assert ops.count("TopK") == 2 and ops.count("Sigmoid") == 2
    assert not set(ops) & {"ScatterElements", "ScatterND", "NonZero", "Unique"}
    ks = sorted(int(onnx.numpy_helper.to_array(i)[0]) for i in res.model.graph.initializer if "/k_" in i.name)
    assert ks == [5, 10]
    assert provenance(res.model) == [{"capacities": [10, 5], "method": "mod", "pass": "mod"}]
    meta = json.loads(get_model_meta(res.model)["mod"])
    assert meta["blocks"] == ["transformer_blocks.0", "transformer_blocks.1"] and meta["tokens"] == 16
    # a second run with the same config is a no-op; another config is refused
    again = ModPass(_config(_routing(), [10, 5]), bucket=2)(res.model)
    assert not again.modified and len(again.model.graph.node) == len(res.model.graph.node)
    with pytest.raises(DitmergeError, match="already carries MoD routing"):
        ModPass(_config(_routing(), [8, 5]), bucket=2)(res.model)


def test_count_capacities_one_graph_for_every_bucket(exported):
    """Capacities from count inputs: every capacity set (k = N included: a TopK over all tokens) gives the
    same graph bytes, each fed its counts equals the eager routed model, and each profile passes TensorRT."""
    grid = (4, 4)
    model, base, d = exported("dit", grid)
    routing = _routing()
    sets = [[10, 5], [16, 7], [3, 16], [16, 16]]
    graphs = [ModPass(_config(routing, caps, (0, 1)), bucket=i)(base).model for i, caps in enumerate(sets)]
    assert len({g.SerializeToString() for g in graphs}) == 1
    meta = json.loads(get_model_meta(graphs[0])["mod"])
    assert meta["capacities"] == ["count", "count"] and "bucket" not in provenance(graphs[0])[0]
    save_checked(graphs[0], d / "mod_counts.onnx")
    run = _runner(d, "mod_counts.onnx")
    inputs = example_inputs(model, 2, grid, seed=4)
    feed = {k: v.numpy() for k, v in inputs.items()}
    outs = []
    for caps in sets:
        counts = bucket_values(caps, (0, 1))["counts"]
        assert counts == {"mod_k_0": caps[0], "mod_k_1": caps[1]}
        assert_tensorrt_ok(graphs[0], counts)
        out = run.infer({**feed, **count_feed(counts)})["sample"]
        routing.fixed = caps
        with routing.installed(model):
            ref = eager_forward(model, inputs).numpy()
        assert_close(out, ref, METHOD_ATOL, f"capacities {caps}: count graph vs eager")
        outs.append(out)
    routing.fixed = None
    assert np.abs(outs[0] - outs[1]).max() > 1e-3  # the counts change what the graph computes


def test_blocks_are_found_by_scope(exported):
    _, base, _ = exported("dit", (4, 4))
    blocks = find_blocks(infer_shapes(base), 16)
    assert [b.index for b in blocks] == [0, 1] and all(b.reason is None for b in blocks)
    assert blocks[0].output == blocks[1].input


def test_bad_configs_are_refused(exported):
    _, base, _ = exported("dit", (4, 4))
    routing = _routing()
    with pytest.raises(DitmergeError, match="2 transformer blocks, the routers are for 3"):
        ModPass(ModConfig((8, 8, 8), (np.zeros(16),) * 3, (0.0,) * 3))(base)
    with pytest.raises(DitmergeError, match=r"capacity 17 is outside \[1, 16\]"):
        ModPass(_config(routing, [17, 8]))(base)
    with pytest.raises(DitmergeError, match="router has 8 weights"):
        ModPass(ModConfig((8, 8), (np.zeros(8),) * 2, (0.0,) * 2))(base)


def test_bins_capacities_and_regions():
    assert capacity(0.0, 256) == 256 and capacity(0.3, 256) == 180 and capacity(0.7, 256) == 77
    assert capacity(0.2, 10) == 8 and capacity(1.0, 10) == 1
    assert snap(0.24, 0.7) == 0.2 and snap(0.26, 0.7) == 0.3 and snap(0.95, 0.7) == 0.7 and snap(-0.1, 0.7) == 0.0
    r = torch.tensor(0.22, requires_grad=True)
    (lo, w_lo), (hi, w_hi) = neighbours(r, 0.7)
    assert (lo, hi) == (0.2, 0.3) and abs(float(w_lo.detach()) - 0.8) < 1e-6 and abs(float(w_hi.detach()) - 0.2) < 1e-6
    (w_hi * 1.0).backward()
    assert abs(float(r.grad) - 10.0) < 1e-4, "the interpolation weight is differentiable in the ratio"
    assert [b for b, _ in neighbours(torch.tensor(0.7), 0.7)] == [0.7]
    assert [region_bounds(i, 4, 1000) for i in range(4)] == [(0, 249), (250, 499), (500, 749), (750, 999)]
    assert region_of(249, 4, 1000) == 0 and region_of(250, 4, 1000) == 1 and region_of(999, 4, 1000) == 3


def test_training_interpolates_between_bins(exported):
    """In training, a ratio between two bins gives the proximity-weighted mix of the two routed outputs."""
    model, _, _ = exported("dit", (4, 4))
    routing = _routing()
    inputs = example_inputs(model, 2, (4, 4), seed=5)
    with torch.no_grad():
        routing.ratios.fill_(0.25)  # between the 0.2 and 0.3 bins: capacities ceil(0.8 * 16) = 13 and ceil(0.7 * 16) = 12
    routing.region = 0
    x = torch.randn(2, 16, CHANNELS)
    kw = {"timestep": inputs["timestep"], "class_labels": inputs["class_labels"]}
    block = model.transformer_blocks[0]
    routing.fixed = None
    routing.train()
    with torch.no_grad(), routing.installed(model):
        y = block(x, **kw)
    routing.eval()
    ys = {}
    for k in (13, 12):
        routing.fixed = [k, k]
        with torch.no_grad(), routing.installed(model):
            ys[k] = block(x, **kw)
    assert_close(y.numpy(), (0.5 * ys[13] + 0.5 * ys[12]).numpy(), 1e-5, "block output at ratio 0.25")
    assert (ys[13] - ys[12]).abs().max() > 1e-3
