"""Layers: backends that wrap a backend with the same op table."""
from .faults import FaultLayer, StallLayer
from .readonly import ReadOnlyLayer
from .stats import StatsLayer

__all__ = ["FaultLayer", "ReadOnlyLayer", "StallLayer", "StatsLayer"]
