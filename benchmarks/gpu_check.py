"""One GPU run that proves the TensorRT path: engines of every precision against onnxruntime, and their speed.

    python benchmarks/gpu_check.py                   # on a GPU with TensorRT >= 10.15: the whole check
    python benchmarks/gpu_check.py --cpu             # anywhere: plans, onnxruntime references, torch eager
    python benchmarks/gpu_check.py --plans bundled,sd3 --precisions fp32,fp16

For each plan (the bundled DiT; a 4-block DiT-XL/2-width DiT at 1024 tokens; tiny SD3 and Flux; all
random-init except the bundled model, no network), a ToMe plan with a merged bucket (t >= 500, ratio
0.5) and an unmerged one (t < 500, the base graph):

1. for each precision fp32, fp16, bf16: build its engines (weight-stripped, refitted on load);
2. fp32: every forward within ``FP32_ATOL`` (max abs) of onnxruntime CPU fp32, in both buckets;
   fp16 / bf16: PSNR >= ``MIN_PSNR`` dB of a short generation against onnxruntime CPU fp32 (the bundled
   model: DDIM through ``runtime.generate``; the others: Euler steps ``x <- x - dt * f(x, t)`` across
   both buckets);
3. per-forward latency (median) of the merged and the unmerged engine, torch eager and torch.compile
   (DiT-XL width in fp16 only; its compile is the slow part) on the same GPU, batch 2;
4. device memory: used before and after the engines load, and the engines' activation memory;
5. the multi-profile path (``--profile-plans``, default bundled and DiT-XL width): a ToMe plan of three
   buckets (ratios 0.5 and 0.3, and unmerged; ``PROFILE_BUCKETS``) that all run one graph (r from shapes,
   the unmerged bucket on the plain branch of the same graph: ``unmerged=branch``): one fp32 engine per graph file with a profile
   per count vector (a zero-length count input included),
   every bucket within ``FP32_ATOL`` of onnxruntime CPU fp32, and each multi-profile engine's device memory
   (TensorRT's weights + the one activation buffer) at most ``MAX_PROFILE_MEMORY`` x a plain single-profile
   engine of the same graph. The static check of every engine and profile (``check_plan_profiles``) runs
   on CPU too; with ``--cpu`` it and the layout (graph file -> its count vectors) are all that is recorded.

Writes one JSON to ``benchmarks/results/gpu_check-<date>.json`` (date, GPU, versions, every figure, and
PASSED / FAILED per check) and exits 1 if a check failed. Budget: <= 8 minutes on one GPU (engine
builds use TensorRT's builder optimization level 2 except the DiT-XL fp16 engines, whose latency is the
headline; each entry records its level and build time). Without
TensorRT or a GPU (or with ``--cpu``) the engine steps are skipped with the reason in the JSON, and the
onnxruntime references, torch eager and the onnxruntime latencies still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.quality import psnr  # noqa: E402
from passes.errors import DitmergeError  # noqa: E402
from benchmarks.gpu_plans import BUCKETS, SPECS, PlanSpec, build, call, example, versions  # noqa: E402,F401

logger = logging.getLogger("gpu_check")

FP32_ATOL = 1e-3
MIN_PSNR = 30.0
PRECISIONS = ("fp32", "fp16", "bf16")
PROFILE_BUCKETS = "999-700:0.5,699-400:0.3,399-0:0"  # two merged buckets that differ only in r, and unmerged
MAX_PROFILE_MEMORY = 1.15  # a multi-profile engine against a single-profile one of the same graph
T_PROFILE = (850, 550, 100)  # a training-scale timestep in each of PROFILE_BUCKETS
T_MERGED, T_BASE = 900, 100  # training-scale timesteps in the merged and the unmerged bucket
RESULTS = Path(__file__).resolve().parent / "results"


def _to(x: dict, device, dtype=None) -> dict:
    return {k: (v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device))
            for k, v in x.items()}


def generation(spec: PlanSpec, tf, model, steps: int) -> np.ndarray:
    """A short deterministic generation through ``tf`` (the same noise and conditioning every call)."""
    if spec.make is None:
        from runtime.generate import sample_classes

        tf.reset(0)
        return sample_classes(tf, [1, 5], steps=steps, seed=0, progress=False,
                              scheduler_config=tf.plan.model.get("scheduler"))
    x = example(tf, model, seed=1)
    ts = np.linspace(999, 0, steps + 1)
    tf.reset(0)
    state = x["hidden_states"].clone()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        out = torch.as_tensor(call(model, tf, {**x, "hidden_states": state}, float(t0), tf.timestep_scale)).float().cpu()
        out = out[:, :state.shape[1]] if out.ndim == 4 else out
        state = state - float(t0 - t1) / 1000 * out
    return state.numpy()


def latency(calls: dict, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each call, run round-robin (drift hits all alike), synchronized on the GPU."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def _psnr(a: np.ndarray, ref: np.ndarray) -> float:
    rng = float(ref.max() - ref.min()) or 1.0
    return float(psnr(a[None].reshape(1, -1), ref[None].reshape(1, -1), data_range=rng)[0])


def check_cpu(spec: PlanSpec, plan: Path, model, repeats: int) -> dict:
    """onnxruntime CPU fp32 against torch eager (the unmerged bucket), references and latencies on CPU."""
    import runtime

    tf = runtime.load(plan, backend="cpu", deterministic=True)
    x = example(tf, model)
    scale = tf.timestep_scale
    with torch.no_grad():
        eager = call(model, model, x, T_BASE, scale)
        base = call(model, tf, x, T_BASE, scale)
        err = float((torch.as_tensor(base) - eager).abs().max())
        res = {"base_vs_eager_max_abs": err, "base_vs_eager_ok": err <= 1e-4,
               "ort_cpu_ms": latency({"merged": lambda: call(model, tf, x, T_MERGED, scale),
                                      "unmerged": lambda: call(model, tf, x, T_BASE, scale),
                                      "torch_eager": lambda: call(model, model, x, T_BASE, scale)}, repeats)}
    res["reference_generation_steps"] = spec.gen_steps
    return res


def check_trt(spec: PlanSpec, plan: Path, model, precision: str, reference: np.ndarray, repeats: int,
              opt_level: int | None) -> dict:
    """Build the plan's engines at ``precision`` and check them against onnxruntime CPU fp32."""
    import runtime
    from export.trt_build import build_plan_engines

    manifest_path = plan / "plan.json"
    manifest = json.loads(manifest_path.read_text())
    free0 = torch.cuda.mem_get_info()[0]
    t0 = time.perf_counter()
    manifest["engines"] = build_plan_engines(plan, manifest, precision, progress=False, opt_level=opt_level)
    build_s = time.perf_counter() - t0
    manifest_path.write_text(json.dumps(manifest, indent=1))
    tf = runtime.load(plan, backend="trt", deterministic=True)
    ref_tf = runtime.load(plan, backend="cpu", deterministic=True)
    x = example(tf, model)
    scale = tf.timestep_scale
    res: dict = {"build_s": build_s, "builder_optimization_level": 3 if opt_level is None else opt_level}
    with torch.no_grad():
        if precision == "fp32":
            errs = {}
            for name, t in (("merged", T_MERGED), ("unmerged", T_BASE)):
                a = torch.as_tensor(call(model, tf, x, t, scale)).float().cpu()
                b = torch.as_tensor(call(model, ref_tf, x, t, scale)).float()
                errs[name] = float((a - b).abs().max())
            res["max_abs_vs_ort"] = errs
            res["ok"] = all(e <= FP32_ATOL for e in errs.values())
        else:
            gen = generation(spec, tf, model, spec.gen_steps)
            res["psnr_vs_ort_fp32"] = _psnr(gen, reference)
            res["ok"] = res["psnr_vs_ort_fp32"] >= MIN_PSNR
        xc = _to(x, "cuda")
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        gpu_model = model.to("cuda", dtype)
        xe = _to(x, "cuda", dtype)
        calls = {"merged_engine": lambda: call(model, tf, xc, T_MERGED, scale),
                 "unmerged_engine": lambda: call(model, tf, xc, T_BASE, scale),
                 "torch_eager": lambda: call(model, gpu_model, xe, T_BASE, scale)}
        if spec.compile and precision == "fp16":  # compile once, in the deployment precision (budget)
            compiled = torch.compile(gpu_model)
            calls["torch_compile"] = lambda: call(model, compiled, xe, T_BASE, scale)
        res["latency_ms"] = latency(calls, repeats)
        model.to("cpu", torch.float32)
    res["speedup_vs_unmerged_engine"] = res["latency_ms"]["unmerged_engine"] / res["latency_ms"]["merged_engine"]
    runners = [r for r in {id(r): r for r in tf._runners.values()}.values() if r.is_active]  # one per engine file
    res["device_memory_mb"] = {"used_by_engines": (free0 - torch.cuda.mem_get_info()[0]) / 2**20,
                               "activation": sum(r.memory["activation_bytes"] for r in runners) / 2**20,
                               "weights": sum(r.memory.get("weights_bytes") or 0 for r in runners) / 2**20}
    for r in runners:
        r.deactivate()
    return res


