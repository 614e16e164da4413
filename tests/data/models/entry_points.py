"""Entry points for the model loader tests (imported from this file by path)."""

from __future__ import annotations

from torch import nn

# A sibling module: importable only while this file's directory is on sys.path.
from loader_sibling import HIDDEN


class Net(nn.Module):
    def __init__(self, hidden: int = HIDDEN, out: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, out, bias=bias)


def build(hidden: int = HIDDEN, out: int = 3, bias: bool = True, name: str = "net") -> nn.Module:
    net = Net(hidden, out, bias)
    net.name = name
    return net


instance = Net()


class Factories:
    """A dotted attribute: `entry_points.py:Factories.small`."""

    @staticmethod
    def small() -> nn.Module:
        return Net(2, 2)


def broken() -> nn.Module:
    raise RuntimeError("factory exploded")


def not_a_module() -> int:
    return 42


def exits() -> nn.Module:
    raise SystemExit(3)


answer = 42
