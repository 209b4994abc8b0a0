"""The proxy on the wire: a real proxy process, with test sockets playing
the phone and the two nodes, checking exactly what it forwards."""
from __future__ import annotations

import select
import socket
import uuid

import pytest

from sipcore.bekey import ROUTE_HEADER, bekey_of
from sipcore.message import make_response, parse_message
from sipha.sipp import free_port

pytestmark = pytest.mark.e2e


class Wire:
    def __init__(self, procs):
        self.nodes = {}
        for nid in ("node1", "node2"):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", free_port()))
            self.nodes[nid] = s
        self.phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.phone.bind(("127.0.0.1", 0))
        self.phone_port = self.phone.getsockname()[1]
        self.proxy, self.addr = procs.proxy({n: s.getsockname() for n, s in self.nodes.items()}, "--no-probe")

    def node_recv(self, timeout=3.0):
        ready, _, _ = select.select(list(self.nodes.values()), [], [], timeout)
        assert ready, "nothing reached a node"
        sock = ready[0]
        data = sock.recv(65535)
        nid = next(n for n, s in self.nodes.items() if s is sock)
        return nid, data, parse_message(data)

    def phone_recv(self, timeout=3.0):
        self.phone.settimeout(timeout)
        return parse_message(self.phone.recv(65535))

    def close(self):
        for s in (*self.nodes.values(), self.phone):
            s.close()


@pytest.fixture
def wire(procs):
    w = Wire(procs)
    yield w
    w.close()


def invite(call_id, port, extra="", method="INVITE", mf=70, branch="z9hG4bKphone1", to_tag=""):
    return (f"{method} sip:bob@example.com SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 192.0.2.1:5060;branch={branch};rport\r\n"
            f"Max-Forwards: {mf}\r\n"
            f"From: Alice <sip:alice@example.com>;tag=a1\r\n"
            f"To: <sip:bob@example.com>{to_tag}\r\n"
            f"Call-ID: {call_id}\r\n"
            f"CSeq: 1 {method}\r\n"
            f"Contact: <sip:alice@127.0.0.1:{port}>\r\n"
            f"X-Odd:   spaced   value  \r\n"
            f"{extra}"
            f"Content-Length: 0\r\n\r\n").encode()


def test_initial_invite_is_forwarded_with_via_record_route_and_routing_header(wire):
    cid = uuid.uuid4().hex
    wire.phone.sendto(invite(cid, wire.phone_port), wire.addr)
    nid, data, msg = wire.node_recv()
    top, client = msg.vias[0], msg.vias[1]
    assert top.branch.startswith("z9hG4bKsph") and (top.host, top.port) == wire.addr
    assert client.received == "127.0.0.1" and client.rport == wire.phone_port
    rr = msg.record_routes[0].parsed_uri
    assert rr.lr and (rr.host, rr.port) == wire.addr
    assert rr.params["flow"] == f"udp:127.0.0.1:{wire.phone_port}"
    assert msg.max_forwards == 69
    route = msg.get(ROUTE_HEADER)
    assert f"bekey={bekey_of(cid)}" in route and f"owner={nid}" in route and "reason=owner" in route
    assert b"\r\nX-Odd:   spaced   value  \r\n" in data        # untouched header, byte for byte


def test_retransmission_and_cancel_reach_the_same_node_with_the_same_branch(wire):
    cid = uuid.uuid4().hex
    wire.phone.sendto(invite(cid, wire.phone_port), wire.addr)
    first_node, _, first = wire.node_recv()
    wire.phone.sendto(invite(cid, wire.phone_port), wire.addr)
    again_node, _, again = wire.node_recv()
    wire.phone.sendto(invite(cid, wire.phone_port, method="CANCEL"), wire.addr)
    cancel_node, _, cancel = wire.node_recv()
    assert first_node == again_node == cancel_node
    assert first.top_via.branch == again.top_via.branch == cancel.top_via.branch
    assert cancel.method == "CANCEL"


def test_routing_header_from_outside_is_stripped(wire):
    forged = f"{ROUTE_HEADER}: bekey=0000000000000000;owner=node2;partner=node1\r\n"
    wire.phone.sendto(invite(uuid.uuid4().hex, wire.phone_port, extra=forged), wire.addr)
    _, _, msg = wire.node_recv()
    values = msg.values(ROUTE_HEADER)
    assert len(msg.get_fields(ROUTE_HEADER)) == 1 and "0000000000000000" not in values[0]


def test_max_forwards_zero_gets_483(wire):
    wire.phone.sendto(invite(uuid.uuid4().hex, wire.phone_port, mf=0), wire.addr)
    resp = wire.phone_recv()
    assert resp.status == 483


