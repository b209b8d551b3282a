"""The tuner's report: the search table, the held-out check, and the speed-quality frontier PNG."""

from __future__ import annotations

from pathlib import Path


def search_rows(ev, targets) -> list[dict]:
    """Every schedule tried: its knob values, calibration quality, predicted speed-up, verdict."""
    rows = []
    for levels in ev.evaluated():
        q = ev.quality(levels)
        rows.append({"levels": list(levels), "schedule": ev.space.describe(levels), "quality": q,
                     "predicted_speedup": ev.speedup(levels), "meets_target": not targets.misses(q)})
    return sorted(rows, key=lambda r: -r["predicted_speedup"])


def frontier(rows: list[dict], metric: str = "psnr") -> list[dict]:
    """The rows no other row beats on both speed and the metric (higher is better for both)."""
    pts = sorted(rows, key=lambda r: (-r["predicted_speedup"], -_metric(r["quality"], metric)))
    out, best = [], float("-inf")
    for r in pts:
        v = _metric(r["quality"], metric)
        if v > best:
            out.append(r)
            best = v
    return out


def _metric(q: dict, metric: str) -> float:
    if metric == "psnr":
        return q["psnr_db"]["mean"]
    if metric == "ssim":
        return q["ssim"]["mean"]
    return -q["fid_increase"]


def _main_metric(targets) -> str:
    t = targets.as_dict()
    return "psnr" if "psnr" in t else "ssim" if "ssim" in t else "fid_increase"


def plot_frontier(rows: list[dict], chosen: tuple, held: dict, targets, path: Path) -> None:
    """Quality (the first target's measure) against predicted speed-up; frontier, target, chosen, held-out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = _main_metric(targets)
    sign = -1 if metric == "fid_increase" else 1
    label = {"psnr": "PSNR vs unmerged images (dB, mean)", "ssim": "SSIM vs unmerged images (mean)",
             "fid_increase": "FID increase over unmerged (relative)"}[metric]
    fig, ax = plt.subplots(figsize=(6, 4))
    for ok, style, name in ((True, "o", "meets target"), (False, "x", "misses target")):
        pts = [r for r in rows if r["meets_target"] == ok]
        ax.plot([r["predicted_speedup"] for r in pts], [sign * _metric(r["quality"], metric) for r in pts], style,
                alpha=0.6, label=name)
    front = frontier(rows, metric)
    ax.plot([r["predicted_speedup"] for r in front], [sign * _metric(r["quality"], metric) for r in front], "-",
            color="gray", lw=1, label="frontier")
    target = targets.as_dict()[metric]
    ax.axhline(target, color="red", ls="--", lw=1, label=f"target {target:g}")
    pick = next(r for r in rows if tuple(r["levels"]) == tuple(chosen))
    ax.plot([pick["predicted_speedup"]], [sign * _metric(pick["quality"], metric)], "*", ms=14, color="C2",
            label="chosen (calibration seeds)")
    ax.plot([pick["predicted_speedup"]], [sign * _metric(held["quality"], metric)], "*", ms=14, mfc="none",
            color="C3", label="chosen (held-out seeds)")
    ax.set_xlabel("predicted end-to-end speed-up vs unmerged plan")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _q(q: dict) -> str:
    s = f"{q['psnr_db']['mean']:.2f} / {q['psnr_db']['worst']:.2f} | {q['ssim']['mean']:.4f} / {q['ssim']['worst']:.4f}"
    fid = f"{q['fid']:.1f} ({100 * q['fid_increase']:+.1f} %)" if "fid" in q else "-"
    return f"{s} | {fid}"


def tune_section(manifest: dict, space) -> str:
    """The report's tuning section, as markdown."""
    t = manifest["report"]["tune"]
    cal, held = t["calibration"], t["heldout"]
    targets = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in t["targets"].items())
    lines = ["## Tuned to a quality budget", "",
             f"- target: {targets} (mean over images, against the unmerged plan's images for the same seeds)",
             f"- chosen schedule: {' '.join(f'{k}={v}' for k, v in t['schedule'].items())}",
             f"- end-to-end speed-up, 1 image with guidance: predicted {t['predicted_speedup']:.2f}x, measured "
             f"{t['measured_speedup']:.2f}x (interleaved with the unmerged plan, medians)",
             f"- search: {t['evaluations']} schedules ({t['evaluations_run']} generated in this run, "
             f"{t['evaluations_reused']} from the record), {t['search_seconds']:.0f} s",
             f"- held-out check ({held['samples']} seeds the search never saw, {held['seeds'][0]}..{held['seeds'][1]}): "
             + ("meets the target" if held["meets_target"] else "MISSES the target: " + "; ".join(held["misses"])), "",
             f"{cal['samples']} calibration generations (seeds {cal['seeds'][0]}..{cal['seeds'][1]}), {cal['steps']} steps "
             f"({t.get('sampler', 'DDIM')}), guidance {cal['guidance']:g}", "",
             "| seeds | PSNR dB mean / worst | SSIM mean / worst | classifier-FID (vs unmerged) |", "|---|---|---|---|",
             f"| calibration | {_q(cal)} |", f"| held-out | {_q(held)} |", "",
             "### Every schedule tried (fastest first)", "",
             "| schedule | PSNR dB mean / worst | SSIM mean / worst | classifier-FID | predicted speed-up | target |",
             "|---|---|---|---|---|---|"]
    for r in t["table"]:
        mark = "**chosen**" if r["levels"] == t["levels"] else ("meets" if r["meets_target"] else "misses")
        lines.append(f"| {r['schedule']} | {_q(r['quality'])} | {r['predicted_speedup']:.2f}x | {mark} |")
    lines += ["", "![quality against predicted speed-up: every schedule tried](tune_frontier.png)", "",
              "![held-out seeds: unmerged (top) vs tuned (bottom)](samples.png)", ""]
    return "\n".join(lines)
