"""The build's measurements: each bucket variant's fidelity against its eager twin and its latency against
the unmerged graph, on onnxruntime CPU at batch 2, interleaved (medians); also what the tuner times."""

from __future__ import annotations

from pathlib import Path

from export.measure import export_fidelity, feed_of, interleaved_latency
from export.methods import MAIN, BucketGraphs, BuildContext, Method
from export.onnx_export import WEIGHTS_FILE, example_inputs
from export.plan_io import BASE_GRAPH
from passes.counts import count_feed
from runtime.branches import branch_of
from runtime.graphfile import graph_branches, graph_inputs
from runtime.plan_schema import Bucket
from runtime.runners import OrtRunner, SharedWeights


def measure_buckets(stage: Path, meth: Method, ctx: BuildContext, results: list[Bucket], built: dict[int, BucketGraphs],
                    files: dict[int, dict[str, str]], repeats: int) -> dict:
    """Fill each result's fidelity and latency fields; return the plan-level figures (export fidelity,
    unmerged latency). ``files``: bucket -> variant -> graph file in ``stage``."""
    report: dict = {}
    weights = SharedWeights(stage / WEIGHTS_FILE)
    graphs = {BASE_GRAPH} | {g for names in files.values() for g in names.values()}
    runners = {g: OrtRunner(stage / g, ["CPUExecutionProvider"], weights) for g in graphs}
    inputs = example_inputs(ctx.torch_model, 2, ctx.grid, ctx.text_len, seed=1)
    report["export_fidelity_max_abs"] = export_fidelity(ctx.torch_model, runners[BASE_GRAPH], inputs)
    feed = feed_of(inputs)
    calls = {BASE_GRAPH: lambda: runners[BASE_GRAPH].infer(feed)}
    keys: dict[int, dict[str, str]] = {}
    for res in results:
        bg = built[res.index]
        res.fidelity, keys[res.index] = {}, {}
        for variant, g in files[res.index].items():
            counts = shape_feed(stage / g, bg.counts)
            branch = branch_of(bg.meta, variant)
            run = variant_runner(runners[g], stage / g, branch, counts)
            res.fidelity[variant] = (report["export_fidelity_max_abs"] if g == BASE_GRAPH else
                                     meth.fidelity(ctx, bg.meta, variant, run, inputs))
            extra = meth.extra_feed(ctx, bg.meta, variant, 2)
            key = keys[res.index][variant] = call_key(g, counts, branch)
            calls.setdefault(key, lambda run=run, extra=extra: run({**feed, **extra}))
        res.fidelity_max_abs = max(res.fidelity.values())
    lat = interleaved_latency(calls, repeats=repeats)
    report["base_latency_ms"] = lat[BASE_GRAPH] * 1e3
    for res in results:
        k = keys[res.index]
        res.latency_ms = lat[k[MAIN]] * 1e3
        res.speedup = lat[BASE_GRAPH] / lat[k[MAIN]]
        res.variant_latency_ms = {v: lat[key] * 1e3 for v, key in k.items()}
    for rn in runners.values():
        rn.deactivate()
    return report


def call_key(graph: str, counts: dict, variant: str) -> str:
    """One latency measurement per graph, count lengths (buckets sharing a graph differ in counts) and
    variant (the variants of a branched graph share its file)."""
    return graph + "".join(f"|{k}={len(v)}" for k, v in sorted(counts.items())) + f"|{variant}"


def variant_runner(runner: OrtRunner, path: Path, variant: str, counts: dict):
    """``feed -> outputs`` of one variant of the graph at ``path``: its counts, and for a branched graph its
    variant count, stand-ins for the other variants' inputs and only its own outputs."""
    from runtime.branches import variant_feed, variant_outputs

    info = graph_branches(path)
    if info is None:
        return lambda f: runner.infer({**f, **counts})
    inputs, cache = graph_inputs(path), {}

    def run(f: dict) -> dict:
        given = {**f, **counts}
        return variant_outputs(info, variant, runner.infer({**given, **variant_feed(info, variant, inputs, given, cache)}))
    return run


def shape_feed(graph_path: Path, counts: dict[str, int]) -> dict:
    """The count inputs (:mod:`passes.counts`) of ``counts`` that the graph at ``graph_path`` takes."""
    names = graph_inputs(graph_path)
    return {k: v for k, v in count_feed(counts).items() if k in names}


