"""Dataset directory: formats, call shapes, order, laziness, and safe loading."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kvcal.dataset import Batch, load_batch, open_dataset
from kvcal.errors import DatasetError


def test_tensor_file_is_one_positional_argument(tmp_path: Path) -> None:
    x = torch.arange(6).reshape(2, 3)
    torch.save(x, tmp_path / "a.pt")
    batch = load_batch(tmp_path / "a.pt")
    assert len(batch.args) == 1 and batch.kwargs == {}
    assert torch.equal(batch.args[0], x)


@pytest.mark.parametrize("container", [list, tuple])
def test_list_or_tuple_is_positional(tmp_path: Path, container: type) -> None:
    items = container([torch.ones(2), torch.zeros(3)])
    torch.save(items, tmp_path / "a.pth")
    batch = load_batch(tmp_path / "a.pth")
    assert len(batch.args) == 2
    assert torch.equal(batch.args[0], torch.ones(2)) and torch.equal(batch.args[1], torch.zeros(3))


def test_dict_is_keyword_arguments(tmp_path: Path) -> None:
    torch.save({"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[1, 1]])}, tmp_path / "a.pt")
    batch = load_batch(tmp_path / "a.pt")
    assert batch.args == ()
    assert set(batch.kwargs) == {"input_ids", "attention_mask"}
    assert torch.equal(batch.kwargs["input_ids"], torch.tensor([[1, 2]]))


def test_batch_call(tmp_path: Path) -> None:
    batch = Batch(tmp_path / "x.pt", args=(1,), kwargs={"b": 2})
    assert batch.call(lambda a, b: a + b) == 3


def test_npy_is_converted_with_from_numpy(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "a.npy", array)
    batch = load_batch(tmp_path / "a.npy")
    assert batch.args[0].dtype == torch.float32
    assert torch.equal(batch.args[0], torch.from_numpy(array))


def test_npy_big_endian_is_read_natively(tmp_path: Path) -> None:
    array = np.arange(4, dtype=">i8")
    np.save(tmp_path / "a.npy", array)
    assert torch.equal(load_batch(tmp_path / "a.npy").args[0], torch.arange(4))


def test_npz_named_arrays_are_keyword_arguments(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", input_ids=np.ones((1, 4), dtype=np.int64), mask=np.zeros((1, 4), dtype=np.int64))
    batch = load_batch(tmp_path / "a.npz")
    assert batch.args == ()
    assert set(batch.kwargs) == {"input_ids", "mask"}
    assert batch.kwargs["input_ids"].dtype == torch.int64


def test_npz_unnamed_arrays_are_positional(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", np.ones(2), np.zeros(3))
    batch = load_batch(tmp_path / "a.npz")
    assert batch.kwargs == {}
    assert [tuple(a.shape) for a in batch.args] == [(2,), (3,)]


def test_safetensors_named_tensors_are_keyword_arguments(tmp_path: Path) -> None:
    save_file({"x": torch.randn(2, 3), "y": torch.arange(3)}, str(tmp_path / "a.safetensors"))
    batch = load_batch(tmp_path / "a.safetensors")
    assert batch.args == ()
    assert set(batch.kwargs) == {"x", "y"}
    assert torch.equal(batch.kwargs["y"], torch.arange(3))


def test_directory_order_skips_and_hidden_files(tmp_path: Path) -> None:
    for name in ["b.pt", "a.pt", "c.npy"]:
        if name.endswith(".pt"):
            torch.save(torch.tensor([ord(name[0])]), tmp_path / name)
        else:
            np.save(tmp_path / name, np.array([ord(name[0])]))
    (tmp_path / "README.txt").write_text("notes")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "sub.pt").mkdir()
    dataset = open_dataset(tmp_path)
    assert [p.name for p in dataset.files] == ["a.pt", "b.pt", "c.npy"]
    assert [p.name for p in dataset.skipped] == ["README.txt"]
    assert len(dataset) == 3
    (message,) = dataset.skipped_messages()
    assert "README.txt: skipped, not a supported data file" in message
    assert [int(b.args[0][0]) for b in dataset] == [ord("a"), ord("b"), ord("c")]


def test_iteration_is_lazy(tmp_path: Path) -> None:
    torch.save(torch.ones(1), tmp_path / "0.pt")
    (tmp_path / "1.pt").write_bytes(b"not a torch file at all")
    dataset = open_dataset(tmp_path)
    batches = iter(dataset)
    assert torch.equal(next(batches).args[0], torch.ones(1))
    # The broken second file is only read when the iteration reaches it.
    with pytest.raises(DatasetError, match="1.pt"):
        next(batches)


def test_tensors_are_moved_to_the_device(tmp_path: Path) -> None:
    torch.save({"x": torch.ones(2), "nested": [torch.zeros(1)]}, tmp_path / "a.pt")
    (batch,) = list(open_dataset(tmp_path, device="meta"))
    assert batch.kwargs["x"].device.type == "meta"
    assert batch.kwargs["nested"][0].device.type == "meta"


def test_missing_empty_and_non_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "file.pt").write_bytes(b"")
    with pytest.raises(DatasetError, match="is not a directory"):
        open_dataset(tmp_path / "file.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="has no data file"):
        open_dataset(empty)
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"has no data file .*1 other file\(s\) skipped"):
        open_dataset(empty)


class _Exploit:
    """Unpickling this would create a file: the attack weights_only=True must stop."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_in_pt_is_never_executed(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    data = tmp_path / "data"
    data.mkdir()
    # Both the zip container torch.save writes and a legacy raw pickle.
    torch.save({"x": _Exploit(str(target))}, data / "a.pt")
    with open(data / "b.pth", "wb") as handle:
        pickle.dump(_Exploit(str(target)), handle)
    for name in ["a.pt", "b.pth"]:
        with pytest.raises(DatasetError, match=f"{name}: holds pickled Python objects"):
            load_batch(data / name)
    assert not target.exists()


