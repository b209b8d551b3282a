"""TensorRT: the cache key, the fallback and the errors on CPU; real engine builds where a GPU exists."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.trt_build import engine_key, tensorrt_status
from passes.errors import DitmergeError

TRT_OK, TRT_WHY = tensorrt_status()
gpu = pytest.mark.skipif(not TRT_OK, reason=f"TensorRT tests need TensorRT >= 10.15 and a CUDA GPU: {TRT_WHY}")


def test_engine_key_changes_with_each_of_its_parts():
    base = engine_key("a" * 64, "fp16", "10.15.1", "NVIDIA H100")
    assert engine_key("a" * 64, "fp16", "10.15.1", "NVIDIA H100") == base
    others = [engine_key("b" * 64, "fp16", "10.15.1", "NVIDIA H100"), engine_key("a" * 64, "fp32", "10.15.1", "NVIDIA H100"),
              engine_key("a" * 64, "fp16", "10.16.0", "NVIDIA H100"), engine_key("a" * 64, "fp16", "10.15.1", "NVIDIA H200"),
              engine_key("a" * 64, "fp16", "10.15.1", "NVIDIA H100", strip=False)]
    assert len({base, *others}) == 6
    with pytest.raises(DitmergeError, match="unknown precision"):
        engine_key("a", "int3", "10", "x")


@pytest.mark.skipif(TRT_OK, reason="checks the behaviour without TensorRT")
def test_trt_backend_without_tensorrt_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "export", "--backend", "trt", "--out", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--backend trt needs TensorRT on a GPU" in proc.stderr and "--backend auto" in proc.stderr
    assert not (tmp_path / "p").exists()


@pytest.mark.skipif(TRT_OK, reason="checks the behaviour without TensorRT")
def test_auto_backend_falls_back_to_onnxruntime(tmp_path):
    import runtime
    from export.build import build_plan

    manifest = build_plan("builtin:tiny-dit", buckets="0.5", out=tmp_path / "p", backend="auto", measure=False, progress=False)
    assert "engines" not in manifest
    tf = runtime.load(tmp_path / "p", backend="auto")
    assert not tf.use_trt
    with pytest.raises(DitmergeError, match="backend 'trt' needs TensorRT on a GPU"):
        runtime.load(tmp_path / "p", backend="trt")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_engines_match_onnxruntime(tmp_path, precision):
    """benchmarks/gpu_check.py's check on the bundled plan: fp32 forwards within 1e-3 of onnxruntime CPU fp32;
    fp16 / bf16 generations at PSNR >= 30 dB against onnxruntime CPU fp32."""
    import runtime
    from benchmarks.gpu_check import SPECS, build, check_trt, generation

    spec = SPECS["bundled"]
    plan, model = build(spec, tmp_path)
    reference = generation(spec, runtime.load(plan, backend="cpu", deterministic=True), model, spec.gen_steps)
    res = check_trt(spec, plan, model, precision, reference, repeats=3, opt_level=2)
    assert res["ok"], res


@gpu
@pytest.mark.gpu
def test_generate_cli_runs_on_tensorrt(tmp_path):
    import subprocess
    import sys

    from export.build import build_plan

    build_plan("builtin:tiny-dit", buckets="999-500:0.5,499-0:0", out=tmp_path / "p", backend="trt",
               precision="fp16", measure=False, progress=False)
    proc = subprocess.run([sys.executable, "-m", "runtime", "generate", "--plan", str(tmp_path / "p"), "--backend", "trt",
                           "--class-label", "1", "--steps", "4", "--out", str(tmp_path / "img"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "img").glob("*.png"))) == 1


def test_gpu_check_cpu_mode_writes_its_json(tmp_path):
    """Without TensorRT the check still builds the plan, runs onnxruntime against eager, and says what it skipped."""
    from benchmarks.gpu_check import main

    out = tmp_path / "check.json"
    assert main(["--cpu", "--plans", "bundled", "--repeats", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["tensorrt_skipped"] == "--cpu given" and report["failed"] == []
    cpu = report["plans"]["bundled"]["cpu"]
    assert cpu["base_vs_eager_ok"] and cpu["base_vs_eager_max_abs"] <= 1e-4 and cpu["reference_finite"]
    assert {"merged", "unmerged", "torch_eager"} <= set(cpu["ort_cpu_ms"])
    assert {"date", "gpu", "versions"} <= set(report) and report["versions"]["onnxruntime"]
    # the multi-profile plan's layout: all three buckets on one graph, one profile each (r = 0 for the unmerged)
    prof = report["plans"]["bundled"]["profiles"]
    assert prof["buckets_per_graph"] == {g: 3 for g in prof["layout"]} and len(prof["layout"]) == 1 and prof["shared"]
    (vectors,) = prof["layout"].values()
    assert len(vectors) == 3 and {"tome_r": 0} in vectors and "max_abs_vs_ort" not in prof
    assert prof["static_ok"] and set(prof["static_check"]) == set(prof["layout"])  # every engine checked, on CPU


@gpu
@pytest.mark.gpu
def test_engines_are_cached_by_key_and_weight_stripped(tmp_path):
    from export.build import build_plan

    m1 = build_plan("builtin:tiny-dit", buckets="0.5", out=tmp_path / "p", backend="trt", measure=False, progress=False)
    engine = tmp_path / "p" / next(iter(m1["engines"].values()))["file"]
    mtime = engine.stat().st_mtime_ns
    m2 = build_plan("builtin:tiny-dit", buckets="0.5", out=tmp_path / "p", backend="trt", measure=False, progress=False)
    assert m2["engines"] == m1["engines"] and engine.stat().st_mtime_ns == mtime  # reused, not rebuilt
    from export.trt_build import build_engine

    graph = tmp_path / "p" / next(iter(m1["engines"]))
    build_engine(graph, tmp_path / "full.engine", "fp16", strip=False, profiles=m1["engines"][graph.name]["profiles"])
    assert engine.stat().st_size < (tmp_path / "full.engine").stat().st_size  # stripped: no weights inside
    assert json.loads((tmp_path / "p" / "plan.json").read_text())["engines"]


def _profile_graph(path, n: int = 64, c: int = 1024):
    """x [batch, n, c]: keep the first n - r tokens (r: the length of ditmerge_count_r), y = x_kept @ W, and a
    TopK with K = n - r over the rows' sums. W (c x c fp32, 4 MiB at c = 1024) outweighs the activations, as
    a transformer's weights do."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((c, c)) / np.sqrt(c)).astype(np.float32)
    ints = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)  # noqa: E731
    nodes = [helper.make_node("Shape", ["ditmerge_count_r"], ["r"], name="count_of"),
             helper.make_node("Sub", ["n", "r"], ["kept"], name="kept"),
             helper.make_node("Slice", ["x", "zero", "kept", "one"], ["xs"], name="keep"),
             helper.make_node("MatMul", ["xs", "w"], ["y"], name="proj"),
             helper.make_node("ReduceSum", ["y", "two"], ["s"], name="score", keepdims=0),
             helper.make_node("TopK", ["s", "kept"], ["v", "i"], name="topk", axis=-1)]
    graph = helper.make_graph(nodes, "profiles", [helper.make_tensor_value_info("x", T.FLOAT, ["batch", n, c]),
                                                  helper.make_tensor_value_info("ditmerge_count_r", T.INT64, ["r"])],
                              [helper.make_tensor_value_info("y", T.FLOAT, None),
                               helper.make_tensor_value_info("v", T.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), ints("n", [n]), ints("zero", [0]), ints("one", [1]),
                               ints("two", [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return w.nbytes


@gpu
@pytest.mark.gpu
def test_multi_profile_engine_holds_the_weights_once(tmp_path):
    """One engine with a profile per count vector: device memory (TensorRT's weights + the one activation buffer)
    <= 1.15x a plain single-profile engine of the same graph, and every profile agrees with onnxruntime (fp32, 1e-3)."""
    import onnxruntime as ort
    import torch

    from export.trt_build import build_engine
    from passes.counts import count_feed
    from runtime.trt_runner import TrtRunner

    weight_bytes = _profile_graph(tmp_path / "g.onnx")
    profiles = [{"r": 0}, {"r": 16}, {"r": 32}]
    build_engine(tmp_path / "g.onnx", tmp_path / "multi.engine", "fp32", strip=False, profiles=profiles, opt_level=2)
    build_engine(tmp_path / "g.onnx", tmp_path / "plain.engine", "fp32", strip=False, profiles=profiles[:1],
                 opt_level=2)
    memory = {}
    for name in ("multi", "plain"):
        free0 = torch.cuda.mem_get_info()[0]
        runner = TrtRunner(tmp_path / f"{name}.engine", tmp_path / "g.onnx", strip=False)
        runner.activate()
        torch.cuda.synchronize()
        measured = free0 - torch.cuda.mem_get_info()[0]
        report = runner.memory
        weights = report.get("weights_bytes")
        memory[name] = {"tensorrt": (weights + report["activation_bytes"]) if weights is not None else None,
                        "measured": measured, **report}
        if weights is not None:
            assert weights >= 0.9 * weight_bytes, report  # the figure counts the weights (built unstripped)
        if name == "multi":
            assert len(runner.contexts) == 3 and runner.profiles == profiles
            session = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
            x = torch.randn(2, 64, 1024, generator=torch.Generator().manual_seed(1))
            for counts in (profiles[1], profiles[0], profiles[2]):  # switching profiles back and forth
                feed = {"x": x, **count_feed(counts)}
                got = runner.infer({"x": x.cuda(), **count_feed(counts)})
                want = dict(zip(("y", "v"), session.run(["y", "v"], {k: np.asarray(v) for k, v in feed.items()})))
                for out in ("y", "v"):
                    assert got[out].shape == want[out].shape == ((2, 64 - counts["r"], 1024) if out == "y"
                                                                  else (2, 64 - counts["r"]))
                    err = float(np.abs(got[out].cpu().numpy() - want[out]).max())
                    assert err <= 1e-3, (counts, out, err)
        runner.deactivate()
    basis = "tensorrt" if memory["multi"]["tensorrt"] is not None else "measured"
    ratio = memory["multi"][basis] / memory["plain"][basis]
    print(json.dumps({"basis": basis, "ratio": ratio, **memory}, indent=1))
    assert ratio <= 1.15, memory
