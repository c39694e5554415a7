#!/usr/bin/env python3
"""WAN data reduction benchmark (issue 16): three VM clones over a shaped 2 Mbit/s line.

Two network namespaces joined by a veth pair shaped with ``tc ... tbf rate RATE`` on both ends, and
a small userspace proxy in the source namespace adding RTT/2 each way. The workload: an ext4 template
image built with ``mkfs.ext4 -d`` from a copy of part of this machine's /usr, and three clones of it,
each with some MiB of its own (a log, host keys, a cache), written through NBD (nbdcopy) into three
async-mirrored volumes of one `vdisk serve`, one after the other as fast as the host takes them.

Reported: time until all three replicas are in sync (and byte-identical), wire bytes (the mirror's
own count and the veth's), effective multiple = logical bytes written / (link rate x time), and in
the same run: raw transfer time at line rate, ``zstd -19 --long`` of the three clones, rsync -az of
the three image files to an empty directory across the same link, and the information limit
(``zstd -19 --long`` of clone 1 + ``zstd -19`` of the 4 KiB blocks of clones 2 and 3 found in no
earlier clone).

    .venv/bin/python scripts/bench_wan.py [--image 1G] [--data 32M] [--unique 4M] [--rate 2mbit]
                                          [--rtt 40] [--buffer-size 10G] [--no-rsync] [--json]

Needs root (namespaces, tc), nbdcopy, mkfs.ext4/debugfs, zstd and rsync. Everything it starts and
creates (namespaces, processes, the work directory) is removed at the end, also on failure.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import blake3

from tests.mirror_procs import Procs
from vdisk.units import parse_rate, parse_size

NS_SRC, NS_DST = "vdw-src", "vdw-dst"
IP_SRC, IP_DST = "10.233.0.1", "10.233.0.2"
TARGET_PORT, RSYNC_PORT, PROXY_PORT, RSYNC_PROXY_PORT = 7411, 8873, 17411, 18873
BLOCK = 4096
MiB = 1 << 20


def sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, text=True, capture_output=True, **kw)


def in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


# -- the link ---------------------------------------------------------------------------------------
def link_up(rate: str) -> None:
    link_down()
    sh("ip", "netns", "add", NS_SRC)
    sh("ip", "netns", "add", NS_DST)
    sh("ip", "link", "add", "vdw-a", "type", "veth", "peer", "name", "vdw-b")
    sh("ip", "link", "set", "vdw-a", "netns", NS_SRC)
    sh("ip", "link", "set", "vdw-b", "netns", NS_DST)
    for ns, dev, ip in ((NS_SRC, "vdw-a", IP_SRC), (NS_DST, "vdw-b", IP_DST)):
        sh(*in_ns(ns, "ip", "addr", "add", f"{ip}/24", "dev", dev))
        sh(*in_ns(ns, "ip", "link", "set", dev, "up"))
        sh(*in_ns(ns, "ip", "link", "set", "lo", "up"))
        sh(*in_ns(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "32kbit",
                  "latency", "400ms"))


def link_down() -> None:
    for ns in (NS_SRC, NS_DST):
        sh("ip", "netns", "del", ns, check=False)


def tx_bytes() -> int:
    out = sh(*in_ns(NS_SRC, "cat", "/sys/class/net/vdw-a/statistics/tx_bytes")).stdout
    return int(out.strip())


PROXY_CODE = r"""
import socket, sys, threading, time
from collections import deque
listen_port, host, port, delay = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
LIMIT = 64 << 10
def pump(a, b):
    q, cond, done, queued = deque(), threading.Condition(), [False], [0]
    def writer():
        while True:
            with cond:
                while not q and not done[0]:
                    cond.wait()
                if not q:
                    break
                t, data = q.popleft()
                queued[0] -= len(data)
                cond.notify_all()
            wait = t + delay - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                b.sendall(data)
            except OSError:
                break
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    w = threading.Thread(target=writer, daemon=True)
    w.start()
    while True:
        try:
            data = a.recv(1 << 16)
        except OSError:
            data = b""
        with cond:
            if not data:
                done[0] = True
                cond.notify()
                break
            q.append((time.monotonic(), data))
            queued[0] += len(data)
            cond.notify()
            # A real path buffers little: the sender's TCP feels the link, not this proxy.
            while queued[0] > LIMIT and not done[0]:
                cond.wait()
    w.join()
