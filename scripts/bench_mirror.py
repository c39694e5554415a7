#!/usr/bin/env python3
"""Sync-mirror benchmark: the same fio jobs against an unmirrored volume and a sync-mirrored one
(target daemon on loopback, same host), interleaved, one run each; prints ratios. Also measures
verify hashing (xxh3-128 Merkle leaves) on cached data.

    .venv/bin/python scripts/bench_mirror.py [--runtime 8] [--size 256M] [--json]

Page-cache state is pinned the same way for every side (DESIGN.md): each image is prefilled with
1 MiB writes, fsynced and evicted before each job.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.mirror_procs import Procs  # noqa: E402  (the same daemon helpers as the e2e tests)

JOBS = {
    "seq 1M QD8 write": ["--rw=write", "--bs=1M", "--iodepth=8"],
    "rand 4K QD32 write": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
}
TARGETS = {"seq 1M QD8 write": 0.7, "rand 4K QD32 write": 0.6}


def prefill_and_evict(path: Path, size: int, fill: bool) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        if fill:
            block = os.urandom(1 << 20)
            for off in range(0, size, 1 << 20):
                os.pwrite(fd, block, off)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fio(sock: str, name: str, args: list[str], size: str, runtime: int) -> dict[str, float]:
    res = subprocess.run(
        ["fio", f"--name={name}", "--ioengine=nbd", f"--uri=nbd+unix:///{name}?socket={sock}", f"--size={size}",
         f"--runtime={runtime}", "--time_based", "--randrepeat=0", "--output-format=json", *args],
        capture_output=True, text=True, timeout=runtime + 120)
    if res.returncode != 0:
        raise SystemExit(f"fio failed: {res.stderr}")
    w = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]["write"]  # the nbd engine prints a line first
    return {"iops": w["iops"], "mbps": w["bw_bytes"] / 1e6, "lat_us": w["clat_ns"]["mean"] / 1000}


def hash_speed(path: Path, size: int) -> float:
    from blockdev.image.file import FileImage
    from mirror.verify import leaf_digests

    img = FileImage(path, readonly=True)
    try:
        leaf_digests(img, size, 64 << 10)  # warm the cache
        t0 = time.perf_counter()
        leaf_digests(img, size, 64 << 10)
        return size / (time.perf_counter() - t0) / 1e9
    finally:
        img.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from vdisk.units import parse_size

    size = parse_size(a.size)
    with tempfile.TemporaryDirectory(prefix="vdisk-bench-mirror-") as tmp:
        procs = Procs(Path(tmp))
        try:
            data = ["--data-dir", str(Path(tmp) / "src")]
            for name in ("plain", "mirrored"):
                procs.run(*data, "create", name, "--size", a.size)
                prefill_and_evict(Path(tmp) / "src" / f"{name}.img", size, True)
            _, port = procs.target("dst")
            p1, sock_plain = procs.serve("src", "plain")
            p2, sock_mirr = procs.serve("src", "mirrored")
            procs.run(*data, "mirror", "mirrored", "--to", f"127.0.0.1:{port}", "--mode", "sync", "--wait")
            images = {"plain": [Path(tmp) / "src" / "plain.img"],
                      "mirrored": [Path(tmp) / "src" / "mirrored.img", Path(tmp) / "dst" / "mirrored.img"]}
            results: dict[str, dict[str, dict[str, float]]] = {}
            for job, args in JOBS.items():
                results[job] = {}
                for name, sock in (("plain", sock_plain), ("mirrored", sock_mirr)):
                    for img in images[name]:
                        prefill_and_evict(img, size, False)
                    results[job][name] = fio(sock, name, args, a.size, a.runtime)
            gbps = hash_speed(Path(tmp) / "src" / "plain.img", size)
        finally:
            procs.kill_all()
    out = {"setup": "source and target daemons on one 2-core host (loopback TCP)", "runtime_s": a.runtime,
           "jobs": results, "ratios": {j: r["mirrored"]["iops"] / r["plain"]["iops"] for j, r in results.items()},
           "verify_hash_gb_per_s": gbps}
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'job':<22} {'unmirrored':>22} {'sync mirror':>22} {'ratio':>7} {'target':>7}")
    for job, r in results.items():
        p, m = r["plain"], r["mirrored"]
        fmt = (lambda x: f"{x['iops']:8.0f} IOPS {x['mbps']:7.1f} MB/s")
        print(f"{job:<22} {fmt(p):>22} {fmt(m):>22} {out['ratios'][job]:6.2f}x {TARGETS[job]:6.2f}x")
    print(f"verify hashing (cached, 1 core): {gbps:.2f} GB/s (target 1.0)")
    print(out["setup"])
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
