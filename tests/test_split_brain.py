"""A replica is never written behind its mirror's back: read-only to every vdisk command until promoted,
and a replica changed anyway (dd into the image, an older vdisk) is detected as split brain on connect
instead of being silently resynced over; `vdisk mirror NAME --discard-replica` is the way back."""
from __future__ import annotations

import os

import pytest

from blockdev.volume import VolumeStore
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
