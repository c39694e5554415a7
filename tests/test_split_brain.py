"""A replica is never written behind its mirror's back: read-only to every vdisk command until promoted,
and a replica changed anyway (dd into the image, an older vdisk) is detected as split brain on connect
instead of being silently resynced over; `vdisk mirror NAME --discard-replica` is the way back."""
from __future__ import annotations

import json
import os
import time

import pytest

from blockdev.volume import VolumeStore
from mirror.seal import Verdict, judge
from tests.mirror_procs import Procs

nbd = pytest.importorskip("nbd") if not os.environ.get("CI") else __import__("nbd")
MiB = 1 << 20
SOURCE_UUID = "0b3c5d2e-8f4a-4b6c-9d7e-1f2a3b4c5d6e"


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.kill_all()


def make_replica(store: VolumeStore, name: str = "vol") -> None:
    store.update(name, replica={"source_uuid": SOURCE_UUID, "source_name": "data1", "source_addr": "10.0.0.7:41234"})


# -- a replica is read-only to every command ---------------------------------------------------------
def test_serve_and_delete_of_a_replica_are_refused_saying_whose_replica_it_is(procs):
    data = ["--data-dir", str(procs.tmp / "dst")]
    procs.run(*data, "create", "vol", "--size", "8M")
    store = VolumeStore(procs.tmp / "dst")
    make_replica(store)
    gen = store.meta("vol").generation
    res = procs.run(*data, "serve", "vol", "--nbd", f"unix:{procs.tmp / 'rw.sock'}", check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == (
        f"vdisk: error: volume 'vol' is a replica of volume 'data1' (uuid {SOURCE_UUID}) mirrored from "
        "10.0.0.7:41234: it is read-only until promoted; read it with `vdisk serve vol --read-only` or "
        "`vdisk mount vol DIR --read-only`")
    res = procs.run(*data, "delete", "vol", check=False)
    assert res.returncode == 1 and "is a replica of volume 'data1'" in res.stderr and "cannot be deleted" in res.stderr
    assert (procs.tmp / "dst" / "vol.img").exists() and store.meta("vol").generation == gen

    # --read-only works, and does not count as a write (the generation stays).
    srv, _ = procs.start(*data, "serve", "vol", "--read-only", "--nbd", f"unix:{procs.tmp / 'ro.sock'}",
                            log="serve.log", ready=r"serving ")
    h = nbd.NBD()
    h.connect_unix(str(procs.tmp / "ro.sock"))
    assert h.is_read_only() and h.pread(4096, 0) == bytes(4096)
    h.shutdown()
    srv.terminate()
    srv.wait(10)
    assert store.meta("vol").generation == gen


def test_every_writable_serve_bumps_the_volume_generation(procs):
    data = ["--data-dir", str(procs.tmp / "src")]
    procs.run(*data, "create", "vol", "--size", "8M")
    store = VolumeStore(procs.tmp / "src")
    assert store.meta("vol").generation == 1
    for expected in (2, 3):
        srv, _ = procs.serve("src", "vol")
        assert store.meta("vol").generation == expected
        srv.terminate()
        srv.wait(10)


# -- split brain -------------------------------------------------------------------------------------
def mirrored(procs: Procs, size: str = "16M") -> tuple[int, str]:
    """`vol` served from src and sync-mirrored into dst, in sync, with 2 MiB of data; (port, socket)."""
    procs.run("--data-dir", str(procs.tmp / "src"), "create", "vol", "--size", size)
    _, port = procs.target("dst", 0)
    _, sock = procs.serve("src", "vol")
    procs.run("--data-dir", str(procs.tmp / "src"), "mirror", "vol", "--to", f"127.0.0.1:{port}", "--timeout", "3s")
    write(sock, 0, os.urandom(2 * MiB))
    procs.wait_state("src", "vol", "in_sync")
    return port, sock


def write(sock: str, offset: int, data: bytes) -> None:
    h = nbd.NBD()
    h.connect_unix(sock)
    h.pwrite(data, offset)
    h.flush()
    h.shutdown()


def stop(p) -> None:  # type: ignore[no-untyped-def]
    p.terminate()
    p.wait(20)


def replica_idle(procs: Procs) -> None:
    """Until the target has closed the session (sealed the replica and released its lock)."""
    store = VolumeStore(procs.tmp / "dst")
    deadline = time.monotonic() + 20
    while store.holder("vol") is not None:
        assert time.monotonic() < deadline, "the target still holds the replica"
        time.sleep(0.05)


def tamper(procs: Procs, offsets: tuple[int, ...] = (4096, 3 * MiB)) -> None:
    """What a DR admin's `dd` into the replica does (serve and mount refuse it now)."""
    fd = os.open(procs.tmp / "dst" / "vol.img", os.O_WRONLY)
    try:
        for off in offsets:
            os.pwrite(fd, b"\xa5" * 512, off)
    finally:
        os.close(fd)


def planted(procs: Procs, offsets: tuple[int, ...] = (4096, 3 * MiB)) -> bool:
    with open(procs.tmp / "dst" / "vol.img", "rb") as f:
        return all(os.pread(f.fileno(), 512, off) == b"\xa5" * 512 for off in offsets)


def images_equal(procs: Procs) -> bool:
    return (procs.tmp / "src" / "vol.img").read_bytes() == (procs.tmp / "dst" / "vol.img").read_bytes()


def split_brain_lines(procs: Procs, log: str) -> list[str]:
    path = procs.tmp / log
    return [ln for ln in path.read_text().splitlines() if "split brain" in ln] if path.exists() else []


def discard_and_check(procs: Procs) -> None:
    """`vdisk mirror vol --discard-replica`: back in sync, verify clean, the decision not kept."""
    src = ["--data-dir", str(procs.tmp / "src")]
    procs.run(*src, "mirror", "vol", "--discard-replica")
    procs.wait_state("src", "vol", "in_sync")
    res = procs.run(*src, "verify", "vol", "--json")
    assert json.loads(res.stdout)["differing_bytes"] == 0
    assert images_equal(procs)
    assert "discard_replica" not in VolumeStore(procs.tmp / "src").meta("vol").extra["mirror"]
    assert "split_brain" not in VolumeStore(procs.tmp / "dst").meta("vol").extra["replica"]
    assert "split_brain" not in VolumeStore(procs.tmp / "src").meta("vol").extra["mirror"]


def test_a_replica_written_while_the_source_was_down_is_split_brain_until_discard_replica(procs):
    mirrored(procs)
    stop(procs.procs[-1])  # the source daemon
    replica_idle(procs)
    tamper(procs)
    procs.serve("src", "vol")
    st = procs.wait_state("src", "vol", "split_brain")
    assert st["last_error"].startswith("split brain: replica 'vol' was written outside the mirror (its image was "
                                       "modified at ")
    assert "run `vdisk mirror vol --discard-replica` on the source" in st["last_error"]
    text = procs.run("--data-dir", str(procs.tmp / "src"), "status", "vol").stdout
    assert "split_brain" in text and "split brain: replica 'vol'" in text
    # Both sides say it in one line; nothing was resynced over the replica's own change.
    assert len(split_brain_lines(procs, "target.log")) >= 1 and len(split_brain_lines(procs, "serve.log")) == 1
    assert planted(procs) and not images_equal(procs)
    assert VolumeStore(procs.tmp / "dst").meta("vol").extra["replica"]["split_brain"]["reason"]
    res = procs.run("--data-dir", str(procs.tmp / "src"), "verify", "vol", check=False)
    assert res.returncode == 1 and "split_brain" in res.stderr  # verify needs a connected replica

    # Waiting does not end it either: `mirror --wait` says why at once instead of timing out.
    port = VolumeStore(procs.tmp / "src").meta("vol").extra["mirror"]["to"]
    res = procs.run("--data-dir", str(procs.tmp / "src"), "mirror", "vol", "--to", port, "--wait", check=False)
    assert res.returncode == 1 and "split brain: replica 'vol'" in res.stderr
    # The decision is the operator's: a restart of the source does not end it. While no daemon
    # runs, status still says split brain (the source recorded the target's verdict).
    stop(procs.procs[-1])
    offline = procs.status("src", "vol")
    assert offline["state"] == "split_brain" and "split brain: replica 'vol'" in offline["last_error"]
    procs.serve("src", "vol")
    procs.wait_state("src", "vol", "split_brain")
    assert planted(procs)
    discard_and_check(procs)


def test_a_replica_written_during_a_session_is_split_brain(procs):
    mirrored(procs)
    tamper(procs, (5 * MiB,))  # the target holds the replica: it notices at its next idle check
    st = procs.wait_state("src", "vol", "split_brain", timeout=15)
    assert "after the target's last write" in st["last_error"]
    assert planted(procs, (5 * MiB,))
    discard_and_check(procs)


def test_a_target_killed_mid_session_is_not_split_brain(procs):
    port, sock = mirrored(procs)
    tgt = procs.procs[0]
    h = nbd.NBD()
    h.connect_unix(sock)
    for i in range(64):  # writes in flight and unsealed when the target dies
        h.pwrite(os.urandom(64 << 10), i * (128 << 10))
    Procs.kill9(tgt)
    for i in range(16):  # and more while it is gone (the source's dirty map)
        h.pwrite(os.urandom(4096), 9 * MiB + i * 8192)
    h.flush()
    h.shutdown()
    assert VolumeStore(procs.tmp / "dst").meta("vol").extra["replica"]["session_open"]
    procs.target("dst", port)
    procs.wait_state("src", "vol", "in_sync")
    res = procs.run("--data-dir", str(procs.tmp / "src"), "verify", "vol", "--json")
    assert json.loads(res.stdout)["differing_bytes"] == 0 and images_equal(procs)
    assert not split_brain_lines(procs, "target.log") and not split_brain_lines(procs, "serve.log")


def test_clean_stops_and_starts_of_either_side_are_not_split_brain_and_need_no_compare(procs):
    port, sock = mirrored(procs)
    stop(procs.procs[0])  # the target
    write(sock, 6 * MiB, os.urandom(MiB))  # while it is down: the dirty map's business
    procs.target("dst", port)
    procs.wait_state("src", "vol", "in_sync")
    stop(procs.procs[1])  # the source
    replica_idle(procs)
    _, sock = procs.serve("src", "vol")
    procs.wait_state("src", "vol", "in_sync")
    write(sock, 8 * MiB, os.urandom(MiB))
    procs.wait_state("src", "vol", "in_sync")
    assert images_equal(procs)
    assert not split_brain_lines(procs, "target.log") and not split_brain_lines(procs, "serve.log")
    assert "existing replica differs" not in (procs.tmp / "serve.log").read_text()  # no Merkle compare ran


SEAL = {"ino": 12, "size": 1 << 20, "mtime_ns": 1000, "ctime_ns": 2000, "generation": 1}


@pytest.mark.parametrize("rep,now,verdict", [
    ({"seal": SEAL}, SEAL, Verdict()),
    ({"seal": SEAL, "session_open": True}, SEAL, Verdict()),  # died while idle: its last seal holds
    ({"seal": SEAL}, {**SEAL, "mtime_ns": 1001}, "modified at"),
    ({"seal": SEAL}, {**SEAL, "size": 2 << 20}, "modified at"),
    ({"seal": SEAL}, {**SEAL, "ino": 13}, "replaced"),
    ({"seal": SEAL}, {**SEAL, "generation": 2}, "opened writable outside the mirror (generation 1 -> 2)"),
    ({"seal": SEAL, "session_open": True}, {**SEAL, "generation": 2}, "generation 1 -> 2"),
    ({"seal": SEAL, "session_open": True}, {**SEAL, "mtime_ns": 5000}, Verdict(verify=True)),  # its own writes?
    ({"seal": SEAL}, {**SEAL, "ctime_ns": 2001}, Verdict(verify=True)),  # chmod: attributes, maybe not data
    ({}, SEAL, Verdict(verify=True)),  # no seal yet: trust nothing
    ({"seal": SEAL, "split_brain": {"reason": "earlier"}}, SEAL, "earlier"),  # until the operator decides
])
def test_judge_tells_split_brain_from_the_targets_own_writes(rep, now, verdict):
    got = judge(rep, now)
    if isinstance(verdict, str):
        assert got.split_brain is not None and verdict in got.split_brain and not got.verify
    else:
        assert got == verdict


def test_welcome_verify_is_optional_on_the_wire():
    from mirror.wire.codec import T_WELCOME, FrameReader, _json_frame, encode
    from mirror.wire.events import Welcome

    r = FrameReader()
    r.feed(encode(Welcome("rid", "vol", False, 3, verify=True)))
    r.feed(_json_frame(T_WELCOME, {"replica_id": "rid", "replica_name": "vol", "created": False, "generation": 3}))
    assert r.frames() == [Welcome("rid", "vol", False, 3, True), Welcome("rid", "vol", False, 3, False)]


def test_discard_replica_without_a_daemon_keeps_the_stored_configuration_and_pairing(procs):
    src = ["--data-dir", str(procs.tmp / "src")]
    procs.run(*src, "create", "vol", "--size", "8M")
    procs.run(*src, "mirror", "vol", "--to", "127.0.0.1:9", "--timeout", "2m", "--on-link-loss", "block")
    store = VolumeStore(procs.tmp / "src")
    store.update("vol", mirror={**store.meta("vol").extra["mirror"], "replica_id": "r1", "initial_sync_done": True})
    procs.run(*src, "mirror", "vol", "--discard-replica")
    section = store.meta("vol").extra["mirror"]
    assert section["discard_replica"] and section["replica_id"] == "r1" and section["initial_sync_done"]
    assert section["timeout"] == 120 and section["on_link_loss"] == "block" and section["to"] == "127.0.0.1:9"
    procs.run(*src, "create", "other", "--size", "8M")
    res = procs.run(*src, "mirror", "other", "--discard-replica", check=False)
    assert res.returncode == 1 and "is not mirrored: give --to" in res.stderr


@pytest.mark.parametrize("change,reason", [
    (lambda img: os.truncate(img, 8 * MiB), "resized from 16777216 to 8388608 bytes"),
    (lambda img: os.truncate(img, 24 * MiB), "resized from 16777216 to 25165824 bytes"),
    (os.unlink, "its image file was removed"),
])
def test_a_replica_image_resized_or_removed_is_split_brain_and_discard_replica_puts_it_back(procs, change, reason):
    """While the target is down the DR admin truncates, extends or removes the replica's image: split
    brain on connect (not a link that dies with an internal error on every retry, nor a second
    replica synced in full beside the first), and --discard-replica restores it to the volume's size."""
    port, _ = mirrored(procs)
    stop(procs.procs[0])  # the target
    image = procs.tmp / "dst" / "vol.img"
    change(image)
    procs.target("dst", port)
    st = procs.wait_state("src", "vol", "split_brain")
    assert reason in st["last_error"]
    text = (procs.tmp / "target.log").read_text()
    assert "internal error" not in text and "Traceback" not in text
    discard_and_check(procs)
    assert image.stat().st_size == 16 * MiB
    assert VolumeStore(procs.tmp / "dst").names() == ["vol"]
    assert "internal error" not in (procs.tmp / "target.log").read_text()


def test_mirror_of_a_replica_is_refused_and_leaves_its_metadata_alone(procs):
    """The target owns a replica's metadata (seals, split-brain record): `vdisk mirror` of it, even
    --stop, would rewrite it behind the target's back (a lost seal is a false split brain)."""
    data = ["--data-dir", str(procs.tmp / "dst")]
    procs.run(*data, "create", "vol", "--size", "8M")
    make_replica(VolumeStore(procs.tmp / "dst"))
    before = (procs.tmp / "dst" / "vol.json").read_bytes()
    for args in (("--to", "127.0.0.1:9"), ("--stop",), ("--discard-replica",)):
        res = procs.run(*data, "mirror", "vol", *args, check=False)
        assert res.returncode == 1 and "is a replica of volume 'data1'" in res.stderr, (args, res.stderr)
        assert "cannot be mirrored until promoted" in res.stderr and "Traceback" not in res.stderr
    assert (procs.tmp / "dst" / "vol.json").read_bytes() == before
