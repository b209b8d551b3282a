"""Every merge method against ToMe at matched end-to-end speed, on the bundled model.

    python benchmarks/compare_methods.py --methods sdtm,atedm,catome --tome-ratios 0.1,0.2,0.3,0.4,0.5

Each method's plan (default options unless ``--option METHOD.KEY=VALUE`` / ``--buckets METHOD=SPEC``)
and a ToMe plan per uniform ratio are built once; each is measured by ``export.report_quality``:
seeded generations through the plan and through its own unmerged view with the same noise (PSNR/SSIM,
classifier-FID, class accuracy) and the end-to-end speed-up against that unmerged view, interleaved in
one run. For each method the table then names the ToMe ratio whose speed-up is closest, and the gap.
Writes ``RESULTS/compare_methods.json`` and prints markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.build import build_plan  # noqa: E402
from export.report_quality import measure_quality  # noqa: E402
from runtime.plan import Plan  # noqa: E402

logger = logging.getLogger("compare")


def _pairs(items: list[str], sep: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, _, value = item.partition(sep)
        out[key.strip()] = value.strip()
    return out


def run_one(name: str, out: Path, model: str, method: str, buckets: str | None, options: dict, samples: int,
            steps: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    kwargs = {"buckets": buckets} if buckets else {}
    build_plan(model=model, method=method, out=out, options=options, measure=False, progress=False, **kwargs)
    q = measure_quality(Plan.load(out), samples=samples, steps=steps, latency_repeats=repeats)
    logger.info("%s: PSNR %.2f dB, e2e %.2fx (%.0f s)", name, q["psnr_db"]["mean"], q["e2e_speedup"],
                time.perf_counter() - t0)
    return {"name": name, "method": method, "buckets": buckets, "options": options, **q}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled:tiny-dit")
    p.add_argument("--methods", default="sdtm,atedm,catome", help="methods to compare with ToMe")
    p.add_argument("--tome-ratios", default="0.1,0.2,0.3,0.4,0.5", help="uniform ToMe ratios to match speeds against")
    p.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE")
    p.add_argument("--buckets", action="append", default=[], metavar="METHOD=SPEC")
    p.add_argument("--method-model", action="append", default=[], metavar="METHOD=MODEL",
                   help="a method's own model (MoD: the fine-tuned model with routers)")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3, help="end-to-end latency repeats")
    p.add_argument("--workdir", default="/tmp/ditmerge-compare")
    p.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch", "export", "passes", "runtime"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    options: dict[str, dict] = {}
    for key, value in _pairs(args.option, "=").items():
        method, _, opt = key.partition(".")
        options.setdefault(method, {})[opt] = value
    buckets = _pairs(args.buckets, "=")
    models = _pairs(args.method_model, "=")
    work = Path(args.workdir)
    rows = []
    for ratio in [float(r) for r in args.tome_ratios.split(",") if r.strip()]:
        rows.append(run_one(f"tome {ratio:g}", work / f"tome_{ratio:g}", args.model, "tome", str(ratio), {},
                            args.samples, args.steps, args.repeats))
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        rows.append(run_one(method, work / method, models.get(method, args.model), method, buckets.get(method),
                            options.get(method, {}), args.samples, args.steps, args.repeats))
    tome = [r for r in rows if r["method"] == "tome"]
    for r in rows:
        if r["method"] != "tome" and tome:
            best = min(tome, key=lambda t: abs(t["e2e_speedup"] - r["e2e_speedup"]))
            r["matched_tome"] = best["name"]
            r["speed_gap"] = best["e2e_speedup"] / r["e2e_speedup"] - 1
    result = {"model": args.model, "samples": args.samples, "steps": args.steps,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, onnxruntime CPU fp32", "rows": rows}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "compare_methods.json").write_text(json.dumps(result, indent=2, default=str))
    print(table(result))
    return result


def table(result: dict) -> str:
    lines = [f"{result['model']}, {result['samples']} seeded generations x {result['steps']} DDIM steps, "
             f"{result['machine']}", "",
             "| plan | PSNR dB mean / worst | SSIM mean | classifier-FID (unmerged) | class acc. (unmerged) "
             "| e2e speed-up | ToMe at matched speed (gap) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        fid = f"{r['fid_merged']:.0f} ({r['fid_unmerged']:.0f})" if "fid_merged" in r else "-"
        acc = f"{r['class_accuracy_merged']:.2f} ({r['class_accuracy_unmerged']:.2f})" if "fid_merged" in r else "-"
        match = f"{r['matched_tome']} ({r['speed_gap']:+.0%})" if "matched_tome" in r else "-"
        lines.append(f"| {r['name']} | {r['psnr_db']['mean']:.2f} / {r['psnr_db']['worst']:.2f} | "
                     f"{r['ssim']['mean']:.3f} | {fid} | {acc} | {r['e2e_speedup']:.2f}x | {match} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
