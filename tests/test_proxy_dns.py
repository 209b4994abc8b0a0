"""Named trunks (RFC 3263): a real proxy, a DNS server on loopback, test
sockets playing a node and the trunk's servers. What does a request a
node addresses to `sip:bob@trunk.test` reach, and what if that server is
silent or refuses?"""
from __future__ import annotations

import asyncio
import select
import socket
import time
import uuid

import pytest

from proxy.dns import DnsResolver, Target
from sipcore.bekey import ROUTE_HEADER
from sipcore.message import parse_message
from sipha.cluster import admin_get
from sipha.sipp import free_port

from clusterkit import run, uac
from dnsserver import DnsServer
from procs import has_ipv6_loopback

pytestmark = pytest.mark.e2e


def udp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


class Trunk:
    """A proxy whose node (a test socket) sends requests to named trunks,
    whose servers are test sockets too."""

    def __init__(self, procs, dns: DnsServer, failover: float = 0.5, port6: int | None = None):
        """`port6`: the proxy listens on [::1] too, at this port (and on
        127.0.0.1 at the same one)."""
        self.dns = dns
        self.node = udp_socket()
        self.node_port = self.node.getsockname()[1]
        self.servers = [udp_socket(), udp_socket()]
        self.ports = [s.getsockname()[1] for s in self.servers]
        self.admin = free_port()
        self.proxy, self.addr = procs.proxy(
            {"node1": self.node.getsockname()}, "--no-probe", "--admin", f"127.0.0.1:{self.admin}",
            *(("--listen", f"[::1]:{port6}") if port6 else ()), port=port6,
            env={"SIPHA_PROXY_DNS_SERVERS": dns.spec, "SIPHA_PROXY_DNS_FAILOVER": str(failover)})

    def request(self, uri: str, call_id: str, method: str = "INVITE", branch: str = "z9hG4bKnode1") -> None:
        msg = (f"{method} {uri} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP 127.0.0.1:{self.node_port};branch={branch};rport\r\n"
               f"Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <{uri}>\r\n"
               f"Call-ID: {call_id}\r\nCSeq: 1 {method}\r\nContact: <sip:alice@127.0.0.1:{self.node_port}>\r\n"
               f"{ROUTE_HEADER}: bekey=1;owner=node1\r\nContent-Length: 0\r\n\r\n")
        self.node.sendto(msg.encode(), self.addr)

    def reached(self, timeout: float = 3.0):
        """-> (index of the server that got a request, the request)."""
        ready, _, _ = select.select(self.servers, [], [], timeout)
        assert ready, "no server of the trunk got the request"
        return self.servers.index(ready[0]), parse_message(ready[0].recv(65535))

    def nothing_reached(self, timeout: float = 0.3) -> bool:
        return not select.select(self.servers, [], [], timeout)[0]

    def node_recv(self, timeout: float = 3.0):
        self.node.settimeout(timeout)
        return parse_message(self.node.recv(65535))

    def close(self):
        for s in (self.node, *self.servers):
            s.close()


@pytest.fixture
def dns():
    d = DnsServer()
    yield d
    d.close()


@pytest.fixture
def trunk(procs, dns):
    t = Trunk(procs, dns)
    yield t
    t.close()


