"""Speed of ToMe bucket graphs against the unmerged graph, eager PyTorch and the FLOP limit.

    python benchmarks/bench.py --arch dit-xl-2 --px 256 --ratios 0.1,0.2,0.3,0.4,0.5,0.6,0.7
    python benchmarks/bench.py --arch bundled --ratios 0.3,0.5

Everything in one process (memory in fresh child processes), interleaved runs, medians. Writes
``RESULTS/<arch>-<px>.json`` and ``.png`` and prints a markdown table. Speed-ups are ratios of two
latencies measured in the same run; the FLOP-ideal ratio is counted from the graphs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_report import chart, table  # the report half of this script
from peers import tomesd_call
from export.measure import feed_of, interleaved_latency
from export.onnx_export import WEIGHTS_FILE, eager_forward, example_inputs, export_onnx
from passes.cleanup import FreeTokenAxisPass, RemoveNoopSqueezePass
from passes.flops import count_flops
from passes.infra import PassManager
from passes.onnxutil import get_model_meta, save_checked
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, draw_partition
from passes.tome import ToMeConfig, ToMePass
from runtime.runners import OrtRunner, SharedWeights

logger = logging.getLogger("bench")
COPY = "(ort copy)"  # suffix of a variant run through the graph's onnxruntime-only copy

from probe import DIT_XL_2, run_probe  # noqa: E402 (DIT_XL_2: imported from here by other benchmarks)


def make_model(arch: str, px: int, layers: int = 0) -> tuple[torch.nn.Module, tuple[int, int]]:
    """The model benchmarked; ``layers``: the first blocks of DiT-XL/2 only (its width and token count)."""
    from diffusers import DiTTransformer2DModel

    if arch == "dit-xl-2":
        torch.manual_seed(0)
        latent = px // 8
        model = DiTTransformer2DModel(sample_size=latent, **{**DIT_XL_2, **({"num_layers": layers} if layers else {})}).eval()
        return model, (latent // 2, latent // 2)
    if arch == "builtin":
        from export.load import BUILTIN_TINY, load_transformer

        return load_transformer(BUILTIN_TINY), (16, 16)
    if arch == "bundled":
        from export.load import BUNDLED, load_transformer

        model = load_transformer(BUNDLED)
        return model, (16, 16)
    raise SystemExit(f"unknown --arch {arch!r}: dit-xl-2, bundled or builtin")


def matching_share(graph: Path, feed: dict, weights: SharedWeights) -> tuple[float, dict[str, float]]:
    """Share of one forward spent in the inserted ToMe nodes, and their milliseconds per forward by op type,
    from onnxruntime's node profile (3 forwards)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(graph.with_suffix(""))
    keep = weights.initializers(onnx.load(graph, load_external_data=False))
    for name, value in keep.items():
        opts.add_initializer(name, value)
    sess = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    total = sum(e["dur"] for e in nodes)
    mine = [e for e in nodes if e["name"].startswith("ditmerge_tome")]
    by_op: dict[str, float] = {}
    for e in mine:
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + e["dur"] / 3e3  # microseconds over 3 forwards -> ms per forward
    tome = sum(e["dur"] for e in mine)
    return (tome / total if total else float("nan")), dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


PROBE = """
import onnx, numpy as np
from pathlib import Path
from runtime.runners import OrtRunner, SharedWeights
w = SharedWeights(Path({weights!r}))
before = rss_kb()
runners = [OrtRunner(Path(g), ["CPUExecutionProvider"], w, prepack={prepack!r}) for g in {graphs!r}]
feed = dict(np.load({feed!r}))
for r in runners:
    r.activate()
    r.infer({{k: v for k, v in feed.items() if k in r.input_meta}})
print(rss_kb() - before)
"""


