"""Model -> plan: export, passes per bucket, measurements, manifest and report (docs/design.md, 'The plan').

The measurements are :mod:`export.build_measure`, the report :mod:`export.build_report`, the staging
directory and publishing :mod:`export.plan_io`; this module runs the steps in order.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from tqdm.auto import tqdm

from export.buckets import BucketSpec
from export.build_measure import measure_buckets
from export.build_report import (bucket_table, plot_quality_speed, quality_table, render_report,  # noqa: F401
                                 sweep_table)  # public here too (the CLI's tables)
from export.families import family_of
from export.load import DEFAULT_MODEL, load_transformer, scheduler_config
from export.methods import MAIN, BucketGraphs, BuildContext, Method, get_method
from export.onnx_export import WEIGHTS_FILE, export_onnx
from export.plan_io import BASE_GRAPH, StageProgress, fingerprint, publish  # BASE_GRAPH: public here too
from passes.branch import branch_variants
from passes.cleanup import FreeTokenAxisPass, RemoveNoopSqueezePass
from passes.errors import DitmergeError
from passes.flops import count_flops
from passes.infra import PassManager
from passes.onnxutil import save_checked
from passes.trt_check import check_tensorrt
from runtime.plan import FORMAT_VERSION, PLAN_FILE, sha256_file
from runtime.plan_schema import BaseRecord, Bucket, GraphFile, MethodRecord, ModelRecord, PlanManifest

logger = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "auto", "trt")


def _versions() -> dict[str, str]:
    import diffusers
    import onnxruntime

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _json_config(config) -> dict:
    return json.loads(json.dumps(dict(config), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def build_plan(model: str = DEFAULT_MODEL, method: str = "tome", buckets: str | None = None,
               out: str | Path = "plan", locations: Sequence[str] | None = None,
               options: dict[str, object] | None = None,
               grid: tuple[int, int] | None = None, text_len: int = 8, num_train_timesteps: int = 1000,
               measure: bool = True, repeats: int = 20, quality_samples: int = 20, quality_steps: int = 25,
               backend: str = "onnxruntime", precision: str = "fp16", sweep: Sequence[float] = (),
               progress: bool = True) -> dict:
    """Build a plan directory for ``model`` and return its manifest.

    Args:
        model: a hub id, a local diffusers folder, or ``builtin:tiny-dit``.
        method: the merge method, a module of :mod:`export.methods` (tome, ...).
        buckets: ratios per timestep bucket, "0.5,0.3" (equal spans, noisiest first) or "999-500:0.5,499-0:0.3";
            None: the method's default.
        out: the plan directory; an existing plan there is replaced only once the new one is complete.
        locations: where ToMe merges: attn (self-attention), xattn (cross-attention queries), joint
            (MMDiT image stream), mlp; short for ``options={"locations": ...}``.
        options: the method's options (see its ``defaults``); strings are converted to their types.
        grid: token grid (rows, cols); the model's native size when None.
        text_len: prompt length of text-conditioned models.
        num_train_timesteps: the timestep range the buckets cover.
        measure: measure fidelity and latency (skipped: the report carries FLOPs only).
        repeats: timed forwards per graph for the latency medians.
        quality_samples: seeded generations through the unmerged and merged plan for the quality report
            (class-conditional pixel-space models; 0 skips it).
        quality_steps: denoising steps of those generations.
        backend: "onnxruntime" (graphs only), "trt" (also TensorRT engines; fails without TensorRT and a
            GPU) or "auto" (engines where TensorRT and a GPU exist).
        precision: precision of TensorRT engines: fp32, fp16 or bf16.
        sweep: extra uniform ratios (every timestep) whose quality and end-to-end speed are measured
            against the unmerged plan and plotted (``quality_speed.png``); their graphs are not kept.
        progress: show progress bars.
    """
    t_start = time.perf_counter()
    options = dict(options or {})
    if locations is not None:
        options["locations"] = tuple(locations)
    meth = get_method(method, options)
    buckets = meth.default_buckets if buckets is None else buckets
    if backend not in BACKENDS:
        raise DitmergeError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    from export.trt_build import PRECISIONS, require_tensorrt, tensorrt_status

    if precision not in PRECISIONS:
        raise DitmergeError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if backend == "trt":
        require_tensorrt()
    engines = backend == "trt" or (backend == "auto" and tensorrt_status()[0])
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DitmergeError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (out / PLAN_FILE).exists() and not (out / ".staging").exists():
        raise DitmergeError(f"--out {out} is a non-empty directory that holds no plan; choose an empty or new one")
    stage = out / ".staging"
    created = not out.exists()
    stage.mkdir(parents=True, exist_ok=True)
    try:
        manifest = _build(model=model, meth=meth, buckets=buckets, stage=stage, grid=grid, text_len=text_len,
                          num_train_timesteps=num_train_timesteps, measure=measure, repeats=repeats,
                          quality_samples=quality_samples, quality_steps=quality_steps,
                          engines=engines, precision=precision, sweep=tuple(sweep), progress=progress)
    except DitmergeError:
        shutil.rmtree(stage, ignore_errors=True)  # a user error: nothing worth resuming
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    except BaseException:
        logger.warning("build interrupted; %s keeps the finished steps and the next run resumes from them", stage)
        raise
    publish(stage, out)
    logger.info("plan written to %s in %.1f s", out, time.perf_counter() - t_start)
    return manifest


def _build(model: str, meth: Method, buckets: str, stage: Path, grid: tuple[int, int] | None, text_len: int, num_train_timesteps: int,
           measure: bool, repeats: int, quality_samples: int, quality_steps: int, engines: bool, precision: str,
           sweep: tuple[float, ...], progress: bool) -> dict:
    """Everything of :func:`build_plan` that writes into the staging directory."""
    done = StageProgress(stage, {"model": model, "fingerprint": fingerprint(model), "grid": list(grid) if grid else None,
                                 "text_len": text_len, "format_version": FORMAT_VERSION})
    steps = tqdm(total=3 + (2 if measure else 0), desc="ditmerge export", unit="step", disable=not progress,
                 leave=False)
    steps.set_postfix_str("loading model")
    torch_model = load_transformer(model)
    family = family_of(torch_model)
    meth.check_family(family)
    grid = tuple(grid) if grid else family.default_grid(torch_model)
    # the buckets once the family and grid are known: step schedules follow its pipeline's timesteps there
    specs = meth.bucket_specs(buckets, num_train_timesteps, model, family=family, grid=grid)
    steps.total += len(specs)
    meth.validate(specs, grid)
    method = meth.name
    steps.update()

    # 1. Export the unmerged graph, weights in one file every bucket graph shares
    # 2. Cleanups the exporter owes us (PixArt's invalid Squeeze, token counts baked into reshapes)
    n_tokens = grid[0] * grid[1]
    if done.finished("base", [BASE_GRAPH, WEIGHTS_FILE]):
        logger.info("resuming: reusing the exported %s", BASE_GRAPH)
        base = onnx.load(stage / BASE_GRAPH, load_external_data=False)
        steps.update(2)
    else:
        steps.set_postfix_str("exporting to ONNX")
        export_onnx(torch_model, stage / BASE_GRAPH, grid, text_len)
        steps.update()
        steps.set_postfix_str("cleaning up")
        base = onnx.load(stage / BASE_GRAPH, load_external_data=False)
        base = PassManager([RemoveNoopSqueezePass(), FreeTokenAxisPass(n_tokens)])(base).model
        save_checked(base, stage / BASE_GRAPH)
        done.record("base", [BASE_GRAPH, WEIGHTS_FILE])
        steps.update()
    base_flops = count_flops(base)
    base_trt = [str(v) for v in check_tensorrt(base)]
    steps.update()

    # 3. The method's graphs for each bucket
    ctx = BuildContext(torch_model=torch_model, family=family, grid=grid, text_len=text_len,
                       num_train_timesteps=num_train_timesteps, base=base, stage=stage, progress=progress)
    meth.prepare(ctx)
    results: list[Bucket] = []
    built: dict[int, BucketGraphs] = {}
    files: dict[int, dict[str, str]] = {}
    staged: dict[str, str] = {}  # sha256 -> staged graph file: buckets whose graphs are equal share one file
    for i, spec in enumerate(specs):
        steps.set_postfix_str(f"bucket {i}: {method} ratio {spec.ratio}")
        bg, names = _bucket_graphs(meth, ctx, spec, i, done, staged)
        built[i], files[i] = bg, names
        main = names[MAIN]
        flops = base_flops if main == BASE_GRAPH else bg.flops
        trt = sorted({str(v) for name, g in bg.graphs.items() if g is not None for v in check_tensorrt(g)}) or (
            base_trt if main == BASE_GRAPH else [])
        if trt:
            logger.warning("bucket %d would not build with TensorRT: %s", i, "; ".join(trt[:3]))
        results.append(Bucket(index=i, t_lo=spec.t_lo, t_hi=spec.t_hi, ratio=spec.ratio, r=bg.r,
                              kept_tokens=bg.kept_tokens, graph=main, flops_rel=flops / base_flops, tensorrt_check=trt,
                              sha256=sha256_file(stage / main), meta=bg.meta, counts=bg.counts,
                              variants={v: GraphFile(file=g, sha256=sha256_file(stage / g)) for v, g in names.items()}))
        steps.update()

    # 4. Measure: fidelity against eager PyTorch, latency against the unmerged graph (same backend)
    report: dict = {"backend": "onnxruntime-cpu", "batch": 2}
    if measure:
        steps.set_postfix_str("measuring fidelity and latency")
        report.update(measure_buckets(stage, meth, ctx, results, built, files, repeats))
        steps.update()

    record = PlanManifest(
        format_version=FORMAT_VERSION,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        tool_versions=_versions(),
        model=ModelRecord(source=model, class_name=family.class_name, family=family.name, grid=list(grid),
                          tokens=n_tokens, text_len=text_len, text_axis="dynamic", timestep_scale=family.timestep_scale,
                          timesteps=family.timesteps, num_train_timesteps=num_train_timesteps,
                          config=_json_config(torch_model.config), scheduler=scheduler_config(model)),
        weights=GraphFile(file=WEIGHTS_FILE, sha256=sha256_file(stage / WEIGHTS_FILE)),
        method=MethodRecord(name=method, params=meth.params()),
        schedule={"buckets": buckets},
        base=BaseRecord(graph=BASE_GRAPH, sha256=sha256_file(stage / BASE_GRAPH), flops=base_flops,
                        tensorrt_check=base_trt),
        buckets=results, report=report)
    # the static TensorRT check per engine and optimization profile (a graph's counts per bucket), on CPU
    from export.trt_build import check_plan_profiles

    by_graph = check_plan_profiles(stage, record.to_json())
    for b in record.buckets:
        found = sorted({v for g in {b.graph} | set(b.graphs.values()) for v in by_graph.get(g, [])})
        if found and not b.tensorrt_check:
            logger.warning("bucket %d would not build with TensorRT in its profile: %s", b.index, "; ".join(found[:3]))
        b.tensorrt_check = sorted(set(b.tensorrt_check) | set(found))
    if engines:
        from export.trt_build import build_plan_engines

        steps.set_postfix_str("building TensorRT engines")
        record.engines = build_plan_engines(stage, record.to_json(), precision=precision, reuse_from=stage.parent,
                                            progress=progress)
        for b in record.buckets:
            b.engines["tensorrt"] = record.engines[b.graph]
    cfg = record.model.config
    if (measure and quality_samples > 0 and cfg.get("in_channels") == 3 and cfg.get("num_embeds_ada_norm")
            and any(b.r or len(b.variants) > 1 for b in record.buckets)):  # merged, or cached steps
        steps.set_postfix_str("generating for the quality report")
        from export.report_quality import measure_quality
        from runtime.plan import Plan

        report["quality"] = measure_quality(Plan(stage, record), samples=quality_samples, steps=quality_steps,
                                            grid_png=stage / "samples.png")
        if sweep:
            steps.set_postfix_str(f"quality/speed sweep over ratios {list(sweep)}")
            report["sweep"] = _sweep(stage, record.to_json(), meth, ctx, sweep, quality_samples, quality_steps)
    steps.update()
    steps.close()
    manifest = record.to_json()
    (stage / "report.md").write_text(render_report(manifest))
    (stage / PLAN_FILE).write_text(json.dumps(manifest, indent=2))
    done.path.unlink()
    return manifest


def _sweep(stage: Path, manifest: dict, meth: Method, ctx: BuildContext, ratios: tuple[float, ...],
           samples: int, steps: int) -> list[dict]:
    """Quality and end-to-end speed of uniform-ratio plans against the unmerged plan, plus a plot."""
    import copy

    from export.report_quality import measure_quality
    from runtime.plan import Plan

    rows = []
    t_max = manifest["model"]["num_train_timesteps"] - 1
    for ratio in ratios:
        spec = BucketSpec(0, t_max, ratio)
        meth.validate([spec], ctx.grid)
        bg = meth.build_bucket(ctx, spec, "sweep")
        names = {}
        for variant, g in bg.graphs.items():
            names[variant] = BASE_GRAPH if g is None else f".sweep_{ratio}_{variant}.onnx"
            if g is not None:
                save_checked(g, stage / names[variant])
        view = copy.deepcopy(manifest)
        view["buckets"] = [{**b, "graph": names[MAIN], "method_meta": bg.meta, "counts": bg.counts,
                            "graphs": {v: {"file": f, "sha256": ""} for v, f in names.items()}} for b in view["buckets"]]
        q = measure_quality(Plan(stage, view), samples=samples, steps=steps)
        rows.append({"ratio": ratio, "r": bg.r, **q})
        for f in set(names.values()) - {BASE_GRAPH}:
            (stage / f).unlink()
    plot_quality_speed(rows, stage / "quality_speed.png")
    return rows


def _bucket_graphs(meth: Method, ctx: BuildContext, spec: BucketSpec, index: int, done: StageProgress,
                   staged: dict[str, str]) -> tuple[BucketGraphs, dict[str, str]]:
    """Build (or, when an interrupted build finished it, reload) a bucket's graphs; save them staged.

    A graph equal to one an earlier bucket staged (``staged``: sha256 -> file) is not written again: the
    bucket references that file, so the runtime opens one session (one engine) for both.
    """
    key = json.dumps({"graphs": index, **meth.stamp(spec, index)}, sort_keys=True, default=str)
    record = done.data["done"].get(key)
    if record is not None and "variants" in record:
        names = record["variants"]
        files = sorted(set(names.values()) - {BASE_GRAPH})
        if done.finished(key + "#files", files):
            logger.info("resuming: reusing %s", ", ".join(files) or BASE_GRAPH)
            graphs = {v: None if f == BASE_GRAPH else onnx.load(ctx.stage / f, load_external_data=False)
                      for v, f in names.items()}
            for f in files:
                staged.setdefault(sha256_file(ctx.stage / f), f)
            return BucketGraphs(graphs, record["meta"], record["r"], record["kept_tokens"],
                                record.get("counts", {}), record.get("flops")), names
    bg = meth.build_bucket(ctx, spec, index)
    if bg.graphs[MAIN] is not None and bg.flops is None:
        bg.flops = count_flops(bg.graphs[MAIN], bg.counts)
    if meth.one_graph and len({id(g) for g in bg.graphs.values()}) > 1:  # not joined by the method yet:
        # the variants become branches of one graph (passes/branch.py)
        joined = branch_variants({v: ctx.base if g is None else g for v, g in bg.graphs.items()})
        bg = dataclasses.replace(bg, graphs={v: joined for v in bg.graphs})
    names = {}
    for variant, g in bg.graphs.items():
        names[variant] = BASE_GRAPH if g is None else (f"bucket_{index}.onnx" if variant == MAIN
                                                       else f"bucket_{index}_{variant}.onnx")
        if g is not None:
            digest = hashlib.sha256(g.SerializeToString()).hexdigest()  # the bytes onnx.save writes
            if digest in staged:
                names[variant] = staged[digest]
                continue
            save_checked(g, ctx.stage / names[variant])
            staged[digest] = staged[sha256_file(ctx.stage / names[variant])] = names[variant]
    done.record(key + "#files", sorted(set(names.values()) - {BASE_GRAPH}))
    done.remember(key, {"variants": names, "meta": bg.meta, "r": bg.r, "kept_tokens": bg.kept_tokens,
                        "counts": bg.counts, "flops": bg.flops})
    return bg, names


