"""Per-forward speed of a plan through ``runtime.load``, as a pipeline calls it, against its peers.

    python benchmarks/runtime_peers.py --px 256 --layers 4 --ratios 0.3,0.5,0.7 --rounds 11
    python benchmarks/runtime_peers.py --px 512 --layers 2 --ratios 0.3,0.5,0.7 --rounds 11   # 1024 tokens

A ToMe plan of a DiT-XL/2-width slice (random weights, its first ``--layers`` blocks, the real width and
token count), one bucket per ratio and an unmerged one: one graph behind ``If(r == 0)``, one session.
``runtime.load`` with its defaults; each call is ``transformer(hidden_states, timestep=t, class_labels=y)``
with torch tensors and ``t`` inside the bucket, so the plan draws its partition, validates and converts as
in a generation. The peers, on the same inputs: tomesd at each ratio and the same locations (a fresh
model each), ``torch.compile`` of the eager model, and eager PyTorch.

Everything runs in one process, in interleaved rounds whose order reverses every round; a short pause
before each call lets the previous call's threads go idle (onnxruntime's may spin), so no call starts on
busy cores. Reported: medians and minima of wall time, CPU medians, speed-ups on both, and the plan's
FLOP-ideal speed-up per bucket (its manifest). Writes ``results/runtime_peers-<tokens>.json`` and a chart.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import interleaved, make_model  # noqa: E402
from peers import tomesd_call  # noqa: E402
from probe import machine  # noqa: E402

import runtime  # noqa: E402
from export.onnx_export import eager_forward, example_inputs  # noqa: E402

logger = logging.getLogger("runtime_peers")
RESULTS = Path(__file__).resolve().parent / "results"
PAUSE_S = 0.05  # idle gap before each timed call


def bucket_spec(ratios: list[float]) -> tuple[str, dict[float, int]]:
    """``--buckets`` text with one timestep span per ratio (highest ratio at the noisiest steps) and an
    unmerged last one, and a timestep inside each span."""
    spans = np.linspace(1000, 0, len(ratios) + 2).round().astype(int)
    parts, probe = [], {}
    for i, ratio in enumerate(sorted(ratios, reverse=True) + [0.0]):
        hi, lo = int(spans[i]) - 1, int(spans[i + 1])
        parts.append(f"{hi}-{lo}:{ratio:g}")
        probe[ratio] = (hi + lo) // 2
    return ",".join(parts), probe


def build(work: Path, px: int, layers: int, ratios: list[float], locations: str) -> Path:
    """The slice's plan under ``work`` (reused when its spec matches)."""
    from export.build import build_plan

    buckets, _ = bucket_spec(ratios)
    plan, stamp = work / "plan", work / "spec.json"
    spec = {"px": px, "layers": layers, "buckets": buckets, "locations": locations}
    if (plan / "plan.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == spec:
        return plan
    model, _ = make_model("dit-xl-2", px, layers)
    model.save_pretrained(work / "model" / "transformer")
    if plan.exists():
        import shutil

        shutil.rmtree(plan)
    build_plan(str(work / "model"), method="tome", buckets=buckets, locations=locations.split(","), out=plan,
               measure=False, progress=False)
    stamp.write_text(json.dumps(spec))
    return plan


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--px", type=int, default=256, help="image size: 256 -> 256 tokens, 512 -> 1024")
    p.add_argument("--layers", type=int, default=4, help="the first N of DiT-XL/2's 28 blocks")
    p.add_argument("--ratios", default="0.3,0.5,0.7")
    p.add_argument("--locations", default="attn,mlp")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--plan-only", action="store_true",
                   help="time only the plan's buckets (the FLOP-limit figures), with no torch peer in the process")
    p.add_argument("--workdir", default=None, help="where the plan is built (reused across runs)")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logger.setLevel(logging.INFO)
    ratios = [float(x) for x in args.ratios.split(",")]
    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    plan_dir = build(work, args.px, args.layers, ratios, args.locations)
    _, probe = bucket_spec(ratios)

    tf = runtime.load(plan_dir)
    model, grid = make_model("dit-xl-2", args.px, args.layers)
    inputs = example_inputs(model, 2, grid, seed=0)
    x, labels = inputs["hidden_states"], inputs["class_labels"]
    calls = {}
    for ratio in sorted(probe):
        t = torch.full((2,), float(probe[ratio]))
        calls["plan unmerged" if ratio == 0 else f"plan {ratio:g}"] = (lambda t=t: tf(x, timestep=t, class_labels=labels))
    eager_in = {**inputs, "timestep": torch.full((2,), float(probe[0.0]))}
    if not args.plan_only:
        calls["eager torch"] = lambda: eager_forward(model, eager_in)
    for ratio in [] if args.plan_only else ratios:
        peer = tomesd_call(make_model("dit-xl-2", args.px, args.layers)[0], eager_in, ratio, args.locations)
        if peer:
            calls[f"tomesd {ratio:g}"] = peer["tomesd"]
    if not (args.no_compile or args.plan_only):
        try:
            compiled = torch.compile(model)
            run = lambda: compiled(x, timestep=eager_in["timestep"], class_labels=labels)  # noqa: E731
            with torch.no_grad():
                run()
            calls["torch.compile"] = run
        except Exception as e:  # recorded, not fatal: where it works on this machine
            logger.warning("torch.compile failed: %s", str(e).splitlines()[0])
    logger.info("timing %s, %d rounds", ", ".join(calls), args.rounds)
    with torch.no_grad():
        wall, cpu = interleaved(calls, args.rounds, warmup=2, pause_s=PAUSE_S, alternate=True)
    stats = {k: {"median_ms": 1e3 * float(np.median(wall[k])), "min_ms": 1e3 * float(np.min(wall[k])),
                 "cpu_median_ms": 1e3 * float(np.median(cpu[k])), "rounds_ms": [round(1e3 * v, 2) for v in wall[k]]}
             for k in calls}
    flops = {b.ratio: b.flops_rel for b in tf.plan.buckets}

    def over(a: str, b: str) -> dict | None:
        if a not in stats or b not in stats:
            return None
        return {s: round(stats[a][f"{s}_ms"] / stats[b][f"{s}_ms"], 3) for s in ("median", "min", "cpu_median")}

    rows = []
    for ratio in sorted(ratios):
        name = f"plan {ratio:g}"
        ideal = 1 / flops[ratio] if flops.get(ratio) else None
        vs_unmerged = over("plan unmerged", name)
        rows.append({"ratio": ratio, "variant": name, **stats[name], "flop_ideal": ideal,
                     "vs_unmerged": vs_unmerged, "share_of_ideal": (round(vs_unmerged["median"] / ideal, 3)
                                                                    if ideal and vs_unmerged else None),
                     "vs_tomesd": over(f"tomesd {ratio:g}", name), "vs_torch_compile": over("torch.compile", name),
                     "vs_eager": over("eager torch", name)})
    result = {"machine": machine(), "model": {"arch": "DiT-XL/2 width, random weights", "layers": args.layers,
                                              "tokens": grid[0] * grid[1], "batch": 2, "locations": args.locations},
              "plan": {"buckets": [[b.t_lo, b.t_hi, b.ratio, b.r] for b in tf.plan.buckets],
                       "graphs": sorted({g for b in tf.plan.buckets for g in b.graphs.values()}),
                       "spinning": tf.spinning},
              "rounds": args.rounds, "pause_s": PAUSE_S,
              "command": "python benchmarks/runtime_peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "latency": stats, "rows": rows,
              "peers_vs_unmerged": {k: over(k, "plan unmerged") for k in stats if not k.startswith("plan")}}
    out = Path(args.results) / f"runtime_peers-{grid[0] * grid[1]}{'-plan' if args.plan_only else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    chart(result, out.with_suffix(".png"))
    print(table(result))
    if tmp is not None:
        tmp.cleanup()
    return result


