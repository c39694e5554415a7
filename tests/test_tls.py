"""TLS on the replication link end to end: real daemons on loopback with --tls, relays in between."""
from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import time

import pytest

from mirror import keys as K
from tests.mirror_procs import Procs
from tests.tls_relay import Relay, TlsMitm

nbd = pytest.importorskip("nbd") if not os.environ.get("CI") else __import__("nbd")
MiB = 1 << 20
PATTERN = b"vdisk-tls-known-pattern-0123456789" * 31  # 1054 bytes, written many times


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.kill_all()


def keys(procs: Procs, data: str) -> str:
    return procs.run("--data-dir", str(procs.tmp / data), "keys", "init").stdout.split()[-1]


def two_sites(procs: Procs, trust_source: bool = True, target_args: tuple[str, ...] = ()) -> tuple[str, str, int]:
    """Keys on both sites, the source trusted by a --tls target; (source fp, target fp, target port)."""
    sfp, tfp = keys(procs, "src"), keys(procs, "dst")
    if trust_source:
        procs.run("--data-dir", str(procs.tmp / "dst"), "keys", "trust", sfp)
    _, port = procs.target("dst", 0, "--tls", *target_args)
    return sfp, tfp, port


def psk_file(tmp_path) -> str:  # type: ignore[no-untyped-def]
    psk = tmp_path / "psk"
    psk.write_text("a shared secret of some length\n")
    psk.chmod(0o600)
    return str(psk)


def serve(procs: Procs, size: str = "32M") -> str:
    procs.run("--data-dir", str(procs.tmp / "src"), "create", "vol", "--size", size)
    return procs.serve("src", "vol")[1]


