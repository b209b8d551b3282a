"""The ToMe pass contract: where it merges, what it stamps, what it refuses, what TensorRT will take."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from passes.errors import DitmergeError
from passes.onnxutil import PROVENANCE_KEY, get_model_meta, provenance
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT
from passes.tome import ToMeConfig, ToMePass
from passes.trt_check import check_tensorrt

GRID = (4, 4)


def _inserted(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if any(p.key == PROVENANCE_KEY for p in n.metadata_props)]


def test_ratio_zero_inserts_nothing(exported):
    _, base, _ = exported("dit", GRID)
    res = ToMePass(ToMeConfig(0.0))(base)
    assert not res.modified
    assert len(res.model.graph.node) == len(base.graph.node)
    assert not _inserted(res.model)


def test_merges_every_block_and_stamps_provenance(exported):
    _, base, _ = exported("dit", GRID)
    res = ToMePass(ToMeConfig(0.5, locations=("attn", "joint", "mlp")), bucket=3)(base)
    assert res.modified
    meta = json.loads(get_model_meta(res.model)["tome"])
    assert meta["sites"] == ["transformer_blocks.0.attn1", "transformer_blocks.0.ff",
                             "transformer_blocks.1.attn1", "transformer_blocks.1.ff"]
    assert meta["r"] == 8 and meta["num_src"] == 12
    stamps = provenance(res.model)
    assert stamps == [{"bucket": 3, "locations": ["attn", "joint", "mlp"], "method": "tome", "pass": "tome", "ratio": 0.5,
                       "metric": "block", "namespace": "token-merge"}]
    assert len(_inserted(res.model)) > 20
    assert {i.name for i in res.model.graph.input} >= {PARTITION_INPUT, PARTITION_INV_INPUT}
    # the exporter's scope metadata survives the onnx-graphsurgeon round trip
    scoped = [n for n in res.model.graph.node if any(p.key == "pkg.torch.onnx.name_scopes" for p in n.metadata_props)]
    assert len(scoped) >= len([n for n in base.graph.node if n.metadata_props]) - 2


def test_second_application_is_a_noop_and_a_different_ratio_is_refused(exported):
    _, base, _ = exported("dit", GRID)
    once = ToMePass(ToMeConfig(0.5))(base).model
    twice = ToMePass(ToMeConfig(0.5))(once)
    assert not twice.modified and len(twice.model.graph.node) == len(once.graph.node)
    with pytest.raises(DitmergeError, match="already carries a ToMe merge"):
        ToMePass(ToMeConfig(0.3))(once)


def test_a_pass_of_the_same_namespace_refuses_a_merged_graph_without_a_shared_list(exported):
    """A new token-merging pass declares ToMe's namespace and is refused on a ToMe graph (and the other way round),
    without any list of merging passes to edit; a pass of another namespace is not."""
    from passes.infra import PassResult, StampedPass

    class ToyMerge(StampedPass):
        name, carries = "toy-merge", "a token merge"

        def __init__(self, namespace: str) -> None:
            self.namespace = namespace

        def stamp(self) -> dict:
            return {"pass": self.name, "namespace": self.namespace}

        def call(self, model: onnx.ModelProto) -> PassResult:
            return PassResult(model, True)

    _, base, _ = exported("dit", GRID)
    once = ToMePass(ToMeConfig(0.5))(base).model
    with pytest.raises(DitmergeError, match="already carries a token merge"):
        ToyMerge(ToMePass.namespace)(once)
    assert ToyMerge("other")(once).modified
    toy = onnx.ModelProto.FromString(base.SerializeToString())
    toy.graph.node[0].metadata_props.add(key=PROVENANCE_KEY,
                                         value=json.dumps({"pass": "toy-merge", "namespace": ToMePass.namespace}))
    with pytest.raises(DitmergeError, match="already carries a ToMe merge"):
        ToMePass(ToMeConfig(0.5))(toy)


@pytest.mark.parametrize("ratio", [-0.1, 0.8, 2.0])
def test_ratio_out_of_range_is_refused(exported, ratio):
    _, base, _ = exported("dit", GRID)
    with pytest.raises(DitmergeError, match=r"ratio .* is outside \[0, 0.75\]"):
        ToMePass(ToMeConfig(ratio))(base)


def test_unknown_location_and_wrong_type_are_refused(exported):
    _, base, _ = exported("dit", GRID)
    with pytest.raises(DitmergeError, match="unknown merge locations"):
        ToMePass(ToMeConfig(0.5, locations=("attention",)))(base)
    with pytest.raises(DitmergeError, match="ratio must be a number"):
        ToMePass(ToMeConfig("0.5"))(base)


def test_graph_without_attention_is_refused(exported):
    _, base, _ = exported("dit", GRID)
    stripped = onnx.ModelProto.FromString(base.SerializeToString())
    for n in stripped.graph.node:
        del n.metadata_props[:]
    with pytest.raises(DitmergeError, match="no attention or feed-forward module"):
        ToMePass(ToMeConfig(0.5))(stripped)


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_merged_graphs_pass_the_tensorrt_check(exported, family):
    _, base, _ = exported(family, GRID)
    assert check_tensorrt(base) == []
    merged = ToMePass(ToMeConfig(0.5, locations=("attn", "xattn", "joint", "mlp")))(base).model
    assert check_tensorrt(merged) == []
    inserted = _inserted(merged)
    ops = {n.op_type for n in inserted}
    assert "TopK" in ops and not ops & {"ScatterND", "NonZero"}
    # the one scatter is the int64 inverse permutation, without a reduction (a native TensorRT layer)
    scatters = [n for n in inserted if n.op_type == "ScatterElements"]
    assert scatters and all(a.name != "reduction" or a.s == b"none" for n in scatters for a in n.attribute)


def test_mlp_only_merges_feed_forward_only(exported):
    _, base, _ = exported("pixart", GRID)
    meta = json.loads(get_model_meta(ToMePass(ToMeConfig(0.25, locations=("mlp",)))(base).model)["tome"])
    assert meta["sites"] and all(s.endswith(".ff") for s in meta["sites"])


def test_dst_partition_inputs_are_int64_vectors(exported):
    _, base, _ = exported("dit", GRID)
    merged = ToMePass(ToMeConfig(0.5))(base).model
    part = next(i for i in merged.graph.input if i.name == PARTITION_INPUT)
    assert part.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_value for d in part.type.tensor_type.shape.dim] == [int(np.prod(GRID))]


def test_sites_that_cannot_merge_say_why(exported):
    from passes.locate import find_sites
    from passes.onnxutil import infer_shapes

    _, sd3, _ = exported("sd3", GRID)
    assert all(s.ok for s in find_sites(infer_shapes(sd3), 16) if s.kind == "joint")
    _, flux, _ = exported("flux", GRID)
    sites = {s.path: s for s in find_sites(infer_shapes(flux), 16)}
    assert "rotary position embeddings" in sites["transformer_blocks.0.attn"].reason
    assert "share one sequence" in sites["single_transformer_blocks.0.attn"].reason
    assert sites["transformer_blocks.0.ff"].ok


def test_a_baked_token_count_is_refused_not_merged(exported):
    """Without the token-axis cleanup, the attention reshapes hold N: the pass must skip, not break, them."""
    from passes.locate import find_sites
    from passes.onnxutil import infer_shapes

    _, _, d = exported("dit", GRID)
    raw = onnx.load(d / "raw.onnx", load_external_data=False) if (d / "raw.onnx").exists() else None
    if raw is None:
        from export.onnx_export import export_onnx
        from tests.helpers import tiny_dit

        raw = export_onnx(tiny_dit(sample_size=8), d / "raw.onnx", GRID)
    attn = [s for s in find_sites(infer_shapes(raw), 16) if s.kind == "attn"]
    assert attn and all("baked" in s.reason for s in attn)


def test_metric_and_per_block_r_options(exported):
    """metric=block matches on each block's residual-stream input; r_blocks sets r block by block."""
    _, base, _ = exported("dit", GRID)
    for metric in ("block", "sublayer"):
        meta = json.loads(get_model_meta(ToMePass(ToMeConfig(0.5, metric=metric))(base).model)["tome"])
        assert meta["metric"] == metric and meta["r"] == 8
    res = ToMePass(ToMeConfig(0.0, r=5, r_blocks={"transformer_blocks.0": 3, "transformer_blocks.1": 0}))(base)
    meta = json.loads(get_model_meta(res.model)["tome"])
    assert meta["r_blocks"] == {"transformer_blocks.0": 3} and meta["sites"] == ["transformer_blocks.0.attn1"]
    assert meta["r"] == 2  # the mean over both blocks, the unmerged one included
    with pytest.raises(DitmergeError, match="unknown ToMe metric"):
        ToMePass(ToMeConfig(0.5, metric="query"))(base)
    with pytest.raises(DitmergeError, match="r_blocks gives no r for transformer_blocks.1"):
        ToMePass(ToMeConfig(0.0, r_blocks={"transformer_blocks.0": 3}))(base)
    with pytest.raises(DitmergeError, match=r"r=13 is outside"):
        ToMePass(ToMeConfig(0.0, r_blocks={"transformer_blocks.0": 13, "transformer_blocks.1": 1}))(base)


