"""`kvcal calibrate`: data formats, report, dry run, re-calibration and every failure path."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from kvcal.record.store import read_record
from safetensors.torch import save_file

from kvcal.cli import main
from kvcal.floats import f32_text
from kvcal.kv.config_json import write_config
from kvcal.kv.plan import CalibrationPlan, LayerPlan
from kvcal.observers import make_observer
from kvcal.params import HfmgParams, IfmrParams

ROOT = Path(__file__).resolve().parent.parent

# The user's model, as a file entry point. forward(x, y=None) so every call shape is usable;
# a batch of 13 rows makes it raise, as a model that breaks on some input would.
MODEL_SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.k_proj = nn.Linear(8, 6)
        self.v_proj = nn.Linear(8, 6)
        self.unused = nn.Linear(8, 6)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x, y=None):
        if y is not None:
            x = x + y
        if x.shape[0] == 13:
            raise RuntimeError("boom on purpose")
        return self.k_proj(x) * self.v_proj(x)


def build():
    return Net().eval()
'''

FOREIGN_RECORD = 'record {\n  key: "lm_head"\n  value {\n    scale_d: 0.25\n    offset_d: -3\n  }\n}\n'


def kv_entries(path: Path) -> dict[str, tuple[list[float], list[int]]]:
    return {
        entry.key: (list(entry.kv_cache_value.scale), list(entry.kv_cache_value.offset))
        for entry in read_record(path).record
        if entry.HasField("kv_cache_value")
    }


def make_plan(batch_num: int = 1, extra: tuple[str, ...] = ()) -> CalibrationPlan:
    layers = [
        LayerPlan("k_proj", HfmgParams(num_of_bins=2048), granularity=0),
        LayerPlan("v_proj", IfmrParams(), granularity=1),
        *(LayerPlan(name, IfmrParams()) for name in extra),
    ]
    return CalibrationPlan(batch_num=batch_num, activation_offset=True, layers=tuple(layers))


class Workspace:
    """A tmp dir with the model file, a config, a data dir and a record path."""

    def __init__(self, root: Path, plan: CalibrationPlan | None = None) -> None:
        self.root = root
        self.model_file = root / "net.py"
        self.model_file.write_text(MODEL_SOURCE, encoding="utf-8")
        self.config = root / "config.json"
        self.plan = plan or make_plan()
        write_config(self.plan, self.config)
        self.data = root / "data"
        self.data.mkdir()
        self.record = root / "record.txt"

    def build(self) -> torch.nn.Module:
        namespace: dict[str, Any] = {}
        exec(compile(MODEL_SOURCE, str(self.model_file), "exec"), namespace)
        return namespace["build"]()

    def args(self, *extra: str) -> list[str]:
        return [
            "calibrate",
            "--model", f"{self.model_file}:build",
            "--config", str(self.config),
            "--dataset", str(self.data),
            "--record", str(self.record),
            "--device", "cpu",
            *extra,
        ]

    def run(self, *extra: str) -> Result:
        return CliRunner().invoke(main, self.args(*extra))

    def expected(self, calls: list[tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]]) -> dict[str, Any]:
        """The factors the plan's observers give for the layer outputs of `calls` (the reference)."""
        model = self.build()
        modules = dict(model.named_modules())
        observers = {layer.name: make_observer(self.plan.settings(layer), layer.name) for layer in self.plan.layers}
        handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: observers[n].update(o)) for n in observers]
        with torch.no_grad():
            for args, kwargs in calls:
                model(*args, **kwargs)
        for handle in handles:
            handle.remove()
        results = {}
        for name, observer in observers.items():
            q = observer.compute()
            results[name] = (q.scale.tolist(), q.offset.tolist())
        return results


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ data formats


