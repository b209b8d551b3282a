from __future__ import annotations

import os

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


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
