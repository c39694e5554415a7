"""The FUSE export in-process: serve_fuse on trio, file I/O from worker threads, a real kernel mount."""
from __future__ import annotations

import errno
import mmap
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from blockdev.backend import Backend, Completion, Layer, WriteResult
from blockdev.fuse import FuseMountError, serve_fuse
from blockdev.fuse import adapter as adapter_mod
from blockdev.image.file import FileImage, fallocate
from blockdev.layers import FaultLayer, ReadOnlyLayer, StallLayer, StatsLayer
from blockdev.layers.faults import Fault
from tests.fusekit import VERIFY, fio, require_fuse_host

SIZE = 16 << 20
PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ZERO_RANGE = 0x10 | 0x01


@pytest.fixture(autouse=True)
def _fuse_host() -> None:
    require_fuse_host()


@pytest.fixture
def image(tmp_path: Path) -> FileImage:
    path = tmp_path / "vol.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    img = FileImage(path)
    yield img
    img.close()


@asynccontextmanager
async def exported(tmp_path: Path, volumes: dict[str, Backend]) -> AsyncIterator[Path]:
    """Mount ``volumes`` for the block; the mount must be gone afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_fuse, mnt, lambda: volumes)
        try:
            yield mnt
        finally:
            nursery.cancel_scope.cancel()
    assert not os.path.ismount(mnt)


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Blocking file I/O must leave the trio thread free to serve it."""
    return await trio.to_thread.run_sync(fn, *args)


def read_head(path: Path, n: int = 2) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def errno_of(fn: Callable[..., Any], *args: Any) -> int:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


async def test_each_volume_is_a_regular_file_of_its_size(tmp_path: Path, image: FileImage) -> None:
    other = tmp_path / "b.img"
    other.write_bytes(bytes(1 << 20))
    second = FileImage(other)
    async with exported(tmp_path, {"a": image, "b": second}) as mnt:
        names = await in_thread(os.listdir, mnt)
        st = await in_thread(os.stat, mnt / "a")
        st_b = await in_thread(os.stat, mnt / "b")
        missing = await in_thread(errno_of, os.stat, mnt / "c")
    second.close()
    assert sorted(names) == ["a", "b"]
    assert st.st_size == SIZE and st_b.st_size == 1 << 20
    assert (st.st_mode & 0o170000) == 0o100000 and st.st_mode & 0o777 == 0o600
    assert missing == errno.ENOENT


async def test_st_blocks_reports_the_real_allocation_of_a_sparse_volume(tmp_path: Path, image: FileImage) -> None:
    def io(mnt: Path) -> tuple[os.stat_result, os.stat_result, int, os.stat_result]:
        before = os.stat(mnt / "vol")
        fd = os.open(mnt / "vol", os.O_RDWR)
        try:
            os.pwrite(fd, b"x" * (1 << 20), 4 << 20)
            written = os.stat(mnt / "vol")  # the kernel drops cached attributes on write and fallocate
            image_blocks = os.stat(tmp_path / "vol.img").st_blocks
            fallocate(fd, PUNCH, 4 << 20, 1 << 20)
        finally:
            os.close(fd)
        return before, written, image_blocks, os.stat(mnt / "vol")

    async with exported(tmp_path, {"vol": image}) as mnt:
        before, written, image_blocks, punched = await in_thread(io, mnt)
    assert before.st_size == written.st_size == SIZE
    assert before.st_blocks == 0  # a fresh sparse volume holds nothing (it used to claim all 16 MiB)
    assert written.st_blocks == image_blocks and image_blocks * 512 >= 1 << 20
    assert punched.st_blocks == 0


async def test_unaligned_io_matches_a_byte_model_and_the_image(tmp_path: Path, image: FileImage) -> None:
    model = bytearray(SIZE)
    rng = random.Random(4)

    def io(mnt: Path) -> None:
        fd = os.open(mnt / "vol", os.O_RDWR)
        try:
            for _ in range(300):
                off = rng.randrange(SIZE - 1)
                n = min(rng.choice([1, 7, 511, 513, 4095, 4097, 65536 + 3, 300_001]), SIZE - off)
                data = rng.randbytes(n)
                assert os.pwrite(fd, data, off) == n
                model[off:off + n] = data
                roff = rng.randrange(SIZE - 1)
                rn = min(rng.randrange(1, 200_000), SIZE - roff)
                assert os.pread(fd, rn, roff) == bytes(model[roff:roff + rn])
        finally:
            os.close(fd)

    async with exported(tmp_path, {"vol": image}) as mnt:
        await in_thread(io, mnt)
    assert (tmp_path / "vol.img").read_bytes() == bytes(model)