@pytest.mark.parametrize("fmt", ["pt_tensor", "pt_tuple", "pt_dict", "npy", "npz", "npz_positional", "safetensors"])
def test_each_dataset_format(ws: Workspace, fmt: str) -> None:
    x, y = randn(4, 3, 8, seed=1), randn(4, 3, 8, seed=2)
    if fmt == "pt_tensor":
        torch.save(x, ws.data / "a.pt")
        call: tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]] = ((x,), {})
    elif fmt == "pt_tuple":
        torch.save((x, y), ws.data / "a.pth")
        call = ((x, y), {})
    elif fmt == "pt_dict":
        torch.save({"x": x, "y": y}, ws.data / "a.pt")
        call = ((), {"x": x, "y": y})
    elif fmt == "npy":
        np.save(ws.data / "a.npy", x.numpy())
        call = ((x,), {})
    elif fmt == "npz":
        np.savez(ws.data / "a.npz", x=x.numpy(), y=y.numpy())
        call = ((), {"x": x, "y": y})
    elif fmt == "npz_positional":
        np.savez(ws.data / "a.npz", x.numpy(), y.numpy())
        call = ((x, y), {})
    else:
        save_file({"x": x, "y": y}, str(ws.data / "a.safetensors"))
        call = ((), {"x": x, "y": y})
    result = ws.run()
    assert result.exit_code == 0, result.output
    assert kv_entries(ws.record) == ws.expected([call])


def test_summary_progress_and_overwrite_report_on_stderr(ws: Workspace) -> None:
    torch.save(randn(2, 8), ws.data / "a.pt")
    result = ws.run()
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    err = result.stderr
    assert "1/1 batches" in err
    assert "KV-cache calibration" in err and "SQNR dB" in err and "hfmg (asym)" in err
    assert "1 data file used (batch_num 1) on cpu" in err
    assert "2 new, 0 changed, 0 unchanged; written" in err


def test_quiet_prints_nothing(ws: Workspace) -> None:
    torch.save(randn(2, 8), ws.data / "a.pt")
    result = ws.run("--quiet")
    assert result.exit_code == 0, result.output
    assert result.output == ""
    assert len(kv_entries(ws.record)) == 2


def test_skipped_files_are_warned_about(ws: Workspace) -> None:
    torch.save(randn(2, 8), ws.data / "a.pt")
    (ws.data / "notes.md").write_text("about the data")
    result = ws.run("--quiet")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "notes.md: skipped, not a supported data file" in result.stderr


def test_only_batch_num_files_are_read(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, make_plan(batch_num=2))
    x1, x2 = randn(2, 8, seed=1), randn(2, 8, seed=2)
    torch.save(x1, ws.data / "0.pt")
    torch.save(x2, ws.data / "1.pt")
    (ws.data / "2.pt").write_bytes(b"never read")
    result = ws.run("--report", str(ws.root / "report.json"))
    assert result.exit_code == 0, result.output
    assert kv_entries(ws.record) == ws.expected([((x1,), {}), ((x2,), {})])
    report = json.loads((ws.root / "report.json").read_text())
    assert [Path(p).name for p in report["data_files"]] == ["0.pt", "1.pt"]


# ------------------------------------------------------------------ dry run, report, re-calibration


def test_dry_run_writes_nothing(ws: Workspace) -> None:
    torch.save(randn(2, 8), ws.data / "a.pt")
    result = ws.run("--dry-run")
    assert result.exit_code == 0, result.output
    assert not ws.record.exists()
    assert not (ws.root / "record.txt.lock").exists()
    assert "dry run: nothing written" in result.stderr


def test_report_json_content(ws: Workspace) -> None:
    torch.save(randn(2, 8), ws.data / "a.pt")
    report_path = ws.root / "report.json"
    result = ws.run("--report", str(report_path))
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["batch_num"] == 1 and report["batches_used"] == 1 and report["dry_run"] is False
    assert report["device"] == "cpu" and report["record"] == str(ws.record)
    layers = {layer["layer"]: layer for layer in report["layers"]}
    assert set(layers) == {"k_proj", "v_proj"}
    assert layers["k_proj"]["algorithm"] == "hfmg" and layers["k_proj"]["channels"] == 1
    assert layers["v_proj"]["granularity"] == "per_channel" and layers["v_proj"]["channels"] == 6
    scales, offsets = kv_entries(ws.record)["v_proj"]
    assert layers["v_proj"]["scale_min"] == pytest.approx(min(scales))
    assert layers["v_proj"]["offset_max"] == max(offsets)
    assert isinstance(layers["v_proj"]["sqnr_db"], float)
    overwrite = report["overwrite_report"]
    assert overwrite["written"] is True
    assert [layer["status"] for layer in overwrite["layers"]] == ["new", "new"]
    assert not list(ws.root.glob(".report.json*"))  # no temporary file left behind


