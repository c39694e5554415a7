#!/usr/bin/env python3
"""Benchmark vdisk's NBD server against `nbdkit file` and `qemu-nbd` with the same fio jobs.

    .venv/bin/python scripts/bench_nbd.py [--runtime 5] [--repeat 2] [--size 1G] [--jobs seqwrite,...]

Every (job, repeat) runs each server in turn, the starting server rotating between repeats so that
no side always runs first. Before each run the image is put into the same page-cache state (see
DESIGN.md: 4K overwrites after 1 MiB writes into uncached regions cost about 4x more on this kernel):

    write the whole image with 1 MiB pwrites, fdatasync, evict it (POSIX_FADV_DONTNEED), then read
    it back once so that every side starts with the same, fully cached image.

Servers (all on a unix socket, buffered I/O through the host page cache, i.e. comparable setups):
    vdisk      `vdisk serve NAME --nbd unix:SOCK`
    nbdkit     `nbdkit -f -U SOCK file IMG` (default cache mode, 16 threads)
    qemu-nbd   `qemu-nbd -f raw --cache=writeback --aio=threads -t -e 4 -x NAME -k SOCK IMG`

Prints one line per run, then a table of medians (IOPS, MiB/s) with ratios vdisk/nbdkit, vdisk/qemu-nbd.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vdisk.demo import wait_for_socket

ROOT = Path(__file__).resolve().parent.parent
VDISK = ROOT / ".venv" / "bin" / "vdisk"
NAME = "bench"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    iodepth: int
    label: str


JOBS = {
    "seqwrite": Job("seqwrite", "write", "1M", 8, "1 MiB seq write QD8"),
    "randwrite": Job("randwrite", "randwrite", "4k", 32, "4 KiB randwrite QD32"),
    "randread1": Job("randread1", "randread", "4k", 1, "4 KiB randread QD1"),
    "randread32": Job("randread32", "randread", "4k", 32, "4 KiB randread QD32"),
}
SIDES = ("vdisk", "nbdkit", "qemu-nbd")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().rstrip("IB")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def prepare_image(path: Path, size: int) -> None:
    """Same content and page-cache state for every side: full 1 MiB writes, sync, evict, read once."""
    pattern = bytes(range(256)) * (CHUNK // 256)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        for off in range(0, size, CHUNK):
            os.pwrite(fd, pattern[: min(CHUNK, size - off)], off)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for off in range(0, size, CHUNK):
            os.pread(fd, CHUNK, off)
    finally:
        os.close(fd)


def run_rounds(jobs: list, sides: list[str], repeat: int, one: Callable[[Any, str], tuple[float, float]],
               results: dict[tuple[str, str], list[tuple[float, float]]]) -> None:
    """Every job ``repeat`` rounds; a round runs every side back to back (so its ratios see the same
    machine load), the side that goes first rotating; ``one(job, side)`` -> (IOPS, MiB/s)."""
    for job in jobs:
        for rep in range(repeat):
            for side in sides[rep % len(sides):] + sides[:rep % len(sides)]:
                iops, mibs = one(job, side)
                results.setdefault((job.name, side), []).append((iops, mibs))
                print(f"{job.label:<24} run {rep + 1} {side:<9} {iops:>10.0f} IOPS {mibs:>9.1f} MiB/s"
                      f"   (load {os.getloadavg()[0]:.1f})", flush=True)


def wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Until the server listens on ``path`` (or died)."""
    wait_for_socket(path, proc, timeout)


