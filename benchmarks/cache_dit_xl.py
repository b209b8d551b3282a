"""Per-step speed of step caching on DiT-XL/2 (random weights, public config, batch 2), interleaved.

    python benchmarks/cache_dit_xl.py --layers 4 --repeats 5 --steps 25
    python benchmarks/cache_dit_xl.py --layers 28 --span 1-27      # the whole model (heavy: ~3 s a forward)

Exports DiT-XL/2 (or its first ``--layers`` blocks at full width, when the whole model is too heavy for the
machine), builds the cache method's full and cached graphs, times unmerged / full / cached forwards
round-robin (medians), and counts for each schedule which steps of a ``--steps``-step DDIM run are full
and which cached (with the runtime's own policy), giving the schedule's average per-step speed-up
against the unmerged graph. Writes ``benchmarks/results/cache_dit_xl.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.measure import feed_of, interleaved_latency  # noqa: E402
from export.onnx_export import WEIGHTS_FILE, example_inputs, export_onnx  # noqa: E402
from passes.cache import CacheConfig, CachePass  # noqa: E402
from passes.cleanup import FreeTokenAxisPass, RemoveNoopSqueezePass  # noqa: E402
from passes.infra import PassManager  # noqa: E402
from passes.onnxutil import save_checked  # noqa: E402
from runtime.policies import GenState  # noqa: E402
from passes.cache.variants import CACHED  # noqa: E402
from runtime.policies.cache import CachePolicy  # noqa: E402
from runtime.runners import OrtRunner, SharedWeights  # noqa: E402

logger = logging.getLogger("cache_dit_xl")

# (name, interval, full_above): the schedules of benchmarks/cache_table.py
SCHEDULES = (("every 2", 2, -1), ("every 3", 3, -1), ("t>900 full, then every 3", 3, 900),
             ("t>900 full, then every 2", 2, 900))


def schedule_counts(steps: int, interval: int, full_above: int) -> tuple[int, int]:
    """Full and cached steps of a ``steps``-step DDIM run under the runtime policy."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler()
    sched.set_timesteps(steps)
    bucket = SimpleNamespace(index=0, graphs={"main": "", CACHED: ""},
                             meta={"span": [1, 2], "interval": interval, "full_above": full_above, "adaptive": 0.0})
    plan = SimpleNamespace(record=SimpleNamespace(model=SimpleNamespace(grid=[16, 16]),
                                                  method=SimpleNamespace(name="cache", params={})), buckets=[bucket])
    policy, state = CachePolicy(plan), GenState(seed=0, rng=np.random.default_rng(0))
    policy.start(state)
    full = 0
    for t in sched.timesteps:
        state.t = float(t)
        variant, _ = policy.select(state, bucket, 2)
        if variant == "main":
            full += 1
            policy.update(state, bucket, variant, {"cache_residual_out.image": np.zeros(1)})
        state.steps += 1
    return full, steps - full


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4, help="blocks of DiT-XL/2 to keep (28: the whole model)")
    p.add_argument("--span", default=None, help="blocks cached, START-END inclusive (default: 1 to the last: F1B0)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "cache_dit_xl.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch
    from diffusers import DiTTransformer2DModel

    from bench import DIT_XL_2

    torch.manual_seed(0)
    model = DiTTransformer2DModel(sample_size=32, **{**DIT_XL_2, "num_layers": args.layers}).eval()
    grid = (16, 16)
    start, end = (1, args.layers) if args.span is None else (int(args.span.split("-")[0]), int(args.span.split("-")[1]) + 1)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        t0 = time.time()
        export_onnx(model, d / "base.onnx", grid)
        base = onnx.load(d / "base.onnx", load_external_data=False)
        base = PassManager([RemoveNoopSqueezePass(), FreeTokenAxisPass(256)])(base).model
        save_checked(base, d / "base.onnx")
        for variant in ("full", "cached"):
            save_checked(CachePass(CacheConfig(variant, start, end))(base).model, d / f"{variant}.onnx")
        logger.info("exported in %.0f s", time.time() - t0)
        weights = SharedWeights(d / WEIGHTS_FILE)
        runners = {n: OrtRunner(d / f"{n}.onnx", ["CPUExecutionProvider"], weights, args.threads)
                   for n in ("base", "full", "cached")}
        inputs = feed_of(example_inputs(model, 2, grid, seed=0))
        res = np.zeros((2, 256, 1152), np.float32)
        feeds = {"base": inputs, "full": inputs, "cached": {**inputs, "cache_residual.image": res}}
        lat = interleaved_latency({n: (lambda n=n: runners[n].infer(feeds[n])) for n in runners}, repeats=args.repeats,
                                  warmup=1)
    ms = {k: v * 1e3 for k, v in lat.items()}
    rows = []
    for name, interval, above in SCHEDULES:
        full, cached = schedule_counts(args.steps, interval, above)
        per_step = (full * ms["full"] + cached * ms["cached"]) / args.steps
        rows.append({"schedule": name, "full_steps": full, "cached_steps": cached, "per_step_ms": per_step,
                     "speedup": ms["base"] / per_step})
    out = {"layers": args.layers, "span": [start, end - 1], "steps": args.steps, "repeats": args.repeats,
           "latency_ms": ms, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"DiT-XL/2 width, {args.layers} blocks, blocks {start}-{end - 1} cached, batch 2, 256 tokens; "
          f"unmerged {ms['base']:.1f} ms, full {ms['full']:.1f} ms, cached {ms['cached']:.1f} ms "
          f"(medians of {args.repeats} interleaved rounds)\n")
    print(f"| schedule | full / cached steps of {args.steps} | mean ms per step | per-step speed-up |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['schedule']} | {r['full_steps']} / {r['cached_steps']} | {r['per_step_ms']:.1f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
