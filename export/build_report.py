"""The plan's report: per-bucket table, quality and sweep tables, the quality-speed plot (markdown, PNG)."""

from __future__ import annotations

from pathlib import Path

from passes.trt_check import TENSORRT_MIN_VERSION


def plot_quality_speed(rows: list[dict], path: Path) -> None:
    """PSNR against end-to-end speed-up, one point per ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [r["e2e_speedup"] for r in rows]
    y = [r["psnr_db"]["mean"] for r in rows]
    ax.plot(x, y, "o-")
    for r, xi, yi in zip(rows, x, y):
        ax.annotate(f"r={r['ratio']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("end-to-end speed-up vs unmerged plan")
    ax.set_ylabel("PSNR vs unmerged images (dB)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_table(rows: list[dict]) -> str:
    out = ["| ratio | r | PSNR dB mean / worst | SSIM mean / worst | FID merged (unmerged) | class acc. merged (unmerged) "
           "| e2e speed-up |", "|---|---|---|---|---|---|---|"]
    for q in rows:
        fid = f"{q['fid_merged']:.2f} ({q['fid_unmerged']:.2f})" if "fid_merged" in q else "-"
        acc = f"{q['class_accuracy_merged']:.3f} ({q['class_accuracy_unmerged']:.3f})" if "fid_merged" in q else "-"
        out.append(f"| {q['ratio']:g} | {q['r']} | {q['psnr_db']['mean']:.2f} / {q['psnr_db']['worst']:.2f} | "
                   f"{q['ssim']['mean']:.4f} / {q['ssim']['worst']:.4f} | {fid} | {acc} | {q['e2e_speedup']:.2f}x |")
    return "\n".join(out)


def bucket_table(manifest: dict) -> str:
    """The per-bucket table, as markdown."""
    rows = ["| bucket | timesteps | ratio | r | tokens kept | FLOPs vs full | fidelity (max abs) | latency ms | speed-up "
            "| TensorRT check |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    top = max(b["t_hi"] for b in manifest["buckets"])
    flow = manifest["model"].get("timesteps") == "flow"  # flow matching: the noisiest bucket also takes t = T
    for b in manifest["buckets"]:
        t_hi = b["t_hi"] + 1 if flow and b["t_hi"] == top else b["t_hi"]
        rows.append(f"| {b['index']} | {t_hi}..{b['t_lo']} | {b['ratio']:g} | {b['r']} | {b['kept_tokens']} | "
                    f"{b['flops_rel']:.3f} | {fmt(b['fidelity_max_abs'], '.2e')} | {fmt(b['latency_ms'], '.2f')} | "
                    f"{fmt(b['speedup'], '.2f')}x | {'pass' if not b['tensorrt_check'] else 'FAIL'} |")
    return "\n".join(rows)


def render_report(manifest: dict) -> str:
    m, rep = manifest["model"], manifest["report"]
    lines = [f"# ditmerge plan: {m['source']}", "",
             f"- model: {m['class']} ({m['family']}), grid {m['grid'][0]}x{m['grid'][1]} = {m['tokens']} tokens",
             f"- method: {manifest['method']['name']} {manifest['method']['params']}",
             f"- built {manifest['created']} with {', '.join(f'{k} {v}' for k, v in manifest['tool_versions'].items())}"]
    if "export_fidelity_max_abs" in rep:
        lines += [f"- export fidelity (unmerged graph vs eager PyTorch, fp32, batch {rep['batch']}): "
                  f"max abs error {rep['export_fidelity_max_abs']:.2e}",
                  f"- unmerged graph latency on {rep['backend']}: {rep['base_latency_ms']:.2f} ms per forward "
                  "(median of interleaved runs); speed-up = unmerged / bucket latency",
                  "- bucket fidelity: bucket graph vs the eager twin with the same partition",
                  f"- TensorRT check: static check for TensorRT >= {TENSORRT_MIN_VERSION} (ops, TopK K, scatter "
                  "reductions, data-dependent and dynamic shapes); failures are listed in plan.json"]
    lines += ["", bucket_table(manifest), ""]
    multi = [b for b in manifest["buckets"] if len(b.get("variant_latency_ms") or {}) > 1]
    if multi:  # methods with several graphs per bucket (cache, SDTM, CA-ToMe): each variant's forward
        lines += ["Per-variant latency (ms per forward): " + "; ".join(
            f"bucket {b['index']}: " + ", ".join(f"{v} {ms:.2f}" for v, ms in b["variant_latency_ms"].items())
            for b in multi), ""]
    if "quality" in rep:
        lines += ["## Quality and end-to-end speed: merged plan vs unmerged plan", "", quality_table(rep["quality"]), "",
                  "![unmerged (top) vs merged (bottom), same seeds](samples.png)", ""]
    if "sweep" in rep:
        lines += ["## Quality against speed: uniform ratios vs the unmerged plan", "", sweep_table(rep["sweep"]), "",
                  "![PSNR against end-to-end speed-up](quality_speed.png)", ""]
    return "\n".join(lines)


def quality_table(q: dict) -> str:
    """Quality and end-to-end latency of the merged plan against the unmerged plan, as markdown."""
    rows = [f"{q['samples']} seeded generations, {q['steps']} DDIM steps, guidance {q['guidance']:g}; "
            "PSNR/SSIM of merged vs unmerged images (same noise)", "",
            "| measure | unmerged | merged |", "|---|---|---|",
            f"| PSNR dB (mean / worst) | - | {q['psnr_db']['mean']:.2f} / {q['psnr_db']['worst']:.2f} |",
            f"| SSIM (mean / worst) | - | {q['ssim']['mean']:.4f} / {q['ssim']['worst']:.4f} |"]
    if "fid_merged" in q:
        rows += [f"| classifier-FID vs {q['fid_real_samples']} held-out real crops | {q['fid_unmerged']:.2f} | "
                 f"{q['fid_merged']:.2f} |",
                 f"| class accuracy of samples | {q['class_accuracy_unmerged']:.3f} | {q['class_accuracy_merged']:.3f} |"]
    lat = q["e2e_latency_s"]
    rows.append(f"| end-to-end latency, 1 image (median) | {lat['unmerged']:.3f} s | {lat['merged']:.3f} s "
                f"({q['e2e_speedup']:.2f}x) |")
    return "\n".join(rows)
