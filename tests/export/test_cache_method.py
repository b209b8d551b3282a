"""Step caching as a plan method: built plans (with ToMe on full steps, adaptive), the runtime schedule, and
whole generations against an eager emulation of the same schedule, in DiTPipeline and in our sampler."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import runtime
from export.build import build_plan
from export.methods import get_method
from passes.cache.twin import CacheTwin
from passes.errors import DitmergeError
from runtime.policies import GenState
from passes.cache.variants import CACHED
from runtime.policies.cache import CachePolicy
from tests.helpers import tiny_dit


def test_options_are_checked():
    from export.buckets import parse_buckets

    specs = parse_buckets("0,0,0", 1000)
    with pytest.raises(DitmergeError, match="one value or one per bucket"):
        get_method("cache", {"interval": "2,3"}).validate(specs, (4, 4))
    with pytest.raises(DitmergeError, match=">= 1"):
        get_method("cache", {"interval": "0"}).validate(specs, (4, 4))
    with pytest.raises(DitmergeError, match="ratio 0.9 is outside"):
        get_method("cache").validate(parse_buckets("0.9", 1000), (4, 4))
    from export.methods.cache import parse_span

    assert parse_span("auto", 6) == (1, 6) and parse_span("1-4", 6) == (1, 5)
    with pytest.raises(DitmergeError, match="outside the model's blocks"):
        parse_span("2-6", 6)


def _policy(interval=3, full_above=900, adaptive=0.0):
    bucket = SimpleNamespace(index=0, graphs={"main": "a", CACHED: "b"},
                             meta={"span": [1, 2], "interval": interval, "full_above": full_above, "adaptive": adaptive,
                                   "merged_variants": []})
    plan = SimpleNamespace(record=SimpleNamespace(model=SimpleNamespace(grid=[4, 4]),
                                                  method=SimpleNamespace(name="cache", params={})), buckets=[bucket])
    return CachePolicy(plan), bucket


def _run(policy, bucket, ts, changes=None, batches=None):
    state = GenState(seed=0, rng=np.random.default_rng(0))
    policy.start(state)
    out = []
    for i, t in enumerate(ts):
        state.t = t
        batch = (batches or {}).get(i, 2)
        variant, feed = policy.select(state, bucket, batch)
        if variant == CACHED:
            assert feed["cache_residual.image"] is state.data["cache"]["residuals"]["image"]  # passed through
        outputs = ({"cache_residual_out.image": np.full((batch, 1, 1), float(i))} if variant == "main" else
                   {"cache_change": np.array([0.0, (changes or {}).get(i, 0.0)])})
        policy.update(state, bucket, variant, outputs)
        state.steps += 1
        out.append("F" if variant == "main" else "c")
    return "".join(out)


def test_schedule_interval_warmup_adaptive_and_batch_changes():
    ts = [960 - 40 * i for i in range(10)]  # 960, 920, 880, ...
    assert _run(*_policy(3, 900), ts) == "FFccFccFcc"  # t > 900 full, then a full step every 3
    assert _run(*_policy(1, -1), ts) == "F" * 10
    assert _run(*_policy(2, -1), ts) == "Fc" * 5
    # adaptive: the worst row's change above the threshold forces the next step full; interval caps runs
    assert _run(*_policy(4, -1, 0.1), ts, changes={2: 0.5}) == "FccFcccFcc"
    # a batch change invalidates the cache (the residual is per row)
    assert _run(*_policy(3, -1), ts, batches={4: 4}) == "FccF" + "F" + "F" + "ccFc"


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "plan"
    build_plan("builtin:tiny-dit", method="cache", buckets="999-500:0.3,499-0:0", out=out,
               options={"span": "1-2", "interval": "2", "adaptive": "0.05"}, measure=True, repeats=1,
               quality_samples=0, progress=False)
    return out


def test_built_plan_variants_match_their_twins_and_pass_the_tensorrt_check(plan_dir):
    manifest = json.loads((plan_dir / "plan.json").read_text())
    for b in manifest["buckets"]:
        assert set(b["graphs"]) == {"main", "cached"} and b["tensorrt_check"] == []
        for variant, err in b["fidelity"].items():
            assert err <= 1e-4, f"bucket {b['index']} {variant}: {err:.2e}"
        # the cached step skips 2 of the 4 blocks: faster than the full step of the unmerged bucket
        assert b["method_meta"]["span"] == [1, 3]
    merged, plain = manifest["buckets"]
    assert merged["r"] > 0 and merged["method_meta"]["merged_variants"] == ["main"]
    assert plain["r"] == 0 and plain["method_meta"]["merged_variants"] == []


def test_a_build_locates_each_span_once(tmp_path, monkeypatch):
    """Every bucket and variant of one span reuses the span located in prepare (on Flux that is a whole-graph fold)."""
    import export.methods.cache as method
    import passes.cache.rewrite as rewrite

    calls = []
    real = rewrite.locate_span

    def counting(*args, **kwargs):
        calls.append(args[2:4])
        return real(*args, **kwargs)

    monkeypatch.setattr(rewrite, "locate_span", counting)
    monkeypatch.setattr(method, "locate_span", counting)
    build_plan("builtin:tiny-dit", method="cache", buckets="999-500:0,499-0:0", out=tmp_path / "plan",
               options={"span": "1-2"}, measure=False, quality_samples=0, progress=False)
    assert calls == [(1, 3)], calls


class _Emulated(torch.nn.Module):
    """The eager model run with the plan's own per-step variants (CacheTwin), for whole-generation checks."""

    def __init__(self, model, span, variants):
        super().__init__()
        self.model, self.span, self.variants = model, span, list(variants)
        self.config, self.residual, self.calls = model.config, None, 0

    def forward(self, *args, **kwargs):
        variant = self.variants[self.calls]
        self.calls += 1
        twin = CacheTwin(self.model, *self.span, "full" if variant == "main" else CACHED,
                         None if variant == "main" else {"image": self.residual})
        with twin.installed():
            out = self.model(*args, **kwargs)
        if variant == "main":
            self.residual = twin.outputs["image"]
        return out