def test_responses_follow_the_via_path_and_lose_the_internal_header(wire):
    cid = uuid.uuid4().hex
    wire.phone.sendto(invite(cid, wire.phone_port), wire.addr)
    nid, _, req = wire.node_recv()
    vias = "".join(f"Via: {v.raw}\r\n" for v in req.vias)
    ringing = (f"SIP/2.0 180 Ringing\r\n{vias}From: {req.get('From')}\r\nTo: {req.get('To')};tag=b1\r\n"
               f"Call-ID: {cid}\r\nCSeq: 1 INVITE\r\n{ROUTE_HEADER}: leak\r\nContent-Length: 0\r\n\r\n")
    wire.nodes[nid].sendto(ringing.encode(), wire.addr)
    resp = wire.phone_recv()
    assert resp.status == 180 and len(resp.vias) == 1
    assert resp.top_via.branch == "z9hG4bKphone1"
    assert not resp.has(ROUTE_HEADER)


def test_a_plain_response_leaves_byte_for_byte_but_for_our_via(wire):
    """The common case takes proxy.fastpath: nothing but our Via changes."""
    cid = uuid.uuid4().hex
    wire.phone.sendto(invite(cid, wire.phone_port), wire.addr)
    nid, _, req = wire.node_recv()
    ours, theirs = (f"Via: {v.raw}\r\n" for v in req.vias)
    sdp = b"v=0\r\no=- 1 1 IN IP4 192.0.2.9\r\ns=-\r\nc=IN IP4 192.0.2.9\r\nt=0 0\r\n"
    rest = (f"From: {req.get('From')}\r\nTo: {req.get('To')};tag=b1\r\nCall-ID: {cid}\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:bob@192.0.2.9>\r\nContent-Type: application/sdp\r\n"
            f"Content-Length:   {len(sdp)}\r\n\r\n").encode() + sdp
    wire.nodes[nid].sendto(b"SIP/2.0 200 OK\r\n" + ours.encode() + theirs.encode() + rest, wire.addr)
    wire.phone.settimeout(3)
    assert wire.phone.recv(65535) == b"SIP/2.0 200 OK\r\n" + theirs.encode() + rest


def test_request_from_a_node_goes_out_over_the_callers_flow(wire):
    node = wire.nodes["node1"]
    nport = node.getsockname()[1]
    bye = (f"BYE sip:alice@192.0.2.99:5060 SIP/2.0\r\n"
           f"Via: SIP/2.0/UDP 127.0.0.1:{nport};branch=z9hG4bKnode1;rport\r\n"
           f"Route: <sip:{wire.addr[0]}:{wire.addr[1]};lr;flow=udp:127.0.0.1:{wire.phone_port}>\r\n"
           f"Max-Forwards: 70\r\nFrom: <sip:bob@example.com>;tag=b1\r\nTo: <sip:alice@example.com>;tag=a1\r\n"
           f"Call-ID: x1\r\nCSeq: 7 BYE\r\n{ROUTE_HEADER}: bekey=1;owner=node1\r\nContent-Length: 0\r\n\r\n")
    node.sendto(bye.encode(), wire.addr)
    msg = wire.phone_recv()
    assert msg.method == "BYE" and msg.uri == "sip:alice@192.0.2.99:5060"
    assert not msg.routes and not msg.has(ROUTE_HEADER)
    assert msg.vias[0].branch.startswith("z9hG4bKsph") and msg.vias[1].branch == "z9hG4bKnode1"


@pytest.mark.parametrize("internal", [False, True])     # fast path; full path (the internal header)
def test_a_nodes_via_goes_out_as_the_node_wrote_it(wire, internal):
    """A node's Via names its SIP address: nothing for the proxy to
    record in it. Left as it is, an INVITE a partner sends again for a
    node that died (with that node's Via) is the same request, byte for
    byte, as the callee had first: a SIPp UAS tells a retransmission by
    its bytes, and aborted the call on a copy stamped with another rport."""
    node = wire.nodes["node2"]
    other = wire.nodes["node1"].getsockname()[1]          # the node that sent it first
    extra = f"{ROUTE_HEADER}: bekey=1;owner=node2\r\n" if internal else ""
    invite = (f"INVITE sip:bob@127.0.0.1:{wire.phone_port} SIP/2.0\r\n"
              f"Via: SIP/2.0/UDP 127.0.0.1:{other};branch=z9hG4bKfork1;rport\r\n"
              f"Max-Forwards: 69\r\nFrom: <sip:alice@example.com>;tag=sph1\r\nTo: <sip:bob@example.com>\r\n"
              f"Call-ID: sph-b1\r\nCSeq: 1 INVITE\r\nContact: <sip:127.0.0.1:{other}>\r\n{extra}"
              f"Content-Length: 0\r\n\r\n")
    node.sendto(invite.encode(), wire.addr)
    msg = wire.phone_recv()
    assert msg.method == "INVITE" and msg.vias[1].raw.endswith(f"127.0.0.1:{other};branch=z9hG4bKfork1;rport")


