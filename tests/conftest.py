from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
# Exports of the same model, grid and export code are reused across the session (export/export_cache.py):
# most tests build plans of the same few tiny models, and the export is most of a build's time. Set here, so the
# `python -m export` subprocesses of the CLI tests share it; tests/export/test_export_cache.py tests the cache.
if not os.environ.get("DITMERGE_EXPORT_CACHE"):
    _cache = tempfile.mkdtemp(prefix="ditmerge-export-cache-")
    os.environ["DITMERGE_EXPORT_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)


@pytest.fixture(autouse=True)
def restore_logging_levels():
    """A CLI run in-process (passes.cli.run_cli) sets the root and some library loggers' levels for a terminal;
    put back every level that existed before the test, so no test sees another's logging set-up."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    levels = [(lg, lg.level) for lg in loggers]
    yield
    for lg, level in levels:
        lg.setLevel(level)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Cache of exported, cleaned base graphs: (family, grid) -> (model, base ModelProto, directory)."""
    import onnx

    from export.onnx_export import export_onnx
    from passes.cleanup import FreeTokenAxisPass, RemoveNoopSqueezePass
    from passes.infra import PassManager
    from passes.onnxutil import save_checked
    from tests.helpers import FAMILIES

    cache: dict = {}

    def get(family: str, grid: tuple[int, int]):
        key = (family, grid)
        if key not in cache:
            model = FAMILIES[family][0](grid)
            d = tmp_path_factory.mktemp(f"{family}_{grid[0]}x{grid[1]}")
            export_onnx(model, d / "base.onnx", grid)
            base = onnx.load(d / "base.onnx", load_external_data=False)
            base = PassManager([RemoveNoopSqueezePass(), FreeTokenAxisPass(grid[0] * grid[1])])(base).model
            save_checked(base, d / "base.onnx")
            cache[key] = (model, base, d)
        return cache[key]

    return get
