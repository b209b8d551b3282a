"""The tuner's measurements: one set of sessions, seeded generations per schedule, predicted speed.

One :class:`~runtime.transformer.PlanTransformer` runs every candidate: a candidate is a
:class:`~runtime.plan.Plan` over the same directory with its own manifest, swapped in with its policy, so
each graph file's onnxruntime session is opened once for the whole search. Speed is predicted, not timed
per candidate: per-forward latencies are measured once per distinct (graph, counts) at the batch of one
image's calls (2 with classifier-free guidance; Flux: 1) and, for text families, the prompts' length,
interleaved, medians; a schedule's end-to-end latency is the sum over the
calls it made of their latency plus the per-step overhead outside the graphs (scheduler, feeds), taken from
one timed unmerged generation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from export.build_measure import call_key, variant_runner
from export.measure import interleaved_latency
from export.quality import frechet_distance, psnr, ssim, summarize
from export.report_quality import _bundled_classifier, unmerged_view
from passes.counts import count_feed
from passes.errors import DitmergeError
from runtime.branches import branch_of
from runtime.plan import Plan
from runtime.policies import policy_for
from runtime.transformer import PlanTransformer, graph_inputs

logger = logging.getLogger(__name__)


class Evaluator:
    """Quality and predicted speed of a space's schedules, recorded in ``record`` (JSON) as they come."""

    def __init__(self, plan_dir: Path, manifest: dict, space, targets, sampler, samples: int, repeats: int,
                 record: Path, key: dict, fid: bool = False) -> None:
        """``sampler``: what generates (export.tune_samplers: class-conditional DDIM, or a text family's pipeline)."""
        self.plan_dir, self.manifest, self.space, self.targets = plan_dir, manifest, space, targets
        self.sampler, self.samples, self.repeats = sampler, samples, repeats
        self.steps, self.guidance = sampler.steps, sampler.guidance
        self.built = Plan(plan_dir, manifest)
        self.reference = unmerged_view(self.built)
        self.tf = PlanTransformer(self.built, backend="cpu")
        self.path = record
        data = json.loads(record.read_text()) if record.is_file() else {}
        if data.get("key") != key:
            if data:
                logger.info("tune: %s was recorded for other inputs; starting the search over", record)
            data = {"key": key, "evaluations": {}}
        self.data = data
        self.runs = self.reused = self.twins = 0  # generations, read from the record, equal to another
        self._seen: set[str] = set()
        self._inputs: dict[str, dict] = {}
        self.clf = _bundled_classifier(self.built, any_source=False) if fid else None  # FID costs a 512-d sqrtm
        if fid and self.clf is None:
            raise DitmergeError("a FID target needs the bundled crop classifier, which scores only the bundled model "
                                "(builtin:tiny-dit and models fine-tuned from it); use target_psnr or target_ssim")
        self._real = None
        self.ref_images = self._reference_images()
        self._latency()

    # -- generations --------------------------------------------------------------------------------
    def jobs(self, count: int, seed0: int) -> list:
        return self.sampler.jobs(count, seed0)

    def _use(self, plan: Plan) -> None:
        """Point the shared transformer at another schedule: same files, same sessions."""
        self.tf.use_plan(plan)

    def generate(self, plan: Plan, jobs: list) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """Images of ``jobs`` through ``plan`` and the (bucket, variant) of each call of one loop."""
        self._use(plan)
        calls: list[tuple[int, str]] = []
        times: list[float] = []
        select = self.tf.policy.select

        def recorded(state, bucket, batch):
            variant, feed = select(state, bucket, batch)
            calls.append((bucket.index, variant))
            times.append(float(state.t))
            return variant, feed

        self.tf.policy.select = recorded
        images, first, chunk = [], None, self.sampler.chunk
        for i in range(0, len(jobs), chunk):
            calls.clear()
            times.clear()
            images.append(self.sampler.images(self.tf, jobs[i:i + chunk]))
            if first is None:  # and the training-scale timestep of each of its calls
                first, self._times = list(calls), list(times)
        return np.concatenate(images), first

    def _reference_images(self) -> np.ndarray:
        path = self.path.with_name("reference.npy")
        recorded = "call_t" in self.data or self.sampler.timesteps(1.0) is not None  # a pipeline's timesteps
        if path.is_file() and "reference_fid" in self.data and recorded:
            ref = np.load(path)
            if len(ref) == self.samples:
                if self.clf is not None and self.data["reference_fid"] is None:  # recorded by a search without FID
                    self.data["reference_fid"] = self._fid(ref)
                    self._write()
                return ref
        ref, _ = self.generate(self.reference, self.jobs(self.samples, 0))
        np.save(path, ref)
        self.data["reference_fid"] = self._fid(ref)
        self.data["call_t"] = self._times  # a pipeline's timesteps, for the dry runs (its scheduler's own)
        self._write()
        return ref

    def _fid(self, images: np.ndarray) -> float | None:
        if self.clf is None:
            return None
        from export.classifier import predict
        from export.photos import heldout

        if self._real is None:
            self._real = predict(self.clf, heldout()[0])[1]
        return frechet_distance(predict(self.clf, images)[1], self._real)

    def score(self, images: np.ndarray, ref: np.ndarray, ref_fid: float | None) -> dict:
        q = {"samples": len(images), "steps": self.steps, "guidance": self.guidance,
             "psnr_db": summarize(psnr(images, ref), "min"), "ssim": summarize(ssim(images, ref), "min")}
        if ref_fid is not None:
            fid = self._fid(images)
            q.update(fid=fid, fid_unmerged=ref_fid, fid_increase=(fid - ref_fid) / ref_fid)
        return q

    # -- schedules ----------------------------------------------------------------------------------
    def plan(self, levels: tuple[int, ...]) -> Plan:
        return Plan(self.plan_dir, self.space.apply(self.manifest, levels))

    def evaluated(self) -> list[tuple[int, ...]]:
        return [tuple(e["levels"]) for e in self.data["evaluations"].values()]

    def record(self, levels: tuple[int, ...]) -> dict:
        return self.data["evaluations"][",".join(map(str, levels))]

    def signature(self, levels: tuple[int, ...]) -> list[str] | None:
        """What runs at each call of one generation, as (graph, counts) keys, from a dry run of the policy.

        Schedules with equal signatures compute the same images (the knobs only choose graphs and counts), so
        one generation serves them all. None where the choice depends on the data (adaptive caching).
        """
        plan = self.plan(levels)
        if not self.space.dry_run or any(float(b.meta.get("adaptive", 0) or 0) > 0 for b in plan.buckets):
            return None
        from runtime.policies import GenState

        policy = policy_for(plan, deterministic=True)
        state = GenState(seed=0, rng=np.random.default_rng(0))
        policy.start(state)
        times = self.sampler.timesteps(float(plan.model.get("timestep_scale", 1.0)))
        out = []
        for t in self.data["call_t"] if times is None else times:
            state.t = t
            bucket = plan.bucket_for(state.t)
            variant, _ = policy.select(state, bucket, self.sampler.batch)
            policy.update(state, bucket, variant, {})
            state.steps += 1
            out.append(f"{bucket.index}|{variant}|{self._key(bucket, variant)[0]}")
        return out

    def quality(self, levels: tuple[int, ...]) -> dict:
        """The schedule's quality on the calibration seeds (generated once, then read from the record)."""
        name = ",".join(map(str, levels))
        entry = self.data["evaluations"].get(name)
        if entry is not None and self.clf is not None and "fid" not in entry["quality"]:
            entry = None  # recorded by a search without a FID target: generate again, with FID
        if entry is None:
            sig = self.signature(levels)
            twin = next((e for e in self.data["evaluations"].values() if sig is not None and e.get("signature") == sig
                         and (self.clf is None or "fid" in e["quality"])), None)
            if twin is not None:  # another schedule that runs the same graphs at the same calls
                calls, q = twin["calls"], twin["quality"]
            else:
                images, calls = self.generate(self.plan(levels), self.jobs(self.samples, 0))
                q = self.score(images, self.ref_images, self.data.get("reference_fid"))
            entry = {"levels": list(levels), "values": self.space.values(levels), "calls": calls, "quality": q,
                     "signature": sig, **({"same_as": twin["levels"]} if twin is not None else {})}
            self.data["evaluations"][name] = entry
            self._write()
            self.runs += twin is None
            self.twins += twin is not None
            self._seen.add(name)
        elif name not in self._seen:
            self._seen.add(name)
            self.reused += 1
        return entry["quality"]

    def heldout(self, levels: tuple[int, ...], count: int, seed0: int) -> dict:
        jobs = self.jobs(count, seed0)
        ref, _ = self.generate(self.reference, jobs)
        images, _ = self.generate(self.plan(levels), jobs)
        return {"quality": self.score(images, ref, self._fid(ref)), "images": images, "reference": ref}

    # -- speed --------------------------------------------------------------------------------------
    def _graph_inputs(self, graph: str) -> dict:
        if graph not in self._inputs:
            self._inputs[graph] = graph_inputs(self.plan_dir / graph)
        return self._inputs[graph]

    def _key(self, bucket, variant: str) -> tuple[str, dict]:
        graph = bucket.graphs[variant]
        counts = {k: v for k, v in count_feed(bucket.counts).items() if k in self._graph_inputs(graph)}
        return call_key(graph, counts, branch_of(bucket.meta, variant)), counts

    def _latency(self) -> None:
        """Per-forward latency of every (graph, counts) any schedule of the space runs, once, interleaved."""
        if "latency_s" in self.data:
            return
        from export.load import load_transformer
        from export.measure import feed_of
        from export.methods import get_method
        from export.onnx_export import example_inputs

        m = self.manifest["model"]
        grid = tuple(m["grid"])
        meth = get_method(self.space.method, {k: v for k, v in self.space.options.items()})
        text_len = self.sampler.text_len or m["text_len"]  # a pipeline's prompt length: what its calls send
        batch = self.sampler.batch
        ctx = SimpleNamespace(grid=grid, text_len=text_len, tokens=grid[0] * grid[1])
        feed = feed_of(example_inputs(load_transformer(m["source"]), batch, grid, text_len, seed=1))
        base = self.manifest["base"]["graph"]
        calls = {call_key(base, {}, "main"): lambda rn=self.tf.runner(base): rn.infer(feed)}
        schedules = {tuple(lv if i == k else 0 for i in range(len(self.space.knobs)))
                     for k, knob in enumerate(self.space.knobs) for lv in range(len(knob.values))}
        for levels in sorted(schedules):
            for bucket in self.plan(levels).buckets:
                for variant, graph in bucket.graphs.items():
                    key, counts = self._key(bucket, variant)
                    if key not in calls:  # a branched graph (passes/branch.py) runs each variant by its count
                        run = variant_runner(self.tf.runner(graph), self.plan_dir / graph,
                                             branch_of(bucket.meta, variant), counts)
                        extra = meth.extra_feed(ctx, bucket.meta, variant, batch)
                        calls[key] = lambda run=run, x=extra: run({**feed, **x})
        lat = interleaved_latency(calls, repeats=self.repeats)
        self._use(self.reference)
        e2e = interleaved_latency({"ref": lambda: self.sampler.one(self.tf)}, repeats=3, warmup=1)["ref"]
        self.data["latency_s"] = lat
        self.data["base_key"] = call_key(base, {}, "main")
        self.data["overhead_s"] = max(0.0, e2e / self.steps - lat[self.data["base_key"]])
        self.data["reference_e2e_s"] = e2e
        self._write()

    def predicted_s(self, levels: tuple[int, ...] | None) -> float:
        """Predicted seconds of one image (batch 2 with guidance); None: the unmerged plan."""
        lat, over = self.data["latency_s"], self.data["overhead_s"]
        if levels is None:
            return self.steps * (over + lat[self.data["base_key"]])
        buckets = {b.index: b for b in self.plan(levels).buckets}
        calls = self.record(levels)["calls"]
        return len(calls) * over + sum(lat[self._key(buckets[b], v)[0]] for b, v in calls)

    def speedup(self, levels: tuple[int, ...]) -> float:
        return self.predicted_s(None) / self.predicted_s(levels)

    def measured_speedup(self, levels: tuple[int, ...], repeats: int = 3) -> float:
        """End-to-end, one image, interleaved with the unmerged plan (medians)."""
        plans = {"ref": self.reference, "tuned": self.plan(levels)}

        def run(plan: Plan):
            self._use(plan)
            self.sampler.one(self.tf)

        lat = interleaved_latency({k: (lambda p=p: run(p)) for k, p in plans.items()}, repeats=repeats, warmup=1)
        return lat["ref"] / lat["tuned"]

    def fill_latency(self, manifest: dict) -> None:
        """The chosen plan's per-bucket latency fields, from the search's measurements."""
        lat = self.data["latency_s"]
        base = lat[self.data["base_key"]]
        plan = Plan(self.plan_dir, manifest)
        manifest["report"]["base_latency_ms"] = base * 1e3
        for b, bucket in zip(manifest["buckets"], plan.buckets):
            b["variant_latency_ms"] = {v: lat[self._key(bucket, v)[0]] * 1e3 for v in bucket.graphs}
            b["latency_ms"] = b["variant_latency_ms"]["main"]
            b["speedup"] = base * 1e3 / b["latency_ms"]

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)

    def close(self) -> None:
        for rn in self.tf._runners.values():
            rn.deactivate()
