"""An in-memory image for tests."""
from __future__ import annotations

from ..backend import WriteResult
from ..errors import ReadOnlyError
from .base import ImageBase


class MemoryImage(ImageBase):
    """Backend over a bytearray; counts flushes so tests can check durability requests."""

    def __init__(self, size: int, readonly: bool = False, block: int = 4096) -> None:
        self.data = bytearray(size)
        self.readonly = readonly
        self._block = block
        self.flushes = 0

    def size(self) -> int:
        return len(self.data)

    def can_extents(self) -> bool:
        return False

    def allocated(self) -> int | None:
        return len(self.data)  # a bytearray holds every byte

    def _check_write(self) -> None:
        if self.readonly:
            raise ReadOnlyError()

    def pread(self, buf: memoryview, offset: int) -> None:
        buf[:] = self.data[offset:offset + len(buf)]

    def extents(self, length: int, offset: int) -> list[tuple[int, int]]:
        return [(length, 0)]

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool = False) -> WriteResult:
        self._check_write()
        self.data[offset:offset + len(data)] = data
        if fua:
            self.flushes += 1
        return None

    def write_zeroes(
        self, length: int, offset: int, fua: bool = False, may_trim: bool = True, fast: bool = False
    ) -> WriteResult:
        self._check_write()
        self.data[offset:offset + length] = bytes(length)
        return None

    def trim(self, length: int, offset: int, fua: bool = False) -> WriteResult:
        return self.write_zeroes(length, offset, fua)

    def flush(self) -> WriteResult:
        self.flushes += 1
        return None

    def close(self) -> None:
        pass
