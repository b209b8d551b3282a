"""CA-ToMe on the bundled model: with and without the match cache, against ToMe at the same r.

    python benchmarks/catome_table.py --samples 10 --steps 20

Builds a catome plan (threshold calibration, match + apply graphs per bucket) and a ToMe plan whose
buckets remove the same r, then generates the same seeded samples through the unmerged plan and
each variant (``export.report_quality.measure_quality``): PSNR/SSIM against the unmerged images,
classifier-FID and class accuracy, end-to-end speed-up against the unmerged plan in the same run. The
matching share is (match - apply) / match of the two graphs' per-forward latency at batch 2
(interleaved medians, measured by the build). Prints a markdown table; writes ``<workdir>/catome_table.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.build import build_plan
from export.load import BUNDLED
from export.report_quality import measure_quality
from runtime.generate import sample_classes
from runtime.plan import Plan
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--buckets", default="0,0,0", help="timestep ranges (catome ignores the ratios)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE", help="catome options")
    p.add_argument("--repeats", type=int, default=20, help="forwards per graph for the match/apply latency")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="catome_table_"))
    options = dict(o.split("=", 1) for o in args.option)

    cat = build_plan(BUNDLED, method="catome", buckets=args.buckets, out=work / "catome", options=options,
                     repeats=args.repeats, quality_samples=0, progress=False)
    rs = [b["r"] for b in cat["buckets"]]
    n = cat["model"]["tokens"]
    # the same r per bucket through the ToMe pass; (r + 0.5) / N so that int(N * ratio) == r
    spec = ",".join(f"{b['t_hi']}-{b['t_lo']}:{(b['r'] + 0.5) / n:.6f}" for b in cat["buckets"])
    tome = build_plan(BUNDLED, method="tome", buckets=spec, out=work / "tome", measure=False, quality_samples=0,
                      progress=False)
    assert [b["r"] for b in tome["buckets"]] == rs, (rs, [b["r"] for b in tome["buckets"]])

    cat_plan = Plan.load(work / "catome")
    rows = {}
    for name, plan in (("CA-ToMe, cache (paper schedule)", cat_plan),
                       ("CA-ToMe, no cache (match every step)", with_params(cat_plan, cache=False)),
                       ("ToMe, same r", Plan.load(work / "tome"))):
        q = measure_quality(plan, samples=args.samples, steps=args.steps)
        q["variants"] = variant_counts(plan, args.steps)
        rows[name] = q
        logger.info("%s: %s", name, json.dumps(q))

    shares = []
    for b in cat["buckets"]:
        lat = b["variant_latency_ms"]
        if "match" in lat:
            shares.append((b["index"], b["r"], lat["match"], lat["main"], (lat["match"] - lat["main"]) / lat["match"]))
    result = {"command": " ".join(sys.argv), "r": rs, "tokens": n, "base_latency_ms": cat["report"]["base_latency_ms"],
              "calibration": [b["method_meta"].get("calibration") for b in cat["buckets"]], "rows": rows,
              "matching_share": shares, "params": cat["method"]["params"]}
    (work / "catome_table.json").write_text(json.dumps(result, indent=1))
    print(render(result, args))


def render(res: dict, args) -> str:
    q0 = next(iter(res["rows"].values()))
    lines = [(f"Bundled model ({res['tokens']} tokens), {q0['samples']} samples, {q0['steps']} DDIM steps, guidance "
              f"{q0['guidance']:g}, onnxruntime CPU; r per bucket (noisy -> clean) from calibration: {res['r']}"), "",
             ("| variant | graphs run per generation | PSNR dB mean / worst | SSIM mean / worst | classifier-FID "
              "(unmerged) | class acc. (unmerged) | e2e speed-up vs unmerged |"),
             "|---|---|---|---|---|---|---|"]
    for name, q in res["rows"].items():
        runs = ", ".join(f"{v} {c}" for v, c in sorted(q["variants"].items()))
        lines.append(f"| {name} | {runs} | {q['psnr_db']['mean']:.2f} / {q['psnr_db']['worst']:.2f} | "
                     f"{q['ssim']['mean']:.4f} / {q['ssim']['worst']:.4f} | "
                     f"{q.get('fid_merged', float('nan')):.2f} ({q.get('fid_unmerged', float('nan')):.2f}) | "
                     f"{q.get('class_accuracy_merged', float('nan')):.3f} "
                     f"({q.get('class_accuracy_unmerged', float('nan')):.3f}) | {q['e2e_speedup']:.2f}x |")
    lines += ["", f"Matching share of a step (batch 2; unmerged forward {res['base_latency_ms']:.2f} ms):", "",
              "| bucket | r | match variant ms | apply variant ms | (match - apply) / match |", "|---|---|---|---|---|"]
    for i, r, m, a, s in res["matching_share"]:
        lines.append(f"| {i} | {r} | {m:.2f} | {a:.2f} | {s:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
