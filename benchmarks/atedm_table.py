"""AT-EDM against ToMe on the bundled model at matched end-to-end speed, and the importance's cost.

    python benchmarks/atedm_table.py --samples 20 --steps 20 --workdir /tmp/atedm_bench

Every row is a plan view over one export (the unmerged graph and weights are shared): its bucket graphs
are built with the method's own ``build_bucket`` and measured with ``export.report_quality.measure_quality``
against the unmerged plan (PSNR/SSIM against unmerged images with the same noise, classifier-FID, class
accuracy, end-to-end speed-up; interleaved, medians, one process). The overhead section profiles one
pruned graph at batch 2 (onnxruntime node profile: the share of a forward spent in the importance nodes,
and in all inserted nodes) and times it against the same graph with the importance replaced by a fixed
score (``importance=static``) and against the unmerged graph. SDTM's column is left to the lead (built in
parallel). Writes a JSON file and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("atedm_table")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# label, method, buckets, options
DEFAULT_ROWS = [
    ("AT-EDM 0.5, no DSAP", "atedm", "0.5,0.5,0.5", {"dsap": False}),
    ("AT-EDM 0.5, DSAP", "atedm", "0.5,0.5,0.5", {"dsap": True}),
    ("AT-EDM 0.5, static importance (ablation)", "atedm", "0.5,0.5,0.5", {"dsap": False, "importance": "static"}),
    ("ToMe attn 0.5", "tome", "0.5,0.5,0.5", {}),
    ("ToMe attn 0.6", "tome", "0.6,0.6,0.6", {}),
    ("ToMe attn 0.7", "tome", "0.7,0.7,0.7", {}),
]


def _row_spec(text: str) -> tuple[str, str, str, dict]:
    """``label|method|buckets|key=value;key=value``."""
    label, method, buckets, *rest = text.split("|")
    opts = dict(kv.split("=", 1) for kv in (rest[0].split(";") if rest and rest[0] else []))
    return label, method, buckets, opts


def prepare(workdir: Path, model: str):
    """Export once (a plan with no measurement) and the build context every row reuses."""
    import onnx

    from export.build import BASE_GRAPH, build_plan
    from export.families import family_of
    from export.load import load_transformer
    from export.methods import BuildContext

    plan_dir = workdir / "plan"
    if not (plan_dir / "plan.json").is_file():
        build_plan(model, method="atedm", buckets="0", out=plan_dir, measure=False, quality_samples=0, progress=False)
    manifest = json.loads((plan_dir / "plan.json").read_text())
    torch_model = load_transformer(model)
    ctx = BuildContext(torch_model=torch_model, family=family_of(torch_model), grid=tuple(manifest["model"]["grid"]),
                       text_len=manifest["model"]["text_len"],
                       num_train_timesteps=manifest["model"]["num_train_timesteps"],
                       base=onnx.load(plan_dir / BASE_GRAPH, load_external_data=False), stage=plan_dir, progress=False)
    return plan_dir, manifest, ctx


def build_view(plan_dir: Path, manifest: dict, ctx, tag: str, method: str, buckets: str, options: dict):
    """The row's bucket graphs, saved beside the export, and a plan over them."""
    import copy

    from export.build import BASE_GRAPH
    from export.methods import MAIN, get_method
    from passes.onnxutil import save_checked
    from runtime.plan import Plan

    meth = get_method(method, options)
    specs = meth.bucket_specs(buckets, ctx.num_train_timesteps, manifest["model"]["source"])
    meth.validate(specs, ctx.grid)
    meth.prepare(ctx)
    view = copy.deepcopy(manifest)
    view["method"] = {"name": method, "params": meth.params()}
    view["buckets"] = []
    for i, spec in enumerate(specs):
        bg = meth.build_bucket(ctx, spec, i)
        g = bg.graphs[MAIN]
        name = BASE_GRAPH if g is None else f".bench_{tag}_{i}.onnx"
        if g is not None:
            save_checked(g, plan_dir / name)
        view["buckets"].append({"index": i, "t_lo": spec.t_lo, "t_hi": spec.t_hi, "ratio": spec.ratio, "r": bg.r,
                                "kept_tokens": bg.kept_tokens, "graph": name, "sha256": "",
                                "graphs": {MAIN: {"file": name, "sha256": ""}}, "method_meta": bg.meta,
                                "counts": bg.counts})
    return Plan(plan_dir, view), view


