"""One gate for tests that need something of the host (root, /dev/fuse, a tool, libnbd's bindings).

Outside CI a missing facility skips the test with the reason printed; under ``CI=true`` (any value
but empty/0/false/no) it is a failure: a broken install must not turn a suite green by skipping it.
"""
from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Iterable
from types import ModuleType

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(missing: Iterable[str], what: str) -> None:
    """Skip (outside CI) or fail (in CI) when anything is ``missing``; ``what`` names the tests."""
    missing = list(missing)
    if not missing:
        return
    reason = f"{what} need " + ", ".join(missing)
    if in_ci():
        pytest.fail(reason + " (in CI they must run)", pytrace=False)
    print(reason)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, what: str, hint: str = "") -> ModuleType:
    """``import name``, or skip/fail like ``require`` (works at module level, like importorskip)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        require([f"the Python module {name!r}{' (' + hint + ')' if hint else ''}: {e}"], what)
        raise  # unreachable: require() skipped or failed


def require_tool(name: str, what: str | None = None) -> str:
    """The path of the executable ``name``, or skip/fail like ``require``."""
    path = shutil.which(name)
    if path is None:
        require([name], what or f"tests using {name}")
    assert path is not None
    return path


def require_nbd() -> ModuleType:
    """libnbd's Python bindings (``import nbd``), which every real-client NBD test uses."""
    return require_module("nbd", "NBD client tests", "libnbd's Python bindings: python3-libnbd, or the venv's "
                          "system-site-packages")
