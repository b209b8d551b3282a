"""SDTM, CA-ToMe and AT-EDM plans through whole default generations of the DiT and PixArt pipelines, and
SDTM and CA-ToMe through SD3's and Flux's (flow matching; AT-EDM refuses them).

The plan's images must equal those of the eager twin pipeline (:mod:`tests.pipelines.twins`: the methods'
eager twins installed per call, driven by the plan's manifest and the same seeded stream) within 1e-3
over the whole generation, with the same step decisions as the runtime's policy (SDTM's full and merged
steps with their counters and caches, CA-ToMe's match and apply steps with the cached matching); each
graph variant is also checked against its twin per forward when the plan is built (<= 1e-4).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import runtime
from export.build import build_plan
from tests.helpers import EXPORT_ATOL, METHOD_ATOL, assert_close
from tests.pipelines.components import RECIPES, pipeline
from tests.pipelines.test_pipelines import PIPELINE_TWIN_ATOL, _eager, _run
from tests.pipelines.twins import TWINS

METHODS = {
    "sdtm": dict(buckets=None, options={}),
    # SD3's default image is 4x4 tokens (4 windows), Flux merges one MLP of its two blocks: merge more and
    # weight the computed value more at merged positions, so the twin's images move beyond 1e-3
    "sdtm-sd3": dict(buckets=None, options={"ratio": 0.5, "blend": 0.5}),
    "sdtm-flux": dict(buckets=None, options={"ratio": 0.5, "blend": 0.5}),
    "catome": dict(buckets="0,0", options={"calib_samples": 2, "calib_steps": 10}),
    # Flux: the image-stream MLP of the double-stream blocks (joint attention carries rotary embeddings over
    # the whole sequence, single-stream blocks mix text and image: neither merges), as ToMe on Flux
    "catome-flux": dict(buckets="0,0", options={"calib_samples": 2, "calib_steps": 10, "locations": ("mlp",)}),
    # the tiny models have 2 blocks: prune after block 0; DSAP prunes half as much in the noisiest bucket
    "atedm": dict(buckets="0.3,0.3", options={"prune_layer": 0, "dsap_shift": 0, "dsap_scale": 0.5}),
}
# the variants a default generation must run (beyond the twin's agreement on when)
VARIANTS = {"sdtm": {"main", "full"}, "catome": {"main", "match"}, "atedm": {"main"}}


# the pipelines each plan runs in: PixArt-Sigma's runs the PixArt-alpha plan (the same transformer; 300-token prompts)
PIPELINES = {"dit": ("dit",), "pixart-alpha": ("pixart-alpha", "pixart-sigma"), "sd3": ("sd3",), "flux": ("flux",)}


def _plan_and_twin(method: str, pipe_name: str, model_dir, plan, manifest: dict):
    """One default generation with the plan as ``pipe.transformer`` and one with the eager twin pipeline:
    (plan images, twin images, the runtime's step log, the twin's, the pipeline with the plan, its transformer)."""
    pipe = pipeline(RECIPES[pipe_name], _eager(pipe_name, model_dir))
    tf = runtime.load(plan, pipeline=pipe)
    images = _run(pipe, pipe_name, output_type="np")
    policy_log = list(tf._gen.state.data.get("log", []))
    twin = TWINS[method](_eager(pipe_name, model_dir), manifest, seed=tf.seed)
    expected = _run(pipeline(RECIPES[pipe_name], twin), pipe_name, output_type="np")
    return images, expected, policy_log, twin.log, pipe, tf


CASES = [(m, n) for m in ("atedm", "catome", "sdtm") for n in ("dit", "pixart-alpha")] + [
    (m, n) for m in ("catome", "sdtm") for n in ("sd3", "flux")]


@pytest.mark.parametrize("method,name", CASES)
def test_method_plan_equals_twin_pipeline(method, name, pipeline_plans, tmp_path):
    model_dir, unmerged = pipeline_plans(name, "unmerged")
    spec = METHODS.get(f"{method}-{name}", METHODS[method])
    out = tmp_path / "plan"
    kw = {} if spec["buckets"] is None else {"buckets": spec["buckets"]}
    build_plan(str(model_dir), method=method, out=out, options=spec["options"], measure=True, repeats=1,
               progress=False, **kw)
    manifest = json.loads((out / "plan.json").read_text())
    for b in manifest["buckets"]:
        assert b["fidelity_max_abs"] <= METHOD_ATOL, (b["index"], b["fidelity"])
    for pipe_name in PIPELINES[name]:
        images, expected, policy_log, log, pipe, tf = _plan_and_twin(method, pipe_name, model_dir, out, manifest)
        runtime.load(unmerged, pipeline=pipe)
        plain = _run(pipe, pipe_name, output_type="np")

        ran = {rn.graph_path.name for rn in tf._runners.values()}
        assert ran - {"base.onnx"}, f"only the unmerged graph ran: {ran}"
        assert {v for _, _, v in log} >= VARIANTS[method], log
        assert len({bi for _, bi, _ in log}) == len(manifest["buckets"]), "the generation missed a bucket"
        if policy_log:  # the runtime's own record of its decisions (SDTM, CA-ToMe)
            assert policy_log == log, "the runtime's step decisions differ from the method's schedule"
        err = assert_close(images, expected, PIPELINE_TWIN_ATOL, f"{method} in {pipe_name}: plan vs twin pipeline")
        moved = float(np.abs(expected - plain).max())
        assert moved > PIPELINE_TWIN_ATOL, f"the method's twin is within tolerance of the unmerged images ({moved:.1e})"
        print(f"{method} in {pipe_name}: plan vs twin pipeline max abs {err:.2e} (twin vs unmerged {moved:.2e}); "
              f"per-forward {max(b['fidelity_max_abs'] for b in manifest['buckets']):.2e}; "
              f"steps {dict(Counter(v for _, _, v in log))}, graphs {sorted(ran)}")


def _with_interval(plan: Path, interval: int, out: Path) -> Path:
    """A copy of a cache plan whose schedule runs a full step every ``interval`` steps: the graphs do not depend
    on it (it is the runtime's), so the copy is what ``-o interval=N`` builds, without a second export."""
    shutil.copytree(plan, out, copy_function=os.link)
    manifest = json.loads((plan / "plan.json").read_text())
    manifest["method"]["params"]["interval"] = [interval]
    for b in manifest["buckets"]:
        b["method_meta"]["interval"] = interval
    (out / "plan.json").unlink()  # a hard link to the original's
    (out / "plan.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("name", ["dit", "pixart-alpha", "sd3", "flux"])
def test_cache_plan_in_pipeline(name, pipeline_plans, tmp_path):
    """Step caching with its default options (one bucket, span: every block but the first, a full step every 3,
    every step above t = 900 full) equals the eager twin pipeline (CacheTwin per step); with interval 1
    (every step full) the plan equals the eager pipeline."""
    model_dir, _ = pipeline_plans(name, "unmerged")
    out = tmp_path / "plan"
    build_plan(str(model_dir), method="cache", out=out, measure=True, repeats=1, progress=False)
    manifest = json.loads((out / "plan.json").read_text())
    for b in manifest["buckets"]:
        assert b["fidelity_max_abs"] <= METHOD_ATOL, (b["index"], b["fidelity"])
    every = _with_interval(out, 1, tmp_path / "every")
    for pipe_name in PIPELINES[name]:
        images, expected, policy_log, log, pipe, _ = _plan_and_twin("cache", pipe_name, model_dir, out, manifest)
        assert Counter(v for _, _, v in log)["cached"] >= len(log) // 3, log
        assert policy_log == log, "the runtime's step decisions differ from the cache schedule"
        err = assert_close(images, expected, PIPELINE_TWIN_ATOL, f"cache in {pipe_name}: plan vs eager twin pipeline")

        tf = runtime.load(every, pipeline=pipe)
        got = _run(pipe, pipe_name, output_type="np")
        assert {v for _, _, v in tf._gen.state.data["log"]} == {"main"}
        eager = _run(pipeline(RECIPES[pipe_name], _eager(pipe_name, model_dir)), pipe_name, output_type="np")
        err0 = assert_close(got, eager, EXPORT_ATOL, f"cache interval 1 in {pipe_name} vs eager pipeline")
        moved = float(np.abs(expected - eager).max())
        assert moved > PIPELINE_TWIN_ATOL, f"the cached steps left the images within tolerance of eager ({moved:.1e})"
        print(f"cache in {pipe_name}: interval 1 vs eager max abs {err0:.2e}; default schedule vs twin pipeline "
              f"{err:.2e} (twin vs eager {moved:.2e}); steps {dict(Counter(v for _, _, v in log))}")
