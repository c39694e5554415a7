"""Prometheus metrics for `vdisk serve --metrics tcp:HOST:PORT` and `vdisk target --metrics ...`.

Collectors read the live statistics at scrape time (nothing is sampled in between). The HTTP side is a
small trio handler rather than ``prometheus_client.start_http_server``'s thread: a scrape then runs on
the event loop, where the mirror manager swaps replicators and banks the old one's counts in one step
(vdisk/mirroring.py: MirrorManager.counters), so a scrape never sees a counter dip mid-swap without a
lock on the write path; and the listener lives and dies with the daemon's nursery, so "address in
use" is a one-line start-up error naming the address.

Labels: ``volume`` on every per-volume series; ``mode`` and ``target`` only on ``vdisk_mirror_info``
and ``vdisk_mirror_state``. Counters carry ``volume`` alone, so a mode switch or a reconnect continues
the same series instead of starting a new one at zero (join on ``volume`` for mode or target).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from mirror.reduce import SAVED

if TYPE_CHECKING:
    from mirror.target import TargetServer

    from .daemon import Daemon, Listen

log = logging.getLogger("vdisk.metrics")
MAX_REQUEST = 8192
REQUEST_TIMEOUT = 10.0
MAX_SCRAPERS = 16  # connections served at once; past it the oldest still-idle one is dropped
# Every state a mirror reports (sync and async), each a series of vdisk_mirror_state, 1 for the current.
MIRROR_STATES = ("in_sync", "syncing", "lagging", "catching_up", "scheduled", "paused", "degraded",
                 "disconnected", "split_brain", "stopped")
ALERT_KINDS = ("rpo", "stall", "disconnected", "split_brain")  # vdisk/events.py
OPS = (("read", "reads", "read_bytes"), ("write", "writes", "write_bytes"), ("zero", "zeroes", "zero_bytes"),
       ("trim", "trims", "trim_bytes"), ("flush", "flushes", None))
CONNECTED = ("in_sync", "syncing", "lagging", "catching_up", "scheduled", "paused")


def parse_metrics(spec: str) -> Listen:
    """``tcp:HOST:PORT`` (port 0: any free port; the daemon prints the one it got)."""
    from .daemon import ConfigError, Listen

    if not spec.startswith("tcp:"):
        raise ConfigError(f"bad metrics address {spec!r}: use tcp:HOST:PORT, e.g. tcp:127.0.0.1:9100")
    return Listen.parse(spec)


class ServeCollector(Collector):
    """What `vdisk serve` exposes: per volume its I/O counters and, if mirrored, its mirror."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        size = GaugeMetricFamily("vdisk_volume_size_bytes", "Size of the served volume", labels=["volume"])
        ops = CounterMetricFamily("vdisk_volume_ops", "Requests from NBD and FUSE clients, by operation",
                                  labels=["volume", "op"])
        nbytes = CounterMetricFamily("vdisk_volume_bytes", "Bytes read, written, zeroed or trimmed by clients",
                                     labels=["volume", "op"])
        errors = CounterMetricFamily("vdisk_volume_errors", "Requests that failed", labels=["volume"])
        for name, vol in sorted(d.volumes.items()):
            st = vol.stats.statistics()
            size.add_metric([name], vol.meta.size)
            for op, count, b in OPS:
                ops.add_metric([name, op], getattr(st, count))
                if b is not None:
                    nbytes.add_metric([name, op], getattr(st, b))
            errors.add_metric([name], st.errors)
        yield from (size, ops, nbytes, errors)
        yield from mirror_families(d)


