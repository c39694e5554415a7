"""The FUSE file system: one directory holding one regular file per served volume.

Every request becomes an op-table call on the volume's stack top (the same stack NBD uses, so the
mirror layer sees writes from both). Validation happens here, once: the file has the volume's size,
I/O past the end is clipped (reads) or refused (writes, ENOSPC as a block device would), and what
would change the file's size or name (truncate, unlink, rename, create) is refused with EPERM.
Files are opened with ``direct_io``: no kernel page cache, so FUSE and NBD see each other's writes.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from ..backend import EXTENT_HOLE, Backend, wait
from ..errors import to_errno
from ..nbd.server import WorkerPool  # the NBD server's plain worker threads, shared
from .adapter import Reply

log = logging.getLogger("blockdev.fuse")
ROOT = pyfuse3.ROOT_INODE
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
SEEK_DATA, SEEK_HOLE = 3, 4
# The volume set does not change while mounted (the daemon serves a fixed set), so the kernel may
# cache names and attributes for long.
CACHE_TIMEOUT = 3600.0
# ...but not its allocation: st_blocks follows writes and punched holes (`du`, `ls -s`).
FILE_ATTR_TIMEOUT = 1.0

Exports = Callable[[], dict[str, Backend]]
# Writes this big go to a worker thread so that the pwrite overlaps the next request. A thread hand-off
# costs tens of µs: noise next to a 1 MiB write, too much for a 4 KiB one (DESIGN.md).
BIG_WRITE = 128 * 1024
WORKERS = 2
READ_BUFFER = 1 << 20  # the kernel's largest FUSE read (max_pages 256)


async def run_on(pool: WorkerPool, fn: Callable[..., Any], *args: Any) -> Any:
    """Await ``fn(*args)`` run on ``pool`` from trio: one run_sync_soon crossing back."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    box: list[tuple[Any, BaseException | None]] = []

    def finished(result: Any, exc: BaseException | None) -> None:
        box.append((result, exc))
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    pool.submit(fn, args, finished)
    with trio.CancelScope(shield=True):  # the thread still uses the caller's buffer
        await done.wait()
    result, exc = box[0]
    if exc is not None:
        raise exc
    return result


def _unexpected(_result: Any, exc: BaseException | None) -> None:
    if exc is not None:  # jobs submitted here report their own errors (as FUSE replies): a bug
        log.error("FUSE worker job failed", exc_info=exc)


def fuse_error(exc: BaseException) -> pyfuse3.FUSEError:
    """The one mapping (blockdev.errors.to_errno) applied to a FUSE reply."""
    return pyfuse3.FUSEError(to_errno(exc))