def test_report_with_dry_run_is_still_written(ws: Workspace) -> None:
    torch.save(randn(2, 8), ws.data / "a.pt")
    result = ws.run("--dry-run", "--report", str(ws.root / "r.json"))
    assert result.exit_code == 0, result.output
    report = json.loads((ws.root / "r.json").read_text())
    assert report["dry_run"] is True and report["overwrite_report"]["written"] is False


def test_recalibration_shows_old_to_new_and_keeps_foreign_entries(ws: Workspace) -> None:
    ws.record.write_text(FOREIGN_RECORD, encoding="utf-8")
    torch.save(randn(2, 8, seed=1), ws.data / "a.pt")
    assert ws.run("--quiet").exit_code == 0
    first = kv_entries(ws.record)
    torch.save(randn(2, 8, seed=2) * 3, ws.data / "a.pt")
    result = ws.run("--report", str(ws.root / "r.json"))
    assert result.exit_code == 0, result.output
    second = kv_entries(ws.record)
    assert second["k_proj"] != first["k_proj"]
    old, new = f32_text(first["k_proj"][0][0]), f32_text(second["k_proj"][0][0])
    assert f"{old} → {new}" in result.stderr
    report = json.loads((ws.root / "r.json").read_text())
    k = next(layer for layer in report["overwrite_report"]["layers"] if layer["layer"] == "k_proj")
    assert k["status"] == "changed"
    assert k["old_scale"] == pytest.approx(first["k_proj"][0])
    assert k["new_scale"] == pytest.approx(second["k_proj"][0])
    parsed = read_record(ws.record)
    assert parsed.record[0].key == "lm_head" and parsed.record[0].value.scale_d == 0.25


def test_existing_record_is_parsed_once_before_the_merge(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvcal.record.store

    import kvcal.textproto

    ws.record.write_text(FOREIGN_RECORD, encoding="utf-8")
    torch.save(randn(2, 8), ws.data / "a.pt")
    reads: list[str] = []
    parses: list[str] = []
    real_read, real_parse = kvcal.record.store.parse_record, kvcal.textproto.text_format.Parse

    def counting_read(data: bytes | str, *, source: str) -> Any:
        reads.append(source)
        return real_read(data, source=source)

    def counting_parse(text: str, message: Any) -> Any:
        parses.append(text)
        return real_parse(text, message)

    monkeypatch.setattr(kvcal.record.store, "parse_record", counting_read)
    monkeypatch.setattr(kvcal.textproto.text_format, "Parse", counting_parse)
    monkeypatch.setattr(kvcal.record.store, "_last_parse", None)
    assert ws.run("--quiet").exit_code == 0
    # Read twice: an early check (before the model loads) and under the lock in the merge;
    # the bytes did not change in between, so the protobuf text is parsed once.
    assert reads == [str(ws.record), str(ws.record)]
    assert len(parses) == 1


def test_same_data_again_is_unchanged(ws: Workspace) -> None:
    torch.save(randn(2, 8), ws.data / "a.pt")
    assert ws.run("--quiet").exit_code == 0
    before = ws.record.read_bytes()
    result = ws.run()
    assert result.exit_code == 0
    assert "0 new, 0 changed, 2 unchanged" in result.stderr
    assert ws.record.read_bytes() == before


# ------------------------------------------------------------------ failures: message and untouched record


def assert_fails(ws: Workspace, *fragments: str, extra: tuple[str, ...] = ()) -> Result:
    ws.record.write_text(FOREIGN_RECORD, encoding="utf-8")
    before = ws.record.read_bytes()
    result = ws.run(*extra)
    assert result.exit_code == 1, result.output
    assert "error:" in result.stderr
    message = " ".join(result.stderr.split())  # rich may wrap long lines
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in result.output
    assert ws.record.read_bytes() == before
    return result


def test_fewer_batches_than_batch_num(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, make_plan(batch_num=3))
    torch.save(randn(2, 8), ws.data / "a.pt")
    torch.save(randn(2, 8), ws.data / "b.pt")
    assert_fails(ws, "has 2 data file(s); batch_num asks for 3 (one batch per file)")


def test_layer_that_never_ran(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, make_plan(extra=("unused",)))
    torch.save(randn(2, 8), ws.data / "a.pt")
    assert_fails(ws, "never ran", "'unused'")


def test_nan_in_a_layer_output(ws: Workspace) -> None:
    x = randn(2, 8)
    x[1, 3] = float("inf")
    torch.save(x, ws.data / "bad.pt")
    assert_fails(ws, "bad.pt", "NaN or inf", "layer '")


def test_model_raising_on_a_batch(ws: Workspace) -> None:
    torch.save(randn(13, 8), ws.data / "thirteen.pt")
    assert_fails(ws, "the model raised on data file", "thirteen.pt", "RuntimeError: boom on purpose")


def test_truncated_data_file(ws: Workspace) -> None:
    np.save(ws.data / "a.npy", randn(64, 8).numpy())
    data = (ws.data / "a.npy").read_bytes()
    (ws.data / "a.npy").write_bytes(data[:100])
    assert_fails(ws, "a.npy", "not a readable .npy file")


def test_pickled_data_file_is_refused_and_not_executed(ws: Workspace) -> None:
    target = ws.root / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, (f"touch {target}",))

    with open(ws.data / "a.pt", "wb") as handle:
        pickle.dump(Exploit(), handle)
    assert_fails(ws, "a.pt", "holds pickled Python objects")
    assert not target.exists()


