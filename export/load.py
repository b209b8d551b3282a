"""Load a diffusers DiT transformer from a hub id, a local folder, or the built-in model."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from export.families import FAMILIES
from passes.errors import DitmergeError

logger = logging.getLogger(__name__)

# Two small models, both used by tests and benchmarks. The bundled one is trained (3-channel pixel space,
# README 'The bundled model'): the default, and the one whose images the quality report measures. The
# built-in one has seeded random weights and 4 latent channels: a DiT-XL/2-shaped stand-in for a latent DiT,
# built in code (no files, nothing to train), where only shapes and export/runtime agreement matter; also the
# default when the bundled weights are absent.
BUILTIN_TINY = "builtin:tiny-dit"
BUNDLED = "bundled:tiny-dit"
BUNDLED_DIR = Path(__file__).parent / "bundled"
# the trained bundled model (python -m export.train) when its weights are present, else random weights
DEFAULT_MODEL = BUNDLED if (BUNDLED_DIR / "tiny-dit" / "config.json").is_file() else BUILTIN_TINY


def builtin_tiny_dit() -> torch.nn.Module:
    """A small class-conditional latent DiT with seeded random weights: 256 tokens like DiT-XL/2 at 256 px."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8,
                                 num_layers=4, sample_size=32, patch_size=2, num_embeds_ada_norm=10).eval()


def _class_of_folder(folder: Path) -> tuple[Path, str]:
    """A transformer folder (config.json) or a pipeline folder with a transformer/ subfolder."""
    for cand in (folder, folder / "transformer"):
        cfg = cand / "config.json"
        if cfg.is_file():
            name = json.loads(cfg.read_text()).get("_class_name")
            if name:
                return cand, name
    raise DitmergeError(f"{folder} holds no diffusers transformer: expected config.json with _class_name there "
                        "or in a transformer/ subfolder")


def load_transformer(source: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load the transformer of ``source``: ``builtin:tiny-dit``, a local folder, or a hub id."""
    import diffusers

    if source == BUILTIN_TINY:
        return builtin_tiny_dit()
    if source == BUNDLED:
        if not (BUNDLED_DIR / "tiny-dit" / "config.json").is_file():
            raise DitmergeError(f"the bundled model is missing from {BUNDLED_DIR}; train it with `python -m export.train`")
        source = str(BUNDLED_DIR / "tiny-dit")
    elif source.startswith(("builtin:", "bundled:")):
        raise DitmergeError(f"unknown built-in model {source!r}; available: {BUNDLED}, {BUILTIN_TINY}")
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise DitmergeError(f"{source} is a file; pass a diffusers model folder or a hub id")
        folder, class_name = _class_of_folder(path)
        kwargs = {}
    else:
        if source.count("/") != 1 or os.path.isabs(source):
            raise DitmergeError(f"{source!r} is neither an existing folder nor a hub id like 'facebook/DiT-XL-2-256'")
        folder, class_name, kwargs = source, None, {"subfolder": "transformer"}
    if class_name is not None and class_name not in FAMILIES:
        raise DitmergeError(f"unsupported model class {class_name}; supported: {', '.join(FAMILIES)}")
    try:
        if class_name is None:
            from huggingface_hub import hf_hub_download

            cfg = json.loads(Path(hf_hub_download(source, "config.json", subfolder="transformer")).read_text())
            class_name = cfg.get("_class_name", "")
            if class_name not in FAMILIES:
                raise DitmergeError(f"unsupported model class {class_name}; supported: {', '.join(FAMILIES)}")
        cls = getattr(diffusers, class_name)
        model = cls.from_pretrained(folder, torch_dtype=dtype, **kwargs)
    except DitmergeError:
        raise
    except (OSError, ValueError) as e:
        raise DitmergeError(f"could not load {source!r}: {str(e).splitlines()[0]}") from e
    return model.eval()


def scheduler_config(source: str) -> dict | None:
    """The training scheduler's config beside the model (``scheduler/`` of a pipeline folder), if any."""
    if source == BUNDLED:
        folder = BUNDLED_DIR
    elif Path(source).is_dir():
        folder = Path(source) if (Path(source) / "scheduler").is_dir() else Path(source).parent
    else:
        return None
    cfg = folder / "scheduler" / "scheduler_config.json"
    return json.loads(cfg.read_text()) if cfg.is_file() else None