def test_match_every_shares_one_matching_between_blocks(exported):
    """match_every=2: the second block merges with the first block's matching, in the graph and in its twin."""
    from export.measure import max_abs, tome_fidelity
    from export.onnx_export import example_inputs
    from passes.onnxutil import save_checked
    from passes.partition import draw_partition
    from runtime.runners import OrtRunner, SharedWeights
    from tests.helpers import METHOD_ATOL

    model, base, d = exported("dit", GRID)
    graphs = {k: ToMePass(ToMeConfig(0.5, locations=("attn", "mlp"), match_every=k))(base).model for k in (1, 2)}
    argmax = {k: sum(n.op_type == "ArgMax" for n in g.graph.node) for k, g in graphs.items()}
    assert argmax[1] == 2 * argmax[2] > 0, argmax  # one similarity search per matching: two blocks, one matching
    runners = {}
    for k, g in graphs.items():
        save_checked(g, d / f"shared_{k}.onnx")
        runners[k] = OrtRunner(d / f"shared_{k}.onnx", ["CPUExecutionProvider"], SharedWeights(d / "weights.bin"))
    meta = json.loads(get_model_meta(graphs[2])["tome"])
    assert meta["match_every"] == 2
    inputs = example_inputs(model, 2, GRID, seed=3)
    err = tome_fidelity(model, runners[2], inputs, meta, GRID, seed=1)
    assert err <= METHOD_ATOL, f"shared matching vs twin: {err:.2e}"
    part, inv = draw_partition(GRID, rng=np.random.default_rng(1))
    feed = {**{k: v.numpy() for k, v in inputs.items()}, PARTITION_INPUT: part, PARTITION_INV_INPUT: inv}
    assert max_abs(runners[1].infer(feed)["sample"], runners[2].infer(feed)["sample"]) > 1e-4
    with pytest.raises(DitmergeError, match="match_every must be a whole number >= 1"):
        ToMePass(ToMeConfig(0.5, match_every=0))(base)
    with pytest.raises(DitmergeError, match="cannot be combined with an r per block"):
        ToMePass(ToMeConfig(0.0, match_every=2, r_blocks={"transformer_blocks.0": 3, "transformer_blocks.1": 2}))(base)
