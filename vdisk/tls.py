"""`vdisk keys init|show|trust|untrust`, and which links are TLS: the policy of the README's "two
sites with keys". Registered into cli.py through ``EXTENSIONS``.

A link between two hosts (any non-loopback address) is TLS unless both sides say ``--insecure``;
on loopback it is plain unless ``--tls``. Keys live in DATA_DIR/keys (mirror/keys.py); a side that
needs TLS and has none creates them on first use, as sshd does with host keys, and says so.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mirror import keys as K
from mirror.secure import SourceTls, TargetTls
from mirror.target import TargetConfig, check_exposure, is_loopback

log = logging.getLogger("vdisk.tls")
TLS_KEYS = ("tls", "insecure", "target_fingerprint", "trust_on_first_use")  # of a mirror section


def site_keys(data_dir: Path, create: bool = True) -> K.SiteKeys:
    """The site's keys; created (and logged) the first time TLS needs them when ``create``."""
    d = K.key_dir(data_dir)
    if create and not (d / K.KEY_FILE).exists() and not (d / K.CERT_FILE).exists():
        fp = K.generate(data_dir)
        log.warning("created this site's TLS key in %s: %s", d, fp)
    return K.load(data_dir)


def wants_tls(host: str, tls: bool, insecure: bool, what: str) -> bool:
    if tls and insecure:
        raise ValueError(f"{what}: --tls and --insecure contradict each other")
    return tls or (not insecure and not is_loopback(host))


def source_tls(section: dict[str, Any], data_dir: Path | None, host: str, port: int,
               psk: bool) -> SourceTls | None:
    """The TLS policy of a mirror section (None: a plain link). ValueError on a bad setting."""
    pin = section.get("target_fingerprint")
    if pin is not None:
        pin = K.parse_fingerprint(str(pin))
    if not wants_tls(host, bool(section.get("tls")), bool(section.get("insecure")), "mirror"):
        if pin is not None or section.get("trust_on_first_use"):
            raise ValueError("--target-fingerprint and --trust-on-first-use need a TLS link "
                             "(the target is on loopback: add --tls)")
        return None
    if data_dir is None:
        return None
    label = f"target={host}:{port}"
    tofu = bool(section.get("trust_on_first_use"))
    if pin is None and not tofu and not psk:
        trusted = K.read_trusted(data_dir)
        if not trusted.pins_for(label) and not trusted.anywhere():
            raise ValueError(f"the link to {host}:{port} is TLS: say how to recognise the target: "
                             "--target-fingerprint SHA256:... (`vdisk keys show` there), --trust-on-first-use "
                             "or --psk-file")
    return SourceTls(site_keys(data_dir), Path(data_dir), label, pin, tofu, psk)


def target_tls(args: argparse.Namespace, data_dir: Path, host: str, psk: bool) -> TargetTls | None:
    if not wants_tls(host, args.tls, args.insecure, "target"):
        if args.trust_on_first_use:
            raise ValueError("--trust-on-first-use needs TLS (on loopback add --tls)")
        return None
    if not is_loopback(host) and not (psk or args.trust_on_first_use or K.read_trusted(data_dir).anywhere()):
        check_exposure(host, TargetConfig())  # refuses beyond loopback, before any key is made
    keys = site_keys(data_dir)
    tls = TargetTls(keys, Path(data_dir), bool(args.trust_on_first_use), psk)
    tls.open_ = is_loopback(host) and not tls.can_authenticate()
    return tls


def describe_tls(section: dict[str, Any]) -> str:
    """The link security a mirror section asks for, in words (', TLS, target SHA256:...')."""
    if section.get("insecure"):
        return ", plain link (--insecure)"
    words = ", TLS" if section.get("tls") else ""
    if section.get("target_fingerprint"):
        words = f", TLS, target {section['target_fingerprint']}"
    elif section.get("trust_on_first_use"):
        words = ", TLS, trust on first use"
    return words


def tls_status(config: Any) -> dict[str, Any] | None:
    """The ``tls`` field of a mirror's status: null for a plain link."""
    tls = getattr(config, "tls", None)
    if tls is None:
        return None
    return {"target_fingerprint": tls.verified, "pinned": tls.pin, "trust_on_first_use": tls.tofu, "psk": tls.psk}


def nbd_context(data_dir: Path) -> ssl.SSLContext:
    """The NBD server's TLS context: the site's certificate (clients take it as its own CA)."""
    from blockdev.tls import server_context

    keys = site_keys(data_dir)
    return server_context(str(keys.cert_file), str(keys.key_file))


