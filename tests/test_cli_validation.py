"""Every number and name the CLI takes is checked once, exactly, at the edge: durations and sizes in
human units through vdisk.units, names with fullmatch, key files as ssh checks them."""
from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockdev.volume import VolumeError, VolumeStore, is_valid_name, validate_name
from vdisk.cli import main
from vdisk.mirroring import check_section, read_psk
from vdisk.units import parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent
UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "KiB": 1, "MiB": 2, "GiB": 3, "k": 1, "m": 2, "g": 3, "MB": 2}


# -- sizes ------------------------------------------------------------------------------------------
@given(st.integers(0, 10**12), st.integers(0, 10**6), st.integers(0, 6), st.sampled_from(sorted(UNITS)))
def test_parse_size_is_exact_or_refuses(whole: int, frac: int, frac_digits: int, unit: str) -> None:
    text = f"{whole}.{frac:0{frac_digits}d}{unit}" if frac_digits else f"{whole}{unit}"
    exact = Decimal(text.removesuffix(unit)) * (1 << (10 * UNITS[unit]))
    if exact != exact.to_integral_value() or exact < 1 or exact > 1 << 63:
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(text)
    else:
        assert parse_size(text) == int(exact)


@given(st.integers(1, 1 << 62))
def test_parse_size_round_trips_plain_bytes(n: int) -> None:
    assert parse_size(str(n)) == n
    assert parse_size(f"{n}B") == n


@pytest.mark.parametrize("text", ["1.0000000000000001G", "1.3", "0.5", "1e9", "1G\n", "１G", "1 G B", "nan",
                                  "inf", "-1G", "0", "99999999999T", "1.5.5G", "", " "])
def test_sizes_that_float_parsing_would_round_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_fractional_sizes_are_fine_when_exact_to_the_byte() -> None:
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("0.5K") == 512
    with pytest.raises(ValueError, match="multiple of 512"):
        parse_size("1000", multiple=512)


# -- durations --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,seconds", [("30", 30), ("30s", 30), ("2m", 120), ("2min", 120), ("1h", 3600),
                                          ("500ms", 0.5), ("1.5s", 1.5), (" 10s ", 10), ("1d", 86400)])
def test_durations_take_human_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


BAD_DURATIONS = ["-1", "nan", "NaN", "inf", "0", "0s", "-5", "1e3", "10x", "", "5s\n", "1000d", True]


@pytest.mark.parametrize("value", BAD_DURATIONS + [float("nan"), float("inf"), -1.0, 0])
def test_bad_durations_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)  # type: ignore[arg-type]


DURATION_FLAGS = [
    ("target", "--listen", "127.0.0.1:0", "--timeout"),
    ("mirror", "vol", "--to", "127.0.0.1:9", "--timeout"),
    ("mirror", "vol", "--to", "127.0.0.1:9", "--block-timeout"),
    ("mirror", "vol", "--to", "127.0.0.1:9", "--wait-timeout"),
]


@pytest.mark.parametrize("value", [v for v in BAD_DURATIONS if isinstance(v, str) and v])
@pytest.mark.parametrize("flag", DURATION_FLAGS, ids=lambda f: f"{f[0]}{f[-1]}")
def test_every_duration_flag_refuses_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                flag: tuple[str, ...], value: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--data-dir", str(tmp_path), *flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag[-1]}: invalid duration" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing was started or written


@pytest.mark.parametrize("flag", ["--size", "--block-size"])
@pytest.mark.parametrize("value", ["1.0000000000000001G", "nan", "-1", "1G\n", "0x10"])
def test_every_size_flag_refuses_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str,
                                            value: str) -> None:
    args = ["--size", "1M", "--block-size", "4K"]
    args[args.index(flag) + 1] = value
    with pytest.raises(SystemExit) as exc:
        main(["--data-dir", str(tmp_path), "create", "v", *args])
    assert exc.value.code == 2 and f"argument {flag}: invalid size" in capsys.readouterr().err
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_a_bad_duration_is_one_line_on_stderr_with_a_non_zero_exit(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "vdisk.cli", "--data-dir", str(tmp_path), "mirror", "vol", "--to",
                        "127.0.0.1:9", "--block-timeout", "nan"], capture_output=True, text=True, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if "error" in ln] == [
        ("vdisk mirror: error: argument --block-timeout: invalid duration 'nan': use a number of seconds or a "
         "unit, e.g. 30s, 2m, 500ms")]


