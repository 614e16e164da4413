"""The checked-in *_pb2.py files are exactly what `make proto` generates from the .proto sources."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "src" / "kvcal" / "proto"
PROTOS = sorted(PROTO_DIR.glob("*.proto"))


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools is not installed")
def test_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    assert PROTOS, f"no .proto files in {PROTO_DIR}"
    # The same command line as `make proto`, but writing into a temporary directory.
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-Isrc",
        f"--python_out={tmp_path}",
        *(str(path.relative_to(ROOT)) for path in PROTOS),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    for proto in PROTOS:
        name = f"{proto.stem}_pb2.py"
        generated = tmp_path / "kvcal" / "proto" / name
        assert generated.is_file(), f"protoc did not generate {name}"
        assert generated.read_bytes() == (PROTO_DIR / name).read_bytes(), f"{name} is stale: run `make proto`"
    # No checked-in generated module without its source.
    assert sorted(p.name for p in PROTO_DIR.glob("*_pb2.py")) == sorted(f"{p.stem}_pb2.py" for p in PROTOS)
