"""Helpers for the FUSE and mount tests: the root/facility gate, `vdisk` subprocesses, leak sweeping."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.facilities import require

ROOT = Path(__file__).resolve().parent.parent
NEEDED_TOOLS = ("losetup", "mount", "umount", "fusermount3", "mkfs.ext4", "e2fsck")


def require_fuse_host() -> None:
    """Skip (with the reason) when this host cannot run them; in CI a missing facility is a failure."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    missing += [t for t in NEEDED_TOOLS if shutil.which(t) is None]
    require(missing, "FUSE/mount tests")


def env() -> dict[str, str]:
    """Child processes run this checkout's code, not whatever the venv's editable install points at."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def vdisk(home: Path, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "vdisk.cli", "--data-dir", str(home), *args], check=False, env=env(),
                       capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"vdisk {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
    return p


VERIFY = ["--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--direct=1", "--randrepeat=0",
          "--verify_state_save=0"]


def fio(*args: str) -> dict:
    """Run fio (JSON output, in /tmp so that nothing lands in the checkout); fail on any job error."""
    if shutil.which("fio") is None:
        pytest.fail("fio is not installed (scripts/setup.sh installs it)")
    p = subprocess.run(["fio", "--output-format=json", *args], check=False, capture_output=True, text=True, timeout=240,
                       cwd=tempfile.gettempdir())
    assert p.returncode == 0, p.stderr + p.stdout[-2000:]
    out = json.loads(p.stdout[p.stdout.index("{"):])
    for job in out["jobs"]:
        assert job["error"] == 0, job
    return out


def wait_for(pred, timeout: float = 20.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextmanager
def served(home: Path, name: str, fuse_dir: Path, nbd_sock: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """`vdisk serve NAME --fuse DIR [--nbd unix:SOCK]` for the duration of the block; always stopped."""
    fuse_dir.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "vdisk.cli", "--data-dir", str(home), "serve", name, "--fuse", str(fuse_dir)]
    if nbd_sock is not None:
        cmd += ["--nbd", f"unix:{nbd_sock}"]
    proc = subprocess.Popen(cmd, env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or (fuse_dir / name).exists()
                 and (nbd_sock is None or nbd_sock.exists()), what="the daemon")
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "daemon exited"
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if os.path.ismount(fuse_dir) or _dead_mount(fuse_dir):
            subprocess.run(["fusermount3", "-u", "-z", str(fuse_dir)], check=False, capture_output=True)
        assert not (os.path.ismount(fuse_dir) or _dead_mount(fuse_dir)), "FUSE mount left after SIGTERM"


def _dead_mount(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == 107  # ENOTCONN
    return False


def mounts_under(base: Path) -> list[str]:
    base_s = str(base.resolve())
    with open("/proc/self/mountinfo") as f:
        return [p[4] for p in (ln.split() for ln in f) if p[4].startswith(base_s)]


def loops_under(base: Path) -> list[str]:
    base_s = str(base.resolve())
    out = []
    for bf in glob.glob("/sys/block/loop*/loop/backing_file"):
        with open(bf) as f:
            if f.read().strip().startswith(base_s):
                out.append("/dev/" + bf.split("/")[3])
    return out


def daemons_under(home: Path) -> list[int]:
    """Live `vdisk serve` processes whose data dir is ``home``."""
    out = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"vdisk.cli" in args and b"serve" in args and os.fsencode(str(home)) in args:
            out.append(int(cmdline.split("/")[2]))
    return out


def leaks(base: Path, home: Path) -> dict[str, list]:
    return {k: v for k, v in {"mounts": mounts_under(base), "loops": loops_under(base),
                              "daemons": daemons_under(home)}.items() if v}


def sweep(base: Path, home: Path) -> dict[str, list]:
    """Undo whatever a failed test left (top mounts first), and return what was found."""
    found = leaks(base, home)
    for mnt in sorted(found.get("mounts", []), key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
    for loop in found.get("loops", []):
        subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)
    for pid in found.get("daemons", []):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for mnt in mounts_under(base):
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=False, capture_output=True)
    return found
