"""A site's key pair, its self-signed certificate and the fingerprints it trusts: keys the ssh way.

Files in DATA_DIR/keys/: ``key.pem`` (EC P-256 private key, mode 0600), ``cert.pem`` (self-signed,
CA:TRUE so TLS clients such as qemu and libnbd can take it as its own CA) and ``trusted`` (one
fingerprint per line, then an optional label; ``#`` starts a comment). A fingerprint is
``SHA256:`` + unpadded base64 of the SHA-256 of the certificate (DER), as ssh prints keys.

A label ``target=HOST:PORT`` pins that target (a source refuses any other certificate there: a
rotated key must be pinned again); unlabelled lines and ``source=...`` lines are peers trusted
anywhere. P-256 rather than Ed25519: every TLS stack a client may use (GnuTLS in qemu) takes it.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEY_DIR = "keys"
KEY_FILE, CERT_FILE, TRUSTED_FILE = "key.pem", "cert.pem", "trusted"
DEFAULT_DAYS = 3650
FP_RE = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
MAX_TRUSTED = 1 << 20


class KeyFileError(ValueError):
    """A key, certificate or trusted file problem, as a one-line message."""


def fingerprint(cert_der: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(cert_der).digest()).decode().rstrip("=")


def parse_fingerprint(text: str) -> str:
    """A fingerprint as the user typed it (``SHA256:...``); ValueError otherwise."""
    text = text.strip()
    if not FP_RE.fullmatch(text):
        raise ValueError(f"bad fingerprint {text!r}: expected SHA256: and 43 base64 characters "
                         "(as `vdisk keys show` prints it)")
    return text


def key_dir(data_dir: Path) -> Path:
    return Path(data_dir) / KEY_DIR


def _x509():  # imported on use: only TLS links and `vdisk keys` need the cryptography package
    from cryptography import x509
    return x509


def generate(data_dir: Path, force: bool = False, days: int = DEFAULT_DAYS,
             not_before: dt.datetime | None = None) -> str:
    """Create the site's key pair and certificate; the fingerprint. Refuses to overwrite unless ``force``."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    x509 = _x509()
    d = key_dir(data_dir)
    if (d / KEY_FILE).exists() and not force:
        raise KeyFileError(f"{d / KEY_FILE} exists: this site has keys (`vdisk keys show`; --force replaces them, "
                        "and every peer that pinned the old fingerprint must pin the new one)")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname() or "localhost"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"vdisk {host}")])
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    import ipaddress
    sans: list = [x509.DNSName(host), x509.DNSName("localhost"),
                  x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(key, hashes.SHA256()))
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write_private(d / KEY_FILE, pem_key)
    _write_private(d / CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def cert_validity(cert_der: bytes) -> tuple[dt.datetime, dt.datetime]:
    cert = _x509().load_der_x509_certificate(cert_der)
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def check_validity(cert_der: bytes, whose: str, now: dt.datetime | None = None) -> None:
    """Refuse an expired (or not yet valid) certificate, naming ``whose`` it is."""
    try:
        start, end = cert_validity(cert_der)
    except ValueError:
        raise KeyFileError(f"{whose} certificate cannot be parsed") from None
    now = now or dt.datetime.now(dt.UTC)
    if now > end:
        raise KeyFileError(f"{whose} certificate {fingerprint(cert_der)} expired on {end:%Y-%m-%d %H:%M} UTC "
                        "(run `vdisk keys init --force` there and pin the new fingerprint)")
    if now < start:
        raise KeyFileError(f"{whose} certificate {fingerprint(cert_der)} is not valid before {start:%Y-%m-%d %H:%M} "
                        "UTC (check the clocks)")


@dataclass(frozen=True)
class SiteKeys:
    """The site's certificate and key files, loaded and checked once."""

    cert_file: Path
    key_file: Path
    cert_der: bytes
    private_key: Any = field(default=None, compare=False, repr=False)  # loaded once (rotation: restart)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_der)

    def sign(self, message: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        key = self.private_key or serialization.load_pem_private_key(self.key_file.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyFileError(f"{self.key_file}: not an EC P-256 key")
        return key.sign(message, ec.ECDSA(hashes.SHA256()))


def load(data_dir: Path) -> SiteKeys:
    """The site's keys; a one-line error naming the fix when they are missing or unusable."""
    d = key_dir(data_dir)
    key_file, cert_file = d / KEY_FILE, d / CERT_FILE
    if not key_file.exists() or not cert_file.exists():
        raise KeyFileError(f"no TLS keys in {d}: run `vdisk keys init --data-dir {data_dir}`")
    try:
        st = key_file.stat()
        if st.st_mode & 0o077:
            raise KeyFileError(f"the private key {key_file} is accessible by group or others (mode "
                            f"{st.st_mode & 0o777:04o}): run `chmod 600 {key_file}`")
        from cryptography.hazmat.primitives import serialization
        cert = _x509().load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    except OSError as e:
        raise KeyFileError(f"cannot read the keys in {d}: {e.strerror or e}") from None
    except ValueError as e:
        raise KeyFileError(f"unusable key or certificate in {d}: {e}") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise KeyFileError(f"{cert_file} does not belong to {key_file} (run `vdisk keys init --force`)")
    der = cert.public_bytes(serialization.Encoding.DER)
    check_validity(der, "this site's")
    return SiteKeys(cert_file, key_file, der, key)


def verify_signature(cert_der: bytes, signature: bytes, message: bytes) -> bool:
    """True if ``signature`` over ``message`` was made by the key of ``cert_der`` (ECDSA P-256)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    try:
        pub = _x509().load_der_x509_certificate(cert_der).public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            return False
        pub.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ValueError):
        return False


# -- the trusted file -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Trusted:
    """Lines of the trusted file: (fingerprint, label)."""

    entries: tuple[tuple[str, str], ...]

    def pins_for(self, label: str) -> set[str]:
        return {fp for fp, lab in self.entries if lab == label}

    def anywhere(self) -> set[str]:
        return {fp for fp, lab in self.entries if not lab.startswith("target=")}

    def __contains__(self, fp: object) -> bool:
        return any(fp == f for f, _ in self.entries)


def read_trusted(data_dir: Path) -> Trusted:
    path = key_dir(data_dir) / TRUSTED_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TRUSTED + 1)
    except FileNotFoundError:
        return Trusted(())
    except OSError as e:
        raise KeyFileError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) > MAX_TRUSTED:
        raise KeyFileError(f"{path} is too large (at most {MAX_TRUSTED} bytes)")
    out = []
    for no, line in enumerate(raw.decode(errors="replace").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fp, _, label = line.partition(" ")
        if not FP_RE.fullmatch(fp):
            raise KeyFileError(f"{path}:{no}: not a fingerprint: {fp!r} (expected SHA256:...)")
        out.append((fp, label.strip()))
    return Trusted(tuple(out))


def add_trusted(data_dir: Path, fp: str, label: str = "", note: str = "") -> bool:
    """Append ``fp`` (with its label) unless that line is there; True if added."""
    fp = parse_fingerprint(fp)
    if label and (" " in label or "#" in label):
        raise ValueError(f"bad label {label!r}: no spaces or '#'")
    if (fp, label) in read_trusted(data_dir).entries:
        return False
    d = key_dir(data_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    line = " ".join(x for x in (fp, label) if x) + (f"  # {note}" if note else "") + "\n"
    fd = os.open(d / TRUSTED_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def remove_trusted(data_dir: Path, fp: str) -> int:
    """Drop every line of ``fp``; how many."""
    fp = parse_fingerprint(fp)
    path = key_dir(data_dir) / TRUSTED_FILE
    if not path.exists():
        return 0
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    keep = [ln for ln in lines if ln.split("#", 1)[0].split(" ", 1)[0].strip() != fp]
    if len(keep) != len(lines):
        _write_private(path, "".join(keep).encode(), mode=0o644)
    return len(lines) - len(keep)
