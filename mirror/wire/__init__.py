"""The replication wire protocol: sans-IO frames and handshake (codec, connection) plus a thin trio link."""
from .connection import Connection, Role, State
from .errors import (
           AuthError,
           LocalProtocolError,
           PeerClosed,
           PeerError,
           PeerSilent,
           RemoteProtocolError,
           WireError,
)
from .events import PROTOCOL_VERSION

__all__ = [
           "PROTOCOL_VERSION",
           "AuthError",
           "Connection",
           "LocalProtocolError",
           "PeerClosed",
           "PeerError",
           "PeerSilent",
           "RemoteProtocolError",
           "Role",
           "State",
           "WireError",
]
