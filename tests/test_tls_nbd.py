"""NBD over TLS (NBD_OPT_STARTTLS): the sans-IO handshake, then libnbd and qemu-img as clients of
`vdisk serve --tls` and of a target's --nbd-tls export, including clients that refuse the certificate."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from blockdev.nbd import proto as P
from blockdev.nbd.handshake import Closed, ExportInfo, Negotiated, ServerHandshake
from tests.mirror_procs import Procs

nbd = pytest.importorskip("nbd") if not os.environ.get("CI") else __import__("nbd")
MiB = 1 << 20
need_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None and not os.environ.get("CI"),
                               reason="qemu-img is not installed")


def _opt(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data


def _replies(out: bytes) -> list[tuple[int, int]]:
    res, pos = [], 0
    while pos < len(out):
        _magic, opt, rep, n = struct.unpack_from(">QIII", out, pos)
        res.append((opt, rep))
        pos += 20 + n
    return res


def _hs(tls: bool) -> ServerHandshake:
    info = ExportInfo("vol", 1 * MiB, True)
    hs = ServerHandshake(lambda n: info if n == "vol" else None, lambda: ["vol"], tls=tls)
    hs.data_to_send()
    hs.receive_data(struct.pack(">I", P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
    return hs


def test_starttls_handshake_requires_tls_first_then_continues_inside_it():
    hs = _hs(tls=True)
    go = struct.pack(">I", 3) + b"vol" + struct.pack(">H", 0)
    hs.receive_data(_opt(P.OPT_LIST) + _opt(P.OPT_GO, go) + _opt(P.OPT_STRUCTURED_REPLY))
    assert _replies(hs.data_to_send()) == [(P.OPT_LIST, P.REP_ERR_TLS_REQD), (P.OPT_GO, P.REP_ERR_TLS_REQD),
                                           (P.OPT_STRUCTURED_REPLY, P.REP_ERR_TLS_REQD)]
    # STARTTLS with the first bytes of the ClientHello right behind it: the handshake pauses there.
    assert hs.receive_data(_opt(P.OPT_STARTTLS) + b"\x16\x03\x01rest") is None
    assert _replies(hs.data_to_send()) == [(P.OPT_STARTTLS, P.REP_ACK)]
    assert hs.tls_requested and hs.take_leftover() == b"\x16\x03\x01rest"
    hs.tls_started()
    hs.receive_data(_opt(P.OPT_STARTTLS))
    assert _replies(hs.data_to_send()) == [(P.OPT_STARTTLS, P.REP_ERR_INVALID)]
    result = hs.receive_data(_opt(P.OPT_GO, go))
    assert isinstance(result, Negotiated) and result.export.name == "vol"


def test_export_name_before_starttls_hangs_up_and_a_plain_server_refuses_starttls():
    hs = _hs(tls=True)
    assert isinstance(hs.receive_data(_opt(P.OPT_EXPORT_NAME, b"vol")), Closed)
    plain = _hs(tls=False)
    plain.receive_data(_opt(P.OPT_STARTTLS))
    assert _replies(plain.data_to_send()) == [(P.OPT_STARTTLS, P.REP_ERR_POLICY)]


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.kill_all()


def _ca(procs: Procs, data: str, name: str) -> str:
    """A directory a client takes its CA from: the site's self-signed certificate as ca-cert.pem."""
    d = procs.tmp / name
    d.mkdir()
    shutil.copy(procs.tmp / data / "keys" / "cert.pem", d / "ca-cert.pem")
    return str(d)


def _tls_served(procs: Procs) -> tuple[str, str, str, str]:
    src = str(procs.tmp / "src")
    procs.run("--data-dir", src, "create", "vol", "--size", "16M")
    procs.run("--data-dir", src, "keys", "init")
    procs.run("--data-dir", str(procs.tmp / "other"), "keys", "init")
    sock = str(procs.tmp / "tls.sock")
    _, line = procs.start("--data-dir", src, "serve", "vol", "--nbd", f"unix:{sock}", "--nbd", "tcp:127.0.0.1:0",
                          "--tls", "-v", log="serve.log", ready=r"tcp:127\.0\.0\.1:\d+")
    return sock, line[4:], _ca(procs, "src", "ca"), _ca(procs, "other", "wrong-ca")