def test_empty_dataset(ws: Workspace) -> None:
    (ws.data / "readme.md").write_text("x")
    assert_fails(ws, "has no data file")


def test_config_that_does_not_match_the_model(ws: Workspace) -> None:
    torch.save(randn(2, 8), ws.data / "a.pt")
    config = json.loads(ws.config.read_text())
    config["q_proj"] = config.pop("k_proj")
    ws.config.write_text(json.dumps(config))
    assert_fails(ws, "q_proj", "does not exist in the model")


def test_bad_device(ws: Workspace) -> None:
    torch.save(randn(2, 8), ws.data / "a.pt")
    result = CliRunner().invoke(main, [*ws.args()[:-2], "--device", "tpu"])
    assert result.exit_code == 1 and "unknown device 'tpu'" in result.stderr


def test_npu_without_torch_npu(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    torch.save(randn(2, 8), ws.data / "a.pt")
    result = CliRunner().invoke(main, [*ws.args()[:-2], "--device", "npu"])
    assert result.exit_code == 1 and "torch_npu is not installed" in result.stderr


def test_corrupt_record_needs_force(ws: Workspace) -> None:
    torch.save(randn(2, 8), ws.data / "a.pt")
    ws.record.write_text("record {\n  key: oops\n", encoding="utf-8")
    before = ws.record.read_bytes()
    result = ws.run()
    assert result.exit_code == 1
    assert "record.txt:2" in result.stderr and "--force" in " ".join(result.stderr.split())
    assert ws.record.read_bytes() == before
    result = ws.run("--force", "--quiet")
    assert result.exit_code == 0, result.output
    assert (ws.root / "record.txt.bak").read_bytes() == before
    assert set(kv_entries(ws.record)) == {"k_proj", "v_proj"}


def test_report_in_a_missing_directory_fails_before_running(ws: Workspace) -> None:
    torch.save(randn(2, 8), ws.data / "a.pt")
    result = ws.run("--report", str(ws.root / "nope" / "r.json"))
    assert result.exit_code == 1 and "cannot write report" in result.stderr
    assert not ws.record.exists()


# ------------------------------------------------------------------ python -m kvcal, end to end


def test_python_m_kvcal_gen_config_then_calibrate(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        torch.save(torch.randint(0, 128, (2, 12), generator=gen), data / f"{i}.pt")
    env = {**os.environ, "COLUMNS": "200"}
    model = f"{ROOT / 'scripts' / 'demo_model.py'}:build"
    config = tmp_path / "config.json"
    record = tmp_path / "record.txt"
    gen_config = subprocess.run(
        [sys.executable, "-m", "kvcal", "gen-config", "--model", model, "--cfg", str(ROOT / "configs" / "example.cfg"),
         "-o", str(config)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert gen_config.returncode == 0, gen_config.stderr
    calibrate = subprocess.run(
        [sys.executable, "-m", "kvcal", "calibrate", "--model", model, "--config", str(config), "--dataset", str(data),
         "--record", str(record), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert calibrate.returncode == 0, calibrate.stderr
    entries = kv_entries(record)
    assert sorted(entries) == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "kv")
    assert len(entries["model.layers.0.self_attn.v_proj"][0]) == 32  # per-channel: 2 KV heads x 16
    assert len(entries["model.layers.0.self_attn.k_proj"][0]) == 1
    assert "4 new, 0 changed, 0 unchanged; written" in calibrate.stderr


@pytest.mark.parametrize("clash", ["record", "config", "data"])
def test_report_path_that_is_another_input_or_output_is_refused(ws: Workspace, clash: str) -> None:
    torch.save(randn(2, 8), ws.data / "a.pt")
    ws.record.write_text(FOREIGN_RECORD, encoding="utf-8")
    target = {"record": ws.record, "config": ws.config, "data": ws.data / "a.pt"}[clash]
    before = {p: p.read_bytes() for p in (ws.record, ws.config, ws.data / "a.pt")}
    result = ws.run("--report", str(target))
    assert result.exit_code == 1
    role = {"record": "record", "config": "config", "data": "data file"}[clash]
    assert f"the report {target} is also the {role} of this run" in result.stderr
    assert {p: p.read_bytes() for p in before} == before


def test_record_path_that_is_the_config_is_refused_before_loading(ws: Workspace) -> None:
    torch.save(randn(2, 8), ws.data / "a.pt")
    before = ws.config.read_bytes()
    args = ws.args()
    args[args.index("--record") + 1] = str(ws.config)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "the record" in result.stderr and "is also the config of this run" in result.stderr
    assert ws.config.read_bytes() == before


def test_report_failure_leaves_the_record_unchanged(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvcal.record.store

    torch.save(randn(2, 8), ws.data / "a.pt")
    ws.record.write_text(FOREIGN_RECORD, encoding="utf-8")
    report = ws.root / "report.json"
    real = kvcal.record.store.atomic_write

    def failing(path: Path, data: bytes, **kwargs: Any) -> None:
        if Path(path).name == "report.json":
            raise OSError(28, "No space left on device")
        real(path, data, **kwargs)

    monkeypatch.setattr(kvcal.record.store, "atomic_write", failing)
    result = ws.run("--report", str(report))
    assert result.exit_code == 1
    assert f"cannot write {report}: No space left on device; the record was left unchanged" in result.stderr
    assert ws.record.read_text(encoding="utf-8") == FOREIGN_RECORD
    assert not report.exists()


def test_record_failure_restores_the_report(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvcal.record.store

    torch.save(randn(2, 8), ws.data / "a.pt")
    report = ws.root / "report.json"
    report.write_text("old report\n", encoding="utf-8")
    real = kvcal.record.store.atomic_write

    def failing(path: Path, data: bytes, **kwargs: Any) -> None:
        if Path(path) == ws.record:
            raise OSError(28, "No space left on device")
        real(path, data, **kwargs)

    monkeypatch.setattr(kvcal.record.store, "atomic_write", failing)
    result = ws.run("--report", str(report))
    assert result.exit_code == 1
    assert "cannot write record" in result.stderr
    assert not ws.record.exists()
    assert report.read_text(encoding="utf-8") == "old report\n"


def test_summary_names_each_layers_granularity(ws: Workspace) -> None:
    """k_proj is per-tensor and v_proj per-channel in make_plan: swapping the labels must fail here."""
    torch.save(randn(2, 8), ws.data / "a.pt")
    report = ws.root / "report.json"
    result = ws.run("--report", str(report))
    assert result.exit_code == 0, result.output
    layers = {layer["layer"]: layer for layer in json.loads(report.read_text())["layers"]}
    assert (layers["k_proj"]["granularity"], layers["k_proj"]["channels"]) == ("per_tensor", 1)
    assert (layers["v_proj"]["granularity"], layers["v_proj"]["channels"]) == ("per_channel", 6)
    rows: dict[str, str] = {}
    for line in result.stderr.splitlines():  # the summary table comes before the record table
        cells = line.replace("│", " ").split()
        if cells[:1] in (["k_proj"], ["v_proj"]):
            rows.setdefault(cells[0], line)
    assert "per_tensor" in rows["k_proj"] and "per_channel" not in rows["k_proj"]
    assert "per_channel" in rows["v_proj"] and "per_tensor" not in rows["v_proj"]


def test_cache_tap_on_a_model_without_a_cache_suggests_proj(ws: Workspace) -> None:
    torch.save(randn(2, 8), ws.data / "a.pt")
    result = ws.run("--tap", "cache")
    assert result.exit_code == 1
    assert "layer k_proj" in result.stderr and "--tap proj" in result.stderr
    assert not ws.record.exists()


def test_auto_tap_on_a_plain_model_is_proj(ws: Workspace) -> None:
    torch.save(randn(2, 8), ws.data / "a.pt")
    report = ws.root / "report.json"
    assert ws.run("--report", str(report)).exit_code == 0
    assert {layer["tap"] for layer in json.loads(report.read_text())["layers"]} == {"proj"}


# ------------------------------------------------------------------ failures before the model loads

SPY_MODEL = """
import pathlib
import torch

def build():
    pathlib.Path(__file__).with_name("MODEL_WAS_BUILT").write_text("yes")
    return torch.nn.Linear(8, 6)
"""


@pytest.fixture
def spy(ws: Workspace) -> Workspace:
    ws.model_file.write_text(SPY_MODEL, encoding="utf-8")
    return ws


def assert_fails_before_loading(ws: Workspace, fragment: str, *extra: str) -> None:
    result = ws.run(*extra)
    assert result.exit_code == 1, result.output
    assert fragment in " ".join(result.stderr.split())
    assert not (ws.root / "MODEL_WAS_BUILT").exists()
    assert "calibrating" not in result.stderr  # no progress bar before a batch starts


def test_too_few_batches_fails_before_loading(spy: Workspace) -> None:
    spy.plan = make_plan(batch_num=2)
    write_config(spy.plan, spy.config)
    torch.save(randn(2, 8), spy.data / "a.pt")
    assert_fails_before_loading(spy, "has 1 data file(s); batch_num asks for 2")


def test_record_in_a_read_only_directory_fails_before_loading(
    spy: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.save(randn(2, 8), spy.data / "a.pt")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path: Any, mode: int, **kwargs: Any) -> bool:
        # As for a user without write permission there (root bypasses real permissions).
        if Path(path) == locked and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    assert_fails_before_loading(spy, f"directory {locked} is not writable", "--record", str(locked / "r.txt"))


def test_unlockable_record_fails_before_loading(spy: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvcal.record.store

    def refuse(fd: int) -> bool:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(kvcal.record.store, "_try_lock", refuse)
    torch.save(randn(2, 8), spy.data / "a.pt")
    assert_fails_before_loading(spy, "cannot lock")


def test_bad_config_fails_before_loading(spy: Workspace) -> None:
    torch.save(randn(2, 8), spy.data / "a.pt")
    spy.config.write_text("{", encoding="utf-8")
    assert_fails_before_loading(spy, "invalid JSON")


# ------------------------------------------------------------------ never a traceback

UNMOVABLE_MODEL = """
import torch

class Unmovable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.k_proj = torch.nn.Linear(8, 6)
        self.v_proj = torch.nn.Linear(8, 6)

    def to(self, *args, **kwargs):
        raise RuntimeError("device busy")

    def forward(self, x):
        return self.k_proj(x) + self.v_proj(x)

def build():
    return Unmovable()
"""


def test_a_failing_placement_is_one_error_line(ws: Workspace) -> None:
    ws.model_file.write_text(UNMOVABLE_MODEL, encoding="utf-8")
    torch.save(randn(2, 8), ws.data / "a.pt")
    assert_fails(ws, "placing the model on cpu failed: RuntimeError: device busy")


def test_an_unexpected_exception_is_one_error_line(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvcal.calibration.job

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("something nobody planned for")

    monkeypatch.setattr(kvcal.calibration.job, "run_calibration", broken)
    torch.save(randn(2, 8), ws.data / "a.pt")
    result = assert_fails(ws, "unexpected RuntimeError: something nobody planned for")
    assert "Traceback" not in result.stderr
    debug = CliRunner().invoke(main, ["--debug", *ws.args()])
    assert isinstance(debug.exception, RuntimeError)