def test_pickled_npy_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    np.save(tmp_path / "a.npy", np.array([_Exploit(str(target))], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match=r"a.npy: holds pickled Python objects.*allow_pickle=False"):
        load_batch(tmp_path / "a.npy")
    np.savez(tmp_path / "b.npz", x=np.array([_Exploit(str(target))], dtype=object))
    with pytest.raises(DatasetError, match="b.npz: holds pickled Python objects"):
        load_batch(tmp_path / "b.npz")
    assert not target.exists()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["a.pt", "a.npy", "a.npz", "a.safetensors"])
def test_truncated_files_are_named_errors(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    x = torch.randn(64, 64)
    if name.endswith(".pt"):
        torch.save(x, path)
    elif name.endswith(".npy"):
        np.save(path, x.numpy())
    elif name.endswith(".npz"):
        np.savez(path, x=x.numpy())
    else:
        save_file({"x": x}, str(path))
    _truncate(path)
    with pytest.raises(DatasetError, match=f"{name}: not a readable"):
        load_batch(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (3, "holds a int; expected a tensor"),
        ([], "holds an empty list"),
        ({}, "holds no tensors"),
        ({1: torch.ones(1)}, r"dict keys must be argument names \(str\), got 1"),
    ],
)
def test_unusable_content(tmp_path: Path, content: object, message: str) -> None:
    torch.save(content, tmp_path / "a.pt")
    with pytest.raises(DatasetError, match=f"a.pt: {message}"):
        load_batch(tmp_path / "a.pt")


def test_npz_with_one_array_named_npy_is_explained(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.ones(2))
    os.replace(tmp_path / "a.npz", tmp_path / "a.npy")
    with pytest.raises(DatasetError, match="name it .npz"):
        load_batch(tmp_path / "a.npy")
    np.save(tmp_path / "b.npy", np.ones(2))
    os.replace(tmp_path / "b.npy", tmp_path / "b.npz")
    with pytest.raises(DatasetError, match="name it .npy"):
        load_batch(tmp_path / "b.npz")


def test_skipped_files_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.save(torch.ones(1), tmp_path / "a.pt")
    (tmp_path / "labels.csv").write_text("1,2")
    with caplog.at_level(logging.WARNING, logger="kvcal"):
        open_dataset(tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'labels.csv'}: skipped, not a supported data file (.pt, .pth, .npy, .npz, .safetensors)"
    ]


@pytest.mark.parametrize("content", [b"hello world\n", bytes(range(7, 107))])
def test_a_torch_extension_on_another_kind_of_file_says_so(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "a.pt"
    path.write_bytes(content)
    with pytest.raises(DatasetError) as info:
        load_batch(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a torch file: torch.save writes a zip archive or a pickle")
    assert "pickled Python objects" not in message
