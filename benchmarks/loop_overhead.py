"""The share of a generation spent outside the graphs, and intra-op spinning on and off, on the bundled model.

    python benchmarks/loop_overhead.py                          # builds the bundled model's default plan
    python benchmarks/loop_overhead.py --plan plan --rounds 11 --steps 50 --label after

A generation is one image (class 3) at DiTPipeline's defaults (guidance 4.0, so batch 2 with CFG; 50
steps), with the DDIM sampler of the bundled model's scheduler config, run two ways on the same plan:
- ``dit_pipeline``: diffusers' own ``DiTPipeline`` with the plan as ``pipe.transformer``. The bundled model
  is pixel-space with 10 classes, so the pipeline gets an identity "VAE" and a thin wrapper that maps its
  hard-coded null label 1000 to the model's null label (one ``torch.where`` per call, counted as outside
  time);
- ``sample_classes``: the runtime's own loop (``runtime.generate.sample_classes``).

Each runner's ``infer`` is wrapped by a timer here (the library is not instrumented): the outside share of
a generation is ``1 - sum(infer) / total`` (wall times). The time inside ``PlanTransformer.forward`` but
outside ``infer`` is the plan's own per-call cost (input checks, policy, bucket lookup, copies); the rest is
the loop's (scheduler, CFG concatenation). On a loaded machine wall times outside the graphs stretch more
than the graphs do, so the main thread's CPU time outside the graphs is reported beside them.
Configurations are interleaved, the order alternating per round, and the figures are medians over rounds
(minima beside them).

Spinning: per-forward latency (calls at the timesteps of a 50-step schedule, through ``PlanTransformer``)
and whole generations with onnxruntime's intra-op spinning allowed and disallowed (``runtime.load(...,
spinning=...)``), interleaved. Prints a table and merges the run, under ``--label``, into
``benchmarks/results/loop_overhead.json``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402
from probe import machine  # noqa: E402
from runtime.generate import make_scheduler, sample_classes  # noqa: E402

logger = logging.getLogger("loop_overhead")
RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULER_CONFIG = Path(__file__).resolve().parents[1] / "export" / "bundled" / "scheduler" / "scheduler_config.json"
LABEL = 3


class Timer:
    """Sums the time of every ``runner.infer`` and of every ``PlanTransformer.forward`` of one plan."""

    def __init__(self, tf) -> None:
        self.graph_s = self.forward_s = self.graph_cpu_s = 0.0
        self.calls = 0
        for bucket in tf.plan.buckets:
            for graph in bucket.graphs.values():
                runner = tf.runner(graph)
                runner.activate()  # sessions are created before any timing
                if getattr(runner, "_timed", False):
                    continue
                runner.infer = self._wrap_infer(runner.infer)
                runner._timed = True
        tf.forward = self._wrap_forward(tf.forward)

    def _wrap_infer(self, infer):
        def timed(feed):
            c0, t0 = time.thread_time(), time.perf_counter()
            out = infer(feed)
            self.graph_s += time.perf_counter() - t0
            self.graph_cpu_s += time.thread_time() - c0
            self.calls += 1
            return out
        return timed

    def _wrap_forward(self, forward):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = forward(*args, **kwargs)
            self.forward_s += time.perf_counter() - t0
            return out
        return timed

    def reset(self) -> None:
        self.graph_s = self.forward_s = self.graph_cpu_s = 0.0
        self.calls = 0


class NullLabel(torch.nn.Module):
    """DiTPipeline sends class 1000 as the null label; the bundled model's null label is its class count."""

    def __init__(self, tf) -> None:
        super().__init__()
        self.tf = tf
        self.config = tf.config
        self.null = int(tf.config["num_embeds_ada_norm"])

    @property
    def dtype(self) -> torch.dtype:
        return self.tf.dtype

    @property
    def device(self) -> torch.device:
        return self.tf.device

    def forward(self, hidden_states, timestep=None, class_labels=None, **kwargs):
        class_labels = torch.where(class_labels >= self.null, self.null, class_labels)
        return self.tf(hidden_states, timestep=timestep, class_labels=class_labels, **kwargs)


