"""The tuner on the bundled model: the speed-quality frontier of each method and the plan each target gives.

For each method (cache; tome where its graph takes r from a shape) the first target runs a cold search (the
graphs are built, latencies measured, reference images generated: this is the "< 10 minutes on 2 cores"
figure); the others reuse the same work directory, so they add only the schedules their path needs. Writes
``benchmarks/results/tune_frontier.json`` (every schedule tried, per target the chosen plan with its held-out
quality, predicted and measured speed-up, seconds) and ``tune_frontier.png``.

    python benchmarks/tune_frontier.py                       # defaults: 12 samples, 20 steps, cache
    python benchmarks/tune_frontier.py --methods cache,tome --samples 12 --steps 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ({"target_psnr": 25.0}, {"target_psnr": 30.0}, {"target_psnr": 35.0}, {"target_ssim": 0.9},
           {"target_fid_increase": 0.05})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="cache", help="comma-separated; other methods already in --out are kept")
    p.add_argument("--targets", default="all", help="'all' or 'psnr': the PSNR targets only")
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(RESULTS / "tune_frontier.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    from export.__main__ import quiet_third_party
    from export.tune import tune_plan
    from passes.errors import DitmergeError

    quiet_third_party()
    root = Path(tempfile.mkdtemp(prefix="tune_frontier_"))
    results: dict = {"model": "bundled:tiny-dit", "samples": args.samples, "heldout_samples": args.samples,
                     "steps": args.steps, "guidance": 4.0, "buckets": 3, "cpu_count": os.cpu_count(),
                     "date": time.strftime("%Y-%m-%d"), "methods": {}}
    try:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            runs, table = [], {}
            for i, target in enumerate(TARGETS if args.targets == "all" else [t for t in TARGETS if "target_psnr" in t]):
                t0 = time.perf_counter()
                try:
                    m = tune_plan(model="bundled:tiny-dit", method=method, out=root / f"{method}_{i}",
                                  work_dir=root / f"{method}_work", keep_work=True, samples=args.samples,
                                  steps=args.steps, repeats=args.repeats, progress=False, **target)
                except DitmergeError as e:
                    runs.append({"target": target, "error": str(e), "seconds": time.perf_counter() - t0})
                    print(f"{method} {target}: {e}")
                    if i == 0 and "graph" in str(e):
                        break  # the method cannot be tuned here (ToMe before r-from-shapes)
                    continue
                t = m["report"]["tune"]
                for r in t["table"]:
                    table[r["schedule"]] = {k: r[k] for k in ("schedule", "quality", "predicted_speedup")}
                run = {"target": target, "schedule": t["schedule"], "calibration": _q(t["calibration"]),
                       "heldout": {**_q(t["heldout"]), "meets_target": t["heldout"]["meets_target"]},
                       "predicted_speedup": t["predicted_speedup"], "measured_speedup": t["measured_speedup"],
                       "evaluations": t["evaluations"], "generated": t["evaluations_run"],
                       "reused": t["evaluations_reused"], "seconds": time.perf_counter() - t0}
                runs.append(run)
                print(f"{method} {target}: {' '.join(f'{k}={v}' for k, v in t['schedule'].items())} | calib "
                      f"{run['calibration']['psnr_db']:.2f} dB / {run['calibration']['ssim']:.4f} | held-out "
                      f"{run['heldout']['psnr_db']:.2f} dB / {run['heldout']['ssim']:.4f} "
                      f"({'meets' if run['heldout']['meets_target'] else 'MISSES'}) | predicted "
                      f"{run['predicted_speedup']:.2f}x measured {run['measured_speedup']:.2f}x | "
                      f"{run['generated']} generated, {run['reused']} reused, {run['seconds']:.0f} s")
            table.update(_recorded(root / f"{method}_work" / "search.json", table))
            results["methods"][method] = {"runs": runs, "schedules": sorted(table.values(),
                                                                             key=lambda r: -r["predicted_speedup"])}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if Path(args.out).is_file():  # keep the other methods' figures of an earlier run
        earlier = json.loads(Path(args.out).read_text()).get("methods", {})
        results["methods"] = {**{k: v for k, v in earlier.items() if k not in results["methods"]}, **results["methods"]}
    Path(args.out).write_text(json.dumps(results, indent=1))
    plot(results, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")


def _recorded(path: Path, known: dict) -> dict:
    """Schedules in the search record that no written plan's table holds (searches that ended in an error)."""
    if not path.is_file():
        return {}
    rec = json.loads(path.read_text())
    lat, over = rec["latency_s"], rec["overhead_s"]
    base = len(next(iter(rec["evaluations"].values()))["calls"]) * (over + lat[rec["base_key"]]) if rec["evaluations"] else 1
    out = {}
    for e in rec["evaluations"].values():
        name = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in e["values"].items())
        if name in known or e.get("signature") is None:
            continue
        pred = len(e["signature"]) * over + sum(lat[s.split("|", 2)[2]] for s in e["signature"])
        out[name] = {"schedule": name, "quality": e["quality"], "predicted_speedup": base / pred}
    return out


def _q(q: dict) -> dict:
    out = {"psnr_db": q["psnr_db"]["mean"], "psnr_db_worst": q["psnr_db"]["worst"], "ssim": q["ssim"]["mean"]}
    if "fid" in q:
        out.update(fid=q["fid"], fid_unmerged=q["fid_unmerged"], fid_increase=q["fid_increase"])
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for c, (method, res) in enumerate(results["methods"].items()):
        rows = [r for r in res["schedules"] if r["quality"]["psnr_db"]["mean"] != float("inf")]
        ax.plot([r["predicted_speedup"] for r in rows], [r["quality"]["psnr_db"]["mean"] for r in rows], "o",
                color=f"C{c}", alpha=0.35, label=f"{method}: schedules tried")
        front, best = [], float("-inf")
        for r in sorted(rows, key=lambda r: -r["predicted_speedup"]):
            if r["quality"]["psnr_db"]["mean"] > best:
                front.append(r)
                best = r["quality"]["psnr_db"]["mean"]
        ax.plot([r["predicted_speedup"] for r in front], [r["quality"]["psnr_db"]["mean"] for r in front], "-",
                color=f"C{c}", lw=1)
        ok = [r for r in res["runs"] if "schedule" in r]
        ax.plot([r["predicted_speedup"] for r in ok], [r["heldout"]["psnr_db"] for r in ok], "*", ms=12,
                color=f"C{c}", mec="k", label=f"{method}: chosen per target (held-out PSNR)")
    ax.set_xlabel("predicted end-to-end speed-up vs unmerged plan")
    ax.set_ylabel("PSNR vs unmerged images (dB, mean)")
    ax.set_title(f"bundled tiny-dit, {results['samples']} seeds, {results['steps']} DDIM steps", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
