"""The `vdisk` command-line contract around serving: create/list/info/delete, name checks, one server
per volume, recovery after kill -9, and one-line errors with a non-zero exit for bad arguments."""
from __future__ import annotations

import json
import os
import signal
import socket

import pytest

from tests.facilities import require_nbd

MiB = 1 << 20


def one_line_error(r) -> str:  # type: ignore[no-untyped-def]
    """The error of a failed command: non-zero exit, no traceback, exactly one error line."""
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_create_list_info_delete_json(vd):
    created = json.loads(vd("--json", "create", "disk1", "--size", "64M").stdout)
    assert created["name"] == "disk1" and created["size"] == 64 * MiB
    vd.create("disk2", "1G")
    listing = json.loads(vd("list", "--json").stdout)
    assert [v["name"] for v in listing] == ["disk1", "disk2"]
    assert {v["name"]: v["size"] for v in listing} == {"disk1": 64 * MiB, "disk2": 1 << 30}
    assert all(v["served_by"] is None and v["allocated"] == 0 for v in listing)
    info = json.loads(vd("info", "disk1", "--json").stdout)
    assert info["uuid"] == created["uuid"] and info["size"] == 64 * MiB
    assert os.path.getsize(info["image"]) == 64 * MiB
    vd("delete", "disk1")
    assert [v["name"] for v in json.loads(vd("list", "--json").stdout)] == ["disk2"]
    assert not os.path.exists(info["image"])
    one_line_error(vd("info", "disk1", check=False))


def test_create_twice_is_refused(vd):
    vd.create("v", "1M")
    assert "exists" in one_line_error(vd("create", "v", "--size", "1M", check=False))


@pytest.mark.parametrize("name", ["../evil", "a/b", "/abs", ".hidden", "-dash", "a..b", "x" * 65, "sp ace",
                                  "", "new\nline", "v.tmp"])
def test_bad_volume_names_are_rejected(vd, name):
    one_line_error(vd("create", name, "--size", "1M", check=False))
    assert list(vd.data_dir.iterdir()) == []
    assert not (vd.data_dir.parent / "evil.img").exists()


@pytest.mark.parametrize("size", ["12Q", "0", "1000", "-5M", "", "1.5.5G", pytest.param(
    "99999999999999T")])
def test_bad_size_gives_one_line_error(vd, size):
    one_line_error(vd("create", "v", f"--size={size}", check=False))
    assert vd("list", "--json").stdout.strip() == "[]"


@pytest.mark.parametrize("spec", ["foo:bar", "unix:", "tcp:", "tcp:127.0.0.1:99999", "tcp:127.0.0.1:port",
                                  "unix:/" + "x" * 120, "unix:/nonexistent-dir/x.sock"])
def test_bad_nbd_listen_gives_one_line_error(vd, spec):
    vd.create("v", "1M")
    r = vd("serve", "v", "--nbd", spec, check=False, timeout=20)
    one_line_error(r)
    assert vd("info", "v", "--json").stdout and json.loads(vd("info", "v", "--json").stdout)["served_by"] is None


def test_serving_a_missing_volume_gives_one_line_error(vd):
    one_line_error(vd("serve", "ghost", "--nbd", "unix:/tmp/never.sock", check=False))


def test_delete_is_refused_while_served(vd, serve):
    vd.create("v", "1M")
    srv = serve("v")
    info = json.loads(vd("info", "v", "--json").stdout)
    assert info["served_by"] == srv.proc.pid
    assert "served" in one_line_error(vd("delete", "v", check=False))
    assert vd.data_dir.joinpath("v.img").exists()
    assert srv.stop() == 0
    vd("delete", "v")


def test_second_serve_of_a_volume_is_refused(vd, serve, sock_dir):
    vd.create("v", "1M")
    srv = serve("v")
    r = vd("serve", "v", "--nbd", f"unix:{sock_dir}/second.sock", check=False, timeout=20)
    assert "served" in one_line_error(r)
    assert srv.alive() and not (sock_dir / "second.sock").exists()
    nbd = require_nbd()
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    h.pwrite(b"x" * 512, 0)
    h.shutdown()


def test_serve_refuses_a_socket_path_in_use(vd, serve, sock_dir):
    vd.create("a", "1M")
    vd.create("b", "1M")
    srv = serve("a")
    r = vd("serve", "b", "--nbd", f"unix:{srv.sock}", check=False, timeout=20)
    assert "in use" in one_line_error(r)
    assert srv.alive()
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(srv.sock))
    s.close()


def test_kill_9_then_serve_again_replaces_the_stale_socket(vd, serve):
    vd.create("v", "8M")
    first = serve("v")
    nbd = require_nbd()
    h = nbd.NBD()
    h.connect_uri(first.uri())
    h.pwrite(b"k" * 4096, 0, nbd.CMD_FLAG_FUA)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    assert first.sock.exists()  # nobody cleaned up
    second = serve("v", sock=first.sock)
    h2 = nbd.NBD()
    h2.connect_uri(second.uri())
    assert h2.pread(4096, 0) == b"k" * 4096
    h2.shutdown()
    assert json.loads(vd("info", "v", "--json").stdout)["served_by"] == second.proc.pid


def test_clean_shutdown_removes_socket_and_releases_volume(vd, serve):
    vd.create("v", "1M")
    srv = serve("v")
    assert srv.stop() == 0
    assert not srv.sock.exists()
    assert json.loads(vd("info", "v", "--json").stdout)["served_by"] is None


def test_read_only_serve_refuses_writes(vd, serve):
    vd.create("v", "1M")
    srv = serve("v", read_only=True)
    nbd = require_nbd()
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    assert h.is_read_only()
    assert h.pread(512, 0) == bytes(512)
    h.shutdown()
