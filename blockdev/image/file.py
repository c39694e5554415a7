"""A sparse raw image file: os.preadv/pwrite, fallocate for holes and zeroes, SEEK_DATA for extents."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from ..backend import EXTENT_HOLE, EXTENT_ZERO, WriteResult
from ..errors import FastZeroUnsupported, ReadOnlyError
from .base import ImageBase

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_ZERO_CHUNK = bytes(1 << 20)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _seek(fd: int, pos: int, whence: int, end: int) -> int:
    """lseek SEEK_DATA/SEEK_HOLE; ``end`` where there is no more data."""
    try:
        return os.lseek(fd, pos, whence)
    except OSError as e:
        if e.errno != errno.ENXIO:
            raise
        return end


class FileImage(ImageBase):
    """Backend over a raw image file whose length is the volume size."""

    def __init__(self, path: str | os.PathLike[str], readonly: bool = False, block: int = 4096) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        self._fd = os.open(self.path, os.O_RDONLY if readonly else os.O_RDWR | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size
        self._block = block
        self._punch_ok = not readonly
        self._zero_range_ok = not readonly

    def fileno(self) -> int:
        return self._fd

    def size(self) -> int:
        return self._size

    def can_extents(self) -> bool:
        return True

    def allocated(self) -> int | None:
        return os.fstat(self._fd).st_blocks * 512

    def pread(self, buf: memoryview, offset: int) -> None:
        done, want = 0, len(buf)
        while done < want:
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n <= 0:  # past the end of a file that was shortened behind our back
                buf[done:] = bytes(want - done)
                return
            done += n

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool = False) -> WriteResult:
        if self.readonly:
            raise ReadOnlyError()
        want = len(data)
        done = os.pwrite(self._fd, data, offset)
        if done < want:  # short write (rare): go on from where it stopped
            view = memoryview(data)
            while done < want:
                done += os.pwrite(self._fd, view[done:], offset + done)
        if fua:
            os.fdatasync(self._fd)
        return None

    def _write_zero_bytes(self, length: int, offset: int) -> None:
        while length > 0:
            n = min(length, len(_ZERO_CHUNK))
            self.pwrite(memoryview(_ZERO_CHUNK)[:n], offset)
            offset += n
            length -= n

    def write_zeroes(
        self, length: int, offset: int, fua: bool = False, may_trim: bool = True, fast: bool = False
    ) -> WriteResult:
        if self.readonly:
            raise ReadOnlyError()
        done = False
        if may_trim and self._punch_ok:
            done = self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, "_punch_ok")
        if not done and self._zero_range_ok:
            done = self._try_fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length,
                                       "_zero_range_ok")
        if not done:
            if fast:
                raise FastZeroUnsupported()
            self._write_zero_bytes(length, offset)
        if fua:
            os.fdatasync(self._fd)
        return None

    def _try_fallocate(self, mode: int, offset: int, length: int, flag: str) -> bool:
        if length == 0:  # fallocate(len=0) is EINVAL, which would wrongly mark the mode unsupported
            return True
        try:
            fallocate(self._fd, mode, offset, length)
            return True
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                setattr(self, flag, False)
                return False
            raise

    def trim(self, length: int, offset: int, fua: bool = False) -> WriteResult:
        # Trim is advisory, but reading back zeroes is what users of a sparse image expect.
        return self.write_zeroes(length, offset, fua, may_trim=True)

    def flush(self) -> WriteResult:
        if not self.readonly:
            os.fdatasync(self._fd)
        return None

    def extents(self, length: int, offset: int) -> list[tuple[int, int]]:
        end = min(offset + length, self._size)
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            data = _seek(self._fd, pos, os.SEEK_DATA, end)
            if data > pos:
                n = min(data, end) - pos
                out.append((n, EXTENT_HOLE | EXTENT_ZERO))
                pos += n
                continue
            hole = _seek(self._fd, pos, os.SEEK_HOLE, end)
            n = min(hole, end) - pos
            out.append((n, 0))
            pos += n
            if len(out) >= 256:
                break
        return out

    def close(self) -> None:
        fd, self._fd = self._fd, -1  # late callers get EBADF, never a reused descriptor
        if fd >= 0:
            if not self.readonly:
                try:
                    os.fdatasync(fd)
                except OSError:
                    pass
            os.close(fd)
