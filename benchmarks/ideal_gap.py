"""Where a merged graph loses against its FLOP-ideal speed-up: onnxruntime's node profile, op type by op type.

    python benchmarks/bench.py --arch dit-xl-2 --px 256 --layers 4 --ratios 0.5 --export-only --workdir W
    python benchmarks/ideal_gap.py --workdir W --ratio 0.5

For base.onnx and ``tome_<ratio>.onnx`` (as bench.py writes them), each op type's milliseconds per forward
(the median of each node over ``--forwards`` profiled forwards after one warm-up, summed; the two
graphs' forwards interleaved), and against the ideal (base ms x the FLOP ratio counted from the graphs)
what each op type costs beyond it. Ops of the inserted ToMe nodes are starred; the share the merged graph
would reach were they free bounds what any cheaper merge subgraph can buy. Sessions spin as a plan's one
session does (``--no-spinning``: as OrtRunner's default for many sessions), each forward after a pause.
Writes ``results/ideal_gap-<tokens>-<ratio>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ort_profile import session  # noqa: E402

from passes.flops import count_flops  # noqa: E402
from passes.onnxutil import graph_grid  # noqa: E402
from runtime.ort_optimize import disabled_optimizers  # noqa: E402
from runtime.runners import SharedWeights  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PAUSE_S = 0.05  # idle gap before each forward when sessions spin


def node_profiles(paths: list[Path], weights: SharedWeights, feeds: list[dict], forwards: int,
                  spinning: bool = True) -> list[tuple[Counter, float]]:
    """Per graph: ms per forward by op type (inserted ToMe ops starred) and the median whole-run ms; the
    graphs' forwards interleave, so drift on a shared machine hits them alike.

    ``spinning`` (a plan's one session has it): each forward then waits ``PAUSE_S`` first, so the other
    session's threads have stopped spinning when it starts."""
    disabled = disabled_optimizers(["CPUExecutionProvider"])  # the fusions OrtRunner's sessions run
    sessions = [session(p, weights, disabled, profiling=True, spinning=spinning) for p in paths]
    feeds = [{k: v for k, v in f.items() if k in {i.name for i in s.get_inputs()}} for s, f in zip(sessions, feeds)]
    for _ in range(forwards + 1):
        for s, f in zip(sessions, feeds):
            if spinning:
                time.sleep(PAUSE_S)
            s.run(None, f)
    out = []
    for s in sessions:
        prof = Path(s.end_profiling())
        events = json.loads(prof.read_text())
        prof.unlink()
        runs = [e for e in events if e.get("name") == "model_run"]
        first = runs[1]["ts"]  # the warm-up's nodes are left out
        per_node: dict[str, list] = defaultdict(list)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
                op = e["args"].get("op_name", "?") + ("*" if "ditmerge_tome" in e["name"] else "")
                per_node[e["name"]].append((op, e["dur"] / 1e3))
        by_op: Counter = Counter()
        for samples in per_node.values():
            by_op[samples[0][0]] += float(np.median([d for _, d in samples]))
        out.append((by_op, float(np.median([e["dur"] for e in runs[1:]])) / 1e3))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="bench.py's --workdir (base.onnx, tome_<ratio>.onnx, feeds.npz)")
    p.add_argument("--ratio", default="0.5")
    p.add_argument("--forwards", type=int, default=9)
    p.add_argument("--no-spinning", action="store_true",
                   help="sessions' idle threads sleep (OrtRunner's default where many sessions share the cores)")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    work = Path(args.workdir)
    merged_path = work / f"tome_{args.ratio}.onnx"
    if not merged_path.exists():
        raise SystemExit(f"{merged_path} is missing: run bench.py --export-only --ratios {args.ratio} first")
    weights = SharedWeights(work / "weights.bin")
    data = np.load(work / "feeds.npz")
    feeds = {kind: {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(kind + "/")}
             for kind in ("base", "merged")}
    (base, base_run), (merged, merged_run) = node_profiles([work / "base.onnx", merged_path], weights,
                                                           [feeds["base"], feeds["merged"]], args.forwards,
                                                           spinning=not args.no_spinning)
    base_model = onnx.load(work / "base.onnx", load_external_data=False)
    flop_ratio = count_flops(onnx.load(merged_path, load_external_data=False)) / count_flops(base_model)
    ideal = sum(base.values()) * flop_ratio
    rows = []
    for op in sorted(set(base) | set(merged), key=lambda o: -(merged.get(o, 0) - base.get(o, 0) * flop_ratio)):
        b, m = base.get(op, 0.0), merged.get(op, 0.0)
        rows.append({"op": op, "base_ms": round(b, 3), "merged_ms": round(m, 3), "beyond_ideal_ms": round(m - b * flop_ratio, 3)})
    result = {"workdir": str(work), "ratio": float(args.ratio), "spinning": not args.no_spinning, "flop_ratio": flop_ratio,
              "base_kernel_ms": sum(base.values()), "merged_kernel_ms": sum(merged.values()), "ideal_kernel_ms": ideal,
              "base_run_ms": base_run, "merged_run_ms": merged_run, "rows": rows,
              "command": "python benchmarks/ideal_gap.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    # an upper bound on any cheaper merge subgraph: the inserted nodes free, the ideal still counting their FLOPs
    inserted = sum(v for op, v in merged.items() if op.endswith("*"))
    result["inserted_ms"] = inserted
    result["share_if_inserted_free"] = ideal / (result["merged_kernel_ms"] - inserted)
    grid = graph_grid(base_model)
    out = Path(args.results) / f"ideal_gap-{grid[0] * grid[1]}-{args.ratio}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"kernels: base {result['base_kernel_ms']:.1f} ms, merged {result['merged_kernel_ms']:.1f} ms, ideal "
          f"{ideal:.1f} ms (FLOPs x {flop_ratio:.3f}): {result['merged_kernel_ms'] - ideal:+.1f} ms; share of the "
          f"FLOP-ideal speed-up {ideal / result['merged_kernel_ms']:.0%}; the inserted nodes {inserted:.1f} ms: were they "
          f"free, at most {result['share_if_inserted_free']:.0%}\n")
    print("| op (* inserted) | base ms | merged ms | beyond ideal ms |\n|---|---|---|---|")
    for r in rows:
        if abs(r["beyond_ideal_ms"]) >= 0.3:
            print(f"| {r['op']} | {r['base_ms']:.2f} | {r['merged_ms']:.2f} | {r['beyond_ideal_ms']:+.2f} |")
    return result


if __name__ == "__main__":
    main()
