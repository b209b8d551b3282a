"""DiffRatio-MoD on the bundled model: the learned ratio pattern, and quality and speed against ToMe.

    python -m export.train_mod --out FT --regions 4 --steps 200      # fine-tune first
    python benchmarks/mod_table.py --model FT --workdir /tmp/modtab

Writes ``mod_ratios.png`` (learned and snapped ratio per layer and timestep region, and the training
log) and ``mod_table.md`` / ``mod_table.json`` into ``--out``. Quality by
:func:`export.report_quality.compare_plans`: MoD, its fine-tuned model without routing, ToMe at each
ratio and SDTM, all against one reference, the bundled model's unmerged plan, with the same noise
(PSNR/SSIM, classifier-FID against held-out real crops, class accuracy), and their end-to-end speed-ups
from one interleaved timing loop. Each method row names the ToMe row nearest its speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.build import build_plan
from export.load import BUNDLED
from export.report_quality import compare_plans, unmerged_view
from export.train_mod import RATIOS_FILE
from passes.cli import run_cli
from runtime.plan import Plan

logger = logging.getLogger("mod_table")


def plot_ratios(record: dict, path: Path) -> None:
    """Heatmaps of the learned and snapped ratios (rows: timestep regions, noisiest on top) and the training log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    regions = sorted(record["regions"], key=lambda r: -r["t_lo"])
    learned = np.array([r["learned"] for r in regions])
    snapped = np.array([r["snapped"] for r in regions])
    labels = [f"t {r['t_hi']}..{r['t_lo']}" for r in regions]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    for ax, data, title in ((axes[0], learned, "learned ratio"), (axes[1], snapped, "snapped to 10 % bins (export)")):
        im = ax.imshow(data, vmin=0, vmax=record["max_ratio"], cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(data):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="w" if v < 0.4 else "k")
        ax.set_xticks(range(data.shape[1]), [str(i) for i in range(data.shape[1])])
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("layer (transformer block)")
        ax.set_title(f"{title}; mean {data.mean():.3f}")
    fig.colorbar(im, ax=axes[1], label="compression ratio (share of tokens skipping the block)")
    log = record["log"]
    steps = [e["step"] for e in log]
    ax = axes[2]
    ax.plot(steps, [e["diffusion_loss"] for e in log], "o-", label="diffusion loss")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("diffusion loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [e["mean_ratio"] for e in log], "s-", color="C1", label="mean ratio")
    ax2.axhline(record["target"], color="C1", ls=":", lw=1)
    ax2.set_ylim(0, max(record["target"], max(e["mean_ratio"] for e in log)) * 1.25)
    ax2.set_ylabel("mean learned ratio (dotted: target)")
    ax.set_title(f"fine-tuning ({record['finetune']}, {record['steps']} steps)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(name: str, q: dict) -> dict:
    return {"name": name, "psnr_db": q["psnr_db"], "ssim": q["ssim"], "fid": q.get("fid_merged"),
            "class_accuracy": q.get("class_accuracy_merged"), "e2e_speedup": q["e2e_speedup"],
            "e2e_latency_s": q["e2e_latency_s"]["merged"]}


def run(model: str, workdir: Path, out: Path, samples: int, steps: int, tome_ratios: list[float],
        latency_repeats: int, sdtm: bool = True) -> dict:
    """Build the MoD, ToMe and SDTM plans and measure them all against the bundled model in one run."""
    record = json.loads((Path(model) / RATIOS_FILE).read_text())
    out.mkdir(parents=True, exist_ok=True)
    plot_ratios(record, out / "mod_ratios.png")

    mod_dir = workdir / "mod"
    manifest = build_plan(model=model, method="mod", out=mod_dir, quality_samples=0, repeats=5, progress=False)
    mod_plan = Plan.load(mod_dir)
    plans = {f"MoD (mean snapped ratio {record['mean_snapped']:.3f})": mod_plan,
             "fine-tuned model, unrouted": unmerged_view(mod_plan)}
    for ratio in tome_ratios:
        plan_dir = workdir / f"tome_{ratio}"
        build_plan(model=BUNDLED, method="tome", buckets=str(ratio), out=plan_dir, measure=False, quality_samples=0,
                   progress=False)
        plans[f"ToMe attn r={ratio} (every step)"] = Plan.load(plan_dir)
    if sdtm:
        build_plan(model=BUNDLED, method="sdtm", out=workdir / "sdtm", measure=False, quality_samples=0, progress=False)
        plans["SDTM (defaults)"] = Plan.load(workdir / "sdtm")
    # the reference: the bundled model's unmerged graph, what users had before any method
    build_plan(model=BUNDLED, method="tome", buckets="0", out=workdir / "unmerged", measure=False, quality_samples=0,
               progress=False)
    reference = unmerged_view(Plan.load(workdir / "unmerged"))
    reports = compare_plans(plans, reference, samples=samples, steps=steps, latency_repeats=latency_repeats,
                            classifier=True, grid_png=out / "mod_samples.png")
    rows = [_row(name, q) for name, q in reports.items()]
    first = next(iter(reports.values()))
    ref_row = {"name": "bundled model, unmerged (reference)", "fid": first.get("fid_unmerged"),
               "class_accuracy": first.get("class_accuracy_unmerged"), "e2e_latency_s": first["e2e_latency_s"]["unmerged"]}
    tome = [r for r in rows if r["name"].startswith("ToMe")]
    for r in rows:
        if r["name"].startswith(("MoD", "SDTM")) and tome:
            near = min(tome, key=lambda t: abs(t["e2e_speedup"] / r["e2e_speedup"] - 1))
            r["nearest_tome"] = near["name"]
            r["speed_gap"] = near["e2e_speedup"] / r["e2e_speedup"] - 1
    buckets = [{k: b[k] for k in ("t_lo", "t_hi", "ratio", "kept_tokens", "flops_rel", "fidelity_max_abs", "speedup",
                                  "tensorrt_check")} | {"capacities": b["method_meta"]["capacities"]}
               for b in manifest["buckets"]]
    result = {"model": model, "samples": samples, "steps": steps, "guidance": 4.0, "latency_repeats": latency_repeats,
              "ratios": record, "mod_buckets": buckets, "reference": ref_row, "rows": rows}
    (out / "mod_table.json").write_text(json.dumps(result, indent=1))
    (out / "mod_table.md").write_text(render(result))
    return result


def render(result: dict) -> str:
    fmt = lambda v, f: "-" if v is None else format(v, f)
    ref = result["reference"]
    lines = [(f"{result['samples']} seeded generations, {result['steps']} DDIM steps, guidance 4; onnxruntime CPU fp32. "
             "Every row against the same reference, the bundled model's unmerged plan, with the same noise: "
             "PSNR/SSIM, and end-to-end speed-up measured in one interleaved loop over all rows "
             f"({result['latency_repeats']} repeats, medians). FID on the bundled classifier's features vs 640 "
             "held-out real crops."), "",
             (f"Reference: FID {fmt(ref['fid'], '.0f')}, class accuracy {fmt(ref['class_accuracy'], '.2f')}, "
             f"{ref['e2e_latency_s']:.2f} s per image."), "",
             "| plan | PSNR dB mean / worst | SSIM | classifier-FID | class acc. | e2e speed-up | nearest ToMe (speed gap) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        near = f"{r['nearest_tome']} ({r['speed_gap']:+.0%})" if "nearest_tome" in r else ""
        lines.append(f"| {r['name']} | {r['psnr_db']['mean']:.2f} / {r['psnr_db']['worst']:.2f} | {r['ssim']['mean']:.3f} | "
                     f"{fmt(r['fid'], '.0f')} | {fmt(r['class_accuracy'], '.2f')} | {r['e2e_speedup']:.2f}x | {near} |")
    lines += ["", "MoD buckets (one per run of timestep regions with the same capacities):", "",
              ("| timesteps | mean ratio | capacities per layer | FLOPs vs full | fidelity (max abs) | per-forward speed-up "
               "| TensorRT check |"), "|---|---|---|---|---|---|---|"]
    for b in result["mod_buckets"]:
        lines.append(f"| {b['t_hi']}..{b['t_lo']} | {b['ratio']:.3f} | {b['capacities']} | {b['flops_rel']:.3f} | "
                     f"{fmt(b['fidelity_max_abs'], '.1e')} | {fmt(b['speedup'], '.2f')}x | "
                     f"{'pass' if not b['tensorrt_check'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a folder written by python -m export.train_mod")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mod_table"), help="plans are built here")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--tome-ratios", default="0.1,0.2,0.3", help="uniform ToMe ratios to find the matched speed")
    p.add_argument("--no-sdtm", action="store_true", help="leave SDTM out")
    p.add_argument("--latency-repeats", type=int, default=3)
    a = p.parse_args(argv)
    ratios = [float(s) for s in a.tome_ratios.split(",") if s.strip()]
    return run_cli(lambda: print(render(run(a.model, a.workdir, a.out, a.samples, a.steps, ratios,
                                            a.latency_repeats, sdtm=not a.no_sdtm))))


if __name__ == "__main__":
    sys.exit(main())
