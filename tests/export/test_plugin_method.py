"""Adding a method edits no file of ditmerge: a method module from the tests alone builds and runs as a plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import runtime
from export.build import build_plan
from export.load import builtin_tiny_dit
from passes.errors import DitmergeError
from tests.helpers import METHOD_ATOL
from tests.plugins import toy_method

ROOT = Path(__file__).resolve().parents[2]


def test_a_method_from_outside_the_packages_builds_and_runs(tmp_path):
    out = tmp_path / "plan"
    build_plan("builtin:tiny-dit", method="tests.plugins.toy_method", buckets="0.5,0.3", options={"scale": "0.25"},
               out=out, measure=True, repeats=1, quality_samples=0, progress=False)
    manifest = json.loads((out / "plan.json").read_text())
    assert manifest["method"] == {"name": "tests.plugins.toy_method", "params": {"scale": 0.25}}
    assert all(b["fidelity_max_abs"] <= METHOD_ATOL for b in manifest["buckets"]), manifest["buckets"]
    tf = runtime.load(out)
    assert isinstance(tf.policy, toy_method.CountingPolicy)
    model = builtin_tiny_dit()
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(timestep=torch.tensor([700, 700]), class_labels=torch.tensor([1, 2]))
    before = toy_method.CountingPolicy.selected
    got = tf(x, **kw).sample.numpy()
    with torch.no_grad():
        ref = model(x, **kw).sample.numpy() * 0.25
    assert np.abs(got - ref).max() <= METHOD_ATOL and toy_method.CountingPolicy.selected == before + 1
    # nothing of ditmerge names it: the plug-in is found by its path alone
    sources = [p for pkg in ("export", "passes", "runtime") for p in (ROOT / pkg).rglob("*.py")]
    assert not [p for p in sources if "toy_method" in p.read_text()]


def test_a_module_without_a_method_is_a_clear_error():
    from export.methods import get_method

    with pytest.raises(DitmergeError, match="defines no METHOD"):
        get_method("tests.helpers")
    with pytest.raises(DitmergeError, match="cannot be imported"):
        get_method("tests.no_such_module")
