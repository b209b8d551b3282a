"""No half-written plans: builds killed at several points, then resumed without redoing finished work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from export.build import build_plan
from runtime.plan import Plan


def _start(out):
    return subprocess.Popen([sys.executable, "-m", "export", "--model", "builtin:tiny-dit", "--buckets", "0.5,0.4,0.3", "--out", str(out),
                             "--no-measure", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "TQDM_DISABLE": "1"})


def _kill_when(proc, path, timeout=240):
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"build ended before {path.name} appeared: {proc.stderr.read()[-1500:]}"
        assert time.monotonic() - t0 < timeout, f"{path.name} never appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_killed_builds_keep_the_previous_plan_and_resume(tmp_path):
    out = tmp_path / "plan"
    build_plan("builtin:tiny-dit", buckets="0.2", out=out, measure=False, progress=False)
    previous = (out / "plan.json").read_text()
    for point in ("weights.bin", "bucket_0.onnx", "bucket_1.onnx"):
        _kill_when(_start(out), out / ".staging" / point)
        assert (out / "plan.json").read_text() == previous, f"killed at {point}: the previous plan changed"
        assert len(Plan.load(out).buckets) == 1  # every hash still verifies
    proc = _start(out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "resuming: reusing the exported base.onnx" in err
    assert "resuming: reusing bucket_0.onnx" in err and "resuming: reusing bucket_1.onnx" not in err.split("bucket_0")[0]
    plan = Plan.load(out)
    assert [b.ratio for b in plan.buckets] == [0.5, 0.4, 0.3]
    assert not (out / ".staging").exists()


def test_a_different_model_does_not_reuse_an_interrupted_build(tmp_path):
    from export.build import StageProgress

    stage = tmp_path / ".staging"
    stage.mkdir()
    (stage / "stale.onnx").write_bytes(b"from a build without a progress record")
    p = StageProgress(stage, {"model": "a"})
    assert not (stage / "stale.onnx").exists()  # unknown leftovers are not trusted
    (stage / "base.onnx").write_bytes(b"x")
    p.record("base", ["base.onnx"])
    assert StageProgress(stage, {"model": "a"}).finished("base", ["base.onnx"])
    (stage / "base.onnx").write_bytes(b"tampered")
    assert not StageProgress(stage, {"model": "a"}).finished("base", ["base.onnx"])
    assert not StageProgress(stage, {"model": "b"}).finished("base", ["base.onnx"])
    assert not (stage / "base.onnx").exists()  # a different key starts over
