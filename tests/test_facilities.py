"""The facility gate: a missing facility skips with its reason outside CI and fails under CI=true."""
from __future__ import annotations

import pytest

from tests.facilities import in_ci, require, require_module, require_tool


@pytest.mark.parametrize("value,ci", [("true", True), ("1", True), ("", False), ("false", False), ("0", False)])
def test_ci_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, ci: bool) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci() is ci


def test_missing_module_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no_such_module_for_vdisk.*in CI they must run"):
        require_module("no_such_module_for_vdisk", "these tests")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-for-vdisk"):
        require_tool("no-such-tool-for-vdisk")


def test_missing_facility_skips_with_a_printed_reason_outside_ci(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="these tests need root"):
        require(["root"], "these tests")
    assert "these tests need root" in capsys.readouterr().out


def test_present_facilities_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    require([], "nothing")
    assert require_module("json", "json tests").dumps(1) == "1"
    assert require_tool("sh").endswith("/sh")
