"""SDTM, CA-ToMe and AT-EDM plans through whole default generations of the DiT and PixArt pipelines.

Their run-time state (SDTM's counters and caches, CA-ToMe's cached matching) has no eager twin over a
whole generation here; each graph variant is checked against its twin per forward when the plan is built
(``fidelity_max_abs``, <= 1e-4), and the generation must run the method's variants, stay finite, repeat
exactly, and differ from the unmerged plan's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import runtime
from export.build import build_plan
from tests.helpers import METHOD_ATOL
from tests.pipelines.components import RECIPES, pipeline
from tests.pipelines.test_pipelines import _eager, _run

METHODS = {
    "sdtm": dict(buckets=None, options={}),
    "catome": dict(buckets="0,0", options={"calib_samples": 2, "calib_steps": 10}),
    # the tiny models have 2 blocks: prune after block 0; DSAP prunes half as much in the noisiest bucket
    "atedm": dict(buckets="0.3,0.3", options={"prune_layer": 0, "dsap_shift": 0, "dsap_scale": 0.5}),
}


@pytest.mark.parametrize("name", ["dit", "pixart-alpha"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_runs_in_pipeline(method, name, pipeline_plans, tmp_path):
    model_dir, unmerged = pipeline_plans(name, "unmerged")
    spec = METHODS[method]
    out = tmp_path / "plan"
    kw = {} if spec["buckets"] is None else {"buckets": spec["buckets"]}
    build_plan(str(model_dir), method=method, out=out, options=spec["options"], measure=True, repeats=1,
               progress=False, **kw)
    manifest = json.loads((out / "plan.json").read_text())
    for b in manifest["buckets"]:
        assert b["fidelity_max_abs"] <= METHOD_ATOL, (b["index"], b["fidelity"])
    pipe = pipeline(RECIPES[name], _eager(name, model_dir))
    tf = runtime.load(out, pipeline=pipe)
    images = _run(pipe, name, output_type="np")
    again = _run(pipe, name, output_type="np")
    runtime.load(unmerged, pipeline=pipe)
    base = _run(pipe, name, output_type="np")
    assert np.isfinite(images).all()
    assert np.array_equal(images, again), "a seeded generation must repeat exactly"
    assert float(np.abs(images - base).max()) > 1e-4, "the method's plan generated the unmerged images"
    ran = {rn.graph_path.name for rn in tf._runners.values()}
    assert ran - {"base.onnx"}, f"only the unmerged graph ran: {ran}"
    print(f"{method} in {name}: per-forward twin error {max(b['fidelity_max_abs'] for b in manifest['buckets']):.2e}, "
          f"graphs {sorted(ran)}")