def importance_overhead(plan_dir: Path, ctx, graphs: dict[str, Path], repeats: int, counts: dict | None = None) -> dict:
    """Per-forward cost of the importance at batch 2: node profile share and latency against a fixed score."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from export.build import BASE_GRAPH
    from export.measure import feed_of, interleaved_latency
    from export.onnx_export import example_inputs
    from runtime.runners import OrtRunner, SharedWeights

    from passes.counts import count_feed

    weights = SharedWeights(plan_dir / "weights.bin")
    feed = feed_of(example_inputs(ctx.torch_model, 2, ctx.grid, ctx.text_len, seed=1))
    pruned_feed = {**feed, **count_feed(counts or {})}  # the pruned graphs take kept as a count input
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(plan_dir / "atedm_profile")
    for name, value in weights.initializers(onnx.load(graphs["gwpr"], load_external_data=False)).items():
        opts.add_initializer(name, value)
    sess = ort.InferenceSession(str(graphs["gwpr"]), opts, providers=["CPUExecutionProvider"])
    for _ in range(repeats):
        sess.run(None, pruned_feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    total = sum(e["dur"] for e in nodes)
    share = lambda part: sum(e["dur"] for e in nodes if part in e["name"]) / total
    paths = {**graphs, "base": plan_dir / BASE_GRAPH}
    runners = {k: OrtRunner(p, ["CPUExecutionProvider"], weights) for k, p in paths.items()}
    lat = interleaved_latency({k: (lambda r=r, f=(feed if k == "base" else pruned_feed): r.infer(f))
                               for k, r in runners.items()}, repeats=repeats, warmup=3)
    return {"profile_share_importance": share("/importance/"), "profile_share_prune_refill":
            share("ditmerge_atedm") - share("/importance/"), "latency_ms": {k: v * 1e3 for k, v in lat.items()},
            "latency_share_importance": (lat["gwpr"] - lat["static"]) / lat["gwpr"],
            "speedup_gwpr": lat["base"] / lat["gwpr"], "speedup_static": lat["base"] / lat["static"],
            "repeats": repeats, "batch": 2,
            "importance_nodes": int(np.sum(["/importance/" in e["name"] for e in nodes]) / repeats)}


def forward_latency(plan_dir: Path, ctx, rows: list[dict], repeats: int) -> None:
    """Per-forward speed-up of each row at batch 2: unmerged latency / mean latency of its bucket graphs.

    Steadier than the end-to-end ratio on a shared machine: every graph of every row runs interleaved.
    """
    from export.build import BASE_GRAPH
    from export.measure import feed_of, interleaved_latency
    from export.onnx_export import example_inputs
    from runtime.runners import OrtRunner, SharedWeights

    weights = SharedWeights(plan_dir / "weights.bin")
    feed = feed_of(example_inputs(ctx.torch_model, 2, ctx.grid, ctx.text_len, seed=1))
    graphs = {BASE_GRAPH} | {g for r in rows for g in r["graphs"]}
    runners = {g: OrtRunner(plan_dir / g, ["CPUExecutionProvider"], weights) for g in graphs}
    extra: dict[str, dict] = {}
    for r in rows:
        if r["method"] == "tome":  # its partition inputs, as the runtime draws them
            from passes.partition import draw_partition
            from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT

            for g, meta in zip(r["graphs"], r["bucket_meta"]):
                if meta.get("r"):
                    part, inv = draw_partition(ctx.grid, tuple(meta["stride"]), None, meta.get("bands", 1))
                    extra[g] = {PARTITION_INPUT: part, PARTITION_INV_INPUT: inv}
    lat = interleaved_latency({g: (lambda g=g: runners[g].infer({**feed, **extra.get(g, {})})) for g in graphs},
                              repeats=repeats, warmup=2)
    for r in rows:
        mean = sum(lat[g] for g in r["graphs"]) / len(r["graphs"])
        r["forward_latency_ms"] = mean * 1e3
        r["forward_speedup"] = lat[BASE_GRAPH] / mean


def table(rows: list[dict]) -> str:
    out = [("| variant | buckets | PSNR dB mean / worst | SSIM mean | classifier-FID (unmerged) "
            "| class acc. (unmerged) | e2e speed-up | per-forward speed-up |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r["quality"]
        fwd = f"{r['forward_speedup']:.2f}x" if "forward_speedup" in r else "-"
        if q is None:
            out.append(f"| {r['label']} | {r['buckets']} | - | - | - | - | - | {fwd} |")
            continue
        fid = f"{q['fid_merged']:.0f} ({q['fid_unmerged']:.0f})" if "fid_merged" in q else "-"
        acc = f"{q['class_accuracy_merged']:.2f} ({q['class_accuracy_unmerged']:.2f})" if "fid_merged" in q else "-"
        out.append(f"| {r['label']} | {r['buckets']} | {q['psnr_db']['mean']:.2f} / {q['psnr_db']['worst']:.2f} | "
                   f"{q['ssim']['mean']:.3f} | {fid} | {acc} | {q['e2e_speedup']:.2f}x | {fwd} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled:tiny-dit")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--latency-repeats", type=int, default=5, help="interleaved end-to-end runs per row")
    p.add_argument("--profile-repeats", type=int, default=30, help="forwards for the overhead measurement")
    p.add_argument("--row", action="append", type=_row_spec, default=None,
                   help="label|method|buckets|key=value;key=value (repeatable; default: the built-in rows)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/atedm_bench"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "atedm_table.json")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--forward-repeats", type=int, default=30,
                   help="interleaved forwards per graph for the per-forward speed-up (0: skip)")
    p.add_argument("--forward-only", action="store_true", help="skip the generations (per-forward speed only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from export.report_quality import measure_quality

    args.workdir.mkdir(parents=True, exist_ok=True)
    plan_dir, manifest, ctx = prepare(args.workdir, args.model)
    results: dict = {"model": args.model, "samples": args.samples, "steps": args.steps, "rows": [],
                     "date": time.strftime("%Y-%m-%d"), "backend": "onnxruntime-cpu fp32"}
    for i, (label, method, buckets, options) in enumerate(args.row or DEFAULT_ROWS):
        t0 = time.perf_counter()
        plan, view = build_view(plan_dir, manifest, ctx, f"r{i}", method, buckets, options)
        q = None if args.forward_only else measure_quality(plan, samples=args.samples, steps=args.steps,
                                                            latency_repeats=args.latency_repeats)
        results["rows"].append({"label": label, "method": method, "buckets": buckets, "options": options,
                                "params": view["method"]["params"],
                                "bucket_meta": [b["method_meta"] for b in view["buckets"]],
                                "graphs": [b["graph"] for b in view["buckets"]],
                                "kept_tokens": [b["kept_tokens"] for b in view["buckets"]], "quality": q})
        if q:
            logger.warning("%s: PSNR %.2f dB, e2e %.2fx (%.0f s)", label, q["psnr_db"]["mean"], q["e2e_speedup"],
                           time.perf_counter() - t0)
    if args.forward_repeats:
        forward_latency(plan_dir, ctx, results["rows"], args.forward_repeats)
    if not args.skip_overhead:
        from export.buckets import BucketSpec
        from export.methods import get_method
        from passes.onnxutil import save_checked

        graphs, counts = {}, {}
        for kind in ("gwpr", "static"):
            meth = get_method("atedm", {"dsap": False, "importance": kind})
            bg = meth.build_bucket(ctx, BucketSpec(0, ctx.num_train_timesteps - 1, 0.5), 0)
            graphs[kind], counts = plan_dir / f".bench_overhead_{kind}.onnx", bg.counts
            save_checked(bg.graphs["main"], graphs[kind])
        results["overhead"] = importance_overhead(plan_dir, ctx, graphs, args.profile_repeats, counts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(table(results["rows"]))
    if "overhead" in results:
        o = results["overhead"]
        print(f"\nimportance share of a forward (batch 2, ratio 0.5, {o['repeats']} runs): node profile "
              f"{o['profile_share_importance']:.1%}, prune+refill nodes {o['profile_share_prune_refill']:.1%}; "
              f"latency G-WPR {o['latency_ms']['gwpr']:.2f} ms vs fixed score {o['latency_ms']['static']:.2f} ms "
              f"({o['latency_share_importance']:.1%}) vs unpruned {o['latency_ms']['base']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
