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
from runtime.branches import variant_feed, variant_outputs
from runtime.plan import Plan
from runtime.policies import GenState, policy_for
from runtime.runners import OrtRunner, SharedWeights, ort_providers, torch_feed

logger = logging.getLogger(__name__)


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# the keyword arguments of a diffusers transformer call that each family's graph takes
_CONSUMED = {
    "dit": {"class_labels"},
    "pixart": {"encoder_hidden_states", "encoder_attention_mask", "added_cond_kwargs"},
    "sd3": {"encoder_hidden_states", "pooled_projections"},
    "flux": {"encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids", "guidance"},
}


def _check_unused(family: str, kw: dict) -> None:
    """Refuse arguments the plan's graph cannot honour (LoRA scales, IP-adapter embeds, ControlNet residuals).

    Pipelines pass some of them on every call, empty: None and empty dicts are fine.
    """
    for key, value in kw.items():
        if key in _CONSUMED.get(family, ()) or value is None or (isinstance(value, dict) and not value):
            continue
        raise DitmergeError(f"the plan cannot take {key}={_describe(value)}: its graph was exported without it "
                            f"(a {family} plan takes {', '.join(sorted(_CONSUMED.get(family, ())))})")


def _describe(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(map(str, value)) + "}"
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    return type(value).__name__


def _family_feed(family: str, hidden_states, timestep, kw: dict) -> dict[str, object]:
    """The graph inputs of ``family`` from a diffusers transformer call (see export/families.py)."""
    if family == "dit":
        return {"hidden_states": hidden_states, "timestep": timestep, "class_labels": kw.get("class_labels")}
    if family == "pixart":
        ehs = kw.get("encoder_hidden_states")
        mask = kw.get("encoder_attention_mask")
        if mask is None and ehs is not None:
            mask = torch.ones(ehs.shape[:2], dtype=torch.int64)
        added = kw.get("added_cond_kwargs") or {}
        return {"hidden_states": hidden_states, "encoder_hidden_states": ehs, "encoder_attention_mask": mask,
                "timestep": timestep, "resolution": added.get("resolution"), "aspect_ratio": added.get("aspect_ratio")}
    if family == "sd3":
        return {"hidden_states": hidden_states, "encoder_hidden_states": kw.get("encoder_hidden_states"),
                "pooled_projections": kw.get("pooled_projections"), "timestep": timestep}
    if family == "flux":
        return {"hidden_states": hidden_states, "encoder_hidden_states": kw.get("encoder_hidden_states"),
                "pooled_projections": kw.get("pooled_projections"), "timestep": timestep,
                "img_ids": kw.get("img_ids"), "txt_ids": kw.get("txt_ids"), "guidance": kw.get("guidance")}
    raise DitmergeError(f"plan is for an unknown model family {family!r}")


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
    """

    def __init__(self, plan: Plan, backend: str = "auto", seed: int = 0, deterministic: bool = False,
                 threads: int = 0, prepack: bool = True) -> None:
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.plan = plan
        self.backend = backend
        self.use_trt = _use_tensorrt(plan, backend)
        self.providers = ort_providers("auto" if backend in ("trt", "auto") else backend)
        self.seed, self.deterministic = seed, deterministic
        self.policy = policy_for(plan, deterministic)
        self.config = FrozenDict(plan.model["config"])
        self.family = plan.model["family"]
        self.grid = tuple(plan.model["grid"])
        self.timestep_scale = float(plan.model.get("timestep_scale", 1.0))
        self.threads, self.prepack = threads, prepack
        self._weights = SharedWeights(plan.dir / plan.manifest["weights"]["file"])
        self._runners: dict[str, object] = {}
        self._engine_runners: dict[str, object] = {}  # TensorRT: engine file -> its one runner
        self._inputs: dict[str, dict[str, tuple[np.dtype, list]]] = {}
        self._branches: dict[str, dict | None] = {}
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
                    self._runners[graph] = self._engine_runners[info["file"]]
                else:
                    self._runners[graph] = OrtRunner(self.plan.dir / graph, self.providers, self._weights, self.threads,
                                                     self.prepack)
                self._inputs[graph] = graph_inputs(self.plan.dir / graph)
                self._branches[graph] = graph_branches(self.plan.dir / graph)
            return self._runners[graph]

    def reset(self, seed: int | None = None) -> None:
        """Start a new generation on this thread: a fresh random stream and empty method state."""
        seed = self.seed if seed is None else seed
        self._gen.state = GenState(seed=seed, rng=np.random.default_rng(seed))
        self._gen.last_t = None
        self.policy.start(self._gen.state)

    def forward(self, hidden_states: torch.Tensor, timestep=None, return_dict: bool = True, **kwargs):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        if timestep is None:
            raise DitmergeError("the plan needs the timestep of every call")
        t = _np(timestep).astype(np.float64).reshape(-1)
        if t.size == 0:
            raise DitmergeError("timestep is empty")
        t_train = t / self.timestep_scale
        _check_unused(self.family, kwargs)
        bucket = self.plan.bucket_for(float(t_train[0]))
        if any(not self.plan.covers(bucket, float(v)) for v in t_train):
            raise DitmergeError(f"the timesteps of one call {t_train.tolist()} fall in different buckets")
        if self._gen.state is None or (self._gen.last_t is not None and t_train[0] > self._gen.last_t):
            self.reset()
        self._gen.last_t = float(t_train[0])
        state = self._gen.state
        state.t = float(t_train[0])
        state.context = self._gen.context

        batch = int(hidden_states.shape[0]) if isinstance(hidden_states, torch.Tensor) else len(hidden_states)
        variant, extra = self.policy.select(state, bucket, batch)
        graph = bucket.graphs.get(variant)
        if graph is None:
            raise DitmergeError(f"bucket {bucket.index} of the plan has no {variant!r} graph (it has "
                                f"{', '.join(bucket.graphs)}); rebuild the plan")
        runner = self.runner(graph)
        if bucket.counts:  # a bucket is a shape: its token counts are the lengths of count inputs
            extra = {**extra, **{k: v for k, v in count_feed(bucket.counts).items() if k in self._inputs[graph]}}
        values = _family_feed(self.family, hidden_states, timestep, kwargs)
        branched = self._branches.get(graph)
        if branched:  # one graph for every variant: its count picks the branch, other variants' inputs get zeros
            extra = {**extra, **variant_feed(branched, variant, self._inputs[graph], {**values, **extra})}
        # device runners (TensorRT) take torch tensors where they are; method state stays on the device
        if runner.device_io:
            feed = torch_feed(self._inputs[graph], values, extra)
        else:
            feed = self._feed(self._inputs[graph], values, extra, self.plan)
        device = hidden_states.device if isinstance(hidden_states, torch.Tensor) else torch.device("cpu")
        outputs = runner.infer(feed)  # the one path for every backend: activates the runner on first use
        if branched:
            outputs = variant_outputs(branched, variant, outputs)
        sample = torch.as_tensor(outputs["sample"]).to(device)
        if len(outputs) > 1:
            self.policy.update(state, bucket, variant, {k: v for k, v in outputs.items() if k != "sample"})
        state.steps += 1
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    @staticmethod
    def _feed(inputs: dict[str, tuple[np.dtype, list]], values: dict[str, object],
              extra: dict[str, np.ndarray] | None = None, plan: Plan | None = None) -> dict[str, np.ndarray]:
        """Check names, ranks, static dims, dynamic dims (by name: batch, text) and dtypes; cast where lossless.

        ``extra`` holds the policy's inputs (partitions, caches), passed through as they are.
        """
        extra = extra or {}
        feed: dict[str, np.ndarray] = {}
        bound: dict[str, tuple[int, str]] = {}  # dynamic dim name -> (size, the input that set it)
        for name, (want, shape) in inputs.items():
            if name in extra:
                feed[name] = np.ascontiguousarray(extra[name])
                continue
            value = values.get(name)
            if value is None:
                raise DitmergeError(f"the plan's graph needs input {name!r} {shape}, which the call did not give")
            arr = _np(value)
            if name == "timestep" and arr.ndim == 0:
                arr = arr.reshape(1)
            if arr.dtype != want:
                if arr.dtype.kind not in "biuf" or (want.kind in "iu" and arr.dtype.kind == "f" and not np.all(arr == np.round(arr))):
                    raise DitmergeError(f"input {name!r} has dtype {arr.dtype}; the graph takes {want}")
                arr = arr.astype(want)
            if arr.ndim != len(shape):
                raise DitmergeError(f"input {name!r} has shape {list(arr.shape)}; the graph takes {shape}")
            for axis, (got, exp) in enumerate(zip(arr.shape, shape)):
                if isinstance(exp, int) and got != exp:
                    raise DitmergeError(f"input {name!r} has shape {list(arr.shape)}; the graph takes {shape} "
                                        f"(axis {axis} must be {exp}){_fixed_dim_hint(name, plan)}")
                if not isinstance(exp, str):
                    continue
                if name == "timestep" and exp == "batch" and got == 1 and bound.get(exp, (1,))[0] != 1:
                    arr = np.broadcast_to(arr, (bound[exp][0],)).copy()
                    got = arr.shape[0]
                if exp not in bound:
                    bound[exp] = (got, name)
                elif got != bound[exp][0]:
                    what = "batch" if exp == "batch" else f"{exp} length"
                    raise DitmergeError(f"input {name!r} has {what} {got}, other inputs have {what} {bound[exp][0]} "
                                        f"({bound[exp][1]!r})")
            feed[name] = np.ascontiguousarray(arr)
        return feed


def _fixed_dim_hint(name: str, plan: Plan | None) -> str:
    """What to rebuild with when a call's shape differs from a plan's static dims."""
    if plan is None:
        return ""
    m = plan.model
    if name in ("hidden_states", "img_ids"):
        grid = "x".join(map(str, m.get("grid", [])))
        return (f"; the plan was built for a {grid} token grid (merged graphs have a static token count): "
                f"build a plan for this resolution with `python -m export --grid ROWSxCOLS`")
    if name in ("encoder_hidden_states", "encoder_attention_mask", "txt_ids"):
        return (f"; the plan was exported for prompts of {m.get('text_len')} tokens: rebuild it with "
                "`python -m export --text-len N` (plans from this version take any prompt length)")
    return ""


def graph_inputs(path: Path) -> dict[str, tuple[np.dtype, list]]:
    """Name -> (numpy dtype, dims with str for dynamic axes) of a graph's inputs, read from the file."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(path, load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        out[vi.name] = (np.dtype(tensor_dtype_to_np_dtype(tt.elem_type)), dims)
    return out


def graph_branches(path: Path) -> dict | None:
    """The variants of a branched graph (:mod:`passes.branch`), or None for a graph of one variant."""
    import onnx

    from passes.branch import branch_info

    return branch_info(onnx.load(path, load_external_data=False))


def _use_tensorrt(plan: Plan, backend: str) -> bool:
    """TensorRT for "trt" (or "auto" when the plan has engines and TensorRT runs here); refuse stale engines.

    Stale: built by another TensorRT or on another GPU, recorded without optimization profiles (an older
    ditmerge, one engine per bucket), or missing a profile for some bucket's counts. "auto" falls back to
    onnxruntime with a warning where "trt" refuses with the rebuild command.
    """
    if backend not in ("trt", "auto"):
        return False
    engines = plan.manifest.get("engines", {})
    has_engines = all(g in engines for b in plan.buckets for g in b.graphs.values())
    if backend == "auto" and not has_engines:
        return False
    if has_engines:
        why = _stale_profiles(plan, engines)
        if why:
            if backend == "auto":
                logger.warning("%s; using onnxruntime", why)
                return False
            raise DitmergeError(why)
    from runtime.trt_runner import gpu_name, tensorrt_status

    ok, why = tensorrt_status()
    if not ok:
        if backend == "auto":
            return False
        raise DitmergeError(f"backend 'trt' needs TensorRT on a GPU: {why}")
    if not has_engines:
        raise DitmergeError(f"plan {plan.dir} has no TensorRT engines; build them with `python -m export --backend trt`")
    import tensorrt as trt

    for graph, info in engines.items():
        if info["tensorrt"] != trt.__version__ or info["gpu"] != gpu_name():
            if backend == "auto":
                logger.warning("TensorRT engines of %s were built for %s / %s; using onnxruntime", plan.dir,
                               info["tensorrt"], info["gpu"])
                return False
            raise DitmergeError(f"engine {info['file']} was built with TensorRT {info['tensorrt']} on {info['gpu']}, "
                                f"this is TensorRT {trt.__version__} on {gpu_name()}: rebuild with --backend trt")
    return True


def _stale_profiles(plan: Plan, engines: dict) -> str:
    """Why the engines table does not serve every bucket through an optimization profile ('' when it does)."""
    rebuild = "rebuild them with `python -m export --backend trt` (same arguments)"
    for graph, info in engines.items():
        if not isinstance(info.get("profiles"), list) or not info["profiles"]:
            return (f"engine {info.get('file', graph)} of plan {plan.dir} records no optimization profiles (built "
                    f"by an older ditmerge, one engine per bucket); {rebuild}")
    for b in plan.buckets:
        for graph in sorted(set(b.graphs.values())):
            profiles = engines[graph]["profiles"]
            keys = {k for p in profiles for k in p}
            want = {k: int(v) for k, v in b.counts.items() if k in keys}
            if want not in [{k: int(v) for k, v in p.items()} for p in profiles]:
                return (f"engine {engines[graph]['file']} has no optimization profile for bucket {b.index}'s counts "
                        f"{want} (its profiles: {profiles}); {rebuild}")
    return ""


def check_scheduler(plan: Plan, scheduler) -> None:
    """Refuse a pipeline scheduler that disagrees with the plan's model: the kind of schedule (DDPM-trained
    or flow matching), the number of training timesteps, and the prediction type."""
    cfg = dict(getattr(scheduler, "config", {}) or {})
    name = type(scheduler).__name__
    want_kind = plan.scheduler_kind
    kind = "flow" if "FlowMatch" in name else "ddpm"
    if kind != want_kind:
        raise DitmergeError(f"the pipeline's scheduler {name} is a {_KIND[kind]} scheduler; the plan's {plan.model['class']} "
                            f"was trained for {_KIND[want_kind]}: use the model's own scheduler")
    want_t = int(plan.model.get("num_train_timesteps", 1000))
    got_t = cfg.get("num_train_timesteps")
    if got_t is not None and int(got_t) != want_t:
        raise DitmergeError(f"the pipeline's scheduler {name} has num_train_timesteps={got_t}; the plan's buckets "
                            f"cover the model's {want_t} training timesteps: use a scheduler with "
                            f"num_train_timesteps={want_t} or rebuild the plan with --num-train-timesteps {got_t}")
    want_pred = plan.prediction_type
    got_pred = cfg.get("prediction_type")
    if kind == "ddpm" and want_pred and got_pred and got_pred != want_pred:
        raise DitmergeError(f"the pipeline's scheduler {name} has prediction_type={got_pred!r}; the plan's model "
                            f"predicts {want_pred!r}: set the scheduler's prediction_type to {want_pred!r}")


_KIND = {"flow": "flow-matching", "ddpm": "DDPM-style (noise schedule of betas)"}


def load(plan_dir: str | Path, backend: str = "auto", seed: int = 0, deterministic: bool = False,
         verify: bool = True, threads: int = 0, prepack: bool = True, pipeline=None) -> PlanTransformer:
    """Load a plan; the result can replace ``pipe.transformer`` in a diffusers pipeline.

    With ``pipeline`` the plan checks the pipeline's scheduler against its model (a mismatch would give
    wrong images, not an error) and installs itself as ``pipeline.transformer``.
    """
    tf = PlanTransformer(Plan.load(plan_dir, verify=verify), backend=backend, seed=seed,
                         deterministic=deterministic, threads=threads, prepack=prepack)
    if pipeline is not None:
        tf.check_scheduler(pipeline.scheduler)
        pipeline.transformer = tf
    return tf
