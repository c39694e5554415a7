"""`vdisk serve` driven by real NBD clients: qemu-img, nbdcopy, nbdinfo, nbdsh, fio and libnbd.

Every test starts its own server subprocess (see conftest.py) on a fresh data directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from blockdev.nbd import proto as P
from tests.facilities import require_nbd, require_tool

nbd = require_nbd()

MiB = 1 << 20


def tool(name: str) -> str:
    return require_tool(name, "NBD client tests")


# nbdsh is `python3 -m nbd`: it needs the python3 that python3-libnbd was built for (Debian's), which
# a pyenv or venv earlier on PATH would shadow.
ENV = dict(os.environ, PATH="/usr/bin" + os.pathsep + os.environ.get("PATH", ""))


def run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def make_source(path: Path, size: int) -> None:
    """A raw file mixing random data, zero runs and holes, so converters use every write-like op."""
    rnd = os.urandom(MiB)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // MiB):
            if i % 4 == 0:
                f.seek(i * MiB)
                f.write(rnd[i:] + rnd[:i])
            elif i % 4 == 1:
                f.seek(i * MiB + 12345)
                f.write(rnd[:100_000])
            # i % 4 == 2: explicit zero bytes; 3: a hole
            elif i % 4 == 2:
                f.seek(i * MiB)
                f.write(bytes(MiB))


def fill_random(uri: str, size: int, tmp: Path) -> None:
    """Overwrite a whole export with random bytes (so later zero writes have something to clear)."""
    junk = tmp / "junk.raw"
    junk.write_bytes(os.urandom(size))
    run(tool("nbdcopy"), str(junk), uri)
    junk.unlink()


# -- qemu-img ---------------------------------------------------------------------------------------
def test_qemu_img_info_reports_raw_size(vd, serve):
    vd.create("v1", "64M")
    srv = serve("v1")
    info = json.loads(run(tool("qemu-img"), "info", "--output=json", srv.uri()).stdout)
    assert info["virtual-size"] == 64 * MiB
    assert info["format"] == "raw"


def test_qemu_img_convert_into_and_out_of_export_keeps_hash(vd, serve, tmp_path):
    vd.create("v1", "64M")
    srv = serve("v1")
    src, out = tmp_path / "src.raw", tmp_path / "out.raw"
    make_source(src, 64 * MiB)
    fill_random(srv.uri(), 64 * MiB, tmp_path)
    qemu_img = tool("qemu-img")
    run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri())
    run(qemu_img, "convert", "-f", "raw", "-O", "raw", srv.uri(), str(out))
    assert sha256(out) == sha256(src)
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), srv.uri())


def test_qemu_img_convert_between_two_exports_of_one_server(vd, serve, tmp_path):
    vd.create("a", "32M")
    vd.create("b", "32M")
    srv = serve("a", "b")
    src = tmp_path / "src.raw"
    make_source(src, 32 * MiB)
    run(tool("qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri("a"))
    run(tool("qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw", srv.uri("a"), srv.uri("b"))
    srv.stop()
    assert sha256(vd.data_dir / "b.img") == sha256(src)


# -- nbdcopy ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [(), ("--flush", "--requests=64", "--connections=4")])
def test_nbdcopy_round_trip_keeps_hash(vd, serve, tmp_path, flags):
    vd.create("v1", "64M")
    srv = serve("v1")
    src, out = tmp_path / "src.raw", tmp_path / "out.raw"
    make_source(src, 64 * MiB)
    fill_random(srv.uri(), 64 * MiB, tmp_path)
    nbdcopy = tool("nbdcopy")
    run(nbdcopy, *flags, str(src), srv.uri())
    run(nbdcopy, *flags, srv.uri(), str(out))
    assert sha256(out) == sha256(src)
    srv.stop()
    assert sha256(vd.data_dir / "v1.img") == sha256(src)  # on the image after a clean shutdown


# -- nbdinfo ----------------------------------------------------------------------------------------
def test_nbdinfo_lists_every_served_volume(vd, serve):
    for n in ("alpha", "beta", "gamma"):
        vd.create(n, "1M")
    srv = serve("alpha", "beta", "gamma")
    listing = json.loads(run(tool("nbdinfo"), "--list", "--json", f"nbd+unix:///?socket={srv.sock}").stdout)
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert set(exports) == {"alpha", "beta", "gamma"}
    assert all(e["export-size"] == MiB for e in exports.values())


def test_nbdinfo_reports_size_contexts_and_block_size(vd, serve):
    vd.create("v1", "48M")
    srv = serve("v1")
    info = json.loads(run(tool("nbdinfo"), "--json", srv.uri()).stdout)
    exp = info["exports"][0]
    assert exp["export-size"] == 48 * MiB
    assert "base:allocation" in exp["contexts"]
    assert exp["block_size_maximum"] == 32 * MiB
    assert exp["is_read_only"] is False


@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_nbdinfo_can_flags(vd, serve, read_only):
    vd.create("v1", "8M")
    srv = serve("v1", read_only=read_only)
    nbdinfo = tool("nbdinfo")
    expect = {"write": not read_only, "trim": not read_only, "zero": not read_only, "fast-zero": not read_only,
              "flush": True, "fua": True, "multi-conn": True, "cache": True, "df": True}
    got = {}
    for what in expect:
        r = subprocess.run([nbdinfo, "--can", what, srv.uri()], capture_output=True, text=True, timeout=30,
                           check=False)
        assert r.returncode in (0, 2), f"--can {what}: {r.returncode} {r.stderr}"
        got[what] = r.returncode == 0
    assert got == expect
    ro = subprocess.run([nbdinfo, "--is", "read-only", srv.uri()], capture_output=True, timeout=30, check=False)
    assert (ro.returncode == 0) == read_only


def test_nbdinfo_map_shows_data_and_holes(vd, serve):
    vd.create("v1", "16M")
    srv = serve("v1")
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    h.pwrite(b"\x5a" * MiB, 4 * MiB)
    h.flush()
    h.shutdown()
    mapping = json.loads(run(tool("nbdinfo"), "--map", "--json", srv.uri()).stdout)
    data = [(m["offset"], m["length"]) for m in mapping if m["type"] & 1 == 0]
    assert data == [(4 * MiB, MiB)]
    assert sum(m["length"] for m in mapping) == 16 * MiB


# -- nbdsh ------------------------------------------------------------------------------------------
NBDSH_SCRIPT = r"""
import errno
MiB = 1 << 20
assert h.get_size() == 16 * MiB
assert h.can_trim() and h.can_zero() and h.can_fua() and h.can_flush() and not h.is_read_only()
assert h.can_meta_context("base:allocation")
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
h.pwrite(b"abcd" * 1024, 0)
h.pwrite(b"\x01" * 65536, 8192, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 0) == b"abcd" * 1024
assert h.pread(65536, 8192) == b"\x01" * 65536
h.flush()
h.zero(4096, 0)
assert h.pread(4096, 0) == bytes(4096)
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 8192) == bytes(4096)
h.zero(4096, 12288, nbd.CMD_FLAG_FAST_ZERO)
h.trim(65536 - 8192, 16384)
assert h.pread(65536, 8192) == bytes(65536)
h.set_strict_mode(0)  # send out-of-range requests to the server instead of refusing them in libnbd
try:
    h.pread(4096, 16 * MiB - 2048)
