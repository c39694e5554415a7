"""Error types of the op table and the one mapping from them to errno values."""
from __future__ import annotations

import errno


class BlockError(Exception):
    """An op failed; ``errno`` is what a front end reports to its client."""

    errno: int = errno.EIO

    def __init__(self, message: str = "", err: int | None = None) -> None:
        super().__init__(message or self.__class__.__doc__ or "I/O error")
        if err is not None:
            self.errno = err


class ReadOnlyError(BlockError):
    """write to a read-only volume"""

    errno = errno.EPERM


class OutOfRangeError(BlockError):
    """request beyond the end of the volume"""

    errno = errno.EINVAL


class NotSupportedError(BlockError):
    """operation not supported by this backend"""

    errno = errno.EOPNOTSUPP


class FastZeroUnsupported(BlockError):
    """zeroing would not be faster than writing"""

    errno = errno.EOPNOTSUPP


class NoSpaceError(BlockError):
    """no space left on the backing store"""

    errno = errno.ENOSPC


def to_errno(exc: BaseException) -> int:
    """The one mapping from any exception raised by an op to an errno value."""
    if isinstance(exc, BlockError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return errno.ENOSPC
        if exc.errno in (errno.EPERM, errno.EROFS, errno.EACCES):
            return errno.EPERM
        if exc.errno in (errno.EINVAL, errno.EOVERFLOW, errno.EOPNOTSUPP, errno.EIO):
            return exc.errno
        return errno.EIO
    return errno.EIO
