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


# ----------------------------------------------------------------------------- origins (issue 21 #3)
from hypothesis import given
from hypothesis import strategies as st

from tagfer.core.trusted_hosts import normalize_origin, origin_allowed

HOSTS = st.sampled_from(["localhost", "127.0.0.1", "[::1]", "box.lan", "Example.COM"])
PORTS = st.one_of(st.none(), st.integers(1, 65535))


@given(st.sampled_from(["http", "https", "HTTP"]), HOSTS, PORTS)
def test_origin_normalisation_is_idempotent_and_same_origin_matches_the_host_header(scheme, host, port):
    origin = f"{scheme}://{host}" + ("" if port is None else f":{port}")
    n = normalize_origin(origin)
    assert normalize_origin(n) == n and n == n.lower()
    host_header = host + ("" if port is None else f":{port}")
    assert origin_allowed(origin, "cross-site", scheme.lower(), host_header)  # Origin decides when present
    other = f"{scheme}://{host}:{(port or 80) % 65535 + 1}"
    if normalize_origin(other) != n:
        assert not origin_allowed(other, None, scheme.lower(), host_header)
        assert origin_allowed(other, None, scheme.lower(), host_header, [normalize_origin(other)])


@pytest.mark.parametrize("bad", ["null", "", "file://", "http://a.b/path", "ftp://x", "http://user@x", "http://x:99999"])
def test_malformed_or_opaque_origins_are_refused(bad):
    assert not origin_allowed(bad, None, "http", "x")
    if bad not in ("null", ""):
        with pytest.raises(ValueError):
            normalize_origin(bad)


def test_default_ports_and_fetch_metadata():
    assert normalize_origin("HTTP://Box.LAN:80/") == "http://box.lan" and normalize_origin("https://x:443") == "https://x"
    assert origin_allowed("http://127.0.0.1", None, "http", "127.0.0.1:80")
    assert origin_allowed(None, None, "http", "x")  # not a browser
    assert origin_allowed(None, "same-origin", "http", "x") and origin_allowed(None, "none", "http", "x")
    assert not origin_allowed(None, "same-site", "http", "x") and not origin_allowed(None, "cross-site", "http", "x")
