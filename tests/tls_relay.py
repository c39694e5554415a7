"""Relays for the TLS tests: a passive TCP forwarder that can record and corrupt what it carries,
and a man in the middle that terminates TLS with its own certificate. Threads; ``close`` stops them."""
from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable


class Relay:
    """Listens on 127.0.0.1:port and forwards every connection to ``upstream``. ``seen`` holds the
    source->target bytes of every connection; ``tamper(conn_index, offset, chunk) -> chunk`` may alter them."""

    def __init__(self, upstream: tuple[str, int],
                 tamper: Callable[[int, int, bytes], bytes] | None = None) -> None:
        self.upstream = upstream
        self.tamper = tamper
        self.seen: list[bytearray] = []
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                down, _ = self.lsock.accept()
            except OSError:
                return
            try:
                up = self.connect_upstream()
            except OSError:
                down.close()
                continue
            self._socks += [down, up]
            index = len(self.seen)
            self.seen.append(bytearray())
            self.start_pumps(down, up, index)

    def connect_upstream(self) -> socket.socket:
        return socket.create_connection(self.upstream)

    def start_pumps(self, down: socket.socket, up: socket.socket, index: int) -> None:
        threading.Thread(target=self._pump, args=(down, up, index), daemon=True).start()
        threading.Thread(target=self._pump, args=(up, down, None), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, index: int | None) -> None:
        offset = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if index is not None:
                    self.seen[index] += data
                    if self.tamper is not None:
                        data = self.tamper(index, offset, data)
                    offset += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self.lsock.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass


class TlsMitm(Relay):
    """Terminates the source's TLS with its own certificate and opens its own TLS to the target,
    forwarding the plaintext: what a relay that holds some other key can do."""

    def __init__(self, upstream: tuple[str, int], certfile: str, keyfile: str) -> None:
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.load_cert_chain(certfile, keyfile)
        self.client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.client_ctx.check_hostname = False
        self.client_ctx.verify_mode = ssl.CERT_NONE
        self.handshakes = 0
        super().__init__(upstream)

    def start_pumps(self, down: socket.socket, up: socket.socket, index: int) -> None:
        def run() -> None:
            try:
                d = self.server_ctx.wrap_socket(down, server_side=True)
                u = self.client_ctx.wrap_socket(up)
            except (OSError, ssl.SSLError):
                down.close()
                up.close()
                return
            self.handshakes += 1
            self._socks += [d, u]
            threading.Thread(target=self._pump, args=(u, d, None), daemon=True).start()
            self._pump(d, u, index)

        threading.Thread(target=run, daemon=True).start()
