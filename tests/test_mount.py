"""`vdisk mount` / `vdisk umount` end to end: real loop devices, ext4, e2fsck, NBD read-back, recovery."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.facilities import require_nbd
from tests.fusekit import leaks, require_fuse_host, served, sweep, vdisk, wait_for

SIZE = "64M"


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A data dir with volume ``vol``; whatever a test leaves mounted, attached or running is a failure."""
    require_fuse_host()
    home = tmp_path / "home"
    vdisk(home, "create", "vol", "--size", SIZE)
    try:
        yield home
    finally:
        assert not sweep(tmp_path, home), "leaked mounts, loop devices or daemons"


@contextmanager
def mounted(home: Path, mnt: Path, *extra: str) -> Iterator[None]:
    """`vdisk mount vol MNT` for the block, always unmounted."""
    vdisk(home, "mount", "vol", str(mnt), *extra)
    try:
        yield
    finally:
        vdisk(home, "umount", str(mnt))


def record(home: Path, name: str = "vol") -> dict:
    return json.loads((home / f"{name}.mount.json").read_text())


def write_tree(root: Path) -> dict[str, str]:
    """A small tree of files of assorted sizes; returns relative path -> sha256."""
    hashes = {}
    for i in range(40):
        sub = root / f"d{i % 5}" / f"e{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        data = hashlib.sha256(str(i).encode()).digest() * (1 + i * i * 37)
        (sub / f"f{i}.bin").write_bytes(data)
        hashes[str((sub / f"f{i}.bin").relative_to(root))] = hashlib.sha256(data).hexdigest()
    return hashes


def read_tree(root: Path, names: dict[str, str]) -> dict[str, str]:
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in names}


