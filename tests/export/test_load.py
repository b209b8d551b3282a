"""Real loading code (from_pretrained) on local folders the tests create."""

from __future__ import annotations

import json

import pytest
import torch

from export.load import load_transformer
from passes.errors import DitmergeError
from tests.helpers import tiny_dit, tiny_pixart


def test_loads_transformer_folder_and_pipeline_folder(tmp_path):
    model = tiny_dit()
    model.save_pretrained(tmp_path / "bare")
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    for folder in ("bare", "pipe"):
        loaded = load_transformer(str(tmp_path / folder))
        assert type(loaded).__name__ == "DiTTransformer2DModel" and not loaded.training
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name


def test_pixart_folder_loads(tmp_path):
    tiny_pixart().save_pretrained(tmp_path)
    assert type(load_transformer(str(tmp_path))).__name__ == "PixArtTransformer2DModel"


def test_unsupported_class_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(DitmergeError, match="unsupported model class UNet2DConditionModel; supported: DiTTransformer2DModel"):
        load_transformer(str(tmp_path))


def test_folder_without_transformer(tmp_path):
    with pytest.raises(DitmergeError, match="holds no diffusers transformer"):
        load_transformer(str(tmp_path))


@pytest.mark.parametrize("source,message", [
    ("not-a-folder-or-id", "neither an existing folder nor a hub id"),
    ("builtin:huge", "unknown built-in model"),
])
def test_bad_sources(source, message):
    with pytest.raises(DitmergeError, match=message):
        load_transformer(source)


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(DitmergeError, match="is a file"):
        load_transformer(str(tmp_path / "model.bin"))
