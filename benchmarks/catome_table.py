"""CA-ToMe on the bundled model: with and without the match cache, against ToMe at the same r.

    python benchmarks/catome_table.py --samples 10 --steps 20

Builds a catome plan (threshold calibration, match + apply graphs per bucket) and a ToMe plan whose
buckets remove the same r, then generates the same seeded samples through the unmerged plan and each
variant (``export.report_quality.measure_quality``): PSNR/SSIM against the unmerged images,
classifier-FID and class accuracy. Speed is measured separately, in one process, interleaved, medians,
onnxruntime CPU with ``--threads`` intra-op threads: end-to-end latency of one image (CFG) per variant
against the unmerged plan, and per forward (batch 2) the match and apply graphs of each bucket; the
matching share of a step is (match - apply) / match. Prints a markdown table; writes
``<workdir>/catome_table.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.build import build_plan
from export.load import BUNDLED, load_transformer
from export.measure import interleaved_latency
from export.onnx_export import example_inputs
from export.report_quality import measure_quality, unmerged_view
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, draw_partition
from runtime.generate import sample_classes
from runtime.plan import PLAN_FILE, Plan
from runtime.runners import OrtRunner, SharedWeights
from runtime.transformer import PlanTransformer

logger = logging.getLogger("catome_table")


def variant_counts(plan: Plan, steps: int) -> dict[str, int]:
    """Which graph variant ran how often in one generation (CFG, one image)."""
    tf = PlanTransformer(plan, backend="cpu")
    sample_classes(tf, [0], steps=steps, scheduler_config=plan.model.get("scheduler"), progress=False)
    out: dict[str, int] = {}
    for _, _, variant in tf._gen.state.data.get("log", []):
        out[variant] = out.get(variant, 0) + 1
    return out


def with_params(plan: Plan, **params) -> Plan:
    manifest = copy.deepcopy(plan.manifest)
    manifest["method"]["params"].update(params)
    return Plan(plan.dir, manifest)


def forward_latency(plan_dir: Path, manifest: dict, repeats: int, threads: int) -> tuple[float, list]:
    """Unmerged ms and [(bucket, r, match ms, apply ms, share), ...] per forward at batch 2, interleaved."""
    weights = SharedWeights(plan_dir / manifest["weights"]["file"])
    grid = tuple(manifest["model"]["grid"])
    feed = {k: v.numpy() for k, v in example_inputs(load_transformer(BUNDLED), 2, grid, seed=1).items()}
    run = lambda g: OrtRunner(plan_dir / g, ["CPUExecutionProvider"], weights, threads)
    base = run(manifest["base"]["graph"])
    calls = {"base": lambda: base.infer(feed)}
    buckets = [b for b in manifest["buckets"] if "match" in b["graphs"]]
    for b in buckets:
        match, apply = run(b["graphs"]["match"]["file"]), run(b["graphs"]["main"]["file"])
        meta = b["method_meta"]
        part, inv = draw_partition(grid, tuple(meta["stride"]), np.random.default_rng(0), meta.get("bands", 1))
        mfeed = {**feed, PARTITION_INPUT: part, PARTITION_INV_INPUT: inv}
        cache = {k: v for k, v in match.infer(mfeed).items() if k != "sample"}
        calls[f"match{b['index']}"] = lambda rn=match, f=mfeed: rn.infer(f)
        calls[f"apply{b['index']}"] = lambda rn=apply, f={**feed, **cache}: rn.infer(f)
    lat = interleaved_latency(calls, repeats=repeats, warmup=3)
    rows = []
    for b in buckets:
        m, a = lat[f"match{b['index']}"] * 1e3, lat[f"apply{b['index']}"] * 1e3
        rows.append((b["index"], b["r"], m, a, (m - a) / m))
    return lat["base"] * 1e3, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--buckets", default="0,0,0", help="timestep ranges (catome ignores the ratios)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE", help="catome options")
    p.add_argument("--repeats", type=int, default=30, help="forwards per graph for the match/apply latency")
    p.add_argument("--e2e-repeats", type=int, default=5, help="timed generations per variant")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for the timings")
    p.add_argument("--workdir", default=None)
    p.add_argument("--reuse", action="store_true", help="reuse the plans already in --workdir")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="catome_table_"))
    options = dict(o.split("=", 1) for o in args.option)

    if args.reuse and (work / "catome" / PLAN_FILE).is_file() and (work / "tome" / PLAN_FILE).is_file():
        cat = json.loads((work / "catome" / PLAN_FILE).read_text())
    else:
        cat = build_plan(BUNDLED, method="catome", buckets=args.buckets, out=work / "catome", options=options,
                         measure=False, quality_samples=0, progress=False)
        # the same r per bucket through the ToMe pass; (r + 0.5) / N so that int(N * ratio) == r
        n = cat["model"]["tokens"]
        spec = ",".join(f"{b['t_hi']}-{b['t_lo']}:{(b['r'] + 0.5) / n:.6f}" for b in cat["buckets"])
        build_plan(BUNDLED, method="tome", buckets=spec, out=work / "tome", measure=False, quality_samples=0,
                   progress=False)
    rs = [b["r"] for b in cat["buckets"]]
    tome_plan = Plan.load(work / "tome")
    assert [b.meta.get("r", 0) for b in tome_plan.buckets] == rs

    cat_plan = Plan.load(work / "catome")
    variants = {"CA-ToMe, cache (paper schedule)": cat_plan,
                "CA-ToMe, no cache (match every step)": with_params(cat_plan, cache=False),
                "ToMe, same r": tome_plan}
    rows = {}
    for name, plan in variants.items():
        q = measure_quality(plan, samples=args.samples, steps=args.steps, latency_repeats=1)
        q["variants"] = variant_counts(plan, args.steps)
        rows[name] = q
        logger.info("%s: %s", name, json.dumps(q))

    # end-to-end: one image with CFG; every variant and the unmerged plan interleaved in one loop
    tfs = {"unmerged": PlanTransformer(unmerged_view(cat_plan), backend="cpu", threads=args.threads)}
    tfs.update({name: PlanTransformer(plan, backend="cpu", threads=args.threads) for name, plan in variants.items()})
    sched = cat_plan.model.get("scheduler")
    gen = lambda tf: sample_classes(tf, [0], steps=args.steps, scheduler_config=sched, progress=False)
    e2e = interleaved_latency({k: (lambda tf=tf: gen(tf)) for k, tf in tfs.items()}, repeats=args.e2e_repeats,
                              warmup=1)
    for name in variants:
        rows[name]["e2e_latency_s"] = {"unmerged": e2e["unmerged"], "merged": e2e[name]}
        rows[name]["e2e_speedup"] = e2e["unmerged"] / e2e[name]

    base_ms, shares = forward_latency(work / "catome", cat, args.repeats, args.threads)
    result = {"command": " ".join(sys.argv), "r": rs, "tokens": cat["model"]["tokens"], "threads": args.threads,
              "base_latency_ms": base_ms, "e2e_latency_s": e2e, "matching_share": shares, "rows": rows,
              "calibration": [b["method_meta"].get("calibration") for b in cat["buckets"]],
              "params": cat["method"]["params"]}
    (work / "catome_table.json").write_text(json.dumps(result, indent=1))
    print(render(result))


def render(res: dict) -> str:
    q0 = next(iter(res["rows"].values()))
    lines = [(f"Bundled model ({res['tokens']} tokens), {q0['samples']} samples, {q0['steps']} DDIM steps, guidance "
              f"{q0['guidance']:g}, onnxruntime CPU ({res['threads']} thread); r per bucket (noisy -> clean) from "
              f"calibration: {res['r']}"), "",
             ("| variant | graphs run per generation | PSNR dB mean / worst | SSIM mean / worst | classifier-FID "
              "(unmerged) | class acc. (unmerged) | e2e speed-up vs unmerged |"),
             "|---|---|---|---|---|---|---|"]
    for name, q in res["rows"].items():
        runs = ", ".join(f"{v} {c}" for v, c in sorted(q["variants"].items())) or f"main {q['steps']} (matches in each)"
        lines.append(f"| {name} | {runs} | {q['psnr_db']['mean']:.2f} / {q['psnr_db']['worst']:.2f} | "
                     f"{q['ssim']['mean']:.4f} / {q['ssim']['worst']:.4f} | "
                     f"{q.get('fid_merged', float('nan')):.1f} ({q.get('fid_unmerged', float('nan')):.1f}) | "
                     f"{q.get('class_accuracy_merged', float('nan')):.2f} "
                     f"({q.get('class_accuracy_unmerged', float('nan')):.2f}) | {q['e2e_speedup']:.2f}x |")
    lines += ["", f"Matching share of a step (per forward, batch 2; unmerged forward {res['base_latency_ms']:.2f} ms):",
              "", "| bucket | r | match variant ms | apply variant ms | (match - apply) / match |",
              "|---|---|---|---|---|"]
    for i, r, m, a, s in res["matching_share"]:
        lines.append(f"| {i} | {r} | {m:.2f} | {a:.2f} | {s:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
