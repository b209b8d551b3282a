"""One engine per graph, one optimization profile per count vector: builder, runner and plan checks on CPU.

Built against the TensorRT 10 Python API with the fake module of ``conftest.py``; the real engine's
memory and outputs are checked by the GPU test in ``test_tensorrt.py``.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from passes.errors import DitmergeError

from .conftest import USER_MANAGED

PROFILES = [{"r": 0}, {"r": 2}, {"r": 5}]


def _runner(tmp_path, fake_trt, profiles=PROFILES, expected="same"):
    from runtime.trt_runner import TrtRunner

    fake_trt["profiles"] = profiles
    (tmp_path / "e.engine").write_bytes(b"engine")
    return TrtRunner(tmp_path / "e.engine", tmp_path / "g.onnx", strip=False, device="cpu",
                     profiles=profiles if expected == "same" else expected)


def _feed(r: int, x: torch.Tensor | None = None) -> dict:
    from passes.counts import count_feed

    return {"x": torch.randn(2, 3) if x is None else x, **count_feed({"r": r})}


def test_one_context_per_profile_over_one_shared_buffer(tmp_path, fake_trt):
    runner = _runner(tmp_path, fake_trt)
    runner.infer(_feed(2))
    engine = fake_trt["engine"]
    assert fake_trt["deserialized"] == 1 and len(engine.contexts) == 3  # one engine, a context per profile
    assert [c.profile for c in engine.contexts] == [0, 1, 2]
    assert all(c.strategy == USER_MANAGED for c in engine.contexts)
    memories = {c.memory for c in engine.contexts}
    assert len(memories) == 1  # one buffer for all of them ...
    ptr, size = memories.pop()
    assert ptr and size == 3000 == max(engine.get_device_memory_size_for_profile_v2(i) for i in range(3))  # the largest
    assert runner.memory["activation_bytes"] == 3000 and runner.memory["profile_activation_bytes"] == [1000, 2000, 3000]


def test_the_profile_follows_the_count_lengths(tmp_path, fake_trt):
    runner = _runner(tmp_path, fake_trt)
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    outs = [runner.infer(_feed(r, x)) for r in (5, 0, 2, 0)]
    assert fake_trt["engine"].ran_profiles == [2, 0, 1, 0]
    assert all(torch.equal(o["z"], 2 * x) for o in outs)
    # the zero-length count input is bound to a real buffer (the fake engine, like TensorRT, refuses a null address)
    ctx0 = fake_trt["engine"].contexts[0]
    assert ctx0.shapes["ditmerge_count_r"] == (0,) and ctx0.addresses["ditmerge_count_r"] != 0
    with pytest.raises(DitmergeError, match=r"no optimization profile for counts \{'r': 3\}.*'r': 0.*'r': 2.*'r': 5"):
        runner.infer(_feed(3))
    with pytest.raises(DitmergeError, match="needs count input 'ditmerge_count_r'"):
        runner.infer({"x": x})


def test_an_engine_whose_profiles_differ_from_the_plan_is_refused(tmp_path, fake_trt):
    runner = _runner(tmp_path, fake_trt, expected=[{"r": 0}, {"r": 3}])
    with pytest.raises(DitmergeError, match="stale, rebuild"):
        runner.infer(_feed(0))


def _count_graph(path, n: int = 8, k_offset: int | None = None, strongly: bool = False):
    """x [batch, n] -> TopK with K = n - r (or r + k_offset), r the length of ditmerge_count_r."""
    nodes = [helper.make_node("Shape", ["ditmerge_count_r"], ["r"], name="count_of"),
             helper.make_node("Sub", ["n", "r"], ["k"], name="k") if k_offset is None else
             helper.make_node("Add", ["r", "n"], ["k"], name="k"),
             helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")]
    init = numpy_helper.from_array(np.array([n if k_offset is None else k_offset], np.int64), "n")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT16 if strongly else T.FLOAT,
                                                                         ["batch", n]),
                                           helper.make_tensor_value_info("ditmerge_count_r", T.INT64, ["r"])],
                              [helper.make_tensor_value_info("v", T.FLOAT16 if strongly else T.FLOAT, None),
                               helper.make_tensor_value_info("i", T.INT64, None)], [init])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10), path)
    return path


def test_build_engine_gives_each_count_vector_its_profile(tmp_path, fake_trt):
    from export.trt_build import build_engine

    graph = _count_graph(tmp_path / "g.onnx")
    report = build_engine(graph, tmp_path / "g.engine", "fp16", batch=(1, 2, 8), strip=True, profiles=PROFILES)
    build = fake_trt["builds"][-1]
    assert [p["ditmerge_count_r"] for p in build["profiles"]] == [((0,), (0,), (0,)), ((2,), (2,), (2,)),
                                                                  ((5,), (5,), (5,))]  # min = opt = max
    assert all(p["x"] == ((1, 8), (2, 8), (8, 8)) for p in build["profiles"])  # the batch keeps its range
    assert {"FP16", "STRIP_PLAN", "REFIT_IDENTICAL"} <= build["flags"] and build["network_flags"] == 0
    assert report["profiles"] == 3 and report["activation_bytes"] == 3000
    assert (tmp_path / "g.engine").read_bytes().startswith(b"engine:")


def test_strongly_typed_builds_take_the_graphs_types(tmp_path, fake_trt):
    from export.trt_build import build_engine

    graph = _count_graph(tmp_path / "g.onnx", strongly=True)
    build_engine(graph, tmp_path / "g.engine", "fp16", strip=False, profiles=[{"r": 1}], strongly_typed=True)
    build = fake_trt["builds"][-1]
    assert build["network_flags"] == 1 << 5  # NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert not {"FP16", "BF16", "OBEY_PRECISION_CONSTRAINTS"} & build["flags"]  # no precision flags, no hints
    with pytest.raises(DitmergeError, match="strongly typed build takes its types from the graph"):
        build_engine(graph, tmp_path / "h.engine", "bf16", profiles=[{"r": 1}], strongly_typed=True)


def test_build_engine_checks_every_profile_first(tmp_path, fake_trt):
    from export.trt_build import build_engine

    graph = _count_graph(tmp_path / "g.onnx", n=4000, k_offset=3800)
    build_engine(graph, tmp_path / "ok.engine", "fp32", profiles=[{"r": 0}, {"r": 40}])  # K <= 3840 in both
    with pytest.raises(DitmergeError, match=r"K=3900 in profile 1 \(r=100\) exceeds"):
        build_engine(graph, tmp_path / "big.engine", "fp32", profiles=[{"r": 40}, {"r": 100}])
    with pytest.raises(DitmergeError, match="no optimization profile gives their values"):
        build_engine(graph, tmp_path / "none.engine", "fp32")
    assert len(fake_trt["builds"]) == 1 and not (tmp_path / "big.engine").exists()


def _plan_dir(tmp_path):
    """Four buckets: two merged ones share g1 at r=2, one more uses it at r=5, one runs the base graph."""
    _count_graph(tmp_path / "g1.onnx")
    base = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "b",
                             [helper.make_tensor_value_info("x", T.FLOAT, ["batch", 8])],
                             [helper.make_tensor_value_info("y", T.FLOAT, None)])
    onnx.save(helper.make_model(base, opset_imports=[helper.make_opsetid("", 23)], ir_version=10),
              tmp_path / "base.onnx")
    (tmp_path / "weights.bin").write_bytes(b"")
    spans = [(750, 999, "g1.onnx", 5), (500, 749, "g1.onnx", 2), (250, 499, "g1.onnx", 2), (0, 249, "base.onnx", 0)]
    buckets = [{"index": i, "t_lo": lo, "t_hi": hi, "ratio": 0.5, "graph": g, "sha256": g[:2] * 32,
                "graphs": {"main": {"file": g, "sha256": g[:2] * 32}}, "counts": {"r": r} if g != "base.onnx" else {}}
               for i, (lo, hi, g, r) in enumerate(spans)]
    return {"format_version": 3, "model": {"config": {}, "family": "dit", "grid": [2, 4]},
            "weights": {"file": "weights.bin", "sha256": ""}, "method": {"name": "none"}, "buckets": buckets}


def test_build_plan_engines_one_engine_per_graph_file(tmp_path, fake_trt, monkeypatch):
    import export.trt_build as tb

    monkeypatch.setattr(tb, "require_tensorrt", lambda: None)
    monkeypatch.setattr(tb, "gpu_name", lambda: "FAKE GPU")
    manifest = _plan_dir(tmp_path)
    engines = tb.build_plan_engines(tmp_path, manifest, "fp16", progress=False)
    assert set(engines) == {"g1.onnx", "base.onnx"} and len(fake_trt["builds"]) == 2  # not one per bucket
    assert engines["g1.onnx"]["profiles"] == [{"r": 2}, {"r": 5}]  # distinct count vectors, sorted
    assert engines["base.onnx"]["profiles"] == [{}]
    assert engines["g1.onnx"]["memory"]["profiles"] == 2
    assert engines["g1.onnx"]["key"] == tb.engine_key("g1" * 32, "fp16", "10.15.1", "FAKE GPU", True,
                                                      [{"r": 2}, {"r": 5}])
    # cached by key: a second call builds nothing; one more count vector is a new engine
    again = tb.build_plan_engines(tmp_path, {**manifest, "engines": engines}, "fp16", progress=False)
    assert again == engines and len(fake_trt["builds"]) == 2
    manifest["buckets"][2]["counts"] = {"r": 3}
    third = tb.build_plan_engines(tmp_path, manifest, "fp16", progress=False)
    assert third["g1.onnx"]["profiles"] == [{"r": 2}, {"r": 3}, {"r": 5}]
    assert third["g1.onnx"]["file"] != engines["g1.onnx"]["file"] and len(fake_trt["builds"]) == 3
    assert third["base.onnx"] == engines["base.onnx"]
    json.dumps(third)  # the table goes into plan.json


def test_engine_key_includes_the_profiles_and_the_build_mode():
    from export.trt_build import engine_key

    base = engine_key("a" * 64, "fp16", "10.15.1", "H100", True, [{"r": 2}, {"r": 5}])
    assert engine_key("a" * 64, "fp16", "10.15.1", "H100", True, [{"r": 2}, {"r": 5}]) == base
    others = [engine_key("a" * 64, "fp16", "10.15.1", "H100", True, [{"r": 2}]),
              engine_key("a" * 64, "fp16", "10.15.1", "H100", True, [{"r": 5}, {"r": 2}]),
              engine_key("a" * 64, "fp16", "10.15.1", "H100", True, [{"r": 2}, {"r": 5}], strongly_typed=True),
              engine_key("a" * 64, "fp16", "10.15.1", "H100", True, [{"r": 2}, {"r": 5}], batch=(1, 2, 4))]
    assert len({base, *others}) == 5


def _plan(tmp_path, engines):
    from runtime.plan import Plan

    manifest = _plan_dir(tmp_path)
    manifest["engines"] = engines
    return Plan(tmp_path, manifest)


def _engines(g1_profiles):
    rec = {"tensorrt": "10.15.1", "gpu": "FAKE GPU", "strip": False}
    return {"g1.onnx": {**rec, "file": "g1.engine", "profiles": g1_profiles},
            "base.onnx": {**rec, "file": "base.engine", "profiles": [{}]}}


def test_plans_with_stale_engine_tables_are_refused(tmp_path, caplog):
    from runtime.transformer import _use_tensorrt

    old = _engines([{"r": 2}, {"r": 5}])
    del old["g1.onnx"]["profiles"]  # an engines table of an older ditmerge
    with pytest.raises(DitmergeError, match="records no optimization profiles.*rebuild them with "
                                            "`python -m export --backend trt`"):
        _use_tensorrt(_plan(tmp_path, old), "trt")
    assert _use_tensorrt(_plan(tmp_path, old), "auto") is False and "no optimization profiles" in caplog.text
    with pytest.raises(DitmergeError, match=r"no optimization profile for bucket 0's counts \{'r': 5\}"):
        _use_tensorrt(_plan(tmp_path, _engines([{"r": 2}])), "trt")
    # a table that serves every bucket gets past these checks (and here stops at the missing TensorRT)
    from runtime.trt_runner import tensorrt_status

    if not tensorrt_status()[0]:
        with pytest.raises(DitmergeError, match="needs TensorRT on a GPU"):
            _use_tensorrt(_plan(tmp_path, _engines([{"r": 2}, {"r": 5}])), "trt")


def test_plan_transformer_makes_one_trt_runner_per_engine_file(tmp_path, monkeypatch):
    import runtime.transformer as tr

    monkeypatch.setattr(tr, "_use_tensorrt", lambda plan, backend: True)
    tf = tr.PlanTransformer(_plan(tmp_path, _engines([{"r": 2}, {"r": 5}])), backend="trt")
    runners = {b.index: tf.runner(b.graph) for b in tf.plan.buckets}
    assert runners[0] is runners[1] is runners[2] and runners[3] is not runners[0]  # per engine, not per bucket
    assert len(tf._engine_runners) == 2 and not runners[0].is_active  # created lazily, activated on first infer
    assert runners[0].engine_path.name == "g1.engine" and runners[0].expected_profiles == [{"r": 2}, {"r": 5}]


def _fake_gpu(monkeypatch) -> None:
    """Let the build and the runtime take the fake tensorrt module for TensorRT on a GPU (engines on the CPU)."""
    import export.trt_build as tb
    import runtime.trt_runner as rt

    for mod in (tb, rt):
        monkeypatch.setattr(mod, "gpu_name", lambda: "FAKE GPU")
    monkeypatch.setattr(tb, "require_tensorrt", lambda: None)
    monkeypatch.setattr(rt, "tensorrt_status", lambda: (True, ""))
    monkeypatch.setattr(rt, "DEFAULT_DEVICE", "cpu")


@pytest.mark.parametrize("unmerged", ["base", "branch"])  # "merged": one graph too, as "branch" without the If
def test_a_whole_plan_runs_through_one_engine_per_graph(tmp_path, fake_trt, monkeypatch, unmerged):
    """export -> engines -> ``runtime.load(backend="trt")`` -> forward, on the fake whose engines are their graphs
    run by onnxruntime: every bucket's step equals the onnxruntime backend's, through one runner per engine
    file, in the profile of the bucket's counts. With ``unmerged=merged`` or ``branch`` (If on r == 0) the
    whole plan is one engine of three profiles, the unmerged bucket's count input of length 0."""
    one_graph = unmerged != "base"
    import export.trt_build as tb
    import runtime
    from export.build import build_plan

    _fake_gpu(monkeypatch)
    plan = tmp_path / "p"
    manifest = build_plan("builtin:tiny-dit", buckets="999-700:0.5,699-400:0.3,399-0:0", out=plan, measure=False,
                          progress=False, quality_samples=0, options={"unmerged": unmerged})
    manifest["engines"] = tb.build_plan_engines(plan, manifest, "fp32", strip=False, progress=False)
    assert len(fake_trt["builds"]) == len(manifest["engines"]) == len({b["graph"] for b in manifest["buckets"]})
    (plan / "plan.json").write_text(json.dumps(manifest))
    on_trt = runtime.load(plan, backend="trt", deterministic=True)
    on_ort = runtime.load(plan, backend="cpu", deterministic=True)
    assert on_trt.use_trt and not on_ort.use_trt
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 7])
    for t in (850, 550, 100):
        bucket = on_trt.plan.bucket_for(t)
        got = on_trt(x, timestep=torch.tensor([t, t]), class_labels=labels).sample
        want = on_ort(x, timestep=torch.tensor([t, t]), class_labels=labels).sample
        assert float((got - want).abs().max()) <= 1e-5, t
        runner = on_trt.runner(bucket.graph)
        profiles = manifest["engines"][bucket.graph]["profiles"]
        vector = {k: v for k, v in bucket.counts.items() if k in {k for p in profiles for k in p}}
        assert runner.engine.ran_profiles[-1] == profiles.index(vector)  # the bucket's own profile
    assert len(on_trt._engine_runners) == len(manifest["engines"]) == (1 if one_graph else 2)  # one per engine file
    if one_graph:
        (runner,) = on_trt._engine_runners.values()
        assert len(runner.profiles) == 3 and {"tome_r": 0} in runner.profiles
        assert sorted(set(runner.engine.ran_profiles)) == [0, 1, 2]  # each bucket in its own profile
    assert all(len(r.contexts) == len(r.profiles) for r in on_trt._engine_runners.values())


