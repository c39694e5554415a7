"""Errors of the replication protocol; each says whose fault it is (after h11)."""
from __future__ import annotations


class WireError(Exception):
    """Base class: the replication link cannot go on; the message is for the user."""


class RemoteProtocolError(WireError):
    """The peer broke the protocol (bad frame, bad checksum, unexpected message)."""


class PeerClosed(RemoteProtocolError):
    """The peer closed the connection (a source stopping, or a host going away): not a protocol fault."""


class LocalProtocolError(WireError):
    """We were asked to send something illegal in the current state (a bug on our side)."""


class AuthError(RemoteProtocolError):
    """The peer's proof of the pre-shared key is wrong or missing."""


class PeerError(WireError):
    """The peer reported an error (version or size mismatch, busy replica...) and closes the link."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class PeerSilent(WireError):
    """Nothing arrived from the peer within the timeout."""
