"""Scaffolding shared by the PTQ tests (tests/test_ptq_*.py).

Importable by every test (tests/ is on sys.path): `from ptq_helpers import PTQ_DATA, ptq_models`.
The autouse fixture `one_torch_thread` applies only to a test module that imports it by name:
`from ptq_helpers import one_torch_thread  # noqa: F401` — not to the whole suite.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

__all__ = ["DEMO_CNN", "PTQ_DATA", "PTQ_MODELS", "ROOT", "demo_cnn", "load_module", "one_torch_thread", "ptq_models"]

ROOT = Path(__file__).resolve().parent.parent
PTQ_DATA = Path(__file__).parent / "data" / "ptq"
PTQ_MODELS = PTQ_DATA / "ptq_models.py"  # the PTQ test models: `PtqNet`, `build`, `sample`
DEMO_CNN = ROOT / "scripts" / "demo_cnn_model.py"  # the PTQ demo CNN: `build`, `write_batches`


def load_module(path: Path) -> ModuleType:
    """A fresh module object executed from `path` (named after its stem; not put in sys.modules)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def ptq_models() -> ModuleType:
    """tests/data/ptq/ptq_models.py, freshly loaded."""
    return load_module(PTQ_MODELS)


def demo_cnn() -> ModuleType:
    """scripts/demo_cnn_model.py, freshly loaded."""
    return load_module(DEMO_CNN)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny forward passes: a second intra-op thread only adds wake-up latency (10-100x on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
