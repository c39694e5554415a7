"""The daemon's control API: one JSON object per line over a unix socket in the abstract namespace.

Abstract sockets vanish with their process (nothing stale after kill -9) and have no path-length
limit; the server accepts only peers of its own uid (SO_PEERCRED).

Request:  {"cmd": "status", ...args}
Reply:    {"ok": true, "version": 1, ...} or {"ok": false, "version": 1, "error": "..."}
Commands are registered by name (``ControlServer.register``); every server answers ``hello`` (its
role, protocol version and commands). docs/CONTROL_API.md documents every command and field;
``VERSION`` goes up when a field changes meaning or goes away (new fields do not change it).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_LINE = 1 << 20
VERSION = 1


class ControlError(Exception):
    """A control request failed; the message is for the user."""


def control_address(data_dir: Path, pid: int) -> str:
    """The abstract socket of the daemon ``pid`` on ``data_dir`` (`vdisk serve` and `vdisk target` alike)."""
    digest = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return f"\0vdisk-{digest}-{pid}"


class ControlServer:
    """Dispatches JSON-line requests to registered handlers; ``role`` is "serve" or "target"."""

    def __init__(self, role: str = "serve") -> None:
        self.role = role
        self._handlers: dict[str, Handler] = {"hello": self._hello}

    async def _hello(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"role": self.role, "pid": os.getpid(), "commands": sorted(self._handlers)}

    def register(self, cmd: str, handler: Handler) -> None:
        self._handlers[cmd] = handler

    async def serve(self, address: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(address)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started(address)
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._client, stream)

    async def _client(self, stream: trio.SocketStream) -> None:
        async with stream:
            creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid != os.getuid() and uid != 0:
                return
            buf = b""
            try:
                while True:
                    while b"\n" not in buf:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            return
                        buf += chunk
                        if len(buf) > MAX_LINE:
                            await stream.send_all(_encode({"ok": False, "version": VERSION,
                                                           "error": "request too long"}))
                            return
                    line, buf = buf.split(b"\n", 1)
                    await stream.send_all(_encode(await self._dispatch(line)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("a request is a JSON object with a string 'cmd'")  # noqa: TRY004 - reported as a bad request
        except ValueError as e:
            return {"ok": False, "version": VERSION, "error": f"bad request: {e}"}
        handler = self._handlers.get(req["cmd"])
        if handler is None:
            return {"ok": False, "version": VERSION, "error": f"unknown command {req['cmd']!r}"}
        try:
            reply = await handler(req)
        except ControlError as e:
            return {"ok": False, "version": VERSION, "error": str(e)}
        return {"ok": True, "version": VERSION, **reply}


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, default=str).encode() + b"\n"


def call(address: str, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Blocking client for the CLI: send one request, return the reply (ControlError if not ok)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(address)
        except OSError as e:
            raise ControlError(f"cannot reach the vdisk daemon: {e.strerror or e}") from None
        s.sendall(_encode({"cmd": cmd, **args}))
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ControlError("the vdisk daemon closed the control connection")
            buf += chunk
    except TimeoutError:
        raise ControlError(f"the vdisk daemon did not answer {cmd!r} within {timeout:.0f}s") from None
    finally:
        s.close()
    reply = json.loads(buf.split(b"\n", 1)[0])
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return reply
