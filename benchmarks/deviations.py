"""Where our graphs depart from the papers on purpose, both behaviours measured on the bundled model.

    python benchmarks/deviations.py --samples 20 --steps 25 --ratio 0.3
    python benchmarks/deviations.py --what catome --samples 10 --steps 20

- ToMe's matching metric (``-o metric=``): ``sublayer`` matches on the adaLN-modulated input of the
  block's first merged sublayer; ``block`` on the block's input, as tomesd does. Same ratio, attention only.
- ToMe's matching shared by neighbouring blocks (``-o match_every=``, group ``tome_shared``): one
  similarity search per run of k blocks instead of one per block.
- CA-ToMe's r (``-o r_per_block=``): one r per bucket pooled over every block's threshold counts, or one
  r per block and bucket from that block's own counts (the paper counts per block and call); and, with the
  per-block r, the block-input metric of the paper.

Each group is one :func:`export.report_quality.compare_plans` call against the unmerged plan: the same
seeded noise and labels (PSNR/SSIM against the unmerged images, mean and worst; classifier-FID and class
accuracy) and one interleaved end-to-end timing loop, medians, so every variant sees the same machine
load. Prints a markdown table; writes ``benchmarks/results/deviations.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.build import build_plan
from export.load import BUNDLED
from export.report_quality import compare_plans, unmerged_view
from runtime.plan import Plan

logger = logging.getLogger("deviations")

GROUPS = {
    "tome": {
        "ToMe, metric=sublayer (modulated sublayer input)": {"metric": "sublayer"},
        "ToMe, metric=block (block input, as tomesd)": {"metric": "block"},
    },
    "tome_shared": {
        "ToMe, one matching per block (tomesd)": {},
        "ToMe, match_every=2 (one matching per 2 blocks)": {"match_every": 2},
        "ToMe, match_every=4 (one matching for all 4 blocks)": {"match_every": 4},
    },
    "catome": {
        "CA-ToMe, pooled r, metric=sublayer": {"r_per_block": "false", "metric": "sublayer"},
        "CA-ToMe, r per block, metric=sublayer": {"r_per_block": "true", "metric": "sublayer"},
        "CA-ToMe, r per block, metric=block (paper)": {"r_per_block": "true", "metric": "block"},
    },
}


def build(work: Path, method: str, name: str, options: dict, buckets: str, calib_samples: int) -> Plan:
    tag = "".join(c if c.isalnum() else "_" for c in name)[:60]
    opts = dict(options)
    if method == "catome":
        opts.setdefault("calib_samples", str(calib_samples))
    build_plan(BUNDLED, method=method, buckets=buckets, out=work / tag, options=opts, measure=False,
               quality_samples=0, progress=False)
    return Plan.load(work / tag)


def row(name: str, plan: Plan, q: dict) -> dict:
    return {"variant": name, "method": plan.method["name"], "params": plan.method.get("params", {}),
            "r": [b.meta.get("r", 0) for b in plan.buckets],
            "r_blocks": [b.meta.get("r_blocks") for b in plan.buckets],
            "psnr_mean": q["psnr_db"]["mean"], "psnr_worst": q["psnr_db"]["worst"], "ssim_mean": q["ssim"]["mean"],
            "fid_merged": q.get("fid_merged"), "fid_unmerged": q.get("fid_unmerged"),
            "acc_merged": q.get("class_accuracy_merged"), "acc_unmerged": q.get("class_accuracy_unmerged"),
            "e2e_s_merged": q["e2e_latency_s"]["merged"], "e2e_s_unmerged": q["e2e_latency_s"]["unmerged"],
            "e2e_speedup": q["e2e_speedup"], "samples": q["samples"], "steps": q["steps"], "guidance": q["guidance"]}


def render(rows: list[dict]) -> str:
    lines = ["| variant | r per bucket | PSNR dB mean / worst | SSIM | classifier-FID (unmerged) | class acc. | "
             "e2e speed-up |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        fid = f"{r['fid_merged']:.0f} ({r['fid_unmerged']:.0f})" if r["fid_merged"] is not None else "-"
        acc = f"{r['acc_merged']:.2f}" if r["acc_merged"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['r']} | {r['psnr_mean']:.2f} / {r['psnr_worst']:.2f} | "
                     f"{r['ssim_mean']:.3f} | {fid} | {acc} | {r['e2e_speedup']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="tome,catome", help="groups to measure: tome, tome_shared, catome")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--ratio", type=float, default=0.3, help="ToMe's uniform ratio")
    p.add_argument("--catome-samples", type=int, default=None, help="CA-ToMe's samples (default --samples)")
    p.add_argument("--catome-steps", type=int, default=None, help="CA-ToMe's steps (default --steps)")
    p.add_argument("--calib-samples", type=int, default=8, help="CA-ToMe calibration samples")
    p.add_argument("--latency-repeats", type=int, default=5)
    p.add_argument("--suffix", default="", help="appended to each group's key in the JSON (another ratio: '@0.5')")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "deviations.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="deviations_"))
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    for group in [g.strip() for g in args.what.split(",") if g.strip()]:
        tome = group.startswith("tome")
        samples = args.samples if tome else (args.catome_samples or args.samples)
        steps = args.steps if tome else (args.catome_steps or args.steps)
        buckets = str(args.ratio) if tome else "0,0,0"
        t0 = time.time()
        plans = {name: build(work, "tome" if tome else group, name, opts, buckets, args.calib_samples)
                 for name, opts in GROUPS[group].items()}
        reports = compare_plans(plans, unmerged_view(next(iter(plans.values()))), samples=samples, steps=steps,
                                guidance=args.guidance, latency_repeats=args.latency_repeats)
        rows = [row(name, plans[name], q) for name, q in reports.items()]
        result[group + args.suffix] = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "rows": rows,
                         "ratio": args.ratio if tome else None, "minutes": (time.time() - t0) / 60}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"\n{group}: {samples} samples, {steps} DDIM steps, guidance {args.guidance:g}\n")
        print(render(rows), flush=True)


if __name__ == "__main__":
    main()