def test_srv_servers_in_priority_order_and_a_silent_one_is_left_for_the_next(trunk, dns):
    dns.srv("_sip._udp.trunk.test", (10, 0, trunk.ports[0], "localhost"), (20, 0, trunk.ports[1], "localhost"))
    cid = uuid.uuid4().hex
    trunk.request("sip:bob@trunk.test", cid)
    first, invite = trunk.reached()
    assert first == 0 and invite.uri == "sip:bob@trunk.test"
    ours = invite.top_via.branch
    trunk.request("sip:bob@trunk.test", cid)            # the node's retransmission, early
    assert trunk.reached()[0] == 0
    time.sleep(0.6)                                     # past proxy.dns_failover, unanswered
    trunk.request("sip:bob@trunk.test", cid)
    second, again = trunk.reached()
    assert second == 1 and again.top_via.branch == ours
    trunk.request("sip:bob@trunk.test", cid, method="CANCEL")
    where, cancel = trunk.reached()
    assert where == 1 and cancel.method == "CANCEL" and cancel.top_via.branch == ours
    # the silent server is now tried last: the next call goes straight on
    trunk.request("sip:bob@trunk.test", uuid.uuid4().hex, branch="z9hG4bKnode2")
    assert trunk.reached()[0] == 1
    log = trunk.proxy.text()
    assert "event=dns_failover" in log and f'failed=127.0.0.1:{trunk.ports[0]}/udp' in log
    assert "event=dns_resolved host=trunk.test service=_sip._udp" in log
    assert dns.asked[("_sip._udp.trunk.test.", "SRV")] == 1      # cached for its TTL
    # what an operator sees: the name's servers, and the silent one set aside
    view = admin_get(trunk.admin)["dns"]
    assert sorted(view["names"]["trunk.test"]["servers"]) == sorted(f"127.0.0.1:{p}/udp" for p in trunk.ports)
    assert view["names"]["trunk.test"]["srv"] is True
    assert 55 < view["servers_down_s"][f"127.0.0.1:{trunk.ports[0]}/udp"] <= 60


def test_srv_weights_spread_calls_and_each_call_keeps_its_server(trunk, dns):
    dns.srv("_sip._udp.trunk.test", (10, 1, trunk.ports[0], "localhost"), (10, 3, trunk.ports[1], "localhost"))
    got = [0, 0]
    for i in range(80):
        cid = f"spread-{i}"
        trunk.request("sip:bob@trunk.test", cid, branch=f"z9hG4bKs{i}")
        where, _ = trunk.reached()
        got[where] += 1
        trunk.request("sip:bob@trunk.test", cid, method="CANCEL", branch=f"z9hG4bKs{i}")
        assert trunk.reached()[0] == where           # the CANCEL follows its INVITE
    assert 8 <= got[0] <= 34 and got[0] + got[1] == 80, got      # 1:3 by weight (20 expected)


def test_a_name_that_does_not_resolve_gets_478_at_once_and_is_not_asked_again(trunk, dns):
    for n in range(2):
        trunk.request("sip:bob@nosuch.invalid", uuid.uuid4().hex, branch=f"z9hG4bKx{n}")
        resp = trunk.node_recv()
        assert resp.status == 478 and resp.reason == "Unresolvable Destination"
    assert dns.asked[("_sip._udp.nosuch.invalid.", "SRV")] == 1
    assert trunk.nothing_reached()
    assert "status=478" in trunk.proxy.text() and 'why="no SRV and no address"' in trunk.proxy.text()


def test_a_port_in_the_uri_means_no_srv_lookup(trunk, dns):
    dns.srv("_sip._udp.localhost", (10, 0, trunk.ports[0], "localhost"))
    trunk.request(f"sip:bob@localhost:{trunk.ports[1]}", uuid.uuid4().hex)
    where, msg = trunk.reached()
    assert where == 1 and msg.uri == f"sip:bob@localhost:{trunk.ports[1]}"
    assert not dns.asked


def test_no_srv_records_means_the_names_address_at_5060(trunk, dns):
    """RFC 3263 §4.2: no SRV -> A records, port 5060. Nothing listens on
    127.0.0.1:5060 here, so what tells is that the proxy asked and sent
    (its log), and the node hears nothing back but its own timers."""
    trunk.request("sip:bob@localhost", uuid.uuid4().hex)
    deadline = time.monotonic() + 3
    while "dest=127.0.0.1:5060/udp" not in trunk.proxy.text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "dest=127.0.0.1:5060/udp" in trunk.proxy.text()
    assert dns.asked[("_sip._udp.localhost.", "SRV")] == 1 and dns.asked[("_sip._tcp.localhost.", "SRV")] == 1


