"""32x32 RGB crops of the photographs that ship inside scikit-image; the class is the photograph.

No download: every photo here loads from the scikit-image wheel. Crops are taken at random positions
and scales; the held-out split uses its own fixed seed, so its crop positions differ from training.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

CLASSES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
           "stereo_motorcycle", "colorwheel", "logo")
CROP = 32
HELDOUT_SEED = 20261122


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[np.ndarray, ...]:
    """The class photographs as uint8 HxWx3 arrays (RGBA composited on white)."""
    import skimage.data

    photos = []
    for name in CLASSES:
        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
            img = img[0]
        if img.shape[-1] == 4:
            alpha = img[..., 3:4].astype(np.float32) / 255
            img = (img[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)
        photos.append(np.ascontiguousarray(img))
    return tuple(photos)


class CropSampler:
    """Random square crops of side 24..min(160, short side / 2), resized to 32x32, in [-1, 1]."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.photos = load_photos()

    def crop(self, label: int) -> np.ndarray:
        img = self.photos[label]
        h, w = img.shape[:2]
        hi = min(160, min(h, w) // 2)
        side = int(round(np.exp(self.rng.uniform(np.log(24), np.log(hi)))))
        y, x = self.rng.integers(0, h - side + 1), self.rng.integers(0, w - side + 1)
        patch = Image.fromarray(img[y:y + side, x:x + side]).resize((CROP, CROP), Image.BICUBIC)
        return np.asarray(patch, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = self.rng.integers(0, len(CLASSES), size=n)
        return np.stack([self.crop(int(c)) for c in labels]), labels


def heldout(per_class: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A fixed evaluation set: ``per_class`` crops of every photograph, from the held-out seed."""
    sampler = CropSampler(HELDOUT_SEED)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    return np.stack([sampler.crop(int(c)) for c in labels]), labels


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC."""
    return ((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
