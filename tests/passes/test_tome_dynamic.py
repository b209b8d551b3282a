"""ToMe with r from input shapes ("a bucket is a shape"): one graph for every r, equal to the baked graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.measure import feed_of
from export.onnx_export import example_inputs
from passes.counts import count_feed, count_input_name, is_count_input
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, draw_partition
from passes.tome import R_COUNT, ToMeConfig, ToMePass, strip_bucket_meta
from passes.onnxutil import save_checked
from passes.trt_check import check_tensorrt

GRID = (4, 4)


_saved = [0]


def _session(model: onnx.ModelProto, weights_dir) -> ort.InferenceSession:
    """A session over ``model`` saved beside the exported weights (its initializers reference them)."""
    _saved[0] += 1
    path = weights_dir / f"dyn_{_saved[0]}.onnx"
    save_checked(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _setup(exported):
    model, base, d = exported("dit", GRID)
    return base, feed_of(example_inputs(model, 2, GRID, seed=2)), d


@pytest.mark.parametrize("locations", [("attn",), ("attn", "mlp")])
def test_one_graph_equals_the_baked_graph_at_every_r(exported, locations):
    base, feed, weights_dir = _setup(exported)
    dynamic = ToMePass(ToMeConfig(0.5, locations=locations, dynamic=True))(base).model
    counts = [i for i in dynamic.graph.input if is_count_input(i.name)]
    assert [i.name for i in counts] == [count_input_name(R_COUNT)]
    sess = _session(dynamic, weights_dir)
    part, inv = draw_partition(GRID, (2, 2), np.random.default_rng(3))
    extra = {PARTITION_INPUT: part, PARTITION_INV_INPUT: inv}
    outs = {}
    for r in (0, 2, 5, 8, 12):
        got = sess.run(None, {**feed, **extra, **count_feed({R_COUNT: r})})[0]
        if r:
            baked = ToMePass(ToMeConfig(0.5, locations=locations, r=r))(base).model
            want = _session(baked, weights_dir).run(None, {**feed, **extra})[0]
        else:
            want = _session(base, weights_dir).run(None, feed)[0]
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"r={r}")
        outs[r] = got
    # r matters: a graph that ignored its count input would give one output for every r
    assert np.abs(outs[8] - outs[0]).max() > 1e-3


def test_graphs_of_different_ratios_are_identical_once_stripped(exported):
    base, _, _ = _setup(exported)
    a = strip_bucket_meta(ToMePass(ToMeConfig(0.5, dynamic=True), bucket=0)(base).model)
    b = strip_bucket_meta(ToMePass(ToMeConfig(0.25, dynamic=True), bucket=1)(base).model)
    assert a.SerializeToString() == b.SerializeToString()
    baked = [ToMePass(ToMeConfig(x), bucket=i)(base).model for i, x in enumerate((0.5, 0.25))]
    assert baked[0].SerializeToString() != baked[1].SerializeToString()


def test_count_is_read_only_through_its_shape_and_the_graph_passes_the_tensorrt_check(exported):
    base, _, _ = _setup(exported)
    model = ToMePass(ToMeConfig(0.5, locations=("attn", "mlp"), dynamic=True))(base).model
    name = count_input_name(R_COUNT)
    consumers = [n.op_type for n in model.graph.node if name in n.input]
    assert consumers and set(consumers) == {"Shape"}
    assert check_tensorrt(model) == []


def test_per_block_r_takes_one_count_per_block(exported):
    base, feed, weights_dir = _setup(exported)
    blocks = {"transformer_blocks.0": 4, "transformer_blocks.1": 8}
    model = ToMePass(ToMeConfig(0.5, r_blocks=blocks, dynamic=True))(base).model
    names = [i.name for i in model.graph.input if is_count_input(i.name)]
    assert names == [count_input_name(f"{R_COUNT}_0"), count_input_name(f"{R_COUNT}_1")]
    part, inv = draw_partition(GRID, (2, 2), np.random.default_rng(0))
    extra = {PARTITION_INPUT: part, PARTITION_INV_INPUT: inv}
    got = _session(model, weights_dir).run(None, {**feed, **extra, **count_feed({f"{R_COUNT}_0": 4, f"{R_COUNT}_1": 8})})[0]
    baked = ToMePass(ToMeConfig(0.5, r_blocks=blocks))(base).model
    want = _session(baked, weights_dir).run(None, {**feed, **extra})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
