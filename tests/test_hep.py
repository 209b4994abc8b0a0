"""HEP3 copies of the SIP a process sends and receives (sipcore/hep.py):
the packet format a Homer capture server reads, and a cluster whose
proxy and nodes copy each hop of real SIPp calls to a capture socket."""
from __future__ import annotations

import re
import socket
import struct
import time
import urllib.request

import pytest

from clusterkit import run, uac
from sipcore.config import ConfigError, load_config
from sipcore.hep import HepMirror, encode_hep3
from sipcore.message import parse_message
from sipha.cluster import admin_get


def decode(packet: bytes) -> dict:
    """A HEP3 packet -> its generic chunks by type id, checking the lengths."""
    assert packet[:4] == b"HEP3" and struct.unpack("!H", packet[4:6])[0] == len(packet)
    chunks, at = {}, 6
    while at < len(packet):
        vendor, kind, length = struct.unpack("!HHH", packet[at:at + 6])
        assert vendor == 0 and length >= 6 and at + length <= len(packet)
        chunks[kind] = packet[at + 6:at + length]
        at += length
    return chunks


def seen(chunks: dict) -> tuple[tuple[str, int], tuple[str, int]]:
    """-> (source, destination) of a decoded packet."""
    family = socket.AF_INET6 if chunks[1] == bytes([10]) else socket.AF_INET
    src = socket.inet_ntop(family, chunks[5] if family == socket.AF_INET6 else chunks[3])
    dst = socket.inet_ntop(family, chunks[6] if family == socket.AF_INET6 else chunks[4])
    return (src, struct.unpack("!H", chunks[7])[0]), (dst, struct.unpack("!H", chunks[8])[0])


def test_a_packet_carries_addresses_time_agent_and_message():
    sip = b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 0\r\n\r\n"
    chunks = decode(encode_hep3(sip, ("192.0.2.1", 5060), ("198.51.100.7", 5070), "udp", 2001,
                                when=1795740000.25, password="s3cret"))
    assert chunks[1] == bytes([2]) and chunks[2] == bytes([17]) and chunks[11] == bytes([1])
    assert seen(chunks) == (("192.0.2.1", 5060), ("198.51.100.7", 5070))
    assert struct.unpack("!I", chunks[9])[0] == 1795740000 and struct.unpack("!I", chunks[10])[0] == 250000
    assert struct.unpack("!I", chunks[12])[0] == 2001 and chunks[14] == b"s3cret" and chunks[15] == sip
    chunks = decode(encode_hep3(sip, ("2001:db8::1", 5060), ("192.0.2.9", 5061), "tls", 7))
    assert chunks[1] == bytes([10]) and chunks[2] == bytes([6]) and 14 not in chunks
    assert seen(chunks) == (("2001:db8::1", 5060), ("::ffff:192.0.2.9", 5061))


def test_a_copy_that_cannot_go_is_dropped_and_counted():
    mirror = HepMirror(("127.0.0.1", 9), 1)
    try:
        mirror.copy(b"x" * 70000, ("127.0.0.1", 1), ("127.0.0.1", 2), "tcp")     # too long for one packet
        mirror.copy(b"SIP/2.0 200 OK\r\n\r\n", ("127.0.0.1", 1), ("127.0.0.1", 2), "udp")
        assert mirror.view() == {"server": "127.0.0.1:9", "sent": 1, "dropped": 1}
    finally:
        mirror.close()


@pytest.mark.parametrize("value, said", [
    ("homer.example:9060", "hep.server: 'homer.example' is not an IP address"),
    ("127.0.0.1:99999", "hep.server"),
])
def test_a_bad_hep_server_is_named(value, said):
    with pytest.raises(ConfigError, match=said):
        load_config(None, env={"SIPHA_HEP_SERVER": value})


@pytest.mark.e2e
def test_every_hop_of_a_call_reaches_the_capture_server(make_cluster, monkeypatch):
    """A cluster with hep.server set: each SIPp call shows up as the caller's
    INVITE reaching the proxy, the proxy handing it to a node, the node's
    B-leg INVITE leaving through the proxy for the trunk, each copied by
    the process that sent or received it, with the capture id set."""
    capture = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    capture.bind(("127.0.0.1", 0))
    capture.settimeout(0.2)
    monkeypatch.setenv("SIPHA_HEP_SERVER", "127.0.0.1:%d" % capture.getsockname()[1])
    monkeypatch.setenv("SIPHA_HEP_CAPTURE_ID", "77")
    c = make_cluster(nodes=2)
    result = run(uac(c, "uac", calls=3, rate=10, hold_ms=100).run(30))
    assert result.ok == 3 and result.failed == 0, result.log_tail
    packets, deadline = [], time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            packets.append(decode(capture.recv(65535)))
        except socket.timeout:
            pass
    capture.close()
    assert packets and all(struct.unpack("!I", p[12])[0] == 77 for p in packets)
    hops = [(seen(p), parse_message(p[15])) for p in packets]
    proxy = c.proxy_addr
    trunk = ("127.0.0.1", c.state["trunk"]["port"])
    nodes = {("127.0.0.1", n["sip"]) for n in c.state["nodes"].values()}
    invites = [(src, dst, m) for (src, dst), m in hops if getattr(m, "method", None) == "INVITE"]
    callers = {m.call_id for src, dst, m in invites if dst == proxy and src not in nodes}
    assert len(callers) == 3
    for call_id in callers:
        # the proxy's copy of what it got; the proxy's of what it sent the
        # node and the node's of what it got (the same bytes), and nothing
        # else of that Call-ID sent to a node (a retransmission would be
        # copied again, the same)
        assert any(m.call_id == call_id and dst == proxy for src, dst, m in invites)
        to_node = [m.to_bytes() for src, dst, m in invites if m.call_id == call_id and src == proxy and dst in nodes]
        assert len(to_node) >= 2 and len(to_node) % 2 == 0 and len(set(to_node)) == 1
    # the B-legs: sent by a node, then by the proxy to the trunk
    b_legs = {m.call_id for src, dst, m in invites if src == proxy and dst == trunk}
    assert len(b_legs) == 3 and not b_legs & callers
    byes = {m.call_id for (src, dst), m in hops if getattr(m, "method", None) == "BYE" and dst == trunk}
    assert byes == b_legs
    for nid in c.state["nodes"]:
        assert "hep=127.0.0.1:" in (c.dir / "logs" / f"{nid}.log").read_text()
    # counted where operators alert: /metrics, and /status
    with urllib.request.urlopen(f"http://127.0.0.1:{c.state['proxy']['admin']}/metrics", timeout=3) as r:
        metrics = r.read().decode()
    sent = re.search(r'^sipha_proxy_hep_copies_total\{result="sent"\} ([0-9.]+)$', metrics, re.M)
    assert sent and float(sent.group(1)) > 0 and 'result="dropped"' not in metrics
    node_status = admin_get(c.state["nodes"]["node1"]["admin"])
    assert node_status["hep"]["sent"] > 0 and node_status["hep"]["dropped"] == 0
