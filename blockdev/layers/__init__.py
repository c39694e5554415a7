"""Layers: backends that wrap a backend with the same op table."""
from .cow import CowLayer
from .faults import FaultLayer, StallLayer
from .readonly import ReadOnlyLayer
from .stats import StatsLayer

__all__ = ["CowLayer", "FaultLayer", "ReadOnlyLayer", "StallLayer", "StatsLayer"]