# -- commands --------------------------------------------------------------------------------------
def _data_dir(args: argparse.Namespace) -> Path:
    from .cli import store_of

    return store_of(args).root


def cmd_keys_init(args: argparse.Namespace) -> int:
    from .cli import emit

    root = _data_dir(args)
    fp = K.generate(root, force=args.force, days=args.days)
    d = K.key_dir(root)
    emit(args, {"fingerprint": fp, "cert": str(d / K.CERT_FILE), "key": str(d / K.KEY_FILE)},
         f"{'replaced' if args.force else 'created'} this site's key in {d}\n{fp}")
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    from .cli import emit

    root = _data_dir(args)
    keys = K.load(root)
    start, end = K.cert_validity(keys.cert_der)
    trusted = K.read_trusted(root)
    out = {"fingerprint": keys.fingerprint, "cert": str(keys.cert_file), "key": str(keys.key_file),
           "not_before": start.isoformat(), "not_after": end.isoformat(),
           "trusted": [{"fingerprint": fp, "label": label} for fp, label in trusted.entries]}
    lines = [keys.fingerprint] if args.quiet else [
        f"{keys.fingerprint}  (certificate {keys.cert_file}, valid until {end:%Y-%m-%d})"]
    if not args.quiet:
        days = (end - dt.datetime.now(dt.UTC)).days
        if days < 30:
            lines.append(f"warning: the certificate expires in {days} days (`vdisk keys init --force`)")
        lines += [f"trusted {fp}{'  ' + label if label else ''}" for fp, label in trusted.entries] or \
            ["trusted: none"]
    emit(args, out, "\n".join(lines))
    return 0


def cmd_keys_trust(args: argparse.Namespace) -> int:
    from .cli import emit

    root = _data_dir(args)
    fp = K.parse_fingerprint(args.fingerprint)
    label = f"target={args.target}" if args.target else ""
    if args.target:
        from .mirroring import parse_hostport

        host, port = parse_hostport(args.target, need_host=True)
        label = f"target={host}:{port}"
    added = K.add_trusted(root, fp, label, args.comment or "")
    emit(args, {"fingerprint": fp, "label": label, "added": added},
         f"{'trusted' if added else 'already trusted'}: {fp}{' for ' + label[7:] if label else ''}")
    return 0


def cmd_keys_untrust(args: argparse.Namespace) -> int:
    from .cli import emit

    root = _data_dir(args)
    n = K.remove_trusted(root, args.fingerprint)
    if not n:
        raise ValueError(f"{args.fingerprint} is not in {K.key_dir(root) / K.TRUSTED_FILE}")
    emit(args, {"fingerprint": args.fingerprint, "removed": n}, f"no longer trusted: {args.fingerprint}")
    return 0


def add_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register `keys init|show|trust|untrust` (called by vdisk.cli.build_parser)."""
    from .cli import count_arg

    sp = add("keys", lambda a: 0, "this site's TLS key, certificate and trusted peers (DATA_DIR/keys)")
    sub = sp.add_subparsers(dest="keys_command", required=True, metavar="init|show|trust|untrust")

    def sub_add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=fn)
        p.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS,
                       help="the site's data directory (default: $VDISK_HOME or ~/.local/share/vdisk)")
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
        return p

    p = sub_add("init", cmd_keys_init, "create the site's key pair and self-signed certificate (mode 0600)")
    p.add_argument("--force", action="store_true", help="replace existing keys (peers must pin the new fingerprint)")
    p.add_argument("--days", type=count_arg, default=K.DEFAULT_DAYS, help="certificate validity (default 3650)")
    p = sub_add("show", cmd_keys_show, "print the site's fingerprint (SHA256 of its certificate) and trusted peers")
    p.add_argument("-q", "--quiet", action="store_true", help="the fingerprint only")
    p = sub_add("trust", cmd_keys_trust, "trust a peer's fingerprint (a source, on a target; or a target, "
                "on a source, with --target)")
    p.add_argument("fingerprint", metavar="SHA256:...")
    p.add_argument("--target", metavar="HOST:PORT", help="pin it for this target only (as trust on first use does)")
    p.add_argument("--comment", help="a note kept on the line")
    p = sub_add("untrust", cmd_keys_untrust, "remove a fingerprint from the trusted file")
    p.add_argument("fingerprint", metavar="SHA256:...")
