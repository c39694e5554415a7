"""`vdisk demo`: the main job in one self-contained command.

In a temporary data directory: create a volume, serve it over NBD with a real `vdisk serve` daemon,
write and read data through libnbd (a real NBD client), check it, show the volume, shut down.
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


def run_demo(args: argparse.Namespace) -> int:
    import nbd  # libnbd's python bindings (Debian python3-libnbd), exposed in the venv

    con = Console()
    with tempfile.TemporaryDirectory(prefix="vdisk-demo-") as tmp:
        data = Path(tmp)
        sock = data / "demo.sock"
        con.rule("[bold]vdisk demo")
        con.print(f"data directory: {data}")
        subprocess.run(_vdisk("create", "demo", "--size", "256M", data_dir=data), check=True)
        serve = subprocess.Popen(_vdisk("serve", "demo", "--nbd", f"unix:{sock}", data_dir=data))
        try:
            wait_for_socket(sock, serve)
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
            con.print(subprocess.run(_vdisk("list", data_dir=data), capture_output=True, text=True).stdout)
        finally:
            serve.terminate()
            serve.wait(timeout=30)
        con.print(f"daemon stopped (exit status {serve.returncode}); image flushed")
        img = data / "demo.img"
        with open(img, "rb") as f:
            first = f.read(26)
        con.print(f"raw image starts with: {first!r}")
        con.rule()
        return 0 if ok and zeroed else 1
