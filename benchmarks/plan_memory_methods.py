"""Graph files, resident memory and one topology probe of SDTM, AT-EDM and MoD plans ("a bucket is a shape").

    python benchmarks/plan_memory_methods.py --layers 4 --repeats 15

The model is the public DiT-XL/2-256 transformer config (random weights, no download) with ``--layers``
blocks, 256 tokens. Per method a multi-bucket plan is built (``measure=False``: fidelity is the tests'
job) and measured in fresh child processes, onnxruntime CPU with prepacking on, batch 2:

- ``unmerged_mb``: resident growth after loading the unmerged graph and one forward;
- ``plan_mb``: every graph file of the plan as one session, one forward of every bucket and variant (a
  bucket is a shape: buckets sharing a file feed their own counts to one session);
- ``per_bucket_mb``: one session per bucket and variant (what a plan with one file per bucket holds).

The SDTM probe: can the protected ``full`` step be the structure graph at k = 0 (every window unchosen)?
Its latency against the plain graph, interleaved medians, one process; that lower-bounds the cost (the
full step would also need the cache outputs). Writes ``benchmarks/results/plan_memory_methods.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.build import BASE_GRAPH, build_plan  # noqa: E402
from export.measure import feed_of, interleaved_latency  # noqa: E402
from export.onnx_export import example_inputs  # noqa: E402
from passes.counts import count_feed  # noqa: E402
from probe import DIT_XL_2, run_probe  # noqa: E402 (the public DiT-XL/2-256 config; fewer layers here)

logger = logging.getLogger("plan_memory_methods")


PROBE = """
import json, numpy as np
from pathlib import Path
from runtime.runners import OrtRunner, SharedWeights
w = SharedWeights(Path({weights!r}))
runs = json.loads(Path({runs!r}).read_text())  # [[session key, graph file, feed npz], ...]
before = rss_kb()
runners = {{}}
for key, graph, feed in runs:
    if key not in runners:
        runners[key] = OrtRunner(Path(graph), ["CPUExecutionProvider"], w)
        runners[key].activate()
    r = runners[key]
    f = dict(np.load(feed))
    r.infer({{k: v for k, v in f.items() if k in r.input_meta}})
