"""kvcal.model_loader: entry points, model arguments, checkpoints, and every failure."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kvcal.errors import ModelLoadError
from kvcal.model_loader import load_model, parse_model_args

DATA = Path(__file__).parent / "data" / "models"
ENTRY_FILE = DATA / "entry_points.py"


def entry(attr: str, file: Path = ENTRY_FILE) -> str:
    return f"{file}:{attr}"


# --- successful loads ---


def test_module_path_entry_calls_the_factory() -> None:
    from models import TinyDecoder

    model = load_model("models:tiny_decoder")
    assert isinstance(model, TinyDecoder)
    assert not model.training


def test_module_path_with_dotted_attribute_and_positional_args() -> None:
    model = load_model("torch:nn.Linear", ["4", "2"])
    assert isinstance(model, nn.Linear)
    assert (model.in_features, model.out_features) == (4, 2)


def test_keyword_args_are_json_parsed() -> None:
    model = load_model("torch.nn:Linear", ["in_features=3", "out_features=5", "bias=false"])
    assert isinstance(model, nn.Linear)
    assert model.out_features == 5
    assert model.bias is None


def test_file_path_entry_with_kwargs_strings_and_json() -> None:
    model = load_model(entry("build"), ["hidden=7", "out=2", "name=hello", 'bias=false'])
    assert model.proj.in_features == 7
    assert model.proj.out_features == 2
    assert model.proj.bias is None
    assert model.name == "hello"


def test_file_path_sibling_import_and_sys_path_restored() -> None:
    before = list(sys.path)
    model = load_model(entry("build"))
    assert model.proj.in_features == 5  # HIDDEN from the sibling module
    assert sys.path == before
    assert str(DATA) not in sys.path


def test_relative_file_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(DATA.parent)
    model = load_model("models/entry_points.py:build", ["4"])
    assert model.proj.in_features == 4


def test_file_entry_module_name_is_unique() -> None:
    first = load_model(entry("build"))
    second = load_model(entry("build"))
    assert type(first).__module__ != type(second).__module__
    assert type(first).__module__ in sys.modules


def test_dotted_attribute_in_a_file() -> None:
    model = load_model(entry("Factories.small"))
    assert model.proj.in_features == 2


def test_instance_is_used_as_is_and_put_in_eval_mode() -> None:
    module = sys.modules[type(load_model(entry("build"))).__module__]
    module.instance.train()
    model = load_model(f"{module.__name__}:instance")
    assert model is module.instance
    assert not model.training


def test_class_is_called() -> None:
    model = load_model(entry("Net"), ["out=6"])
    assert model.proj.out_features == 6


def test_parse_model_args() -> None:
    positional, keywords = parse_model_args(["1", "x", "[1, 2]", "a=null", "b=1.5", 'c="q"', "d=not json", "e="])
    assert positional == [1, "x", [1, 2]]
    assert keywords == {"a": None, "b": 1.5, "c": "q", "d": "not json", "e": ""}


def test_parse_model_args_errors() -> None:
    with pytest.raises(ModelLoadError, match="'my key' is not a valid keyword"):
        parse_model_args(["my key=1"])
    with pytest.raises(ModelLoadError, match="'a' is given twice"):
        parse_model_args(["a=1", "a=2"])
    with pytest.raises(TypeError):
        parse_model_args("a=1")  # type: ignore[arg-type]


# --- checkpoints ---


def _factory_entry() -> str:
    return "models:tiny_decoder"


def test_checkpoint_pt(tmp_path: Path) -> None:
    from models import tiny_decoder

    source = tiny_decoder(seed=1)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    model = load_model(_factory_entry(), checkpoint=path)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert not torch.equal(model.lm_head.weight, tiny_decoder(seed=0).lm_head.weight)


def test_checkpoint_safetensors(tmp_path: Path) -> None:
    from models import tiny_decoder
    from safetensors.torch import save_file

    source = tiny_decoder(seed=2)
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    model = load_model(_factory_entry(), checkpoint=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# --- failures ---


@pytest.mark.parametrize(
    ("bad_entry", "fragment"),
    [
        ("models", "is not 'package.module:attr'"),
        ("models:", "is not 'package.module:attr'"),
        (":build", "is not 'package.module:attr'"),
        ("models:not-a-name", "is not a (dotted) Python attribute name"),
        ("kvcal_no_such_package:build", "no module named 'kvcal_no_such_package'"),
        ("models:no_such_factory", "has no attribute 'no_such_factory'"),
        ("models:tiny_decodr", "did you mean 'tiny_decoder'"),
    ],
)
def test_entry_errors(bad_entry: str, fragment: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(bad_entry)
    assert fragment in str(info.value)
    assert repr(bad_entry) in str(info.value)


def test_missing_file() -> None:
    bad = str(DATA / "nope.py") + ":build"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(bad)
    assert repr(bad) in str(info.value)


def test_import_error_inside_file_is_reported_with_its_text() -> None:
    bad = entry("model", DATA / "broken_import.py")
    with pytest.raises(ModelLoadError) as info:
        load_model(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert "ModuleNotFoundError" in message
    assert "kvcal_no_such_module_for_tests" in message
    assert not any(name.startswith("_kvcal_entry_broken_import") for name in sys.modules)


def test_file_raising_at_import() -> None:
    with pytest.raises(ModelLoadError, match="ValueError: bad module-level code"):
        load_model(entry("x", DATA / "raises_at_import.py"))


def test_import_error_inside_package_module_names_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kvcal_pkg_with_bad_import.py").write_text("import kvcal_definitely_missing_dep\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="ModuleNotFoundError: No module named 'kvcal_definitely_missing_dep'"):
        load_model("kvcal_pkg_with_bad_import:model")
    sys.modules.pop("kvcal_pkg_with_bad_import", None)


def test_factory_raising() -> None:
    with pytest.raises(ModelLoadError, match="raised RuntimeError: factory exploded") as info:
        load_model(entry("broken"))
    assert "entry_points.py:broken" in str(info.value)


def test_factory_calling_sys_exit() -> None:
    with pytest.raises(ModelLoadError, match="raised SystemExit: 3"):
        load_model(entry("exits"))


def test_factory_with_wrong_arguments() -> None:
    with pytest.raises(ModelLoadError, match="raised TypeError: .*unexpected keyword argument 'nope'"):
        load_model(entry("build"), ["nope=1"])


def test_factory_returning_non_module() -> None:
    with pytest.raises(ModelLoadError, match="returned a int, not a torch.nn.Module"):
        load_model(entry("not_a_module"))


def test_attribute_neither_module_nor_callable() -> None:
    with pytest.raises(ModelLoadError, match="is a int, neither an nn.Module nor a callable"):
        load_model(entry("answer"))


def test_instance_with_model_args() -> None:
    with pytest.raises(ModelLoadError, match="is an nn.Module instance; --model-arg needs a factory"):
        load_model(entry("instance"), ["x=1"])


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(_factory_entry(), checkpoint=tmp_path / "missing.pt")
    assert "missing.pt" in str(info.value)
    assert "models:tiny_decoder" in str(info.value)


def test_checkpoint_with_missing_and_unexpected_keys(tmp_path: Path) -> None:
    from models import tiny_decoder

    state = tiny_decoder().state_dict()
    del state["lm_head.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError) as info:
        load_model(_factory_entry(), checkpoint=path)
    message = str(info.value)
    assert "does not match the model from 'models:tiny_decoder'" in message
    assert "1 missing key: lm_head.bias" in message
    assert "1 unexpected key: extra.weight" in message


def test_checkpoint_with_many_missing_keys_is_summarised(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    torch.save({}, path)
    with pytest.raises(ModelLoadError, match=r"missing keys: .*\(\+\d+ more\)"):
        load_model(_factory_entry(), checkpoint=path)


def test_checkpoint_with_wrong_shape(tmp_path: Path) -> None:
    from models import tiny_decoder

    state = tiny_decoder().state_dict()
    state["lm_head.bias"] = torch.zeros(3)
    path = tmp_path / "shape.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=r"1 shape mismatch: lm_head.bias \(3,\) vs \(16,\) in the model"):
        load_model(_factory_entry(), checkpoint=path)


def test_checkpoint_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), path)
    with pytest.raises(ModelLoadError, match="does not hold a state dict"):
        load_model(_factory_entry(), checkpoint=path)


class _Pickled:
    """A custom class: torch.load(weights_only=True) must refuse it."""


def test_checkpoint_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"weight": _Pickled()}, path)
    with pytest.raises(ModelLoadError, match="holds pickled Python objects other than tensors"):
        load_model(_factory_entry(), checkpoint=path)


def test_checkpoint_garbage_pt(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="garbage.pt"):
        load_model(_factory_entry(), checkpoint=path)


def test_checkpoint_garbage_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(ModelLoadError, match="not a readable .safetensors file"):
        load_model(_factory_entry(), checkpoint=path)


def test_safetensors_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    # A None entry in sys.modules makes the import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ModelLoadError, match="needs the safetensors package"):
        load_model(_factory_entry(), checkpoint=path)


def test_pathlike_checkpoint_and_entry_string(tmp_path: Path) -> None:
    from models import tiny_decoder

    path = tmp_path / "w.pt"
    torch.save(tiny_decoder(seed=3).state_dict(), path)
    model = load_model(_factory_entry(), (), os.fspath(path))
    assert torch.equal(model.lm_head.weight, tiny_decoder(seed=3).lm_head.weight)
