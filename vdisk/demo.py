"""`vdisk demo`: the main job in one self-contained command.

In a temporary directory: start a replica target, create a volume, serve it over NBD with a real
`vdisk serve` daemon, mirror it to the target in sync mode, write and read data through libnbd (a real
NBD client), show the mirror status, and compare the replica (read through the target's read-only
NBD export) with the source. Then a second volume, mirrored asynchronously under an 8 Mbit/s throttle:
a burst of writes is acknowledged at once, the replica falls behind (status lines show the source
buffer, the lag and the ETA as it goes), catches up, and ends identical.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from .units import format_size


def _vdisk(*args: str, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "vdisk.cli", "--data-dir", str(data_dir), *args]


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Until the daemon's unix socket accepts connections (or the daemon died)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vdisk serve exited with status {proc.returncode}")
        if path.exists():
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(path))
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.05)
    raise RuntimeError(f"vdisk serve did not listen on {path} within {timeout:.0f}s")


def start_target(data: Path, nbd_sock: Path) -> tuple[subprocess.Popen[str], str]:
    """A `vdisk target` on a free loopback port; returns it and its HOST:PORT."""
    proc = subprocess.Popen(_vdisk("target", "--listen", "127.0.0.1:0", "--nbd", f"unix:{nbd_sock}", data_dir=data),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("target listening on tcp:"):
        proc.kill()
        raise RuntimeError(f"vdisk target did not start: {line!r}")
    print(line, end="")
    return proc, line.split()[3].removeprefix("tcp:").rstrip(",")


def run_demo(args: argparse.Namespace) -> int:
    import nbd  # libnbd's python bindings (Debian python3-libnbd), exposed in the venv

    con = Console()
    with tempfile.TemporaryDirectory(prefix="vdisk-demo-") as tmp:
        data, replicas = Path(tmp) / "source", Path(tmp) / "replicas"
        sock, replica_sock = Path(tmp) / "demo.sock", Path(tmp) / "replicas.sock"
        con.rule("[bold]vdisk demo")
        con.print(f"source data directory: {data}; replica site: {replicas}")
        target, target_addr = start_target(replicas, replica_sock)
        subprocess.run(_vdisk("create", "demo", "--size", "256M", data_dir=data), check=True)
        subprocess.run(_vdisk("create", "wan", "--size", "64M", data_dir=data), check=True)
        serve = subprocess.Popen(_vdisk("serve", "demo", "wan", "--nbd", f"unix:{sock}", data_dir=data))
        try:
            wait_for_socket(sock, serve)
            subprocess.run(_vdisk("mirror", "demo", "--to", target_addr, "--mode", "sync", "--wait", data_dir=data),
                           check=True)
            uri = f"nbd+unix:///demo?socket={sock}"
            h = nbd.NBD()
            h.connect_uri(uri)
            con.print(f"connected with libnbd to {uri}: export size {format_size(h.get_size())}, "
                      f"can_fua={h.can_fua()}, can_trim={h.can_trim()}, can_zero={h.can_zero()}")
            payload = os.urandom(8 << 20)
            t0 = time.perf_counter()
            for off in range(0, len(payload), 1 << 20):
                h.pwrite(payload[off:off + (1 << 20)], (16 << 20) + off)
            h.pwrite(b"hello from the vdisk demo\n", 0, nbd.CMD_FLAG_FUA)
            h.flush()
            dt = time.perf_counter() - t0
            con.print(f"wrote {format_size(len(payload))} at offset 16 MiB in {dt * 1000:.0f} ms, "
                      "a FUA write at 0, and a flush")
            back = b"".join(h.pread(1 << 20, (16 << 20) + off) for off in range(0, len(payload), 1 << 20))
            ok = hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
            con.print(f"read back and compared: {'[green]identical' if ok else '[red]MISMATCH'}")
            h.zero(4 << 20, 16 << 20)
            zeroed = h.pread(4096, 16 << 20) == bytes(4096)
            con.print(f"write-zeroes of 4 MiB: reads back zero: {zeroed}")
            h.shutdown()
            con.print(subprocess.run(_vdisk("list", data_dir=data), capture_output=True, text=True, check=False).stdout)
            con.print("[bold]vdisk status demo")
            subprocess.run(_vdisk("status", "demo", data_dir=data), check=True)
            r = nbd.NBD()
            r.connect_uri(f"nbd+unix:///demo?socket={replica_sock}")
            replica = b"".join(r.pread(1 << 20, (16 << 20) + off) for off in range(0, len(payload), 1 << 20))
            expected = bytes(4 << 20) + payload[4 << 20:]  # the source after the write-zeroes
            same = replica == expected and r.pread(26, 0) == b"hello from the vdisk demo\n"
            con.print(f"replica read through the target's read-only NBD export: "
                      f"{'[green]identical to the source' if same else '[red]DIFFERENT'} "
                      f"(every write was acknowledged only once the replica had it)")
            r.shutdown()
            ok = ok and same and async_part(con, nbd, data, sock, replica_sock, target_addr)
            con.print("[bold]vdisk status[/] (every volume) and on the target's data directory (its replicas)")
            for d in (data, replicas):
                subprocess.run(_vdisk("status", data_dir=d), check=True)
        finally:
            serve.terminate()
            serve.wait(timeout=30)
            target.terminate()
            target.wait(timeout=30)
        con.print(f"daemons stopped (exit status {serve.returncode}, {target.returncode}); images flushed")
        img = replicas / "demo.img"
        with open(img, "rb") as f:
            first = f.read(26)
        con.print(f"the replica's raw image starts with: {first!r}")
        con.rule()
        return 0 if ok and zeroed else 1


def async_part(con: Console, nbd: object, data: Path, sock: Path, replica_sock: Path, target_addr: str) -> bool:
    """An async mirror under a throttle: falls behind on a burst, catches up, ends identical."""
    import json

    con.rule("[bold]async mirror over a throttled link")
    subprocess.run(_vdisk("mirror", "wan", "--to", target_addr, "--mode", "async", "--rate", "8Mbit",
                          "--checkpoint-interval", "1s", "--wait", data_dir=data), check=True)
    h = nbd.NBD()  # type: ignore[attr-defined]
    h.connect_uri(f"nbd+unix:///wan?socket={sock}")
    payload = os.urandom(6 << 20)  # incompressible: 6 MiB at 1 MB/s is about 6 s on the wire
    t0 = time.perf_counter()
    for off in range(0, len(payload), 1 << 20):
        h.pwrite(payload[off:off + (1 << 20)], off)
    h.flush()
    con.print(f"wrote {format_size(len(payload))} in {(time.perf_counter() - t0) * 1000:.0f} ms "
              "(acknowledged from the source buffer, not the WAN)")
    h.shutdown()
    deadline = time.monotonic() + 60
    state = ""
    while time.monotonic() < deadline:
        line = subprocess.run(_vdisk("status", "wan", data_dir=data), capture_output=True, text=True,
                              check=False).stdout.strip()
        con.print(f"  {line}", highlight=False, soft_wrap=True)
        st = json.loads(subprocess.run(_vdisk("status", "wan", "--json", data_dir=data), capture_output=True,
                                       text=True, check=False).stdout or "{}").get("mirror") or {}
        state = st.get("state", "")
        if state == "in_sync":
            break
        time.sleep(1.0)
    r = nbd.NBD()  # type: ignore[attr-defined]
    r.connect_uri(f"nbd+unix:///wan?socket={replica_sock}")
    replica = b"".join(r.pread(1 << 20, off) for off in range(0, len(payload), 1 << 20))
    r.shutdown()
    same = state == "in_sync" and replica == payload
    con.print(f"async replica after catching up: {'[green]identical to the source' if same else '[red]DIFFERENT'}")
    return same
