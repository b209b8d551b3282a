"""Tune a plan to a quality budget: the fastest schedule whose images stay within a stated quality.

The plan's graphs are built once (:func:`export.build.build_plan` into a work directory); every candidate
schedule is then a set of per-bucket overrides of that manifest (:mod:`export.tune_space`) run by one
:class:`~runtime.transformer.PlanTransformer` whose sessions serve all candidates. Quality is measured on
seeded calibration generations against the unmerged plan's images for the same seeds (PSNR, SSIM, and the
classifier-FID where :mod:`export.report_quality` can compute it); speed is predicted from per-forward
latencies measured once per distinct (graph, counts) and the calls each schedule makes. The search
evaluates uniform schedules, then moves one knob at a time from the fastest one that passed (greedy);
evaluations are kept in ``search.json`` in the work directory, so an interrupted or repeated search reuses
them. The chosen schedule is checked on held-out seeds and written as an ordinary plan. Class-conditional
models generate with DDIM (:mod:`runtime.generate`); text families through their own diffusers pipeline,
prompts encoded once (:mod:`export.tune_samplers`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from export.load import DEFAULT_MODEL
from export.tune_space import Space, bucket_ranges, space_for
from passes.errors import DitmergeError
from runtime.plan import PLAN_FILE

logger = logging.getLogger(__name__)

SEARCH_FILE = "search.json"
BUILD_FILE = "tune_build.json"
HELDOUT_SEED = 100_000  # held-out seeds start here; calibration seeds are 0..samples-1


@dataclasses.dataclass(frozen=True)
class Targets:
    """What a schedule must keep: mean PSNR/SSIM against the unmerged images, relative FID increase."""

    psnr: float | None = None
    ssim: float | None = None
    fid_increase: float | None = None

    def check(self) -> None:
        if self.psnr is None and self.ssim is None and self.fid_increase is None:
            raise DitmergeError("give a quality target: target_psnr (dB), target_ssim or target_fid_increase")
        if self.psnr is not None and not (np.isfinite(self.psnr) and self.psnr > 0):
            raise DitmergeError(f"target PSNR must be a positive number of dB (e.g. 30), got {self.psnr}")
        if self.ssim is not None and not (0 < self.ssim <= 1):
            raise DitmergeError(f"target SSIM must be in (0, 1] (1: identical images; e.g. 0.9), got {self.ssim}")
        if self.fid_increase is not None and not (np.isfinite(self.fid_increase) and self.fid_increase >= 0):
            raise DitmergeError(f"target FID increase is a relative increase >= 0 (0.05: at most +5 % FID), "
                                f"got {self.fid_increase}")

    def misses(self, q: dict) -> list[str]:
        """The targets ``q`` misses, in words (empty: it meets them all)."""
        out = []
        if self.psnr is not None and not q["psnr_db"]["mean"] >= self.psnr:
            out.append(f"PSNR {q['psnr_db']['mean']:.2f} < {self.psnr:g} dB")
        if self.ssim is not None and not q["ssim"]["mean"] >= self.ssim:
            out.append(f"SSIM {q['ssim']['mean']:.4f} < {self.ssim:g}")
        if self.fid_increase is not None and not q["fid_increase"] <= self.fid_increase:
            out.append(f"FID +{100 * q['fid_increase']:.1f} % > +{100 * self.fid_increase:g} %")
        return out

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def tune_plan(model: str = DEFAULT_MODEL, method: str = "cache", out: str | Path = "plan",
              target_psnr: float | None = None, target_ssim: float | None = None,
              target_fid_increase: float | None = None, buckets: int | str = 3,
              options: dict[str, object] | None = None, levels: dict[str, Sequence] | None = None,
              locations: Sequence[str] | None = None, grid: tuple[int, int] | None = None, text_len: int = 8,
              num_train_timesteps: int = 1000, samples: int = 12, heldout_samples: int | None = None,
              steps: int = 20, guidance: float | None = None, classes: Sequence[int] | None = None,
              prompts: Sequence[str] | str | Path | None = None, prompt_embeds: str | Path | None = None,
              repeats: int = 10, work_dir: str | Path | None = None, keep_work: bool = False,
              check_fidelity: bool = True, progress: bool = True) -> dict:
    """Search the method's schedules for the fastest one meeting every given target; write it as a plan.

    Args:
        model, method, grid, text_len, num_train_timesteps, locations: as :func:`export.build.build_plan`;
            methods: cache (interval per bucket, warm-up) and tome (ratio per bucket).
        out: the plan directory written for the chosen schedule.
        target_psnr: minimum mean PSNR (dB) of the calibration images against the unmerged plan's.
        target_ssim: minimum mean SSIM against the unmerged plan's images.
        target_fid_increase: maximum relative classifier-FID increase over the unmerged plan (0.05: +5 %).
        buckets: number of equal timestep buckets, or a spec whose ranges are used ("999-500:0,499-0:0").
        options: the method's fixed options (e.g. the cache span); the tuned ones are chosen.
        levels: candidate values per knob kind, least aggressive first: interval, full_above (cache), ratio (tome).
        samples: calibration generations (one image per seed, classes or prompts round-robin).
        heldout_samples: generations on seeds the search never saw, for the chosen plan's check (default: samples).
        steps: denoising steps of the generations (DDIM for class-conditional models; a text family's own
            pipeline scheduler).
        guidance: classifier-free guidance (None: 4 for class-conditional models, the pipeline's default else).
        classes: class labels to generate (default: all classes of the model).
        prompts: text families: the prompts (a list, or a file with one per line; default: a short built-in list),
            encoded by the pipeline folder's text encoders.
        prompt_embeds: text families without text encoders in the folder: a safetensors file of the pipeline
            call's embedding arguments (prompt as the first axis; docs/tuner.md); instead of prompts.
        repeats: timed forwards per (graph, counts) for the latency medians.
        work_dir: where the built plan and the search record live (default: ``out/.tuning``); a search there
            with the same inputs resumes, reusing every schedule already evaluated.
        keep_work: keep the work directory after success (a later search with other targets reuses it).
        check_fidelity: check the built graphs against their eager twins (the build's measurement).
        progress: show progress bars.
    """
    t0 = time.perf_counter()
    targets = Targets(target_psnr, target_ssim, target_fid_increase)
    targets.check()
    if samples < 2 or (heldout_samples is not None and heldout_samples < 2):
        raise DitmergeError(f"the tuner needs at least 2 calibration and held-out samples, got {samples}/{heldout_samples}")
    if steps < 2:
        raise DitmergeError(f"steps must be at least 2, got {steps}")
    if target_fid_increase is not None and (prompts is not None or prompt_embeds is not None):
        raise DitmergeError(_NO_TEXT_FID)
    if target_fid_increase is not None and samples < 50:
        logger.warning("a FID target on %d samples: the classifier-FID of so few images is mostly sampling noise "
                       "(the held-out check will say); use samples >= 50 or a PSNR/SSIM target", samples)
    options = dict(options or {})
    if locations is not None:
        options["locations"] = tuple(locations)
    space = space_for(method, bucket_ranges(buckets, num_train_timesteps), options, levels)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DitmergeError(f"--out {out} exists and is not a directory")
    work = Path(work_dir) if work_dir is not None else out / ".tuning"
    if (out.exists() and any(out.iterdir()) and not (out / PLAN_FILE).exists()
            and not any((out / d).exists() for d in (".staging", ".tuning"))):
        raise DitmergeError(f"--out {out} is a non-empty directory that holds no plan; choose an empty or new one")
    work.mkdir(parents=True, exist_ok=True)

    from export.tune_eval import Evaluator
    from export.tune_samplers import make_sampler

    plan_dir = _build_once(work, model, space, grid, text_len, num_train_timesteps, check_fidelity, progress)
    manifest = json.loads((plan_dir / PLAN_FILE).read_text())
    space.check_built(plan_dir, manifest)
    if target_fid_increase is not None and manifest["model"]["family"] != "dit":
        raise DitmergeError(_NO_TEXT_FID)
    sampler = make_sampler(manifest, classes, prompts, prompt_embeds, steps, guidance)
    key = {"model": model, "method": space.method, "options": _jsonable(options), "buckets": _jsonable(
        [dataclasses.astuple(s) for s in space.specs]), "knobs": [[k.name, list(k.values)] for k in space.knobs],
        "samples": samples, "steps": steps, "guidance": sampler.guidance, **sampler.key(),
        "plan": manifest["base"]["sha256"], "weights": manifest["weights"]["sha256"]}
    ev = Evaluator(plan_dir, manifest, space, targets, sampler, samples, repeats, record=work / SEARCH_FILE, key=key,
                   fid=targets.fid_increase is not None)
    found = search(ev, space, targets, progress)
    chosen = found["chosen"]
    held = ev.heldout(chosen, heldout_samples or samples, HELDOUT_SEED)
    measured = ev.measured_speedup(chosen)
    result = _write_plan(out, ev, chosen, found, held, measured, targets, time.perf_counter() - t0)
    ev.close()
    if not keep_work and work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("tuned plan written to %s: %s, predicted %.2fx, measured %.2fx", out, space.describe(chosen),
                ev.speedup(chosen), measured)
    return result


def search(ev, space: Space, targets: Targets, progress: bool = True) -> dict:
    """Uniform schedules while they pass, then greedy single-knob moves from the fastest passing one.

    A knob whose next level fails is frozen (quality falls as any knob gets more aggressive, so a later
    move elsewhere would not rescue it). Returns the chosen (fastest passing) schedule and the trail.
    """
    bar = tqdm(desc="ditmerge tune", unit="schedule", disable=not progress, leave=False)
    passed: dict[tuple, float] = {}

    def evaluate(levels: tuple[int, ...]) -> bool:
        bar.set_postfix_str(space.describe(levels))
        q = ev.quality(levels)
        bar.update()
        if targets.misses(q):
            return False
        passed[levels] = ev.speedup(levels)
        return True

    n = len(space.knobs)
    sigs: dict[tuple, object] = {}

    def sig(levels: tuple[int, ...]):
        if levels not in sigs:
            sigs[levels] = ev.signature(levels)
        return sigs[levels]

    def step(levels: tuple[int, ...], k: int) -> tuple[int, ...] | None:
        """Knob k's next level that changes what runs (levels that change nothing are skipped, unevaluated)."""
        for v in range(levels[k] + 1, len(space.knobs[k].values)):
            moved = levels[:k] + (v,) + levels[k + 1:]
            if sig(moved) is None or sig(moved) != sig(levels):
                return moved
        return None

    current = (0,) * n
    top = max(len(k.values) for k in space.knobs if k.per_bucket)
    for j in range(1, top):  # phase 1: uniform over the per-bucket knobs
        levels = tuple(min(j, len(k.values) - 1) if k.per_bucket else 0 for k in space.knobs)
        if sig(levels) is not None and sig(levels) == sig(current):
            continue
        if not evaluate(levels):
            break
        current = levels
    frozen: set[int] = set()
    while True:  # phase 2: greedy
        ok = []
        for k in range(n):
            m = None if k in frozen else step(current, k)
            if m is None or not evaluate(m):
                frozen.add(k)
            else:
                ok.append(m)
        if not ok:
            break
        current = max(ok, key=lambda m: passed[m])
    bar.close()
    if not passed:
        least = min(ev.evaluated(), key=lambda lv: sum(lv))
        raise DitmergeError(f"no {space.method} schedule meets the target ({_targets_text(targets)}): even the least "
                            f"aggressive one ({space.describe(least)}) gives {', '.join(targets.misses(ev.quality(least)))}; "
                            "the unmerged plan is the answer (`python -m export --method tome --buckets 0`, or the model as is)")
    chosen = max(passed, key=lambda lv: (passed[lv], -sum(lv)))
    if passed[chosen] <= 1.0:
        raise DitmergeError(f"the {space.method} schedules that meet the target ({_targets_text(targets)}) are no faster "
                            f"than the unmerged plan (best: {space.describe(chosen)}, predicted {passed[chosen]:.2f}x); "
                            "the unmerged plan is the answer (`python -m export --method tome --buckets 0`)")
    return {"chosen": chosen, "passed": sorted(passed)}


_NO_TEXT_FID = ("FID targets need the bundled crop classifier, which scores class-conditional samples of the bundled "
                "model only; for a text-to-image model give target_psnr or target_ssim (--target-psnr, --target-ssim)")


def _targets_text(t: Targets) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in t.as_dict().items())


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _build_once(work: Path, model: str, space: Space, grid, text_len: int, num_train_timesteps: int,
                measure: bool, progress: bool) -> Path:
    """The space's plan, built into ``work/plan`` unless a build with the same inputs is there."""
    from export.build import build_plan
    from export.plan_io import fingerprint

    plan_dir = work / "plan"
    args = space.build_args()
    key = _jsonable({"model": model, "fingerprint": fingerprint(model), **args, "grid": grid, "text_len": text_len,
                     "num_train_timesteps": num_train_timesteps, "measure": measure})
    stamp = plan_dir / BUILD_FILE
    if (plan_dir / PLAN_FILE).is_file() and stamp.is_file() and json.loads(stamp.read_text()) == key:
        logger.info("tune: reusing the plan built in %s", plan_dir)
        return plan_dir
    logger.info("tune: building the %s graphs once (%s)", space.method, args["buckets"])
    build_plan(model=model, out=plan_dir, grid=grid, text_len=text_len, num_train_timesteps=num_train_timesteps,
               measure=measure, repeats=3, quality_samples=0, progress=progress, **args)
    stamp.write_text(json.dumps(key))
    return plan_dir


def _write_plan(out: Path, ev, chosen: tuple, found: dict, held: dict, measured: float, targets: Targets,
                seconds: float) -> dict:
    """The chosen schedule as a plan directory: its graphs (linked), manifest, report and frontier PNG."""
    from export.build_report import render_report
    from export.plan_io import publish
    from export.report_quality import write_grid
    from export.tune_report import plot_frontier, search_rows, tune_section
    from runtime.plan import sha256_file

    space = ev.space
    manifest = space.apply(ev.manifest, chosen)
    ev.fill_latency(manifest)
    rows = search_rows(ev, targets)
    misses = targets.misses(held["quality"])
    manifest["report"]["tune"] = {
        "targets": targets.as_dict(), "schedule": space.values(chosen), "levels": list(chosen),
        "sampler": ev.sampler.describe(),
        "calibration": {**ev.quality(chosen), "seeds": [0, ev.samples - 1]},
        "heldout": {**held["quality"], "seeds": [HELDOUT_SEED, HELDOUT_SEED + held["quality"]["samples"] - 1],
                    "meets_target": not misses, "misses": misses},
        "predicted_speedup": ev.speedup(chosen), "measured_speedup": measured,
        "evaluations": len(rows), "evaluations_run": ev.runs, "evaluations_reused": ev.reused,
        "evaluations_shared": ev.twins,
        "search_seconds": seconds, "table": rows}
    if misses:
        logger.warning("the chosen schedule misses the target on held-out seeds: %s", "; ".join(misses))
    stage = out / ".staging"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    files = {manifest["weights"]["file"], manifest["base"]["graph"]} | {
        v["file"] for b in manifest["buckets"] for v in b["graphs"].values()}
    for f in files:
        if not ((out / f).is_file() and os.path.samefile(ev.plan_dir / f, out / f)):  # rename() would not move a link
            _link(ev.plan_dir / f, stage / f)  # onto its own target, so a file out/ already holds stays
    for b in manifest["buckets"]:
        b["sha256"] = sha256_file(ev.plan_dir / b["graph"])
    plot_frontier(rows, chosen, held, targets, stage / "tune_frontier.png")
    write_grid(stage / "samples.png", held["reference"][:10], held["images"][:10],
               scale=max(1, 128 // held["images"].shape[-1]))  # the bundled model's 32 px: 4x
    (stage / "report.md").write_text(render_report(manifest) + "\n" + tune_section(manifest, space))
    (stage / PLAN_FILE).write_text(json.dumps(manifest, indent=2))
    publish(stage, out)
    return manifest


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


__all__ = ["Targets", "search", "tune_plan"]
