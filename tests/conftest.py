"""Fixtures for tests that drive `vdisk` as a subprocess and talk to it with real NBD clients.

``vd`` runs CLI commands against a temporary data directory; ``serve`` starts `vdisk serve` on a unix
socket in a short temporary directory, waits for its "serving" line and always stops it afterwards
(failing the test if the server logged a traceback); ``raw_nbd`` opens a hand-driven socket client for
the negative tests.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockdev.nbd import proto as P
from tests.facilities import require_nbd

ROOT = Path(__file__).resolve().parent.parent
VDISK = str(Path(sys.executable).parent / "vdisk")
START_TIMEOUT = 20.0


class CLI:
    """Runs `vdisk` with VDISK_HOME pointing at one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.env = dict(os.environ, VDISK_HOME=str(data_dir))

    def __call__(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([VDISK, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                           check=False)
        if check and r.returncode != 0:
            raise AssertionError(f"vdisk {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def create(self, name: str, size: str = "64M") -> Path:
        self("create", name, "--size", size)
        return self.data_dir / f"{name}.img"


class Server:
    """A running `vdisk serve` subprocess."""

    def __init__(self, cli: CLI, names: tuple[str, ...], sock: Path, extra: tuple[str, ...],
                 preexec: Callable[[], None] | None = None) -> None:
        self.names = names
        self.sock = sock
        self.log_path = sock.with_suffix(".log")
        self._log = open(self.log_path, "w+b")  # noqa: SIM115 - lives as long as the server
        args = [VDISK, "serve", *names, "--nbd", f"unix:{sock}", *extra]
        self.proc = subprocess.Popen(args, env=cli.env, stdout=subprocess.PIPE, stderr=self._log,
                                     preexec_fn=preexec)  # noqa: PLW1509 - only resource limits, set in the child
        self.banner = self._wait_banner()

    def _wait_banner(self) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
            if b"\n" in line:
                text = line.decode()
                if text.startswith("serving"):
                    return text.strip()
                break
        self.kill()
        raise AssertionError(f"vdisk serve did not start: {line!r} {self.log()}")

    def uri(self, name: str | None = None) -> str:
        return f"nbd+unix:///{name if name is not None else self.names[0]}?socket={self.sock}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"vdisk serve ignored signal {sig} for {timeout}s") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def vd(data_dir: Path) -> CLI:
    return CLI(data_dir)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="vdt-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _server_factory(cli: CLI, sock_dir: Path, servers: list[Server]) -> Callable[..., Server]:
    def start(*names: str, read_only: bool = False, extra: tuple[str, ...] = (), sock: Path | None = None,
              preexec: Callable[[], None] | None = None) -> Server:
        flags = (("--read-only",) if read_only else ()) + tuple(extra)
        srv = Server(cli, names, sock or sock_dir / f"s{len(servers)}.sock", flags, preexec)
        servers.append(srv)
        return srv
    return start


def _stop_all(servers: list[Server]) -> None:
    problems = []
    for srv in servers:
        if srv.alive():
            srv.proc.send_signal(signal.SIGTERM)
    for srv in servers:
        try:
            srv.proc.wait(15)
        except subprocess.TimeoutExpired:
            srv.kill()
            problems.append(f"{srv.names} did not stop on SIGTERM")
        log = srv.log()
        if "Traceback" in log:
            problems.append(f"{srv.names} logged a traceback:\n{log}")
        srv.close()
    if problems:
        pytest.fail("\n".join(problems))


@pytest.fixture
def serve(vd: CLI, sock_dir: Path) -> Iterator[Callable[..., Server]]:
    """``serve(*names, read_only=False, extra=(), preexec=None)`` -> a running Server; all are stopped at
    teardown (``preexec`` runs in the child before exec: resource limits)."""
    servers: list[Server] = []
    yield _server_factory(vd, sock_dir, servers)
    _stop_all(servers)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server per module with volumes ``rw`` (64M), ``other`` (16M) and a read-only twin of
    ``ro`` on a second socket: tests that attack it check that it keeps serving others."""
    cli = CLI(tmp_path_factory.mktemp("data"))
    cli.create("rw", "64M")
    cli.create("other", "16M")
    cli.create("ro", "16M")
    d = Path(tempfile.mkdtemp(prefix="vdt-"))
    servers: list[Server] = []
    start = _server_factory(cli, d, servers)
    srv = start("rw", "other")
    srv.ro = start("ro", read_only=True)  # type: ignore[attr-defined]
    yield srv
    _stop_all(servers)
    shutil.rmtree(d, ignore_errors=True)


# -- a hand-driven NBD client for the negative tests ----------------------------------------------
class RawNBD:
    """Speaks NBD byte by byte so tests can send what no real client would."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.structured = False

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(min(n - len(out), 1 << 20))
            if not chunk:
                raise EOFError(f"server closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def closed_by_server(self) -> bool:
        """True when the server has closed (EOF or reset) with no more bytes to read."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # handshake
    def greeting(self, client_flags: int = P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt_magic) == (P.NBDMAGIC, P.IHAVEOPT)
        self.send(struct.pack(">I", client_flags))
        return flags

    def option(self, opt: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data)

    def opt_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == P.OPT_REPLY_MAGIC, hex(magic)
        return opt, rep, self.recv_exact(length)

    def opt_replies(self) -> list[tuple[int, int, bytes]]:
        """Replies up to and including the first that is not REP_SERVER/REP_INFO/REP_META_CONTEXT."""
        out = []
        while True:
            r = self.opt_reply()
            out.append(r)
            if r[1] not in (P.REP_SERVER, P.REP_INFO, P.REP_META_CONTEXT):
                return out

    @staticmethod
    def go_payload(name: str, infos: tuple[int, ...] = ()) -> bytes:
        raw = name.encode()
        return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
            struct.pack(">H", i) for i in infos)

    def go(self, name: str, structured: bool = True, base_allocation: bool = False) -> tuple[int, int]:
        """Greeting through NBD_OPT_GO; returns (size, transmission flags)."""
        self.greeting()
        if structured:
            self.option(P.OPT_STRUCTURED_REPLY)
            assert self.opt_reply()[1] == P.REP_ACK
            self.structured = True
        if base_allocation:
            q = P.META_BASE_ALLOCATION.encode()
            raw = name.encode()
            self.option(P.OPT_SET_META_CONTEXT, struct.pack(">I", len(raw)) + raw + struct.pack(">II", 1, len(q)) + q)
            reps = self.opt_replies()
            assert reps[-1][1] == P.REP_ACK and reps[0][1] == P.REP_META_CONTEXT, reps
        self.option(P.OPT_GO, self.go_payload(name))
        size = tflags = None
        for _opt, rep, data in self.opt_replies():
            if rep == P.REP_INFO and struct.unpack_from(">H", data)[0] == P.INFO_EXPORT:
                _, size, tflags = struct.unpack(">HQH", data)
            elif rep != P.REP_INFO:
                assert rep == P.REP_ACK, f"NBD_OPT_GO failed: {rep:#x} {data!r}"
        assert size is not None and tflags is not None
        return size, tflags

    # transmission
    def request(self, cmd: int, offset: int = 0, length: int = 0, handle: int = 1, flags: int = 0,
                payload: bytes = b"") -> None:
        self.send(struct.pack(">IHHQQI", P.REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload)

    def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """One complete reply: (handle, error, data). ``read_length`` is needed for simple read replies."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == P.SIMPLE_REPLY_MAGIC:
            err, handle = struct.unpack(">IQ", self.recv_exact(12))
            return handle, err, (self.recv_exact(read_length) if read_length and not err else b"")
        assert magic == P.STRUCTURED_REPLY_MAGIC, hex(magic)
        data, err = b"", 0
        while True:
            flags, rtype, handle, length = struct.unpack(">HHQI", self.recv_exact(16))
            body = self.recv_exact(length)
            if rtype == P.REPLY_TYPE_OFFSET_DATA:
                data += body[8:]
            elif rtype == P.REPLY_TYPE_BLOCK_STATUS:
                data += body
            elif rtype & (1 << 15):
                err = struct.unpack_from(">I", body)[0]
            if flags & P.REPLY_FLAG_DONE:
                return handle, err, data
            (magic,) = struct.unpack(">I", self.recv_exact(4))
            assert magic == P.STRUCTURED_REPLY_MAGIC

    def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b"",
             handle: int = 7) -> tuple[int, bytes]:
        """Send one request, wait for its reply; returns (error, data)."""
        self.request(cmd, offset, length, handle, flags, payload)
        h, err, data = self.reply(length if cmd == P.CMD_READ else 0)
        assert h == handle
        return err, data


@pytest.fixture
def raw_nbd() -> Iterator[Callable[[Path | str], RawNBD]]:
    opened: list[RawNBD] = []

    def connect(path: Path | str) -> RawNBD:
        c = RawNBD(path)
        opened.append(c)
        return c

    yield connect
    for c in opened:
        c.close()


# -- helpers shared by the client tests -----------------------------------------------------------
def nbd_handle(uri: str, *, structured: bool = True, meta: bool = False):  # type: ignore[no-untyped-def]
    """A connected libnbd handle (skips, or fails in CI, if libnbd's Python bindings are missing)."""
    nbd = require_nbd()
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(P.META_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


@pytest.fixture
def nbd_connect() -> Iterator[Callable[..., object]]:
    """``nbd_connect(uri, **kw)`` -> a libnbd handle, shut down at teardown."""
    handles: list[object] = []

    def connect(uri: str, **kw: bool) -> object:
        h = nbd_handle(uri, **kw)
        handles.append(h)
        return h

    yield connect
    for h in handles:
        try:
            h.shutdown()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001, S110 - already gone (e.g. the test killed the server)
            pass
