"""A mixed CA-ToMe plan (its clean bucket calibrated to r = 0): that bucket through the one graph's plain
branch (``-o unmerged=branch``) against base.onnx beside the graph (``unmerged=base``): latency, interleaved
medians, and resident memory of a fresh process after one forward per bucket.

    python benchmarks/plan_memory_catome_mixed.py 30 8     # repeats, DiT-XL/2-256 config with 8 blocks
    python benchmarks/plan_memory_catome_mixed.py 60       # the bundled model

The calibration counts of the last bucket are zeroed (a stand-in for a threshold no token reaches there).
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from export.methods import catome
from export.build import build_plan
from export.measure import interleaved_latency, feed_of
from export.onnx_export import example_inputs
from export.load import load_transformer
from export.build_measure import variant_runner, shape_feed
from runtime.runners import OrtRunner, SharedWeights
from probe import run_probe

real = catome.count_trajectories
def zero_last(*a, **k):
    c = real(*a, **k)
    c[-1] = {b: [0] * len(v) for b, v in c[-1].items()}
    return c
catome.count_trajectories = zero_last
d = Path(tempfile.mkdtemp())
MODEL = "bundled:tiny-dit"
if len(sys.argv) > 2:  # DiT-XL/2-256 config, N blocks, random weights
    from plan_memory_methods import make_model
    make_model(d / "xl", int(sys.argv[2]))
    MODEL = str(d / "xl")
m = build_plan(MODEL, method="catome", buckets="0,0,0", out=d / "p", measure=False, quality_samples=0,
               progress=False, options={"calib_samples": 2, "calib_steps": 10})
b = m["buckets"][-1]
print("buckets", [(x["r"], x["graph"], x["counts"]) for x in m["buckets"]], "branch", b["method_meta"].get("branch"))
p = d / "p"
w = SharedWeights(p / "weights.bin")
g = b["graph"]
feed = feed_of(example_inputs(load_transformer(MODEL), 2, (16, 16), 8, seed=1))
joined = OrtRunner(p / g, ["CPUExecutionProvider"], w)
base = OrtRunner(p / "base.onnx", ["CPUExecutionProvider"], w)
run = variant_runner(joined, p / g, "plain", shape_feed(p / g, b["counts"]))
a0, b0 = run(feed)["sample"], base.infer(feed)["sample"]
print("max abs plain vs base", float(np.abs(a0 - b0).max()))
lat = interleaved_latency({"plain_branch": lambda: run(feed), "base": lambda: base.infer(feed)}, repeats=int(sys.argv[1]) if len(sys.argv) > 1 else 60)
print("latency ms (median)", {k: round(v * 1e3, 3) for k, v in lat.items()}, "ratio", round(lat["plain_branch"] / lat["base"], 4))
np.savez(d / "feed.npz", **feed)
PROBE = """
import json, numpy as np
from pathlib import Path
from runtime.plan import Plan
from runtime.transformer import PlanTransformer
import torch
before = rss_kb()
m = json.loads(Path({man!r}).read_text())
tf = PlanTransformer(Plan(Path({p!r}), m), backend="cpu")
f = dict(np.load({feed!r}))
for t in (990, 500, 10):
    tf.reset()
    tf(torch.from_numpy(f["hidden_states"]), torch.full((2,), t), class_labels=torch.from_numpy(f["class_labels"]))
print(len(tf._runners), rss_kb() - before)
"""
import copy
old = copy.deepcopy(m)
ob = old["buckets"][-1]
ob.update(graph="base.onnx", graphs={"main": {"file": "base.onnx", "sha256": ""}}, counts={})
ob["method_meta"].pop("branch")
for name, man in (("one graph (plain branch)", m), ("graph + base.onnx (before)", old)):
    (d / "man.json").write_text(json.dumps(man))
    print(name, run_probe(PROBE.format(man=str(d / "man.json"), p=str(p), feed=str(d / "feed.npz"))), "(sessions, kB)")
