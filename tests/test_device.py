"""Device choice: auto order NPU -> CUDA -> CPU, explicit specs, and clear errors."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from kvcal.device import resolve_device
from kvcal.errors import DeviceError


@pytest.fixture
def no_npu(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import torch_npu` raise ImportError, whatever is installed.
    monkeypatch.setitem(sys.modules, "torch_npu", None)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_cudas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_cpu_is_always_available() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


def test_auto_falls_back_to_cpu(no_npu: None, no_cuda: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")


def test_auto_prefers_cuda_over_cpu(no_npu: None, two_cudas: None) -> None:
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_explicit_cuda_index(no_npu: None, two_cudas: None) -> None:
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"'cuda:2' does not exist: 2 CUDA device\(s\) available \(cuda:0, cuda:1\)"):
        resolve_device("cuda:2")


def test_cuda_absent_is_an_error(no_cuda: None) -> None:
    with pytest.raises(DeviceError, match="'cuda' was asked for but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="'cuda:0' was asked for"):
        resolve_device("cuda:0")


def test_npu_without_torch_npu_is_an_error(no_npu: None) -> None:
    with pytest.raises(DeviceError, match="'npu' was asked for but torch_npu is not installed"):
        resolve_device("npu")


def test_npu_with_torch_npu_but_no_device(monkeypatch: pytest.MonkeyPatch, no_cuda: None) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    fake = types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0)
    monkeypatch.setattr(torch, "npu", fake, raising=False)
    with pytest.raises(DeviceError, match="torch_npu reports no available Ascend NPU"):
        resolve_device("npu:0")
    # auto must not pick a reported-but-unavailable NPU.
    assert resolve_device("auto") == torch.device("cpu")


def test_broken_torch_npu_import_is_reported(monkeypatch: pytest.MonkeyPatch, no_cuda: None) -> None:
    real_import = importlib.import_module

    def fake_import(name: str) -> types.ModuleType:
        if name == "torch_npu":
            raise RuntimeError("libascendcl.so: cannot open shared object file")
        return real_import(name)

    monkeypatch.setattr("kvcal.device.importlib.import_module", fake_import)
    with pytest.raises(DeviceError, match="importing torch_npu failed: RuntimeError: libascendcl.so"):
        resolve_device("npu")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "npu:1:2", "", "cpu:0", "auto:1", "tpu"])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(DeviceError, match="auto, cpu, cuda, cuda:N, npu, npu:N"):
        resolve_device(spec)


def test_non_string_spec() -> None:
    with pytest.raises(DeviceError, match="got 0"):
        resolve_device(0)  # type: ignore[arg-type]


# The NPU device type only exists once torch_npu renames torch's privateuse1 backend, a
# process-wide change, so the NPU-present scenarios run in a child interpreter that
# simulates exactly what importing torch_npu does.
_NPU_SCRIPT = textwrap.dedent(
    """
    import json, sys, types
    import torch

    def install_fake_torch_npu(count):
        torch.utils.rename_privateuse1_backend("npu")
        sys.modules["torch_npu"] = types.ModuleType("torch_npu")
        torch.npu = types.SimpleNamespace(is_available=lambda: count > 0, device_count=lambda: count)

    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_device = lambda: 0
    install_fake_torch_npu(2)

    from kvcal.device import resolve_device
    from kvcal.errors import DeviceError

    out = {
        "auto": str(resolve_device("auto")),
        "npu": str(resolve_device("npu")),
        "npu:1": str(resolve_device("NPU:1")),
        "cuda": str(resolve_device("cuda")),
    }
    try:
        resolve_device("npu:2")
    except DeviceError as exc:
        out["npu:2"] = str(exc)
    print(json.dumps(out))
    """
)


def test_auto_prefers_npu_when_torch_npu_reports_one() -> None:
    result = subprocess.run([sys.executable, "-c", _NPU_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["auto"] == "npu:0"
    assert out["npu"] == "npu:0"
    assert out["npu:1"] == "npu:1"
    assert out["cuda"] == "cuda:0"
    assert "'npu:2' does not exist: 2 NPU device(s) available (npu:0, npu:1)" in out["npu:2"]
