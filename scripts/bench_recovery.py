#!/usr/bin/env python3
"""Point-in-time recovery export vs the live replica export (issue 18's performance target).

    .venv/bin/python scripts/bench_recovery.py [--size 1G] [--units 3600] [--runtime 5] [--repeat 2]

Builds a replica with an hour of history the way the target does (mirror/undo.py + history.py: one
unit a second for ``--units`` seconds, each overwriting a few random extents of 4 KiB to 256 KiB,
about 10 % of the disk in all), then serves, on unix sockets, back to back in the same round:
    live       `vdisk target --nbd` (the replica's read-only export, as of its latest checkpoint)
    recovery   `vdisk recover NAME --at OLDEST --nbd` (the checkpoint an hour old)
and runs fio (nbd engine) 4 KiB randread QD32 and 1 MiB seq read QD4 against each. Also times
`vdisk checkpoints NAME` over the hour. Prints the medians and recovery/live ratios (target >= 0.5).

    .venv/bin/python scripts/bench_recovery.py --sync-cost [--size 256M] [--runtime 5] [--repeat 2]

instead measures what history costs a sync mirror: `vdisk serve` + `vdisk mirror --mode sync` into a
`vdisk target` without and with `--history 1h` (same round, alternating), fio on the source's
export: 4 KiB randwrite QD16 with a flush every 32 writes (each flush is a checkpoint), and 1 MiB
seq write QD4 with a flush every 8.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blockdev.volume import VolumeStore
from mirror.history import History
from mirror.undo import UndoLog
from vdisk.units import parse_size

NAME = "vol"
JOBS = [("randread-4k-qd32", "randread", "4k", 32), ("seqread-1m-qd4", "read", "1m", 4)]


def build(root: Path, size: int, units: int, seed: int = 1) -> int:
    """A replica of ``size`` bytes with ``units`` kept units; the oldest checkpoint's id."""
    store = VolumeStore(root)
    store.create(NAME, size, extra={"replica": {"source_uuid": "00000000-0000-0000-0000-000000000001",
                                                "source_name": NAME}})
    img = store.open_image(NAME)
    rng = random.Random(seed)
    chunk = 4 << 20
    for off in range(0, size, chunk):  # the initial sync: incompressible, every block allocated
        img.pwrite(rng.randbytes(min(chunk, size - off)), off)
    undo = UndoLog(root / f"{NAME}.mirror-undo", size)
    undo.archive = History(root, NAME).archive
    undo.begin((0, 0))
    t0 = time.time_ns() - units * 10**9
    per_unit = max(1, size // 10 // units)  # ~10 % of the disk rewritten over the hour

    def commit(cp: int) -> None:
        img.flush()
        (root / f"{NAME}.mirror-checkpoint").write_text(json.dumps({"id": cp, "time_ns": t0 + cp * 10**9}))
        undo.commit((cp, t0 + cp * 10**9))

    commit(1)
    for cp in range(2, units + 2):
        ops = []
        done = 0
        while done < per_unit:
            n = rng.choice((4096, 16384, 65536, 262144))
            off = rng.randrange(0, size // 4096 - 64) * 4096
            ops.append((off, rng.randbytes(n)))
            done += n
        undo.save(img, undo.uncovered([(o, len(d)) for o, d in ops]))
        for o, d in ops:
            img.pwrite(d, o)
        commit(cp)
    undo.close()
    img.close()
    return 1


def wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start: {proc.args}")
        time.sleep(0.05)


def fio(sock: Path, rw: str, bs: str, depth: int, runtime: float) -> tuple[float, float]:
    uri = f"nbd+unix:///{NAME}?socket={sock}"
    cmd = ["fio", "--name", "j", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
           f"--runtime={runtime}", "--time_based", "--ramp_time=1", "--randrepeat=0", "--norandommap",
           "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    d = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return d["iops"], d["bw_bytes"] / (1 << 20)


SYNC_JOBS = [("randwrite-4k-qd16", "randwrite", "4k", 16, 32), ("seqwrite-1m-qd4", "write", "1m", 4, 8)]


def sync_cost(args: argparse.Namespace, env: dict[str, str]) -> int:
    """Sync mirror write rates into a target without and with --history (see the module doc)."""
    results: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeat):
        for side in (["plain", "history"] if rep % 2 == 0 else ["history", "plain"]):
            with tempfile.TemporaryDirectory(prefix="bench-sync-history-") as tmp:
                src, dst, sock = Path(tmp) / "src", Path(tmp) / "dst", Path(tmp) / "src.sock"
                vd = [sys.executable, "-m", "vdisk.cli"]
                subprocess.run([*vd, "--data-dir", str(src), "create", NAME, "--size", args.size], check=True,
                               env=env, capture_output=True)
                extra = ["--history", "1h"] if side == "history" else []
                tlog = Path(tmp) / "target.log"
                with open(tlog, "wb") as f:
                    tgt = subprocess.Popen([*vd, "--data-dir", str(dst), "target", "--listen", "127.0.0.1:0", *extra],
                                           env=env, stdout=f, stderr=subprocess.STDOUT)
                srv = subprocess.Popen([*vd, "--data-dir", str(src), "serve", NAME, "--nbd", f"unix:{sock}"], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    deadline = time.monotonic() + 30
                    while b"listening on tcp:" not in tlog.read_bytes() and time.monotonic() < deadline:
                        time.sleep(0.05)
                    port = tlog.read_text().split("listening on tcp:127.0.0.1:", 1)[1].split(",")[0].split()[0]
                    wait_socket(sock, srv)
                    subprocess.run([*vd, "--data-dir", str(src), "mirror", NAME, "--to", f"127.0.0.1:{port}", "--mode",
                                    "sync", "--wait"], check=True, env=env, capture_output=True)
                    for name, rw, bs, depth, fsync in SYNC_JOBS:
                        uri = f"nbd+unix:///{NAME}?socket={sock}"
                        cmd = ["fio", "--name", "j", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
                               f"--iodepth={depth}", f"--fsync={fsync}", f"--runtime={args.runtime}", "--time_based",
                               "--ramp_time=1", "--randrepeat=0", "--norandommap", "--output-format=json"]
                        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                        iops = json.loads(out[out.index("{"):])["jobs"][0]["write"]["iops"]
                        results.setdefault((name, side), []).append(iops)
                        print(f"{name:<18} run {rep + 1} {side:<8} {iops:>9.0f} IOPS (load {os.getloadavg()[0]:.1f})",
                              flush=True)
                finally:
                    for p in (srv, tgt):
                        p.terminate()
                        p.wait(10)
    print(f"\n{'job':<18} {'plain IOPS':>10} {'history IOPS':>13} {'ratio':>6}")
    for name, *_ in SYNC_JOBS:
        plain = statistics.median(results[(name, "plain")])
        hist = statistics.median(results[(name, "history")])
        print(f"{name:<18} {plain:>10.0f} {hist:>13.0f} {hist / plain:>6.2f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--units", type=int, default=3600, help="checkpoints in the history (one a second)")
    ap.add_argument("--runtime", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sync-cost", action="store_true", help="measure what history costs a sync mirror instead")
    args = ap.parse_args()
    size = parse_size(args.size)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.sync_cost:
        return sync_cost(args, env)
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        root = Path(tmp) / "dr"
        t = time.monotonic()
        oldest = build(root, size, args.units)
        print(f"built a {args.size} replica with {args.units} kept units in {time.monotonic() - t:.0f}s", flush=True)
        t = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "vdisk.cli", "--data-dir", str(root), "checkpoints", NAME,
                              "--json"], capture_output=True, text=True, check=True, env=env).stdout
        listed = len(json.loads(out)["checkpoints"])
        print(f"`vdisk checkpoints` listed {listed} checkpoints in {time.monotonic() - t:.2f}s "
              "(including the interpreter's start)", flush=True)
        socks = {"live": Path(tmp) / "live.sock", "recovery": Path(tmp) / "rec.sock"}
        cmds = {"live": ["target", "--listen", "127.0.0.1:0", "--nbd", f"unix:{socks['live']}"],
                "recovery": ["recover", NAME, "--at", str(oldest), "--nbd", f"unix:{socks['recovery']}"]}
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        procs = {}
        try:
            for side, cmd in cmds.items():
                procs[side] = subprocess.Popen([sys.executable, "-m", "vdisk.cli", "--data-dir", str(root), *cmd],
                                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wait_socket(socks[side], procs[side])
            for name, rw, bs, depth in JOBS:
                for rep in range(args.repeat):
                    sides = ["live", "recovery"] if rep % 2 == 0 else ["recovery", "live"]
                    for side in sides:
                        iops, mibs = fio(socks[side], rw, bs, depth, args.runtime)
                        results.setdefault((name, side), []).append((iops, mibs))
                        print(f"{name:<18} run {rep + 1} {side:<9} {iops:>9.0f} IOPS {mibs:>8.1f} MiB/s "
                              f"(load {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            for p in procs.values():
                p.terminate()
                p.wait(10)
        print(f"\n{'job':<18} {'live IOPS':>10} {'recovery IOPS':>14} {'ratio':>6}")
        for name, *_ in JOBS:
            live = statistics.median(r[0] for r in results[(name, "live")])
            rec = statistics.median(r[0] for r in results[(name, "recovery")])
            print(f"{name:<18} {live:>10.0f} {rec:>14.0f} {rec / live:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
