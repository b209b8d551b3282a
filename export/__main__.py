"""``python -m export``: build a plan. With no arguments: the bundled model, step caching (a full step every 3
below t=900, blocks 1-5 reused in between), ./plan; the report gives its speed and quality against the unmerged plan."""

from __future__ import annotations

import argparse
import sys

from export.buckets import DEFAULT_BUCKETS
from export.load import DEFAULT_MODEL
from export.methods import available_methods
from passes.cli import run_cli
from passes.errors import DitmergeError
from passes.tome import DEFAULT_LOCATIONS, LOCATIONS

DEFAULT_METHOD = "cache"  # faster than the unmerged plan at near-baseline quality on the bundled model (README)


def _grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 16x16, got {text!r}") from None
    return h, w


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratios must be numbers like 0.3,0.5, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,3,7, got {text!r}") from None


def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"options look like KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id (e.g. facebook/DiT-XL-2-256), local diffusers folder, or builtin:tiny-dit (default)")
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"merge method: {', '.join(available_methods())} (default: {DEFAULT_METHOD}, step caching)")
    p.add_argument("--option", "-o", dest="options", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="a method option, repeatable (e.g. -o switch_step=20 for sdtm); see the method's docs")
    p.add_argument("--buckets", default=None,
                   help="ratio per timestep bucket: '0.5,0.4,0.3' (equal spans, noisiest first) or "
                        f"'999-600:0.5,599-0:0.3' (default: the method's; tome: {DEFAULT_BUCKETS}, cache: 0)")
    p.add_argument("--out", default="plan", help="plan directory (default: ./plan)")
    p.add_argument("--locations", default=None,
                   help=f"where ToMe merges, comma-separated from {', '.join(LOCATIONS)} "
                        f"(default: {','.join(DEFAULT_LOCATIONS)})")
    p.add_argument("--grid", type=_grid, default=None, help="token grid ROWSxCOLS (default: the model's native size)")
    p.add_argument("--text-len", type=int, default=8,
                   help="prompt tokens of the example inputs for text-conditioned models; the graphs take any "
                        "prompt length (default: 8)")
    p.add_argument("--num-train-timesteps", type=int, default=1000,
                   help="training timesteps of the model's scheduler, which the buckets cover (default: 1000)")
    p.add_argument("--no-measure", dest="measure", action="store_false", help="skip fidelity and latency measurement")
    p.add_argument("--repeats", type=int, default=20, help="timed forwards per graph for latency medians (default: 20)")
    p.add_argument("--quality-samples", type=int, default=20,
                   help="seeded generations for the quality report (class-conditional pixel models; 0: skip)")
    p.add_argument("--quality-steps", type=int, default=25, help="denoising steps of those generations (default: 25)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "auto", "trt"),
                   help="trt: also build TensorRT engines (needs tensorrt and a GPU); auto: where possible "
                        "(default: onnxruntime)")
    p.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16"),
                   help="TensorRT engine precision (default: fp16)")
    p.add_argument("--sweep", type=_ratios, default=(), help="uniform ratios to compare for quality against speed, e.g. 0.3,0.5 "
                                               "(adds a table and quality_speed.png to the report)")
    t = p.add_argument_group("tuning to a quality budget", "with a target, the schedule (cache intervals and warm-up, "
                             "ToMe ratios per bucket) is searched on seeded calibration generations and the fastest "
                             "plan meeting every target is written (docs/tuner.md)")
    t.add_argument("--target-psnr", type=float, default=None, metavar="DB",
                   help="minimum mean PSNR (dB) of the images against the unmerged plan's, same seeds (e.g. 30)")
    t.add_argument("--target-ssim", type=float, default=None, help="minimum mean SSIM against the unmerged plan's images")
    t.add_argument("--target-fid-increase", type=float, default=None, metavar="REL",
                   help="maximum relative classifier-FID increase over the unmerged plan (0.05: +5 %%; bundled model)")
    t.add_argument("--tune-buckets", default="3", help="timestep buckets the tuner sets knobs for: a count or a "
                                                       "range spec '999-500:0,499-0:0' (default: 3)")
    t.add_argument("--tune-samples", type=int, default=12,
                   help="calibration generations, and as many held-out ones (default: 12)")
    t.add_argument("--tune-steps", type=int, default=20,
                   help="denoising steps of those generations (DDIM; a text model's pipeline scheduler) (default: 20)")
    t.add_argument("--classes", type=_ints, default=None, help="class labels to generate, e.g. 0,3,7 (default: all)")
    t.add_argument("--prompts", default=None, metavar="FILE",
                   help="text-to-image models: calibration prompts, one per line (default: a short built-in list), "
                        "encoded by the pipeline folder's text encoders")
    t.add_argument("--prompt-embeds", default=None, metavar="FILE",
                   help="text-to-image models without text encoders in the folder: the prompts' embeddings as a "
                        "safetensors file (docs/tuner.md)")
    t.add_argument("--tune-work", default=None,
                   help="keep the built graphs and the search record here; a later search resumes from it "
                        "(default: OUT/.tuning, removed after success)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.add_argument("--print-python", action="store_true", help="print the equivalent library call and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def quiet_third_party() -> None:
    """Keep the default run to progress and the report: no notices from torch's exporter (its torchvision
    op registrations), diffusers (accelerate's low_cpu_mem_usage), transformers or Python warnings; -v shows them."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    for name in ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration", "diffusers", "transformers",
                 "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    kwargs = dict(model=args.model, method=args.method, buckets=args.buckets, out=args.out,
                  locations=tuple(s.strip() for s in args.locations.split(",") if s.strip()) if args.locations else None,
                  options=dict(args.options), grid=args.grid,
                  text_len=args.text_len, num_train_timesteps=args.num_train_timesteps, measure=args.measure, repeats=args.repeats,
                  quality_samples=args.quality_samples, quality_steps=args.quality_steps,
                  backend=args.backend, precision=args.precision,
                  sweep=args.sweep, progress=args.progress)
    tune = any(v is not None for v in (args.target_psnr, args.target_ssim, args.target_fid_increase))
    if tune:
        return _tune(args, kwargs)
    if args.print_python:
        print("from export import build_plan\n\nbuild_plan(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")")
        return 0

    def run() -> None:
        if not args.verbose:
            quiet_third_party()
        from export.build import bucket_table, build_plan, quality_table, sweep_table

        if args.repeats < 1:
            raise DitmergeError(f"--repeats must be at least 1, got {args.repeats}")
        manifest = build_plan(**kwargs)
        rep = manifest["report"]
        print(f"plan written to {args.out}/ ({manifest['model']['class']}, {manifest['model']['tokens']} tokens, "
              f"method {manifest['method']['name']})")
        if "export_fidelity_max_abs" in rep:
            print(f"export fidelity (unmerged graph vs eager, fp32): max abs error {rep['export_fidelity_max_abs']:.2e}; "
                  f"unmerged latency {rep['base_latency_ms']:.2f} ms on {rep['backend']}")
        print(bucket_table(manifest))
        if "quality" in rep:
            print()
            print(quality_table(rep["quality"]))
        if "sweep" in rep:
            print()
            print(sweep_table(rep["sweep"]))

    return run_cli(run, args.verbose)


def _tune(args: argparse.Namespace, build: dict) -> int:
    """``--target-*``: the tuner (export.tune.tune_plan) instead of one build."""
    buckets = int(args.tune_buckets) if args.tune_buckets.strip().isdigit() else args.tune_buckets
    kwargs = dict(model=build["model"], method=build["method"], out=build["out"], target_psnr=args.target_psnr,
                  target_ssim=args.target_ssim, target_fid_increase=args.target_fid_increase, buckets=buckets,
                  options=build["options"], locations=build["locations"], grid=build["grid"],
                  text_len=build["text_len"], num_train_timesteps=build["num_train_timesteps"],
                  samples=args.tune_samples, steps=args.tune_steps, classes=args.classes, prompts=args.prompts,
                  prompt_embeds=args.prompt_embeds, repeats=args.repeats,
                  work_dir=args.tune_work, keep_work=args.tune_work is not None, progress=build["progress"])
    if args.print_python:
        print("from export.tune import tune_plan\n\ntune_plan(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")")
        return 0

    def run() -> None:
        if not args.verbose:
            quiet_third_party()
        from export.build import bucket_table
        from export.tune import tune_plan

        ignored = [flag for flag, on in (("--buckets", args.buckets is not None), ("--sweep", bool(args.sweep)),
                                         ("--backend", args.backend != "onnxruntime"), ("--no-measure", not args.measure))
                   if on]
        if ignored:
            raise DitmergeError(f"{', '.join(ignored)} cannot be combined with a --target-*: the tuner chooses the "
                                "schedule (--tune-buckets sets its buckets) and measures on onnxruntime")
        manifest = tune_plan(**kwargs)
        t = manifest["report"]["tune"]
        print(f"plan written to {args.out}/ (method {manifest['method']['name']}, tuned: "
              f"{' '.join(f'{k}={v}' for k, v in t['schedule'].items())})")
        print(bucket_table(manifest))
        held = t["heldout"]
        print(f"\n{t['evaluations']} schedules tried; predicted {t['predicted_speedup']:.2f}x, measured "
              f"{t['measured_speedup']:.2f}x end to end; held-out PSNR {held['psnr_db']['mean']:.2f} dB, SSIM "
              f"{held['ssim']['mean']:.4f}: {'meets the target' if held['meets_target'] else 'MISSES: ' + '; '.join(held['misses'])}"
              f"\nsearch table and frontier: {args.out}/report.md, {args.out}/tune_frontier.png")

    return run_cli(run, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
