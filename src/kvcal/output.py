"""Rich consoles, tables and progress: everything the user sees on stderr.

The library returns data; only this module (called from the CLI and from the Python
API's warnings) turns it into text. Coloured on a terminal, plain otherwise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console

from kvcal.floats import f32_text

if TYPE_CHECKING:  # the record modules are imported on use, keeping `import kvcal.output` light
    from collections.abc import Sequence

    from rich.table import Table
    from rich.text import Text

    from kvcal.calibration.summary import CalibrationResult
    from kvcal.export.vllm_ascend import ExportResult
    from kvcal.kv.layers import LinearInfo
    from kvcal.ptq.summary import PtqCalibrationResult
    from kvcal.record.changes import (
        FieldChange,
        LayerChange,
        OverwriteReport,
        PtqLayerChange,
    )
    from kvcal.record.inspect import RecordDetail, RecordDiff, RecordSummary

__all__ = [
    "err_console",
    "print_error",
    "print_warning",
    "render_gen_config",
    "render_ptq_config",
    "render_overwrite_report",
    "describe_change",
    "field_change_text",
    "change_scale_text",
    "change_offset_text",
    "render_inspection",
    "library_warnings",
    "calibration_progress",
    "render_calibration_summary",
    "render_ptq_summary",
    "render_layers",
    "render_export",
]

err_console = Console(stderr=True, highlight=False)


def print_error(message: str) -> None:
    """One `error: ...` line on stderr, no markup interpretation of the message."""
    err_console.print(f"[bold red]error:[/] {_escape(message)}", soft_wrap=True)


def print_warning(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {_escape(message)}", soft_wrap=True)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# --- gen-config ---


def render_gen_config(plan: Any, output: str) -> None:
    """The table of configured layers and their settings, then where the JSON went.

    Args:
        plan: the `kvcal.kv.plan.CalibrationPlan` that was written.
        output: the JSON config path.
    """
    from kvcal.params import HfmgParams

    offset = "true" if plan.activation_offset else "false"
    rows = []
    for layer in plan.layers:
        params = layer.params
        if isinstance(params, HfmgParams):
            detail = f"num_of_bins {params.num_of_bins}"
        else:
            start, end = params.search_range
            detail = (
                f"percentiles {params.max_percentile}/{params.min_percentile}, "
                f"search [{start}, {end}) step {params.search_step}"
            )
        if layer.asymmetric is None:
            asymmetric = f"{'yes' if plan.activation_offset else 'no'} (global)"
        else:
            asymmetric = "yes" if layer.asymmetric else "no"
        rows.append(
            [_cell(layer.name), _cell(params.algo), _cell(layer.granularity.label), _cell(asymmetric), _cell(detail)]
        )
    title = f"{len(plan.layers)} layer(s), batch_num {plan.batch_num}, activation_offset {offset}"
    columns = ("Layer", "Algorithm", "Granularity", "Asymmetric", "Parameters")
    _print_table(_table(title, f"wrote {output}", columns, rows))


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def render_ptq_config(result: Any, output: str) -> None:
    """`gen-config --ptq`: the quantizable layers and their settings, the excluded modules and
    why, the warnings and notes, then where the JSON went.

    Args:
        result: the `kvcal.ptq.api.PtqResult` that was written.
        output: the JSON config path.
    """
    from rich.text import Text

    plan = result.plan
    rows = []
    for layer in plan.layers:
        weight = layer.weight
        bits = "-" if weight is None else f"{weight.num_bits} ({weight.algo.split('_')[0]})"
        rows.append([
            _cell(layer.name),
            _cell(layer.layer_type),
            _cell(_yes_no(layer.quant_enable), "" if layer.quant_enable else "dim"),
            _cell(layer.act.algo),
            _cell(_yes_no(layer.asymmetric)),
            _cell(bits),
            _cell("-" if weight is None else _yes_no(weight.channel_wise)),
            _cell("-" if layer.dmq is None else _num(layer.dmq)),
        ])
    enabled = len(plan.enabled_layers)
    extras = "".join([f", {plan.fakequant_precision_mode}" if plan.fakequant_precision_mode else "",
                      f", skip_fusion_layers {', '.join(plan.skip_fusion_layers)}" if plan.skip_fusion_layers else ""])
    title = (
        f"PTQ config: {len(plan.layers)} quantizable layer(s), {enabled} enabled; batch_num {plan.batch_num}, "
        f"activation_offset {str(plan.activation_offset).lower()}, do_fusion {str(plan.do_fusion).lower()}{extras}"
    )
    columns = ("Layer", "Type", "Enabled", "Activation", "Asymmetric", "Weight bits", "Channel-wise", "DMQ")
    _print_table(_table(title, None, columns, rows))
    excluded = result.discovery.excluded
    if excluded:
        rows = [[_cell(m.name), _cell(m.type_name), _cell(m.reason)] for m in excluded]
        _print_table(_table(f"Not quantized: {len(excluded)} module(s)", None, ("Layer", "Type", "Reason"), rows))
    for note in result.notes:
        if note.level == "warning":
            print_warning(note.message)
        else:
            err_console.print(Text(f"note: {note.message}"), soft_wrap=True)
    err_console.print(Text(f"wrote {output}"), soft_wrap=True)


# --- records: overwrite report, inspect-record ---

_STATUS_STYLE = {
    "new": "green",
    "changed": "yellow",
    "unchanged": "dim",
    "added": "green",
    "removed": "red",
}


def _table(title: str, caption: str | None, columns: Sequence[str], rows: Sequence[Sequence[Text]]) -> Table:
    """A table that folds long cells rather than cutting them short with "…"."""
    from rich.table import Table

    table = Table(title=title or None, caption=caption, title_justify="left", caption_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _print_table(table: Table) -> None:
    """Print a `_table`: its title and caption as lines of their own (soft-wrapped, so a
    long path or layer name is not broken to the width of a narrow table), then the table."""
    from rich.text import Text

    title, caption = table.title, table.caption
    table.title = table.caption = None
    if title:
        err_console.print(Text(str(title), style="bold"), soft_wrap=True)
    if err_console.is_terminal:
        err_console.print(table)
    else:
        # Plain output (a pipe, a log file) is not wrapped at 80 columns: each row stays on
        # one line, whole, for grep and for tests; a terminal gets the table fitted to it.
        from rich.console import Console
        from rich.measure import Measurement

        needed = Measurement.get(err_console, err_console.options.update_width(100_000), table).maximum
        wide = Console(file=err_console.file, width=max(needed, err_console.width), highlight=False, color_system=None)
        wide.print(table)
    for line in str(caption).splitlines() if caption else ():
        err_console.print(Text(line), soft_wrap=True)


def _cell(text: object, style: str = "") -> Text:
    from rich.text import Text

    return Text(str(text), style=style)  # Text, not markup: layer names may contain "[...]"


def _num(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f32_text(value)
    return str(value)


def render_overwrite_report(report: OverwriteReport) -> None:
    """The overwrite report as a table on stderr: layer, status, then each factor old → new.

    KV-cache layers get the columns scale and offset; PTQ layers one column per field of
    their `value` (a table of their own when a report holds both kinds).
    """
    counts = report.counts()
    summary = f"{counts['new']} new, {counts['changed']} changed, {counts['unchanged']} unchanged"
    if report.dry_run:
        outcome = "dry run: nothing written"
    elif report.written:
        outcome = "written"
    else:
        outcome = "nothing changed: record not rewritten"
    lines = [f"{summary}; {outcome}"]
    if report.backup is not None:
        verb = "would be moved" if report.dry_run else "moved"
        lines.append(f"the unreadable record {verb} aside to {report.backup}")
    from kvcal.record.changes import LayerChange, PtqLayerChange

    rows = [
        (
            _cell(change.layer),
            _cell(change.status, _STATUS_STYLE.get(change.status, "")),
            _cell(change_scale_text(change)),
            _cell(change_offset_text(change)),
        )
        for change in report.layers
        if isinstance(change, LayerChange)
    ]
    ptq = [change for change in report.layers if isinstance(change, PtqLayerChange)]
    caption = "\n".join(lines)
    if rows or not ptq:
        columns = ("Layer", "Status", "Scale", "Offset")
        _print_table(_table(f"Record {report.record}", None if ptq else caption, columns, rows))
    if ptq:
        _print_table(_table(f"Record {report.record}: PTQ values", caption, _PTQ_CHANGE_COLUMNS, _ptq_rows(ptq)))


_PTQ_CHANGE_FIELDS = ("scale_d", "offset_d", "scale_w", "offset_w", "tensor_balance_factor")
_PTQ_CHANGE_COLUMNS = ("Layer", "Status", "scale_d", "offset_d", "scale_w", "offset_w", "tensor_balance_factor", "Types")


def _ptq_rows(changes: Sequence[PtqLayerChange]) -> list[list[Text]]:
    rows = []
    for change in changes:
        cells = [_cell(change.layer), _cell(change.status, _STATUS_STYLE.get(change.status, ""))]
        for name in _PTQ_CHANGE_FIELDS:
            field = change.field(name)
            cells.append(_cell("-" if field is None else field_change_text(field, new_layer=change.status == "new")))
        types = [(short, change.field(name)) for short, name in (("act", "act_type"), ("wts", "wts_type"))]
        cells.append(_cell(", ".join(
            f"{short} {field_change_text(t, new_layer=change.status == 'new')}" for short, t in types if t
        )))
        rows.append(cells)
    return rows


def _plain(values: Sequence[float | int | str]) -> str:
    if any(isinstance(v, str) for v in values):
        return "/".join(str(v) for v in values)
    floats = any(isinstance(v, float) for v in values)
    text = _values_text(values, floats=floats)  # type: ignore[arg-type]
    return text if len(values) == 1 else f"{len(values)} ch: {text}"


def field_change_text(change: FieldChange, *, new_layer: bool = False) -> str:
    """One PTQ field: its value (a new layer), `old → new`, `k/N ch changed, largest ...`, or unchanged."""
    old, new = change.old, change.new
    if new is None:
        return f"{_plain(old or ())} → none"
    if old is None:
        return _plain(new) if new_layer else f"none → {_plain(new)}"
    if not change.changed:
        return _plain(new) if len(new) == 1 else f"{len(new)} ch, unchanged"
    if len(new) == 1 and len(old) == 1:
        return f"{_plain(old)} → {_plain(new)}"
    if change.channels_changed is None:
        return f"{_plain(old)} → {_plain(new)}"
    largest = change.largest_change
    detail = "" if largest is None else f", largest {largest:.3g}{_pct(change.largest_relative_change)}"
    return f"{change.channels_changed}/{len(new)} ch changed{detail}"


# --- overwrite report text ---


def _values_text(values: Sequence[float] | Sequence[int], *, floats: bool) -> str:
    """One value as itself, several as `min … max`, none as `-`."""
    if not values:
        return "-"
    fmt = f32_text if floats else str
    lo, hi = min(values), max(values)
    if lo == hi:
        return fmt(lo)  # type: ignore[arg-type]
    return f"{fmt(lo)} … {fmt(hi)}"  # type: ignore[arg-type]


def _pct(rel: float | None) -> str:
    return f" ({rel:.2%})" if rel is not None else ""


def change_scale_text(change: LayerChange) -> str:
    """The scale column: `old → new`, a per-channel summary, or the value."""
    return _change_column(change, change.old_scale, change.new_scale, floats=True)


def change_offset_text(change: LayerChange) -> str:
    """The offset column: `old → new`, a per-channel summary, or the value."""
    return _change_column(change, change.old_offset, change.new_offset, floats=False)


def _change_column(
    change: LayerChange,
    old: Sequence[float] | Sequence[int] | None,
    new: Sequence[float] | Sequence[int],
    *,
    floats: bool,
) -> str:
    new_text = _values_text(new, floats=floats)
    d = change.delta
    if old is None or d is None:
        return new_text if len(new) == 1 else f"{len(new)} ch: {new_text}"
    old_text = _values_text(old, floats=floats)
    if d.channel_count_changed:
        return f"{len(old)} ch: {old_text} → {len(new)} ch: {new_text}"
    changed = d.scale_changed if floats else d.offset_changed
    if len(new) == 1:
        return f"{old_text} → {new_text}" if changed else new_text
    if not changed:
        return f"{len(new)} ch, unchanged"
    if floats:
        return (
            f"{d.scale_channels_changed}/{len(new)} ch changed, "
            f"largest {d.max_abs_scale_change:.3g}{_pct(d.max_rel_scale_change)}"
        )
    return f"{d.offset_channels_changed}/{len(new)} ch changed, largest {d.max_offset_change}"


def describe_change(change: LayerChange | PtqLayerChange) -> str:
    """One plain-text line: `layer: scale a → b, offset c → d`, `layer: unchanged`, ..."""
    from kvcal.record.changes import PtqLayerChange

    if isinstance(change, PtqLayerChange):
        if change.status == "unchanged":
            return f"{change.layer}: unchanged"
        new = change.status == "new"
        shown = [f for f in change.fields if new or f.changed]
        parts = ", ".join(f"{f.field} {field_change_text(f, new_layer=new)}" for f in shown)
        return f"{change.layer}: {'new, ' if new else ''}{parts}"
    d = change.delta
    if change.status == "new" or d is None:
        if change.channels == 1:
            return f"{change.layer}: new, scale {f32_text(change.new_scale[0])}, offset {change.new_offset[0]}"
        return (
            f"{change.layer}: new, {change.channels} channels, "
            f"scale {_values_text(change.new_scale, floats=True)}, "
            f"offset {_values_text(change.new_offset, floats=False)}"
        )
    if change.status == "unchanged":
        return f"{change.layer}: unchanged"
    if d.channel_count_changed:
        old_scale = _values_text(change.old_scale or (), floats=True)
        old_offset = _values_text(change.old_offset or (), floats=False)
        return (
            f"{change.layer}: channels {d.channels_old} → {d.channels_new}, "
            f"scale {old_scale} → {_values_text(change.new_scale, floats=True)}, "
            f"offset {old_offset} → {_values_text(change.new_offset, floats=False)}"
        )
    if d.channels_new == 1:
        scale = f"scale {change_scale_text(change)}" + ("" if d.scale_changed else " unchanged")
        offset = f"offset {change_offset_text(change)}" + ("" if d.offset_changed else " unchanged")
        return f"{change.layer}: {scale}, {offset}"
    scale = (
        f"largest scale change {d.max_abs_scale_change:.3g}{_pct(d.max_rel_scale_change)}"
        if d.scale_changed
        else "scales unchanged"
    )
    offset = f"largest offset change {d.max_offset_change}" if d.offset_changed else "offsets unchanged"
    return f"{change.layer}: {d.channels_changed}/{d.channels_new} channels changed, {scale}, {offset}"


def _num_range(lo: object, hi: object) -> str:
    return _num(lo) if lo == hi else f"{_num(lo)} … {_num(hi)}"


def _render_summary(summary: RecordSummary) -> None:
    caption = f"{len(summary.entries)} rows"
    if summary.prune_records:
        caption += f"; {summary.prune_records} prune records"
    rows = [
        (
            _cell(e.layer),
            _cell(e.kind),
            _cell(e.channels),
            _cell(_num_range(e.scale_min, e.scale_max)),
            _cell(_num_range(e.offset_min, e.offset_max)),
        )
        for e in summary.entries
    ]
    columns = ("Layer", "Kind", "Channels", "Scale min … max", "Offset min … max")
    _print_table(_table(f"Record {summary.record}", caption, columns, rows))


def _render_detail(detail: RecordDetail) -> None:
    for layer in detail.layers:
        rows = [
            (
                _cell(i),
                _cell(_num(layer.scale[i]) if i < len(layer.scale) else "-"),
                _cell(layer.offset[i] if i < len(layer.offset) else "-"),
            )
            for i in range(layer.channels)
        ]
        plural = "" if layer.channels == 1 else "s"
        title = f"{layer.layer} ({layer.kind}, {layer.channels} channel{plural})"
        _print_table(_table(title, None, ("Channel", "Scale", "Offset"), rows))


def _render_diff(diff: RecordDiff) -> None:
    counts = diff.counts()
    caption = ", ".join(f"{n} {status}" for status, n in counts.items())
    caption += "; prune records " + ("equal" if diff.prune_records_equal else "differ")
    rows = []
    for row in diff.layers:
        d = row.delta
        if row.channels_a is not None and row.channels_b is not None and row.channels_a != row.channels_b:
            channels = f"{row.channels_a} → {row.channels_b}"
        else:
            channels = str(row.channels_b if row.channels_b is not None else row.channels_a)
        if d is None or d.channels_changed is None:
            changed = scale = offset = "-"
        else:
            changed = f"{d.channels_changed}/{d.channels_new}"
            scale = f"{d.max_abs_scale_change:.3g}" if d.max_abs_scale_change is not None else "-"
            if d.max_rel_scale_change is not None and d.scale_changed:
                scale += f" ({d.max_rel_scale_change:.2%})"
            offset = str(d.max_offset_change)
        rows.append(
            (
                _cell(row.layer),
                _cell(row.kind),
                _cell(row.status, _STATUS_STYLE.get(row.status, "")),
                _cell(channels),
                _cell(changed),
                _cell(scale),
                _cell(offset),
            )
        )
    columns = ("Layer", "Kind", "Status", "Channels", "Changed", "Largest scale Δ", "Largest offset Δ")
    _print_table(_table(f"{diff.a} → {diff.b}", caption, columns, rows))


def render_inspection(result: RecordSummary | RecordDetail | RecordDiff) -> None:
    """Render what `kvcal.record.inspect.inspect_record` returned, as tables on stderr."""
    from kvcal.record.inspect import RecordDetail, RecordDiff, RecordSummary

    if isinstance(result, RecordSummary):
        _render_summary(result)
    elif isinstance(result, RecordDetail):
        _render_detail(result)
    elif isinstance(result, RecordDiff):
        _render_diff(result)
    else:
        raise TypeError(f"cannot render {type(result).__name__}")


# --- calibrate: progress and summary ---


class _KvcalLogHandler(logging.Handler):
    """Prints warnings logged by the library (e.g. skipped data files) as `warning:` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print_warning(record.getMessage())
        except Exception:  # a broken record must not break the command
            self.handleError(record)


