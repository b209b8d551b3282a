"""The README's main command, and the CLI's user-error boundary."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from runtime.plan import Plan

ENV_NO_TQDM = {"TQDM_DISABLE": "1"}


def _run(*args, cwd):
    import os

    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **ENV_NO_TQDM})


@pytest.mark.slow
def test_python_m_export_with_no_arguments_builds_a_valid_plan(tmp_path):
    proc = _run("export", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "plan written to plan/" in proc.stdout and "PASSED" in proc.stdout
    assert "| bucket | timesteps | ratio |" in proc.stdout
    plan = Plan.load(tmp_path / "plan")  # verifies every hash
    manifest = json.loads((tmp_path / "plan" / "plan.json").read_text())
    # the default: step caching, one bucket with a full and a cached variant
    assert manifest["method"]["name"] == "cache" and [b["ratio"] for b in manifest["buckets"]] == [0.0]
    assert all(set(b["graphs"]) == {"main", "cached"} for b in manifest["buckets"])
    assert all(b["fidelity_max_abs"] <= 1e-4 for b in manifest["buckets"])
    assert all(b["tensorrt_check"] == [] for b in manifest["buckets"])
    assert plan.bucket_for(999).index == 0 and plan.bucket_for(0).index == 0
    assert not (tmp_path / "plan" / ".staging").exists()
    if manifest["model"]["source"] == "bundled:tiny-dit":  # the trained default: the report carries quality
        q = manifest["report"]["quality"]
        assert q["samples"] == 20 and 0 < q["ssim"]["worst"] <= q["ssim"]["mean"] <= 1
        lat = q["e2e_latency_s"]  # the speed-up is the ratio of the reported latencies (no timing threshold)
        assert all(math.isfinite(v) and v > 0 for v in lat.values())
        assert q["e2e_speedup"] == pytest.approx(lat["unmerged"] / lat["merged"], rel=1e-9)
        assert "fid_merged" in q and (tmp_path / "plan" / "samples.png").stat().st_size > 0
        assert "## Quality and end-to-end speed" in (tmp_path / "plan" / "report.md").read_text()
        assert "end-to-end latency" in proc.stdout and "PSNR dB" in proc.stdout  # the CLI prints both


@pytest.mark.parametrize("args,message", [
    (["--buckets", "999-500:0.5"], "must cover timesteps 0..999"),
    (["--model", "/nonexistent/dir/x"], "neither an existing folder nor a hub id"),
    (["--method", "magic"], "unknown method 'magic'; available: "),
    (["--buckets", "0.9"], "ratio 0.9 is outside"),
    (["--locations", "attn,everywhere"], "unknown merge locations"),
])
def test_user_errors_exit_1_without_traceback(tmp_path, args, message):
    proc = _run("export", *args, "--out", str(tmp_path / "p"), cwd=tmp_path)
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p" / "plan.json").exists()


def test_print_python_shows_the_library_call(tmp_path):
    proc = _run("export", "--buckets", "0.3", "--print-python", cwd=tmp_path)
    assert proc.returncode == 0
    assert "build_plan(model='bundled:tiny-dit', method='cache', buckets='0.3'" in proc.stdout


def test_help_documents_every_flag(tmp_path):
    out = _run("export", "--help", cwd=tmp_path).stdout
    for flag in ("--model", "--method", "--buckets", "--out", "--locations", "--grid", "--text-len", "--no-measure",
                 "--repeats", "--quality-samples", "--quality-steps", "--backend", "--precision", "--sweep", "--no-progress",
                 "--print-python"):
        assert flag in out


def test_failed_build_leaves_no_staging_and_keeps_the_previous_plan(tmp_path):
    from export.build import build_plan
    from passes.errors import DitmergeError

    out = tmp_path / "plan"
    build_plan("builtin:tiny-dit", buckets="0", out=out, measure=False, progress=False)
    before = (out / "plan.json").read_text()
    with pytest.raises(DitmergeError, match="outside"):
        build_plan(buckets="0.9", out=out, measure=False, progress=False)
    assert (out / "plan.json").read_text() == before and not (out / ".staging").exists()
    Plan.load(out)
    with pytest.raises(DitmergeError):
        build_plan(buckets="0.9", out=tmp_path / "fresh", measure=False, progress=False)
    assert not (tmp_path / "fresh").exists()
