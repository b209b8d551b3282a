"""A small crop classifier that names the source photograph of a 32x32 crop.

It scores generated samples (are they of their conditioning class?) and gives the features of the
classifier-FID (its penultimate layer). Trained by ``python -m export.classifier``; weights committed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.photos import CLASSES, CropSampler, heldout
from passes.cli import run_cli

logger = logging.getLogger(__name__)

CLASSIFIER_FILE = Path(__file__).parent / "bundled" / "classifier.safetensors"


class CropClassifier(nn.Module):
    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU(),  # noqa: E731
                                           nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU(), nn.AvgPool2d(2))
        self.body = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.Flatten(), nn.Linear(128 * 16, 256),
                                  nn.SiLU())
        self.head = nn.Linear(256, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_classifier(path: Path = CLASSIFIER_FILE) -> CropClassifier:
    from safetensors.torch import load_file

    model = CropClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def predict(model: CropClassifier, x: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels, penultimate features) of images in [-1, 1] NCHW."""
    labels, feats = [], []
    for i in range(0, len(x), batch):
        f = model.features(torch.as_tensor(x[i:i + batch], dtype=torch.float32))
        feats.append(f.numpy())
        labels.append(model.head(f).argmax(-1).numpy())
    return np.concatenate(labels), np.concatenate(feats)


def train_classifier(out: Path = CLASSIFIER_FILE, steps: int = 1500, batch: int = 64, lr: float = 2e-3,
                     seed: int = 1) -> dict:
    """Train on random crops (flips as augmentation), report held-out accuracy, save safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = CropClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sampler = CropSampler(seed + 100)
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = sampler.sample(batch)
        x = torch.from_numpy(x)
        x = torch.where(torch.rand(batch, 1, 1, 1) < 0.5, x.flip(-1), x)
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        loss = nn.functional.cross_entropy(model(x), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            logger.info("classifier step %d/%d loss %.3f (%.0f s)", step + 1, steps, loss.item(), time.perf_counter() - t0)
    model.eval()
    xh, yh = heldout()
    acc = float((predict(model, xh)[0] == yh).mean())
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    logger.info("classifier: held-out accuracy %.3f on %d real crops; wrote %s", acc, len(yh), out)
    return {"heldout_accuracy": acc, "steps": steps, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.classifier", description=__doc__)
    p.add_argument("--out", type=Path, default=CLASSIFIER_FILE)
    p.add_argument("--steps", type=int, default=1500)
    args = p.parse_args(argv)
    return run_cli(lambda: train_classifier(args.out, args.steps))


if __name__ == "__main__":
    sys.exit(main())