# Small buffers everywhere: a real path holds little, so the sender's TCP feels the link (its acks
# pace it), not a proxy that would swallow megabytes and delay a keep-alive behind them.
def small(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.IPPROTO_TCP, 25, 16 << 10)  # TCP_NOTSENT_LOWAT
lst = socket.socket()
lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
small(lst)
lst.bind(("127.0.0.1", listen_port))
lst.listen(16)
print("ready", flush=True)
while True:
    c, _ = lst.accept()
    small(c)
    s = socket.socket()
    small(s)
    s.connect((host, port))
    threading.Thread(target=pump, args=(c, s), daemon=True).start()
    threading.Thread(target=pump, args=(s, c), daemon=True).start()
"""


def start_proxy(procs: list[subprocess.Popen], listen: int, port: int, delay: float) -> None:
    p = subprocess.Popen(in_ns(NS_SRC, sys.executable, "-c", PROXY_CODE, str(listen), IP_DST, str(port), str(delay)),
                         stdout=subprocess.PIPE, text=True)
    procs.append(p)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"


# -- the workload -----------------------------------------------------------------------------------
def build_tree(dest: Path, budget: int) -> int:
    """Copy regular files from this machine's /usr until ``budget`` bytes (deterministic order)."""
    total = 0
    for top in ("/usr/share/doc", "/usr/lib/python3", "/usr/share/perl", "/usr/bin", "/usr/lib/x86_64-linux-gnu",
                "/usr/share"):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for f in sorted(filenames):
                src = Path(dirpath) / f
                if src.is_symlink() or not src.is_file():
                    continue
                size = src.stat().st_size
                if size > 8 * MiB or total + size > budget:
                    continue
                out = dest / src.relative_to("/")
                if out.exists():
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, out)
                total += size
                if total >= budget - 4096:
                    return total
    return total


