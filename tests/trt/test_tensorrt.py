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
    build_engine(graph, tmp_path / "full.engine", "fp16", strip=False)
    assert engine.stat().st_size < (tmp_path / "full.engine").stat().st_size  # stripped: no weights inside
    assert json.loads((tmp_path / "p" / "plan.json").read_text())["engines"]
