"""DiffRatio-MoD on the bundled model: the learned ratio pattern, and quality and speed against ToMe.

    python -m export.train_mod --out FT --regions 4 --steps 200      # fine-tune first
    python benchmarks/mod_table.py --model FT --workdir /tmp/modtab

Writes ``mod_ratios.png`` (learned and snapped ratio per layer and timestep region, and the training
log) and ``mod_table.md`` / ``mod_table.json`` into ``--out``. Quality: ``export.report_quality``
(seeded generations; PSNR/SSIM against each method's own unmerged reference, classifier-FID against
held-out real crops, class accuracy) and end-to-end speed-up against that reference in the same run.
MoD's reference is the *fine-tuned model without routing*; ToMe's is the bundled model. FID and class
accuracy are absolute, so they compare across the two.
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
from export.report_quality import measure_quality
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


def _row(name: str, q: dict, reference: str) -> dict:
    return {"name": name, "reference": reference, "psnr_db": q["psnr_db"], "ssim": q["ssim"],
            "fid": q.get("fid_merged"), "fid_reference": q.get("fid_unmerged"),
            "class_accuracy": q.get("class_accuracy_merged"), "class_accuracy_reference": q.get("class_accuracy_unmerged"),
            "e2e_speedup": q["e2e_speedup"], "e2e_latency_s": q["e2e_latency_s"]}


def run(model: str, workdir: Path, out: Path, samples: int, steps: int, tome_ratios: list[float],
        latency_repeats: int) -> dict:
    record = json.loads((Path(model) / RATIOS_FILE).read_text())
    out.mkdir(parents=True, exist_ok=True)
    plot_ratios(record, out / "mod_ratios.png")

    mod_plan = workdir / "mod"
    manifest = build_plan(model=model, method="mod", out=mod_plan, quality_samples=0, repeats=5, progress=False)
    q = measure_quality(Plan.load(mod_plan), samples=samples, steps=steps, latency_repeats=latency_repeats,
                        classifier=True, grid_png=out / "mod_samples.png")
    rows = [_row(f"MoD (mean snapped ratio {record['mean_snapped']:.3f})", q, "fine-tuned model, unrouted")]
    buckets = [{k: b[k] for k in ("t_lo", "t_hi", "ratio", "kept_tokens", "flops_rel", "fidelity_max_abs", "speedup",
                                  "tensorrt_check")} | {"capacities": b["method_meta"]["capacities"]}
               for b in manifest["buckets"]]

    for ratio in tome_ratios:
        plan_dir = workdir / f"tome_{ratio}"
        build_plan(model=BUNDLED, method="tome", buckets=str(ratio), out=plan_dir, measure=False, quality_samples=0,
                   progress=False)
        q = measure_quality(Plan.load(plan_dir), samples=samples, steps=steps, latency_repeats=latency_repeats)
        rows.append(_row(f"ToMe attn r={ratio} (every step)", q, "bundled model"))
    mod_speed = rows[0]["e2e_speedup"]
    tome = rows[1:]
    match = min(tome, key=lambda r: abs(r["e2e_speedup"] / mod_speed - 1)) if tome else None
    if match is not None:
        match["matched"] = abs(match["e2e_speedup"] / mod_speed - 1) <= 0.05
    result = {"model": model, "samples": samples, "steps": steps, "guidance": 4.0, "ratios": record,
              "mod_buckets": buckets, "rows": rows}
    (out / "mod_table.json").write_text(json.dumps(result, indent=1))
    (out / "mod_table.md").write_text(render(result))
    return result


def render(result: dict) -> str:
    rows = result["rows"]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    lines = [f"{result['samples']} seeded generations, {result['steps']} DDIM steps, guidance 4; onnxruntime CPU fp32.",
             ("PSNR/SSIM against each row's reference (same noise); FID on the bundled classifier's features vs 640 "
             "held-out real crops; end-to-end speed-up vs the reference, measured in the same run."), "",
             ("| method | reference | PSNR dB mean / worst | SSIM mean | classifier-FID (reference) | class accuracy "
             "(reference) | e2e speed-up |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        tag = " (matched speed)" if r.get("matched") else ""
        lines.append(f"| {r['name']}{tag} | {r['reference']} | {r['psnr_db']['mean']:.2f} / {r['psnr_db']['worst']:.2f} | "
                     f"{r['ssim']['mean']:.3f} | {fmt(r['fid'], '.0f')} ({fmt(r['fid_reference'], '.0f')}) | "
                     f"{fmt(r['class_accuracy'], '.2f')} ({fmt(r['class_accuracy_reference'], '.2f')}) | "
                     f"{r['e2e_speedup']:.2f}x |")
    lines.append("| SDTM | bundled model | (left to the lead) | | | | |")
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
    p.add_argument("--tome-ratios", default="0.3,0.4,0.5", help="uniform ToMe ratios to find the matched speed")
    p.add_argument("--latency-repeats", type=int, default=3)
    a = p.parse_args(argv)
    ratios = [float(s) for s in a.tome_ratios.split(",") if s.strip()]
    return run_cli(lambda: print(render(run(a.model, a.workdir, a.out, a.samples, a.steps, ratios,
                                            a.latency_repeats))))


if __name__ == "__main__":
    sys.exit(main())
