"""IFMR and HFMG observers, and the factory that picks one from settings."""

from __future__ import annotations

from kvcal.observers.base import Observer
from kvcal.observers.hfmg import HfmgObserver
from kvcal.observers.ifmr import IfmrObserver
from kvcal.params import HfmgParams, QuantSettings

__all__ = ["Observer", "IfmrObserver", "HfmgObserver", "make_observer"]


def make_observer(settings: QuantSettings, name: str = "") -> Observer:
    """The observer for `settings.algo`."""
    if isinstance(settings.params, HfmgParams):
        return HfmgObserver(settings, name)
    return IfmrObserver(settings, name)
