#!/usr/bin/env python3
"""Sync-mirror benchmark: the foundation benchmark's fio write jobs (scripts/bench_nbd.py) against an
unmirrored volume and a sync-mirrored one (target daemon on loopback), interleaved; prints ratios.
Also measures verify hashing (xxh3-128 Merkle leaves) on cached data, one core.

    .venv/bin/python scripts/bench_mirror.py [--runtime 5] [--repeat 1] [--size 512M] [--json]

Page-cache state is pinned the same way for every side (DESIGN.md): each image is written with 1 MiB
pwrites, synced, evicted and read back before the daemons start (bench_nbd.prepare_image); between
runs every image (source and replica) is synced, evicted and read back again.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_nbd import JOBS, NAME, prepare_image, run_fio

from tests.mirror_procs import Procs

TARGETS = {"seqwrite": 0.7, "randwrite": 0.6}  # issue 5: mirrored / unmirrored


def settle(path: Path) -> None:
    """Same cache state for every side: synced, evicted, read back (fully cached, clean)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 1 << 20):
            pass
    finally:
        os.close(fd)


def hash_speed(path: Path, size: int) -> float:
    """GB/s of leaf_digests over a cached image (best of three)."""
    from blockdev.image.file import FileImage
    from mirror.verify import leaf_digests

    img = FileImage(path, readonly=True)
    try:
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            leaf_digests(img, size, 64 << 10)
            best = max(best, size / (time.perf_counter() - t0) / 1e9)
        return best
    finally:
        img.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--size", default="512M")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from vdisk.units import parse_size

    size = parse_size(a.size)
    jobs = [JOBS["seqwrite"], JOBS["randwrite"]]
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {j.name: {"plain": [], "mirrored": []} for j in jobs}
    with tempfile.TemporaryDirectory(prefix="vdisk-bench-mirror-") as tmp:
        procs = Procs(Path(tmp))
        try:
            for side in ("plain", "src"):
                procs.run("--data-dir", str(Path(tmp) / side), "create", NAME, "--size", a.size)
                prepare_image(Path(tmp) / side / f"{NAME}.img", size)
            _, port = procs.target("dst")
            _, sock_plain = procs.serve("plain", NAME)
            _, sock_mirr = procs.serve("src", NAME)
            procs.run("--data-dir", str(Path(tmp) / "src"), "mirror", NAME, "--to", f"127.0.0.1:{port}",
                      "--mode", "sync", "--wait")
            images = {"plain": [Path(tmp) / "plain" / f"{NAME}.img"],
                      "mirrored": [Path(tmp) / "src" / f"{NAME}.img", Path(tmp) / "dst" / f"{NAME}.img"]}
            socks = {"plain": Path(sock_plain), "mirrored": Path(sock_mirr)}
            for r in range(a.repeat):
                for job in jobs:
                    order = ("plain", "mirrored") if r % 2 == 0 else ("mirrored", "plain")
                    for side in order:
                        for img in images[side]:
                            settle(img)
                        runs[job.name][side].append(run_fio(job, socks[side], a.runtime))
            st = procs.status("src", NAME)
            gbps = hash_speed(Path(tmp) / "plain" / f"{NAME}.img", size)
        finally:
            procs.kill_all()
    med = {j: {s: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for s, v in d.items()}
           for j, d in runs.items()}
    ratios = {j: m["mirrored"][0] / m["plain"][0] for j, m in med.items()}
    out = {"setup": f"source and target daemons on one {os.cpu_count()}-CPU host, loopback TCP",
           "runtime_s": a.runtime, "repeat": a.repeat, "size": a.size, "median": med, "ratios": ratios,
           "verify_hash_gb_per_s": gbps, "mirror_state_after": st.get("state")}
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {out['setup']}, runtime {a.runtime:g}s, repeat {a.repeat}")
    print(f"{'job':<22} {'unmirrored':>24} {'sync mirror':>24} {'ratio':>6} {'target':>6}")
    for job in jobs:
        (pi, pm), (mi, mm) = med[job.name]["plain"], med[job.name]["mirrored"]
        print(f"{job.label:<22} {pi:10.0f} IOPS {pm:7.1f} MiB/s {mi:10.0f} IOPS {mm:7.1f} MiB/s "
              f"{ratios[job.name]:5.2f}x {TARGETS[job.name]:5.2f}x")
    print(f"verify hashing, cached data, one core: {gbps:.2f} GB/s (target >= 1.0)")
    print(f"mirror state after the runs: {st.get('state')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
