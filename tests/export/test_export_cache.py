"""The export cache: a hit copies exactly what the export wrote; anything the export depends on misses."""

from __future__ import annotations

import pytest
import torch

from export import export_cache, onnx_export
from export.load import builtin_tiny_dit


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """A fresh cache folder, and a count of the real exports run."""
    monkeypatch.setenv(export_cache.ENV, str(tmp_path / "cache"))
    calls = []
    real = onnx_export._export

    def export(*a, **kw):
        calls.append(a[2])
        return real(*a, **kw)

    monkeypatch.setattr(onnx_export, "_export", export)
    return calls


def test_a_second_export_of_the_same_model_is_the_cached_copy(counted, tmp_path):
    model = builtin_tiny_dit()
    first = onnx_export.export_onnx(model, tmp_path / "a" / "base.onnx", (16, 16))
    second = onnx_export.export_onnx(builtin_tiny_dit(), tmp_path / "b" / "base.onnx", (16, 16))
    assert len(counted) == 1, "the second export of identical weights ran again"
    assert second.SerializeToString() == first.SerializeToString()
    for name in ("base.onnx", "weights.bin"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()


def test_other_weights_grid_or_text_length_miss(counted, tmp_path):
    model = builtin_tiny_dit()
    onnx_export.export_onnx(model, tmp_path / "a" / "base.onnx", (16, 16))
    onnx_export.export_onnx(model, tmp_path / "b" / "base.onnx", (8, 8))  # another grid
    onnx_export.export_onnx(model, tmp_path / "c" / "base.onnx", (16, 16), text_len=4)  # another example length
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3  # one weight changed
    onnx_export.export_onnx(model, tmp_path / "d" / "base.onnx", (16, 16))
    assert len(counted) == 4, counted


def test_off_without_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(export_cache.ENV, raising=False)
    assert export_cache.cache_dir() is None
    export_cache.store("k", {"base.onnx": tmp_path / "missing"})  # a no-op, not an error
    assert not export_cache.restore("k", {"base.onnx": tmp_path / "x"})


def test_the_folder_a_model_was_loaded_from_is_not_part_of_the_key(tmp_path):
    """diffusers records the folder in ``config._name_or_path``: the same weights saved twice share one entry."""
    from diffusers import DiTTransformer2DModel

    builtin_tiny_dit().save_pretrained(tmp_path / "a")
    builtin_tiny_dit().save_pretrained(tmp_path / "b")
    a, b = (DiTTransformer2DModel.from_pretrained(tmp_path / d) for d in "ab")
    assert a.config["_name_or_path"] != b.config["_name_or_path"]
    assert export_cache.export_key(a, (16, 16), 8, {}) == export_cache.export_key(b, (16, 16), 8, {})
