"""Reading a prefix from disk: a native file or a PEFT adapter folder, sizes checked before reading."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from prefix_store.errors import PrefixValidationError
from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.native import encode_native
from prefix_store.formats.peft import write_peft_folder
from prefix_store.formats.source import SourceFormat, load_prefix_source
from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix

GEOMETRY = ModelGeometry(model_type="llama", num_layers=2, num_kv_heads=2, head_dim=4)
LIMITS = PrefixLimits()


@pytest.fixture
def prefix() -> Prefix:
    generator = torch.Generator().manual_seed(0)
    shape = GEOMETRY.prefix_shape(3)
    return Prefix(
        keys=torch.randn(shape, generator=generator), values=torch.randn(shape, generator=generator)
    )


def refused(path: Path, match: str, *, status: int = 400, limits: PrefixLimits = LIMITS) -> None:
    with pytest.raises(PrefixValidationError, match=match) as caught:
        load_prefix_source(path, GEOMETRY, limits)
    assert caught.value.status == status
    assert str(path) not in caught.value.message


def test_a_native_file_is_read_as_native(prefix: Prefix, tmp_path: Path) -> None:
    path = tmp_path / "task.safetensors"
    path.write_bytes(encode_native(prefix, GEOMETRY))

    loaded, source_format = load_prefix_source(path, GEOMETRY, LIMITS)

    assert source_format is SourceFormat.NATIVE and source_format == "native"
    assert torch.equal(loaded.keys, prefix.keys) and torch.equal(loaded.values, prefix.values)


def test_an_adapter_folder_is_read_as_peft(prefix: Prefix, tmp_path: Path) -> None:
    folder = write_peft_folder(prefix, GEOMETRY, tmp_path / "adapter")

    loaded, source_format = load_prefix_source(folder, GEOMETRY, LIMITS)

    assert source_format is SourceFormat.PEFT and source_format == "peft"
    assert torch.equal(loaded.keys, prefix.keys) and torch.equal(loaded.values, prefix.values)


def test_a_folder_with_only_a_pickled_adapter_is_refused(prefix: Prefix, tmp_path: Path) -> None:
    folder = write_peft_folder(prefix, GEOMETRY, tmp_path / "adapter")
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"prompt_embeddings": torch.zeros(3, 32)}, folder / "adapter_model.bin")

    refused(
        folder,
        r"the adapter folder holds adapter_model\.bin and no adapter_model\.safetensors: pickle checkpoints are "
        r"refused .*; re-save the adapter with safetensors",
    )


def test_a_folder_without_adapter_config_is_refused(prefix: Prefix, tmp_path: Path) -> None:
    folder = write_peft_folder(prefix, GEOMETRY, tmp_path / "adapter")
    (folder / "adapter_config.json").unlink()

    refused(
        folder,
        r"the adapter folder has no adapter_config\.json; a PEFT adapter folder holds adapter_config\.json and "
        r"adapter_model\.safetensors",
    )


def test_a_folder_without_adapter_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")

    refused(tmp_path, r"the adapter folder has no adapter_model\.safetensors")


def test_sizes_are_checked_before_reading(prefix: Prefix, tmp_path: Path) -> None:
    path = tmp_path / "task.safetensors"
    path.write_bytes(encode_native(prefix, GEOMETRY))
    folder = write_peft_folder(prefix, GEOMETRY, tmp_path / "adapter")

    refused(
        path,
        r"prefix file is \d+ bytes, over the limit of 64 bytes",
        status=413,
        limits=PrefixLimits(max_file_bytes=64),
    )
    refused(
        folder,
        r"adapter_config\.json is \d+ bytes, over the limit of 16 bytes",
        status=413,
        limits=PrefixLimits(max_config_bytes=16),
    )
    refused(
        folder,
        r"adapter_model\.safetensors is \d+ bytes, over the limit of 64 bytes",
        status=413,
        limits=PrefixLimits(max_file_bytes=64),
    )


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth", ".ckpt"])
def test_a_pickle_checkpoint_file_is_refused_by_its_name(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"prefix{suffix}"
    buffer = io.BytesIO()
    torch.save({"keys": torch.zeros(1)}, buffer)
    path.write_bytes(buffer.getvalue())

    refused(path, rf"a \{suffix} file is a pickle checkpoint: pickle checkpoints are refused")


def test_a_pickle_named_safetensors_is_refused_by_its_content(tmp_path: Path) -> None:
    path = tmp_path / "prefix.safetensors"
    torch.save({"keys": torch.zeros(1)}, path)

    refused(path, r"prefix file is a zip archive \(the format of torch\.save checkpoints")


def test_other_files_and_missing_paths_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "prefix.json"
    other.write_text("{}")

    refused(other, r"a prefix source is a native \.safetensors file or a PEFT adapter folder")
    refused(tmp_path / "missing", r"no prefix file or adapter folder exists at the given path")
