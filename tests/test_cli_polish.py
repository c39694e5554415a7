"""The CLI as a new user meets it: help that shows defaults, one-line errors, human units, and refusals
that say what to do (issue 15, item 7)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blockdev.volume import VolumeStore
from vdisk.cli import build_parser, main
from vdisk.mirror_cli import verify_text
from vdisk.mount import MountError, MountRecord, check_can_mount, save_record

ROOT = Path(__file__).resolve().parent.parent
KiB = 1 << 10


def vdisk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vdisk.cli", *args], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_option_shows_its_default_in_help(command: str) -> None:
    sp = subcommands()[command]
    help_text = sp.format_help()
    formatter = sp._get_formatter()
    for action in sp._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        text = formatter._get_help_string(action) or ""
        assert "default" in text or "required" in text, f"vdisk {command} {action.option_strings[0]}: {text!r}"
    assert "(default: " in help_text or "(default " in help_text


@pytest.mark.parametrize("args,message", [
    (("create", "v"), "vdisk create: error: the following arguments are required: --size"),
    (("nosuch",), "vdisk: error: argument COMMAND: invalid choice: 'nosuch'"),
    (("mirror", "v", "--to", ":7800"),
     "vdisk mirror: error: argument --to: bad address ':7800': give the target's host, e.g. 127.0.0.1:7800"),
    (("serve", "v", "--metrics", "udp:1"), "vdisk serve: error: argument --metrics: bad metrics address 'udp:1'"),
])
def test_argparse_errors_are_one_line_without_usage(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    r = vdisk("--data-dir", str(tmp_path), *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr
    assert "usage:" not in r.stderr


def test_info_is_in_human_units_and_json_keeps_exact_bytes(tmp_path: Path, capsys) -> None:
    run(capsys, "--data-dir", str(tmp_path), "create", "v", "--size", "1.5G")
    code, out, _ = run(capsys, "--data-dir", str(tmp_path), "info", "v")
    assert code == 0
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert fields["size"].strip() == f"1.5 GiB ({3 << 29} bytes)"
    assert fields["block size"].strip() == "4.0 KiB"
    assert fields["allocated"].strip() == "0 B"
    assert fields["mirror"].strip() == "-" and fields["mounted on"].strip() == "-"
    _, out, _ = run(capsys, "--data-dir", str(tmp_path), "info", "v", "--json")
    rec = json.loads(out)
    assert rec["size"] == 3 << 29 and rec["block_size"] == 4096 and rec["allocated"] == 0
    assert rec["mounted_on"] is None


def test_list_has_mirror_and_mounted_columns(tmp_path: Path, capsys) -> None:
    d = str(tmp_path)
    for name in ("plain", "synced", "async1", "copy"):
        run(capsys, "--data-dir", d, "create", name, "--size", "16M")
    VolumeStore(tmp_path).update("copy", replica={"source_uuid": "u", "source_name": "data1", "source_addr": "h:1"})
    run(capsys, "--data-dir", d, "mirror", "synced", "--to", "127.0.0.1:7800")
    run(capsys, "--data-dir", d, "mirror", "async1", "--to", "10.0.0.2:7800", "--mode", "async", "--insecure")
    store = VolumeStore(tmp_path)
    save_record(store, MountRecord(name="plain", dir="/mnt/plain", fuse_dir=str(tmp_path / ".plain.fuse"),
                                   log=str(tmp_path / "plain.mount.log")))
    code, out, _ = run(capsys, "--data-dir", d, "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "SIZE", "ALLOCATED", "SERVED", "MIRROR", "MOUNTED", "UUID"]
    by_name = {r.split()[0]: r for r in rows}
    assert "async 10.0.0.2:7800" in by_name["async1"]
    assert "sync 127.0.0.1:7800" in by_name["synced"]
    assert "/mnt/plain" in by_name["plain"]
    assert "replica of data1" in by_name["copy"]
    mirror_col = header.index("MIRROR")
    assert by_name["plain"][mirror_col] == "-"
    _, out, _ = run(capsys, "--data-dir", d, "list", "--json")
    assert {r["name"]: r["mounted_on"] for r in json.loads(out)} == {"async1": None, "copy": None,
                                                                    "plain": "/mnt/plain", "synced": None}


def test_verify_counts_ranges_in_words_and_says_what_was_resent() -> None:
    one = {"ranges": [[0, 64 * KiB]], "differing_bytes": 64 * KiB, "digests_exchanged": 1, "repaired": False}
    text = verify_text("vol1", one, repair=False)
    assert text.splitlines()[0] == "vol1: 1 differing range, 64.0 KiB (1 digest exchanged)"
    assert "not repaired: run `vdisk verify vol1 --repair`" in text
    two = {"ranges": [[0, 64 * KiB], [1 << 20, 64 * KiB]], "differing_bytes": 128 * KiB, "digests_exchanged": 9,
           "repaired": True, "resent_bytes": 128 * KiB}
    text = verify_text("vol1", two, repair=True)
    assert text.splitlines()[0] == "vol1: 2 differing ranges, 128.0 KiB (9 digests exchanged)"
    assert text.splitlines()[-1] == "  repaired: 128.0 KiB of data resent, acknowledged by the replica"
    zeroed = {**two, "resent_bytes": 0}
    assert "no data resent (the ranges are zeroes here)" in verify_text("vol1", zeroed, repair=True)
    late = {**two, "repaired": False, "resent_bytes": 64 * KiB}
    assert "not repaired: 64.0 KiB of data resent so far" in verify_text("vol1", late, repair=True)
    clean = {"ranges": [], "differing_bytes": 0, "digests_exchanged": 1, "repaired": False}
    assert verify_text("vol1", clean, repair=False) == "vol1: no differences (1 digest exchanged)"


def test_mirror_stop_on_an_unmirrored_volume_is_an_error(tmp_path: Path, capsys) -> None:
    run(capsys, "--data-dir", str(tmp_path), "create", "v", "--size", "1M")
    code, out, err = run(capsys, "--data-dir", str(tmp_path), "mirror", "v", "--stop")
    assert code == 1 and out == ""
    assert err == "vdisk: error: volume 'v' is not mirrored: nothing to stop\n"


def test_a_mirror_target_without_host_is_refused_before_anything_is_saved(tmp_path: Path, capsys) -> None:
    run(capsys, "--data-dir", str(tmp_path), "create", "v", "--size", "1M")
    code, _, err = run(capsys, "--data-dir", str(tmp_path), "mirror", "v", "--to", ":7800")
    assert code == 2 and "bad address ':7800'" in err
    assert "mirror" not in VolumeStore(tmp_path).meta("v").extra


@pytest.mark.parametrize("command", [("serve", "v"), ("delete", "v")])
def test_serving_or_deleting_a_mounted_volume_points_at_umount(tmp_path: Path, capsys, command) -> None:
    run(capsys, "--data-dir", str(tmp_path), "create", "v", "--size", "1M")
    save_record(VolumeStore(tmp_path), MountRecord(name="v", dir="/mnt/v", fuse_dir=str(tmp_path / ".v.fuse"),
                                                   log=str(tmp_path / "v.mount.log")))
    code, _, err = run(capsys, "--data-dir", str(tmp_path), *command)
    doing = "serving" if command[0] == "serve" else "deleting"
    assert code == 1
    assert err == f"vdisk: error: volume 'v' is mounted on /mnt/v: run `vdisk umount /mnt/v` before {doing} it\n"
    assert (tmp_path / "v.img").exists()


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4")
def test_mkfs_refuses_to_overwrite_a_filesystem_without_force(tmp_path: Path, capsys) -> None:
    d, mnt = str(tmp_path / "home"), tmp_path / "mnt"
    mnt.mkdir()
    run(capsys, "--data-dir", d, "create", "v", "--size", "16M")
    image = tmp_path / "home" / "v.img"
    subprocess.run(["mkfs.ext4", "-F", "-q", str(image)], check=True, capture_output=True)
    code, _, err = run(capsys, "--data-dir", d, "mount", "v", str(mnt), "--mkfs", "ext4")
    assert code == 1
    assert err.startswith("vdisk: error: volume 'v' already has a filesystem (ext4): --mkfs would erase it; "
                          "add --force"), err
    assert not (tmp_path / "home" / "v.mount.json").exists()  # refused before anything started
    store = VolumeStore(tmp_path / "home")
    if os.geteuid() == 0:
        check_can_mount(store, "v", str(mnt), "ext4", force=True)  # --force: no refusal (the mount itself
        # runs in test_mount.py with a FUSE host)
    else:
        with pytest.raises(MountError, match="needs root"):
            check_can_mount(store, "v", str(mnt), "ext4", force=True)
    # A blank volume is formatted without --force.
    run(capsys, "--data-dir", d, "create", "blank", "--size", "16M")
    with pytest.raises(MountError, match="needs root") if os.geteuid() else contextlib.nullcontext():
        check_can_mount(store, "blank", str(mnt), "ext4")