except nbd.Error as e:
    assert e.errno in ("EINVAL", errno.EINVAL) and "command failed" in e.string, e
else:
    raise AssertionError("read past the end succeeded")
assert h.pread(1, 16 * MiB - 1) == b"\0"
"""


def test_nbdsh_script_exercises_every_command(vd, serve):
    vd.create("v1", "16M")
    srv = serve("v1")
    run(tool("nbdsh"), "--base-allocation", "-u", srv.uri(), "-c", NBDSH_SCRIPT)


def test_nbdsh_without_structured_replies(vd, serve):
    vd.create("v1", "4M")
    srv = serve("v1")
    code = (f"h.set_request_structured_replies(False); h.connect_uri({srv.uri()!r}); "
            "assert not h.get_structured_replies_negotiated(); "
            "h.pwrite(b'x' * 4096, 4096); assert h.pread(4096, 4096) == b'x' * 4096; "
            "h.set_strict_mode(0)\nimport errno\ntry:\n    h.pread(4096, 4 * 1024 * 1024)\nexcept nbd.Error as e:\n"
            "    assert e.errno in ('EINVAL', errno.EINVAL) and 'command failed' in e.string, e\nelse:\n    raise AssertionError('no error')")
    run(tool("nbdsh"), "-c", code)


# -- fio --------------------------------------------------------------------------------------------
def fio(uri: str, *args: str) -> None:
    run(tool("fio"), "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--verify=crc32c", "--do_verify=1",
        "--verify_fatal=1", "--verify_state_save=0", "--output-format=terse", *args, timeout=120)


def test_fio_randwrite_qd32_verifies_crc32c(vd, serve):
    vd.create("v1", "64M")
    srv = serve("v1")
    fio(srv.uri(), "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=48M")


def test_fio_mixed_sizes_with_big_writes_out_of_order_verify(vd, serve):
    # Writes of 128 KiB and more go to worker threads and may be answered out of order.
    vd.create("v1", "64M")
    srv = serve("v1")
    fio(srv.uri(), "--rw=randwrite", "--bssplit=4k/40:64k/20:256k/20:1m/20", "--iodepth=16", "--size=64M")


def test_fio_several_concurrent_clients_verify(vd, serve):
    vd.create("v1", "64M")
    srv = serve("v1")
    fio(srv.uri(), "--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=4", "--size=16M",
        "--offset_increment=16M")


# -- libnbd: many requests in flight, several clients ---------------------------------------------
def drain(h) -> None:  # type: ignore[no-untyped-def]
    while h.aio_in_flight() > 0:
        h.poll(-1)


def test_many_requests_in_flight_on_one_connection(vd, serve, nbd_connect):
    vd.create("v1", "64M")
    srv = serve("v1")
    h = nbd_connect(srv.uri())
    sizes = [512, 4096, 65536, 128 * 1024, MiB, 3 * MiB, 4096 * 3]
    writes, off, expect = [], 0, bytearray(64 * MiB)
    i = 0
    while True:
        n = sizes[i % len(sizes)]
        if off + n > 64 * MiB:
            break
        data = os.urandom(n)
        expect[off:off + n] = data
        flags = nbd.CMD_FLAG_FUA if i % 5 == 0 else 0
        writes.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off, flags=flags))
        off += n + 4096
        i += 1
    assert h.aio_in_flight() > 16
    drain(h)
    for c in writes:
        assert h.aio_command_completed(c)
    bufs = [(nbd.Buffer(4 * MiB), o) for o in range(0, 64 * MiB, 4 * MiB)]
    cookies = [h.aio_pread(b, o) for b, o in bufs]
    drain(h)
    for c in cookies:
        assert h.aio_command_completed(c)
    got = b"".join(bytes(b.to_bytearray()) for b, _ in bufs)
    assert got == bytes(expect)


def test_several_clients_on_several_volumes_at_once(vd, serve):
    vd.create("a", "32M")
    vd.create("b", "32M")
    srv = serve("a", "b")
    errors: list[BaseException] = []

    def client(name: str, k: int) -> None:
        try:
            h = nbd.NBD()
            h.connect_uri(srv.uri(name))
            base = k * 8 * MiB
            blob = os.urandom(8 * MiB)
            cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(blob[o:o + 65536])), base + o)
                       for o in range(0, 8 * MiB, 65536)]
            drain(h)
            assert all(h.aio_command_completed(c) for c in cookies)
            h.flush()
            assert h.pread(8 * MiB, base) == blob
            h.shutdown()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n, k)) for n in ("a", "b") for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert srv.alive()


def test_sixty_four_clients_at_once(vd, serve):
    vd.create("v1", "64M")
    srv = serve("v1")
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            h = nbd.NBD()
            h.connect_uri(srv.uri())
            blob = os.urandom(MiB)
            for j in range(0, MiB, 256 * 1024):  # big enough to go through the worker threads
                h.pwrite(blob[j:j + 256 * 1024], k * MiB + j)
            h.flush()
            assert h.pread(MiB, k * MiB) == blob
            h.shutdown()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]


def test_multiple_listeners_unix_and_tcp(vd, serve):
    vd.create("v1", "8M")
    srv = serve("v1", extra=("--nbd", "tcp:127.0.0.1:0"))
    m = re.search(r"tcp:127\.0\.0\.1:(\d+)", srv.banner)
    assert m, srv.banner
    h = nbd.NBD()
    h.connect_uri(f"nbd://127.0.0.1:{m.group(1)}/v1")
    h.pwrite(b"t" * 4096, 0)
    h.shutdown()
    h2 = nbd.NBD()
    h2.connect_uri(srv.uri())
    assert h2.pread(4096, 0) == b"t" * 4096
    h2.shutdown()


# -- trim, zeroes, block status ---------------------------------------------------------------------
@pytest.fixture
def filled(vd, serve, nbd_connect):  # type: ignore[no-untyped-def]
    """(image path, server, libnbd handle) of a 16M volume whose first 8 MiB are written and flushed."""
    img = vd.create("v1", "16M")
    srv = serve("v1")
    h = nbd_connect(srv.uri())
    h.pwrite(os.urandom(8 * MiB), 0)
    h.flush()
    return img, srv, h


def test_trim_punches_holes_in_the_image(filled):
    img, _, h = filled
    before = allocated(img)
    assert before >= 8 * MiB
    h.trim(6 * MiB, MiB)
    h.flush()
    assert allocated(img) <= before - 6 * MiB
    assert h.pread(6 * MiB, MiB) == bytes(6 * MiB)


def test_write_zeroes_punches_unless_no_hole(filled):
    img, _, h = filled
    full = allocated(img)
    h.zero(4 * MiB, 0, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(4 * MiB, 0) == bytes(4 * MiB)
    assert allocated(img) >= full - 64 * 1024  # still allocated (zero range, not a hole)
    h.zero(4 * MiB, 4 * MiB, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(4 * MiB, 4 * MiB) == bytes(4 * MiB)
    assert allocated(img) <= full - 4 * MiB


@pytest.mark.parametrize("cmd", ["trim", "zero"])
def test_zero_length_trim_or_zero_does_not_disable_hole_punching(filled, raw_nbd, cmd):
    img, srv, h = filled
    c = raw_nbd(srv.sock)
    c.go("v1")
    assert c.call(P.CMD_TRIM if cmd == "trim" else P.CMD_WRITE_ZEROES, 4096, 0) == (0, b"")
    before = allocated(img)
    getattr(h, cmd)(4 * MiB, 0)
    h.flush()
    assert allocated(img) <= before - 4 * MiB


def test_block_status_base_allocation_follows_writes_and_trims(vd, serve, nbd_connect):
    vd.create("v1", "16M")
    srv = serve("v1")
    h = nbd_connect(srv.uri(), meta=True)
    assert h.can_meta_context("base:allocation")

    def extents(length: int, offset: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []

        def cb(meta: str, off: int, entries: list[int], err: int) -> int:
            assert meta == "base:allocation"
            out.extend(zip(entries[::2], entries[1::2]))
            return 0

        h.block_status(length, offset, cb)
        return out

    assert extents(16 * MiB, 0) == [(16 * MiB, 3)]  # hole + zero
    h.pwrite(b"\xff" * MiB, 2 * MiB)
    assert extents(16 * MiB, 0) == [(2 * MiB, 3), (MiB, 0), (13 * MiB, 3)]
    assert extents(MiB, 2 * MiB + 4096) == [(MiB - 4096, 0), (4096, 3)]
    h.trim(MiB, 2 * MiB)
    assert extents(16 * MiB, 0) == [(16 * MiB, 3)]
    one = []
    h.block_status(16 * MiB, 0, lambda m, o, e, err: one.extend(e) or 0, nbd.CMD_FLAG_REQ_ONE)
    assert len(one) == 2


def test_fua_write_and_flush_reach_the_image_file(vd, serve, nbd_connect):
    img = vd.create("v1", "4M")
    srv = serve("v1")
    h = nbd_connect(srv.uri())
    h.pwrite(b"F" * 8192, 4096, nbd.CMD_FLAG_FUA)
    with open(img, "rb") as f:
        f.seek(4096)
        assert f.read(8192) == b"F" * 8192
    h.pwrite(b"G" * 4096, 0)
    h.flush()
    with open(img, "rb") as f:
        assert f.read(4096) == b"G" * 4096


# -- option haggling through libnbd ---------------------------------------------------------------
def test_opt_mode_list_info_go_and_abort(vd, serve):
    vd.create("one", "1M")
    vd.create("two", "2M")
    srv = serve("one", "two")
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(f"nbd+unix:///?socket={srv.sock}")
    names: list[str] = []
    h.opt_list(lambda name, desc: names.append(name) or 0)
    assert sorted(names) == ["one", "two"]
    h.set_export_name("two")
    h.opt_info()
    assert h.get_size() == 2 * MiB
    h.set_export_name("nope")
    with pytest.raises(nbd.Error):
        h.opt_info()
    h.set_export_name("one")
    h.opt_go()
    assert h.get_size() == MiB
    h.pwrite(b"1" * 512, 0)
    h.shutdown()
    h2 = nbd.NBD()
    h2.set_opt_mode(True)
    h2.connect_uri(f"nbd+unix:///?socket={srv.sock}")
    h2.opt_abort()
    assert srv.alive()


# -- graceful shutdown ------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_in_flight_requests_and_flushes(vd, serve, nbd_connect, sig):
    img = vd.create("v1", "64M")
    srv = serve("v1")
    h = nbd_connect(srv.uri())
    blobs = {off: os.urandom(MiB) for off in range(0, 48 * MiB, MiB)}
    cookies = {h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b)), off): off for off, b in blobs.items()}
    # Let the server take some of them, then signal it while they are in flight.
    while h.aio_in_flight() == len(cookies):
        h.poll(100)
    srv.proc.send_signal(sig)
    try:
        while h.aio_in_flight() > 0:
            h.poll(1000)
    except nbd.Error:
        pass  # the server closed the connection: commands it never read fail below
    done = []
    for c, off in cookies.items():
        try:
            if h.aio_command_completed(c):
                done.append(off)
        except nbd.Error:
            pass
    assert srv.proc.wait(20) == 0
    assert done, "no write completed before shutdown"
    assert not srv.sock.exists()
    with open(img, "rb") as f:
        for off in done:
            f.seek(off)
            assert f.read(MiB) == blobs[off], f"acknowledged write at {off} is not in the image"


def test_sigterm_is_prompt_with_idle_and_half_negotiated_clients(vd, serve, raw_nbd):
    vd.create("v1", "4M")
    srv = serve("v1")
    silent = raw_nbd(srv.sock)  # connected, never negotiates
    half = raw_nbd(srv.sock)
    half.greeting()
    half.option(P.OPT_LIST)
    idle = raw_nbd(srv.sock)
    idle.go("v1")
    assert idle.call(P.CMD_READ, 0, 512)[0] == 0
    t0 = time.monotonic()
    assert srv.stop(timeout=20) == 0
    # Held back, shutdown would take the 10 s drain grace (idle) or the 30 s handshake timeout (half
    # negotiated); a bound well below those, not a speed test, so a loaded machine does not fail it.
    assert time.monotonic() - t0 < 8, "an idle client held shutdown back"
    assert silent.recv_exact(18) and silent.closed_by_server()
