"""``python -m runtime generate``: images from a plan; ``python -m runtime serve``: a plan behind Ray Serve."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from passes.cli import run_cli
from passes.errors import DitmergeError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write images generated through a plan")
    g.add_argument("--plan", required=True, help="plan directory (from `python -m export`)")
    g.add_argument("--class-label", type=int, action="append", required=True,
                   help="class index to generate; repeat for several images")
    g.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    g.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default: 4)")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise and the merge partitions (default: 0)")
    g.add_argument("--backend", default="auto",
                   help="auto, trt (the plan's TensorRT engines), cpu, cuda or ort-trt (default: auto)")
    g.add_argument("--out", default="images", help="output folder for the PNGs (default: ./images)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    s = sub.add_parser("serve", help="serve a plan over HTTP on Ray Serve (needs pip install 'ditmerge[serve]')",
                       description="Start (or join) a Ray cluster and serve a plan: POST /generate, GET /health.")
    s.add_argument("--plan", required=True, help="plan directory (from `python -m export`)")
    s.add_argument("--replicas", type=int, default=1, help="Serve replicas, one runtime each (default: 1)")
    s.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1; 0.0.0.0 to listen on all)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port; 0: any free one, logged (default: 8000)")
    s.add_argument("--address", default=None,
                   help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT (default: start a local one)")
    s.add_argument("--max-batch-size", type=int, default=4, help="requests per batch; 1 turns batching off (default: 4)")
    s.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill (default: 10)")
    s.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default: 1)")
    s.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (default: 0)")
    s.add_argument("--threads", type=int, default=None, help="onnxruntime threads per replica (default: its CPUs)")
    s.add_argument("--backend", default="auto",
                   help="auto, trt (the plan's TensorRT engines), cpu, cuda or ort-trt (default: auto)")
    s.add_argument("--max-steps", type=int, default=100, help="most denoising steps per request (default: 100)")
    s.add_argument("--max-images", type=int, default=8, help="most images per request (default: 8)")
    s.add_argument("--max-pending", type=int, default=16,
                   help="requests a replica holds before it answers 503 (default: 16)")
    s.add_argument("--vae", default=None,
                   help="for a latent-space plan: the diffusers pipeline or VAE that decodes it (folder or hub id)")
    s.add_argument("--partition-seed", type=int, default=0,
                   help="seed of the merge partitions of every generation (default: 0)")
    s.add_argument("--no-prepack", dest="prepack", action="store_false",
                   help="no onnxruntime weight prepacking: one weight copy per replica instead of one per bucket "
                        "(less memory, slower)")
    s.add_argument("--print-python", action="store_true", help="print the equivalent library call and exit")
    return p


def generate(plan: str, class_label: list[int], steps: int, guidance: float, seed: int, backend: str, out: str,
             progress: bool) -> list[Path]:
    from PIL import Image

    import runtime
    from runtime.generate import sample_classes, to_uint8

    tf = runtime.load(plan, backend=backend, seed=seed)
    if tf.config.in_channels != 3:
        raise DitmergeError(f"the plan's model works in a {tf.config.in_channels}-channel latent space; decode "
                            "through its diffusers pipeline (pipe.transformer = runtime.load(...))")
    x = sample_classes(tf, class_label, steps=steps, guidance=guidance, seed=seed,
                       scheduler_config=tf.plan.record.model.scheduler, progress=progress)
    images = to_uint8(x)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, label) in enumerate(zip(images, class_label)):
        path = folder / f"seed{seed}_class{label}_{i}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    print(f"wrote {len(paths)} images to {folder}/")
    return paths


def serve_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``runtime.serve.serve_plan`` that the flags ask for."""
    return {"host": args.host, "port": args.port, "address": args.address, "replicas": args.replicas,
            "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_ms / 1000,
            "num_cpus": args.num_cpus, "num_gpus": args.num_gpus, "threads": args.threads, "backend": args.backend,
            "max_pending": args.max_pending, "partition_seed": args.partition_seed, "vae": args.vae,
            "prepack": args.prepack}


def serve(plan: str, max_steps: int, max_images: int, **kwargs) -> None:
    try:
        from runtime.serve import serve_plan
    except ImportError as e:
        if (e.name or "").split(".")[0] not in ("ray", "starlette"):
            raise
        raise DitmergeError(f"serving needs Ray Serve ({e}): pip install 'ditmerge[serve]'") from None
    from runtime.service import Limits

    serve_plan(plan, limits=Limits(max_steps=max_steps, max_images=max_images), blocking=True, **kwargs)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "serve":
        if args.print_python:
            call = ", ".join([repr(args.plan)] + [f"{k}={v!r}" for k, v in serve_kwargs(args).items()])
            print("from runtime.serve import serve_plan\nfrom runtime.service import Limits\n\n"
                  f"serve_plan({call}, limits=Limits(max_steps={args.max_steps}, max_images={args.max_images}), "
                  "blocking=True)")
            return 0
        return run_cli(lambda: serve(args.plan, args.max_steps, args.max_images, **serve_kwargs(args)))
    return run_cli(lambda: generate(args.plan, args.class_label, args.steps, args.guidance, args.seed, args.backend,
                                    args.out, args.progress))


if __name__ == "__main__":
    sys.exit(main())
