"""The family x method matrix of the README: what a build refuses, with a message naming family and reason,
and a quiet default ``python -m export``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from export.build import build_plan
from passes.errors import DitmergeError
from tests.pipelines.components import RECIPES

# (method, family recipe) -> the reason's words; every other pair of the matrix builds (test_pipelines: tome;
# test_methods_in_pipelines: sdtm, catome, atedm)
REFUSED = {("atedm", "sd3"): "joint attention", ("atedm", "flux"): "one sequence"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    out = {}
    for name in ("sd3", "flux"):
        d = tmp_path_factory.mktemp(f"m_{name}")
        RECIPES[name].make_transformer().save_pretrained(d / "transformer")
        out[name] = d
    return out


@pytest.mark.parametrize("method,family", sorted(REFUSED))
def test_unsupported_pairs_refuse_before_export(method, family, model_dirs, tmp_path):
    with pytest.raises(DitmergeError, match=f"method {method!r} does not support .*{REFUSED[(method, family)]}"):
        build_plan(str(model_dirs[family]), method=method, out=tmp_path / "plan", measure=False, progress=False)
    assert not (tmp_path / "plan").exists(), "a refused build left files behind"


def test_default_cli_run_is_quiet(model_dirs, tmp_path):
    """Progress, the report and ditmerge's own log lines; no third-party notices unless -v."""
    cmd = [sys.executable, "-m", "export", "--model", str(model_dirs["sd3"]), "--no-measure", "--no-progress",
           "--buckets", "0.3", "--out", str(tmp_path / "plan")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    foreign = [line for line in res.stderr.splitlines() if not line.startswith(("INFO passes.", "INFO export."))]
    assert not foreign, f"third-party output in a default run: {foreign[:5]}"
    assert "| bucket |" in res.stdout and "1000..0" in res.stdout  # flow matching: the bucket takes t = 1000