def mirror_families(d: Daemon) -> list[Metric]:
    L = ["volume"]
    info = GaugeMetricFamily("vdisk_mirror_info", "A mirrored volume's mode and target (always 1)",
                             labels=["volume", "mode", "target"])
    state = GaugeMetricFamily("vdisk_mirror_state", "1 for the mirror's current state, 0 for the others",
                              labels=["volume", "mode", "target", "state"])
    connected = GaugeMetricFamily("vdisk_mirror_connected", "1 while a session with the target is up", labels=L)
    alert = GaugeMetricFamily("vdisk_mirror_alert", "1 while the alert is raised (rpo: lag past --rpo; stall: no "
                              "progress with data pending; disconnected; split_brain), else 0", labels=["volume", "kind"])
    gauges = {k: GaugeMetricFamily(f"vdisk_mirror_{k}", text, labels=L) for k, text in (
        ("buffer_bytes", "What the replica lacks: unshipped journal plus dirty regions"),
        ("journal_bytes", "Size of the async source journal"),
        ("dirty_bytes", "Bytes of regions marked for resync"),
        ("lag_seconds", "Age of the oldest write the replica lacks (0 in sync)"),
        ("in_flight", "Frames sent and not yet acknowledged"),
        ("last_checkpoint_id", "Last checkpoint the replica committed (async)"),
        ("last_checkpoint_timestamp_seconds", "When the last committed checkpoint was cut (async, Unix time)"),
        ("rpo_seconds", "The mirror's recovery point objective (--rpo), when set"),
    )}
    counters = {k: CounterMetricFamily(f"vdisk_mirror_{name}", text, labels=L) for k, name, text in (
        ("logical_bytes", "shipped_bytes", "Volume bytes shipped to the replica (before compression)"),
        ("wire_bytes", "wire_bytes", "Bytes sent on the replication link"),
        ("reconnects", "reconnects", "Sessions with the target after the first one"),
        ("overflows", "overflows", "Times the async source buffer filled up (writes tracked in the dirty map)"),
        ("overflow_bytes", "overflow_bytes", "Bytes written while the source buffer was full"),
    )}
    saved = CounterMetricFamily("vdisk_mirror_saved_bytes", "Bytes an async mirror did not send, by cause "
                                "(zero ranges, dedup references, zstd, coalesced overwrites)",
                                labels=["volume", "cause"])
    for name in sorted(d.volumes):
        st: dict[str, Any] | None = d.mirrors.status(name)
        if st is None:
            continue
        mode, target, cur = str(st.get("mode") or "sync"), str(st.get("target") or ""), str(st.get("state"))
        info.add_metric([name, mode, target], 1)
        for s in MIRROR_STATES + (() if cur in MIRROR_STATES else (cur,)):
            state.add_metric([name, mode, target, s], 1 if s == cur else 0)
        connected.add_metric([name], 1 if cur in CONNECTED else 0)
        raised = {a.get("kind") for a in st.get("alerts") or () if isinstance(a, dict)}
        for kind in ALERT_KINDS + tuple(sorted(k for k in raised if k not in ALERT_KINDS)):
            alert.add_metric([name, str(kind)], 1 if kind in raised else 0)
        lag = st.get("lag_seconds")
        if lag is None and mode == "sync" and cur == "in_sync":
            lag = 0.0
        cp = st.get("last_checkpoint") or {}
        values = {"buffer_bytes": st.get("buffer_bytes", st.get("dirty_bytes")), "journal_bytes": st.get("journal_bytes"),
                  "dirty_bytes": st.get("dirty_bytes"), "lag_seconds": lag, "in_flight": st.get("in_flight"),
                  "last_checkpoint_id": cp.get("id"), "last_checkpoint_timestamp_seconds": cp.get("time"),
                  "rpo_seconds": st.get("rpo_seconds")}
        for k, v in values.items():
            if v is not None:
                gauges[k].add_metric([name], float(v))
        c = d.mirrors.counters(name)
        c["reconnects"] = max(0, c.pop("connects") - 1)
        for k, fam in counters.items():
            fam.add_metric([name], c[k])
        for cause in SAVED:
            saved.add_metric([name, cause], c[f"saved_{cause}"])
    return [info, state, connected, alert, *gauges.values(), *counters.values(), saved]


