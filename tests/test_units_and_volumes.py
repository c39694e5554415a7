"""Human units, volume metadata, names, locks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockdev.volume import VolumeBusy, VolumeError, VolumeStore
from vdisk.units import format_size, parse_rate, parse_size


@pytest.mark.parametrize("text,value", [("10G", 10 << 30), ("512M", 512 << 20), ("4KiB", 4096), ("1.5G", 3 << 29),
                                        ("4096", 4096), ("1T", 1 << 40), ("2m", 2 << 20)])
def test_parse_size_accepts_human_units(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "-1G", "10X", "1.3", "ten"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_rate_is_decimal_bits_or_bytes() -> None:
    assert parse_rate("2Mbit") == 250_000
    assert parse_rate("10MB/s") == 10_000_000
    assert format_size(1536) == "1.5 KiB"


def test_volume_create_writes_sparse_image_and_metadata(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    meta = store.create("vol1", 1 << 30)
    img = tmp_path / "vol1.img"
    assert img.stat().st_size == 1 << 30 and img.stat().st_blocks == 0
    on_disk = json.loads((tmp_path / "vol1.json").read_text())
    assert on_disk["uuid"] == meta.uuid and on_disk["size"] == 1 << 30 and on_disk["generation"] == 1
    assert store.names() == ["vol1"]
    with pytest.raises(VolumeError, match="already exists"):
        store.create("vol1", 1 << 20)


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 65, "a\0b", "-flag", "a b"])
def test_volume_names_with_path_tricks_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(VolumeError, match="invalid volume name"):
        VolumeStore(tmp_path).create(name, 1 << 20)
    assert list(tmp_path.iterdir()) == []


def test_serve_lock_excludes_a_second_server_and_delete(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    store.create("v", 1 << 20)
    lk = store.lock("v")
    lk.describe({"pid": os.getpid()})
    assert store.holder("v") == {"pid": os.getpid()}
    with pytest.raises(VolumeBusy):
        store.lock("v")
    with pytest.raises(VolumeBusy):
        store.delete("v")
    lk.release()
    assert store.holder("v") is None
    store.delete("v")
    assert store.names() == []


def test_lock_of_a_killed_process_is_free(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    store.create("v", 1 << 20)
    code = (f"import sys, os, signal; sys.path.insert(0, {str(Path(__file__).parents[1])!r}); "
            f"from blockdev.volume import VolumeStore; l = VolumeStore({str(tmp_path)!r}).lock('v'); "
            "l.describe({'pid': os.getpid()}); print('locked', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert "locked" in out.stdout
    assert store.holder("v") is None
    store.lock("v").release()


def test_corrupt_metadata_gives_a_clear_error(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    store.create("v", 1 << 20)
    (tmp_path / "v.json").write_text("{not json")
    with pytest.raises(VolumeError, match="corrupt volume metadata"):
        store.meta("v")
    (tmp_path / "v.json").write_text(json.dumps({"name": "v", "uuid": "x", "size": 1}))
    with pytest.raises(VolumeError, match="corrupt"):
        store.meta("v")


def test_size_must_be_a_multiple_of_512(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="multiple of 512"):
        VolumeStore(tmp_path).create("v", 1000)


def test_delete_removes_the_sidecar_files_other_packages_keep(tmp_path: Path) -> None:
    from vdisk.mirroring import MIRROR_SIDECARS

    store = VolumeStore(tmp_path)
    store.create("v", 1 << 20)
    store.create("v.b", 1 << 20)  # a name that starts like the other must keep its files
    for suffix in MIRROR_SIDECARS:
        (tmp_path / f"v{suffix}").write_bytes(b"x")
    store.delete("v", sidecars=MIRROR_SIDECARS)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["v.b.img", "v.b.json"]