class VolumeFiles(pyfuse3.Operations):
    """pyfuse3 operations exposing ``exports()`` as ``MOUNTPOINT/NAME`` files."""

    def __init__(self, exports: Exports, workers: WorkerPool) -> None:
        super().__init__()
        self._exports = exports
        self._workers = workers
        self._read_buf = bytearray(READ_BUFFER)
        # Set by serve_fuse when our request loop runs: pins the current request buffer (loop.py).
        self.pin: Callable[[], Callable[[], None]] | None = None
        self._inodes: dict[str, int] = {}  # stable for the life of the mount
        self._names: dict[int, str] = {}
        self._started_ns = time.time_ns()
        self._uid, self._gid = os.getuid(), os.getgid()

    # -- names and attributes ----------------------------------------------------------------------
    def _volumes(self) -> dict[str, Backend]:
        vols = self._exports()
        for name in sorted(vols):
            if name not in self._inodes:
                ino = ROOT + 1 + len(self._inodes)
                self._inodes[name], self._names[ino] = ino, name
        return vols

    def backend(self, inode: int) -> Backend:
        name = self._names.get(inode)
        backend = self._volumes().get(name) if name is not None else None
        if backend is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return backend

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid, a.st_gid = self._uid, self._gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._started_ns
        a.attr_timeout = a.entry_timeout = CACHE_TIMEOUT
        if inode == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
            return a
        backend = self.backend(inode)
        a.st_mode = stat.S_IFREG | (0o600 if backend.can_write() else 0o400)
        a.st_nlink = 1
        a.st_size = backend.size()
        a.st_blksize = max(backend.block_size(), 4096)
        allocated = backend.allocated()  # a sparse image's real allocation, not its size
        a.st_blocks = ((a.st_size if allocated is None else allocated) + 511) // 512
        a.attr_timeout = FILE_ATTR_TIMEOUT
        return a

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name in (b".", b".."):
            return self._attrs(ROOT)
        vols = self._volumes()
        text = os.fsdecode(name)
        if text not in vols:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self._inodes[text])

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        current = self._attrs(inode)
        if fields.update_size and attr.st_size != current.st_size:
            raise pyfuse3.FUSEError(errno.EPERM)  # a disk has a fixed size
        # Mode, owner and times are not stored: accepting them keeps tools (touch, cp -p) quiet.
        return current

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        vols = self._volumes()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = sum(b.size() for b in vols.values()) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(vols) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- the directory -----------------------------------------------------------------------------
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self._volumes()
        for name, ino in sorted(self._inodes.items(), key=lambda kv: kv[1]):
            if ino <= start_id:
                continue
            try:
                attrs = self._attrs(ino)
            except pyfuse3.FUSEError:
                continue  # no longer exported
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, ino):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    # -- what a disk cannot do ---------------------------------------------------------------------
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    # -- the volume file ---------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        backend = self.backend(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY and not backend.can_write():
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EPERM)
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:
        backend = self.backend(fh)
        n = min(size, backend.size() - off)
        if n <= 0:
            return b""
        buf = bytearray(n)
        try:
            backend.pread(memoryview(buf), off)
        except Exception as e:  # noqa: BLE001 (any op error becomes an errno)
            raise fuse_error(e) from None
        return buf

    def _writable_range(self, backend: Backend, offset: int, length: int) -> int:
        """How many of ``length`` bytes at ``offset`` fit: a short write at the disk's end, ENOSPC past it."""
        room = backend.size() - offset
        if room <= 0 or offset < 0:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        return min(length, room)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """pyfuse3's write path, used when the adapter is not installed (see write_direct)."""
        backend = self.backend(fh)
        n = self._writable_range(backend, off, len(buf))
        data = memoryview(buf)[:n]
        try:
            if n >= BIG_WRITE:
                result = await run_on(self._workers, backend.pwrite, data, off)
            else:
                result = backend.pwrite(data, off)
            await wait(result)
        except Exception as e:  # noqa: BLE001 (any op error becomes an errno)
            raise fuse_error(e) from None
        return n

    async def _flush(self, fh: int) -> None:
        backend = self.backend(fh)
        if not backend.can_write():
            return
        try:
            await wait(backend.flush())
        except Exception as e:  # noqa: BLE001 (any op error becomes an errno)
            raise fuse_error(e) from None

    async def flush(self, fh: int) -> None:
        await self._flush(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._flush(fh)

    async def release(self, fh: int) -> None:
        return None

    # -- through the adapter (synchronous ctypes callbacks on the trio thread, see adapter.py) ---------
    def read_direct(self, inode: int, size: int, offset: int, reply: Reply) -> None:
        """A read into one reused buffer (we are on the trio thread, and the reply copies it out)."""
        backend = self.backend(inode)
        n = min(size, backend.size() - offset)
        if n <= 0:
            return reply.data(self._read_buf, 0)
        buf = self._read_buf if n <= len(self._read_buf) else bytearray(n)
        try:
            backend.pread(memoryview(buf)[:n], offset)
        except Exception as e:  # noqa: BLE001 (any op error becomes an errno)
            return reply.error(to_errno(e))
        return reply.data(buf, n)

    def write_direct(self, inode: int, data: memoryview, offset: int, reply: Reply) -> None:
        """A write from libfuse's request buffer: small ones copied and written inline, big ones
        written in place by a worker while the loop pins that buffer (``pin``, from loop.py)."""
        backend = self.backend(inode)
        n = self._writable_range(backend, offset, len(data))
        if n >= BIG_WRITE and self.pin is not None:
            # Zero-copy: the buffer stays valid until release(), which runs after the reply and,
            # with a Completion, after it finishes (the op table's rule for payloads).
            self._workers.submit(self._write_and_reply, (backend, data[:n], offset, reply, self.pin()), _unexpected)
        else:
            self._write_and_reply(backend, bytes(data[:n]), offset, reply, None)

    @staticmethod
    def _write_and_reply(backend: Backend, payload: bytes | memoryview, offset: int, reply: Reply,
                         release: Callable[[], None] | None) -> None:
        n = len(payload)

        def finish(exc: BaseException | None) -> None:
            if exc is None:
                reply.written(n)
            else:
                reply.error(to_errno(exc))
            if release is not None:
                release()

        try:
            result = backend.pwrite(payload, offset)
        except Exception as e:  # noqa: BLE001 (any op error becomes an errno)
            return finish(e)
        if result is None:
            return finish(None)
        result.add_done_callback(finish)
        return None

    def fallocate(self, inode: int, mode: int, offset: int, length: int, reply: Reply) -> None:
        """Punch-hole -> trim, zero-range -> write_zeroes; plain allocation inside the disk is a no-op."""
        backend = self.backend(inode)
        size = backend.size()
        known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
        if mode & ~known or offset < 0 or length <= 0:
            return reply.error(errno.EOPNOTSUPP if mode & ~known else errno.EINVAL)
        if offset + length > size and not mode & FALLOC_FL_KEEP_SIZE:
            return reply.error(errno.EPERM)  # would grow the file
        length = min(length, size - offset)
        if length <= 0 or not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            return reply.error(0)
        try:
            if mode & FALLOC_FL_PUNCH_HOLE:
                if not backend.can_trim():
                    return reply.error(errno.EPERM if not backend.can_write() else errno.EOPNOTSUPP)
                result = backend.trim(length, offset)
            else:
                result = backend.write_zeroes(length, offset, may_trim=False)
        except Exception as e:  # noqa: BLE001 (any op error becomes an errno)
            return reply.error(to_errno(e))
        if result is None:
            return reply.error(0)
        result.add_done_callback(lambda exc: reply.error(0 if exc is None else to_errno(exc)))
        return None

    def lseek(self, inode: int, offset: int, whence: int, reply: Reply) -> None:
        """SEEK_DATA / SEEK_HOLE from the backend's extents (the kernel handles the other whences)."""
        backend = self.backend(inode)
        size = backend.size()
        if offset >= size or offset < 0:
            return reply.error(errno.ENXIO)
        if whence not in (SEEK_DATA, SEEK_HOLE):
            return reply.error(errno.EINVAL)
        if not backend.can_extents():
            return reply.offset(offset if whence == SEEK_DATA else size)
        pos = offset
        while pos < size:
            try:
                runs = backend.extents(size - pos, pos)
            except Exception as e:  # noqa: BLE001 (any op error becomes an errno)
                return reply.error(to_errno(e))
            for length, flags in runs:
                if bool(flags & EXTENT_HOLE) == (whence == SEEK_HOLE):
                    return reply.offset(pos)
                pos += length
                if pos >= size:
                    break
            if not runs:
                break
        # The end of the file counts as a hole; there is no data after the last extent.
        return reply.offset(size) if whence == SEEK_HOLE else reply.error(errno.ENXIO)