async def test_the_end_of_the_disk_clips_reads_and_refuses_writes(tmp_path: Path, image: FileImage) -> None:
    def io(mnt: Path) -> tuple[bytes, bytes, int, int]:
        fd = os.open(mnt / "vol", os.O_RDWR)
        try:
            tail = os.pread(fd, 100, SIZE - 10)
            past = os.pread(fd, 100, SIZE + 4096)
            short = os.pwrite(fd, b"x" * 100, SIZE - 10)
            return tail, past, short, errno_of(os.pwrite, fd, b"y", SIZE)
        finally:
            os.close(fd)

    async with exported(tmp_path, {"vol": image}) as mnt:
        tail, past, short, err = await in_thread(io, mnt)
    assert tail == bytes(10) and past == b"" and short == 10
    assert err in (errno.ENOSPC, errno.EFBIG)


async def test_size_and_name_changes_are_refused_with_eperm(tmp_path: Path, image: FileImage) -> None:
    def attempts(mnt: Path) -> dict[str, int]:
        f = mnt / "vol"
        return {
            "truncate": errno_of(os.truncate, f, 4096),
            "open O_TRUNC": errno_of(os.open, f, os.O_RDWR | os.O_TRUNC),
            "unlink": errno_of(os.unlink, f),
            "rename": errno_of(os.rename, f, mnt / "other"),
            "create": errno_of(os.open, mnt / "new", os.O_CREAT | os.O_RDWR),
            "mkdir": errno_of(os.mkdir, mnt / "d"),
        }

    async with exported(tmp_path, {"vol": image}) as mnt:
        got = await in_thread(attempts, mnt)
        size = (await in_thread(os.stat, mnt / "vol")).st_size
    assert got == dict.fromkeys(got, errno.EPERM)
    assert size == SIZE


async def test_fsync_and_close_flush_the_backend(tmp_path: Path, image: FileImage) -> None:
    stats = StatsLayer(image)

    def io(mnt: Path) -> None:
        fd = os.open(mnt / "vol", os.O_RDWR)
        os.pwrite(fd, b"d" * 4096, 0)
        os.fsync(fd)
        os.fdatasync(fd)
        os.close(fd)

    async with exported(tmp_path, {"vol": stats}) as mnt:
        await in_thread(io, mnt)
    assert stats.statistics().flushes >= 3  # fsync, fdatasync, and the flush of close()


async def test_punch_hole_and_zero_range_reach_the_backend(tmp_path: Path, image: FileImage) -> None:
    stats = StatsLayer(image)

    def io(mnt: Path) -> tuple[bytes, bytes, int, int]:
        fd = os.open(mnt / "vol", os.O_RDWR)
        try:
            os.pwrite(fd, b"\xff" * (4 << 20), 0)
            os.fsync(fd)
            fallocate(fd, PUNCH, 1 << 20, 1 << 20)
            fallocate(fd, ZERO_RANGE, 3 << 20, 4096 + 5)
            collapse = errno_of(fallocate, fd, 0x08, 0, 1 << 20)  # FALLOC_FL_COLLAPSE_RANGE
            grow = errno_of(fallocate, fd, 0, SIZE - 4096, 1 << 20)  # would grow the file
            return os.pread(fd, 1 << 20, 1 << 20), os.pread(fd, 8192, 3 << 20), collapse, grow
        finally:
            os.close(fd)

    async with exported(tmp_path, {"vol": stats}) as mnt:
        punched, zeroed, collapse, grow = await in_thread(io, mnt)
    st = stats.statistics()
    assert punched == bytes(1 << 20)
    assert zeroed == bytes(4096 + 5) + b"\xff" * (8192 - 4096 - 5)
    assert st.trims == 1 and st.trim_bytes == 1 << 20 and st.zeroes == 1
    assert collapse == errno.EOPNOTSUPP and grow == errno.EPERM
    assert os.stat(tmp_path / "vol.img").st_blocks * 512 <= 3 << 20  # the hole is really punched