def mirror(procs: Procs, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return procs.run("--data-dir", str(procs.tmp / "src"), "mirror", "vol", "--mode", "sync", "--timeout", "3",
                     *args, check=check)


def write(sock: str, data: bytes, offset: int = 0) -> None:
    h = nbd.NBD()
    h.connect_unix(sock)
    h.pwrite(data, offset)
    h.flush()
    h.shutdown()


def wait_reason(procs: Procs, words: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    st: dict = {}
    while time.monotonic() < deadline:
        st = procs.status("src", "vol") or {}
        if words in str((st.get("link") or {}).get("reason")):
            return st
        time.sleep(0.1)
    raise AssertionError(f"status never said {words!r}: {st}")


def wait_log(procs: Procs, log: str, words: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = (procs.tmp / log).read_text(errors="replace")
        if words in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{log} never said {words!r}:\n{text[-3000:]}")


def images_equal(procs: Procs) -> bool:
    return (procs.tmp / "src" / "vol.img").read_bytes() == (procs.tmp / "dst" / "vol.img").read_bytes()


def test_keys_init_show_trust_and_rotate(procs, tmp_path):
    fp = keys(procs, "site")
    d = tmp_path / "site" / "keys"
    assert (d / "key.pem").stat().st_mode & 0o777 == 0o600
    shown = procs.run("--data-dir", str(tmp_path / "site"), "keys", "show", "-q").stdout.strip()
    assert shown == fp and K.FP_RE.fullmatch(fp)
    # The same digest as openssl's fingerprint of the certificate (hex there, base64 here).
    out = subprocess.run(["openssl", "x509", "-in", str(d / "cert.pem"), "-noout", "-fingerprint", "-sha256"],
                         capture_output=True, text=True, check=True).stdout
    import base64
    hexfp = out.strip().split("=", 1)[1].replace(":", "")
    assert base64.b64encode(bytes.fromhex(hexfp)).decode().rstrip("=") == fp[7:]
    again = procs.run("--data-dir", str(tmp_path / "site"), "keys", "init", check=False)
    assert again.returncode == 1 and "--force" in again.stderr and len(again.stderr.splitlines()) == 1
    rotated = procs.run("--data-dir", str(tmp_path / "site"), "keys", "init", "--force").stdout.split()[-1]
    assert rotated != fp
    bad = procs.run("--data-dir", str(tmp_path / "site"), "keys", "trust", "SHA256:nope", check=False)
    assert bad.returncode == 1 and "bad fingerprint" in bad.stderr
    os.chmod(d / "key.pem", 0o644)
    loose = procs.run("--data-dir", str(tmp_path / "site"), "keys", "show", check=False)
    assert loose.returncode == 1 and "chmod 600" in loose.stderr


def test_a_passive_observer_sees_no_plaintext_and_the_replica_has_it(procs):
    _, tfp, port = two_sites(procs)
    sock = serve(procs)
    relay = Relay(("127.0.0.1", port))
    try:
        mirror(procs, "--to", f"127.0.0.1:{relay.port}", "--tls", "--target-fingerprint", tfp)
        st = procs.wait_state("src", "vol", "in_sync")
        assert st["tls"] == {"target_fingerprint": tfp, "pinned": tfp, "trust_on_first_use": False, "psk": False}
        write(sock, PATTERN * 4000, 1 * MiB)  # 4 MiB of a known pattern
        procs.wait_state("src", "vol", "in_sync")
        assert PATTERN in (procs.tmp / "dst" / "vol.img").read_bytes()
        wire = b"".join(relay.seen)
        assert len(wire) > 4 * MiB and wire[0] == 0x16  # a TLS ClientHello first
        assert PATTERN[:16] not in wire and b'"volume_uuid"' not in wire  # neither data nor the Hello's JSON
    finally:
        relay.close()


def test_a_relay_with_its_own_certificate_is_refused_pinned_or_by_psk(procs, tmp_path):
    psk = psk_file(tmp_path)
    _, tfp, port = two_sites(procs, target_args=("--psk-file", psk))
    sock = serve(procs)
    keys(procs, "mitm")
    mitm = TlsMitm(("127.0.0.1", port), str(tmp_path / "mitm/keys/cert.pem"), str(tmp_path / "mitm/keys/key.pem"))
    try:
        mirror(procs, "--to", f"127.0.0.1:{mitm.port}", "--tls", "--target-fingerprint", tfp, "--psk-file", psk)
        st = wait_reason(procs, "not the pinned")
        assert st["state"] != "in_sync"
        # With a PSK and no pin at all, the PSK proof is bound to the certificate the source saw.
        mirror(procs, "--target-fingerprint", "none")
        wait_reason(procs, "relay holds another certificate")
        assert mitm.handshakes >= 2
        write(sock, PATTERN * 10)
        assert not (procs.tmp / "dst" / "vol.img").exists()  # nothing got through: no replica at all
    finally:
        mitm.close()


def test_a_psk_alone_authenticates_both_sides_over_tls(procs, tmp_path):
    psk = psk_file(tmp_path)
    keys(procs, "src")  # no fingerprint exchanged, nobody trusted: only the key
    _, port = procs.target("dst", 0, "--tls", "--psk-file", psk)
    sock = serve(procs)
    mirror(procs, "--to", f"127.0.0.1:{port}", "--tls", "--psk-file", psk)
    procs.wait_state("src", "vol", "in_sync")
    write(sock, PATTERN * 100)
    procs.wait_state("src", "vol", "in_sync")
    assert images_equal(procs)


def test_a_flipped_bit_in_a_record_is_detected_and_the_link_resumes(procs):
    _, tfp, port = two_sites(procs)
    sock = serve(procs)
    flipped = []

    def flip(conn: int, offset: int, chunk: bytes) -> bytes:
        if conn == 0 and not flipped and offset > 256 << 10:
            flipped.append(offset)
            b = bytearray(chunk)
            b[len(b) // 2] ^= 0x10
            return bytes(b)
        return chunk

    relay = Relay(("127.0.0.1", port), tamper=flip)
    try:
        mirror(procs, "--to", f"127.0.0.1:{relay.port}", "--tls", "--target-fingerprint", tfp)
        procs.wait_state("src", "vol", "in_sync")
        data = os.urandom(8 * MiB)
        write(sock, data, 4 * MiB)
        assert flipped
        wait_log(procs, "target.log", "bad record mac")
        procs.wait_state("src", "vol", "in_sync", timeout=40)
        assert len(relay.seen) >= 2  # it reconnected
        assert images_equal(procs)
        res = procs.run("--data-dir", str(procs.tmp / "src"), "verify", "vol")
        assert "no differences" in res.stdout
    finally:
        relay.close()


def test_tls_and_plain_mismatch_is_refused_with_the_reason_on_both_sides(procs):
    keys(procs, "src")
    _, plain_port = procs.target("dst", 0)
    sock = serve(procs)
    mirror(procs, "--to", f"127.0.0.1:{plain_port}", "--tls", "--trust-on-first-use")
    wait_reason(procs, "this target does not use TLS")
    wait_log(procs, "target.log", "refused a TLS connection")
    keys(procs, "dst2")
    _, line = procs.start("--data-dir", str(procs.tmp / "dst2"), "target", "--listen", "127.0.0.1:0", "--tls",
                          log="target2.log", ready=r"target listening on tcp:127\.0\.0\.1:\d+")
    tls_port = int(line.rsplit(":", 1)[1])
    mirror(procs, "--to", f"127.0.0.1:{tls_port}", "--no-tls", "--no-trust-on-first-use")
    assert wait_reason(procs, "this target requires TLS")["tls"] is None  # a plain link
    wait_log(procs, "target2.log", "refused a plain connection")
    line = procs.run("--data-dir", str(procs.tmp / "src"), "status").stdout
    assert "this target requires TLS" in line
    write(sock, PATTERN)  # the volume is served all along; the writes wait in the dirty map


def test_wrong_missing_and_rotated_keys(procs, tmp_path):
    sfp, tfp, port = two_sites(procs, trust_source=False)
    serve(procs)
    # The target does not know this source (its trusted file is empty, no PSK, no TOFU... but on
    # loopback an empty trusted file means "anyone": so trust somebody else to make it strict).
    procs.run("--data-dir", str(tmp_path / "dst"), "keys", "trust", tfp, "--comment", "someone else")
    mirror(procs, "--to", f"127.0.0.1:{port}", "--tls", "--target-fingerprint", tfp)
    wait_reason(procs, f"the source's certificate {sfp} is not trusted")
    wait_log(procs, "target.log", "is not trusted by this target")
    procs.run("--data-dir", str(tmp_path / "dst"), "keys", "trust", sfp)
    procs.wait_state("src", "vol", "in_sync", timeout=30)
    # No pin, no TOFU, no PSK, nothing trusted: refused at once, saying how to recognise the target.
    res = mirror(procs, "--target-fingerprint", "none", check=False)
    assert res.returncode == 1 and "--trust-on-first-use" in res.stderr and len(res.stderr.splitlines()) == 1
    # Trust on first use records the target for this address; then the target's key rotates.
    mirror(procs, "--target-fingerprint", "none", "--trust-on-first-use")
    procs.wait_state("src", "vol", "in_sync", timeout=30)
    assert K.read_trusted(tmp_path / "src").pins_for(f"target=127.0.0.1:{port}") == {tfp}
    assert "trusting the target" in (tmp_path / "serve.log").read_text()
    tgt = procs.procs[0]
    procs.kill9(tgt)
    new = procs.run("--data-dir", str(tmp_path / "dst"), "keys", "init", "--force").stdout.split()[-1]
    procs.target("dst", port, "--tls")
    wait_reason(procs, "not the one recorded")
    mirror(procs, "--target-fingerprint", new)  # the operator checked the new fingerprint
    procs.wait_state("src", "vol", "in_sync", timeout=30)


def test_an_expired_source_certificate_is_refused(procs, tmp_path):
    tfp = keys(procs, "dst")
    K.generate(tmp_path / "src", days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    cert = (tmp_path / "src/keys/cert.pem").read_bytes()
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    sfp = K.fingerprint(x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER))
    procs.run("--data-dir", str(tmp_path / "dst"), "keys", "trust", sfp)
    procs.run("--data-dir", str(tmp_path / "src"), "create", "vol", "--size", "8M")
    res = mirror(procs, "--to", "127.0.0.1:9", "--tls", "--target-fingerprint", tfp, check=False)
    assert res.returncode == 1 and "this site's certificate" in res.stderr and "expired" in res.stderr


def test_beyond_loopback_the_link_is_tls_unless_both_sides_say_insecure():
    from vdisk.tls import wants_tls

    assert wants_tls("192.0.2.1", False, False, "mirror")
    assert not wants_tls("192.0.2.1", False, True, "mirror")
    assert not wants_tls("127.0.0.1", False, False, "mirror")
    assert wants_tls("127.0.0.1", True, False, "mirror")
    with pytest.raises(ValueError, match="contradict"):
        wants_tls("127.0.0.1", True, True, "mirror")


def test_the_target_refuses_an_expired_or_unsigned_source_certificate(tmp_path):
    from mirror.secure import TargetTls
    from mirror.wire.errors import AuthError

    K.generate(tmp_path / "old", days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    d = K.key_dir(tmp_path / "old")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate((d / K.CERT_FILE).read_bytes()).public_bytes(serialization.Encoding.DER)
    old = K.SiteKeys(d / K.CERT_FILE, d / K.KEY_FILE, der)
    K.generate(tmp_path / "dst")
    policy = TargetTls(K.load(tmp_path / "dst"), tmp_path / "dst", psk=True)  # a PSK: any valid certificate
    msg = b"binding and nonces"
    with pytest.raises(AuthError, match="expired"):
        policy.check_source(der, old.sign(msg), msg, "peer")
    K.generate(tmp_path / "src")
    src = K.load(tmp_path / "src")
    policy.check_source(src.cert_der, src.sign(msg), msg, "peer")
    with pytest.raises(AuthError, match="signature does not match"):
        policy.check_source(src.cert_der, src.sign(msg), msg + b"x", "peer")
    with pytest.raises(AuthError, match="no certificate"):
        policy.check_source(b"", b"", msg, "peer")


def _conns(binding_s: bytes, binding_t: bytes, psk: bytes | None, signer=None, check=None):  # type: ignore[no-untyped-def]
    from mirror.wire.connection import Connection, Role
    from mirror.wire.events import Hello

    src = Connection(Role.SOURCE, psk, binding=binding_s, signer=signer)
    tgt = Connection(Role.TARGET, psk, binding=binding_t, check_source=check)
    src.start(Hello(1, "0b0e5d4e-6a43-4f0e-9d57-6d2a7f1c1e11", "vol", 1 << 20, 4096, 1, b"", "sync", ()))
    return src, tgt


def _move(a, b):  # type: ignore[no-untyped-def]
    b.receive_data(a.data_to_send())
    return b.next_events()


def test_psk_proofs_and_the_source_signature_are_bound_to_the_certificate_the_source_saw(tmp_path):
    from mirror.wire.errors import AuthError
    from mirror.wire.events import Hello

    K.generate(tmp_path / "src")
    keys_ = K.load(tmp_path / "src")
    seen: list[bytes] = []

    def check(cert: bytes, sig: bytes, message: bytes) -> None:
        if not K.verify_signature(cert, sig, message):
            raise AuthError("authentication failed: bad signature")
        seen.append(cert)

    def sign(message: bytes) -> tuple[bytes, bytes]:
        return keys_.cert_der, keys_.sign(message)

    # Same binding on both sides: PSK proofs and the signature check out.
    src, tgt = _conns(b"T" * 32, b"T" * 32, b"a key of 16 bytes!", sign, check)
    _move(src, tgt)
    _move(tgt, src)
    evs = _move(src, tgt)
    assert isinstance(evs[0], Hello) and seen == [keys_.cert_der]
    # A relay's certificate: the source's binding differs, the target's PSK proof fails at the source.
    src, tgt = _conns(b"M" * 32, b"T" * 32, b"a key of 16 bytes!")
    _move(src, tgt)
    with pytest.raises(AuthError, match="relay holds another certificate"):
        _move(tgt, src)
    # Without a PSK the signature catches it: signed over the relay's binding, checked over the target's.
    src, tgt = _conns(b"M" * 32, b"T" * 32, None, sign, check)
    _move(src, tgt)
    _move(tgt, src)
    with pytest.raises(AuthError, match="bad signature"):
        _move(src, tgt)


def test_an_async_mirror_ships_over_tls_and_a_live_rate_change_keeps_the_link(procs):
    _, tfp, port = two_sites(procs)
    sock = serve(procs)
    relay = Relay(("127.0.0.1", port))
    try:
        procs.run("--data-dir", str(procs.tmp / "src"), "mirror", "vol", "--to", f"127.0.0.1:{relay.port}", "--mode",
                  "async", "--tls", "--target-fingerprint", tfp, "--checkpoint-interval", "1s", "--timeout", "3")
        procs.wait_state("src", "vol", "in_sync", timeout=30)
        write(sock, PATTERN * 2000, 2 * MiB)
        procs.run("--data-dir", str(procs.tmp / "src"), "throttle", "vol", "--rate", "100MB/s")
        procs.wait_state("src", "vol", "in_sync", timeout=30)
        assert images_equal(procs)
        assert len(relay.seen) == 1 and PATTERN[:16] not in relay.seen[0]  # one link, encrypted
    finally:
        relay.close()


def test_a_target_trusts_its_first_source_on_first_use_and_refuses_the_next(tmp_path):
    from mirror.secure import TargetTls
    from mirror.wire.errors import AuthError

    for site in ("dst", "a", "b"):
        K.generate(tmp_path / site)
    a, b = K.load(tmp_path / "a"), K.load(tmp_path / "b")
    policy = TargetTls(K.load(tmp_path / "dst"), tmp_path / "dst", tofu=True)
    assert policy.can_authenticate()
    msg = b"binding and nonces"
    policy.check_source(a.cert_der, a.sign(msg), msg, "10.0.0.1:4000")
    assert K.read_trusted(tmp_path / "dst").anywhere() == {a.fingerprint}
    policy.check_source(a.cert_der, a.sign(msg), msg, "10.0.0.1:4001")  # known now
    with pytest.raises(AuthError, match=re.escape(f"{b.fingerprint} is not trusted")):
        policy.check_source(b.cert_der, b.sign(msg), msg, "10.0.0.2:4000")
    assert "trust on first use" in (K.key_dir(tmp_path / "dst") / K.TRUSTED_FILE).read_text()


def _host_address() -> str | None:
    """A non-loopback address of this host (the source of the default route), or None."""
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # no packet is sent: it only picks the route
        addr = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if addr.startswith("127.") else addr


def test_between_hosts_tls_is_the_default_on_both_sides(procs):
    addr = _host_address()
    if addr is None:
        pytest.skip("this host has no non-loopback address")
    sfp, tfp = keys(procs, "src"), keys(procs, "dst")
    procs.run("--data-dir", str(procs.tmp / "dst"), "keys", "trust", sfp)
    _, line = procs.start("--data-dir", str(procs.tmp / "dst"), "target", "--listen", "0.0.0.0:0", "-v",
                          log="target.log", ready=r"target listening on tcp:0\.0\.0\.0:\d+ \(TLS, SHA256:")
    port = int(line.split(":")[-2].split()[0])
    sock = serve(procs)
    mirror(procs, "--to", f"{addr}:{port}", "--target-fingerprint", tfp)  # no --tls: the default
    procs.wait_state("src", "vol", "in_sync", timeout=30)
    write(sock, PATTERN * 100)
    procs.wait_state("src", "vol", "in_sync")
    assert images_equal(procs)
    # A plain source (--insecure on its side only) is refused: both sides must say so.
    mirror(procs, "--insecure", "--target-fingerprint", "none")
    wait_reason(procs, "this target requires TLS")
