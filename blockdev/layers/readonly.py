"""Refuse every write-like op with EPERM; reads pass through."""
from __future__ import annotations

from ..backend import Layer, WriteResult
from ..errors import ReadOnlyError


class ReadOnlyLayer(Layer):
    """Makes a stack read-only whatever the image below allows."""

    intercepts_writes = True

    def can_write(self) -> bool:
        return False

    def can_trim(self) -> bool:
        return False

    def can_zero(self) -> bool:
        return False

    def can_fast_zero(self) -> bool:
        return False

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool = False) -> WriteResult:
        raise ReadOnlyError()

    def write_zeroes(
        self, length: int, offset: int, fua: bool = False, may_trim: bool = True, fast: bool = False
    ) -> WriteResult:
        raise ReadOnlyError()

    def trim(self, length: int, offset: int, fua: bool = False) -> WriteResult:
        raise ReadOnlyError()

    def flush(self) -> WriteResult:
        return None  # nothing to make durable: flushing a read-only export succeeds
