"""`vdisk target` as a process: it survives hostile peers, idle connections cost little, one target per
data directory (the lock dies with the process), and no keyless listening beyond loopback."""
from __future__ import annotations

import os
import time

import pytest
import trio
from mirror_procs import Procs
from target_peers import RawSource, drained, hashq, hello_json, json_frame, legit_source_mirrors

from mirror.wire import codec
from mirror.wire.events import Bye


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.kill_all()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_the_target_process_survives_hostile_peers(procs, tmp_path):
    p, port = procs.target("dst")
    nested = json_frame(codec.T_HELLO, b"[" * 30000 + b"]" * 30000)
    for junk in (nested, codec.encode(Bye()), hello_json() + codec.encode(Bye())):
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(junk)
        await drained(s)
        await s.aclose()
    src = await RawSource.connect(port)
    await src.send(hashq(1, 65536, -1, [0]))
    assert b"level" in await drained(src.stream)
    await legit_source_mirrors(port, tmp_path / "dst")
    assert p.poll() is None
    assert "Traceback" not in (tmp_path / "target.log").read_text()


async def test_idle_connections_cost_little_and_a_source_still_connects(procs, tmp_path):
    p, port = procs.target("dst")
    base_rss, base_fds = rss(p.pid), fds(p.pid)
    idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(60)]
    try:
        with trio.fail_after(10):  # every one accepted (one descriptor each)
            while fds(p.pid) < base_fds + 60:
                await trio.sleep(0.02)
        grown = rss(p.pid) - base_rss
        assert grown < 24 << 20, f"60 idle connections cost {grown >> 20} MiB"  # was 16 MiB each
        await legit_source_mirrors(port, tmp_path / "dst")
    finally:
        for s in idle:
            await s.aclose()


def test_a_second_target_on_the_same_data_directory_is_refused_until_the_first_dies(procs, tmp_path):
    p, _ = procs.target("dst")
    second = procs.run("--data-dir", str(tmp_path / "dst"), "target", "--listen", "127.0.0.1:0", check=False)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1] == (
        f"vdisk: error: another vdisk target (pid {p.pid}) is using {tmp_path / 'dst'}")
    procs.kill9(p)
    procs.target("dst")  # the lock died with the process


def test_keyless_listening_beyond_loopback_needs_insecure(procs, tmp_path):
    res = procs.run("--data-dir", str(tmp_path / "dst"), "target", "--listen", "0.0.0.0:0", check=False,
                    timeout=30)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "without --psk-file" in res.stderr and "--insecure" in res.stderr
    p, _ = procs.start("--data-dir", str(tmp_path / "dst2"), "target", "--listen", "0.0.0.0:0", "--insecure",
                       log="insecure.log", ready=r"target listening on tcp:")
    procs.kill9(p)
    p, _ = procs.target("dst3")
    deadline = time.monotonic() + 5
    while "any local process" not in (tmp_path / "target.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "target.log").read_text().count("no --psk-file") == 1


def test_the_target_raises_its_open_file_limit(procs):
    """Each source link is a descriptor: a target started under a low soft limit lifts it to the
    hard limit, as `vdisk serve` does (the child inherits the limit set here around its start)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard open-file limit is only {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        p, _ = procs.target("dst")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with open(f"/proc/{p.pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    assert int(line.split()[3]) > 256, line
