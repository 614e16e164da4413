"""`kvcal inspect-record` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from record_files import CORRUPT, FULL, K0, K1, PER_CHANNEL, V0

from kvcal.cli import main


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["inspect-record", *map(str, args)])


def test_table_lists_every_entry_on_stderr() -> None:
    result = run(FULL)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert any(f"Record {FULL}" in line for line in lines)
    row = next(line for line in lines if "conv1" in line and "weight" in line)
    assert "0.001 … 0.002" in row and "0 … 1" in row
    row = next(line for line in lines if V0 in line)
    assert "kv_cache" in row and "0.0318757" in row and "-2" in row
    assert "2 prune records" in result.stderr


def test_layer_shows_every_channel() -> None:
    result = run(PER_CHANNEL, "--layer", K0)
    assert result.exit_code == 0, result.output
    assert f"{K0} (kv_cache, 4 channels)" in result.stderr
    for channel, scale, offset in [(0, "0.01", "-1"), (1, "0.02", "0"), (2, "0.03", "1"), (3, "0.04", "2")]:
        assert any(
            line.split("│")[1:4] == [f" {channel:<7} ", f" {scale:<5} ", f" {offset:<6} "]
            for line in result.stderr.splitlines()
        ), result.stderr
    assert V0 not in result.stderr


def test_json_summary() -> None:
    result = run(PER_CHANNEL, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["record"] == str(PER_CHANNEL)
    assert payload["prune_records"] == 0
    assert payload["entries"] == [
        {"layer": K0, "kind": "kv_cache", "channels": 4, "scale_min": 0.01, "scale_max": 0.04, "offset_min": -1, "offset_max": 2},
        {"layer": V0, "kind": "kv_cache", "channels": 1, "scale_min": 0.0318757, "scale_max": 0.0318757, "offset_min": -2, "offset_max": -2},
        {"layer": K1, "kind": "kv_cache", "channels": 1, "scale_min": 0.5, "scale_max": 0.5, "offset_min": 0, "offset_max": 0},
    ]


def test_json_layer_detail() -> None:
    result = run(PER_CHANNEL, "--layer", K1, "--layer", K0, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [(d["layer"], d["scale"], d["offset"]) for d in payload["layers"]] == [
        (K1, [0.5], [0]),
        (K0, [0.01, 0.02, 0.03, 0.04], [-1, 0, 1, 2]),
    ]


@pytest.fixture
def diff_pair(tmp_path: Path) -> tuple[Path, Path]:
    old = tmp_path / "old.txt"
    new = tmp_path / "new.txt"
    old.write_text(PER_CHANNEL.read_text(encoding="utf-8") + 'record { key: "gone" kv_cache_value { scale: 1 offset: 0 } }\n')
    new.write_text(
        PER_CHANNEL.read_text(encoding="utf-8")
        .replace("scale: 0.02\n", "scale: 0.021\n")
        .replace("offset: 2\n", "offset: 5\n")
        .replace("scale: 0.5\n", "scale: 0.5\n    scale: 0.75\n")
        .replace("offset: 0\n  }\n}\n", "offset: 0\n    offset: 1\n  }\n}\n", 1)
        + 'record { key: "fresh" kv_cache_value { scale: 2 offset: 0 } }\n'
    )
    return old, new


def test_diff_table(diff_pair: tuple[Path, Path]) -> None:
    old, new = diff_pair
    result = run(old, "--diff", new)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()

    def row(layer: str) -> str:
        return next(line for line in lines if f" {layer} " in line)

    assert "changed" in row(K0) and "2/4" in row(K0) and "0.001 (5.00%)" in row(K0) and "│ 3 " in row(K0)
    assert "unchanged" in row(V0)
    assert "changed" in row(K1) and "1 → 2" in row(K1)
    assert "removed" in row("gone")
    assert "added" in row("fresh")
    assert "1 added, 1 removed, 2 changed, 1 unchanged" in result.stderr


def test_diff_json(diff_pair: tuple[Path, Path]) -> None:
    old, new = diff_pair
    result = run(old, "--diff", new, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["counts"] == {"added": 1, "removed": 1, "changed": 2, "unchanged": 1}
    rows = {d["layer"]: d for d in payload["layers"]}
    assert rows[K0]["status"] == "changed"
    assert rows[K0]["channels_changed"] == 2
    assert rows[K0]["largest_offset_change"] == 3
    assert rows[K0]["largest_scale_change"] == pytest.approx(0.001, rel=1e-4)
    assert rows[K1]["channels_a"] == 1 and rows[K1]["channels_b"] == 2
    assert rows["gone"]["status"] == "removed" and rows["fresh"]["status"] == "added"
    assert rows[V0]["status"] == "unchanged"

    limited = json.loads(run(old, "--diff", new, "--json", "--layer", "fresh").stdout)
    assert [d["layer"] for d in limited["layers"]] == ["fresh"]


def test_unknown_layer_is_an_error_with_close_names() -> None:
    result = run(PER_CHANNEL, "--layer", "model.layers.0.self_attn.q_proj")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: layer not in record")
    assert K0 in result.stderr
    assert result.stdout == ""


def test_corrupt_file_exit_1_with_line_number() -> None:
    result = run(CORRUPT)
    assert result.exit_code == 1
    assert f"error: {CORRUPT}:5:13: invalid record:" in result.stderr
    assert "Traceback" not in result.output


def test_corrupt_other_file_in_diff(tmp_path: Path) -> None:
    result = run(PER_CHANNEL, "--diff", CORRUPT)
    assert result.exit_code == 1
    assert f"{CORRUPT}:5:13:" in result.stderr


def test_missing_file_exit_1(tmp_path: Path) -> None:
    result = run(tmp_path / "nope.txt")
    assert result.exit_code == 1
    assert f"error: record file {tmp_path / 'nope.txt'} does not exist" in result.stderr


def test_help_has_an_example() -> None:
    result = CliRunner().invoke(main, ["inspect-record", "--help"])
    assert result.exit_code == 0
    assert "kvcal inspect-record record.txt --layer" in result.output
    assert "--diff OTHER" in result.output and "--json" in result.output
