"""Merges move up, and unmerges down, past exactly the token-wise ops they commute with (passes/commute.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from passes.commute import hoist_merge, sink_unmerge
from passes.locate import tensor_shapes
from passes.onnxutil import PROVENANCE_KEY, get_model_meta, infer_shapes, save_checked
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, draw_partition
from passes.tome import ToMeConfig, ToMePass

N, C = 4, 3


def _var(name: str, dims: list) -> tuple[gs.Variable, tuple]:
    return gs.Variable(name, dtype=np.float32, shape=dims), (onnx.TensorProto.FLOAT, dims)


def _chain(op: str, other_dims: list, x_first: bool = True, extra_reader: bool = False):
    """``ln -> op(., other) -> y -> Relu (the sublayer)``; returns graph, ln, y, the sublayer and shapes."""
    ln, s_ln = _var("ln", ["B", N, C])
    other, s_other = _var("other", other_dims)
    y, s_y = _var("y", ["B", N, C])
    out, _ = _var("out", ["B", N, C])
    nodes = [gs.Node(op, "mod", inputs=[ln, other] if x_first else [other, ln], outputs=[y]),
             gs.Node("Relu", "sublayer", inputs=[y], outputs=[out])]
    outputs = [out]
    if extra_reader:
        side, _ = _var("side", ["B", N, C])
        nodes.append(gs.Node("Neg", "side", inputs=[y], outputs=[side]))
        outputs.append(side)
    graph = gs.Graph(nodes=nodes, inputs=[ln, other], outputs=outputs)
    return graph, ln, y, nodes[1], {"ln": s_ln, "other": s_other, "y": s_y}


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
@pytest.mark.parametrize("other_dims", [["B", 1, C], [C], [1, 1, 1]])
def test_a_merge_moves_above_ops_with_a_per_token_constant(op, other_dims):
    graph, ln, y, sub, shapes = _chain(op, other_dims)
    inside = {sub.name}
    assert hoist_merge(graph, y, inside, shapes, N) is ln
    assert inside == {"sublayer", "mod"} and y.shape is None


@pytest.mark.parametrize("case", ["per-token operand", "x divides", "a second reader", "c - x order kept"])
def test_a_merge_stays_below_what_it_does_not_commute_with(case):
    if case == "per-token operand":  # [B, N, 1] differs per token: merge(x * p) != merge(x) * p
        graph, ln, y, sub, shapes = _chain("Mul", ["B", N, 1])
    elif case == "x divides":  # merge(c / x) != c / merge(x)
        graph, ln, y, sub, shapes = _chain("Div", ["B", 1, C], x_first=False)
    elif case == "a second reader":  # the full-token y is still needed outside the sublayer
        graph, ln, y, sub, shapes = _chain("Add", ["B", 1, C], extra_reader=True)
    else:  # c - x is an affine map of x too: it moves (the mirror case of Div)
        graph, ln, y, sub, shapes = _chain("Sub", ["B", 1, C], x_first=False)
        assert hoist_merge(graph, y, {sub.name}, shapes, N) is ln
        return
    inside = {sub.name}
    assert hoist_merge(graph, y, inside, shapes, N) is y
    assert inside == {"sublayer"}


def test_the_algebra_the_rules_rest_on():
    """A merge is a row-stochastic matrix: it commutes with per-token-constant affine maps, not with 1/x."""
    rng = np.random.default_rng(0)
    m = rng.random((2, N))
    m /= m.sum(1, keepdims=True)
    x, s, t = rng.standard_normal((N, C)) + 3, rng.standard_normal(C), rng.standard_normal(C)
    np.testing.assert_allclose(m @ (x * s + t), (m @ x) * s + t, atol=1e-12)
    np.testing.assert_allclose(m @ (t - x), t - m @ x, atol=1e-12)
    assert np.abs(m @ (1 / x) - 1 / (m @ x)).max() > 1e-3
    gather = np.array([1, 1, 0, 3])
    np.testing.assert_allclose((x * s)[gather], x[gather] * s, atol=0)


def test_an_unmerge_moves_below_its_gate_and_stops_at_the_residual():
    y, s_y = _var("y", ["B", N, C])
    gate, s_gate = _var("gate", ["B", 1, C])
    res, s_res = _var("res", ["B", N, C])
    gated, s_gated = _var("gated", ["B", N, C])
    out, s_out = _var("out", ["B", N, C])
    nodes = [gs.Node("Mul", "gate_mul", inputs=[gate, y], outputs=[gated]),
             gs.Node("Add", "residual", inputs=[gated, res], outputs=[out])]
    graph = gs.Graph(nodes=nodes, inputs=[y, gate, res], outputs=[out])
    shapes = {"y": s_y, "gate": s_gate, "res": s_res, "gated": s_gated, "out": s_out}
    inside: set[str] = set()
    assert sink_unmerge(graph, y, inside, shapes, N) is gated
    assert inside == {"gate_mul"}


def _full_token_elementwise(model: onnx.ModelProto, n: int) -> int:
    shapes = tensor_shapes(infer_shapes(model))
    count = 0
    for node in model.graph.node:
        if node.op_type in ("Mul", "Add", "Sub", "Div") and not any(p.key == PROVENANCE_KEY for p in node.metadata_props):
            dims = shapes.get(node.output[0], (0, None))[1]
            count += bool(dims and len(dims) == 3 and dims[1] == n)
    return count


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_every_family_runs_its_modulation_and_gates_on_merged_tokens(exported, family, monkeypatch):
    """Per merged sublayer, the adaLN scale and shift before it and the gate after it leave the full token set
    (3 ops), and the graph computes what the same pass without the moves computes."""
    import passes.tome.rewrite as rw
    from export.measure import feed_of
    from export.onnx_export import example_inputs
    from tests.helpers import FAMILIES

    grid = FAMILIES[family][1][0]
    model, base, d = exported(family, grid)
    n = grid[0] * grid[1]
    config = ToMeConfig(0.5, locations=("attn", "joint", "mlp"))
    merged = ToMePass(config)(base).model
    monkeypatch.setattr(rw, "hoist_merge", lambda graph, t, inside, shapes, n: t)
    monkeypatch.setattr(rw, "sink_unmerge", lambda graph, t, inside, shapes, n: t)
    unmoved = ToMePass(config)(base).model
    sites = json.loads(get_model_meta(merged)["tome"])["sites"]
    assert sites
    assert _full_token_elementwise(unmoved, n) - _full_token_elementwise(merged, n) == 3 * len(sites)

    part, inv = draw_partition(grid, (2, 2), np.random.default_rng(0))
    feed = {**feed_of(example_inputs(model, 2, grid, seed=1)), PARTITION_INPUT: part, PARTITION_INV_INPUT: inv}
    outs = []
    for tag, m in (("moved", merged), ("unmoved", unmoved)):
        path = d / f"commute_{family}_{tag}.onnx"
        save_checked(m, path)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {k: v for k, v in feed.items() if k in {i.name for i in sess.get_inputs()}})[0])
    assert float(np.abs(outs[0] - outs[1]).max()) <= 1e-5