def test_mkfs_copy_umount_then_nbd_and_a_remount_see_the_same_data(home: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vdisk(home, "mount", "vol", str(mnt), "--mkfs", "ext4")
    rec = record(home)
    assert rec["mounted"] and rec["loop"].startswith("/dev/loop")
    written = write_tree(mnt)
    vdisk(home, "umount", str(mnt))
    assert not leaks(tmp_path, home) and not (home / "vol.mount.json").exists()

    sock = tmp_path / "vol.sock"
    with served(home, "vol", tmp_path / "fuse", sock):
        fuse_file = tmp_path / "fuse" / "vol"
        fsck = subprocess.run(["e2fsck", "-fn", str(fuse_file)], check=False, capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        h = require_nbd().NBD()
        h.connect_unix(str(sock))
        size = h.get_size()
        via_nbd = hashlib.sha256()
        for off in range(0, size, 4 << 20):
            via_nbd.update(h.pread(min(4 << 20, size - off), off))
        h.shutdown()
        via_fuse = hashlib.sha256(fuse_file.read_bytes()).hexdigest()
    assert via_nbd.hexdigest() == via_fuse == hashlib.sha256((home / "vol.img").read_bytes()).hexdigest()

    vdisk(home, "mount", "vol", str(mnt))  # no --mkfs: the filesystem is still there
    try:
        assert read_tree(mnt, written) == written
    finally:
        vdisk(home, "umount", "vol")  # by volume name as well as by directory


def test_refusals_are_clear_and_leave_nothing_behind(home: Path, tmp_path: Path) -> None:
    mnt, other = tmp_path / "mnt", tmp_path / "other"
    mnt.mkdir()
    other.mkdir()

    def refused(*args: str) -> str:
        """Fails with a message, and the system (mounts, loops, daemons, records) is as it was."""
        before = leaks(tmp_path, home), sorted(home.glob("*.mount.json"))
        p = vdisk(home, *args, check=False)
        assert p.returncode == 1, f"vdisk {' '.join(args)}: exit {p.returncode}"
        assert (leaks(tmp_path, home), sorted(home.glob("*.mount.json"))) == before
        return p.stderr

    assert "does not exist" in refused("mount", "vol", str(tmp_path / "missing"))
    assert "no volume named 'nope'" in refused("mount", "nope", str(mnt))
    assert "mkfs.nosuchfs is not installed" in refused("mount", "vol", str(mnt), "--mkfs", "nosuchfs")
    assert "is not a vdisk mount" in refused("umount", str(mnt))
    assert not (home / "vol.mount.json").exists()

    with served(home, "vol", tmp_path / "fuse"):
        assert "is busy: it is being served by pid" in refused("mount", "vol", str(mnt))

    with mounted(home, mnt, "--mkfs", "ext4"):
        assert "already mounted on" in refused("mount", "vol", str(other))
        vdisk(home, "create", "vol2", "--size", SIZE)
        assert "already a mountpoint" in refused("mount", "vol2", str(mnt))
    assert not leaks(tmp_path, home)


def test_a_failed_mount_is_undone_step_by_step(home: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = vdisk(home, "mount", "vol", str(mnt), check=False)  # a blank volume has no filesystem
    assert p.returncode == 1 and "use --mkfs ext4" in p.stderr
    assert not leaks(tmp_path, home)
    assert not (home / "vol.mount.json").exists() and not (home / ".vol.fuse").exists()


def _running(pid: int) -> bool:
    """False once ``pid`` has exited (a zombie has closed its descriptors too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_umount_recovers_after_the_daemon_is_killed(home: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vdisk(home, "mount", "vol", str(mnt), "--mkfs", "ext4")
    written = write_tree(mnt)
    os.sync()
    pid = record(home)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not _running(pid), what="the killed daemon to exit")  # its /dev/fuse is closed then
    # A dead server fails I/O at once (ENOTCONN, EIO through the loop device): nothing hangs (timeout).
    dead = subprocess.run(["ls", str(home / ".vol.fuse")], check=False, capture_output=True, text=True, timeout=10)
    # ECONNABORTED while the kernel aborts the connection, ENOTCONN after: both say "server gone".
    assert dead.returncode != 0 and ("not connected" in dead.stderr or "connection abort" in dead.stderr)
    assert "its daemon is gone" in vdisk(home, "mount", "vol", str(mnt), check=False).stderr

    vdisk(home, "umount", str(mnt), timeout=60)
    assert not leaks(tmp_path, home) and not (home / "vol.mount.json").exists()
    with mounted(home, mnt):  # the data synced before the kill survived
        assert read_tree(mnt, written) == written


def test_busy_umount_is_refused_and_a_lazy_one_keeps_serving_open_files(home: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vdisk(home, "mount", "vol", str(mnt), "--mkfs", "ext4")
    with open(mnt / "held", "w") as held:
        p = vdisk(home, "umount", str(mnt), check=False)
        assert p.returncode == 1 and "--lazy" in p.stderr
        assert record(home)["mounted"] and (mnt / "held").exists()  # nothing was torn down
        p = vdisk(home, "umount", str(mnt), "--lazy", check=False)
        assert p.returncode == 1 and "stays served until they are closed" in p.stderr
        left = leaks(tmp_path, home)
        assert str(mnt) not in left.get("mounts", []) and left["daemons"] and left["loops"]
        held.write("written after a lazy umount")
    vdisk(home, "umount", "vol")
    assert not leaks(tmp_path, home)
    with mounted(home, mnt):
        assert (mnt / "held").read_text() == "written after a lazy umount"


def test_force_umount_of_a_wedged_daemon_does_not_hang(home: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vdisk(home, "mount", "vol", str(mnt), "--mkfs", "ext4")
    os.kill(record(home)["pid"], signal.SIGSTOP)  # alive but answering nothing
    vdisk(home, "umount", str(mnt), "--force", timeout=60)
    assert not leaks(tmp_path, home)


def make_replica(home: Path, name: str = "vol") -> None:
    """Turn a volume into a replica, as `vdisk target` marks the ones it fills."""
    from blockdev.volume import VolumeStore

    VolumeStore(home).update(name, replica={"source_uuid": "0b3c5d2e-8f4a-4b6c-9d7e-1f2a3b4c5d6e",
                                            "source_name": "data1", "source_addr": "10.0.0.7:41234"})


def test_a_replica_mounts_only_read_only_and_the_image_is_not_written(home: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(home, mnt, "--mkfs", "ext4"):
        (mnt / "hello").write_text("from the source")
    make_replica(home)
    before = hashlib.sha256((home / "vol.img").read_bytes()).hexdigest()
    p = vdisk(home, "mount", "vol", str(mnt), check=False)
    assert p.returncode == 1 and not leaks(tmp_path, home)
    assert ("volume 'vol' is a replica of volume 'data1' (uuid 0b3c5d2e-8f4a-4b6c-9d7e-1f2a3b4c5d6e) mirrored "
            "from 10.0.0.7:41234: it is read-only until promoted") in p.stderr and "--read-only" in p.stderr
    assert "cannot be combined with --read-only" in vdisk(home, "mount", "vol", str(mnt), "--read-only", "--mkfs",
                                                          "ext4", check=False).stderr
    with mounted(home, mnt, "--read-only"):
        assert record(home)["read_only"]
        assert (mnt / "hello").read_text() == "from the source"
        with pytest.raises(OSError, match="Read-only file system"):
            (mnt / "new").write_text("x")
    assert hashlib.sha256((home / "vol.img").read_bytes()).hexdigest() == before


def test_a_replica_of_a_mounted_filesystem_mounts_read_only_without_replaying_its_journal(
        home: Path, tmp_path: Path) -> None:
    # A replica is a crash-consistent copy of a live filesystem: its ext4 journal needs recovery,
    # which a plain `mount -o ro` would try (a write) and fail on the read-only loop device.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vdisk(home, "create", "copy", "--size", SIZE)
    with mounted(home, mnt, "--mkfs", "ext4"):
        (mnt / "hello").write_text("written while mounted")
        os.sync()
        (home / "copy.img").write_bytes((home / "vol.img").read_bytes())  # the fs is still mounted: dirty
    make_replica(home, "copy")
    with mounted_ro(home, "copy", mnt):
        assert (mnt / "hello").read_text() == "written while mounted"


@contextmanager
def mounted_ro(home: Path, name: str, mnt: Path) -> Iterator[None]:
    """`vdisk mount NAME MNT --read-only` for the block, always unmounted."""
    vdisk(home, "mount", name, str(mnt), "--read-only")
    try:
        yield
    finally:
        vdisk(home, "umount", str(mnt))