def _connect(sock: str, ca: str | None, tcp: str | None = None):  # type: ignore[no-untyped-def]
    """libnbd 1.14 verifies the server's certificate over TCP only (over a unix socket it has no
    host name to check, and checks nothing): the refusal tests go over TCP."""
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)  # tls-certificates= names a directory
    if tcp is not None:
        h.connect_uri(f"nbds://{tcp}/vol?tls-certificates={ca}")
    elif ca is None:
        h.connect_uri(f"nbd+unix:///vol?socket={sock}")
    else:
        h.connect_uri(f"nbds+unix:///vol?socket={sock}&tls-certificates={ca}")
    return h


def test_libnbd_over_starttls_and_clients_that_refuse_or_lack_tls(procs):
    sock, tcp, ca, wrong = _tls_served(procs)
    h = _connect(sock, ca)
    assert h.get_tls_negotiated()
    data = os.urandom(3 * MiB + 512)
    h.pwrite(data, 4096)
    h.flush()
    assert h.pread(len(data), 4096) == data
    h.shutdown()
    with pytest.raises(nbd.Error, match="certificate"):  # the client does not trust this certificate
        _connect(sock, wrong, tcp)
    verified = _connect(sock, ca, tcp)  # the same over TCP with the right one: verified (SAN 127.0.0.1)
    assert verified.pread(512, 4096) == data[:512]
    verified.shutdown()
    with pytest.raises(nbd.Error):  # a plain client gets NBD_REP_ERR_TLS_REQD
        _connect(sock, None)
    again = _connect(sock, ca)  # the server took all that in its stride
    assert again.pread(512, 4096) == data[:512]
    again.shutdown()
    assert (procs.tmp / "src" / "vol.img").read_bytes()[4096:4096 + len(data)] == data


@need_qemu
def test_qemu_img_writes_and_reads_over_tls_and_refuses_a_wrong_certificate(procs, tmp_path):
    sock, _, ca, wrong = _tls_served(procs)
    raw = tmp_path / "in.raw"
    raw.write_bytes(os.urandom(4 * MiB))

    def qemu(*args: str, creds: str = ca) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["qemu-img", *args[:1], "--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client",
                               *args[1:]], capture_output=True, text=True, timeout=60, check=False)

    opts = f"driver=nbd,path={sock},export=vol,tls-creds=tls0,tls-hostname=localhost"
    res = qemu("convert", "-n", "-f", "raw", str(raw), "--target-image-opts", opts)
    assert res.returncode == 0, res.stderr
    assert (procs.tmp / "src" / "vol.img").read_bytes()[:4 * MiB] == raw.read_bytes()
    res = qemu("info", "--image-opts", opts)
    assert res.returncode == 0 and "16 MiB" in res.stdout, res.stderr
    res = qemu("info", "--image-opts", opts, creds=wrong)
    assert res.returncode != 0 and "certificate" in res.stderr.lower()


def test_a_target_exports_its_replicas_over_tls(procs):
    dst = str(procs.tmp / "dst")
    procs.run("--data-dir", dst, "keys", "init")
    sock = str(procs.tmp / "replica.sock")
    procs.target("dst", 0, "--nbd", f"unix:{sock}", "--nbd-tls")
    ca = _ca(procs, "dst", "ca")
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.set_opt_mode(True)
    h.connect_uri(f"nbds+unix:///?socket={sock}&tls-certificates={ca}")
    assert h.get_tls_negotiated()
    h.opt_abort()
    with pytest.raises(nbd.Error):
        plain = nbd.NBD()
        plain.set_opt_mode(True)
        plain.connect_uri(f"nbd+unix:///?socket={sock}")
        plain.opt_list(lambda name, desc: 0)
