"""Hooks, create_quant_cali_model and run_calibration on a tiny decoder-shaped model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from reference_capture import capture_outputs
from torch import Tensor, nn

from kvcal import create_quant_cali_model
from kvcal.calibration.runner import attach_observers, run_calibration
from kvcal.errors import CalibrationError, ConfigError, DatasetError, RecordError
from kvcal.kv.api import get_quant_cali_hooks, remove_quant_cali_hooks
from kvcal.kv.config_json import write_config
from kvcal.kv.plan import CalibrationPlan, LayerPlan
from kvcal.observers import make_observer
from kvcal.params import HfmgParams, IfmrParams
from kvcal.quant import QParams, fake_quant, sqnr_db, to_channels
from kvcal.record.store import read_record

VOCAB = 32
FOREIGN_RECORD = 'record {\n  key: "lm_head"\n  value {\n    scale_d: 0.25\n    offset_d: -3\n  }\n}\n'


class Attention(nn.Module):
    def __init__(self, hidden: int, kv: int) -> None:
        super().__init__()
        self.k_proj = nn.Linear(hidden, kv)
        self.v_proj = nn.Linear(hidden, kv)
        self.o_proj = nn.Linear(kv, hidden)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.o_proj(self.v_proj(h) * torch.sigmoid(self.k_proj(h)))


class Layer(nn.Module):
    def __init__(self, hidden: int, kv: int) -> None:
        super().__init__()
        self.self_attn = Attention(hidden, kv)

    def forward(self, h: Tensor) -> Tensor:
        return self.self_attn(h)


class Inner(nn.Module):
    def __init__(self, hidden: int, kv: int, layers: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, hidden)
        self.layers = nn.ModuleList(Layer(hidden, kv) for _ in range(layers))


class TinyDecoder(nn.Module):
    """forward(input_ids, poison=None): `poison` multiplies the embeddings (NaN injection)."""

    def __init__(self, hidden: int = 16, kv: int = 8, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Inner(hidden, kv, layers)
        self.unused = nn.Linear(hidden, hidden)  # never called by forward
        self.calls = 0

    def forward(self, input_ids: Tensor, poison: Tensor | None = None) -> Tensor:
        self.calls += 1
        h = self.model.embed_tokens(input_ids)
        if poison is not None:
            h = h * poison
        for layer in self.model.layers:
            h = layer(h)
        return h


def make_plan(batch_num: int = 2, layers: int = 2, extra: tuple[str, ...] = ()) -> CalibrationPlan:
    plans: list[LayerPlan] = []
    for i in range(layers):
        plans.append(LayerPlan(f"model.layers.{i}.self_attn.k_proj", HfmgParams(num_of_bins=1024), granularity=0))
        plans.append(
            LayerPlan(
                f"model.layers.{i}.self_attn.v_proj", IfmrParams(search_step=0.02), granularity=1, asymmetric=False
            )
        )
    plans.extend(LayerPlan(name, IfmrParams()) for name in extra)
    return CalibrationPlan(batch_num=batch_num, activation_offset=True, layers=tuple(plans))


def make_data(directory: Path, count: int, seed: int = 1) -> list[Tensor]:
    directory.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, VOCAB, (2, 6), generator=gen) for _ in range(count)]
    for i, batch in enumerate(batches):
        torch.save(batch, directory / f"{i:02d}.pt")
    return batches


def kv_entries(path: Path) -> dict[str, tuple[list[float], list[int]]]:
    return {
        entry.key: (list(entry.kv_cache_value.scale), list(entry.kv_cache_value.offset))
        for entry in read_record(path).record
        if entry.HasField("kv_cache_value")
    }


def all_hooks(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


# ------------------------------------------------------------------ hooks


def test_hooks_leave_outputs_bit_identical_and_detach() -> None:
    model = TinyDecoder().eval()
    x = torch.randint(0, VOCAB, (3, 7))
    plan = make_plan(batch_num=1)
    with torch.no_grad():
        before = model(x)
        with attach_observers(model, plan) as hooks:
            assert all_hooks(model) == 4
            during = model(x)
            assert hooks.feed.complete
        after = model(x)
    assert all_hooks(model) == 0
    assert torch.equal(before, during) and torch.equal(before, after)
    hooks.detach()  # idempotent
    assert not hooks.attached


def test_on_complete_is_called_once_per_layer() -> None:
    model = TinyDecoder().eval()
    seen: list[tuple[str, int]] = []
    hooks = attach_observers(model, make_plan(batch_num=2), on_complete=lambda n, o: seen.append((n, o.batches_seen)))
    with torch.no_grad():
        for _ in range(4):
            model(torch.randint(0, VOCAB, (1, 4)))
    hooks.detach()
    assert sorted(seen) == sorted((name, 2) for name in make_plan().layer_names)


def test_attach_rejects_a_missing_or_non_linear_layer() -> None:
    model = TinyDecoder()
    with pytest.raises(ConfigError, match="'model.layers.0.self_attn.q_proj' does not exist"):
        attach_observers(model, make_plan(extra=("model.layers.0.self_attn.q_proj",)))
    with pytest.raises(ConfigError, match="is a Embedding, not a torch.nn.Linear"):
        attach_observers(model, make_plan(extra=("model.embed_tokens",)))
    assert all_hooks(model) == 0


# ------------------------------------------------------------------ create_quant_cali_model


def test_create_quant_cali_model_writes_each_layer_at_batch_num(tmp_path: Path) -> None:
    model = TinyDecoder().eval()
    plan = make_plan(batch_num=2)
    config = tmp_path / "config.json"
    write_config(plan, config)
    record = tmp_path / "record.txt"
    record.write_text(FOREIGN_RECORD, encoding="utf-8")
    batches = [torch.randint(0, VOCAB, (2, 5)) for _ in range(3)]
    reference = capture_outputs(model, plan.layer_names, batches[:2])
    with torch.no_grad():
        plain = model(batches[0])
    cali = create_quant_cali_model(str(config), str(record), model)
    assert cali is model
    with torch.no_grad():
        assert torch.equal(cali(batches[0]), plain)
        assert kv_entries(record) == {}
        cali(batches[1])
    written = record.read_bytes()
    entries = kv_entries(record)
    # Written as each layer completes: v_proj runs before k_proj in this model's forward.
    assert sorted(entries) == sorted(plan.layer_names)
    for layer in plan.layers:
        observer = make_observer(plan.settings(layer), layer.name)
        for out in reference[layer.name]:
            observer.update(out)
        expected = observer.compute()
        assert entries[layer.name] == (expected.scale.tolist(), expected.offset.tolist())
    assert read_record(record).record[0].key == "lm_head"
    with torch.no_grad():
        cali(batches[2])  # past batch_num: nothing changes
    assert record.read_bytes() == written
    hooks = get_quant_cali_hooks(model)
    assert hooks is not None and hooks.feed.complete
    # A second call replaces the observers instead of stacking hooks.
    create_quant_cali_model(config, record, model)
    assert all_hooks(model) == 4
    assert remove_quant_cali_hooks(model) is True
    assert remove_quant_cali_hooks(model) is False
    assert all_hooks(model) == 0


def test_create_quant_cali_model_rejects_a_config_for_another_model(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    write_config(make_plan(layers=2), config)
    small = TinyDecoder(layers=1)
    with pytest.raises(ConfigError, match="model.layers.1"):
        create_quant_cali_model(config, tmp_path / "record.txt", small)
    assert all_hooks(small) == 0


# ------------------------------------------------------------------ run_calibration


def test_run_calibration_matches_direct_observers(tmp_path: Path) -> None:
    model = TinyDecoder().eval()
    plan = make_plan(batch_num=2)
    batches = make_data(tmp_path / "data", 2)
    reference = capture_outputs(model, plan.layer_names, batches)
    record = tmp_path / "record.txt"
    record.write_text(FOREIGN_RECORD, encoding="utf-8")
    progress: list[tuple[int, int]] = []
    result = run_calibration(
        model=model,
        plan=plan,
        dataset_dir=tmp_path / "data",
        record_path=record,
        device="cpu",
        progress=lambda done, total: progress.append((done, total)),
    )
    assert progress == [(0, 2), (1, 2), (2, 2)]
    assert [p.name for p in result.data_files] == ["00.pt", "01.pt"]
    assert result.batches_used == 2 and result.device == "cpu"
    entries = kv_entries(record)
    assert read_record(record).record[0].key == "lm_head"
    for layer, summary in zip(plan.layers, result.layers):
        settings = plan.settings(layer)
        observer = make_observer(settings, layer.name)
        for out in reference[layer.name]:
            observer.update(out)
        expected = observer.compute()
        assert entries[layer.name] == (expected.scale.tolist(), expected.offset.tolist())
        assert summary.name == layer.name
        assert summary.algorithm == settings.algo
        assert summary.channels == (8 if settings.granularity == 1 else 1)
        assert summary.scale_min == pytest.approx(float(expected.scale.min()))
        assert summary.offset_max == int(expected.offset.max())
        last = to_channels(reference[layer.name][-1], settings.granularity)
        assert summary.sqnr_db == pytest.approx(sqnr_db(last, fake_quant(last, expected)), rel=1e-6)
        assert 10.0 < summary.sqnr_db < math.inf
    assert [change.status for change in result.report.layers] == ["new"] * 4
    assert result.report.written


def test_recalibration_reports_changes_and_report_json(tmp_path: Path) -> None:
    model = TinyDecoder().eval()
    plan = make_plan(batch_num=1)
    record = tmp_path / "record.txt"
    make_data(tmp_path / "a", 1, seed=1)
    make_data(tmp_path / "b", 1, seed=2)
    run_calibration(model=model, plan=plan, dataset_dir=tmp_path / "a", record_path=record)
    again = run_calibration(model=model, plan=plan, dataset_dir=tmp_path / "a", record_path=record)
    assert {c.status for c in again.report.layers} == {"unchanged"}
    changed = run_calibration(model=model, plan=plan, dataset_dir=tmp_path / "b", record_path=record)
    assert "changed" in {c.status for c in changed.report.layers}
    document = json.loads(json.dumps(changed.to_dict(), allow_nan=False))
    assert document["batches_used"] == 1
    assert [layer["layer"] for layer in document["layers"]] == plan.layer_names
    assert document["overwrite_report"]["layers"][0]["old_scale"] is not None
    assert "last calibration batch" in document["sqnr_basis"]


def test_extra_files_are_not_read(tmp_path: Path) -> None:
    make_data(tmp_path / "data", 2)
    (tmp_path / "data" / "02.pt").write_bytes(b"garbage that would fail to load")
    result = run_calibration(
        model=TinyDecoder().eval(), plan=make_plan(batch_num=2), dataset_dir=tmp_path / "data",
        record_path=tmp_path / "record.txt",
    )
    assert [p.name for p in result.data_files] == ["00.pt", "01.pt"]


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    make_data(tmp_path / "data", 1)
    record = tmp_path / "record.txt"
    result = run_calibration(
        model=TinyDecoder().eval(), plan=make_plan(batch_num=1), dataset_dir=tmp_path / "data",
        record_path=record, dry_run=True,
    )
    assert not record.exists()
    assert result.report.dry_run and not result.report.written
    assert len(result.layers) == 4


@pytest.fixture
def record(tmp_path: Path) -> Path:
    path = tmp_path / "record.txt"
    path.write_text(FOREIGN_RECORD, encoding="utf-8")
    return path


def _fails(
    tmp_path: Path, record: Path, model: nn.Module, plan: CalibrationPlan, error: type, match: str | None
) -> None:
    before = record.read_bytes()
    with pytest.raises(error, match=match):
        run_calibration(model=model, plan=plan, dataset_dir=tmp_path / "data", record_path=record)
    assert record.read_bytes() == before
    assert all_hooks(model) == 0


def test_fewer_batches_than_batch_num(tmp_path: Path, record: Path) -> None:
    make_data(tmp_path / "data", 2)
    _fails(
        tmp_path, record, TinyDecoder(), make_plan(batch_num=3), CalibrationError,
        r"fewer batches than batch_num=3: the dataset has 2 data file\(s\); "
        r"'model.layers.0.self_attn.k_proj' saw 2 of 3.*nothing was written",
    )


def test_layer_that_never_ran(tmp_path: Path, record: Path) -> None:
    make_data(tmp_path / "data", 1)
    _fails(
        tmp_path, record, TinyDecoder(), make_plan(batch_num=1, extra=("unused",)), CalibrationError,
        r"never ran during the 1 forward pass\(es\): 'unused'",
    )


def test_nan_output_names_the_layer_and_the_file(tmp_path: Path, record: Path) -> None:
    make_data(tmp_path / "data", 1)
    torch.save({"input_ids": torch.zeros(1, 3, dtype=torch.long), "poison": torch.tensor(float("nan"))},
               tmp_path / "data" / "01.pt")
    _fails(
        tmp_path, record, TinyDecoder(), make_plan(batch_num=2), CalibrationError,
        r"data file .*01\.pt: layer 'model.layers.0.self_attn.v_proj': batch 2 contains NaN or inf",
    )


def test_model_raising_names_the_file(tmp_path: Path, record: Path) -> None:
    make_data(tmp_path / "data", 1)
    torch.save(torch.full((1, 3), VOCAB + 5), tmp_path / "data" / "01.pt")  # out of the vocabulary
    _fails(
        tmp_path, record, TinyDecoder(), make_plan(batch_num=2), CalibrationError,
        r"the model raised on data file .*01\.pt: IndexError",
    )


def test_float64_output_is_a_calibration_error(tmp_path: Path, record: Path) -> None:
    make_data(tmp_path / "data", 1)
    _fails(tmp_path, record, TinyDecoder().double(), make_plan(batch_num=1), CalibrationError, "float64")


def test_unreadable_data_file_is_named(tmp_path: Path, record: Path) -> None:
    make_data(tmp_path / "data", 1)
    (tmp_path / "data" / "01.npy").write_bytes(b"\x93NUMPY broken")
    _fails(tmp_path, record, TinyDecoder(), make_plan(batch_num=2), DatasetError, r"01\.npy: not a readable")


def test_keyboard_interrupt_leaves_the_record(tmp_path: Path, record: Path) -> None:
    make_data(tmp_path / "data", 2)

    class Interrupted(TinyDecoder):
        def forward(self, input_ids: Tensor, poison: Tensor | None = None) -> Tensor:
            if self.calls == 1:
                raise KeyboardInterrupt
            return super().forward(input_ids, poison)

    _fails(tmp_path, record, Interrupted(), make_plan(batch_num=2), KeyboardInterrupt, None)


def test_unreadable_record_fails_before_any_forward_pass(tmp_path: Path) -> None:
    make_data(tmp_path / "data", 1)
    record = tmp_path / "record.txt"
    record.write_text("record {\n  key: 3 oops\n", encoding="utf-8")
    model = TinyDecoder()
    _fails(tmp_path, record, model, make_plan(batch_num=1), RecordError, r"record.txt:2:.*nothing was calibrated")
    assert model.calls == 0
    result = run_calibration(
        model=model, plan=make_plan(batch_num=1), dataset_dir=tmp_path / "data", record_path=record, force=True
    )
    assert (tmp_path / "record.txt.bak").read_text(encoding="utf-8") == "record {\n  key: 3 oops\n"
    assert result.report.backup is not None
    assert len(kv_entries(record)) == 4


def test_qparams_in_result_are_on_cpu(tmp_path: Path) -> None:
    make_data(tmp_path / "data", 1)
    result = run_calibration(
        model=TinyDecoder(), plan=make_plan(batch_num=1), dataset_dir=tmp_path / "data",
        record_path=tmp_path / "r.txt", dry_run=True,
    )
    assert all(isinstance(q, QParams) and q.scale.device.type == "cpu" for q in result.qparams.values())
