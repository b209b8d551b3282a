"""Model -> plan: export, passes per bucket, measurements, manifest and report (DESIGN.md §1, §5)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from tqdm.auto import tqdm

from export.buckets import DEFAULT_BUCKETS, parse_buckets
from export.families import family_of
from export.load import DEFAULT_MODEL, load_transformer
from export.measure import export_fidelity, feed_of, interleaved_latency, tome_fidelity
from export.onnx_export import WEIGHTS_FILE, example_inputs, export_onnx
from passes.cleanup import FreeTokenAxisPass, RemoveNoopSqueezePass
from passes.errors import DitmergeError
from passes.flops import count_flops
from passes.infra import PassManager
from passes.onnxutil import get_model_meta, save_checked
from passes.partition import draw_partition
from passes.tome import DEFAULT_LOCATIONS, PARTITION_INPUT, PARTITION_INV_INPUT, ToMeConfig, ToMePass
from runtime.plan import FORMAT_VERSION, PLAN_FILE, sha256_file
from runtime.runners import OrtRunner, SharedWeights

logger = logging.getLogger(__name__)

METHODS = ("tome",)
BASE_GRAPH = "base.onnx"


@dataclasses.dataclass
class BucketResult:
    index: int
    t_lo: int
    t_hi: int
    ratio: float
    r: int
    kept_tokens: int
    graph: str
    flops_rel: float
    fidelity_max_abs: float | None = None
    latency_ms: float | None = None
    speedup: float | None = None


def _versions() -> dict[str, str]:
    import diffusers
    import onnxruntime

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _json_config(config) -> dict:
    return json.loads(json.dumps(dict(config), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def build_plan(model: str = DEFAULT_MODEL, method: str = "tome", buckets: str = DEFAULT_BUCKETS,
               out: str | Path = "plan", locations: Sequence[str] = DEFAULT_LOCATIONS,
               grid: tuple[int, int] | None = None, text_len: int = 8, num_train_timesteps: int = 1000,
               measure: bool = True, repeats: int = 20, progress: bool = True) -> dict:
    """Build a plan directory for ``model`` and return its manifest.

    Args:
        model: a hub id, a local diffusers folder, or ``builtin:tiny-dit``.
        method: the merge method; only "tome" so far.
        buckets: ratios per timestep bucket, "0.5,0.3" (equal spans, noisiest first) or "999-500:0.5,499-0:0.3".
        out: the plan directory; an existing plan there is replaced only once the new one is complete.
        locations: where ToMe merges: attn (self-attention), xattn (cross-attention queries), joint
            (MMDiT image stream), mlp.
        grid: token grid (rows, cols); the model's native size when None.
        text_len: prompt length of text-conditioned models.
        num_train_timesteps: the timestep range the buckets cover.
        measure: measure fidelity and latency (skipped: the report carries FLOPs only).
        repeats: timed forwards per graph for the latency medians.
        progress: show progress bars.
    """
    t_start = time.perf_counter()
    if method not in METHODS:
        raise DitmergeError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    specs = parse_buckets(buckets, num_train_timesteps)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DitmergeError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (out / PLAN_FILE).exists() and not (out / ".staging").exists():
        raise DitmergeError(f"--out {out} is a non-empty directory that holds no plan; choose an empty or new one")
    stage = out / ".staging"
    if stage.exists():
        shutil.rmtree(stage)
    created = not out.exists()
    stage.mkdir(parents=True)
    try:
        manifest = _build(model=model, method=method, specs=specs, buckets=buckets, stage=stage,
                          locations=locations, grid=grid, text_len=text_len,
                          num_train_timesteps=num_train_timesteps, measure=measure, repeats=repeats, progress=progress)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    _publish(stage, out)
    logger.info("plan written to %s in %.1f s", out, time.perf_counter() - t_start)
    return manifest


def _build(model: str, method: str, specs: list, buckets: str, stage: Path,
           locations: Sequence[str], grid: tuple[int, int] | None, text_len: int, num_train_timesteps: int,
           measure: bool, repeats: int, progress: bool) -> dict:
    """Everything of :func:`build_plan` that writes into the staging directory."""
    steps = tqdm(total=3 + len(specs) + (1 if measure else 0), desc="ditmerge export", unit="step",
                 disable=not progress, leave=False)
    steps.set_postfix_str("loading model")
    torch_model = load_transformer(model)
    family = family_of(torch_model)
    grid = tuple(grid) if grid else family.default_grid(torch_model)
    config = ToMeConfig(ratio=0.0, locations=tuple(locations))
    for spec in specs:
        dataclasses.replace(config, ratio=spec.ratio).validate(grid)
    steps.update()

    # 1. Export the unmerged graph, weights in one file every bucket graph shares
    steps.set_postfix_str("exporting to ONNX")
    export_onnx(torch_model, stage / BASE_GRAPH, grid, text_len)
    steps.update()

    # 2. Cleanups the exporter owes us (PixArt's invalid Squeeze, token counts baked into reshapes)
    steps.set_postfix_str("cleaning up")
    base = onnx.load(stage / BASE_GRAPH, load_external_data=False)
    n_tokens = grid[0] * grid[1]
    base = PassManager([RemoveNoopSqueezePass(), FreeTokenAxisPass(n_tokens)]).__call__(base).model
    save_checked(base, stage / BASE_GRAPH)
    base_flops = count_flops(base)
    steps.update()

    # 3. One graph per bucket
    results: list[BucketResult] = []
    tome_meta: dict[int, dict] = {}
    for i, spec in enumerate(specs):
        steps.set_postfix_str(f"bucket {i}: tome ratio {spec.ratio}")
        res = ToMePass(dataclasses.replace(config, ratio=spec.ratio), bucket=i)(base)
        if res.modified:
            graph = f"bucket_{i}.onnx"
            save_checked(res.model, stage / graph)
            meta = json.loads(get_model_meta(res.model)["tome"])
            tome_meta[i] = meta
            r, flops = meta["r"], count_flops(res.model)
        else:
            graph, r, flops = BASE_GRAPH, 0, base_flops
        results.append(BucketResult(i, spec.t_lo, spec.t_hi, spec.ratio, r, n_tokens - r, graph, flops / base_flops))
        steps.update()

    # 4. Measure: fidelity against eager PyTorch, latency against the unmerged graph (same backend)
    report: dict = {"backend": "onnxruntime-cpu", "batch": 2}
    if measure:
        steps.set_postfix_str("measuring fidelity and latency")
        weights = SharedWeights(stage / WEIGHTS_FILE)
        runners = {g: OrtRunner(stage / g, ["CPUExecutionProvider"], weights) for g in {r.graph for r in results} | {BASE_GRAPH}}
        inputs = example_inputs(torch_model, 2, grid, text_len, seed=1)
        report["export_fidelity_max_abs"] = export_fidelity(torch_model, runners[BASE_GRAPH], inputs)
        for res in results:
            if res.index in tome_meta:
                res.fidelity_max_abs = tome_fidelity(torch_model, runners[res.graph], inputs, tome_meta[res.index], grid)
            else:
                res.fidelity_max_abs = report["export_fidelity_max_abs"]
        feed = feed_of(inputs)
        part, inv = draw_partition(grid, config.stride, None)
        calls = {g: (lambda rn=rn: rn.infer({**feed, PARTITION_INPUT: part, PARTITION_INV_INPUT: inv}
                                            if PARTITION_INPUT in rn.input_meta else feed))
                 for g, rn in runners.items()}
        lat = interleaved_latency(calls, repeats=repeats)
        report["base_latency_ms"] = lat[BASE_GRAPH] * 1e3
        for res in results:
            res.latency_ms = lat[res.graph] * 1e3
            res.speedup = lat[BASE_GRAPH] / lat[res.graph]
        for rn in runners.values():
            rn.deactivate()
        steps.update()
    steps.close()

    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool_versions": _versions(),
        "model": {"source": model, "class": family.class_name, "family": family.name, "grid": list(grid),
                  "tokens": n_tokens, "text_len": text_len, "timestep_scale": family.timestep_scale,
                  "num_train_timesteps": num_train_timesteps, "config": _json_config(torch_model.config)},
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(stage / WEIGHTS_FILE)},
        "method": {"name": method, "params": {"locations": list(config.locations), "stride": list(config.stride)}},
        "schedule": {"buckets": buckets},
        "base": {"graph": BASE_GRAPH, "sha256": sha256_file(stage / BASE_GRAPH), "flops": base_flops},
        "buckets": [{**dataclasses.asdict(r), "sha256": sha256_file(stage / r.graph), "engines": {},
                     "tome": tome_meta.get(r.index)} for r in results],
        "report": report,
    }
    (stage / "report.md").write_text(render_report(manifest))
    (stage / PLAN_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def _publish(stage: Path, out: Path) -> None:
    """Move the staged plan into ``out``: invalidate the old plan first, rename plan.json last."""
    (out / PLAN_FILE).unlink(missing_ok=True)
    for f in stage.iterdir():
        if f.name != PLAN_FILE:
            os.replace(f, out / f.name)
    keep = {f.name for f in out.iterdir()} - {f.name for f in stage.iterdir()}
    os.replace(stage / PLAN_FILE, out / PLAN_FILE)
    stage.rmdir()
    # graphs of an older plan that this one no longer references
    current = {PLAN_FILE, "report.md", WEIGHTS_FILE, BASE_GRAPH} | {
        b["graph"] for b in json.loads((out / PLAN_FILE).read_text())["buckets"]}
    for name in keep:
        if name.endswith(".onnx") and name not in current:
            (out / name).unlink()


def bucket_table(manifest: dict) -> str:
    """The per-bucket table, as markdown."""
    rows = ["| bucket | timesteps | ratio | r | tokens kept | FLOPs vs full | fidelity (max abs) | latency ms | speed-up |",
            "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for b in manifest["buckets"]:
        rows.append(f"| {b['index']} | {b['t_hi']}..{b['t_lo']} | {b['ratio']:g} | {b['r']} | {b['kept_tokens']} | "
                    f"{b['flops_rel']:.3f} | {fmt(b['fidelity_max_abs'], '.2e')} | {fmt(b['latency_ms'], '.2f')} | "
                    f"{fmt(b['speedup'], '.2f')}x |")
    return "\n".join(rows)


def render_report(manifest: dict) -> str:
    m, rep = manifest["model"], manifest["report"]
    lines = [f"# ditmerge plan: {m['source']}", "",
             f"- model: {m['class']} ({m['family']}), grid {m['grid'][0]}x{m['grid'][1]} = {m['tokens']} tokens",
             f"- method: {manifest['method']['name']} {manifest['method']['params']}",
             f"- built {manifest['created']} with {', '.join(f'{k} {v}' for k, v in manifest['tool_versions'].items())}"]
    if "export_fidelity_max_abs" in rep:
        lines += [f"- export fidelity (unmerged graph vs eager PyTorch, fp32, batch {rep['batch']}): "
                  f"max abs error {rep['export_fidelity_max_abs']:.2e}",
                  f"- unmerged graph latency on {rep['backend']}: {rep['base_latency_ms']:.2f} ms per forward "
                  "(median of interleaved runs); speed-up = unmerged / bucket latency",
                  "- bucket fidelity: bucket graph vs the eager twin with the same partition"]
    return "\n".join(lines + ["", bucket_table(manifest), ""])