def peak_rss_mb(graphs: list[Path], weights: Path, feed: dict, prepack: bool = True) -> float:
    """Resident memory growth of a fresh process that loads ``graphs`` as sessions sharing ``weights`` and
    runs each once (from after the imports, so the interpreter and libraries do not count)."""
    with tempfile.NamedTemporaryFile(suffix=".npz", delete=False) as f:
        np.savez(f, **feed)
    out = run_probe(PROBE.format(weights=str(weights), graphs=[str(g) for g in graphs], feed=f.name, prepack=prepack))
    os.unlink(f.name)
    return int(out) / 1024


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="dit-xl-2", help="dit-xl-2 (random weights, public config) or bundled")
    p.add_argument("--px", type=int, default=256, help="image size of dit-xl-2: 256 -> 256 tokens, 512 -> 1024")
    p.add_argument("--ratios", default="0.5", help="ToMe ratios to benchmark, comma-separated")
    p.add_argument("--locations", default="attn,mlp")
    p.add_argument("--layers", type=int, default=0, help="dit-xl-2: time only its first N blocks (0: all 28)")
    p.add_argument("--batch", type=int, default=2, help="2 = one image with classifier-free guidance")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--e2e-steps", type=int, default=10, help="denoising steps of the end-to-end comparison (0: skip)")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile of the eager model")
    p.add_argument("--tomesd", action="store_true",
                   help="also time tomesd (if installed) at the largest ratio, same locations, on the eager model")
    p.add_argument("--ort-copy", action="store_true",
                   help="also time every graph through its onnxruntime-only copy (runtime/ort_optimize.py)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    p.add_argument("--match-every", type=int, default=1,
                   help="also time ToMe graphs whose blocks share one matching per K blocks (-o match_every=K)")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--no-prepack", action="store_true",
                   help="also time every graph with onnxruntime's weight prepacking off (shares one weight copy)")
    p.add_argument("--results", default=str(Path(__file__).parent / "results"))
    p.add_argument("--workdir", default=None, help="where graphs are written (default: a temp dir)")
    p.add_argument("--reuse-export", action="store_true", help="reuse base.onnx already exported in --workdir")
    p.add_argument("--export-only", action="store_true",
                   help="export and write the merged graphs into --workdir, then stop (time them later)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    ratios = [float(r) for r in args.ratios.split(",")]
    model, grid = make_model(args.arch, args.px, args.layers)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ditmerge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.reuse_export and (work / "base.onnx").exists():
        base = onnx.load(work / "base.onnx", load_external_data=False)
    else:
        export_onnx(model, work / "base.onnx", grid)
        base = onnx.load(work / "base.onnx", load_external_data=False)
        base = PassManager([RemoveNoopSqueezePass(), FreeTokenAxisPass(grid[0] * grid[1])])(base).model
        save_checked(base, work / "base.onnx")
        logger.info("exported %s at %dx%d tokens in %.0f s", args.arch, *grid, time.perf_counter() - t0)
    graphs, metas = {"base": work / "base.onnx"}, {}
    for r in ratios:
        res = ToMePass(ToMeConfig(r, locations=tuple(args.locations.split(","))))(base)
        save_checked(res.model, work / f"tome_{r}.onnx")
        graphs[f"tome {r}"], metas[f"tome {r}"] = work / f"tome_{r}.onnx", json.loads(get_model_meta(res.model)["tome"])
        if args.match_every > 1:
            key = f"match_every={args.match_every} {r}"
            res = ToMePass(ToMeConfig(r, locations=tuple(args.locations.split(",")), match_every=args.match_every))(base)
            save_checked(res.model, work / f"tome_{r}_m{args.match_every}.onnx")
            graphs[key], metas[key] = work / f"tome_{r}_m{args.match_every}.onnx", json.loads(
                get_model_meta(res.model)["tome"])
    inputs = example_inputs(model, args.batch, grid, seed=0)
    feed = feed_of(inputs)
    part, inv = draw_partition(grid, rng=np.random.default_rng(0))
    merged_feed = {**feed, PARTITION_INPUT: part, PARTITION_INV_INPUT: inv}
    feeds = work / "feeds.npz"  # what ideal_gap.py feeds the graphs
    np.savez(feeds, **{f"base/{k}": v for k, v in feed.items()}, **{f"merged/{k}": v for k, v in merged_feed.items()})
    if args.export_only:
        logger.info("wrote %s and %s", ", ".join(str(g) for g in graphs.values()), feeds)
        return {}
    flops = {k: count_flops(onnx.load(g, load_external_data=False)) for k, g in graphs.items()}
    # Memory first, in fresh child processes, so nothing this process loaded counts.
    # a plan as `python -m export` writes it: the unmerged graph and three merged buckets (the largest ratios)
    plan_graphs = [graphs["base"]] + [graphs[f"tome {r}"] for r in sorted(ratios)[-3:]]
    mem = {} if args.no_memory else {"unmerged_mb": peak_rss_mb([graphs["base"]], work / WEIGHTS_FILE, feed),
           "plan_mb": peak_rss_mb(plan_graphs, work / WEIGHTS_FILE, merged_feed),
           "plan_graphs": len(plan_graphs)}
    if mem:
        mem["ratio"] = mem["plan_mb"] / mem["unmerged_mb"] if mem["unmerged_mb"] > 0 else float("nan")
    if mem and args.no_prepack:
        mem["plan_no_prepack_mb"] = peak_rss_mb(plan_graphs, work / WEIGHTS_FILE, merged_feed, prepack=False)
        mem["ratio_no_prepack"] = mem["plan_no_prepack_mb"] / mem["unmerged_mb"]

    best = max(ratios)
    variants = {k: (str(g), True, False) for k, g in graphs.items()}
    if args.ort_copy:
        variants.update({f"{k} {COPY}": (str(g), True, True) for k, g in graphs.items()})
    if args.no_prepack:
        variants.update({f"{k} no-prepack": (str(graphs[k]), False, False) for k in ("base", f"tome {best}")})
    # Every group is timed interleaved against the unmerged graph in a fresh child process: onnxruntime
    # sessions that have run keep memory in the heap after they close, and a seven-ratio DiT-XL/2 sweep in
    # one process was OOM-killed at 24 GB. Each speed-up is still a ratio of two medians from one process.
    copies = lambda k: ([f"{k} {COPY}"] if args.ort_copy else []) + (
        [f"match_every={args.match_every} {k.split()[1]}"] if args.match_every > 1 and k.startswith("tome ") else [])
    groups = [[f"tome {r}", *copies(f"tome {r}")] for r in ratios if r != best]
    groups.append([f"tome {best}", *copies(f"tome {best}"), "eager torch"] + (["tomesd"] if args.tomesd else [])
                  + (["torch.compile"] if args.torch_compile else []))
    if args.no_prepack:
        groups.append(["base no-prepack", f"tome {best} no-prepack"])
    lat: dict[str, float] = {}
    lat_min: dict[str, float] = {}
    lat_cpu: dict[str, float] = {}
    pair_base: dict[str, float] = {}  # the unmerged graph's median in the same group (its copy for a copy)
    pair_min: dict[str, float] = {}
    pair_cpu: dict[str, float] = {}
    shares: dict[str, float] = {}
    prepack_cost = None  # unmerged latency with prepacking off / on, same group
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"{args.arch}-{args.px}{f'-{args.layers}blocks' if args.layers else ''}{'-' + args.tag if args.tag else ''}"
    partial = stem.with_suffix(".partial.json")
    for group in groups:
        logger.info("timing %s against the unmerged graph, %d interleaved repeats", ", ".join(group), args.repeats)
        keys = list(dict.fromkeys(["base", *copies("base"), *group]
                                  + (["base no-prepack"] if f"tome {best} no-prepack" in group else [])))
        spec = {"variants": {k: variants[k] for k in keys if k in variants}, "weights": str(work / WEIGHTS_FILE),
                "feeds": str(feeds), "repeats": args.repeats, "order": keys,
                "eager": [args.arch, args.px, args.batch, args.layers] if "eager torch" in group else None,
                "compile": "torch.compile" in group, "profile": [k for k in group if k in metas],
                "tomesd": [best, args.locations] if "tomesd" in group else None}
        got = in_child(_time_group, spec)
        for k in keys:
            if k not in got["latency"]:
                continue  # torch.compile or tomesd failed or missing: logged by the child
            lat[k], lat_min[k], lat_cpu[k] = got["latency"][k], got["min"][k], got["cpu"][k]
            ref = "base no-prepack" if k.endswith("no-prepack") else f"base {COPY}" if k.endswith(COPY) else "base"
            pair_base[k], pair_min[k], pair_cpu[k] = got["latency"][ref], got["min"][ref], got["cpu"][ref]
        shares.update(got["matching_share"])
        if "base no-prepack" in got["latency"]:
            prepack_cost = got["latency"]["base no-prepack"] / got["latency"]["base"]
        # an interrupted sweep keeps the groups it finished
        partial.write_text(json.dumps({"latency_s": lat, "paired_unmerged_s": pair_base}, indent=1))

    rows = []
    for k in ["base", *(k for k in variants if k != "base")]:
        g = k.removesuffix(" no-prepack").removesuffix(f" {COPY}")
        ideal = flops["base"] / flops[g]
        speed = pair_base[k] / lat[k]
        rows.append({"variant": k, "latency_ms": lat[k] * 1e3, "latency_min_ms": lat_min[k] * 1e3,
                     "cpu_ms": lat_cpu[k] * 1e3, "unmerged_ms": pair_base[k] * 1e3,
                     "speedup_vs_unmerged": speed, "speedup_vs_unmerged_min": pair_min[k] / lat_min[k],
                     "speedup_vs_unmerged_cpu": pair_cpu[k] / lat_cpu[k],
                     "flops_rel": flops[g] / flops["base"], "flop_ideal_speedup": ideal,
                     "share_of_flop_ideal": speed / ideal, "r": metas.get(g, {}).get("r", 0)})
        if k in shares:  # profiled with prepacking on
            rows[-1]["matching_share"], rows[-1]["matching_ms_by_op"] = shares[k]
        if k == f"tome {best}":  # timed in the eager group
            rows[-1]["speedup_vs_eager"] = lat["eager torch"] / lat[k]
            rows[0]["speedup_vs_eager"] = lat["eager torch"] / pair_base[k]
            for peer in ("tomesd", "torch.compile"):
                if peer in lat:
                    rows[-1][f"speedup_vs_{peer}"] = lat[peer] / lat[k]
                    rows[-1][f"speedup_vs_{peer}_min"] = lat_min[peer] / lat_min[k]
    for k in ("eager torch", "tomesd", "torch.compile"):
        if k in lat:
            rows.append({"variant": k, "latency_ms": lat[k] * 1e3, "latency_min_ms": lat_min[k] * 1e3,
                         "cpu_ms": lat_cpu[k] * 1e3, "unmerged_ms": pair_base[k] * 1e3,
                         "speedup_vs_unmerged": pair_base[k] / lat[k],
                         "speedup_vs_unmerged_min": pair_min[k] / lat_min[k],
                         "speedup_vs_unmerged_cpu": pair_cpu[k] / lat_cpu[k]})

    weights = SharedWeights(work / WEIGHTS_FILE)
    runners = {k: OrtRunner(graphs[k], ["CPUExecutionProvider"], weights) for k in ("base", f"tome {best}")}
    e2e = {}
    if args.e2e_steps:
        e2e = end_to_end(model, runners, f"tome {best}", feed, merged_feed, args.e2e_steps, args.repeats)

    result = {"arch": args.arch, "px": args.px, "tokens": grid[0] * grid[1], "batch": args.batch,
              "layers": args.layers or None, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python benchmarks/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"load {os.getloadavg()[0]:.1f}, onnxruntime CPU fp32",
              "rows": rows, "memory": mem, "end_to_end": e2e, "repeats": args.repeats,
              "unmerged_prepack_off_slowdown": prepack_cost}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    partial.unlink(missing_ok=True)
    chart(result, stem.with_suffix(".png"))
    print(table(result))
    return result


def in_child(fn, spec: dict) -> dict:
    """``fn(spec)`` in a fresh process, so the memory its sessions held goes back to the system when it exits."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, spec).result()


def _time_group(spec: dict) -> dict:
    """One interleaved timing group (child process): medians per variant and the profiled matching shares."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = np.load(spec["feeds"])
    feeds = {"base": {}, "merged": {}}
    for name in data.files:
        kind, _, key = name.partition("/")
        feeds[kind][key] = data[name]
    weights = SharedWeights(Path(spec["weights"]))
    runners = {k: OrtRunner(Path(g), ["CPUExecutionProvider"], weights, prepack=pre, optimize=opt)
               for k, (g, pre, opt) in spec["variants"].items()}
    calls = {k: (lambda rn=rn, k=k: rn.infer(feeds["base" if k.startswith("base") else "merged"]))
             for k, rn in runners.items()}
    if spec["eager"]:
        arch, px, batch, layers = spec["eager"]
        model, grid = make_model(arch, px, layers)
        inputs = example_inputs(model, batch, grid, seed=0)
        calls["eager torch"] = lambda: eager_forward(model, inputs)
        if spec["tomesd"]:
            calls.update(tomesd_call(make_model(arch, px, layers)[0], inputs, *spec["tomesd"]))
        if spec["compile"]:
            try:
                compiled = torch.compile(model)
                run = lambda: compiled(inputs["hidden_states"], timestep=inputs["timestep"],  # noqa: E731
                                       class_labels=inputs["class_labels"])
                with torch.no_grad():
                    run()
                calls["torch.compile"] = run
            except Exception as e:  # recorded, not fatal: "where it works on this machine"
                logger.warning("torch.compile failed: %s", str(e).splitlines()[0])
    with torch.no_grad():
        wall, cpu = interleaved({k: calls[k] for k in spec["order"] + ["eager torch", "tomesd", "torch.compile"]
                                 if k in calls}, spec["repeats"])
    for rn in runners.values():
        rn.deactivate()
    shares = {k: matching_share(Path(spec["variants"][k][0]), feeds["merged"], weights) for k in spec["profile"]}
    return {"latency": {k: float(np.median(v)) for k, v in wall.items()},
            "min": {k: float(np.min(v)) for k, v in wall.items()},
            "cpu": {k: float(np.median(v)) for k, v in cpu.items()},
            "matching_share": shares}  # key -> (share, ms per forward by op type)


def interleaved(calls: dict, rounds: int, warmup: int = 1, pause_s: float = 0.0,
                alternate: bool = False) -> tuple[dict, dict]:
    """Per call, the wall and the CPU seconds (every thread of the process) of each round, calls round-robin;
    ``alternate`` reverses every other round, ``pause_s`` idles before each call (no start on spinning cores)."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    names = list(calls)
    wall: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(rounds):
        for k in names[::-1] if alternate and r % 2 else names:
            if pause_s:
                time.sleep(pause_s)
            w0, c0 = time.perf_counter(), time.process_time()
            calls[k]()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    return wall, cpu


def end_to_end(model, runners, merged_key: str, feed: dict, merged_feed: dict, steps: int, repeats: int) -> dict:
    """A denoising loop of ``steps`` forwards: unmerged graph vs merged graph vs eager PyTorch."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler()

    def loop(forward):
        sched.set_timesteps(steps)
        x = feed["hidden_states"].copy()
        for t in sched.timesteps:
            out = forward(x, t)
            x = sched.step(torch.from_numpy(np.asarray(out[:, : x.shape[1]])), t, torch.from_numpy(x)).prev_sample.numpy()
        return x

    def ort_forward(key):
        base_feed = merged_feed if key != "base" else feed
        return lambda x, t: runners[key].infer({**base_feed, "hidden_states": x,
                                                 "timestep": np.full_like(feed["timestep"], int(t))})["sample"]

    def eager(x, t):
        with torch.no_grad():
            return model(torch.from_numpy(x), timestep=torch.full((len(x),), int(t)),
                         class_labels=torch.from_numpy(feed["class_labels"])).sample.numpy()

    lat = interleaved_latency({"unmerged": lambda: loop(ort_forward("base")),
                               "merged": lambda: loop(ort_forward(merged_key)),
                               "eager torch": lambda: loop(eager)}, repeats=max(1, repeats // 2), warmup=0)
    return {"steps": steps, "variant": merged_key, "seconds": lat, "speedup_vs_unmerged": lat["unmerged"] / lat["merged"],
            "speedup_vs_eager": lat["eager torch"] / lat["merged"]}


if __name__ == "__main__":
    main()
