"""Reading /proc/self/mountinfo: the one way to ask "is this a mountpoint" that never touches the mount.

``os.path.ismount`` stats the directory, which hangs when the mount's server is wedged and deadlocks
when the asking process is that server; it also fails on dead (ENOTCONN) FUSE mounts.
"""
from __future__ import annotations

import os


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    return os.fsdecode(field.encode().decode("unicode_escape").encode("latin-1"))


def mount_source(path: str | os.PathLike[str]) -> str | None:
    """What is mounted on ``path`` (the topmost mount), or None. ``path`` is taken as given (made
    absolute, not resolved): resolving it would stat the mount we are asking about."""
    target = os.path.normpath(os.path.abspath(path))
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if _unescape(parts[4]) == target:
                found = _unescape(parts[parts.index("-") + 2])
    return found


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    return mount_source(path) is not None
