"""A cache of ONNX exports, keyed by everything an export depends on; on when ``DITMERGE_EXPORT_CACHE`` is set.

Exporting is the slow part of building a plan (torch.export + onnxscript: seconds for a tiny model, minutes for
DiT-XL/2), and a plan's graph depends only on the model, the grid and the export code. Building several plans of
one model (other methods, ratios, buckets) then exports once. The key covers the model's class, config and every
parameter and buffer byte, the grid and prompt length, the library versions and the source of the export code,
so a stale entry is never read; entries are written whole (a folder renamed into place) or not at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENV = "DITMERGE_EXPORT_CACHE"
_CODE = ("onnx_export.py", "families.py", "export_cache.py")  # the code whose output is cached


def cache_dir() -> Path | None:
    """The cache folder, or None when caching is off (``DITMERGE_EXPORT_CACHE`` unset or empty)."""
    value = os.environ.get(ENV, "").strip()
    return Path(value).expanduser() if value else None


def export_key(model: torch.nn.Module, grid: tuple[int, int], text_len: int, extra: dict) -> str:
    """sha256 of what the exported graph and weights depend on."""
    import diffusers
    import onnx
    import onnxscript

    h = hashlib.sha256()
    # not where it was loaded from: the same model saved in another folder exports the same graph
    config = {k: v for k, v in dict(getattr(model, "config", {}) or {}).items() if k != "_name_or_path"}
    head = {"class": type(model).__qualname__, "config": config, "grid": list(grid), "text_len": text_len,
            "processors": sorted({type(p).__name__ for p in getattr(model, "attn_processors", {}).values()}),
            "versions": [torch.__version__, onnx.__version__, onnxscript.__version__, diffusers.__version__],
            **extra}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    here = Path(__file__).resolve().parent
    for name in _CODE:
        h.update((here / name).read_bytes())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def restore(key: str, files: dict[str, Path]) -> bool:
    """Copy the cached entry's files to ``files`` (cached name -> destination); False on a miss."""
    root = cache_dir()
    entry = root / key if root else None
    if entry is None or not all((entry / name).is_file() for name in files):
        return False
    for name, dest in files.items():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(entry / name, dest)  # a copy: a build may append to its weights file
    logger.info("export: reusing the cached export %s", key[:12])
    return True


def store(key: str, files: dict[str, Path]) -> None:
    """Put ``files`` (cached name -> source) in the cache as one entry, whole or not at all."""
    root = cache_dir()
    if root is None or (root / key).exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=root))
    try:
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
        os.replace(tmp, root / key)
    except OSError:  # another process stored the same entry first, or the disk is full: the cache is optional
        shutil.rmtree(tmp, ignore_errors=True)