print(rss_kb() - before)
"""


def make_model(folder: Path, layers: int) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    from export.train import make_scheduler

    torch.manual_seed(0)
    model = DiTTransformer2DModel(**{**DIT_XL_2, "num_layers": layers, "sample_size": 32}).eval()  # 256 px
    model.save_pretrained(folder)
    make_scheduler().save_pretrained(folder / "scheduler")
    return model


def add_routers(folder: Path, model: torch.nn.Module, snapped: list[list[float]]) -> None:
    """Random MoD routers and per-region ratios beside the model (what export.train_mod writes)."""
    from safetensors.torch import save_file

    from export.train_mod import RATIOS_FILE, ROUTERS_FILE
    from passes.mod.eager import MoDRouting, capacity, region_bounds

    layers, regions = len(model.transformer_blocks), len(snapped)
    channels = model.config.num_attention_heads * model.config.attention_head_dim
    routing = MoDRouting(channels, layers, regions=regions, init_bias=0.0, seed=2)
    save_file(routing.router_tensors(), folder / ROUTERS_FILE)
    tokens = (model.config.sample_size // model.config.patch_size) ** 2
    record = {"format": 1, "layers": layers, "num_train_timesteps": 1000, "max_ratio": 0.7, "tokens": tokens,
              "regions": [{"region": r, "t_lo": region_bounds(r, regions, 1000)[0],
                           "t_hi": region_bounds(r, regions, 1000)[1], "snapped": s, "learned": s,
                           "capacities": [capacity(v, tokens) for v in s]} for r, s in enumerate(snapped)]}
    (folder / RATIOS_FILE).write_text(json.dumps(record))


def bucket_feeds(plan: Path, manifest: dict, feed: dict, tmp: Path) -> list[tuple[str, str, dict]]:
    """(bucket/variant, graph file, feed) for every bucket and variant of a plan, with its method inputs."""
    from export.methods.sdtm import sdtm_extra_feed
    from runtime.branches import branch_of, variant_feed
    from runtime.graphfile import graph_branches, graph_inputs

    out = []
    for b in manifest["buckets"]:
        for variant, g in b["graphs"].items():
            extra: dict = {}
            meta = b["method_meta"]
            if manifest["method"]["name"] == "sdtm" and variant == "main" and meta.get("removed"):
                extra = sdtm_extra_feed(meta, 2, np.random.default_rng(0))
            elif variant == "main":
                extra = count_feed(b["counts"])
            path = plan / g["file"]
            info = graph_branches(path)
            if info is not None:  # a branched graph (passes/branch.py): the variant count and stand-ins
                given = {**feed, **extra, **count_feed(b["counts"])}
                stand_ins = variant_feed(info, branch_of(meta, variant), graph_inputs(path), given)
                extra = {**extra, **count_feed(b["counts"]), **stand_ins}
            out.append((f"{b['index']}/{variant}", str(plan / g["file"]), {**feed, **extra}))
    return out


def rss_mb(runs: list[tuple[str, str, dict]], weights: Path, tmp: Path) -> float:
    """Resident growth of a fresh process that opens one session per distinct key and runs every entry once."""
    entries = []
    for i, (key, graph, feed) in enumerate(runs):
        path = tmp / f"feed_{i}.npz"
        np.savez(path, **feed)
        entries.append([key, graph, str(path)])
    (tmp / "runs.json").write_text(json.dumps(entries))
    return int(run_probe(PROBE.format(weights=str(weights), runs=str(tmp / "runs.json")))) / 1024


def sdtm_full_probe(plan: Path, manifest: dict, feed: dict, repeats: int) -> dict:
    """The structure graph at k = 0 against the plain (full-step) graph: per-forward latency, interleaved."""
    from export.methods.sdtm import sdtm_extra_feed
    from passes.sdtm import K_COUNT
    from runtime.runners import OrtRunner, SharedWeights

    weights = SharedWeights(plan / "weights.bin")
    b = next(b for b in manifest["buckets"] if b["method_meta"].get("merge") == "window")
    meta = {**b["method_meta"], "k": 0}
    extra = {**sdtm_extra_feed(meta, 2, np.random.default_rng(0)), **count_feed({K_COUNT: 0})}
    window = OrtRunner(plan / b["graphs"]["main"]["file"], ["CPUExecutionProvider"], weights)
    full = OrtRunner(plan / b["graphs"]["full"]["file"], ["CPUExecutionProvider"], weights)
    base = OrtRunner(plan / BASE_GRAPH, ["CPUExecutionProvider"], weights)
    at_k = OrtRunner(plan / b["graphs"]["main"]["file"], ["CPUExecutionProvider"], weights)
    extra_k = {**sdtm_extra_feed(b["method_meta"], 2, np.random.default_rng(0)), **count_feed(b["counts"])}
    a = window.infer({**feed, **extra})["sample"]
    ref = full.infer(feed)["sample"]
    lat = interleaved_latency({"full": lambda: full.infer(feed), "base": lambda: base.infer(feed),
                               "window_k0": lambda: window.infer({**feed, **extra}),
                               f"window_k{b['counts'][K_COUNT]}": lambda: at_k.infer({**feed, **extra_k})},
                              repeats=repeats, warmup=2)
    ms = {k: v * 1e3 for k, v in lat.items()}
    return {"latency_ms": ms, "window_k0_vs_full": lat["window_k0"] / lat["full"] - 1,
            "window_k0_max_abs_vs_full": float(np.abs(a - ref).max()), "repeats": repeats, "batch": 2}


OLD_BUILD = """
import sys, json
sys.path.insert(0, {code!r})
from export.build import build_plan
build_plan({model!r}, out={out!r}, measure=False, quality_samples=0, progress=False, **json.loads({kwargs!r}))
"""


def before_after_latency(old_code: Path, work: Path, name: str, kwargs: dict, plan: Path, manifest: dict, feed: dict,
                         repeats: int) -> dict:
    """Per-bucket latency of the main variant: the plan built by ``old_code`` (one graph per bucket, counts
    baked in) against this plan (shared graphs fed the bucket's counts); one process, interleaved medians."""
    from runtime.runners import OrtRunner, SharedWeights

    old = work / f"old_plan_{name}"
    if not (old / "plan.json").is_file():
        code = OLD_BUILD.format(code=str(old_code), model=str(work / "model"), out=str(old), kwargs=json.dumps(kwargs))
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=old_code)
        if res.returncode:
            raise RuntimeError(f"old build failed: {res.stderr[-2000:]}")
    old_manifest = json.loads((old / "plan.json").read_text())
    runs = {}
    for tag, d, m in (("before", old, old_manifest), ("after", plan, manifest)):
        weights = SharedWeights(d / "weights.bin")
        sessions: dict = {}
        for b, (_, graph, f) in zip(m["buckets"], [r for r in bucket_feeds(d, m, feed, work) if r[0].endswith("/main")]):
            if graph not in sessions:
                sessions[graph] = OrtRunner(Path(graph), ["CPUExecutionProvider"], weights)
                sessions[graph].activate()
            r = sessions[graph]
            f = {k: v for k, v in f.items() if k in r.input_meta}
            runs[f"{tag}/{b['index']}"] = lambda r=r, f=f: r.infer(f)
    lat = interleaved_latency(runs, repeats=repeats, warmup=2)
    per = {i: {"before_ms": lat[f"before/{i}"] * 1e3, "after_ms": lat[f"after/{i}"] * 1e3,
               "after_vs_before": lat[f"after/{i}"] / lat[f"before/{i}"] - 1}
           for i in range(len(manifest["buckets"]))}
    return {"per_bucket": per, "repeats": repeats, "old_graph_files": sorted({b["graph"] for b in old_manifest["buckets"]})}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--methods", default="sdtm,atedm,mod")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--reuse", action="store_true", help="reuse plans already built in --workdir")
    p.add_argument("--before-code", type=Path, default=None,
                   help="a checkout of the code before counts (git archive fc5c044): also time its per-bucket graphs")
    p.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "plan_memory_methods.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch", "passes", "export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ditmerge-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.reuse and (work / "model" / "config.json").is_file():
        from export.load import load_transformer

        model = load_transformer(str(work / "model"))
    else:
        model = make_model(work / "model", args.layers)
    snapped = [[0.5] * args.layers, [0.3] * args.layers, [0.0] + [0.2] * (args.layers - 1)]
    add_routers(work / "model", model, snapped)
    feed = feed_of(example_inputs(model, 2, (16, 16), seed=1))
    plans = {"sdtm": dict(method="sdtm"), "atedm": dict(method="atedm", buckets="0.4,0.4,0.3,0.2"),
             "mod": dict(method="mod"),
             # variants as branches of one graph: the cache's full and cached steps, CA-ToMe's match and apply
             "cache": dict(method="cache", buckets="0.3,0", options={"interval": (3,)}),
             "catome": dict(method="catome", buckets="0.5,0.4,0.3",
                            options={"calib_samples": 2, "calib_steps": 10})}
    results: dict = {"model": f"DiT-XL/2-256 config, {args.layers} layers, random weights", "tokens": 256,
                     "backend": "onnxruntime-cpu, prepacking on", "batch": 2, "methods": {}}
    for name in args.methods.split(","):
        plan = work / f"plan_{name}"
        if args.reuse and (plan / "plan.json").is_file():
            manifest = json.loads((plan / "plan.json").read_text())
        else:
            manifest = build_plan(str(work / "model"), out=plan, measure=False, quality_samples=0, progress=False,
                                  **plans[name])
        runs = bucket_feeds(plan, manifest, feed, work)
        files = sorted({Path(g).name for _, g, _ in runs})
        row = {"buckets": len(manifest["buckets"]), "bucket_variants": len(runs), "graph_files": files,
               "counts": [b["counts"] for b in manifest["buckets"]]}
        if not args.no_memory:
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                unmerged = rss_mb([("base", str(plan / BASE_GRAPH), feed)], plan / "weights.bin", Path(tmp))
                shared = rss_mb([(Path(g).name, g, f) for _, g, f in runs], plan / "weights.bin", Path(tmp))
                separate = rss_mb(runs, plan / "weights.bin", Path(tmp))
            row.update(unmerged_mb=unmerged, plan_mb=shared, per_bucket_mb=separate, plan_vs_unmerged=shared / unmerged,
                       per_bucket_vs_unmerged=separate / unmerged)
            logger.info("%s: %d buckets x variants -> %d files; plan %.0f MB (%.2fx unmerged %.0f MB), one session "
                        "per bucket %.0f MB (%.2fx)", name, len(runs), len(files), shared, shared / unmerged, unmerged,
                        separate, separate / unmerged)
            if name == "sdtm" and any(b["graphs"]["full"]["file"] != b["graphs"]["main"]["file"]
                                      for b in manifest["buckets"]):  # full steps in a file of their own
                row["full_as_window_k0"] = sdtm_full_probe(plan, manifest, feed, args.repeats)
        if args.before_code:
            row["latency_before_after"] = before_after_latency(args.before_code, work, name, plans[name], plan,
                                                               manifest, feed, args.repeats)
            logger.info("%s per-bucket latency after/before - 1: %s", name, {
                i: f"{v['after_vs_before']:+.1%}" for i, v in row["latency_before_after"]["per_bucket"].items()})
        results["methods"][name] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