def test_generation_equals_the_eager_emulation_of_its_schedule(tmp_path):
    from runtime.generate import sample_classes

    model = tiny_dit(sample_size=8, num_classes=10, layers=3)
    model.save_pretrained(tmp_path / "m")
    build_plan(str(tmp_path / "m"), method="cache", buckets="0", out=tmp_path / "plan",
               options={"span": "1-1", "interval": "3", "full_above": "800"}, measure=False, progress=False)
    tf = runtime.load(tmp_path / "plan", backend="cpu")
    x = sample_classes(tf, [1, 2], steps=10, guidance=4.0, seed=5, progress=False)
    log = [v for _, _, v in tf._gen.state.data["log"]]
    assert log.count(CACHED) >= 4 and log[0] == "main"
    with torch.no_grad():
        ref = sample_classes(_Emulated(model, (1, 2), log), [1, 2], steps=10, guidance=4.0, seed=5, progress=False)
        plain = sample_classes(model, [1, 2], steps=10, guidance=4.0, seed=5, progress=False)
    assert np.abs(x - ref).max() <= 1e-3  # 10 steps of fp32 drift on top of the 1e-4 per-forward fidelity
    assert np.abs(x - plain).max() > 1e-3  # the cached steps did change the result


def test_dit_pipeline_runs_the_cache_plan(tmp_path):
    from tests.runtime.test_pipeline import _generate, _pipeline

    tiny_dit(sample_size=8, num_classes=1000).save_pretrained(tmp_path / "m" / "transformer")
    build_plan(str(tmp_path / "m"), method="cache", buckets="0", out=tmp_path / "plan",
               options={"span": "1-1", "interval": "2", "full_above": "-1"}, measure=False, progress=False)
    tf = runtime.load(tmp_path / "plan", backend="cpu")
    a = _generate(_pipeline(tf), steps=6)
    log = [v for _, _, v in tf._gen.state.data["log"]]
    assert log == ["main", CACHED] * 3
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, _generate(_pipeline(runtime.load(tmp_path / "plan", backend="cpu")), steps=6))
