"""Where a forward's time goes on onnxruntime CPU, and what the onnxruntime-only copy buys.

    python benchmarks/ort_profile.py --layers 4 --px 256 --rounds 11

A ToMe plan (attn+mlp, buckets 0.7 / 0.5 / 0.3 / unmerged, one graph behind ``If(r == 0)``) on the
DiT-XL/2 architecture (random weights, ``--layers`` of its 28 blocks, the real width and token count),
batch 2. For base.onnx and the plan's graph at every bucket, plain and through its onnxruntime copy
(runtime/ort_optimize.py):
- onnxruntime's node profile: milliseconds per op type, the inserted ToMe nodes' share, and the fused
  ops each session runs (LayerNormalization vs SkipLayerNormalization, Gelu vs FastGelu, Attention);
- exactness of the copy against the plain graph (max abs, fp32);
- per-forward latency, one process, interleaved rounds: medians, minima and CPU seconds; and the thread
  settings (intra-op spinning on, one thread) on the 0.5 bucket.
Writes ``results/ort_profile.json``.
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
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import DIT_XL_2, interleaved
from probe import latency_ratio, latency_rows

from export.measure import feed_of
from export.onnx_export import example_inputs
from passes.counts import count_feed
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, draw_partition
from runtime.ort_optimize import disabled_optimizers, optimized_copy
from runtime.runners import OrtRunner, SharedWeights

logger = logging.getLogger("ort_profile")
RESULTS = Path(__file__).resolve().parent / "results"
FUSED_OPS = ("LayerNormalization", "SkipLayerNormalization", "Gelu", "FastGelu", "BiasGelu", "Attention",
             "MultiHeadAttention", "QuickGelu", "FusedMatMul")


def build(work: Path, layers: int, px: int) -> tuple[Path, dict, tuple[int, int]]:
    """The DiT-XL/2-width slice and its ToMe plan under ``work`` (reused when present)."""
    import torch
    from diffusers import DiTTransformer2DModel

    from export.build import build_plan

    latent = px // 8
    grid = (latent // 2, latent // 2)
    torch.manual_seed(0)
    model = DiTTransformer2DModel(sample_size=latent, **{**DIT_XL_2, "num_layers": layers}).eval()
    plan_dir = work / "plan"
    if not (plan_dir / "plan.json").exists():
        model.save_pretrained(work / "model" / "transformer")
        build_plan(str(work / "model"), method="tome", buckets="999-750:0.7,749-500:0.5,499-250:0.3,249-0:0",
                   options={"locations": ("attn", "mlp")}, out=plan_dir, measure=False, progress=False)
    np.savez(work / "feed.npz", **feed_of(example_inputs(model, 2, grid, seed=0)))
    return plan_dir, json.loads((plan_dir / "plan.json").read_text()), grid


def session(path: Path, weights: SharedWeights, disabled: list[str], profiling: bool = False, spinning: bool = False):
    """A CPU session over ``path`` as OrtRunner makes one, with onnxruntime's ``disabled`` fusions left out.

    ``spinning``: idle intra-op threads spin, as in a plan's one session (``runtime.load``'s default).
    """
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_profiling = profiling
    opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / "ditmerge_ort_profile")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    for name, value in weights.initializers(onnx.load(path, load_external_data=False)).items():
        opts.add_initializer(name, value)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def profile(runner: OrtRunner, feed: dict, forwards: int = 3) -> dict:
    """onnxruntime's node profile of ``forwards`` forwards (after one warm-up), its fusions as the runner
    has them: ms per forward by op type, the ToMe nodes' ms by op type, and how many nodes of each fused op
    type one forward runs."""
    sess = session(runner.session_path, runner.weights, disabled_optimizers(runner.providers), profiling=True)
    sess.run(None, feed)
    for _ in range(forwards):
        sess.run(None, feed)
    path = Path(sess.end_profiling())
    events = json.loads(path.read_text())
    path.unlink()
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    runs = [e for e in events if e.get("name") == "model_run"][-forwards:]
    first = runs[0]["ts"] if runs else 0  # the warm-up's nodes are left out
    nodes = [e for e in nodes if e["ts"] >= first and e["args"].get("op_name") not in ("If", "Loop", "Scan")]
    by_op, tome, count = Counter(), Counter(), Counter()
    for e in nodes:
        op = e["args"].get("op_name", "?")
        by_op[op] += e["dur"] / forwards / 1e3
        count[op] += 1 / forwards
        if "ditmerge_tome" in e["name"]:
            tome[op] += e["dur"] / forwards / 1e3
    run_ms = float(np.mean([e["dur"] for e in runs])) / 1e3 if runs else float("nan")
    kernels = sum(by_op.values())
    return {"run_ms": run_ms, "kernel_ms": kernels, "tome_ms": sum(tome.values()),
            "tome_share": sum(tome.values()) / kernels if kernels else float("nan"),
            "ms_by_op": dict(by_op.most_common()), "tome_ms_by_op": dict(tome.most_common()),
            "fused_ops": {k: round(count[k]) for k in FUSED_OPS if count[k]}}


def skip_layernorm_kernel(shape: tuple[int, int, int], rounds: int) -> dict:
    """onnxruntime CPU's SkipLayerNormalization (sum kept, as a residual needs it) against the Add and
    LayerNormalization it replaces, on one ``[B, N, C]`` tensor pair: per-call latency."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    c = shape[-1]
    io = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(shape)) for n in ("a", "b")]
    outs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("y", "s")]
    gamma = onnx.numpy_helper.from_array(np.ones(c, np.float32), "g")
    pair = [helper.make_node("Add", ["a", "b"], ["s"]),
            helper.make_node("LayerNormalization", ["s", "g"], ["y"], axis=-1, epsilon=1e-6)]
    fused = [helper.make_node("SkipLayerNormalization", ["a", "b", "g"], ["y", "", "", "s"], domain="com.microsoft",
                              epsilon=1e-6)]
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {name: ort.InferenceSession(helper.make_model(helper.make_graph(nodes, name, io, outs, [gamma]),
                                                             opset_imports=opsets, ir_version=10).SerializeToString(),
                                           opts, providers=["CPUExecutionProvider"],
                                           disabled_optimizers=["SkipLayerNormFusion"])
                for name, nodes in (("Add + LayerNormalization", pair), ("SkipLayerNormalization", fused))}
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal(shape).astype(np.float32), "b": rng.standard_normal(shape).astype(np.float32)}
    return latency({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, rounds)


def max_abs(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


def latency(calls: dict, rounds: int) -> dict:
    """Per call: median and min wall ms, median CPU ms (every thread of the process) per forward."""
    wall, cpu = interleaved(calls, rounds)
    return {k: {"median_ms": float(np.median(wall[k])) * 1e3, "min_ms": float(np.min(wall[k])) * 1e3,
                "cpu_median_ms": float(np.median(cpu[k])) * 1e3} for k in calls}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="DiT-XL/2 blocks (28 in the real model)")
    ap.add_argument("--px", type=int, default=256, help="256 -> 256 tokens, 512 -> 1024")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--work", type=Path, default=None, help="keep the model and plan here (reused when present)")
    ap.add_argument("--no-threads", action="store_true", help="skip the thread-setting variants")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = args.work or Path(tempfile.mkdtemp(prefix="ort_profile_"))
    plan_dir, manifest, grid = build(work, args.layers, args.px)
    data = dict(np.load(work / "feed.npz"))
    part, inv = draw_partition(grid, (2, 2), np.random.default_rng(0))
    graph = manifest["buckets"][0]["graph"]
    optimized_copy(plan_dir / manifest["base"]["graph"])
    optimized_copy(plan_dir / graph)
    weights = SharedWeights(plan_dir / "weights.bin")

    def runner(name: str, optimize: bool, **kw) -> OrtRunner:
        return OrtRunner(plan_dir / name, ["CPUExecutionProvider"], weights, optimize=optimize, **kw)

    # variant -> (runner, feed); the plan graph at each bucket's r
    cases: dict[str, tuple[OrtRunner, dict]] = {}
    for opt in (False, True):
        tag = " (ort copy)" if opt else ""
        cases["base.onnx" + tag] = (runner(manifest["base"]["graph"], opt), data)
        plan = runner(graph, opt)
        for b in sorted(manifest["buckets"], key=lambda b: b["ratio"]):
            feed = {**data, PARTITION_INPUT: part, PARTITION_INV_INPUT: inv, **count_feed(b["counts"])}
            cases[f"plan r={b['r']} ({b['ratio']}){tag}"] = (plan, feed)
    for rn, _ in cases.values():
        rn.activate()

    exact = {k: max_abs(cases[k][0].infer(f), cases[k.removesuffix(" (ort copy)")][0].infer(f))
             for k, (_, f) in cases.items() if k.endswith(" (ort copy)")}
    for k, v in exact.items():
        logger.info("exactness %s: max abs %.2e", k, v)
    profiles = {}
    for k, (rn, f) in cases.items():
        profiles[k] = profile(rn, f)
        logger.info("profiled %s: %.0f ms, ToMe %.1f %%", k, profiles[k]["run_ms"], 100 * profiles[k]["tome_share"])

    calls = {k: (lambda rn=rn, f=f: rn.infer(f)) for k, (rn, f) in cases.items()}
    half = next(b for b in manifest["buckets"] if b["ratio"] == 0.5)
    half_feed = {**data, PARTITION_INPUT: part, PARTITION_INV_INPUT: inv, **count_feed(half["counts"])}
    # onnxruntime's own SkipLayerNormFusion, which OrtRunner leaves out on CPU (it fuses base.onnx's last pair)
    fusing = session(plan_dir / manifest["base"]["graph"], weights, [])
    calls["base.onnx, onnxruntime's SkipLayerNormFusion on"] = lambda: fusing.run(None, data)
    if not args.no_threads:
        for label, kw in (("spinning on", {"spinning": True}), ("1 thread", {"threads": 1})):
            rn = runner(graph, False, **kw)
            calls[f"plan r={half['r']} (0.5), {label}"] = lambda rn=rn: rn.infer(half_feed)
    logger.info("timing %d variants, %d interleaved rounds", len(calls), args.rounds)
    lat = latency(calls, args.rounds)
    kernel = skip_layernorm_kernel((2, grid[0] * grid[1], DIT_XL_2["num_attention_heads"] * DIT_XL_2["attention_head_dim"]),
                                   max(50, args.rounds))
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"load {os.getloadavg()[0]:.1f}",
              "date": time.strftime("%Y-%m-%d"),
              "model": f"DiT-XL/2 architecture, {args.layers} of 28 blocks, {args.px}px ({grid[0] * grid[1]} tokens), "
                       "batch 2, random weights, onnxruntime CPU fp32",
              "command": "python benchmarks/ort_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "exactness_max_abs": exact, "profile": profiles, "latency": lat, "skip_layernorm_kernel": kernel,
              "copy_speedup": {k.removesuffix(" (ort copy)"): latency_ratio(lat, k.removesuffix(" (ort copy)"), k)
                               for k in exact}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ort_profile.json").write_text(json.dumps(result, indent=2))
    print(table(result))
    return result


def table(result: dict) -> str:
    rows = [result["model"], result["machine"], "",
            "| graph | profiled ms | ToMe nodes | top ops (ms) | fused ops per forward |", "|---|---|---|---|---|"]
    for k, p in result["profile"].items():
        top = ", ".join(f"{op} {ms:.0f}" for op, ms in list(p["ms_by_op"].items())[:5])
        fused = ", ".join(f"{op} {n}" for op, n in p["fused_ops"].items())
        rows.append(f"| {k} | {p['run_ms']:.0f} | {p['tome_ms']:.1f} ms ({p['tome_share']:.1%}) | {top} | {fused} |")
    rows += ["", *latency_rows(result["latency"])]
    rows += ["", *latency_rows(result["skip_layernorm_kernel"], "one residual Add + LayerNorm, [2, N, 1152]", 2)]
    rows += ["", "| ort copy vs plain | speed-up (median) | min | CPU | max abs |", "|---|---|---|---|---|"]
    rows += [f"| {k} | {v['median']:.3f}x | {v['min']:.3f}x | {v['cpu_median']:.3f}x | "
             f"{result['exactness_max_abs'][k + ' (ort copy)']:.1e} |" for k, v in result["copy_speedup"].items()]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