def _x(d: dict | None) -> str:
    return f"{d['median']:.2f}x / {d['min']:.2f}x" if d else "-"


def table(result: dict) -> str:
    m, mod = result["machine"], result["model"]
    lines = [f"{mod['arch']}, {mod['layers']} blocks, {mod['tokens']} tokens, batch {mod['batch']}, ToMe on "
             f"{mod['locations']}; {m['cpu']}, {m['cores']} cores, load {m['load_average'][0]}, onnxruntime "
             f"{m['onnxruntime']}, torch {m['torch']}, {m['date']}; {result['rounds']} rounds, through runtime.load "
             f"(spinning {result['plan']['spinning']})", "",
             "| variant | median / min / CPU ms | vs unmerged bucket (median / min) | share of FLOP-ideal | vs tomesd | "
             "vs torch.compile | vs eager |", "|---|---|---|---|---|---|---|"]
    s = result["latency"]["plan unmerged"]
    lines.append(f"| plan, unmerged bucket | {s['median_ms']:.1f} / {s['min_ms']:.1f} / {s['cpu_median_ms']:.1f} | | | | "
                 f"{_x(result['peers_vs_unmerged'].get('torch.compile'))} | {_x(result['peers_vs_unmerged'].get('eager torch'))} |")
    for r in result["rows"]:
        share = f"{100 * r['share_of_ideal']:.0f} % of {r['flop_ideal']:.2f}x" if r["share_of_ideal"] else "-"
        lines.append(f"| plan {r['ratio']:g} | {r['median_ms']:.1f} / {r['min_ms']:.1f} / {r['cpu_median_ms']:.1f} | "
                     f"{_x(r['vs_unmerged'])} | {share} | {_x(r['vs_tomesd'])} | {_x(r['vs_torch_compile'])} | "
                     f"{_x(r['vs_eager'])} |")
    for k, s in result["latency"].items():
        if not k.startswith("plan"):
            lines.append(f"| {k} | {s['median_ms']:.1f} / {s['min_ms']:.1f} / {s['cpu_median_ms']:.1f} | | | | | |")
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ratios = [r["ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for key, label in (("vs_unmerged", "vs its unmerged bucket"), ("vs_tomesd", "vs tomesd (same ratio)"),
                       ("vs_torch_compile", "vs torch.compile")):
        pts = [(q, r[key]["median"]) for q, r in zip(ratios, rows) if r[key]]
        if pts:
            ax.plot(*zip(*pts), "o-", label=label)
    ax.plot(ratios, [r["flop_ideal"] for r in rows], "k--", label="FLOP-ideal (vs unmerged)")
    ax.set_xlabel("ToMe ratio")
    ax.set_ylabel("speed-up of the plan's bucket (medians)")
    ax.set_title(f"through runtime.load, {result['model']['tokens']} tokens, {result['model']['layers']} blocks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
