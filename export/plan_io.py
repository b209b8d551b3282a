"""A plan directory on disk: the staging directory an interrupted build resumes from, and publishing it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from export.onnx_export import WEIGHTS_FILE
from runtime.plan import PLAN_FILE, sha256_file
from runtime.plan_schema import PlanManifest

BASE_GRAPH = "base.onnx"


class StageProgress:
    """What an earlier, interrupted build already finished in the staging directory.

    Keyed by the build's inputs (model and its files, grid, text length): a different key starts over.
    A step counts as finished only while every file it wrote still has the hash recorded for it.
    """

    FILE = "progress.json"

    def __init__(self, stage: Path, key: dict) -> None:
        self.stage, self.path = stage, stage / self.FILE
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if data.get("key") != key:
            for f in stage.iterdir():
                shutil.rmtree(f) if f.is_dir() else f.unlink()
            data = {"key": key, "done": {}}
        self.data = data
        self._write()

    def finished(self, step: str, files: list[str]) -> bool:
        digests = self.data["done"].get(step)
        return digests is not None and all((self.stage / f).is_file() and sha256_file(self.stage / f) == digests.get(f)
                                           for f in files)

    def record(self, step: str, files: list[str]) -> None:
        self.data["done"][step] = {f: sha256_file(self.stage / f) for f in files}
        self._write()

    def remember(self, step: str, value: dict) -> None:
        """Keep what a finished step produced besides files (names, metadata), for the resumed build."""
        self.data["done"][step] = value
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.FILE + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def fingerprint(source: str) -> list:
    """A cheap identity of the model's files (names, sizes, mtimes); the source itself for hub ids."""
    from export.load import BUNDLED, BUNDLED_DIR

    folder = BUNDLED_DIR / "tiny-dit" if source == BUNDLED else Path(source)
    if not folder.is_dir():
        return [source]
    return sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                  for f in folder.rglob("*") if f.is_file())


def publish(stage: Path, out: Path) -> None:
    """Move the staged plan into ``out``: invalidate the old plan first, rename plan.json last."""
    (out / PLAN_FILE).unlink(missing_ok=True)
    for f in stage.iterdir():
        if f.name != PLAN_FILE:
            os.replace(f, out / f.name)
    keep = {f.name for f in out.iterdir()} - {f.name for f in stage.iterdir()}
    os.replace(stage / PLAN_FILE, out / PLAN_FILE)
    stage.rmdir()
    # graphs of an older plan that this one no longer references
    record = PlanManifest.from_json(json.loads((out / PLAN_FILE).read_text()), str(out / PLAN_FILE))
    current = {PLAN_FILE, "report.md", "samples.png", "quality_speed.png", WEIGHTS_FILE, BASE_GRAPH} | set(record.files())
    for name in keep:
        if name.endswith((".onnx", ".engine")) and name not in current:
            (out / name).unlink()


