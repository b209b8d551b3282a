"""A plan that stands in for ``pipe.transformer`` in a diffusers pipeline.

Each call picks the bucket whose timestep range holds the call's timestep; the method's runtime policy
(:mod:`runtime.policies`) picks which of the bucket's graph variants runs and with which extra inputs.
Cross-step state (the seeded random stream, caches, counters) belongs to one generation: it resets when
the timestep goes up (a new denoising loop) or on :meth:`PlanTransformer.reset`, and each thread has its own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from passes.counts import count_feed
from passes.errors import DitmergeError
from runtime.branches import branch_of, variant_feed, variant_outputs
from runtime.families import FamilyInputs, family_inputs
from runtime.graphfile import graph_branches, graph_facts, graph_inputs  # noqa: F401 (graph_*: public here too)
from runtime.plan import Plan
from runtime.plan_checks import check_scheduler
from runtime.plan_checks import use_tensorrt as _use_tensorrt  # the name tests patch
from runtime.policies import GenState, policy_for
from runtime.runners import InputCheck, OrtRunner, SharedWeights, ort_providers
from runtime.runners import to_numpy as _np

logger = logging.getLogger(__name__)


def _check_unused(family: FamilyInputs, kw: dict) -> None:
    """Refuse arguments the plan's graph cannot honour (LoRA scales, IP-adapter embeds, ControlNet residuals).

    Pipelines pass some of them on every call, empty: None and empty dicts are fine.
    """
    for key, value in kw.items():
        if key in family.kwargs or value is None or (isinstance(value, dict) and not value):
            continue
        raise DitmergeError(f"the plan cannot take {key}={_describe(value)}: its graph was exported without it "
                            f"(a {family.name} plan takes {', '.join(sorted(family.kwargs))})")


def _describe(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(map(str, value)) + "}"
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    return type(value).__name__


def _output(sample: torch.Tensor):
    """What a diffusers transformer returns (imported on first use: diffusers is slow to import)."""
    global _Transformer2DModelOutput
    if _Transformer2DModelOutput is None:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        _Transformer2DModelOutput = Transformer2DModelOutput
    return _Transformer2DModelOutput(sample=sample)


_Transformer2DModelOutput = None


class _Generation(threading.local):
    state: GenState | None = None
    last_t: float | None = None
    context: str | None = None  # the pipeline's cache_context name ("cond", "uncond") of the current call


class PlanTransformer(torch.nn.Module):
    """Runs a plan's bucket graphs behind the interface of a diffusers transformer.

    Args:
        plan: the loaded plan.
        backend: "auto" (TensorRT where the plan has engines and TensorRT runs, else CUDA when a GPU answers,
            else CPU), "trt", "cpu", "cuda" or "ort-trt".
        seed: seeds the partition stream of each generation.
        deterministic: no random draws at run time (ToMe: the fixed top-left partition).
        threads: onnxruntime intra-op threads (0: onnxruntime's default).
        prepack: let onnxruntime prepack MatMul weights per session (faster, but each session holds its own
            packed copy of the weights); False shares one copy among all the plan's sessions.
        spinning: let onnxruntime's idle intra-op threads spin for work instead of sleeping. "auto": on when the
            plan runs at most one graph file besides the unmerged base (see :func:`spinning_default`).
    """

    def __init__(self, plan: Plan, backend: str = "auto", seed: int = 0, deterministic: bool = False,
                 threads: int = 0, prepack: bool = True, spinning: bool | str = "auto") -> None:
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.plan = plan
        self.backend = backend
        self.use_trt = _use_tensorrt(plan, backend)
        self.providers = ort_providers("auto" if backend in ("trt", "auto") else backend)
        self.seed, self.deterministic = seed, deterministic
        self.policy = policy_for(plan, deterministic)
        model = plan.record.model
        self.config = FrozenDict(model.config)
        self.family = model.family
        self.family_inputs = family_inputs(model.family)  # what its graphs take (runtime/families.py)
        self.grid = tuple(model.grid)
        self.timestep_scale = float(model.timestep_scale)
        self.threads, self.prepack = threads, prepack
        if spinning not in (True, False, "auto"):
            raise DitmergeError(f"spinning must be True, False or 'auto', got {spinning!r}")
        self.spinning = spinning_default(plan) if spinning == "auto" else bool(spinning)
        self._weights = SharedWeights(plan.dir / plan.record.weights.file)
        self._runners: dict[str, object] = {}
        self._engine_runners: dict[str, object] = {}  # TensorRT: engine file -> its one runner
        self._inputs: dict[str, dict[str, tuple[np.dtype, list]]] = {}
        self._checks: dict[str, InputCheck] = {}
        self._count_feeds: dict[tuple[int, str], dict[str, np.ndarray]] = {}
        self._last_bucket = None  # the bucket of the previous call: consecutive steps mostly share one
        self._branches: dict[str, dict | None] = {}
        self._variant_feeds: dict[str, dict] = {}  # graph -> variant_feed's cache (per shape signature)
        self._runner_lock = threading.Lock()
        self._gen = _Generation()

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs) -> Iterator[None]:
        """What Flux-style pipelines wrap each call in (diffusers' ``CacheMixin``): the name of the call
        ("cond", "uncond") is kept for the step policy, so cached state can be told apart per branch."""
        previous, self._gen.context = self._gen.context, name
        try:
            yield
        finally:
            self._gen.context = previous

    def check_scheduler(self, scheduler) -> None:
        """Refuse a scheduler whose timesteps or prediction do not fit what the plan was built for."""
        check_scheduler(self.plan, scheduler)

    def runner(self, graph: str):
        runner = self._runners.get(graph)
        if runner is not None:
            return runner
        with self._runner_lock:
            if graph not in self._runners:
                if self.use_trt:
                    from runtime.trt_runner import TrtRunner

                    # one runner per engine file: every bucket of the graph is one of its profiles
                    info = self.plan.engines(graph)
                    if info["file"] not in self._engine_runners:
                        engine = self.plan.dir / info["file"]
                        self._engine_runners[info["file"]] = TrtRunner(engine, self.plan.dir / graph, info["strip"],
                                                                       profiles=info["profiles"])
                    runner = self._engine_runners[info["file"]]
                else:
                    runner = OrtRunner(self.plan.dir / graph, self.providers, self._weights, self.threads,
                                       self.prepack, self.spinning)
                facts = graph_facts(self.plan.dir / graph)  # one parse of the file for both
                self._inputs[graph], self._branches[graph] = facts.inputs, facts.branches
                self._checks[graph] = InputCheck(self._inputs[graph],
                                                 hint=lambda name: _fixed_dim_hint(name, self.plan))
                self._runners[graph] = runner  # last: a runner seen outside the lock has its checks
            return self._runners[graph]

    def reset(self, seed: int | None = None) -> None:
        """Start a new generation on this thread: a fresh random stream and empty method state."""
        seed = self.seed if seed is None else seed
        self._gen.state = GenState(seed=seed, rng=np.random.default_rng(seed))
        self._gen.last_t = None
        self.policy.start(self._gen.state)

    def forward(self, hidden_states: torch.Tensor, timestep=None, return_dict: bool = True, **kwargs):
        if timestep is None:
            raise DitmergeError("the plan needs the timestep of every call")
        t_arr = _np(timestep)
        t = t_arr.reshape(-1)
        if t.size == 0:
            raise DitmergeError("timestep is empty")
        _check_unused(self.family_inputs, kwargs)
        t0 = float(t[0]) / self.timestep_scale  # on the training scale
        bucket = self._bucket_for(t0)
        if t.size > 1:
            ts = t.tolist()  # pipelines send one timestep for the whole batch: the equality test is the common path
            if ts.count(ts[0]) != len(ts) and not all(self.plan.covers(bucket, float(v) / self.timestep_scale)
                                                      for v in ts):
                t_train = t.astype(np.float64) / self.timestep_scale
                raise DitmergeError(f"the timesteps of one call {t_train.tolist()} fall in different buckets")
        if self._gen.state is None or (self._gen.last_t is not None and t0 > self._gen.last_t):
            self.reset()
        self._gen.last_t = t0
        state = self._gen.state
        state.t = t0
        state.context = self._gen.context

        batch = int(hidden_states.shape[0]) if isinstance(hidden_states, torch.Tensor) else len(hidden_states)
        variant, extra = self.policy.select(state, bucket, batch)
        graph = bucket.graphs.get(variant)
        if graph is None:
            raise DitmergeError(f"bucket {bucket.index} of the plan has no {variant!r} graph (it has "
                                f"{', '.join(bucket.graphs)}); rebuild the plan")
        runner = self.runner(graph)
        if bucket.counts:  # a bucket is a shape: its token counts are the lengths of count inputs
            extra = {**extra, **self._count_feed(bucket, graph)}
        # the host copy of the timestep is made once; device runners take the tensor where it is
        values = self.family_inputs.feed(hidden_states, timestep if runner.device_io else t_arr, kwargs)
        branched = self._branches.get(graph)
        if branched:  # one graph for every variant: its count picks the branch, other variants' inputs get zeros
            branch = branch_of(bucket.meta, variant)
            extra = {**extra, **variant_feed(branched, branch, self._inputs[graph], {**values, **extra},
                                             cache=self._variant_feeds.setdefault(graph, {}))}
        # device runners (TensorRT) take torch tensors where they are; method state stays on the device
        feed = self._checks[graph].feed(values, extra, device_io=runner.device_io)
        outputs = runner.infer(feed)  # the one path for every backend: activates the runner on first use
        if branched:
            outputs = variant_outputs(branched, branch, outputs)
        sample = outputs["sample"]
        on_host = not isinstance(hidden_states, torch.Tensor) or hidden_states.is_cpu
        if isinstance(sample, np.ndarray):
            sample = torch.from_numpy(sample)  # no copy
            if not on_host:
                sample = sample.to(hidden_states.device)
        elif on_host or sample.device != hidden_states.device:
            sample = torch.as_tensor(sample).to(hidden_states.device if not on_host else "cpu")
        if len(outputs) > 1:
            self.policy.update(state, bucket, variant, {k: v for k, v in outputs.items() if k != "sample"})
        state.steps += 1
        return _output(sample) if return_dict else (sample,)

    def use_plan(self, plan: Plan) -> None:
        """Run another schedule of the same files (the tuner's candidates): its buckets, counts and policy,
        the sessions kept. The per-bucket caches go: they hold the previous plan's buckets."""
        self.plan, self.policy = plan, policy_for(plan, self.deterministic)
        self._last_bucket = None
        self._count_feeds.clear()
        self._gen = _Generation()

    def _bucket_for(self, t: float):
        """The bucket of training-scale timestep ``t``; the previous call's when it still covers ``t``."""
        bucket = self._last_bucket
        if bucket is None or not self.plan.covers(bucket, t):
            bucket = self._last_bucket = self.plan.bucket_for(t)
        return bucket

    def _count_feed(self, bucket, graph: str) -> dict[str, np.ndarray]:
        """The count inputs (``passes.counts``) of ``bucket`` that ``graph`` takes, made once per bucket and graph."""
        key = (bucket.index, graph, tuple(sorted(bucket.counts.items())))
        feed = self._count_feeds.get(key)
        if feed is None:
            feed = self._count_feeds[key] = {k: v for k, v in count_feed(bucket.counts).items()
                                             if k in self._inputs[graph]}
        return feed


def _fixed_dim_hint(name: str, plan: Plan | None) -> str:
    """What to rebuild with when a call's shape differs from a plan's static dims."""
    if plan is None:
        return ""
    m = plan.record.model
    if name in ("hidden_states", "img_ids"):
        grid = "x".join(map(str, m.grid))
        return (f"; the plan was built for a {grid} token grid (merged graphs have a static token count): "
                f"build a plan for this resolution with `python -m export --grid ROWSxCOLS`")
    if name in ("encoder_hidden_states", "encoder_attention_mask", "txt_ids"):
        return (f"; the plan was exported for prompts of {m.text_len} tokens: rebuild it with "
                "`python -m export --text-len N` (plans from this version take any prompt length)")
    return ""


def spinning_default(plan: Plan) -> bool:
    """Whether ``spinning="auto"`` lets onnxruntime's intra-op threads spin for ``plan``.

    Each graph file is its own session with its own thread pool. Where the plan runs at most one graph
    file besides the unmerged base, one session is busy at a time and nothing else waits for its cores;
    with more, the spinning threads of the session that just finished compete with the next one.
    """
    base = plan.record.base.graph if plan.record.base else None
    files = {g for b in plan.buckets for g in b.graphs.values()} - {base}
    return len(files) <= 1


def load(plan_dir: str | Path, backend: str = "auto", seed: int = 0, deterministic: bool = False,
         verify: bool = True, threads: int = 0, prepack: bool = True, pipeline=None,
         spinning: bool | str = "auto") -> PlanTransformer:
    """Load a plan; the result can replace ``pipe.transformer`` in a diffusers pipeline.

    With ``pipeline`` the plan checks the pipeline's scheduler against its model (a mismatch would give
    wrong images, not an error) and installs itself as ``pipeline.transformer``.
    """
    tf = PlanTransformer(Plan.load(plan_dir, verify=verify), backend=backend, seed=seed,
                         deterministic=deterministic, threads=threads, prepack=prepack, spinning=spinning)
    if pipeline is not None:
        tf.check_scheduler(pipeline.scheduler)
        pipeline.transformer = tf
    return tf
