"""The long-running process behind `vdisk serve`: opens and locks volumes, builds each volume's layer
stack, runs the NBD listeners and the control socket, and shuts down gracefully on SIGINT/SIGTERM.

Every front end reaches a volume only through ``ServedVolume.top``:

    front end (NBD, FUSE) -> ReadOnlyLayer (if --read-only) -> StatsLayer -> MirrorLayer -> FileImage
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from blockdev.backend import Backend
from blockdev.image.file import FileImage
from blockdev.layers import ReadOnlyLayer, StatsLayer
from blockdev.nbd.limits import Limits
from blockdev.nbd.server import Export, NBDServer
from blockdev.volume import VolumeLock, VolumeMeta, VolumeStore
from mirror.layer import MirrorLayer
from mirror.undo import committed_view

from .control import ControlError, ControlServer, control_address
from .mirroring import MirrorManager
from .replicas import refuse_writable, replica_section

log = logging.getLogger("vdisk.daemon")
SHUTDOWN_GRACE = 10.0


class ConfigError(ValueError):
    """Bad daemon configuration; the message is for the user."""


@dataclass(frozen=True)
class Listen:
    """Where to listen: ``unix:PATH`` or ``tcp:HOST:PORT``."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, spec: str) -> Listen:
        kind, _, rest = spec.partition(":")
        if kind == "unix" and rest:
            if len(os.fsencode(rest)) > 107:
                raise ConfigError(f"unix socket path too long (max 107 bytes): {rest}")
            return cls("unix", path=rest)
        if kind == "tcp" and rest:
            host, _, port = rest.rpartition(":")
            host = host.strip("[]") or "127.0.0.1"
            try:
                p = int(port)
                if not 0 <= p <= 65535:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"bad port in {spec!r}") from None
            return cls("tcp", host=host, port=p)
        raise ConfigError(f"bad listen address {spec!r}: use unix:PATH or tcp:HOST:PORT")

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


@dataclass(frozen=True)
class ServeConfig:
    data_dir: Path
    names: tuple[str, ...]
    nbd: tuple[Listen, ...] = ()
    fuse: Path | None = None
    read_only: bool = False
    max_connections: int = Limits.connections  # per NBD listener
    metrics: Listen | None = None  # --metrics: Prometheus exposition (vdisk/metrics.py)
    tls: Any = None  # ssl.SSLContext: NBD clients must STARTTLS (--tls; vdisk/tls.py)


@dataclass
class ServedVolume:
    """One volume while it is served: its lock, image and layer stack."""

    name: str
    meta: VolumeMeta
    lock: VolumeLock
    image: FileImage
    mirror: MirrorLayer
    stats: StatsLayer
    top: Backend
    read_only: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        try:
            self.image.flush()
        finally:
            self.image.close()
            self.lock.release()


def prepare_unix_path(path: str) -> None:
    """Replace a stale socket left by a killed process; refuse one that is alive or not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError as e:
        if e.errno in (errno.ENOENT,):
            return
        raise ConfigError(f"{path}: {e.strerror}") from None
    finally:
        probe.close()
    raise ConfigError(f"{path} is in use by another server")


class NBDListeners:
    """The NBD listeners of one process (`vdisk serve`, `vdisk target`): replaces stale unix sockets
    on start and removes, on close, exactly the ones it created — never another server's."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.addresses: list[str] = []
        self._paths: list[str] = []

    async def start(self, nursery: trio.Nursery, specs: tuple[Listen, ...] | list[Listen]) -> list[str]:
        for spec in specs:
            if spec.kind == "unix":
                prepare_unix_path(spec.path)
                self._paths.append(spec.path)  # ours to remove from here on
            self.addresses.append(await nursery.start(self.server.serve, spec.kind, spec.path or spec.host,
                                                      spec.port))
        return self.addresses

    def close(self) -> None:
        """After the listeners stopped: join the worker threads, remove our sockets."""
        self.server.close()
        for path in self._paths:
            try:
                os.unlink(path)
            except OSError:
                pass


