"""SIP over WebSocket (RFC 7118) at the proxy, plain (ws) and over TLS
(wss), as WebRTC clients (JsSIP, SIP.js) use it: a browser gives a
Contact and Via of `*.invalid`, so it is only ever reached over its own
connection. A scripted client speaks it (tests/phone.py WsClient)."""
from __future__ import annotations

import socket
import time

import pytest

from clusterkit import all_keys, calls_reach, first_read, logged, run, uac
from phone import Phone
from sipha.sipp import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def ws_cluster(make_cluster, monkeypatch):
    ports = {"ws": free_port(), "wss": free_port()}
    monkeypatch.setenv("SIPHA_PROXY_WS_LISTEN", f"127.0.0.1:{ports['ws']}")
    monkeypatch.setenv("SIPHA_PROXY_WSS_LISTEN", f"127.0.0.1:{ports['wss']}")
    c = make_cluster(nodes=2, tls=True)      # the certificate wss uses too
    c.ws_ports = ports
    return c


def browser(c, user: str, transport: str, origin: str | None = None) -> Phone:
    return Phone(user, ("127.0.0.1", c.ws_ports[transport]), transport=transport,
                 cafile=str(c.dir / "tls" / "cert.pem"), origin=origin)


@pytest.mark.parametrize("transport", ["ws", "wss"])
def test_a_browser_registered_over_websocket_is_called_from_udp(ws_cluster, transport):
    c = ws_cluster
    phone = browser(c, "wendy", transport)
    try:
        resp = phone.register(300)
        assert resp.status == 200, resp.reason
        path = resp.get("Path")
        assert path.startswith(f"<sip:127.0.0.1:{c.ws_ports[transport]};transport={transport};lr;"
                               f"flow={transport}:127.0.0.1:"), path
        calls_reach(c, phone, 2)
        assert phone.invite.top_via.transport == transport.upper()
        assert phone.invite.uri.endswith(f".invalid;transport={transport}")
    finally:
        phone.stop()


@pytest.mark.parametrize("transport", ["ws", "wss"])
def test_a_browser_calls_over_websocket_to_a_udp_trunk(ws_cluster, transport):
    phone = browser(ws_cluster, "walt", transport)
    try:
        assert phone.call("service", hold=0.2) == [200, 200]
    finally:
        phone.stop()
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(ws_cluster).values())


def test_a_browser_gone_gets_480_at_once_for_its_calls(ws_cluster):
    """Its connection closed: no one can dial a browser back (430 from
    the proxy at once, 480 to the caller), not Timer B's 408."""
    phone = browser(ws_cluster, "wanda", "ws")
    assert phone.register(300).status == 200
    phone.stop()
    time.sleep(0.2)
    t0 = time.monotonic()
    result = run(uac(ws_cluster, "uac", calls=1, rate=1, service="wanda").run(20))
    assert result.failed == 1 and "480 Temporarily Unavailable (flow failed)" in result.log_tail
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("request_bytes, answer", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 426 Upgrade Required"),
    (b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
])
def test_what_is_not_a_sip_websocket_gets_an_http_error_and_the_port_goes_on(ws_cluster, request_bytes, answer):
    with socket.create_connection(("127.0.0.1", ws_cluster.ws_ports["ws"]), timeout=5) as s:
        s.sendall(request_bytes)
        assert s.recv(200).startswith(answer)
    phone = browser(ws_cluster, "wes", "ws")
    try:
        phone.sock.sendall(phone.framer.frame(b"\r\n\r\n"))       # a keep-alive some clients send
        assert phone.register(300).status == 200
    finally:
        phone.stop()
    log = (ws_cluster.dir / "logs" / "proxy.log").read_text()
    assert "level=error" not in log and "Traceback" not in log and "event=parse_rejected" not in log


def test_a_connection_that_never_upgrades_is_closed_after_the_message_timeout(make_cluster, monkeypatch):
    port = free_port()
    monkeypatch.setenv("SIPHA_PROXY_WS_LISTEN", f"127.0.0.1:{port}")
    monkeypatch.setenv("SIPHA_LIMITS_TCP_MESSAGE_TIMEOUT", "1")
    c = make_cluster(nodes=1, trunk=None)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert first_read(s, 4) == b""
    assert 'reason="WebSocket upgrade not complete within 1s"' in (c.dir / "logs" / "proxy.log").read_text()


def test_with_ws_origins_only_pages_of_those_sites_get_in(make_cluster, monkeypatch):
    """A page of any site can open a WebSocket from a user's browser to the
    proxy (cross-site WebSocket hijacking); proxy.ws_origins lets in only
    the pages of the phone's own site. A client that sends no Origin is
    not a browser, and comes in."""
    port = free_port()
    monkeypatch.setenv("SIPHA_PROXY_WS_LISTEN", f"127.0.0.1:{port}")
    monkeypatch.setenv("SIPHA_PROXY_WS_ORIGINS", "https://phone.example.com, https://pbx.example.com:8443/")
    c = make_cluster(nodes=2)
    c.ws_ports = {"ws": port}
    for origin in ("https://Phone.example.com", "https://pbx.example.com:8443", None):
        phone = browser(c, "wanda", "ws", origin)
        try:
            assert phone.register(300).status == 200
        finally:
            phone.stop()
    with pytest.raises(OSError, match="403 Forbidden"):
        browser(c, "eve", "ws", "https://evil.example")
    log = logged(c.dir / "logs" / "proxy.log", "event=ws_refused")
    assert "event=ws_refused" in log and "origin 'https://evil.example' not allowed" in log
