"""Step caching against ToMe and SDTM on the bundled model: quality and end-to-end speed in one run.

    python benchmarks/cache_table.py --samples 20 --steps 25 --latency-repeats 7
    python benchmarks/cache_table.py --row "F1B1 every 3|cache|0,0,0|span=1-4;interval=3"

One export; every row's plan is built from its base graph into the same directory, and all rows go
through one :func:`export.report_quality.compare_plans` call against the unmerged plan: the same noise and
labels (PSNR/SSIM per image, classifier-FID against held-out real crops, class accuracy) and one
interleaved timing loop of one image (batch 2 with guidance), medians. A row is
``NAME|METHOD|BUCKETS|KEY=VALUE;KEY=VALUE`` (BUCKETS empty: the method's default). Writes
``benchmarks/results/cache_table.json`` (or ``--json``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from export.build import BASE_GRAPH, build_plan  # noqa: E402
from export.families import family_of  # noqa: E402
from export.load import BUNDLED, load_transformer  # noqa: E402
from export.methods import BuildContext, get_method  # noqa: E402
from export.report_quality import compare_plans, unmerged_view  # noqa: E402
from passes.onnxutil import save_checked  # noqa: E402
from sdtm_table import _view  # noqa: E402

logger = logging.getLogger("cache_table")

DEFAULT_ROWS = (
    "cache F1B1, every 2|cache|0,0,0|span=1-4;interval=2",
    "cache F1B1, every 3|cache|0,0,0|span=1-4;interval=3",
    "cache F1B0, every 2|cache|0,0,0|span=1-5;interval=2",
    "cache F1B1, 1/3/3|cache|0,0,0|span=1-4;interval=1,3,3",
    "cache F1B1, 2/3/4|cache|0,0,0|span=1-4;interval=2,3,4",
    "cache F1B1, adaptive 0.1|cache|0,0,0|span=1-4;interval=4;adaptive=0.1",
    "cache F1B1 every 3 + ToMe 0.3 full steps|cache|0.3,0.3,0.3|span=1-4;interval=3",
    "ToMe 0.3/0.2/0.1 (old default)|tome|0.3,0.2,0.1|",
    "ToMe 0.5|tome|0.5|",
    "ToMe 0.7|tome|0.7|",
    "SDTM (defaults)|sdtm||",
)


def build_rows_plan(ctx: BuildContext, plan_dir: Path, manifest: dict, method: str, buckets: str | None,
                    options: dict, tag: str):
    """A plan view for one row: the method's bucket graphs built from the one export, saved beside it."""
    meth = get_method(method, options)
    specs = meth.bucket_specs(meth.default_buckets if buckets is None else buckets, ctx.num_train_timesteps, BUNDLED)
    meth.validate(specs, ctx.grid)
    meth.prepare(ctx)
    built = []
    for i, spec in enumerate(specs):
        bg = meth.build_bucket(ctx, spec, i)
        names = {}
        for variant, g in bg.graphs.items():
            names[variant] = BASE_GRAPH if g is None else f"{tag}_{i}_{variant}.onnx"
            if g is not None:
                save_checked(g, plan_dir / names[variant])
        built.append((spec, bg, names))
    return _view(plan_dir, manifest, method, meth.params(), built)


def parse_row(text: str) -> tuple[str, str, str | None, dict[str, str]]:
    parts = text.split("|")
    if len(parts) != 4:
        raise SystemExit(f"--row {text!r}: expected NAME|METHOD|BUCKETS|KEY=VALUE;...")
    name, method, buckets, opts = parts
    options = dict(kv.split("=", 1) for kv in opts.split(";") if kv.strip())
    return name, method, buckets or None, options


def table(rows: list[dict]) -> str:
    out = ["| schedule | PSNR dB mean / worst | SSIM | classifier-FID (unmerged) | class acc. (unmerged) | e2e speed-up |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        q = r["quality"]
        out.append(f"| {r['name']} | {q['psnr_db']['mean']:.2f} / {q['psnr_db']['worst']:.2f} | {q['ssim']['mean']:.3f} | "
                   f"{q['fid_merged']:.0f} ({q['fid_unmerged']:.0f}) | {q['class_accuracy_merged']:.2f} "
                   f"({q['class_accuracy_unmerged']:.2f}) | {q['e2e_speedup']:.2f}x |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--latency-repeats", type=int, default=7)
    p.add_argument("--row", action="append", default=None, help="NAME|METHOD|BUCKETS|KEY=VALUE;... (repeatable)")
    p.add_argument("--workdir", type=Path, default=Path("cache_table"))
    p.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "cache_table.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("passes", "export.methods", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    t0 = time.time()
    rows = [parse_row(r) for r in (args.row or DEFAULT_ROWS)]
    plan_dir = args.workdir / "plan"
    if not (plan_dir / "plan.json").is_file():
        build_plan(BUNDLED, method="cache", out=plan_dir, measure=False, quality_samples=0, progress=False)
    manifest = json.loads((plan_dir / "plan.json").read_text())
    import onnx

    torch_model = load_transformer(BUNDLED)
    ctx = BuildContext(torch_model=torch_model, family=family_of(torch_model), grid=tuple(manifest["model"]["grid"]),
                       text_len=8, num_train_timesteps=manifest["model"]["num_train_timesteps"],
                       base=onnx.load(plan_dir / BASE_GRAPH, load_external_data=False), stage=plan_dir, progress=False)
    plans = {}
    for i, (name, method, buckets, options) in enumerate(rows):
        plans[name] = build_rows_plan(ctx, plan_dir, manifest, method, buckets, options, f"row{i}")
    first = next(iter(plans.values()))
    reports = compare_plans(plans, unmerged_view(first), samples=args.samples, steps=args.steps,
                            guidance=args.guidance, latency_repeats=args.latency_repeats)
    out = {"samples": args.samples, "steps": args.steps, "guidance": args.guidance,
           "latency_repeats": args.latency_repeats, "seconds": None,
           "rows": [{"name": n, "method": m, "buckets": b, "options": o, "quality": reports[n]} for n, m, b, o in rows]}
    out["seconds"] = round(time.time() - t0, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    ref = reports[rows[0][0]]
    print(f"{args.samples} seeds, {args.steps} DDIM steps, guidance {args.guidance:g}; against the unmerged plan "
          f"(FID {ref['fid_unmerged']:.0f}, class acc. {ref['class_accuracy_unmerged']:.2f}, "
          f"{ref['e2e_latency_s']['unmerged']:.3f} s per image); speed-ups from one interleaved loop, "
          f"{args.latency_repeats} repeats, medians\n")
    print(table(out["rows"]))


if __name__ == "__main__":
    main()
