"""panther._environ.get: os.environ.get, cheaper where the variable is unset."""

import os

import pytest

from panther import _environ


@pytest.mark.parametrize("value", ["1", "", "é and spaces", "x" * 300])
def test_it_reads_what_os_environ_holds_after_every_change(monkeypatch, value):
    name = "PANTHER_TEST_ENVIRON_GET"
    monkeypatch.delenv(name, raising=False)
    assert _environ.get(name) is None
    monkeypatch.setenv(name, value)
    assert _environ.get(name) == os.environ.get(name) == value
    os.environ[name] = value + "2"
    assert _environ.get(name) == value + "2"
    del os.environ[name]
    assert _environ.get(name) is None


def test_without_cpythons_mapping_it_asks_os_environ(monkeypatch):
    monkeypatch.setattr(_environ, "_data", None)
    monkeypatch.setenv("PANTHER_TEST_ENVIRON_GET", "on")
    assert _environ.get("PANTHER_TEST_ENVIRON_GET") == "on"


def test_a_replaced_os_environ_is_read_as_it_is(monkeypatch):
    monkeypatch.setattr(os, "environ", {"PANTHER_TEST_ENVIRON_GET": "replaced"})
    assert _environ.get("PANTHER_TEST_ENVIRON_GET") == "replaced"