def test_malformed_input_gets_400_or_is_dropped_and_the_proxy_keeps_serving(wire):
    bad_cl = invite(uuid.uuid4().hex, wire.phone_port).replace(b"Content-Length: 0", b"Content-Length: 99")
    wire.phone.sendto(bad_cl, wire.addr)
    resp = wire.phone_recv()
    assert resp.status == 400 and "Content-Length" in resp.reason
    for junk in (b"\x00\xff garbage", b"INVITE\r\n\r\n", b"SIP/2.0 200\r\n\r\n", b"\r\n\r\n"):
        wire.phone.sendto(junk, wire.addr)
    wire.phone.sendto(invite(uuid.uuid4().hex, wire.phone_port), wire.addr)
    _, _, msg = wire.node_recv()
    assert msg.method == "INVITE"
    assert "event=parse_rejected" in wire.proxy.text()


def test_the_health_probe_tells_each_node_which_others_are_down(procs):
    """A node takes on what died with another (calls still ringing) when
    the proxy's probe names that node down (X-Sipha-Down): node2 has no
    socket (its port refuses), node1 answers its probes."""
    node1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    node1.bind(("127.0.0.1", free_port()))
    procs.proxy({"node1": node1.getsockname(), "node2": ("127.0.0.1", free_port())})
    told = []
    try:
        node1.settimeout(3)
        for _ in range(8):
            data, src = node1.recvfrom(65535)
            probe = parse_message(data)
            assert probe.method == "OPTIONS"
            told.append(probe.get("X-Sipha-Down"))
            node1.sendto(make_response(probe, 200, "OK").to_bytes(), src)
    finally:
        node1.close()
    assert set(told) <= {None, "node2"} and told[-1] == "node2"


def register_from(port: int, contact_params: str, vias: int = 1) -> bytes:
    extra_via = "Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKedge1\r\n" if vias > 1 else ""
    return (f"REGISTER sip:example.com SIP/2.0\r\n{extra_via}"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{uuid.uuid4().hex};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:olga@example.com>;tag=o1\r\nTo: <sip:olga@example.com>\r\n"
            f"Call-ID: {uuid.uuid4().hex}\r\nCSeq: 1 REGISTER\r\nSupported: outbound, path\r\n"
            f"Contact: <sip:olga@127.0.0.1:{port}>{contact_params}\r\nContent-Length: 0\r\n\r\n").encode()


def test_sip_outbound_at_the_edge_path_ob_and_stun_keepalives(wire):
    """RFC 5626: a REGISTER straight from a phone asking for outbound
    (+sip.instance and reg-id) gets our Path with `ob`; one that came
    through another proxy first, or without reg-id, does not. A STUN
    Binding request on the SIP port is answered with where the phone is
    seen from here, and SIP goes on on that port as before."""
    outbound = ';+sip.instance="<urn:uuid:00000000-0000-1000-8000-000a95a0e128>";reg-id=1'
    paths = []
    for params, vias in ((outbound, 1), (outbound, 2), (";+sip.instance=\"<urn:uuid:1>\"", 1), ("", 1)):
        wire.phone.sendto(register_from(wire.phone_port, params, vias), wire.addr)
        paths.append(wire.node_recv()[2].paths[0].parsed_uri.params)
    assert ["ob" in p for p in paths] == [True, False, False, False]
    assert all(p["flow"] == f"udp:127.0.0.1:{wire.phone_port}" for p in paths)

    txid = uuid.uuid4().bytes[:12]
    wire.phone.sendto(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + txid, wire.addr)
    wire.phone.settimeout(3)
    resp = wire.phone.recv(2048)
    assert resp[:4] == b"\x01\x01\x00\x0c" and resp[8:20] == txid
    assert resp[20:24] == b"\x00\x20\x00\x08" and resp[25] == 1
    assert int.from_bytes(resp[26:28], "big") ^ 0x2112 == wire.phone_port
    assert bytes(a ^ b for a, b in zip(resp[28:32], b"\x21\x12\xa4\x42")) == socket.inet_aton("127.0.0.1")
    wire.phone.sendto(b"\x00\x11\x00\x00\x21\x12\xa4\x42" + txid, wire.addr)     # an indication: no answer
    wire.phone.sendto(invite(uuid.uuid4().hex, wire.phone_port), wire.addr)
    assert wire.node_recv()[2].method == "INVITE"
    wire.phone.setblocking(False)
    with pytest.raises(BlockingIOError):
        wire.phone.recv(2048)
