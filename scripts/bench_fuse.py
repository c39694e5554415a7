#!/usr/bin/env python3
"""Benchmark vdisk's FUSE export against `nbdfuse` over `nbdkit file` and `qemu-storage-daemon` FUSE.

    .venv/bin/python scripts/bench_fuse.py [--runtime 5] [--repeat 2] [--size 512M] [--jobs ...] [--loop]

fio runs on the exported file itself (O_DIRECT, so every I/O is a FUSE request), or with --loop on a
loop device attached to it with `losetup --direct-io=on` (the `vdisk mount` path). Every (job, repeat)
runs each side in turn, the first side rotating between repeats; before every run the image gets the
same content and page-cache state (scripts/bench_nbd.py's prepare_image: see DESIGN.md on large folios).

Sides (all serve the same raw image, buffered, through the host page cache):
    vdisk     `vdisk serve NAME --fuse MNT`                       -> MNT/NAME
    nbdfuse   `nbdkit -f -U SOCK file IMG` + `nbdfuse MNT/img --unix SOCK` (4 connections by default)
    qsd       `qemu-storage-daemon --blockdev file,aio=threads --export type=fuse,writable=on` on a file

Prints one line per run, then a table of medians with the ratios vdisk/nbdfuse and vdisk/qsd.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from bench_nbd import parse_size, prepare_image, run_rounds, stop_server, wait_socket

from blockdev.fuse.mounts import is_mountpoint

ROOT = Path(__file__).resolve().parent.parent
NAME = "bench"
SIDES = ("vdisk", "nbdfuse", "qsd")


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    engine: str
    iodepth: int
    label: str


JOBS = {
    "randwrite": Job("randwrite", "randwrite", "4k", "libaio", 32, "4 KiB randwrite QD32"),
    "randread": Job("randread", "randread", "4k", "libaio", 32, "4 KiB randread QD32"),
    "randwrite1": Job("randwrite1", "randwrite", "4k", "psync", 1, "4 KiB randwrite psync"),
    "seqwrite": Job("seqwrite", "write", "1M", "libaio", 8, "1 MiB seq write QD8"),
}


def wait_for(pred: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:g}s")
        time.sleep(0.02)


@contextmanager
def exported(side: str, work: Path, img: Path) -> Iterator[Path]:
    """Serve ``img`` over FUSE the ``side`` way; yields the file to run fio on; always unmounts."""
    mnt = work / f"mnt-{side}"
    procs: list[subprocess.Popen[bytes]] = []

    def start(cmd: list[str], **kw: object) -> subprocess.Popen[bytes]:
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw))
        return procs[-1]

    try:
        if side == "vdisk":
            mnt.mkdir(exist_ok=True)
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            p = start([sys.executable, "-m", "vdisk.cli", "--data-dir", str(img.parent), "serve", NAME,
                       "--fuse", str(mnt)], env=env)
            file = mnt / NAME
        elif side == "nbdfuse":
            mnt.mkdir(exist_ok=True)
            sock = work / "nbdkit.sock"
            sock.unlink(missing_ok=True)
            wait_socket(sock, start(["nbdkit", "-f", "-U", str(sock), "file", str(img)]))
            p = start(["nbdfuse", str(mnt / "img"), "--unix", str(sock)])
            file = mnt / "img"
        else:
            mnt.touch()  # qsd mounts its export over a regular file
            p = start(["qemu-storage-daemon",
                       "--blockdev", f"driver=file,node-name=f,filename={img},aio=threads,cache.direct=off",
                       "--export", f"type=fuse,id=e,node-name=f,mountpoint={mnt},writable=on"])
            file = mnt
        wait_for(lambda: is_mountpoint(mnt) and file.exists(), p, side)
        yield file
    finally:
        if is_mountpoint(mnt) and side == "nbdfuse":
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
        for proc in reversed(procs):
            stop_server(proc)
        if is_mountpoint(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


@contextmanager
def loop_device(file: Path) -> Iterator[Path]:
    dev = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(file)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        yield Path(dev)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def run_fio(job: Job, target: Path, size: int, runtime: float) -> tuple[float, float]:
    """(IOPS, MiB/s) of one fio run."""
    cmd = ["fio", "--name", job.name, f"--filename={target}", f"--ioengine={job.engine}", f"--rw={job.rw}",
           f"--bs={job.bs}", f"--iodepth={job.iodepth}", f"--size={size}", "--direct=1",
           f"--runtime={runtime}", "--time_based", "--ramp_time=1", "--randrepeat=0", "--norandommap",
           "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    d = json.loads(out[out.index("{"):])["jobs"][0]["write" if "write" in job.rw else "read"]
    return d["iops"], d["bw_bytes"] / (1 << 20)


def summary(jobs: list[Job], sides: list[str], results: dict[tuple[str, str], list[tuple[float, float]]]) -> str:
    """A markdown table: medians per side, and per-round ratios of vdisk to each other side."""
    others = [o for o in sides if o != "vdisk"] if "vdisk" in sides else []
    lines = ["| job | " + " | ".join(f"{s} IOPS | {s} MiB/s" for s in sides) + "".join(
        f" | vdisk/{o}" for o in others) + " |", "|---" * (1 + 2 * len(sides) + len(others)) + "|"]
    for job in jobs:
        runs = {s: results[(job.name, s)] for s in sides}
        cells = [job.label]
        for s in sides:
            cells += [f"{statistics.median(r[0] for r in runs[s]):.0f}", f"{statistics.median(r[1] for r in runs[s]):.1f}"]
        for o in others:
            ratios = [v[0] / w[0] for v, w in zip(runs["vdisk"], runs[o])]
            cells.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per fio run (default 5)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per job and side (default 2)")
    ap.add_argument("--size", type=parse_size, default=parse_size("512M"), help="image size (default 512M)")
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated subset of {','.join(JOBS)}")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    ap.add_argument("--loop", action="store_true", help="run fio on a loop device over each exported file")
    args = ap.parse_args()
    jobs = [JOBS[j] for j in args.jobs.split(",")]
    sides = [s for s in args.sides.split(",") if s]
    if any(s not in SIDES for s in sides):
        ap.error(f"sides are {', '.join(SIDES)}")
    for tool in ("fio", "nbdkit", "nbdfuse", "qemu-storage-daemon", "fusermount3", "losetup"):
        if shutil.which(tool) is None:
            print(f"bench_fuse: {tool} not found (scripts/setup.sh installs it)", file=sys.stderr)
            return 1

    # SIGTERM (timeout, kill) unwinds like Ctrl-C, so every mount, loop device and server is undone.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="bench-fuse-"))
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        data = work / "data"
        subprocess.run([sys.executable, "-m", "vdisk.cli", "--data-dir", str(data), "create", NAME, "--size",
                        str(args.size)], env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True,
                       stdout=subprocess.DEVNULL)
        img = data / f"{NAME}.img"  # every side serves the same file
        print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, image {args.size >> 20} MiB, fio on "
              f"{'a loop device (--direct-io=on) over ' if args.loop else ''}the FUSE file, "
              f"runtime {args.runtime:g}s, repeat {args.repeat}, {os.cpu_count()} CPUs", flush=True)
        def one(job: Job, side: str) -> tuple[float, float]:
            prepare_image(img, args.size)
            with exported(side, work, img) as file:
                if args.loop:
                    with loop_device(file) as dev:
                        return run_fio(job, dev, args.size, args.runtime)
                return run_fio(job, file, args.size, args.runtime)

        run_rounds(jobs, sides, args.repeat, one, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(summary(jobs, sides, results))
    print("\nIOPS, MiB/s: medians of the runs above. vdisk/X: median of the per-round ratios (a round runs the")
    print("sides back to back, under the same machine load), with their range in brackets.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
