"""SDTM against ToMe at matched end-to-end speed, and SDTM's ablation, on the bundled model.

    python benchmarks/sdtm_table.py --samples 20 --steps 25 --workdir /tmp/sdtm_table

One export (an SDTM plan built with ``build_plan``); every other configuration is built from its
base graph into the same directory and measured with :func:`export.report_quality.measure_quality`
(PSNR/SSIM against the unmerged plan with the same noise, classifier-FID and class accuracy,
quality with the same seeds). End-to-end speed-ups of all plans (SDTM, its ablations, ToMe at several
uniform ratios with its default attention-only locations) come from one interleaved run against the
unmerged plan, so every plan sees the same machine load; the ToMe ratio closest to SDTM's speed-up is
the matched baseline. Writes ``sdtm_table.json`` and prints markdown tables.
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

from export.buckets import DEFAULT_BUCKETS, BucketSpec
from export.build import BASE_GRAPH, build_plan
from export.families import family_of
from export.load import BUNDLED, load_transformer
from export.methods import MAIN, BuildContext, get_method
from export.report_quality import measure_quality
from passes.onnxutil import save_checked
from runtime.plan import Plan

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
                        "sha256": "", "r": bg.r, "method_meta": bg.meta, "counts": bg.counts,
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
    out = [("| configuration | PSNR dB (mean / worst) | SSIM | classifier-FID (unmerged) | class acc. (unmerged) "
           "| e2e speed-up |"), "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['psnr_db']:.2f} / {r['psnr_worst']:.2f} | {r['ssim']:.4f} | "
                   f"{r['fid_merged']:.2f} ({r['fid_unmerged']:.2f}) | {r['acc_merged']:.3f} ({r['acc_unmerged']:.3f}) "
                   f"| {r['e2e_speedup']:.2f}x |")
    return "\n".join(out)


def e2e_speedups(plans: dict[str, Plan], steps: int, repeats: int) -> dict[str, float]:
    """End-to-end speed-up of each plan against the unmerged plan: one interleaved run over all of them.

    One image (batch 2 with guidance), ``steps`` DDIM steps, medians of ``repeats`` rounds; every plan
    sees the same machine load, which matters on a shared CPU.
    """
    import numpy as np

    from export.measure import interleaved_latency
    from export.report_quality import unmerged_view
    from runtime.generate import sample_classes
    from runtime.transformer import PlanTransformer

    first = next(iter(plans.values()))
    tfs = {"unmerged": PlanTransformer(unmerged_view(first), backend="cpu")}
    tfs.update({name: PlanTransformer(plan, backend="cpu") for name, plan in plans.items()})
    sched = first.model.get("scheduler")
    one = np.array([0])
    calls = {name: (lambda tf=tf: sample_classes(tf, one, steps=steps, guidance=4.0, scheduler_config=sched,
                                                 progress=False)) for name, tf in tfs.items()}
    lat = interleaved_latency(calls, repeats=repeats, warmup=1)
    logger.info("e2e latency s: %s", {k: round(v, 3) for k, v in lat.items()})
    return {name: lat["unmerged"] / lat[name] for name in plans} | {"_latency_s": lat}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--speed-repeats", type=int, default=8)
    p.add_argument("--tome-ratios", default="0.05,0.1,0.15,0.2,0.3,0.4,0.5")
    p.add_argument("--workdir", type=Path, default=Path("sdtm_table"))
    p.add_argument("--speed-only", action="store_true", help="only the speed run (a re-check with other repeats / ratios)")
    p.add_argument("--tome-quality-only", action="store_true", help="only the quality of ToMe at --tome-ratios")
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
    t_max = ctx.num_train_timesteps - 1

    if args.tome_quality_only:
        rows = []
        for ratio in (float(r) for r in args.tome_ratios.split(",")):
            plan = build_view(ctx, plan_dir, manifest, "tome", {}, f"tome{ratio:g}", [BucketSpec(0, t_max, ratio)])
            q = measure_quality(plan, samples=args.samples, steps=args.steps, latency_repeats=1)
            rows.append(_row(f"ToMe, uniform ratio {ratio:g} (attention)", q, {"ratio": ratio}))
        (args.workdir / "sdtm_tome_quality.json").write_text(json.dumps(rows, indent=2))
        print(table(rows))  # its speed-up column: measure_quality's own 1-round timing, not comparable
        return

    # 1. every configuration's plan, on the one export
    plans: dict[str, Plan] = {}
    for i, (name, opts) in enumerate(ABLATIONS.items()):
        plans[name] = build_view(ctx, plan_dir, manifest, "sdtm", opts, f"abl{i}")
    tome_names = {}
    for ratio in (float(r) for r in args.tome_ratios.split(",")):
        name = f"ToMe, uniform ratio {ratio:g} (attention)"
        plans[name] = build_view(ctx, plan_dir, manifest, "tome", {}, f"tome{ratio:g}", [BucketSpec(0, t_max, ratio)])
        tome_names[name] = ratio

    # 2. end-to-end speed of all of them in one interleaved run
    speed = e2e_speedups(plans, args.steps, args.speed_repeats)
    sdtm = next(iter(ABLATIONS))
    target = speed[sdtm]
    matched = min(tome_names, key=lambda n: abs(speed[n] / target - 1))
    if args.speed_only:
        (args.workdir / "sdtm_speed.json").write_text(json.dumps(speed, indent=2, default=str))
        print("| configuration | e2e speed-up |\n|---|---|")
        for name, v in speed.items():
            if name != "_latency_s":
                print(f"| {name} | {v:.2f}x |")
        return

    # 3. quality (PSNR/SSIM vs unmerged, classifier-FID, accuracy) of the SDTM configurations and the matched ToMe
    results: dict = {"samples": args.samples, "steps": args.steps, "speed_repeats": args.speed_repeats,
                     "e2e_latency_s": speed.pop("_latency_s"), "e2e_speedup": speed, "ablation": []}
    for name, opts in ABLATIONS.items():
        q = measure_quality(plans[name], samples=args.samples, steps=args.steps, latency_repeats=1)
        results["ablation"].append(_row(name, q, {"options": opts, "e2e_speedup": speed[name]}))
        logger.info("%s: %s", name, results["ablation"][-1])
    q = measure_quality(plans[matched], samples=args.samples, steps=args.steps, latency_repeats=1)
    results["matched_tome"] = _row(matched, q, {"ratio": tome_names[matched], "e2e_speedup": speed[matched],
                                                "matched_within": abs(speed[matched] / target - 1)})
    results["seconds"] = time.time() - t0
    (args.workdir / "sdtm_table.json").write_text(json.dumps(results, indent=2))
    print("## SDTM vs ToMe at matched end-to-end speed\n")
    print(table([results["ablation"][0], results["matched_tome"]]))
    print(f"\nToMe's speed-up is within {100 * results['matched_tome']['matched_within']:.1f} % of SDTM's.\n")
    print("## Ablation: SDTM minus one part\n")
    print(table(results["ablation"]))
    print("\n## End-to-end speed-up of every plan (one interleaved run)\n")
    print("| configuration | e2e speed-up |\n|---|---|")
    for name, v in speed.items():
        print(f"| {name} | {v:.2f}x |")


if __name__ == "__main__":
    main()
