"""Text datasets: .jsonl/.json/.txt samples, tokenized, truncated and right-padded; bad input named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kvcal.calibration.runner import run_calibration
from kvcal.cli import main
from kvcal.errors import DatasetError
from kvcal.text_data import TextOptions, open_data, open_text_dataset

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from hf_models import KV_NAMES  # noqa: E402
from hf_models import build as build_hf  # noqa: E402
from test_kv_taps_hf import assert_reference, plan, reference  # noqa: E402

WORDS = [f"w{i}" for i in range(100)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer over w0..w99 (ids 3..102), built locally and saved like any HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}, "<unk>": 103}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    directory = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(directory)
    return directory


def sentence(i: int, length: int) -> str:
    return " ".join(WORDS[(i * 7 + j) % 100] for j in range(length))


def write_jsonl(path: Path, lengths: list[int], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: sentence(i, n), "id": i}) + "\n" for i, n in enumerate(lengths)))
    return path


def test_jsonl_txt_json_and_a_directory_of_them(tmp_path: Path, tokenizer_dir: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [3, 4])
    (data / "b.txt").write_text(f"{sentence(5, 2)}\n\n{sentence(6, 5)}\n", encoding="utf-8")
    (data / "c.json").write_text(json.dumps([{"text": sentence(7, 1)}]), encoding="utf-8")
    dataset = open_data(data, TextOptions(str(tokenizer_dir), batch_size=2))
    assert [(s.path.name, s.line) for s in dataset.samples] == [
        ("a.jsonl", 1), ("a.jsonl", 2), ("b.txt", 1), ("b.txt", 3), ("c.json", 0),
    ]
    assert len(dataset) == 3
    batches = list(dataset)
    assert [tuple(b.kwargs["input_ids"].shape) for b in batches] == [(2, 4), (2, 5), (1, 1)]
    assert str(batches[1].path) == f"{data / 'b.txt'}:1"


def test_truncation_and_right_padding(tmp_path: Path, tokenizer_dir: Path) -> None:
    source = write_jsonl(tmp_path / "a.jsonl", [2, 9, 5])
    dataset = open_text_dataset(source, TextOptions(str(tokenizer_dir), seq_len=6, batch_size=3))
    (batch,) = list(dataset)
    ids, mask = batch.kwargs["input_ids"], batch.kwargs["attention_mask"]
    assert ids.shape == (3, 6)  # the 9-token sample is truncated to 6; the batch is as long as its longest
    assert mask.tolist() == [[1, 1, 0, 0, 0, 0], [1] * 6, [1, 1, 1, 1, 1, 0]]
    assert ids[0, 2:].tolist() == [0] * 4  # padded with <pad> on the right
    assert ids[1].tolist() == [WORDS.index(w) + 3 for w in sentence(1, 6).split()]


def test_only_the_samples_batch_num_needs_are_read(tmp_path: Path, tokenizer_dir: Path) -> None:
    source = tmp_path / "a.jsonl"
    write_jsonl(source, [3] * 4)
    with source.open("a", encoding="utf-8") as handle:
        handle.write("{not json}\n")  # past what two batches of two need: never read
    dataset = open_data(source, TextOptions(str(tokenizer_dir), batch_size=2), needed_batches=2)
    assert len(dataset.samples) == 4
    with pytest.raises(DatasetError, match=r"a.jsonl:5: invalid JSON line"):
        open_data(source, TextOptions(str(tokenizer_dir), batch_size=2), needed_batches=3)


def test_too_few_samples(tmp_path: Path, tokenizer_dir: Path) -> None:
    source = write_jsonl(tmp_path / "a.jsonl", [3] * 3)
    with pytest.raises(DatasetError, match=r"gives 3 text sample.*3 batch\(es\) of --batch-size 2 need at least 5"):
        open_data(source, TextOptions(str(tokenizer_dir), batch_size=2), needed_batches=3)
    with pytest.raises(DatasetError, match=r"need at least 3 \(--num-samples is 2\)"):
        open_data(source, TextOptions(str(tokenizer_dir), batch_size=2, num_samples=2), needed_batches=2)
    # A partial last batch counts: 3 samples make 2 batches of 2.
    assert len(open_data(source, TextOptions(str(tokenizer_dir), batch_size=2), needed_batches=2)) == 2


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.jsonl", '{"text": "w1"}\n{"body": "w2"}\n', r"a.jsonl:2: no 'text' field \(keys: 'body'\)"),
        ("a.jsonl", '{"text": 3}\n', r"a.jsonl:1: field 'text' is a int, not a string"),
        ("a.jsonl", "\n\n", r"a.jsonl: no text samples"),
        ("a.txt", "", r"a.txt: no text samples"),
        ("a.json", '{"text": "w1"}', r"a.json: a .json dataset must hold a list of records"),
        ("a.json", '[{"text": "w1"}, ["w2"]]', r"a.json: item 1: expected a JSON object"),
        ("a.json", "[1,", r"a.json:1:4: invalid JSON"),
    ],
)
def test_bad_text_is_named(tmp_path: Path, tokenizer_dir: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match=message):
        open_data(path, TextOptions(str(tokenizer_dir)))


def test_non_utf8_line_is_named(tmp_path: Path, tokenizer_dir: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"w1 w2\nw3 \xff w4\n")
    with pytest.raises(DatasetError, match=r"a.txt:2: not UTF-8 text \(byte 0xff\)"):
        open_data(path, TextOptions(str(tokenizer_dir)))


def test_tokenizer_problems(tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_jsonl(tmp_path / "a.jsonl", [3])
    with pytest.raises(DatasetError, match="is text: give --tokenizer DIR"):
        open_data(source, TextOptions())
    with pytest.raises(DatasetError, match="tokenizer directory .*missing does not exist"):
        open_data(source, TextOptions(str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=f"cannot load a tokenizer from {empty}"):
        open_data(source, TextOptions(str(empty)))
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(DatasetError, match="pip install transformers"):
        open_data(source, TextOptions(str(tokenizer_dir)))


def test_a_single_tensor_file_is_not_a_dataset(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    torch.save(torch.zeros(2), path)
    with pytest.raises(DatasetError, match="a single-file dataset is text"):
        open_data(path, TextOptions())


def test_padding_is_excluded_end_to_end(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Factors from a text dataset equal the reference on the cache with the padding removed."""
    from test_kv_taps_hf import cache_tensors

    source = write_jsonl(tmp_path / "a.jsonl", [4, 9, 6, 2])
    model = build_hf("llama")
    dataset = open_data(source, TextOptions(str(tokenizer_dir), batch_size=2), needed_batches=2)
    batches = [b.kwargs for b in dataset]
    assert all(bool((b["attention_mask"] == 0).any()) for b in batches)
    expected = cache_tensors(model, batches)
    result = run_calibration(model=model, plan=plan(), dataset_dir=dataset, record_path=tmp_path / "r.txt", tap="cache")
    for name in KV_NAMES:
        assert_reference(result.qparams[name], reference(name, expected[name]), name)


