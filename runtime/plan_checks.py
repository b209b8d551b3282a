"""What a plan must agree with before it runs: the TensorRT engines it records (built here, with a profile
for every bucket) and the pipeline's scheduler (the kind of schedule, training timesteps, prediction)."""

from __future__ import annotations

import logging

from passes.branch import VARIANT_COUNT
from passes.errors import DitmergeError
from runtime.plan import Plan

logger = logging.getLogger(__name__)


def use_tensorrt(plan: Plan, backend: str) -> bool:
    """TensorRT for "trt" (or "auto" when the plan has engines and TensorRT runs here); refuse stale engines.

    Stale: built by another TensorRT or on another GPU, recorded without optimization profiles (an older
    ditmerge, one engine per bucket), or missing a profile for some bucket's counts. "auto" falls back to
    onnxruntime with a warning where "trt" refuses with the rebuild command.
    """
    if backend not in ("trt", "auto"):
        return False
    engines = plan.record.engines
    has_engines = all(g in engines for b in plan.buckets for g in b.graphs.values())
    if backend == "auto" and not has_engines:
        return False
    if has_engines:
        why = stale_profiles(plan, engines)
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


def stale_profiles(plan: Plan, engines: dict) -> str:
    """Why the engines table does not serve every bucket through an optimization profile ('' when it does)."""
    rebuild = "rebuild them with `python -m export --backend trt` (same arguments)"
    for graph, info in engines.items():
        if not isinstance(info.get("profiles"), list) or not info["profiles"]:
            return (f"engine {info.get('file', graph)} of plan {plan.dir} records no optimization profiles (built "
                    f"by an older ditmerge, one engine per bucket); {rebuild}")
    for b in plan.buckets:
        for graph in sorted(set(b.graphs.values())):
            profiles = engines[graph]["profiles"]
            keys = {k for p in profiles for k in p} - {VARIANT_COUNT}  # a branched graph: one profile per variant
            want = {k: int(v) for k, v in b.counts.items() if k in keys}
            if want not in [{k: int(v) for k, v in p.items() if k != VARIANT_COUNT} for p in profiles]:
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
        raise DitmergeError(f"the pipeline's scheduler {name} is a {_KIND[kind]} scheduler; the plan's {plan.record.model.class_name} "
                            f"was trained for {_KIND[want_kind]}: use the model's own scheduler")
    want_t = int(plan.record.model.num_train_timesteps)
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


