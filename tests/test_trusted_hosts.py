"""tagfer.core.trusted_hosts: the allow-list of Host names served by tagfer's local web servers."""

from __future__ import annotations

import pytest

from tagfer.core.trusted_hosts import LOCAL_HOSTS, allowed_hosts, bind_note, normalize_host


def test_defaults_and_bound_host():
    assert allowed_hosts() == list(LOCAL_HOSTS) == ["localhost", "127.0.0.1", "[::1]"]
    assert allowed_hosts("127.0.0.1") == list(LOCAL_HOSTS)
    assert allowed_hosts("10.0.0.5")[-1] == "10.0.0.5"
    assert allowed_hosts("::1") == list(LOCAL_HOSTS)  # bracketed like a Host header
    for wildcard in ("0.0.0.0", "::", "[::]", ""):  # not names a client uses: nothing added
        assert allowed_hosts(wildcard) == list(LOCAL_HOSTS)
    assert allowed_hosts("0.0.0.0", ["Box.LAN", "box.lan", "fe80::1"]) == [*LOCAL_HOSTS, "box.lan", "[fe80::1]"]
    assert allowed_hosts(None, ["*"])[-1] == "*" and allowed_hosts(None, ["*.corp.example"])[-1] == "*.corp.example"


@pytest.mark.parametrize("bad", ["http://x.lan", "x.lan:8000", "x.lan/path", "a b", "", "x..lan", "*x.lan", "[not-ip]"])
def test_malformed_names_are_rejected(bad):
    with pytest.raises(ValueError):
        normalize_host(bad)
    with pytest.raises(ValueError):
        allowed_hosts(None, [bad])


def test_bind_note_only_for_wildcard_binds_without_extra_names():
    assert "--allowed-host" in bind_note("0.0.0.0") and "--allowed-host" in bind_note("::")
    assert bind_note("0.0.0.0", ["box.lan"]) is None
    assert bind_note("127.0.0.1") is None and bind_note("box.lan") is None