def test_over_tcp_a_server_that_refuses_is_passed_over_at_once(procs, dns):
    closed = free_port()                       # nothing listens there
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    t = Trunk(procs, dns, failover=30.0)       # no waiting for a timer here
    try:
        dns.srv("_sip._tcp.trunk.test", (10, 0, closed, "localhost"), (20, 0, listener.getsockname()[1], "localhost"))
        started = time.monotonic()
        t.request("sip:bob@trunk.test;transport=tcp", uuid.uuid4().hex)
        listener.settimeout(3)
        conn, _ = listener.accept()
        conn.settimeout(3)
        data = conn.recv(65535)
        assert data.startswith(b"INVITE sip:bob@trunk.test;transport=tcp SIP/2.0")
        assert time.monotonic() - started < 2.0
        assert 'why="connection failed"' in t.proxy.text()
        conn.close()
    finally:
        listener.close()
        t.close()


def test_calls_to_a_named_trunk_get_past_its_dead_first_server(make_cluster, dns, monkeypatch):
    """The whole path: the nodes' upstream is `sip:trunk.test`, whose
    NAPTR record names its SRV records, which name first a server that is
    down (nothing on its port), then the SIPp trunk. Every call completes;
    the first ones wait a second on the dead server, the later ones skip
    it."""
    monkeypatch.setenv("SIPHA_NODE_UPSTREAM", "sip:trunk.test")
    monkeypatch.setenv("SIPHA_PROXY_DNS_SERVERS", dns.spec)
    monkeypatch.setenv("SIPHA_PROXY_DNS_FAILOVER", "1.0")
    c = make_cluster(nodes=2)
    dns.naptr("trunk.test", (10, 10, "SIP+D2U", "_sip._udp.trunk.test"))
    dns.srv("_sip._udp.trunk.test", (10, 0, free_port(), "localhost"),
            (20, 0, c.state["trunk"]["port"], "localhost"))
    result = run(uac(c, "uac", calls=30, rate=10, hold_ms=200).run(60))
    assert result.ok == 30 and result.failed == 0, result.log_tail
    assert result.retransmissions == 0
    proxy_log = (c.dir / "logs" / "proxy.log").read_text()
    assert 1 <= proxy_log.count("event=dns_failover") < 30
    assert dns.asked[("_sip._udp.trunk.test.", "SRV")] == 1
    assert "naptr=SIP+D2U service=_sip._udp.trunk.test" in proxy_log


def test_naptr_records_choose_the_srv_name_by_order_and_skip_what_cannot_be_used(trunk, dns):
    """RFC 3263 §4.1: the first NAPTR record, by order then preference,
    for a transport the proxy sends over and whose SRV name has records.
    Before it: TLS (the proxy has no TLS listener), a record whose SRV name
    has none. The name's own `_sip._udp` SRV records are not used."""
    dns.naptr("trunk.test", (5, 10, "SIPS+D2T", "_sips._tcp.trunk.test"),
              (10, 10, "SIP+D2U", "_sip._udp.empty.test"),
              (20, 20, "SIP+D2U", "_sip._udp.first.test"),
              (20, 10, "SIP+D2U", "_sip._udp.carrier.test"))
    dns.srv("_sips._tcp.trunk.test", (10, 0, trunk.ports[0], "localhost"))
    dns.srv("_sip._udp.carrier.test", (10, 0, trunk.ports[1], "localhost"))
    dns.srv("_sip._udp.first.test", (10, 0, trunk.ports[0], "localhost"))
    dns.srv("_sip._udp.trunk.test", (10, 0, trunk.ports[0], "localhost"))
    trunk.request("sip:bob@trunk.test", uuid.uuid4().hex)
    where, invite = trunk.reached()
    assert where == 1 and invite.uri == "sip:bob@trunk.test"
    assert trunk.nothing_reached()
    assert (f"event=dns_resolved host=trunk.test naptr=SIP+D2U service=_sip._udp.carrier.test "
            f'hops=127.0.0.1:{trunk.ports[1]}/udp') in trunk.proxy.text()
    assert dns.asked[("trunk.test.", "NAPTR")] == 1 and not dns.asked[("_sips._tcp.trunk.test.", "SRV")]
    assert dns.asked[("_sip._udp.empty.test.", "SRV")] == 1 and not dns.asked[("_sip._udp.first.test.", "SRV")]
    assert not dns.asked[("localhost.", "A")]           # /etc/hosts names it
    # a transport in the URI: its SRV name straight away (§4.1), no NAPTR
    trunk.request("sip:bob@other.test;transport=udp", uuid.uuid4().hex, branch="z9hG4bKnode2")
    deadline = time.monotonic() + 3
    while not dns.asked[("_sip._udp.other.test.", "SRV")] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dns.asked[("_sip._udp.other.test.", "SRV")] == 1 and not dns.asked[("other.test.", "NAPTR")]