class PixelVAE(torch.nn.Module):
    """The bundled model is pixel-space: decoding is the identity."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict(scaling_factor=1.0)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def decode(self, z):
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=z)


def dit_pipeline(tf, scheduler_config: dict):
    from diffusers import DDIMScheduler, DiTPipeline

    pipe = DiTPipeline(transformer=NullLabel(tf), vae=PixelVAE(), scheduler=DDIMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generation(kind: str, tf, timer: Timer, pipe, steps: int, scheduler_config: dict, seed: int) -> dict:
    timer.reset()
    c0, t0 = time.thread_time(), time.perf_counter()
    if kind == "dit_pipeline":
        pipe(class_labels=[LABEL], generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
             output_type="np")
    else:
        sample_classes(tf, [LABEL], steps=steps, guidance=4.0, seed=seed, scheduler_config=scheduler_config,
                       progress=False)
    total = time.perf_counter() - t0
    # this thread's CPU time outside the graphs: what the loop and the plan compute, whatever the machine's load
    outside_cpu = time.thread_time() - c0 - timer.graph_cpu_s
    return {"total_s": total, "graph_s": timer.graph_s, "forward_s": timer.forward_s, "calls": timer.calls,
            "outside_cpu_s": outside_cpu}


def summarize(runs: list[dict]) -> dict:
    total = np.array([r["total_s"] for r in runs])
    graph = np.array([r["graph_s"] for r in runs])
    fwd = np.array([r["forward_s"] for r in runs])
    calls = runs[0]["calls"]
    cpu = np.array([r["outside_cpu_s"] for r in runs])
    share = 1 - graph / total
    return {"rounds": len(runs), "calls": calls,
            "total_ms_median": round(float(np.median(total)) * 1e3, 1),
            "total_ms_min": round(float(total.min()) * 1e3, 1),
            "graph_ms_median": round(float(np.median(graph)) * 1e3, 1),
            "outside_share_median": round(float(np.median(share)), 4),
            "outside_share_min": round(float(share.min()), 4),
            "outside_share_max": round(float(share.max()), 4),
            "outside_ms_per_call_median": round(float(np.median((total - graph) / calls)) * 1e3, 3),
            "plan_ms_per_call_median": round(float(np.median((fwd - graph) / calls)) * 1e3, 3),
            "loop_ms_per_call_median": round(float(np.median((total - fwd) / calls)) * 1e3, 3),
            "outside_cpu_ms_per_call_median": round(float(np.median(cpu / calls)) * 1e3, 3)}


def forward_latency(tfs: dict[str, object], timesteps: list[int], rounds: int, per_round: int) -> dict:
    """Per-forward wall time of ``tf(x, t, labels)`` for each plan in ``tfs``, interleaved; round medians."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([LABEL, 10])
    samples: dict[str, list[float]] = {k: [] for k in tfs}
    names = list(tfs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            tf = tfs[name]
            tf.reset(0)
            times = []
            start = (r * per_round) % len(timesteps)  # the rounds' windows walk the schedule, so every bucket is in
            tf(x, timestep=torch.tensor(timesteps[start]).expand(2), class_labels=labels)  # this bucket's session warm
            for k in range(per_round):
                t = torch.tensor(timesteps[(start + k) % len(timesteps)]).expand(2)
                t0 = time.perf_counter()
                tf(x, timestep=t, class_labels=labels)
                times.append(time.perf_counter() - t0)
            samples[name].append(float(np.median(times)))
    return {name: {"ms_median": round(float(np.median(v)) * 1e3, 3), "ms_min": round(float(min(v)) * 1e3, 3),
                   "round_medians_ms": [round(s * 1e3, 3) for s in v]} for name, v in samples.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", help="plan directory (default: build the bundled model's default plan)")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--steps", type=int, default=50, help="denoising steps (DiTPipeline's default)")
    p.add_argument("--forwards", type=int, default=10, help="forwards per round in the spinning comparison")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--label", default="current", help="the key this run is stored under (e.g. before, after)")
    p.add_argument("--out", default=str(RESULTS / "loop_overhead.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    tmp = None
    plan = args.plan
    if plan is None:
        from export.build import build_plan

        tmp = tempfile.TemporaryDirectory()
        plan = str(Path(tmp.name) / "plan")
        build_plan(model="bundled:tiny-dit", out=plan, measure=False, progress=False)
    scheduler_config = json.loads(SCHEDULER_CONFIG.read_text())
    has_spinning = "spinning" in inspect.signature(runtime.load).parameters
    settings = {"default": {}}
    if has_spinning:
        settings = {"spin_off": {"spinning": False}, "spin_on": {"spinning": True}}
    tfs = {name: runtime.load(plan, threads=args.threads, **kw) for name, kw in settings.items()}
    timers = {name: Timer(tf) for name, tf in tfs.items()}
    pipes = {name: dit_pipeline(tf, scheduler_config) for name, tf in tfs.items()}
    configs = [(kind, name) for name in tfs for kind in ("dit_pipeline", "sample_classes")]
    load_before = os.getloadavg()
    for kind, name in configs:  # warm-up: sessions, allocator, diffusers' first-call costs
        generation(kind, tfs[name], timers[name], pipes[name], 5, scheduler_config, seed=0)
    runs: dict[str, list[dict]] = {f"{kind}/{name}": [] for kind, name in configs}
    for r in range(args.rounds):
        for kind, name in configs if r % 2 == 0 else configs[::-1]:
            res = generation(kind, tfs[name], timers[name], pipes[name], args.steps, scheduler_config, seed=r)
            runs[f"{kind}/{name}"].append(res)
        logger.info("round %d/%d done", r + 1, args.rounds)
    buckets = tfs[next(iter(tfs))].plan.buckets
    result = {"machine": machine(), "plan": {"buckets": [[b.t_lo, b.t_hi, b.ratio] for b in buckets],
                                             "graph_files": sorted({g for b in buckets for g in b.graphs.values()})},
              "steps": args.steps, "guidance": 4.0, "batch": 2, "threads": args.threads,
              "command": "python benchmarks/loop_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "generations": {k: summarize(v) for k, v in runs.items()}}
    if has_spinning:
        sched = make_scheduler(scheduler_config)
        sched.set_timesteps(args.steps)
        timesteps = [int(t) for t in sched.timesteps]
        result["forward_latency"] = forward_latency(runtime_plans(plan, args.threads), timesteps, args.rounds,
                                                    args.forwards)
        result["forward_latency"]["spin_on_over_off"] = round(
            result["forward_latency"]["spin_off"]["ms_median"] / result["forward_latency"]["spin_on"]["ms_median"], 3)
        result["spinning_auto"] = runtime.load(plan).spinning
    result["load_average"] = {"before": [round(v, 2) for v in load_before],
                              "after": [round(v, 2) for v in os.getloadavg()]}
    if tmp is not None:
        tmp.cleanup()
    out = Path(args.out)
    stored = json.loads(out.read_text()) if out.exists() else {}
    stored[args.label] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stored, indent=2) + "\n")
    print(table(result))
    return result


def runtime_plans(plan: str, threads: int) -> dict:
    """Fresh plans (not timer-wrapped) for the per-forward comparison, spinning off and on."""
    return {"spin_off": runtime.load(plan, threads=threads, spinning=False),
            "spin_on": runtime.load(plan, threads=threads, spinning=True)}


def table(result: dict) -> str:
    rows = ["| loop / plan setting | total ms | in graphs ms | outside share (min-max) | plan ms/call | loop ms/call "
            "| outside CPU ms/call |", "|---|---|---|---|---|---|---|"]
    for k, s in result["generations"].items():
        share = f"{100 * s['outside_share_median']:.2f} %"
        rows.append(f"| {k} | {s['total_ms_median']} | {s['graph_ms_median']} | {share} "
                    f"({100 * s['outside_share_min']:.2f}-{100 * s['outside_share_max']:.2f}) | "
                    f"{s['plan_ms_per_call_median']} | {s['loop_ms_per_call_median']} | "
                    f"{s['outside_cpu_ms_per_call_median']} |")
    if "forward_latency" in result:
        fl = result["forward_latency"]
        rows += ["", "| spinning | ms per forward (median of round medians) | min |", "|---|---|---|"]
        rows += [f"| {k} | {fl[k]['ms_median']} | {fl[k]['ms_min']} |" for k in ("spin_off", "spin_on")]
        rows.append(f"\nspin off / spin on: {fl['spin_on_over_off']}x; spinning='auto' on this plan: "
                    f"{result['spinning_auto']}")
    rows.append(f"\n{result['machine']}; load average before/after {result['load_average']}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
