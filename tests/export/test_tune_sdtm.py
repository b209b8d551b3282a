"""The tuner's SDTM space: a ratio per bucket (its stage graph's count) and protect_every, run-time knobs on
the graphs built once; a ratio-0 bucket runs its graph's full branch. CA-ToMe is refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch

from export import tune
from export.report_quality import unmerged_view
from export.tune import SEARCH_FILE, tune_plan
from export.tune_space import SdtmSpace, bucket_ranges
from passes.errors import DitmergeError
from runtime.plan import Plan
from runtime.transformer import PlanTransformer
from tests.helpers import EXPORT_ATOL

LEVELS = {"ratio": (0.0, 0.2, 0.4), "protect_every": (3, 4)}
KW = dict(model="bundled:tiny-dit", method="sdtm", samples=3, steps=8, repeats=3, keep_work=True,
          check_fidelity=False, progress=False, levels=LEVELS)


def test_sdtm_schedules_are_counts_and_protect_every_on_the_built_graphs(tmp_path, monkeypatch):
    try:  # SDTM's speed-up on 256 tokens on CPU is within the timing noise of 1.0x: either verdict is correct
        tune_plan(out=tmp_path / "p", target_psnr=15, work_dir=tmp_path / "w", **KW)
    except DitmergeError as e:
        assert "unmerged plan is the answer" in str(e)
    built = Plan.load(tmp_path / "w" / "plan")
    stages = {b.meta["stage"]: b.graph for b in built.buckets}
    assert len(built.buckets) == 4 and len(set(stages.values())) == 2  # one graph per stage, 2 buckets each
    record = json.loads((tmp_path / "w" / SEARCH_FILE).read_text())
    # no dry-run twins: the SDTM policy's choice depends on the cache its graphs return
    assert all(e["signature"] is None and "same_as" not in e for e in record["evaluations"].values())
    qualities = {k: e["quality"]["psnr_db"]["mean"] for k, e in record["evaluations"].items()}
    assert len(set(qualities.values())) == len(qualities) >= 2

    space = SdtmSpace(bucket_ranges(3, 1000), {}, LEVELS)
    space.check_built(built.dir, built.manifest)
    assert [k.name for k in space.knobs] == ["ratio[0]", "ratio[1]", "ratio[2]", "ratio[3]", "protect_every"]
    view = Plan(built.dir, space.apply(built.manifest, (0, 2, 1, 2, 1)))
    assert view.method["params"]["protect_every"] == 4 and all(b.meta["protect_every"] == 4 for b in view.buckets)
    zero, window, detail = view.buckets[0], view.buckets[1], view.buckets[3]
    r = [b["r"] for b in view.manifest["buckets"]]
    assert zero.graphs == {"main": stages["structure"]} and zero.meta["branch"] == {"main": "full"} and r[0] == 0
    assert window.counts == {"sdtm_k": window.meta["k"]} and r[1] == 3 * window.meta["k"] > 0
    assert detail.counts == {"sdtm_r": detail.meta["r"]} == {"sdtm_r": r[3]} and r[3] > r[2] > 0

    # a written schedule with a ratio-0 bucket (the search's choice fixed: the layout is under test)
    def fixed(ev, space, targets, progress=True):
        ev.quality((0, 2, 2, 2, 0))
        return {"chosen": (0, 2, 2, 2, 0), "passed": [(0, 2, 2, 2, 0)]}

    monkeypatch.setattr(tune, "search", fixed)
    tune_plan(out=tmp_path / "mixed", target_psnr=15, work_dir=tmp_path / "w", **{**KW, "heldout_samples": 2})
    assert {f.name for f in (tmp_path / "mixed").glob("*.onnx")} == {"base.onnx", *stages.values()}
    plan = Plan.load(tmp_path / "mixed")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels, t = torch.tensor([1, 2]), torch.tensor([990, 990])
    tf = PlanTransformer(plan, backend="cpu")
    got = tf(x, t, class_labels=labels).sample
    want = PlanTransformer(unmerged_view(plan), backend="cpu")(x, t, class_labels=labels).sample
    assert (got - want).abs().max().item() <= EXPORT_ATOL  # the full branch: the unmerged forward
    assert tf._gen.state.data["cache"]  # ... which refreshed the cache for the merged steps after it


def test_catome_and_fixed_sdtm_knobs_are_refused(tmp_path):
    with pytest.raises(DitmergeError, match="threshold is a calibration, not a run-time knob"):
        tune_plan(out=tmp_path / "p", work_dir=tmp_path / "w", target_psnr=30, **{**KW, "method": "catome", "levels": None})
    with pytest.raises(DitmergeError, match="chooses the sdtm ratio per bucket and protect_every"):
        tune_plan(out=tmp_path / "p", work_dir=tmp_path / "w", target_psnr=30, options={"protect_every": 2}, **KW)
    with pytest.raises(DitmergeError, match="must start at 0"):
        tune_plan(out=tmp_path / "p", work_dir=tmp_path / "w", target_psnr=30, **{**KW, "levels": {"ratio": (0.1, 0.2)}})
    assert not (tmp_path / "w").exists()