async def test_seek_data_and_hole_follow_the_image_extents(tmp_path: Path, image: FileImage) -> None:
    def io(mnt: Path) -> tuple[int, int, int]:
        fd = os.open(mnt / "vol", os.O_RDWR)
        try:
            os.pwrite(fd, b"z" * 65536, 8 << 20)
            os.fsync(fd)
            return os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 8 << 20, os.SEEK_HOLE), \
                errno_of(os.lseek, fd, (8 << 20) + 65536, os.SEEK_DATA)
        finally:
            os.close(fd)

    async with exported(tmp_path, {"vol": image}) as mnt:
        data, hole, nodata = await in_thread(io, mnt)
    assert data == 8 << 20 and hole == (8 << 20) + 65536 and nodata == errno.ENXIO


async def test_read_only_export_refuses_opening_for_write(tmp_path: Path, image: FileImage) -> None:
    async with exported(tmp_path, {"vol": ReadOnlyLayer(image)}) as mnt:
        err = await in_thread(errno_of, os.open, mnt / "vol", os.O_RDWR)
        mode = (await in_thread(os.stat, mnt / "vol")).st_mode & 0o777
        image.pwrite(b"ro", 0)  # written below the read-only layer: reads must see it
        head = await in_thread(read_head, mnt / "vol")
    assert err == errno.EROFS and mode == 0o400 and head == b"ro"


class LateLayer(Layer):
    """Writes complete (or, with ``fail``, fail) ``delay`` seconds later on a timer thread, like a
    sync replica; trims and flushes complete late too, and never fail."""

    def __init__(self, inner: Backend, delay: float, fail: bool = False) -> None:
        super().__init__(inner)
        self.delay, self.fail = delay, fail

    def _later(self, result: WriteResult, fail: bool = False) -> Completion:
        c = Completion()
        exc = OSError(errno.EIO, "replica lost") if fail else None
        threading.Timer(self.delay, c.finish, args=(exc,)).start()
        return c

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool = False) -> WriteResult:
        return self._later(self.inner.pwrite(data, offset, fua), self.fail)

    def trim(self, length: int, offset: int, fua: bool = False) -> WriteResult:
        return self._later(self.inner.trim(length, offset, fua))

    def flush(self) -> WriteResult:
        return self._later(self.inner.flush())


async def test_writes_and_punches_reply_only_when_their_completion_finishes(tmp_path: Path, image: FileImage) -> None:
    def timed(mnt: Path, name: str, big: bool) -> tuple[float, int, float]:
        fd = os.open(mnt / name, os.O_RDWR)
        try:
            buf = mmap.mmap(-1, 1 << 20) if big else b"w" * 4096  # page-aligned: one 1 MiB request
            t0 = time.monotonic()
            err = errno_of(os.pwrite, fd, buf, 0)
            t1 = time.monotonic()
            fallocate(fd, PUNCH, 0, 4096) if name == "late" else None
            return t1 - t0, err, time.monotonic() - t1
        finally:
            os.close(fd)

    vols = {"late": LateLayer(image, 0.3), "failing": LateLayer(image, 0.05, fail=True)}
    async with exported(tmp_path, vols) as mnt:
        small = await in_thread(timed, mnt, "late", False)
        big = await in_thread(timed, mnt, "late", True)
        failed = await in_thread(timed, mnt, "failing", False)
    assert small[0] >= 0.25 and small[1] == 0 and small[2] >= 0.25  # write, then punch, both waited
    assert big[0] >= 0.25 and big[1] == 0  # the worker-thread path waits too
    assert failed[1] == errno.EIO


async def test_a_waiting_flush_does_not_stall_other_requests(tmp_path: Path, image: FileImage) -> None:
    # The fsync's handler suspends on its Completion: the loop's leader must hand /dev/fuse to a
    # follower and keep serving, instead of making every other request wait behind the flush.
    slow = StallLayer(image)
    fsynced = threading.Event()

    def fsync(mnt: Path) -> None:
        fd = os.open(mnt / "slow", os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            fsynced.set()
            os.close(fd)

    def reads(mnt: Path) -> list[bytes]:
        fd = os.open(mnt / "fast", os.O_RDONLY)
        try:
            return [os.pread(fd, 4096, i * 4096) for i in range(50)]
        finally:
            os.close(fd)

    async with exported(tmp_path, {"slow": slow, "fast": image}) as mnt, trio.open_nursery() as nursery:
        nursery.start_soon(in_thread, fsync, mnt)
        with trio.fail_after(20):
            while not slow.held():  # the flush reached the volume and waits there: no timing involved
                await trio.sleep(0.005)
            # These could never finish if the loop were stuck behind the flush (fail_after would say so).
            got = await in_thread(reads, mnt)
        assert len(got) == 50 and not fsynced.is_set() and slow.held() == 1  # still waiting, meanwhile
        slow.release()
    assert fsynced.is_set()


class QueueingLayer(Layer):
    """Keeps each write's payload and applies it later from a timer thread, as a replicator queueing
    frames without copying would: the front end must keep the payload valid until the Completion."""

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool = False) -> WriteResult:
        c = Completion()

        def apply() -> None:
            self.inner.pwrite(data, offset, fua)
            c.finish()

        threading.Timer(0.02, apply).start()
        return c


