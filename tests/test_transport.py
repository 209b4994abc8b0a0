"""sipcore.transport over real loopback sockets: what becomes of a TCP
send that cannot go out."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

from sipha.sipp import free_port
from sipcore.transport import SipTransport, certificate_names, name_allowed


def failures_of(scenario) -> list:
    failed = []

    async def go():
        t = SipTransport(lambda *a: None, on_send_failed=lambda data, dest, gone: failed.append((data, dest, gone)))
        await t.listen("127.0.0.1", 0)
        try:
            await scenario(t)
            for _ in range(50):
                if failed:
                    break
                await asyncio.sleep(0.02)
        finally:
            await t.close()
    asyncio.run(go())
    return failed


def test_a_peer_whose_own_connection_closed_is_not_dialled_back():
    """Its port was its own for that connection (a phone's flow): a
    request for it fails at once, said to be for a flow gone."""
    async def scenario(t):
        phone = socket.create_connection(t.local)
        peer = phone.getsockname()
        await asyncio.sleep(0.05)
        assert peer in t.connections
        phone.close()
        await asyncio.sleep(0.05)
        t.send(b"INVITE ...", peer, "tcp")
        assert not t._connecting                   # no connect was tried
        scenario.peer = peer

    assert failures_of(scenario) == [(b"INVITE ...", scenario.peer, True)]


def test_a_connection_that_cannot_be_opened_is_said_so():
    dest = ("127.0.0.1", free_port())              # nobody listens there

    async def scenario(t):
        t.send(b"OPTIONS ...", dest, "tcp")

    assert failures_of(scenario) == [(b"OPTIONS ...", dest, False)]


def test_a_datagram_for_the_other_address_family_is_an_oserror():
    """An IPv4 socket asked to send to an IPv6 address (a phone's IPv6
    Contact, an IPv6 upstream): uvloop, which the proxy and nodes run on,
    raised ValueError, which nothing caught (a traceback per packet);
    callers handle OSError."""
    uvloop = pytest.importorskip("uvloop")

    async def go():
        t = SipTransport(lambda *a: None)
        await t.listen("127.0.0.1", 0, tcp=False)
        try:
            with pytest.raises(OSError, match="family"):
                t.send(b"OPTIONS ...", ("::1", 5060), "udp")
        finally:
            await t.close()
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(go())
    finally:
        loop.close()


def test_a_datagram_that_comes_while_tcp_binds_can_be_answered():
    """Seen at a node's start under traffic: the proxy's probe came in
    while the TCP side was still being bound, and its answer failed with
    "no UDP socket". The UDP side answers from the moment it reads."""
    answered, failures = [], []

    async def go():
        loop = asyncio.get_running_loop()
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)

        def on_message(msg, src, transport):
            try:
                t.send(b"SIP/2.0 200 OK\r\n\r\n", src)
                answered.append(src)
            except OSError as exc:
                failures.append(str(exc))

        t = SipTransport(on_message)
        create_server = loop.create_server

        async def slow_create_server(*args, **kwargs):
            # the probe arrives between the UDP bind and the TCP one
            port = kwargs.get("port") or args[2]
            client.sendto(b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK1\r\n"
                          b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:x@127.0.0.1>\r\nCall-ID: c1\r\n"
                          b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n", ("127.0.0.1", port))
            await asyncio.sleep(0.1)
            return await create_server(*args, **kwargs)
        loop.create_server = slow_create_server
        try:
            await t.listen("127.0.0.1", 0)
        finally:
            loop.create_server = create_server
            await t.close()
            client.close()
    asyncio.run(go())
    assert failures == [] and len(answered) == 1


def test_datagrams_that_waited_through_a_stall_are_marked_stale():
    """What waited in the socket while the process stood still is read
    with msg.stale (the node does not handle such requests); what comes
    after is not."""
    got = []

    async def go():
        t = SipTransport(lambda msg, src, transport: got.append((msg.call_id, msg.stale)))
        await t.listen("127.0.0.1", 0, tcp=False)
        assert t.measure_wait()
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            def options(call_id: str) -> bytes:
                return (f"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK{call_id}\r\n"
                        f"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:x@127.0.0.1>\r\nCall-ID: {call_id}\r\n"
                        f"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()
            client.sendto(options("before"), t.local)
            await asyncio.sleep(0.1)
            for call_id in ("queued-1", "queued-2"):
                client.sendto(options(call_id), t.local)
            time.sleep(0.3)                      # the loop stands still: they wait in the socket
            assert t.mark_backlog()
            await asyncio.sleep(0.1)
            client.sendto(options("after"), t.local)
            await asyncio.sleep(0.1)
        finally:
            client.close()
            await t.close()
    asyncio.run(go())
    assert got == [("before", False), ("queued-1", True), ("queued-2", True), ("after", False)]


@pytest.mark.parametrize("cert, names", [
    ({"subject": ((("commonName", "sbc.example.com"),),),
      "subjectAltName": (("DNS", "SIP.example.com."), ("URI", "sips:edge.example.com;transport=tls"),
                         ("URI", "https://example.com/x"), ("IP Address", "192.0.2.1"))},
     ["sip.example.com", "edge.example.com"]),                  # the subjectAltNames, not the CN
    ({"subject": ((("countryName", "US"),), (("commonName", "Trunk.Example.org"),))}, ["trunk.example.org"]),
    ({}, []),
])
def test_a_certificates_names_are_its_dns_and_sip_names_else_its_common_name(cert, names):
    assert certificate_names(cert) == names


@pytest.mark.parametrize("names, allowed, ok", [
    (["sip.pstnhub.microsoft.com"], ("sip.pstnhub.microsoft.com",), True),
    (["sip2.pstnhub.microsoft.com"], ("*.pstnhub.microsoft.com",), True),
    (["a.b.pstnhub.microsoft.com"], ("*.pstnhub.microsoft.com",), False),    # one label only
    (["pstnhub.microsoft.com"], ("*.pstnhub.microsoft.com",), False),
    (["*.pstnhub.microsoft.com"], ("sip.pstnhub.microsoft.com",), True),     # a wildcard certificate
    (["evil.com"], ("*.pstnhub.microsoft.com", "trunk.example.org"), False),
    ([], ("trunk.example.org",), False),
])
def test_a_peer_is_let_in_by_a_name_or_a_one_label_wildcard(names, allowed, ok):
    assert name_allowed(names, allowed) is ok


def test_keepalives_are_answered_and_told():
    """RFC 5626 §4.4: a CRLF CRLF over TCP gets a CRLF back, a STUN Binding
    request over UDP its response, from the SIP socket it reached; each
    is told to on_keepalive ("crlf", "stun"), and SIP on the same
    connection and socket goes on as before."""
    told, got = [], []

    async def go():
        t = SipTransport(lambda msg, src, kind: got.append((msg.method, kind)))
        t.on_keepalive = told.append
        await t.listen("127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        try:
            tcp = socket.create_connection(t.local)
            tcp.setblocking(False)
            tcp.sendall(b"\r\n\r\n")
            assert await asyncio.wait_for(loop.sock_recv(tcp, 16), 2) == b"\r\n"
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            udp.setblocking(False)
            udp.sendto(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"k" * 12, t.local)
            answer = await asyncio.wait_for(loop.sock_recv(udp, 64), 2)
            assert answer[:2] == b"\x01\x01" and answer[8:20] == b"k" * 12
            options = (b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKka\r\n"
                       b"From: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: ka\r\nCSeq: 1 OPTIONS\r\n"
                       b"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
            tcp.sendall(options)
            udp.sendto(options, t.local)
            for _ in range(100):
                if len(got) == 2:
                    break
                await asyncio.sleep(0.02)
            tcp.close()
            udp.close()
        finally:
            await t.close()
    asyncio.run(go())
    assert told == ["crlf", "stun"]
    assert sorted(got) == [("OPTIONS", "tcp"), ("OPTIONS", "udp")]