def test_cli_calibrates_from_text(tmp_path: Path, tokenizer_dir: Path) -> None:
    model_file = tmp_path / "m.py"
    model_file.write_text("from hf_models import build as _build\n\n\ndef build():\n    return _build('llama')\n")
    config = tmp_path / "c.json"
    runner = CliRunner()
    result = runner.invoke(main, ["gen-config", "--model", f"{model_file}:build", "--quant-layers",
                                  "model.layers.*.self_attn.[kv]_proj", "--batch-num", "2", "-o", str(config)])
    assert result.exit_code == 0, result.output
    source = write_jsonl(tmp_path / "a.jsonl", [4, 9, 6, 2, 3], field="content")
    record = tmp_path / "r.txt"
    result = runner.invoke(main, ["calibrate", "--model", f"{model_file}:build", "--config", str(config),
                                  "--dataset", str(source), "--tokenizer", str(tokenizer_dir), "--text-field",
                                  "content", "--batch-size", "2", "--seq-len", "8", "--record", str(record),
                                  "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "2 data files used" in result.stderr
    assert record.exists()


def test_gen_config_ptq_takes_its_sample_from_text(tmp_path: Path, tokenizer_dir: Path) -> None:
    model_file = tmp_path / "m.py"
    model_file.write_text("from hf_models import build as _build\n\n\ndef build():\n    return _build('llama')\n")
    source = write_jsonl(tmp_path / "a.jsonl", [4, 9])
    out = tmp_path / "ptq.json"
    result = CliRunner().invoke(main, ["gen-config", "--ptq", "--model", f"{model_file}:build", "--dataset",
                                       str(source), "--tokenizer", str(tokenizer_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["model.layers.0.self_attn.k_proj"]["quant_enable"] is True
