"""Named volumes in a data directory: a sparse raw image, a metadata file and a lock file.

    DIR/NAME.img    the raw image, exactly ``size`` bytes, sparse
    DIR/NAME.json   metadata: uuid, size, block size, generation, created, and sections other
                    packages own (``mirror``); written atomically (temp file, fsync, rename)
    DIR/NAME.lock   flock()ed by the process serving the volume; holds its pid and control address

The kernel drops a flock when its holder dies, so a kill -9 never leaves a volume locked.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import re
import uuid as uuid_mod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("vdisk.volume")

# Checked with fullmatch only: "$" in a plain match also accepts a trailing newline ("abc\n").
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
META_VERSION = 1
SECTOR = 512
MAX_SIZE = (1 << 63) - SECTOR  # NBD sizes are 64-bit; files are signed 64-bit


class VolumeError(Exception):
    """A volume operation that cannot be done; the message is meant for the user."""


class VolumeBusy(VolumeError):
    """The volume is served by another process (or another part of this one)."""


def is_valid_name(name: object) -> bool:
    """1-64 letters, digits, '.', '_', '-', starting with a letter or digit; no '..', not '*.tmp'."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None and not name.endswith(".tmp") \
        and ".." not in name


def validate_name(name: str) -> str:
    """``name`` if it is a valid volume name, else VolumeError with a message for the user."""
    if not is_valid_name(name):
        raise VolumeError(
            f"invalid volume name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


def default_data_dir() -> Path:
    env = os.environ.get("VDISK_HOME")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "vdisk"


@dataclass(frozen=True)
class VolumeMeta:
    name: str
    uuid: str
    size: int
    block_size: int
    generation: int
    created: str
    version: int = META_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], path: Path) -> VolumeMeta:
        try:
            known = {k: d[k] for k in ("name", "uuid", "size", "block_size", "generation", "created")}
            if not isinstance(known["size"], int) or known["size"] <= 0:
                raise ValueError("size")
            if not isinstance(known["block_size"], int) or known["block_size"] <= 0:
                raise ValueError("block_size")
            uuid_mod.UUID(known["uuid"])
        except (KeyError, ValueError, TypeError) as e:
            raise VolumeError(f"{path}: corrupt volume metadata ({e})") from None
        extra = {k: v for k, v in d.items() if k not in known and k != "version"}
        return cls(version=d.get("version", META_VERSION), extra=extra, **known)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` so that a crash leaves either the old or the new content, never a mix."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably: temp file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not also collect temp files, one per attempt
        raise
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


class VolumeLock:
    """An exclusive flock on NAME.lock, held while a volume is served."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def describe(self, info: dict[str, Any]) -> None:
        """Record who holds the lock (pid, control address) for ``vdisk`` commands to find."""
        os.pwrite(self._fd, _holder_slot(json.dumps(info).encode()), 0)

    def release(self) -> None:
        if self._fd >= 0:
            try:
                os.pwrite(self._fd, _holder_slot(b""), 0)  # blanked in place: the block stays allocated
            except OSError:
                pass
            os.close(self._fd)
            self._fd = -1


class VolumeStore:
    """The volumes of one data directory."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_data_dir()

    def _paths(self, name: str) -> tuple[Path, Path, Path]:
        validate_name(name)
        return self.root / f"{name}.img", self.root / f"{name}.json", self.root / f"{name}.lock"

    def image_path(self, name: str) -> Path:
        return self._paths(name)[0]

    def exists(self, name: str) -> bool:
        return self._paths(name)[1].exists()

    def create(self, name: str, size: int, block_size: int = 4096, extra: dict[str, Any] | None = None) -> VolumeMeta:
        img, meta_path, _ = self._paths(name)
        if size <= 0 or size % SECTOR:
            raise VolumeError(f"invalid size {size}: must be a positive multiple of {SECTOR} bytes")
        if size > MAX_SIZE:
            raise VolumeError(f"invalid size {size}: at most {MAX_SIZE} bytes (8 EiB)")
        if block_size < SECTOR or block_size & (block_size - 1) or block_size > 1 << 20:
            raise VolumeError(f"invalid block size {block_size}: a power of two from 512 to 1M")
        self.root.mkdir(parents=True, exist_ok=True)
        if meta_path.exists() or img.exists():
            raise VolumeError(f"volume {name!r} already exists in {self.root}")
        meta = VolumeMeta(
            name=name, uuid=str(uuid_mod.uuid4()), size=size, block_size=block_size, generation=1,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), extra=extra or {},
        )
        try:
            fd = os.open(img, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise VolumeError(f"volume {name!r} already exists in {self.root}") from None
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except (OSError, OverflowError) as e:
            os.close(fd)
            img.unlink(missing_ok=True)
            why = e.strerror if isinstance(e, OSError) else str(e)
            raise VolumeError(f"cannot create image {img} of {size} bytes: {why}") from None
        os.close(fd)
        write_json_atomic(meta_path, meta.to_json())
        try:  # the holder record's block, allocated now (see _holder_slot)
            fd = os.open(self._paths(name)[2], os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.pwrite(fd, _holder_slot(b""), 0)
            finally:
                os.close(fd)
        except OSError:
            pass  # written at the first serve instead
        return meta

    def meta(self, name: str) -> VolumeMeta:
        _, meta_path, _ = self._paths(name)
        try:
            with open(meta_path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise VolumeError(f"no volume named {name!r} in {self.root}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VolumeError(f"{meta_path}: corrupt volume metadata ({e})") from None
        if not isinstance(data, dict):
            raise VolumeError(f"{meta_path}: corrupt volume metadata (not an object)")
        meta = VolumeMeta.from_json(data, meta_path)
        if meta.name != name:
            raise VolumeError(f"{meta_path}: metadata names volume {meta.name!r}, not {name!r}")
        return meta

    def update(self, name: str, **changes: Any) -> VolumeMeta:
        """Change metadata fields (known ones or extra sections; None removes a section)."""
        meta = self.meta(name)
        d = meta.to_json()
        for k, v in changes.items():
            if v is None:
                d.pop(k, None)
            else:
                d[k] = v
        write_json_atomic(self._paths(name)[1], d)
        return VolumeMeta.from_json(d, self._paths(name)[1])

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.glob("*.json")):
            name = p.name[:-5]
            if is_valid_name(name) and (self.root / f"{name}.img").exists():
                out.append(name)
        return out

    def lock(self, name: str, *, writable: bool = False) -> VolumeLock:
        """Take the serve lock of ``name``; VolumeBusy if someone holds it.

        ``writable``: the holder will write the volume, so its ``generation`` goes up by one (under
        the lock, so no other writer of the metadata races it). Whoever remembers the old
        generation (a mirror pairing) can tell that the volume has been written since.
        """
        _, _, lock_path = self._paths(name)
        self.meta(name)  # exists and is sane
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f" by pid {holder['pid']}" if holder.get("pid") else ""
            raise VolumeBusy(f"volume {name!r} is being served{who}") from None
        lk = VolumeLock(lock_path, fd)
        if writable:
            try:
                self.update(name, generation=self.meta(name).generation + 1)
            except OSError as e:
                # A full disk must not keep a volume from being served (its writes may still fit in
                # allocated blocks). The generation is a hint for pairings; a replica's own seal
                # (mtime, size, inode) still tells a write behind the mirror's back.
                log.warning("volume %s: cannot record its new generation in %s: %s", name,
                            self._paths(name)[1], e.strerror or e)
            except BaseException:
                lk.release()
                raise
        return lk

    def holder(self, name: str) -> dict[str, Any] | None:
        """Who serves ``name`` (the lock holder's description), or None if nobody does."""
        _, _, lock_path = self._paths(name)
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_holder(fd) or {"pid": None}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def delete(self, name: str, sidecars: tuple[str, ...] = ()) -> None:
        """Remove the volume; ``sidecars`` are suffixes of files other packages keep beside it."""
        img, meta_path, lock_path = self._paths(name)
        self.meta(name)
        lk = self.lock(name)
        try:
            for suffix in sidecars:
                (self.root / f"{name}{suffix}").unlink(missing_ok=True)
            img.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            lock_path.unlink(missing_ok=True)
        finally:
            lk.release()

    def open_image(self, name: str, readonly: bool = False):  # type: ignore[no-untyped-def]
        """The image store of ``name`` (callers hold the lock when they serve it)."""
        from .image.file import FileImage

        meta = self.meta(name)
        img = self.image_path(name)
        try:
            image = FileImage(img, readonly=readonly, block=meta.block_size)
        except FileNotFoundError:
            raise VolumeError(f"volume {name!r}: image {img} is missing") from None
        if image.size() != meta.size:
            image.close()
            raise VolumeError(f"volume {name!r}: image is {image.size()} bytes, metadata says {meta.size}")
        return image


HOLDER_SLOT = 4096


def _holder_slot(data: bytes) -> bytes:
    """The lock file's holder record, padded to a fixed size and rewritten in place, never
    truncated: a daemon starting on a full disk can still say who it is (the block is kept)."""
    return data.ljust(HOLDER_SLOT) if len(data) < HOLDER_SLOT else data


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        data = json.loads(raw) if raw.strip() else {}
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