def clone_files(scratch: Path, i: int, unique: int) -> list[tuple[Path, str]]:
    """What a booted VM adds: a log (text), host keys and a cache (random)."""
    rng = random.Random(1000 + i)
    words = ["started", "stopped", "session", "opened", "closed", "for", "user", "root", "eth0", "DHCPACK",
             "kernel:", "systemd[1]:", "cron[812]:", "sshd[1022]:", "Accepted", "publickey", "from", "port"]
    log = scratch / f"syslog-{i}"
    with open(log, "w") as f:
        n = 0
        while n < unique // 2:
            line = (f"Dec  6 {rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d} vm{i} "
                    + " ".join(rng.choice(words) for _ in range(rng.randrange(4, 12)))
                    + f" {rng.getrandbits(32):08x}\n")
            f.write(line)
            n += len(line)
    keys = scratch / f"keys-{i}"
    keys.write_bytes(rng.randbytes(16 * 1024))
    cache = scratch / f"cache-{i}"
    cache.write_bytes(rng.randbytes(unique // 2 - 16 * 1024))
    return [(log, "syslog"), (keys, "ssh_host_keys"), (cache, "cache.bin")]


def make_clone(template: Path, out: Path, scratch: Path, i: int, unique: int) -> None:
    sh("cp", "--sparse=always", str(template), str(out))
    cmds = [f"mkdir vm{i}", f"cd vm{i}"] + [f"write {p} {name}" for p, name in clone_files(scratch, i, unique)]
    cmdfile = scratch / f"debugfs-{i}"
    cmdfile.write_text("\n".join(cmds) + "\n")
    sh("debugfs", "-w", "-f", str(cmdfile), str(out))


def nonzero_bytes(path: Path) -> int:
    zero = bytes(BLOCK)
    n = 0
    with open(path, "rb") as f:
        while blk := f.read(BLOCK):
            if blk != zero[:len(blk)]:
                n += len(blk)
    return n


def zstd_size(path: Path, *flags: str) -> tuple[int, float]:
    """Compressed size and seconds of ``zstd FLAGS`` (one thread, output counted, not kept)."""
    t = time.monotonic()
    p = subprocess.run(["zstd", "-q", "-c", "-T1", *flags, str(path)], stdout=subprocess.PIPE, check=True)
    return len(p.stdout), time.monotonic() - t


def information_limit(clones: list[Path], scratch: Path) -> dict[str, int]:
    """zstd -19 --long of clone 1 + zstd -19 of the blocks of later clones that no earlier clone has."""
    seen: set[bytes] = set()
    first, _ = zstd_size(clones[0], "-19", "--long=27")
    with open(clones[0], "rb") as f:
        while blk := f.read(BLOCK):
            seen.add(blake3.blake3(blk).digest())
    out = {"clone1_zstd19_long": first}
    for k, c in enumerate(clones[1:], start=2):
        novel = scratch / f"novel-{k}"
        with open(c, "rb") as f, open(novel, "wb") as w:
            while blk := f.read(BLOCK):
                h = blake3.blake3(blk).digest()
                if h not in seen:
                    w.write(blk)
                    seen.add(h)
        out[f"clone{k}_novel_bytes"] = novel.stat().st_size
        out[f"clone{k}_novel_zstd19"] = zstd_size(novel, "-19")[0] if novel.stat().st_size else 0
    out["limit"] = first + sum(v for k, v in out.items() if k.endswith("_novel_zstd19"))
    return out


# -- the runs ---------------------------------------------------------------------------------------
class NsProcs(Procs):
    """Procs whose commands run inside a namespace (``ns``): the daemons, and the CLI calls too (the
    control socket is in the abstract namespace, which belongs to the network namespace)."""

    ns: str | None = None

    def cmd(self, *args: str) -> list[str]:
        base = super().cmd(*args)
        return in_ns(self.ns, *base) if self.ns else base


def run_vdisk(tmp: Path, clones: list[Path], image: int, args: argparse.Namespace, rate: float) -> dict:
    procs = NsProcs(tmp)
    extra: list[subprocess.Popen] = []
    try:
        names = [f"vm{i + 1}" for i in range(len(clones))]
        procs.ns = NS_SRC
        for n in names:
            procs.run("--data-dir", str(tmp / "src"), "create", n, "--size", str(image))
        procs.ns = NS_DST
        procs.start("--data-dir", str(tmp / "dst"), "target", "--listen", f"{IP_DST}:{TARGET_PORT}", "--insecure",
                    "-v", log="target.log", ready=r"target listening")
        start_proxy(extra, PROXY_PORT, TARGET_PORT, args.rtt / 2000)
        sock = str(tmp / "src.sock")
        procs.ns = NS_SRC
        _srv, _ = procs.start("--data-dir", str(tmp / "src"), "serve", *names, "--nbd", f"unix:{sock}", "-v",
                             log="serve.log", ready=r"serving ")
        for n in names:
            procs.run("--data-dir", str(tmp / "src"), "mirror", n, "--to", f"127.0.0.1:{PROXY_PORT}", "--mode", "async",
                      "--buffer-size", args.buffer_size)
        for n in names:
            procs.wait_state("src", n, "in_sync", timeout=60)
        tx0 = tx_bytes()
        t0 = time.monotonic()
        timeline: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                timeline.append((time.monotonic() - t0, tx_bytes() - tx0))
                stop.wait(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        writes = []
        for n, c in zip(names, clones, strict=True):
            w0 = time.monotonic()
            sh("nbdcopy", str(c), f"nbd+unix:///{n}?socket={sock}")
            writes.append(round(time.monotonic() - w0, 1))
        deadline = time.monotonic() + args.timeout
        while True:
            sts = [procs.status("src", n) for n in names]
            if all(s.get("state") == "in_sync" and s.get("in_flight", 0) == 0 for s in sts):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"not in sync after {args.timeout}s: {[s.get('state') for s in sts]}")
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        stop.set()
        sampler.join()
        tx = tx_bytes() - tx0
        identical = all((tmp / "src" / f"{n}.img").read_bytes() == (tmp / "dst" / f"{n}.img").read_bytes()
                        for n in names)
        reds = [s["reduction"] for s in sts]
        total = {k: sum(r[k] for r in reds) for k in ("logical", "data", "zero", "dedup", "compression",
                                                       "coalesced", "wire")}
        first10 = next((b for t, b in timeline if t >= 10), None)
        return {"seconds": round(elapsed, 1), "nbd_write_seconds": writes, "identical": identical,
                "veth_tx_bytes": tx, "reduction": total, "per_volume": reds,
                "first_10s_link_use": None if first10 is None else round(first10 / (rate * 10), 2),
                "levels": [r.get("level") for r in reds], "connects": [s.get("connects") for s in sts],
                "warnings": [line[25:200] for line in (tmp / "serve.log").read_text().splitlines()
                             if "WARNING" in line or "ERROR" in line][:20]}
    finally:
        procs.kill_all()
        for p in extra:
            p.kill()
            p.wait()


def run_rsync(tmp: Path, clones: list[Path], args: argparse.Namespace) -> dict:
    dest = tmp / "rsync-dst"
    dest.mkdir()
    conf = tmp / "rsyncd.conf"
    conf.write_text(f"uid = root\ngid = root\nuse chroot = no\n[wan]\npath = {dest}\nread only = no\n")
    extra: list[subprocess.Popen] = []
    try:
        extra.append(subprocess.Popen(in_ns(NS_DST, "rsync", "--daemon", "--no-detach", f"--config={conf}",
                                            f"--address={IP_DST}", f"--port={RSYNC_PORT}")))
        time.sleep(0.5)
        start_proxy(extra, RSYNC_PROXY_PORT, RSYNC_PORT, args.rtt / 2000)
        tx0 = tx_bytes()
        t0 = time.monotonic()
        out = sh(*in_ns(NS_SRC, "rsync", "-az", "--sparse", "--stats", *map(str, clones),
                        f"rsync://127.0.0.1:{RSYNC_PROXY_PORT}/wan/"), timeout=args.timeout).stdout
        elapsed = time.monotonic() - t0
        sent = next((int(line.split(":")[1].split()[0].replace(",", "")) for line in out.splitlines()
                     if line.startswith("Total bytes sent")), None)
        return {"seconds": round(elapsed, 1), "bytes_sent": sent, "veth_tx_bytes": tx_bytes() - tx0}
    finally:
        for p in extra:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", default="1G", help="template image size (default 1G)")
    ap.add_argument("--data", default="32M", help="files copied into the template (default 32M)")
    ap.add_argument("--unique", default="4M", help="unique data per clone (default 4M)")
    ap.add_argument("--rate", default="2mbit", help="link rate, tc syntax (default 2mbit)")
    ap.add_argument("--rtt", type=float, default=40.0, help="round trip added by the proxy, ms (default 40)")
    ap.add_argument("--buffer-size", default="10G", help="the mirrors' source buffer (default 10G)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per transfer (default 900)")
    ap.add_argument("--no-rsync", action="store_true", help="skip the rsync comparison")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    image, budget, unique = parse_size(args.image), parse_size(args.data), parse_size(args.unique)
    rate = parse_rate(args.rate)  # bytes/s
    tmp = Path(tempfile.mkdtemp(prefix="vdisk-wan-", dir="/var/tmp"))
    try:
        tree, scratch = tmp / "tree", tmp / "scratch"
        scratch.mkdir()
        copied = build_tree(tree, budget)
        template = tmp / "template.img"
        sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(tree), str(template), str(image // 1024) + "k")
        clones = [tmp / f"clone{i}.img" for i in (1, 2, 3)]
        for i, c in enumerate(clones, start=1):
            make_clone(template, c, scratch, i, unique)
        shutil.rmtree(tree)
        link_up(args.rate)
        res: dict = {"load_average": os.getloadavg(), "template": {
            "image_bytes": image, "files_bytes": copied, "nonzero_bytes": nonzero_bytes(template)},
            "clone_unique_bytes": unique, "link": {"rate_bytes_per_s": rate, "rtt_ms": args.rtt}}
        res["vdisk"] = run_vdisk(tmp, clones, image, args, rate)
        logical = 3 * image
        res["logical_bytes_written"] = logical
        res["effective_multiple"] = round(logical / (rate * res["vdisk"]["seconds"]), 1)
        res["raw_line_rate_seconds"] = round(logical / rate, 1)
        zs = [zstd_size(c, "-19", "--long=27") for c in clones]
        res["zstd19_long"] = {"bytes": sum(z[0] for z in zs), "seconds_at_line_rate": round(sum(z[0] for z in zs) / rate, 1),
                              "compress_seconds": round(sum(z[1] for z in zs), 1)}
        res["information_limit"] = information_limit(clones, scratch)
        res["wire_over_limit"] = round(res["vdisk"]["reduction"]["wire"] / res["information_limit"]["limit"], 3)
        if not args.no_rsync:
            res["rsync"] = run_rsync(tmp, clones, args)
        res["load_average_end"] = os.getloadavg()
    finally:
        link_down()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    v, lim = res["vdisk"], res["information_limit"]
    red = v["reduction"]
    rows = [
        ("template", (f"{res['template']['image_bytes'] / MiB:.0f} MiB image, {res['template']['files_bytes'] / MiB:.1f} MiB "
                     f"of files, {res['template']['nonzero_bytes'] / MiB:.1f} MiB non-zero")),
        ("clones", f"3, each + {unique / MiB:.0f} MiB unique; logical written {logical / MiB:.0f} MiB"),
        ("vdisk: time to in sync", f"{v['seconds']} s (NBD writes {v['nbd_write_seconds']} s), identical: {v['identical']}"),
        ("vdisk: wire bytes", f"{red['wire']:,} (veth {v['veth_tx_bytes']:,} incl. TCP/IP)"),
        ("vdisk: reduction", (f"zero {red['zero']:,} dedup {red['dedup']:,} zstd {red['compression']:,} "
                             f"coalesced {red['coalesced']:,} data {red['data']:,}")),
        ("vdisk: effective multiple", f"{res['effective_multiple']}x"),
        ("vdisk: link use in the first 10 s", f"{v['first_10s_link_use']}"),
        ("raw at line rate", f"{res['raw_line_rate_seconds']} s"),
        ("zstd -19 --long (3 clones)", (f"{res['zstd19_long']['bytes']:,} B = {res['zstd19_long']['seconds_at_line_rate']} s "
                                       "at line rate")),
        ("information limit", f"{lim['limit']:,} B; vdisk wire / limit = {res['wire_over_limit']}"),
    ]
    if "rsync" in res:
        rows.append(("rsync -az --sparse", f"{res['rsync']['seconds']} s, {res['rsync']['bytes_sent']:,} B sent"))
    rows.append(("load average start / end", f"{res['load_average']} / {res['load_average_end']}"))
    print("| measure | result |\n| --- | --- |")
    for k, val in rows:
        print(f"| {k} | {val} |")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
