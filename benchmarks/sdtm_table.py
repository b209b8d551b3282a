"""SDTM against ToMe at matched end-to-end speed, and SDTM's ablation, on the bundled model.

    python benchmarks/sdtm_table.py --samples 20 --steps 25 --workdir /tmp/sdtm_table

One export (an SDTM plan built with ``build_plan``); every other configuration is built from its
base graph into the same directory and measured with :func:`export.report_quality.measure_quality`
(PSNR/SSIM against the unmerged plan with the same noise, classifier-FID and class accuracy,
end-to-end latency against the unmerged plan, interleaved, in one process). ToMe (uniform ratio
over all timesteps, its default attention-only locations) is measured at a few ratios; the ratio
whose speed-up is within 5 % of SDTM's is refined by interpolation. Writes ``sdtm_table.json`` and
prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.buckets import DEFAULT_BUCKETS, BucketSpec  # noqa: E402
from export.build import BASE_GRAPH, build_plan  # noqa: E402
from export.families import family_of  # noqa: E402
from export.load import BUNDLED, load_transformer  # noqa: E402
from export.methods import MAIN, BuildContext, get_method  # noqa: E402
from export.report_quality import measure_quality  # noqa: E402
from passes.onnxutil import save_checked  # noqa: E402
from runtime.plan import Plan  # noqa: E402

logger = logging.getLogger("sdtm_table")

ABLATIONS = {
    "SDTM (defaults)": {},
    "- window merge (bipartite in the structure stage)": {"structure_merge": "bipartite"},
    "- MLP-only detail stage (detail merges attention too)": {"detail_locations": "attn,joint,mlp"},
    "- protected steps and cache": {"protect_every": "0"},
}


def _view(plan_dir: Path, manifest: dict, method: str, params: dict, buckets: list[tuple]) -> Plan:
    """A plan on ``manifest``'s model and weights with other buckets: (spec, BucketGraphs, names)."""
    view = copy.deepcopy(manifest)
    view["method"] = {"name": method, "params": params}
    view["buckets"] = [{"index": i, "t_lo": spec.t_lo, "t_hi": spec.t_hi, "ratio": spec.ratio, "graph": names[MAIN],
                        "sha256": "", "r": bg.r, "method_meta": bg.meta,
                        "graphs": {v: {"file": f, "sha256": ""} for v, f in names.items()}}
                       for i, (spec, bg, names) in enumerate(buckets)]
    return Plan(plan_dir, view)


def build_view(ctx: BuildContext, plan_dir: Path, manifest: dict, method: str, options: dict, tag: str,
               specs: list[BucketSpec] | None = None) -> Plan:
    meth = get_method(method, options)
    specs = specs or meth.bucket_specs(DEFAULT_BUCKETS, ctx.num_train_timesteps, manifest["model"]["source"])
    meth.validate(specs, ctx.grid)
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


def _row(name: str, q: dict, extra: dict | None = None) -> dict:
    return {"config": name, "psnr_db": q["psnr_db"]["mean"], "psnr_worst": q["psnr_db"]["worst"],
            "ssim": q["ssim"]["mean"], "fid_merged": q.get("fid_merged"), "fid_unmerged": q.get("fid_unmerged"),
            "acc_merged": q.get("class_accuracy_merged"), "acc_unmerged": q.get("class_accuracy_unmerged"),
            "e2e_speedup": q["e2e_speedup"], **(extra or {})}