async def test_payloads_held_by_a_completion_stay_intact_while_other_writes_arrive(
        tmp_path: Path, image: FileImage) -> None:
    # libaio at QD8 keeps several 1 MiB writes in flight (psync writes to one file are serialized by
    # the kernel), so request buffers would be reused under the held payloads if they were not pinned.
    async with exported(tmp_path, {"vol": QueueingLayer(image)}) as mnt:
        await in_thread(lambda: fio("--name=held", f"--filename={mnt / 'vol'}", "--ioengine=libaio",
                                    "--iodepth=8", "--rw=write", "--bs=1m", f"--size={SIZE}", *VERIFY))


async def test_backend_errors_reach_the_caller_as_their_errno(tmp_path: Path, image: FileImage) -> None:
    faults = FaultLayer(image)
    faults.arm(Fault("pwrite", errno.ENOSPC, offset=1 << 20, length=4096))
    faults.arm(Fault("pread", errno.EIO, offset=2 << 20, length=4096))

    def io(mnt: Path) -> tuple[int, int, int]:
        fd = os.open(mnt / "vol", os.O_RDWR)
        try:
            return (errno_of(os.pwrite, fd, b"x" * 4096, 1 << 20), errno_of(os.pread, fd, 4096, 2 << 20),
                    errno_of(os.pwrite, fd, b"x" * 4096, 0))
        finally:
            os.close(fd)

    async with exported(tmp_path, {"vol": faults}) as mnt:
        assert await in_thread(io, mnt) == (errno.ENOSPC, errno.EIO, 0)


