"""Real `vdisk` daemons as subprocesses for the end-to-end mirror tests; every one is killed at the end."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Procs:
    """Starts `vdisk` subcommands; ``kill_all`` (by pid) in the fixture's teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "vdisk.cli", *args]

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(self.cmd(*args), env=self.env, capture_output=True, text=True, timeout=timeout,
                             check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"vdisk {' '.join(args)} failed ({res.returncode}): {res.stderr}")
        return res

    def start(self, *args: str, log: str, ready: str, timeout: float = 20) -> tuple[subprocess.Popen[bytes], str]:
        """Start a daemon; wait for a stdout line matching ``ready`` (a regex); (process, the line)."""
        out = self.tmp / log
        with open(out, "ab") as f:
            start = out.stat().st_size
            p = subprocess.Popen(self.cmd(*args), env=self.env, stdout=f, stderr=subprocess.STDOUT)
        self.procs.append(p)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = out.read_bytes()[start:].decode(errors="replace")
            m = re.search(ready, text)
            if m:
                return p, m.group(0)
            if p.poll() is not None:
                raise AssertionError(f"vdisk {' '.join(args)} exited {p.returncode}:\n{text}")
            time.sleep(0.05)
        raise AssertionError(f"vdisk {' '.join(args)} not ready in {timeout}s:\n{out.read_text()}")

    def target(self, data: str, port: int = 0, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
        p, line = self.start("--data-dir", str(self.tmp / data), "target", "--listen", f"127.0.0.1:{port}", "-v",
                             *extra, log="target.log", ready=r"target listening on tcp:127\.0\.0\.1:(\d+)")
        return p, int(line.rsplit(":", 1)[1])

    def serve(self, data: str, name: str) -> tuple[subprocess.Popen[bytes], str]:
        sock = str(self.tmp / f"{data}-{name}.sock")
        p, _ = self.start("--data-dir", str(self.tmp / data), "serve", name, "--nbd", f"unix:{sock}", "-v",
                          log="serve.log", ready=r"serving ")
        return p, sock

    def status(self, data: str, name: str) -> dict:
        return json.loads(self.run("--data-dir", str(self.tmp / data), "status", name, "--json").stdout)["mirror"]

    def wait_state(self, data: str, name: str, state: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        st: dict = {}
        while time.monotonic() < deadline:
            st = self.status(data, name) or {}
            if st.get("state") == state and (state != "in_sync" or st.get("in_flight", 0) == 0):
                return st
            time.sleep(0.1)
        raise AssertionError(f"mirror of {name} not {state} in {timeout}s: {st}")

    @staticmethod
    def kill9(p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9(p)


def corrupt_silently(image: Path | str, writes: list[tuple[int, bytes]]) -> None:
    """Change a replica's bytes as bit rot would: the content changes, its timestamps do not. (A
    write through the filesystem moves the image's mtime, which the target reports as split brain.)"""
    st = os.stat(image)
    fd = os.open(image, os.O_WRONLY)
    try:
        for off, data in writes:
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