class Daemon:
    """Serves a set of volumes until cancelled or signalled."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.store = VolumeStore(config.data_dir)
        self.volumes: dict[str, ServedVolume] = {}
        self.control = ControlServer("serve")
        self.control_address = control_address(config.data_dir, os.getpid())
        self.nbd = NBDServer(self.export, lambda: sorted(self.volumes),
                             limits=Limits(connections=config.max_connections), tls=config.tls)
        self.listeners = NBDListeners(self.nbd)
        self.listening = self.listeners.addresses
        self.metrics_address: str | None = None  # http://HOST:PORT/metrics once listening
        self.control.register("status", self._cmd_status)
        self.control.register("volumes", self._cmd_status)
        self.mirrors = MirrorManager(self)  # registers the "mirror" and "verify" commands

    # -- volumes -------------------------------------------------------------------------------
    def open_volumes(self) -> None:
        try:
            for name in self.config.names:
                if name in self.volumes:
                    raise ConfigError(f"volume {name!r} given twice")
                self.volumes[name] = self._open(name)
        except BaseException:
            self.close_volumes()
            raise

    def _open(self, name: str) -> ServedVolume:
        writable = not self.config.read_only
        if writable:
            refuse_writable(self.store.meta(name))  # a replica changes only through its mirror
        lock = self.store.lock(name, writable=writable)  # writable: the volume's generation goes up
        try:
            meta = self.store.meta(name)
            image = self.store.open_image(name)
        except BaseException:
            lock.release()
            raise
        if not writable and replica_section(meta) is not None:
            # A replica whose target died mid-checkpoint reads as of its last committed one.
            image = committed_view(self.store.root, name, image, meta.size)
        mirror = MirrorLayer(image)
        stats = StatsLayer(mirror)
        top: Backend = ReadOnlyLayer(stats) if self.config.read_only else stats
        lock.describe({"pid": os.getpid(), "control": self.control_address, "nbd": [str(x) for x in self.config.nbd]})
        return ServedVolume(name, meta, lock, image, mirror, stats, top, self.config.read_only)

    def close_volumes(self) -> None:
        for vol in self.volumes.values():
            try:
                vol.close()
            except OSError as e:
                log.error("closing %s: %s", vol.name, e)
        self.volumes.clear()

    def export(self, name: str) -> Export | None:
        vol = self.volumes.get(name)
        if vol is None:
            return None
        return Export(name=name, backend=vol.top, description=f"vdisk volume {name}")

    # -- control -------------------------------------------------------------------------------
    def volume_status(self, vol: ServedVolume) -> dict[str, Any]:
        st = vol.stats.statistics()
        return {
            "name": vol.name, "uuid": vol.meta.uuid, "size": vol.meta.size, "read_only": vol.read_only,
            "io": {"reads": st.reads, "read_bytes": st.read_bytes, "writes": st.writes,
                   "write_bytes": st.write_bytes, "zeroes": st.zeroes, "trims": st.trims,
                   "flushes": st.flushes, "errors": st.errors},
            "mirror": self.mirrors.status(vol.name),
        }

    async def _cmd_status(self, req: dict[str, Any]) -> dict[str, Any]:
        name = req.get("name")
        vols = self.volumes if name is None else {name: self.volumes.get(name)}
        if name is not None and vols[name] is None:
            raise ControlError(f"volume {name!r} is not served by this daemon")
        return {"pid": os.getpid(), "listening": self.listening, "time": time.time(),
                "data_dir": str(self.store.root),
                "volumes": [self.volume_status(v) for v in vols.values() if v is not None],
                "events": self.mirrors.events.list(None if name is None else {name})}

    # -- running -------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled or SIGINT/SIGTERM; then drain in-flight requests and flush."""
        self.open_volumes()
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.control.serve, self.control_address)
                    await nursery.start(self.mirrors.run)  # mirrors attach before any front end writes
                    if self.config.metrics is not None:
                        from .metrics import ServeCollector, registry_of, serve_metrics

                        self.metrics_address = await nursery.start(serve_metrics, self.config.metrics,
                                                                   registry_of(ServeCollector(self)))
                    await self.listeners.start(nursery, self.config.nbd)
                    fuse = None
                    if self.config.fuse is not None:
                        from blockdev.fuse import serve_fuse

                        fuse = await nursery.start(serve_fuse, self.config.fuse, self.fuse_exports)
                    task_status.started(self.listening)
                    async for _sig in signals:
                        break
                    log.info("shutting down: draining in-flight requests")
                    # Both front ends, while the mirrors still run: a request in flight finishes
                    # mirrored (its reply may wait for the replica's ack), not cut off half way.
                    with trio.move_on_after(SHUTDOWN_GRACE):
                        async with trio.open_nursery() as drains:
                            drains.start_soon(self.nbd.drain)
                            if fuse is not None:
                                drains.start_soon(fuse.drain)
                    nursery.cancel_scope.cancel()
        finally:
            self.listeners.close()  # joins the NBD workers: no write can reach a volume after this
            self.mirrors.close()  # so the dirty maps saved now hold every write the replicas lack
            self.close_volumes()

    def fuse_exports(self) -> dict[str, Backend]:
        return {name: vol.top for name, vol in self.volumes.items()}