class GateLayer(Layer):
    """The first write blocks the thread it runs on (the FUSE loop's: small writes are inline) until
    ``gate`` opens, so that requests from other writers pile up in /dev/fuse meanwhile."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.entered, self.gate = threading.Event(), threading.Event()

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool = False) -> WriteResult:
        if not self.entered.is_set():
            self.entered.set()
            self.gate.wait(30)
        return self.inner.pwrite(data, offset, fua)


def in_pwrite_syscall(tid: int) -> bool:
    """Is thread ``tid`` of this process blocked inside pwrite64 (its FUSE request queued)?"""
    with open(f"/proc/self/task/{tid}/syscall") as f:
        return f.read().split()[0] == "18"  # __NR_pwrite64 on x86-64


async def test_our_request_loop_reads_queued_requests_without_waiting(tmp_path: Path, image: FileImage) -> None:
    gated = GateLayer(image)

    def hammer(mnt: Path) -> None:
        tids: list[int] = []
        opened = threading.Barrier(4)  # opens are FUSE requests too: all done before the gate closes

        def one(seed: int) -> None:
            tids.append(threading.get_native_id())
            fd = os.open(mnt / "vol", os.O_RDWR)
            opened.wait(30)
            for i in range(300):
                os.pwrite(fd, b"q" * 4096, ((seed * 300 + i) * 4096) % SIZE)
            os.close(fd)

        threads = [threading.Thread(target=one, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        # The loop is stuck in the first write: once every writer sits in pwrite, at least three
        # requests are queued in /dev/fuse, and the loop must read them without waiting in between.
        assert gated.entered.wait(30)
        deadline = time.monotonic() + 30
        while not (len(tids) == 4 and all(in_pwrite_syscall(t) for t in tids)):
            assert time.monotonic() < deadline, "the writers never reached the kernel"
            time.sleep(0.001)
        gated.gate.set()
        for t in threads:
            t.join()

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    async with trio.open_nursery() as nursery:
        export = await nursery.start(serve_fuse, mnt, lambda: {"vol": gated})
        await in_thread(hammer, mnt)
        stats = export.statistics()
        nursery.cancel_scope.cancel()
    # Requests queued behind the gated write were read straight after the previous one, without waiting.
    assert stats["adapter"] and stats["requests"] >= 1200
    assert 0 < stats["waits"] < stats["requests"]


async def test_an_unsupported_pyfuse3_is_refused_with_a_clear_error(
        tmp_path: Path, image: FileImage, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mnt").mkdir()
    monkeypatch.setattr(pyfuse3, "__version__", "3.6.0")
    with pytest.raises(FuseMountError, match=r"pyfuse3 3\.6\.0 is not supported.*pyfuse3==3\.5\.0"):
        await serve_fuse(tmp_path / "mnt", lambda: {"vol": image})
    assert not os.path.ismount(tmp_path / "mnt")


def test_pyproject_pins_the_pyfuse3_the_adapter_supports() -> None:
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert sorted(adapter_mod.SUPPORTED_PYFUSE3) == ["3.5.0"] and '"pyfuse3==3.5.0"' in text


async def test_libfuse_without_the_lseek_slot_is_reported_and_not_installed(
        tmp_path: Path, image: FileImage, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(adapter_mod, "libfuse_version", lambda: "3.7.1")
    assert not adapter_mod.check_support().lseek and adapter_mod.check_support().slots == 43
    (tmp_path / "mnt").mkdir()

    def io(mnt: Path) -> tuple[int, int, int]:
        fd = os.open(mnt / "vol", os.O_RDWR)
        try:
            os.pwrite(fd, b"d" * 4096, 1 << 20)
            # No lseek handler: the kernel's generic lseek treats the whole file as data.
            return os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 0, os.SEEK_HOLE), errno_of(fallocate, fd, PUNCH, 0, 4096)
        finally:
            os.close(fd)

    async with trio.open_nursery() as nursery:
        export = await nursery.start(serve_fuse, tmp_path / "mnt", lambda: {"vol": image})
        data, hole, punch = await in_thread(io, tmp_path / "mnt")
        nursery.cancel_scope.cancel()
    assert export.statistics()["adapter"] and not export.statistics()["lseek"]
    assert (data, hole, punch) == (0, SIZE, 0)  # the rest of the adapter still works (punch-hole)
    assert "SEEK_DATA/SEEK_HOLE are not offered" in caplog.text
    monkeypatch.setattr(adapter_mod, "libfuse_version", lambda: "3.2.0")
    with pytest.raises(adapter_mod.AdapterError, match="libfuse 3.2.0 is not supported"):
        adapter_mod.check_support()


async def test_without_the_adapter_the_export_still_works_minus_fallocate(
        tmp_path: Path, image: FileImage, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mnt").mkdir()
    monkeypatch.setattr(pyfuse3, "__version__", "9.9.9")
    with pytest.raises(adapter_mod.AdapterError, match="9.9.9"):
        adapter_mod.Pyfuse3Statics.locate()

    def io(mnt: Path) -> tuple[bytes, int]:
        fd = os.open(mnt / "vol", os.O_RDWR)
        try:
            os.pwrite(fd, b"ok", 0)
            return os.pread(fd, 2, 0), errno_of(fallocate, fd, PUNCH, 0, 4096)
        finally:
            os.close(fd)

    async with trio.open_nursery() as nursery:
        export = await nursery.start(partial(serve_fuse, degraded_ok=True), tmp_path / "mnt", lambda: {"vol": image})
        head, err = await in_thread(io, tmp_path / "mnt")
        nursery.cancel_scope.cancel()
    assert head == b"ok" and err == errno.EOPNOTSUPP and not export.statistics()["adapter"]


async def test_bad_mountpoints_and_a_second_session_are_refused(tmp_path: Path, image: FileImage) -> None:
    with pytest.raises(FuseMountError, match="does not exist"):
        await serve_fuse(tmp_path / "nope", lambda: {"vol": image})
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FuseMountError, match="not a directory"):
        await serve_fuse(tmp_path / "file", lambda: {"vol": image})
    async with exported(tmp_path, {"vol": image}) as mnt:
        other = tmp_path / "other"
        other.mkdir()
        with pytest.raises(FuseMountError, match="already serves"):
            await serve_fuse(other, lambda: {"vol": image})
        with pytest.raises(FuseMountError, match="already a mountpoint"):
            await serve_fuse(mnt, lambda: {"vol": image})