def check_profiles(spec: PlanSpec, root: Path, trt_ok: bool, opt_level: int | None) -> dict:
    """The multi-profile path on a ToMe plan of ``PROFILE_BUCKETS``: layout, agreement and device memory."""
    import runtime
    from export.trt_build import build_engine, build_plan_engines, check_plan_profiles, graph_profiles

    plan, model = build(spec, root, PROFILE_BUCKETS, suffix="-profiles", options={"unmerged": "branch"})
    manifest_path = plan / "plan.json"
    manifest = json.loads(manifest_path.read_text())
    layout = graph_profiles(plan, manifest)
    res: dict = {"buckets": PROFILE_BUCKETS, "layout": layout,
                 "buckets_per_graph": {g: sum(g in {b["graph"], *(v["file"] for v in b.get("graphs", {}).values())}
                                              for b in manifest["buckets"]) for g in layout},
                 "shared": any(len(v) > 1 for v in layout.values()),
                 "static_check": check_plan_profiles(plan, manifest)}  # per engine and profile, on CPU
    res["static_ok"] = not any(res["static_check"].values())
    if not trt_ok:
        return res
    t0 = time.perf_counter()
    manifest["engines"] = build_plan_engines(plan, manifest, "fp32", progress=False, opt_level=opt_level)
    res["build_s"] = time.perf_counter() - t0
    manifest_path.write_text(json.dumps(manifest, indent=1))
    tf = runtime.load(plan, backend="trt", deterministic=True)
    ref_tf = runtime.load(plan, backend="cpu", deterministic=True)
    x = example(tf, model)
    scale = tf.timestep_scale
    errs = {}
    with torch.no_grad():
        for t in T_PROFILE:
            a = torch.as_tensor(call(model, tf, x, t, scale)).float().cpu()
            b = torch.as_tensor(call(model, ref_tf, x, t, scale)).float()
            errs[str(t)] = float((a - b).abs().max())
    res["max_abs_vs_ort"] = errs
    res["agree"] = all(e <= FP32_ATOL for e in errs.values())
    runners = {id(r): r for r in tf._runners.values()}.values()
    res["engines"] = {r.engine_path.name: {"profiles": r.profiles, "contexts": len(r.contexts), **r.memory}
                      for r in runners if r.is_active}
    for r in runners:
        r.deactivate()
    # each multi-profile engine against a plain engine of the same graph with one profile (its first)
    res["memory_vs_single_profile"] = {}
    for graph, info in manifest["engines"].items():
        if len(info["profiles"]) < 2:
            continue
        plain = plan / f"plain-{Path(graph).stem}.engine"
        single = build_engine(plan / graph, plain, "fp32", strip=info["strip"], opt_level=opt_level,
                              profiles=info["profiles"][:1])
        multi = info["memory"]

        def total(m: dict) -> int | None:
            return None if m.get("weights_bytes") is None else m["weights_bytes"] + m["activation_bytes"]

        ratio = (total(multi) / total(single)) if total(multi) and total(single) else None
        res["memory_vs_single_profile"][graph] = {"multi": multi, "single": single, "ratio": ratio,
                                                  "ok": ratio is not None and ratio <= MAX_PROFILE_MEMORY}
    res["ok"] = res["static_ok"] and res["agree"] and all(v["ok"] for v in res["memory_vs_single_profile"].values())
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plans", default=",".join(SPECS), help=f"comma-separated, from {', '.join(SPECS)}")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--cpu", action="store_true", help="skip TensorRT even where it runs")
    p.add_argument("--repeats", type=int, default=20, help="timed forwards per latency median")
    p.add_argument("--opt-level", type=int, default=2, help="TensorRT builder optimization level of the tiny plans")
    p.add_argument("--profile-plans", default="bundled,dit-xl4",
                   help="plans (of --plans) whose multi-profile path is checked; 'none' for none")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu_check-<date>.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO)
    from runtime.trt_runner import gpu_name, tensorrt_status

    t_start = time.perf_counter()
    ok_trt, why = tensorrt_status()
    if args.cpu:
        ok_trt, why = False, "--cpu given"
    if not ok_trt:
        logger.warning("TensorRT engine builds and checks are skipped: %s", why)
    unknown = set(args.plans.split(",")) - set(SPECS)
    if unknown:
        raise DitmergeError(f"unknown plans {sorted(unknown)}; choose from {', '.join(SPECS)}")
    report: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "gpu": gpu_name(), "versions": versions(), "tensorrt_skipped": None if ok_trt else why,
                    "criteria": {"fp32_max_abs": FP32_ATOL, "min_psnr_db": MIN_PSNR}, "plans": {}}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for name in args.plans.split(","):
            spec = SPECS[name]
            plan, model = build(spec, Path(tmp))
            cpu_repeats = args.repeats if not ok_trt else min(args.repeats, 5)  # on a GPU run, CPU time is budget
            entry = report["plans"][name] = {"cpu": check_cpu(spec, plan, model, cpu_repeats)}
            if not entry["cpu"]["base_vs_eager_ok"]:
                failed.append(f"{name}: onnxruntime vs eager")
            import runtime

            reference = generation(spec, runtime.load(plan, backend="cpu", deterministic=True), model, spec.gen_steps)
            entry["cpu"]["reference_finite"] = bool(np.isfinite(reference).all())
            for precision in args.precisions.split(",") if ok_trt else ():
                # TensorRT's default level (3) only where the timing matters most: DiT-XL width in fp16
                level = None if spec.compile and precision == "fp16" else args.opt_level
                res = entry[precision] = check_trt(spec, plan, model, precision, reference, args.repeats, level)
                logger.info("%s %s: %s", name, precision, json.dumps(res))
                if not res["ok"]:
                    failed.append(f"{name} {precision}")
            if name in args.profile_plans.split(","):
                res = entry["profiles"] = check_profiles(spec, Path(tmp), ok_trt, args.opt_level)
                logger.info("%s profiles: %s", name, json.dumps(res))
                if not res["static_ok"] or (ok_trt and not res["ok"]):
                    failed.append(f"{name} profiles")
    report["failed"] = failed
    report["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out) if args.out else RESULTS / f"gpu_check-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    status = "FAILED" if failed else "PASSED"
    print(f"{status} | {len(report['plans'])} plans | TensorRT: {'run' if ok_trt else 'skipped (' + why + ')'} | "
          f"{report['wall_s']:.0f} s | {out}" + (f" | failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