def start_server(side: str, work: Path, img: Path, sock: Path, vdisk_root: Path) -> subprocess.Popen[bytes]:
    if sock.exists():
        sock.unlink()
    if side == "vdisk":
        # PYTHONPATH first, so --vdisk-root can compare another checkout (e.g. a `git worktree`).
        env = dict(os.environ, VDISK_HOME=str(work / "data"), PYTHONPATH=str(vdisk_root))
        cmd = [sys.executable, "-m", "vdisk.cli", "serve", NAME, "--nbd", f"unix:{sock}"]
    elif side == "nbdkit":
        env = dict(os.environ)
        cmd = ["nbdkit", "-f", "-U", str(sock), "file", str(img)]
    else:
        env = dict(os.environ)
        cmd = ["qemu-nbd", "-f", "raw", "--cache=writeback", "--aio=threads", "-t", "-e", "4", "-x", NAME,
               "-k", str(sock), str(img)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_socket(sock, proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_fio(job: Job, sock: Path, runtime: float) -> tuple[float, float]:
    """(IOPS, MiB/s) of one fio run."""
    uri = f"nbd+unix:///{NAME}?socket={sock}"
    cmd = ["fio", "--name", job.name, "--ioengine=nbd", f"--uri={uri}", f"--rw={job.rw}", f"--bs={job.bs}",
           f"--iodepth={job.iodepth}", f"--runtime={runtime}", "--time_based", "--ramp_time=1",
           "--randrepeat=0", "--norandommap", "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    data = json.loads(out[out.index("{"):])
    d = data["jobs"][0]["write" if "write" in job.rw else "read"]
    return d["iops"], d["bw_bytes"] / (1 << 20)


def table(jobs: list[Job], sides: list[str], results: dict[tuple[str, str], list[tuple[float, float]]]) -> str:
    others = [o for o in ("nbdkit", "qemu-nbd") if o in sides and "vdisk" in sides]
    cols = ["job"] + [f"{s} {u}" for s in sides for u in ("IOPS", "MiB/s")] + [f"vdisk/{o}" for o in others]
    rows = []
    for job in jobs:
        runs = {s: results[(job.name, s)] for s in sides}
        row = [job.label]
        for s in sides:
            row += [f"{statistics.median(r[0] for r in runs[s]):.0f}", f"{statistics.median(r[1] for r in runs[s]):.0f}"]
        for o in others:
            rs = [v[0] / w[0] for v, w in zip(runs["vdisk"], runs[o])]
            row.append(f"{statistics.median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f})")
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    return "\n".join([fmt(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per fio run (default 5)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per job and side (default 2)")
    ap.add_argument("--size", type=parse_size, default=parse_size("1G"), help="image size (default 1G)")
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated subset of {','.join(JOBS)}")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    ap.add_argument("--workdir", type=Path, default=None, help="where the image lives (default: a temp dir)")
    ap.add_argument("--vdisk-root", type=Path, default=ROOT, help="checkout whose vdisk to run (default: this one)")
    args = ap.parse_args()
    jobs = [JOBS[j] for j in args.jobs.split(",")]
    sides = [s for s in args.sides.split(",") if s]
    for s in sides:
        if s not in SIDES:
            ap.error(f"unknown side {s!r}")
    for tool in ("fio", "nbdkit", "qemu-nbd"):
        if shutil.which(tool) is None:
            print(f"bench_nbd: {tool} not found", file=sys.stderr)
            return 1

    work = Path(tempfile.mkdtemp(prefix="bench-nbd-", dir=args.workdir))
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        env = dict(os.environ, VDISK_HOME=str(work / "data"))
        subprocess.run([str(VDISK), "create", NAME, "--size", str(args.size)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        img = work / "data" / f"{NAME}.img"  # every side serves the same file
        sock = work / "nbd.sock"
        print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, image {args.size >> 20} MiB in {work}, "
              f"runtime {args.runtime:g}s, repeat {args.repeat}, {os.cpu_count()} CPUs", flush=True)
        def one(job: Job, side: str) -> tuple[float, float]:
            prepare_image(img, args.size)
            proc = start_server(side, work, img, sock, args.vdisk_root)
            try:
                return run_fio(job, sock, args.runtime)
            finally:
                stop_server(proc)

        run_rounds(jobs, sides, args.repeat, one, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(table(jobs, sides, results))
    print("\nIOPS and MiB/s: medians of the runs above. vdisk/X: median of the per-round ratios (each round runs")
    print("the sides back to back, so a round's ratio sees the same machine load), with the range in brackets.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
