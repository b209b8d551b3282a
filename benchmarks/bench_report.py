"""bench.py's report: the markdown table and the speed-up chart of one result (bench.py's JSON)."""

from __future__ import annotations

from pathlib import Path


def table(result: dict) -> str:
    blocks = f", first {result['layers']} blocks" if result.get("layers") else ""
    head = (f"{result['arch']}{blocks} at {result['px']} px ({result['tokens']} tokens), batch {result['batch']}, "
            f"{result['machine']}, {result.get('date', '')}")
    columns = ("| variant | latency ms (median / min / CPU) | unmerged ms (same group) | speed-up vs unmerged "
               "(median / min / CPU) | vs eager | vs tomesd (median / min) | vs torch.compile (median / min) | FLOPs vs full "
               "| FLOP-ideal | share of ideal | matching share |")
    lines = [head, "", columns, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        f = lambda key, fmt, r=r: format(r[key], fmt) if key in r else "-"
        pair = lambda key, r=r: f"{r[key]:.2f}x / {r[key + '_min']:.2f}x" if key in r else "-"
        cpu = f" / {r['speedup_vs_unmerged_cpu']:.2f}x" if "speedup_vs_unmerged_cpu" in r else ""
        lines.append(f"| {r['variant']} | {r['latency_ms']:.1f} / {f('latency_min_ms', '.1f')} / {f('cpu_ms', '.1f')} | "
                     f"{f('unmerged_ms', '.1f')} | {pair('speedup_vs_unmerged')}{cpu} | {f('speedup_vs_eager', '.2f')} | "
                     f"{pair('speedup_vs_tomesd')} | {pair('speedup_vs_torch.compile')} | {f('flops_rel', '.3f')} | "
                     f"{f('flop_ideal_speedup', '.2f')} | {f('share_of_flop_ideal', '.0%')} | {f('matching_share', '.1%')} |")
    m = result["memory"]
    lines += [] if not m else ["", f"memory (resident growth after imports): unmerged model {m['unmerged_mb']:.0f} MB; plan of {m['plan_graphs']} graphs "
                  f"{m['plan_mb']:.0f} MB ({m['ratio']:.2f}x)" + (
                      f"; with prepacking off {m['plan_no_prepack_mb']:.0f} MB ({m['ratio_no_prepack']:.2f}x of the "
                      "unmerged model with prepacking)" if "plan_no_prepack_mb" in m else "")]
    if result["end_to_end"]:
        e = result["end_to_end"]
        s = e["seconds"]
        lines.append(f"end to end, {e['steps']} steps, {e['variant']}: {s['merged']:.2f} s vs unmerged "
                     f"{s['unmerged']:.2f} s ({e['speedup_vs_unmerged']:.2f}x) vs eager {s['eager torch']:.2f} s "
                     f"({e['speedup_vs_eager']:.2f}x)")
    if result.get("unmerged_prepack_off_slowdown"):
        lines.append(f"prepacking off slows the unmerged graph {result['unmerged_prepack_off_slowdown']:.2f}x "
                     "(same group, interleaved)")
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tome = [r for r in result["rows"] if r["variant"].startswith("tome ") and "no-prepack" not in r["variant"]]
    ratios = [float(r["variant"].split()[1]) for r in tome]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ratios, [r["speedup_vs_unmerged"] for r in tome], "o-", label="measured (onnxruntime CPU)")
    ax.plot(ratios, [r["flop_ideal_speedup"] for r in tome], "k--", label="FLOP-ideal")
    ax.set_xlabel("ToMe ratio")
    ax.set_ylabel("speed-up vs unmerged graph")
    ax.set_title(f"{result['arch']} {result['px']} px, {result['tokens']} tokens, batch {result['batch']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