@pytest.mark.parametrize("key,value", [("timeout", float("nan")), ("timeout", -1), ("block_timeout", 0),
                                       ("block_timeout", "5x")])
def test_a_saved_mirror_configuration_with_bad_numbers_is_refused(key: str, value: object) -> None:
    # The daemon reads the section from the volume's metadata (or the control socket): same checks.
    with pytest.raises(ValueError, match="invalid"):
        check_section({"to": "127.0.0.1:9", key: value})


# -- names ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["abc\n", "abc\n.img", "a\nb", "\nabc", "abc\r", "ａbc", "v.tmp", "a..b"])
def test_names_with_a_trailing_newline_or_other_tricks_are_refused(tmp_path: Path, name: str) -> None:
    assert not is_valid_name(name)
    with pytest.raises(VolumeError, match="invalid volume name"):
        VolumeStore(tmp_path).create(name, 1 << 20)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


@given(st.text(min_size=1, max_size=70))
def test_validate_name_accepts_only_the_documented_alphabet(name: str) -> None:
    ok = (len(name) <= 64 and name[0].isascii() and name[0].isalnum()
          and all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
          and ".." not in name and not name.endswith(".tmp"))
    assert is_valid_name(name) == ok
    if not ok:
        with pytest.raises(VolumeError):
            validate_name(name)


def test_list_ignores_metadata_files_whose_name_is_not_a_volume_name(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    store.create("good", 1 << 20)
    (tmp_path / "bad\n.json").write_text("{}")
    (tmp_path / "bad\n.img").write_bytes(b"")
    assert store.names() == ["good"]


# -- key files --------------------------------------------------------------------------------------
def key_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    p = tmp_path / "k.key"
    p.write_bytes(content)
    p.chmod(mode)
    return p


def test_a_private_key_file_is_read_and_stripped(tmp_path: Path) -> None:
    assert read_psk(key_file(tmp_path, b"  0123456789abcdef0123\n")) == b"0123456789abcdef0123"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602])
def test_a_key_file_others_can_access_is_refused_like_ssh_does(tmp_path: Path, mode: int) -> None:
    p = key_file(tmp_path, b"0123456789abcdef0123\n", mode)
    with pytest.raises(ValueError, match=rf"{p} is accessible by group or others .* run `chmod 600 {p}`"):
        read_psk(p)


@pytest.mark.parametrize("content,why", [(b"", "is empty"), (b" \n\t\n", "is empty"), (b"short\n", "too short"),
                                         (b"x" * 5000, "too large")])
def test_empty_short_and_huge_key_files_are_refused(tmp_path: Path, content: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        read_psk(key_file(tmp_path, content))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("path", ["/dev/zero", "/dev/urandom", "FIFO", "DIR"])
def test_a_key_file_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path: Path, path: str) -> None:
    if path == "FIFO":
        path = str(tmp_path / "fifo")
        os.mkfifo(path, 0o600)
    elif path == "DIR":
        path = str(tmp_path)
    with pytest.raises(ValueError, match="not a regular file"):
        read_psk(path)


def test_target_with_a_world_readable_key_exits_with_one_line(tmp_path: Path) -> None:
    p = key_file(tmp_path, b"0123456789abcdef0123\n", 0o644)
    r = subprocess.run([sys.executable, "-m", "vdisk.cli", "--data-dir", str(tmp_path / "d"), "target", "--listen",
                        "127.0.0.1:0", "--psk-file", str(p)], capture_output=True, text=True, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=30)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"vdisk: error: the key file {p} is accessible by group or others (mode 0644): run `chmod 600 {p}`"]
