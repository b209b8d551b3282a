"""``python -m runtime generate``: images from a plan. (``serve`` arrives with Ray Serve support.)"""

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
    g.add_argument("--backend", default="auto", help="auto, cpu, cuda or ort-trt (default: auto)")
    g.add_argument("--out", default="images", help="output folder for the PNGs (default: ./images)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    sub.add_parser("serve", help="serve a plan behind Ray Serve (not available yet)")
    return p


def generate(plan: str, class_label: list[int], steps: int, guidance: float, seed: int, backend: str, out: str,
             progress: bool) -> list[Path]:
    import numpy as np
    from PIL import Image

    import runtime
    from runtime.generate import sample_classes

    tf = runtime.load(plan, backend=backend, seed=seed)
    if tf.config.in_channels != 3:
        raise DitmergeError(f"the plan's model works in a {tf.config.in_channels}-channel latent space; decode "
                            "through its diffusers pipeline (pipe.transformer = runtime.load(...))")
    x = sample_classes(tf, class_label, steps=steps, guidance=guidance, seed=seed,
                       scheduler_config=tf.plan.model.get("scheduler"), progress=progress)
    images = ((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, label) in enumerate(zip(images, class_label)):
        path = folder / f"seed{seed}_class{label}_{i}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    print(f"wrote {len(paths)} images to {folder}/")
    return paths


def serve_unavailable() -> None:
    raise DitmergeError("serving behind Ray Serve is not available in this version; load plans with runtime.load()")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "serve":
        return run_cli(serve_unavailable)
    return run_cli(lambda: generate(args.plan, args.class_label, args.steps, args.guidance, args.seed, args.backend,
                                    args.out, args.progress))


if __name__ == "__main__":
    sys.exit(main())