def test_check_plan_profiles_runs_the_static_check_of_every_engine(tmp_path):
    """On CPU, per graph file and profile: the fixed plan passes; K = r + 3800 at r = 100 is refused."""
    from export.trt_build import check_plan_profiles

    manifest = _plan_dir(tmp_path)
    assert check_plan_profiles(tmp_path, manifest) == {"g1.onnx": [], "base.onnx": []}
    _count_graph(tmp_path / "g1.onnx", n=4000, k_offset=3800)
    manifest["buckets"][0]["counts"] = {"r": 100}
    found = check_plan_profiles(tmp_path, manifest)
    assert found["base.onnx"] == [] and found["g1.onnx"] == [
        "TopK topk: K=3900 in profile 1 (r=100) exceeds TensorRT's limit of 3840"]  # profiles r=2 and r=100


def test_a_cache_plan_runs_its_two_variants_in_one_engine(tmp_path, fake_trt, monkeypatch):
    """The cache method's full and cached steps are branches of one graph: one engine, one profile per variant."""
    import export.trt_build as tb
    import runtime
    from export.build import build_plan

    _fake_gpu(monkeypatch)
    plan = tmp_path / "p"
    manifest = build_plan("builtin:tiny-dit", method="cache", options={"interval": (2,), "full_above": -1}, out=plan,
                          measure=False, progress=False, quality_samples=0)
    manifest["engines"] = tb.build_plan_engines(plan, manifest, "fp32", strip=False, progress=False)
    (graph,) = manifest["engines"]
    assert manifest["engines"][graph]["profiles"] == [{"variant": 0}, {"variant": 1}]
    (plan / "plan.json").write_text(json.dumps(manifest))
    on_trt = runtime.load(plan, backend="trt", deterministic=True)
    on_ort = runtime.load(plan, backend="cpu", deterministic=True)
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 7])
    for t in (900, 800, 700, 600):  # full, cached, full, cached
        got = on_trt(x, timestep=torch.tensor([t, t]), class_labels=labels).sample
        want = on_ort(x, timestep=torch.tensor([t, t]), class_labels=labels).sample
        assert float((got - want).abs().max()) <= 1e-5, t
    (runner,) = on_trt._engine_runners.values()
    assert sorted(set(runner.engine.ran_profiles)) == [0, 1]
    assert [v for _, _, v in on_ort._gen.state.data["log"]] == ["main", "cached", "main", "cached"]