@contextlib.contextmanager
def library_warnings() -> Iterator[None]:
    """Route the `kvcal` logger's warnings to stderr as `warning:` lines, for one command."""
    logger = logging.getLogger("kvcal")
    handler = _KvcalLogHandler(level=logging.WARNING)
    logger.addHandler(handler)
    # Not propagated: the root logger's last-resort handler would print them a second time.
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


@contextlib.contextmanager
def calibration_progress(*, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (batches done / needed, elapsed, ETA), fed by the callback yielded.

    The callback takes (done, total). Rich draws it live on a terminal and prints the
    final state once otherwise. Disabled: the callback does nothing.
    """
    if not enabled:
        yield lambda done, total: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("calibrating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("batches"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
    )
    task = progress.add_task("calibrate", total=None)
    started = False

    def update(done: int, total: int) -> None:
        nonlocal started
        if not started:  # shown only once the first batch starts: errors before it stand alone
            progress.start()
            started = True
        progress.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if started:
            progress.stop()


def _percent(fraction: float) -> str:
    if fraction != fraction:  # NaN: no sample was kept
        return "-"
    return "0" if fraction == 0.0 else f"{100.0 * fraction:.3g}%"


def _db(value: float) -> str:
    if value != value:  # NaN: not measured
        return "-"
    return "inf" if value == float("inf") else f"{value:.2f}"


def _ptq_weights_text(bits: int | None, channel_wise: bool | None, channels: int) -> str:
    if bits is None:
        return "-"
    return f"INT{bits} " + (f"per-channel ({channels})" if channel_wise else "per-tensor")


def render_ptq_summary(result: PtqCalibrationResult) -> None:
    """The PTQ table: one row per enabled layer, worst output SQNR first, then the model SQNR and notes."""
    from kvcal.ptq.summary import SQNR_BASIS

    rows = []
    for layer in result.worst_first():
        weights = _ptq_weights_text(layer.weight_bits, layer.channel_wise, layer.weight_channels)
        rows.append([
            _cell(layer.name),
            _cell(layer.layer_type),
            _cell(f"{layer.algorithm} ({'asym' if layer.asymmetric else 'sym'})"),
            _cell(_num(layer.scale_d)),
            _cell(layer.offset_d),
            _cell(weights),
            _cell("-" if layer.scale_w_min is None else _num_range(layer.scale_w_min, layer.scale_w_max)),
            _cell("-" if layer.balance_min is None else _num_range(layer.balance_min, layer.balance_max)),
            _cell(layer.fused_bn or "-"),
            _cell(_db(layer.weight_sqnr_db)),
            _cell(_db(layer.input_sqnr_db)),
            _cell(_db(layer.output_sqnr_db), "yellow" if layer.output_sqnr_db < 20.0 else ""),
        ])
    files = "file" if result.batches_used == 1 else "files"
    lines = [
        f"{result.batches_used} data {files} used (batch_num {result.batch_num}) on {result.device}",
        f"SQNR dB — weight: {SQNR_BASIS['weight']}; input: {SQNR_BASIS['input']}; output: {SQNR_BASIS['output']}",
    ]
    if result.fused:
        lines.append("BatchNorm fused: " + ", ".join(f"{bn} into {conv}" for conv, bn in result.fused))
    if result.float_layers:
        lines.append("left in float (quant_enable false): " + ", ".join(result.float_layers))
    columns = ("Layer", "Type", "Activation", "scale_d", "offset_d", "Weights", "scale_w", "DMQ factor",
               "BN fused", "Weight SQNR", "Input SQNR", "Output SQNR")
    title = f"PTQ calibration: model output SQNR {_db(result.model_sqnr_db)} dB ({SQNR_BASIS['model']})"
    _print_table(_table(title, "\n".join(lines), columns, rows))


def render_calibration_summary(result: CalibrationResult | PtqCalibrationResult) -> None:
    """The per-layer table of a calibration result (KV cache or PTQ), on stderr."""
    from kvcal.calibration.summary import SQNR_BASIS
    from kvcal.ptq.summary import PtqCalibrationResult

    if isinstance(result, PtqCalibrationResult):
        render_ptq_summary(result)
        return

    columns = ("Layer", "Tap", "Algorithm", "Granularity", "Channels", "Scale", "Offset", "SQNR dB", "Clipped")
    rows = []
    for layer in result.layers:
        sqnr = layer.sqnr_db
        rows.append(
            [
                _cell(layer.name),
                _cell(layer.tap.value),
                _cell(f"{layer.algorithm} ({'asym' if layer.asymmetric else 'sym'})"),
                _cell(layer.granularity.label),
                _cell(layer.channels),
                _cell(_num_range(layer.scale_min, layer.scale_max)),
                _cell(_num_range(layer.offset_min, layer.offset_max)),
                _cell("inf" if sqnr == float("inf") else f"{sqnr:.2f}"),
                _cell(_percent(layer.clipped), "yellow" if layer.clipped > 0.001 else ""),
            ]
        )
    files = "file" if result.batches_used == 1 else "files"
    caption = (
        f"{result.batches_used} data {files} used (batch_num {result.batch_num}) on {result.device}; "
        f"tap: cache = what the KV cache stores, proj = the Linear output; "
        f"SQNR and clipped values: quantization of the {SQNR_BASIS}"
    )
    # Same table style and plain-output width rule as the record tables above.
    _print_table(_table("KV-cache calibration", caption, columns, rows))


# --- layers ---

_ROLE_TEXT = {"key": "K projection", "value": "V projection", "fused_qkv": "fused Q/K/V: not calibratable", "other": ""}


def render_layers(layers: Sequence[LinearInfo]) -> None:
    """The `kvcal layers` table: every Linear layer with its size and K/V role."""
    rows = [
        (
            _cell(layer.name),
            _cell(layer.in_features),
            _cell(layer.out_features),
            _cell(_ROLE_TEXT[layer.role], "red" if layer.role == "fused_qkv" else ""),
        )
        for layer in layers
    ]
    kv = sum(layer.role in ("key", "value") for layer in layers)
    caption = (
        f"{len(layers)} Linear layers, {kv} look like K/V projections; "
        "select them with a glob, e.g. --quant-layers 'model.layers.*.self_attn.[kv]_proj'"
    )
    _print_table(_table("Linear layers", caption, ("Layer", "In", "Out", "Role"), rows))


# --- export ---


def render_export(result: ExportResult) -> None:
    """The `kvcal export` table: each K/V layer's exported factors, then what the directory holds."""
    rows = [
        (
            _cell(layer.layer),
            _cell("1 (per tensor)" if layer.channels == 1 else layer.channels),
            _cell(_num_range(float(layer.scale.min()), float(layer.scale.max()))),
            _cell(_num_range(int(layer.offset.min()), int(layer.offset.max()))),
        )
        for layer in result.layers
    ]
    if result.index_file is None:
        where = result.weight_files[0]
    else:
        where = f"{len(result.weight_files)} shards indexed by {result.index_file}"
    copied = ", ".join(result.copied) if result.copied else "nothing (no config or tokenizer files found)"
    saved = (
        f"{result.weight_tensors} model tensors re-saved unchanged, with kv_cache_scale (float32) and "
        f"kv_cache_offset (int32) for {len(result.layers)} K/V layers, in {where}"
    )
    lines = [saved, f"copied: {copied}"]
    if result.skipped:
        lines.append(f"not copied: {', '.join(result.skipped)}")
    for name in result.described_only:
        lines.append(f"{name}: tied to the embeddings, described as FLOAT without a tensor of its own")
    if result.replaced:
        lines.append("the previous contents of the directory were replaced")
    lines.append(f"serve it with: vllm serve {result.output} --quantization ascend")
    title = f"Exported for {result.format}: {result.output}"
    _print_table(_table(title, "\n".join(lines), ("Layer", "Channels", "Scale", "Offset"), rows))
    if result.uncovered:
        more = f" and {len(result.uncovered) - 1} more" if len(result.uncovered) > 1 else ""
        print_warning(
            f"no K/V factors in the record for attention layer {result.uncovered[0]}{more}; "
            "calibrate every k_proj/v_proj for a complete C8 cache"
        )
