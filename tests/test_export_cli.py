"""`kvcal export`: the command writes the directory and reports it; refusals are one `error:` line, exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kvcal.cli import main
from kvcal.quant import QParams
from kvcal.record.store import merge_kv_cache

pytest.importorskip("transformers")

from hf_models import KV_NAMES, build  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "llama"
    build("llama").save_pretrained(directory)
    return directory


def write_record(path: Path, *, offset: int = 0) -> Path:
    merge_kv_cache(
        path,
        {name: QParams(torch.full((32,), 0.02), torch.full((32,), offset, dtype=torch.int32)) for name in KV_NAMES},
    )
    return path


def export_args(record: Path, hf_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["export", str(record), "--model-dir", str(hf_dir), "--format", "vllm-ascend", "-o", str(out), *extra]


def test_export_writes_the_directory_and_reports_each_layer(hf_dir: Path, tmp_path: Path) -> None:
    record = write_record(tmp_path / "r.txt")
    out = tmp_path / "c8"
    result = CliRunner().invoke(main, export_args(record, hf_dir, out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "quant_model_description.json").read_text())["kv_cache_type"] == "C8"
    assert (out / "quant_model_weights.safetensors").exists()
    assert f"Exported for vllm-ascend: {out}" in result.stderr
    assert all(name in result.stderr for name in KV_NAMES)
    assert f"vllm serve {out} --quantization ascend" in result.stderr
    assert result.stdout == ""


def test_asymmetric_record_is_refused_unless_allowed(hf_dir: Path, tmp_path: Path) -> None:
    record = write_record(tmp_path / "r.txt", offset=3)
    out = tmp_path / "c8"
    result = CliRunner().invoke(main, export_args(record, hf_dir, out))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "--allow-offset" in result.stderr
    assert not out.exists()
    result = CliRunner().invoke(main, export_args(record, hf_dir, out, "--allow-offset"))
    assert result.exit_code == 0, result.output


def test_non_empty_output_needs_force(hf_dir: Path, tmp_path: Path) -> None:
    record = write_record(tmp_path / "r.txt")
    out = tmp_path / "c8"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = CliRunner().invoke(main, export_args(record, hf_dir, out))
    assert result.exit_code == 1 and "--force" in result.stderr
    assert (out / "old.txt").exists()
    result = CliRunner().invoke(main, export_args(record, hf_dir, out, "--force"))
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and "replaced" in result.stderr


def test_format_is_required(hf_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["export", "r.txt", "--model-dir", str(hf_dir), "-o", str(tmp_path / "c8")])
    assert result.exit_code == 2 and "--format" in result.stderr
