"""One copy of the weights per plan: resident memory and per-bucket latency, before and after.

    python benchmarks/plan_memory.py --layers 8 --px 256 --rounds 11

A ToMe plan of four buckets (attn+mlp, ratios 0.5 / 0.4 / 0.3 and unmerged) on the DiT-XL/2
architecture (random weights; ``--layers`` of its 28 blocks, the width and token count of the real
model). Compared in fresh child processes, after one forward of every bucket, against one unmerged
model (one session over base.onnx):
- ``per-bucket graphs``: the layout before plan format 3, one graph with r baked in per bucket;
- ``merged + base``: one merged graph with r from shapes, base.onnx beside it (``-o unmerged=base``);
- ``one graph (If)``: the default, merged and plain graph behind ``If(r == 0)`` (``unmerged=branch``);
- ``merged at r=0``: the merged graph for the unmerged bucket too (``-o unmerged=merged``).
Latency: one process, interleaved rounds, medians (min-based ratios and CPU seconds beside them) of each
bucket's forward through the one graph against the same bucket's baked graph, and of the one graph and
the merged graph at r = 0 against base.onnx. Writes ``results/plan_memory.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import in_child  # noqa: E402
from probe import DIT_XL_2, latency_ratio, latency_rows, run_probe  # noqa: E402

from export.build import build_plan  # noqa: E402
from export.measure import feed_of  # noqa: E402
from export.onnx_export import example_inputs  # noqa: E402
from passes.counts import count_feed  # noqa: E402
from passes.onnxutil import save_checked  # noqa: E402
from passes.partition import draw_partition  # noqa: E402
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT  # noqa: E402
from passes.tome import ToMeConfig, ToMePass

logger = logging.getLogger("plan_memory")
RESULTS = Path(__file__).resolve().parent / "results"
LOCATIONS = ("attn", "mlp")

PROBE = """
import json
import numpy as np, torch
from pathlib import Path
from runtime.plan import Plan
from runtime.transformer import PlanTransformer
before = rss_kb()
plan = Plan(Path({plan!r}), json.loads(Path({manifest!r}).read_text()))
tf = PlanTransformer(plan, backend="cpu", seed=0)
data = dict(np.load({feed!r}))
with torch.no_grad():
    for t in {timesteps!r}:
        tf.reset()
        tf(torch.from_numpy(data["hidden_states"]), timestep=torch.full((data["hidden_states"].shape[0],), t),
           class_labels=torch.from_numpy(data["class_labels"]))
print(len({{r.graph_path.name for r in tf._runners.values()}}), rss_kb() - before)
"""


def resident_mb(plan_dir: Path, manifest: dict, feed_path: Path, timesteps: list[int]) -> tuple[int, float]:
    """(sessions, resident memory growth in MB) of a fresh process that loads the plan ``manifest`` and runs one
    forward at each of ``timesteps``, measured from after the imports."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(manifest, f)
    out = run_probe(PROBE.format(plan=str(plan_dir), manifest=f.name, feed=str(feed_path), timesteps=timesteps))
    Path(f.name).unlink()
    sessions, kb = out.split()
    return int(sessions), int(kb) / 1024


def views(plan_dir: Path, manifest: dict) -> dict[str, dict]:
    """The manifests compared (see the module docstring); ``manifest`` is a plan built with ``unmerged=base``."""
    import onnx

    from passes.branch import branch_on_zero
    from passes.tome import R_COUNT

    base = manifest["base"]
    merged = next(b for b in manifest["buckets"] if b["r"])
    if not (plan_dir / "branch.onnx").exists():
        load = lambda g: onnx.load(plan_dir / g, load_external_data=False)  # noqa: E731
        save_checked(branch_on_zero(load(base["graph"]), load(merged["graph"]), R_COUNT), plan_dir / "branch.onnx")
    out = {k: copy.deepcopy(manifest) for k in ("unmerged model", "per-bucket graphs", "merged + base",
                                                 "one graph (If)", "merged at r=0")}
    for b in out["unmerged model"]["buckets"]:
        b.update(graph=base["graph"], sha256=base["sha256"], counts={}, method_meta={},
                 graphs={"main": {"file": base["graph"], "sha256": base["sha256"]}})
    for b in out["per-bucket graphs"]["buckets"]:
        if not b["r"]:
            continue
        name = f"baked_{b['index']}.onnx"
        if not (plan_dir / name).exists():
            model = onnx.load(plan_dir / base["graph"], load_external_data=False)
            save_checked(ToMePass(ToMeConfig(b["ratio"], locations=LOCATIONS))(model).model, plan_dir / name)
        b.update(graph=name, counts={}, graphs={"main": {"file": name, "sha256": ""}})
    for view, graph in (("one graph (If)", "branch.onnx"), ("merged at r=0", merged["graph"])):
        for b in out[view]["buckets"]:
            b.update(graph=graph, graphs={"main": {"file": graph, "sha256": ""}})
            if not b["r"]:
                b.update(counts={k: 0 for k in merged["counts"]}, method_meta={**merged["method_meta"], "r": 0})
    return out


