#!/usr/bin/env python3
"""TLS benchmark: a sync mirror over loopback with TLS against the same without, in one run.

    .venv/bin/python scripts/bench_tls.py [--runtime 5] [--repeat 1] [--size 512M] [--json]

Two sources and two targets on this host: ``plain`` (no TLS) and ``tls`` (`vdisk target --tls`,
`vdisk mirror --tls --target-fingerprint ...`). fio (nbd engine) writes to each source in turn,
interleaved: 1 MiB sequential QD8 and 4 KiB random QD32. Prints the TLS/plain ratios (issue 17:
>= 0.85x) and the CPU seconds per MiB written of each side's two daemons (source + target, from
/proc/PID/stat), so the cost of TLS is visible even when the link is not the bottleneck. Page
cache pinned as in bench_mirror.py. The load average is printed: other work on the host skews it.
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

from bench_mirror import settle
from bench_nbd import JOBS, NAME, prepare_image, run_fio

from tests.mirror_procs import Procs

TARGET = 0.85
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


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
    sides = ("plain", "tls")
    runs: dict[str, dict[str, list[tuple[float, float, float]]]] = {j.name: {s: [] for s in sides} for j in jobs}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vdisk-bench-tls-") as tmp:
        t = Path(tmp)
        procs = Procs(t)
        try:
            procs.run("--data-dir", str(t / "dst-tls"), "keys", "init")
            procs.run("--data-dir", str(t / "src-tls"), "keys", "init")
            tfp = procs.run("--data-dir", str(t / "dst-tls"), "keys", "show", "-q").stdout.strip()
            sfp = procs.run("--data-dir", str(t / "src-tls"), "keys", "show", "-q").stdout.strip()
            procs.run("--data-dir", str(t / "dst-tls"), "keys", "trust", sfp)
            pids: dict[str, list[int]] = {}
            socks: dict[str, Path] = {}
            images: dict[str, list[Path]] = {}
            for side in sides:
                src, dst = t / f"src-{side}", t / f"dst-{side}"
                procs.run("--data-dir", str(src), "create", NAME, "--size", a.size)
                prepare_image(src / f"{NAME}.img", size)
                tp, port = procs.target(f"dst-{side}", 0, *(("--tls",) if side == "tls" else ()))
                sp, sock = procs.serve(f"src-{side}", NAME)
                extra = ("--tls", "--target-fingerprint", tfp) if side == "tls" else ()
                procs.run("--data-dir", str(src), "mirror", NAME, "--to", f"127.0.0.1:{port}", "--mode", "sync",
                          *extra, "--wait")
                pids[side], socks[side] = [sp.pid, tp.pid], Path(sock)
                images[side] = [src / f"{NAME}.img", dst / f"{NAME}.img"]
            for r in range(a.repeat):
                for job in jobs:
                    for side in (sides if r % 2 == 0 else sides[::-1]):
                        for img in images[side]:
                            settle(img)
                        c0, t0 = cpu_seconds(pids[side]), time.monotonic()
                        iops, mibs = run_fio(job, socks[side], a.runtime)
                        cpu, wall = cpu_seconds(pids[side]) - c0, time.monotonic() - t0
                        # fio's ramp second is not in its MiB/s: the CPU is divided by all it wrote
                        runs[job.name][side].append((iops, mibs, cpu / max(mibs * wall, 1e-9)))
            states = {s: procs.status(f"src-{s}", NAME).get("state") for s in sides}
        finally:
            procs.kill_all()
    med = {j: {s: tuple(statistics.median(x[i] for x in v) for i in range(3)) for s, v in d.items()}
           for j, d in runs.items()}
    ratios = {j: m["tls"][0] / m["plain"][0] for j, m in med.items()}
    out = {"setup": f"two sync mirrors (plain, TLS 1.3) on one {os.cpu_count()}-CPU host, loopback TCP",
           "runtime_s": a.runtime, "repeat": a.repeat, "size": a.size, "median": med, "ratios": ratios,
           "load_average": {"before": load_before, "after": os.getloadavg()}, "mirror_states_after": states}
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {out['setup']}, runtime {a.runtime:g}s, repeat {a.repeat}, "
          f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"{'job':<22} {'plain':>24} {'TLS':>24} {'ratio':>6} {'target':>6}  CPU s/MiB plain / TLS")
    for job in jobs:
        (pi, pm, pc), (ti, tm, tc) = med[job.name]["plain"], med[job.name]["tls"]
        print(f"{job.label:<22} {pi:10.0f} IOPS {pm:7.1f} MiB/s {ti:10.0f} IOPS {tm:7.1f} MiB/s "
              f"{ratios[job.name]:5.2f}x {TARGET:5.2f}x  {pc * 1000:.2f} ms / {tc * 1000:.2f} ms")
    print(f"mirror states after the runs: {states}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