def table(rows: list[dict]) -> str:
    out = ["| configuration | PSNR dB (mean / worst) | SSIM | classifier-FID (unmerged) | class acc. (unmerged) "
           "| e2e speed-up |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['psnr_db']:.2f} / {r['psnr_worst']:.2f} | {r['ssim']:.4f} | "
                   f"{r['fid_merged']:.2f} ({r['fid_unmerged']:.2f}) | {r['acc_merged']:.3f} ({r['acc_unmerged']:.3f}) "
                   f"| {r['e2e_speedup']:.2f}x |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--latency-repeats", type=int, default=5)
    p.add_argument("--tome-ratios", default="0.2,0.4,0.6")
    p.add_argument("--workdir", type=Path, default=Path("sdtm_table"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.time()
    plan_dir = args.workdir / "plan"
    if not (plan_dir / "plan.json").is_file():
        build_plan(BUNDLED, method="sdtm", out=plan_dir, measure=False, quality_samples=0, progress=False)
    manifest = json.loads((plan_dir / "plan.json").read_text())
    torch_model = load_transformer(BUNDLED)
    import onnx

    grid = tuple(manifest["model"]["grid"])
    ctx = BuildContext(torch_model=torch_model, family=family_of(torch_model), grid=grid, text_len=8,
                       num_train_timesteps=manifest["model"]["num_train_timesteps"],
                       base=onnx.load(plan_dir / BASE_GRAPH, load_external_data=False), stage=plan_dir, progress=False)
    measure = lambda plan: measure_quality(plan, samples=args.samples, steps=args.steps,  # noqa: E731
                                           latency_repeats=args.latency_repeats)
    results: dict = {"samples": args.samples, "steps": args.steps, "ablation": [], "tome": []}

    for i, (name, opts) in enumerate(ABLATIONS.items()):
        q = measure(build_view(ctx, plan_dir, manifest, "sdtm", opts, f"abl{i}"))
        results["ablation"].append(_row(name, q, {"options": opts}))
        logger.info("%s: %s", name, results["ablation"][-1])
    target = results["ablation"][0]["e2e_speedup"]

    t_max = ctx.num_train_timesteps - 1

    def tome(ratio: float) -> dict:
        plan = build_view(ctx, plan_dir, manifest, "tome", {}, f"tome{ratio:g}", [BucketSpec(0, t_max, ratio)])
        row = _row(f"ToMe, uniform ratio {ratio:.3g} (attention)", measure(plan), {"ratio": ratio})
        logger.info("tome %.3g: %s", ratio, row)
        return row

    for ratio in (float(r) for r in args.tome_ratios.split(",")):
        results["tome"].append(tome(ratio))
    for _ in range(2):  # refine towards SDTM's speed by linear interpolation on the measured speed-ups
        pts = sorted(results["tome"], key=lambda r: r["ratio"])
        best = min(pts, key=lambda r: abs(r["e2e_speedup"] / target - 1))
        if abs(best["e2e_speedup"] / target - 1) <= 0.02:
            break
        lo = max((r for r in pts if r["e2e_speedup"] <= target), key=lambda r: r["ratio"], default=pts[0])
        hi = min((r for r in pts if r["e2e_speedup"] >= target), key=lambda r: r["ratio"], default=pts[-1])
        if lo is hi or hi["e2e_speedup"] == lo["e2e_speedup"]:
            break
        f = (target - lo["e2e_speedup"]) / (hi["e2e_speedup"] - lo["e2e_speedup"])
        ratio = round(min(max(lo["ratio"] + f * (hi["ratio"] - lo["ratio"]), 0.01), 0.74), 3)
        if any(abs(r["ratio"] - ratio) < 1e-3 for r in pts):
            break
        results["tome"].append(tome(ratio))
    matched = min(results["tome"], key=lambda r: abs(r["e2e_speedup"] / target - 1))
    matched["matched_within"] = abs(matched["e2e_speedup"] / target - 1)
    results["matched_tome"] = matched
    results["seconds"] = time.time() - t0
    (args.workdir / "sdtm_table.json").write_text(json.dumps(results, indent=2))
    print("## SDTM vs ToMe at matched end-to-end speed\n")
    print(table([results["ablation"][0], matched]))
    print(f"\nToMe's speed-up is within {100 * matched['matched_within']:.1f} % of SDTM's.\n")
    print("## Ablation: SDTM minus one part\n")
    print(table(results["ablation"]))
    print("\n## ToMe ratios measured\n")
    print(table(sorted(results["tome"], key=lambda r: r["ratio"])))


if __name__ == "__main__":
    main()