def test_naptr_with_no_usable_record_falls_back_to_the_srv_names(trunk, dns):
    dns.naptr("trunk.test", (10, 10, "SIP+D2U", "_sip._udp.gone.test"), (20, 10, "E2U+sip", "x.trunk.test"))
    dns.srv("_sip._udp.trunk.test", (10, 0, trunk.ports[0], "localhost"))
    trunk.request("sip:bob@trunk.test", uuid.uuid4().hex)
    assert trunk.reached()[0] == 0
    assert "event=dns_resolved host=trunk.test service=_sip._udp.trunk.test" in trunk.proxy.text()


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this host has no IPv6 loopback (::1)")
def test_a_server_with_only_an_ipv6_address_is_reached_when_the_proxy_listens_on_ipv6(procs, dns):
    """AAAA: the SRV target has no IPv4 address; the proxy, listening on
    [::1] as well, sends over IPv6. Addresses of a name the system's
    resolver does not know come from proxy.dns_servers."""
    server6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    server6.bind(("::1", 0))
    port = free_port()
    t = Trunk(procs, dns, port6=port)
    try:
        dns.srv("_sip._udp.trunk.test", (10, 0, server6.getsockname()[1], "v6only.trunk.test"))
        dns.add("v6only.trunk.test", "AAAA", "::1")
        t.request("sip:bob@trunk.test", uuid.uuid4().hex)
        server6.settimeout(3)
        invite = parse_message(server6.recv(65535))
        assert invite.uri == "sip:bob@trunk.test" and invite.top_via.host == "[::1]"
        assert f"hops=[::1]:{server6.getsockname()[1]}/udp" in t.proxy.text()
        assert dns.asked[("v6only.trunk.test.", "A")] == 1
    finally:
        server6.close()
        t.close()


@pytest.mark.parametrize("ipv4, ipv6, hosts, asked", [
    (True, False, ["192.0.2.7"], ["A"]),
    (True, True, ["192.0.2.7", "2001:db8::7"], ["A", "AAAA"]),
    (False, True, ["2001:db8::7"], ["AAAA"]),       # a proxy listening on IPv6 only
])
def test_addresses_are_asked_for_the_families_the_proxy_can_send_to(dns, ipv4, ipv6, hosts, asked):
    dns.add("both.trunk.test", "A", "192.0.2.7")
    dns.add("both.trunk.test", "AAAA", "2001:db8::7")
    resolver = DnsResolver([dns.addr], frozenset({"udp"}))
    resolver.ipv4, resolver.ipv6 = ipv4, ipv6
    hops = asyncio.run(resolver.lookup(Target("both.trunk.test", 5060, "udp")))
    assert [h.host for h in hops] == hosts and all(h.port == 5060 for h in hops)
    assert sorted(rtype for (name, rtype) in dns.asked if name == "both.trunk.test.") == asked