def time_buckets(spec: dict) -> dict:
    """Child process: interleaved forwards of every bucket through each layout; medians and minima in ms."""
    import time

    from runtime.runners import OrtRunner, SharedWeights

    plan_dir = Path(spec["plan"])
    data = dict(np.load(spec["feed"]))
    weights = SharedWeights(plan_dir / "weights.bin")
    runners: dict[str, OrtRunner] = {}

    def runner(graph: str) -> OrtRunner:
        if graph not in runners:
            runners[graph] = OrtRunner(plan_dir / graph, ["CPUExecutionProvider"], weights)
        return runners[graph]

    part, inv = draw_partition(tuple(spec["grid"]), (2, 2), np.random.default_rng(0))
    tome = {PARTITION_INPUT: part, PARTITION_INV_INPUT: inv}
    calls = {}
    for key, (graph, counts, merged) in spec["calls"].items():
        feed = {**data, **(tome if merged else {}), **count_feed(counts or {})}
        calls[key] = lambda rn=runner(graph), feed=feed: rn.infer(feed)
    for fn in calls.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(spec["rounds"]):
        for k, fn in calls.items():  # interleaved: drift and neighbours' load hit every call alike
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    # CPU seconds of the process (all its threads) per forward: the work done, less sensitive than wall time
    # to other processes on a shared machine; wall time is what a user waits for
    return {k: {"median_ms": float(np.median(wall[k])) * 1e3, "min_ms": float(np.min(wall[k])) * 1e3,
                "cpu_median_ms": float(np.median(cpu[k])) * 1e3} for k in calls}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="DiT-XL/2 blocks (28 in the real model)")
    ap.add_argument("--px", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--no-memory", action="store_true", help="latency only")
    ap.add_argument("--work", type=Path, default=None, help="keep the model and plan here (reused when present)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch
    from diffusers import DiTTransformer2DModel

    work = args.work or Path(tempfile.mkdtemp(prefix="plan_memory_"))
    model_dir, plan_dir = work / "model", work / "plan"
    latent = args.px // 8
    grid = (latent // 2, latent // 2)
    torch.manual_seed(0)
    model = DiTTransformer2DModel(sample_size=latent, **{**DIT_XL_2, "num_layers": args.layers}).eval()
    if not (model_dir / "transformer").exists():
        model.save_pretrained(model_dir / "transformer")
    if not (plan_dir / "plan.json").exists():
        build_plan(str(model_dir), method="tome", buckets="999-750:0.5,749-500:0.4,499-250:0.3,249-0:0",
                   options={"locations": LOCATIONS, "unmerged": "base"}, out=plan_dir, measure=False, progress=False)
    manifest = json.loads((plan_dir / "plan.json").read_text())
    feed = feed_of(example_inputs(model, args.batch, grid, seed=0))
    feed_path = work / "feed.npz"
    np.savez(feed_path, **feed)
    timesteps = [b["t_hi"] for b in manifest["buckets"]]

    layouts = views(plan_dir, manifest)
    memory = {}
    for name, view in ({} if args.no_memory else layouts).items():
        sessions, mb = resident_mb(plan_dir, view, feed_path, timesteps)
        memory[name] = {"sessions": sessions, "resident_mb": mb}
        logger.info("%s: %d sessions, %.0f MB", name, sessions, mb)
    one = memory.get("unmerged model", {}).get("resident_mb")
    for m in memory.values():
        m["vs_unmerged_model"] = m["resident_mb"] / one

    # key -> (graph, counts or None for a graph without count inputs, whether it takes a partition)
    merged = next(b for b in manifest["buckets"] if b["r"])
    zero = {k: 0 for k in merged["counts"]}
    calls = {"base.onnx": (manifest["base"]["graph"], None, False), "one graph r=0": ("branch.onnx", zero, True),
             "merged graph r=0": (merged["graph"], zero, True)}
    for b, old in zip(manifest["buckets"], layouts["per-bucket graphs"]["buckets"]):
        if b["r"]:
            calls[f"baked r={b['r']}"] = (old["graph"], None, True)
            calls[f"one graph r={b['r']}"] = ("branch.onnx", b["counts"], True)
    lat = in_child(time_buckets, {"plan": str(plan_dir), "feed": str(feed_path), "grid": list(grid),
                                  "calls": calls, "rounds": args.rounds})
    ratios = {"one graph r=0 vs base.onnx": latency_ratio(lat, "one graph r=0", "base.onnx"),
              "merged graph r=0 vs base.onnx": latency_ratio(lat, "merged graph r=0", "base.onnx")}
    for b in manifest["buckets"]:
        if b["r"]:
            ratios[f"one graph vs baked, r={b['r']}"] = latency_ratio(lat, f"one graph r={b['r']}", f"baked r={b['r']}")
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": _cores()},
              "model": f"DiT-XL/2 architecture, {args.layers} of 28 blocks, {args.px}px ({grid[0] * grid[1]} tokens), "
                       f"batch {args.batch}, random weights, onnxruntime CPU fp32, prepacking on",
              "command": "python benchmarks/plan_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "memory": memory, "latency": lat, "latency_ratios": ratios}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "plan_memory.json").write_text(json.dumps(result, indent=2))
    print(table(result))
    return result


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def table(result: dict) -> str:
    rows = [f"{result['model']}", "", "| layout | sessions | resident MB | vs one unmerged model |", "|---|---|---|---|"]
    for name, m in result["memory"].items():
        rows.append(f"| {name} | {m['sessions']} | {m['resident_mb']:.0f} | {m['vs_unmerged_model']:.2f}x |")
    rows += ["", *latency_rows(result["latency"])]
    rows += ["", "| latency ratio | median | min | CPU median |", "|---|---|---|---|"]
    rows += [f"| {k} | {v['median']:.3f} | {v['min']:.3f} | {v['cpu_median']:.3f} |"
             for k, v in result["latency_ratios"].items()]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