class TargetCollector(Collector):
    """What `vdisk target` exposes: its replicas, the sources connected, what it applied."""

    def __init__(self, server: TargetServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        s = self.server
        names = s.replica_names()
        st = s.statistics()
        yield GaugeMetricFamily("vdisk_target_replicas", "Replicas in the data directory", value=len(names))
        yield GaugeMetricFamily("vdisk_target_connected_sources", "Sources mirroring into a replica now",
                                value=st["active"])
        yield GaugeMetricFamily("vdisk_target_handshaking", "Connections not yet authenticated", value=st["handshaking"])
        yield CounterMetricFamily("vdisk_target_applied_bytes", "Bytes written to replicas (since the target started)",
                                  value=st["applied_bytes"])
        connected = GaugeMetricFamily("vdisk_replica_connected", "1 while a source mirrors into the replica",
                                      labels=["volume"])
        cp_id = GaugeMetricFamily("vdisk_replica_last_checkpoint_id", "Last checkpoint committed (async)",
                                  labels=["volume"])
        cp_time = GaugeMetricFamily("vdisk_replica_last_checkpoint_timestamp_seconds",
                                    "When the last committed checkpoint was cut at the source (Unix time)",
                                    labels=["volume"])
        for name in names:
            connected.add_metric([name], 1 if name in s.active else 0)
            cid, t_ns = s.checkpoints.get(name) or s.read_checkpoint(name)
            if cid:
                cp_id.add_metric([name], cid)
                cp_time.add_metric([name], t_ns / 1e9)
        yield from (connected, cp_id, cp_time)


def registry_of(collector: Collector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


async def serve_metrics(listen: Listen, registry: CollectorRegistry, *,
                        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """HTTP on ``listen`` until cancelled: GET /metrics (or /) answers the exposition text."""
    from .daemon import ConfigError

    try:
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
    except OSError as e:
        raise ConfigError(f"cannot listen for metrics on {listen.host}:{listen.port}: {e.strerror or e}") from None
    host, port = listeners[0].socket.getsockname()[:2]
    task_status.started(f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics")
    # Connections still waiting for their request line, oldest first. When every slot is taken, the
    # oldest of them is dropped for the newcomer: idle connections cannot lock scrapers out.
    reading: dict[int, trio.CancelScope] = {}
    busy = [0]

    async def handle(stream: trio.SocketStream) -> None:
        if busy[0] >= MAX_SCRAPERS:
            if not reading:  # every slot is answering a request: a flood of real scrapes
                await trio.aclose_forcefully(stream)
                return
            reading.pop(next(iter(reading))).cancel()
        busy[0] += 1
        try:
            await _handle(stream, lambda: generate_latest(registry), reading)
        finally:
            busy[0] -= 1

    await trio.serve_listeners(handle, listeners)


async def _handle(stream: trio.SocketStream, render: Callable[[], bytes],
                  reading: dict[int, trio.CancelScope] | None = None) -> None:
    """One request, one response, then close (HTTP/1.0 style: Prometheus scrapes are single requests).
    While the request is being read, this connection's scope is in ``reading`` (it may be evicted)."""
    key = id(stream)
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            buf = b""
            with trio.CancelScope() as waiting:
                if reading is not None:
                    reading[key] = waiting
                while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    buf += chunk
                    if len(buf) > MAX_REQUEST:
                        await _respond(stream, 431, b"request too large\n")
                        return
            if reading is not None:
                reading.pop(key, None)
            if waiting.cancelled_caught:
                return  # evicted for a newer connection
            method, _, rest = buf.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await _respond(stream, 405, b"use GET\n")
            elif path not in ("/metrics", "/"):
                await _respond(stream, 404, b"not found: try /metrics\n")
            else:
                try:
                    body = render()
                except Exception as e:  # a collector's bug fails the scrape, not the daemon
                    log.exception("metrics: a scrape failed")
                    await _respond(stream, 500, f"scrape failed: {e}\n".encode())
                    return
                await _respond(stream, 200, body, CONTENT_TYPE_LATEST, head=method == "HEAD")
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the scraper went away
    finally:
        if reading is not None:
            reading.pop(key, None)
        await trio.aclose_forcefully(stream)


async def _respond(stream: trio.SocketStream, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
                   head: bool = False) -> None:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large",
              500: "Internal Server Error"}[code]
    header = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
              f"Connection: close\r\n\r\n").encode()
    await stream.send_all(header + (b"" if head else body))
