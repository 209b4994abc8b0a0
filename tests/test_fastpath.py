"""proxy.fastpath: a UDP response relayed as bytes must leave exactly as the
full parser would send it (top Via popped, the rest untouched, the same
next hop); a request inside a dialog must be routed and written exactly as
the full path does it; anything out of the common form must go to the
full parser."""
from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procs import has_ipv6_loopback
from proxy.fastpath import strip_top_via
from proxy.server import Proxy
from sipcore.bekey import ROUTE_HEADER, make_stamp
from sipcore.config import load_config
from sipcore.errors import SipParseError
from sipcore.message import DEFAULT_LIMITS, parse_message

OURS = "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKsph0123456789abcdef"
NEXT = "SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK-uac-1;rport=40000;received=198.51.100.9"


def response(vias=(OURS, NEXT), joined=False, extra=(), body=b"", cl="auto", status="200 OK", name="Via"):
    lines = [f"SIP/2.0 {status}"]
    lines += [f"{name}: {', '.join(vias)}"] if joined else [f"{name}: {v}" for v in vias]
    lines += ["From: <sip:alice@example.com>;tag=a1", "To: <sip:bob@example.com>;tag=b2",
              "Call-ID: c-1@example.com", "CSeq: 1 INVITE", *extra]
    if cl == "auto":
        lines.append(f"Content-Length: {len(body)}")
    elif cl is not None:
        lines.append(f"Content-Length: {cl}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def full_parser(data: bytes):
    """What on_response does with the message: -> (bytes sent, next hop)."""
    msg = parse_message(data)
    nxt = msg.second_via
    msg.pop_first("Via")
    return msg.to_bytes(), nxt.response_target()


@pytest.mark.parametrize("data", [
    response(),
    response(body=b"v=0\r\no=- 1 1 IN IP4 192.0.2.7\r\n", extra=["Content-Type: application/sdp"]),
    response(vias=(OURS, NEXT, "SIP/2.0/UDP 203.0.113.5;branch=z9hG4bK3")),
    response(status="180 Ringing", extra=["Record-Route: <sip:10.0.0.1;lr>", "Contact: <sip:b@192.0.2.8>"]),
    response(name="VIA"),
    response(cl=None),                                   # a datagram may leave Content-Length out
    response(vias=(OURS, "SIP/2.0/UDP [2001:db8::7]:5070;branch=z9hG4bK6")),
])
def test_common_responses_leave_as_the_full_parser_would_send_them(data):
    out, _, top, nxt, klass = strip_top_via(data, DEFAULT_LIMITS)
    sent, dest = full_parser(data)
    assert out == sent
    assert nxt.response_target() == dest
    assert top.strip() == OURS.encode() and klass == int(data[8:9])


def test_one_via_line_holding_several_vias():
    data = response(vias=(OURS, NEXT, "SIP/2.0/UDP 203.0.113.5;branch=z9hG4bK3"), joined=True)
    out, _, _, nxt, _ = strip_top_via(data, DEFAULT_LIMITS)
    sent, dest = full_parser(data)
    assert out == sent and nxt.response_target() == dest == ("198.51.100.9", 40000)


@pytest.mark.parametrize("data, why", [
    (b"\r\n" + response(), "leading CRLF"),
    (response(name="v"), "compact Via"),
    (response(extra=["l: 0"], cl=None), "compact Content-Length"),
    (response(cl="5"), "Content-Length larger than the body"),
    (response(body=b"abcdef", cl="3"), "Content-Length smaller than the body: the parser truncates"),
    (response(extra=["Content-Length: 0"]), "Content-Length twice"),
    (response(extra=["Subject: folded", " continuation"]), "folded line"),
    (response(extra=["no colon here"]), "a line that is not a header"),
    (response(extra=["X^Y: 1"]), "a header name with a character outside the token set"),
    (response(extra=["X-Bad: a\x00b"]), "NUL byte"),
    (response(extra=["X-Bad: a\rb"]), "a CR that ends no line"),
    (response(extra=["X-Bad: a\nb"]), "an LF that ends no line"),
    (response(extra=["X-Bad: a\n\rb"]), "LF before CR"),
    (response(extra=["\tindented: 1"]), "a line starting with whitespace"),
    (response(vias=(OURS,)), "no next Via"),
    (response(vias=(OURS, 'SIP/2.0/UDP h;x="a,b"')), "quotes in a Via"),
    (response(vias=(OURS, "SIP/2.0/UDP bad host")), "a next Via the parser rejects"),
    (response(status="99 Weird"), "not a status code"),
    (response(extra=[f"X-{i}: {i}" for i in range(300)]), "more fields than the limit"),
    (response().replace(b"\r\n\r\n", b"\r\n"), "no end of header"),
])
def test_anything_else_goes_to_the_full_parser(data, why):
    assert strip_top_via(data, DEFAULT_LIMITS) is None, why


_NAMES = st.sampled_from(["Via", "VIA", "via", "From", "To", "Call-ID", "CSeq", "Contact", "X-Foo", "Content-Length",
                          "v", "l", "Record-Route", "Via ", "Subject"])
_VALUES = st.sampled_from([OURS, NEXT, f"{OURS}, {NEXT}", "SIP/2.0/TCP 192.0.2.9;branch=z9hG4bKt", "0", "12",
                           "<sip:a@b>;tag=x", "a, b", '"q, r" <sip:c@d>', "", " spaced ", "1 INVITE"])


@settings(max_examples=400, deadline=None)
@given(fields=st.lists(st.tuples(_NAMES, _VALUES), max_size=12), body=st.binary(max_size=20),
       status=st.sampled_from(["100 Trying", "183 Progress", "200 OK", "486 Busy Here", "603 Decline"]))
def test_random_responses_either_match_the_full_parser_or_go_to_it(fields, body, status):
    data = (f"SIP/2.0 {status}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields) + "\r\n").encode() + body
    fast = strip_top_via(data, DEFAULT_LIMITS)
    if fast is None:
        return
    out, _, _, nxt, _ = fast
    try:
        sent, dest = full_parser(data)
    except (SipParseError, AttributeError) as exc:
        pytest.fail(f"fast path accepted what the parser rejects ({exc!r}): {data!r}")
    if b", " in data and out != sent:          # a joined Via line: the same Vias, spacing may differ
        assert parse_message(out).values("Via") == parse_message(sent).values("Via")
    else:
        assert out == sent
    assert nxt.response_target() == dest


def test_a_shuffled_real_response_still_matches():
    rng = random.Random(7)
    extra = ["Contact: <sip:b@192.0.2.8:5062>", "Record-Route: <sip:10.0.0.1;lr>", "Allow: INVITE, ACK, BYE",
             "Server: SIPp", "Supported: timer"]
    for _ in range(50):
        rng.shuffle(extra)
        data = response(extra=list(extra), body=b"x" * rng.randrange(0, 40))
        out, _, _, _, _ = strip_top_via(data, DEFAULT_LIMITS)
        assert out == full_parser(data)[0]


# ---- requests inside a dialog ------------------------------------------------
# Two proxies with the same advertised and internal address, one with the
# fast paths and one without, are fed the same datagram; what they send
# (bytes and next hop) and count must be the same.

PROXY = "10.9.9.9:5060"       # advertised and internal: written into Vias and Record-Routes
PHONE = ("192.0.2.50", 5070)
OUR_ROUTE = f"<sip:{PROXY};lr;flow=udp:{PHONE[0]}:{PHONE[1]}>"


class Pair:
    def __init__(self, env=None, nodes=("node1=127.0.0.1:7001", "node2=127.0.0.1:7002")):
        self.env = env or {}
        self.nodes = list(nodes)

    async def __aenter__(self):
        self.proxies = []
        for fast in (True, False):
            cfg = load_config(None, overrides={"proxy.listen": "127.0.0.1:0", "proxy.admin": "off",
                                               "proxy.advertise": PROXY, "proxy.internal": PROXY,
                                               "health.probe": False, **self.env},
                              nodes=self.nodes)
            p = Proxy(cfg)
            await p.start()
            p.sent = []
            for t in p.transports:
                t.send = lambda data, dest, tr="udp", sent=p.sent: sent.append((data, dest, tr))
            if not fast:
                p.transport.fast_datagram = None
            self.proxies.append(p)
        return self

    async def __aexit__(self, *exc):
        for p in self.proxies:
            await p.close()

    def feed(self, data: bytes, src=PHONE) -> bool:
        """-> whether the fast path took it; asserts both sent the same."""
        fast, full = self.proxies
        taken = fast.fast_request(data, src, fast.transport)
        if not taken:
            fast.transport._received(data, src, "udp", datagram=True)
        full.transport._received(data, src, "udp", datagram=True)
        assert fast.sent == full.sent, (data, fast.sent, full.sent)
        assert fast.stats.values == full.stats.values
        return taken


def in_dialog(method="BYE", *, via=f"SIP/2.0/UDP {PHONE[0]}:{PHONE[1]};branch=z9hG4bKph-1;rport",
              route=OUR_ROUTE, to_tag="b2", extra=(), first=(), mf="70", cseq=None, body=b"") -> bytes:
    lines = [f"{method} sip:bob@192.0.2.80:5062;transport=udp SIP/2.0", *first, f"Via: {via}"]
    if route is not None:
        lines.append(f"Route: {route}")
    if mf is not None:
        lines.append(f"Max-Forwards: {mf}")
    lines += ["From: Alice <sip:alice@example.com>;tag=a1",
              f"To: <sip:bob@example.com>;tag={to_tag}" if to_tag else "To: <sip:bob@example.com>",
              "Call-ID: dlg-1@192.0.2.50", f"CSeq: {cseq or '7 ' + method}", *extra,
              f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def run(coro_fn):
    return asyncio.run(coro_fn())


NODE1 = ("127.0.0.1", 7001)
TRUNK_URI = "sip:service@192.0.2.80:5062;transport=UDP"


def from_node(method="BYE", *, uri=TRUNK_URI, route=f"<sip:{PROXY};lr>",
              via=f"SIP/2.0/UDP {NODE1[0]}:{NODE1[1]};branch=z9hG4bKn1-9;rport", **kw) -> bytes:
    """A request a node sends out: in a dialog its route set is our
    Record-Route (a flow in it on the leg to the caller)."""
    data = in_dialog(method, via=via, route=route, **kw)
    return data.replace(b"sip:bob@192.0.2.80:5062;transport=udp", uri.encode(), 1)


@pytest.mark.parametrize("data, dest", [
    (from_node("ACK"), ("192.0.2.80", 5062)),
    (from_node("BYE"), ("192.0.2.80", 5062)),
    (from_node("BYE", uri="sip:service@192.0.2.80"), ("192.0.2.80", 5060)),
    (from_node("BYE", uri="sip:service@192.0.2.81:5062;maddr=192.0.2.82"), ("192.0.2.82", 5062)),
    (from_node("BYE", route=OUR_ROUTE), PHONE),                          # to the caller, over its flow
    (from_node("INFO", body=b"Signal=1\r\n", extra=["Content-Type: application/dtmf-relay"]), ("192.0.2.80", 5062)),
    (from_node("BYE", via=f"SIP/2.0/UDP {NODE1[0]}:{NODE1[1]};branch=z9hG4bKn1-8"), ("192.0.2.80", 5062)),
    (from_node("BYE", route=None), ("192.0.2.80", 5062)),                 # a route set without us
    (from_node("INVITE", to_tag="", route=None), ("192.0.2.80", 5062)),  # a B-leg to the trunk
    (from_node("INVITE", to_tag="", route=OUR_ROUTE), PHONE),             # to a phone, over its Path
])
def test_requests_from_the_nodes_leave_as_the_full_path_sends_them(data, dest):
    async def go():
        async with Pair() as pair:
            assert pair.feed(data, NODE1), "the fast path should take this one"
            sent, to, transport = pair.proxies[0].sent[0]
            assert to == dest and transport == "udp"
            msg = parse_message(sent)
            assert msg.top_via.branch.startswith("z9hG4bKsph") and msg.top_via.host == PROXY.split(":")[0]
            assert not msg.routes and not msg.has(ROUTE_HEADER) and msg.max_forwards == 69
            assert pair.proxies[0].stats.get("requests", msg.method, "outbound") == 1
            if msg.to.tag is None:     # a new dialog: we stay in its path (over the phone's flow, if it has one)
                flow = f";flow=udp:{PHONE[0]}:{PHONE[1]}" if dest == PHONE else ""
                assert msg.record_routes[0].raw == f"<sip:{PROXY};lr{flow}>"
    run(go)


@pytest.mark.parametrize("data", [
    in_dialog("ACK"),
    in_dialog("BYE"),
    in_dialog("INFO", body=b"Signal=5\r\nDuration=160\r\n", extra=["Content-Type: application/dtmf-relay"]),
    in_dialog("INVITE", extra=["Contact: <sip:alice@192.0.2.50:5070>"]),            # a re-INVITE
    in_dialog(via=f"SIP/2.0/UDP {PHONE[0]}:{PHONE[1]};branch=z9hG4bKph-2"),           # nothing to stamp
    in_dialog(via="SIP/2.0/UDP 10.0.0.5:5070;branch=z9hG4bKph-3"),                    # behind NAT: received
    in_dialog(route=None),                                                            # no route set
    in_dialog(extra=["Via: SIP/2.0/UDP 198.51.100.1;branch=z9hG4bKup"]),             # a second Via line later
    in_dialog(first=["Max-Forwards: 9"], mf=None),                                    # fields in another order
    in_dialog(first=["Route: " + OUR_ROUTE], route=None),                             # stamped Via goes first of all
    in_dialog(extra=["User-Agent: Linphone/5.2", "X-Odd:   spaced  "]),
    in_dialog(to_tag="b2").replace(b"Max-Forwards", b"MAX-FORWARDS").replace(b"Via:", b"VIA:"),
])
def test_requests_in_a_dialog_leave_as_the_full_path_sends_them(data):
    async def go():
        async with Pair() as pair:
            assert pair.feed(data), "the fast path should take this one"
            sent, dest, transport = pair.proxies[0].sent[0]
            assert dest in (("127.0.0.1", 7001), ("127.0.0.1", 7002)) and transport == "udp"
            msg = parse_message(sent)
            assert msg.top_via.branch.startswith("z9hG4bKsph") and not msg.routes
            assert msg.max_forwards == 69 or (b"Max-Forwards: 9" in data and msg.max_forwards == 8)
    run(go)


@pytest.mark.parametrize("data", [
    in_dialog("INVITE", to_tag="", route=None, extra=["Contact: <sip:alice@192.0.2.50:5070>"]),
    in_dialog("INVITE", to_tag="", extra=["Record-Route: <sip:198.51.100.1;lr>"]),        # behind another proxy
    in_dialog("INVITE", to_tag="", first=["Record-Route: <sip:198.51.100.1;lr>"]),
    in_dialog("INVITE", to_tag="", via="SIP/2.0/UDP 10.0.0.5:5070;branch=z9hG4bKph-4"),   # NAT: stamped, alone
    in_dialog("INVITE", to_tag="", route=None, via=f"SIP/2.0/UDP {PHONE[0]}:{PHONE[1]};branch=z9hG4bKph-5"),
    in_dialog("INVITE", to_tag="", extra=["Via: SIP/2.0/UDP 198.51.100.1;branch=z9hG4bKup",
                                          "Content-Type: application/sdp"], body=b"v=0\r\n"),
    in_dialog("INVITE", to_tag="", first=["Max-Forwards: 9"], mf=None, route=None),
])
def test_new_invites_leave_as_the_full_path_sends_them_with_our_record_route(data):
    async def go():
        async with Pair() as pair:
            assert pair.feed(data), "the fast path should take this one"
            msg = parse_message(pair.proxies[0].sent[0][0])
            assert msg.record_routes[0].raw == f"<sip:{PROXY};lr;flow=udp:{PHONE[0]}:{PHONE[1]}>"
            assert msg.top_via.branch.startswith("z9hG4bKsph") and msg.has(ROUTE_HEADER)
            assert msg.call_id in pair.proxies[0].forwarded     # remembered (the overload guard's)
    run(go)


def test_the_owner_remembered_for_a_key_follows_the_health_view():
    """_owner remembers each key's node until a node goes down, comes
    back or changes its load factor: the next message of the call then
    goes where the ring says now, on both paths alike."""
    async def go():
        async with Pair() as pair:
            fast = pair.proxies[0]

            def routed():
                route = parse_message(fast.sent[-1][0]).get(ROUTE_HEADER)
                return dict(p.split("=", 1) for p in route.split(";"))

            assert pair.feed(in_dialog("BYE"))
            first = routed()
            assert first["reason"] == "owner"
            for p in pair.proxies:
                p.health.nodes[first["owner"]].up = False
            assert pair.feed(in_dialog("BYE"))
            assert routed()["owner"] == first["partner"] and routed()["reason"] == "failover"
            for p in pair.proxies:
                p.health.nodes[first["owner"]].up = True
                p.health.nodes[first["owner"]].load_factor = 0.0     # back, ramping up: not its keys yet
            assert pair.feed(in_dialog("BYE"))
            assert routed()["owner"] == first["partner"] and routed()["reason"] == "ramp"
            for p in pair.proxies:
                p.health.nodes[first["owner"]].load_factor = 1.0
            assert pair.feed(in_dialog("BYE"))
            assert routed() == first
    run(go)


def test_a_stamped_dialog_goes_to_its_owner_and_is_counted_alike():
    async def go():
        async with Pair() as pair:
            fast = pair.proxies[0]
            tag = make_stamp(fast.secret, "00000000000000aa")
            for method in ("ACK", "BYE"):
                assert pair.feed(in_dialog(method, to_tag=tag))
            route = parse_message(fast.sent[-1][0]).get(ROUTE_HEADER)
            assert "bekey=00000000000000aa" in route and "reason=owner" in route
            assert fast.stats.get("requests", "BYE", "owner") == 1
    run(go)


@pytest.mark.parametrize("data, src, why", [
    (in_dialog(to_tag=""), PHONE, "a new request other than INVITE"),
    (in_dialog("INVITE", to_tag="", extra=["Record-Route : <sip:198.51.100.1;lr>"]), PHONE,
     "a Record-Route spelled with space before the colon"),
    (in_dialog("INVITE", to_tag="", route="<sip:203.0.113.1;lr>"), PHONE, "preloaded with a Route not ours"),
    (in_dialog("REGISTER"), PHONE, "REGISTER: keyed by its AOR"),
    (in_dialog(mf="0"), PHONE, "Max-Forwards 0: the full path answers 483"),
    (in_dialog(mf=None), PHONE, "no Max-Forwards"),
    (in_dialog(extra=["Max-Forwards: 3"]), PHONE, "Max-Forwards twice"),
    (in_dialog(mf="300"), PHONE, "Max-Forwards out of range: 400"),
    (in_dialog(route="<sip:203.0.113.1;lr>"), PHONE, "a Route that is not ours"),
    (in_dialog(route=f"{OUR_ROUTE}, <sip:203.0.113.1;lr>"), PHONE, "two Route entries"),
    (in_dialog(extra=["Route: <sip:203.0.113.1;lr>"]), PHONE, "two Route fields"),
    (in_dialog(route="<sip:bad host;lr>"), PHONE, "a Route the parser rejects"),
    (in_dialog(extra=[f"{ROUTE_HEADER}: bekey=1;owner=node2"]), PHONE, "the internal header from outside"),
    (in_dialog(extra=["User-Agent: friendly-scanner"]), PHONE, "a scanner"),
    (in_dialog(cseq="7 INVITE"), PHONE, "CSeq method does not match"),
    (in_dialog(via=f"SIP/2.0/UDP {PHONE[0]};branch=1234"), PHONE, "RFC 2543 branch"),
    (in_dialog(via="SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/UDP b;branch=z9hG4bK2"), PHONE, "two Vias on a line"),
    (in_dialog().replace(b"\r\nTo:", b"\r\nt:"), PHONE, "compact To"),
    (in_dialog().replace(b"\r\nCall-ID:", b"\r\nCall-ID :"), PHONE, "space before a colon"),
    (in_dialog(extra=["Subject: a\rb"]), PHONE, "a CR that ends no line"),
    (in_dialog(extra=["Subject: a\nb"]), PHONE, "an LF that ends no line"),
    (in_dialog(extra=["Subject: a", " folded"]), PHONE, "a folded line"),
    (in_dialog(extra=["Subject: a\x00"]), PHONE, "NUL byte"),
    (in_dialog().replace(b"sip:bob@192.0.2.80:5062;transport=udp", b"sip:bob@<x>"), PHONE, "bad Request-URI"),
    (in_dialog().replace(b"From: Alice <sip:alice@example.com>", b"From: Alice <sip:alice@example.com"), PHONE,
     "bad From"),
    (in_dialog(body=b"xyz").replace(b"Content-Length: 3", b"Content-Length: 2"), PHONE, "body longer than said"),
    # from a node, on its way out
    (from_node(route="<sip:203.0.113.1;lr>"), NODE1, "a Route that is not ours"),
    (from_node(uri="sip:bob@192.0.2.80:5062;transport=tcp"), NODE1, "over TCP"),
    (from_node(uri="sip:bob@trunk.example.com"), NODE1, "a host name to resolve"),
    (from_node(uri=f"sip:{PROXY};lr"), NODE1, "a Request-URI naming us"),
    (from_node(uri="tel:+15551234"), NODE1, "not a SIP URI: 416"),
    (from_node(route=f"<sip:{PROXY};lr;flow=udp:nohost:>"), NODE1, "a bad flow: 400"),
    (from_node(mf="0"), NODE1, "Max-Forwards 0: 483"),
    (from_node("SUBSCRIBE", to_tag=""), NODE1, "a new request other than INVITE"),
])
def test_other_requests_take_the_full_path_with_the_same_outcome(data, src, why):
    async def go():
        async with Pair() as pair:
            assert not pair.feed(data, src), why
    run(go)


# ---- IPv6 phones and trunks (the nodes stay IPv4) ---------------------------

PROXY6 = "[2001:db8::9]:5060"
PHONE6 = ("2001:db8::50", 5070)
OUR_ROUTE6 = f"<sip:{PROXY6};lr;flow=udp:[{PHONE6[0]}]:{PHONE6[1]}>"
DUAL = {"proxy.listen": "127.0.0.1:0,[::1]:0", "proxy.advertise": f"{PROXY},{PROXY6}"}
VIA6 = f"SIP/2.0/UDP [{PHONE6[0]}]:{PHONE6[1]};branch=z9hG4bKph6-1;rport"


@pytest.mark.parametrize("data, src, dest, record_route", [
    # from an IPv6 phone to a node: IPv4 on the inside, our IPv6 address in its route set
    (in_dialog("BYE", via=VIA6, route=OUR_ROUTE6), PHONE6, None, None),
    (in_dialog("INVITE", via=VIA6, to_tag="", route=None), PHONE6, None,
     f"<sip:{PROXY6};lr;flow=udp:[{PHONE6[0]}]:{PHONE6[1]}>"),
    # from a node to an IPv6 phone over its flow, to an IPv6 trunk
    (from_node("BYE", route=OUR_ROUTE6), NODE1, PHONE6, None),
    (from_node("INVITE", to_tag="", route=OUR_ROUTE6), NODE1, PHONE6,
     f"<sip:{PROXY6};lr;flow=udp:[{PHONE6[0]}]:{PHONE6[1]}>"),
    (from_node("INVITE", to_tag="", route=None, uri="sip:service@[2001:db8::80]:5062"), NODE1,
     ("2001:db8::80", 5062), f"<sip:{PROXY6};lr>"),
    # from a node to an IPv4 trunk, with IPv6 listened on too: as before
    (from_node("INVITE", to_tag="", route=None), NODE1, ("192.0.2.80", 5062), f"<sip:{PROXY};lr>"),
])
def test_ipv6_peers_get_our_ipv6_address_and_the_nodes_our_ipv4_one(data, src, dest, record_route):
    """Dual stack: a request goes out from a socket of its destination's
    family, and the Via and Record-Route on it name the proxy in that
    family, the one the peer answers and sends to; fast path and full
    path alike."""
    async def go():
        async with Pair(DUAL) as pair:
            assert pair.feed(data, src), "the fast path should take this one"
            sent, to, transport = pair.proxies[0].sent[0]
            msg = parse_message(sent)
            if dest is None:        # to a node
                assert to in (("127.0.0.1", 7001), ("127.0.0.1", 7002))
                assert msg.top_via.host == PROXY.split(":")[0]
                assert msg.vias[1].params["received"] == PHONE6[0] and msg.vias[1].host == f"[{PHONE6[0]}]"
            else:
                assert to == dest
                assert msg.top_via.host == (PROXY6.rsplit(":", 1)[0] if ":" in dest[0] else PROXY.split(":")[0])
            if record_route:
                assert msg.record_routes[0].raw == record_route
    run(go)


def test_an_ipv6_destination_without_an_ipv6_address_gets_503():
    """A node's request for an IPv6 address (a trunk, a phone's contact),
    at a proxy listening on IPv4 only: the node hears 503 at once, not
    Timer B's 408 after 32 s."""
    async def go():
        async with Pair() as pair:
            data = from_node("INVITE", to_tag="", route=None, uri="sip:service@[2001:db8::80]:5062")
            assert not pair.feed(data, NODE1)
            sent, to, _ = pair.proxies[0].sent[0]
            resp = parse_message(sent)
            assert to == NODE1 and resp.status == 503 and "no IPv6" in resp.reason
    run(go)


V6_ONLY = {"proxy.listen": "[::1]:0", "proxy.advertise": PROXY6, "proxy.internal": PROXY6}
NODE6 = ("::1", 7001)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_a_proxy_on_ipv6_only_routes_over_ipv6_and_refuses_an_ipv4_destination():
    """On an IPv6-only network (proxy.listen has no IPv4 address): a
    phone's INVITE reaches an IPv6 node with our IPv6 Via and
    Record-Route; a node's request for an IPv4 address gets 503 at once."""
    async def go():
        async with Pair(V6_ONLY, nodes=("node1=[::1]:7001", "node2=[::1]:7002")) as pair:
            assert pair.feed(in_dialog("INVITE", via=VIA6, to_tag="", route=None), PHONE6)
            sent, to, _ = pair.proxies[0].sent[0]
            msg = parse_message(sent)
            assert to in (NODE6, ("::1", 7002)) and msg.top_via.host == "[2001:db8::9]"
            assert msg.record_routes[0].raw == f"<sip:{PROXY6};lr;flow=udp:[{PHONE6[0]}]:{PHONE6[1]}>"
            data = from_node("INVITE", to_tag="", route=None, uri="sip:service@192.0.2.80:5062",
                             via="SIP/2.0/UDP [::1]:7001;branch=z9hG4bKn1-9;rport")
            assert not pair.feed(data, NODE6)
            resp = parse_message(pair.proxies[0].sent[1][0])
            assert pair.proxies[0].sent[1][1] == NODE6 and resp.status == 503 and "no IPv4" in resp.reason
    run(go)


def test_a_banned_source_is_not_scanned_and_stays_dropped():
    async def go():
        async with Pair({"limits.rate": 5.0, "limits.burst": 3}) as pair:
            taken = [pair.feed(in_dialog(cseq=f"{n} BYE")) for n in range(6)]
            # three sent, the fourth dropped and its source banned, the rest not even scanned
            assert taken == [True, True, True, True, False, False]
            assert len(pair.proxies[0].sent) == 3
            assert pair.proxies[0].stats.get("events", "rate_limited") == 3
    run(go)


_REQ_NAMES = st.sampled_from(["Via", "From", "To", "Call-ID", "CSeq", "Max-Forwards", "Route", "User-Agent",
                              "Contact", "X-Foo", "Content-Length", "v", "t", "i", "VIA", "To ", ROUTE_HEADER])
_REQ_VALUES = st.sampled_from([
    f"SIP/2.0/UDP {PHONE[0]}:{PHONE[1]};branch=z9hG4bKa;rport", "SIP/2.0/UDP 10.1.1.1;branch=z9hG4bKb",
    "Bob <sip:bob@example.com>;tag=b2", "<sip:alice@example.com>;tag=a1", "sip:carol@example.com;tag=c3",
    "<sip:x@y>", "c-1@example.com", "1 BYE", "2 ACK", "70", "0", "256", OUR_ROUTE, "<sip:203.0.113.1;lr>",
    "friendly-scanner", "", " spaced ", '"q, r" <sip:c@d>;tag=q', "0", "3"])
_COMMON_BYE = [("Via", f"SIP/2.0/UDP {PHONE[0]}:{PHONE[1]};branch=z9hG4bKa;rport"), ("Max-Forwards", "70"),
               ("Route", OUR_ROUTE), ("From", "<sip:alice@example.com>;tag=a1"),
               ("To", "Bob <sip:bob@example.com>;tag=b2"), ("Call-ID", "c-1@example.com"), ("CSeq", "1 BYE")]


def _mutate(fields: list, edits) -> list:
    fields = list(fields)
    for op, i, j, name, value in edits:
        i %= len(fields) or 1
        if not fields:
            fields.append((name, value))
        elif op == "drop":
            del fields[i]
        elif op == "copy":
            fields.insert(j % (len(fields) + 1), fields[i])
        elif op == "swap":
            j %= len(fields)
            fields[i], fields[j] = fields[j], fields[i]
        elif op == "value":
            fields[i] = (fields[i][0], value)
        elif op == "name":
            fields[i] = (name, fields[i][1])
        else:
            fields.insert(i, (name, value))
    return fields


def _request(method: str, fields, body=b"") -> bytes:
    return (f"{method} sip:bob@192.0.2.80 SIP/2.0\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields)
            + "\r\n").encode() + body


@settings(max_examples=200, deadline=None)
@given(edits=st.lists(st.tuples(st.sampled_from(["drop", "copy", "swap", "value", "name", "add"]),
                                st.integers(0, 30), st.integers(0, 30), _REQ_NAMES, _REQ_VALUES), max_size=3),
       body=st.sampled_from([b"", b"abc"]), method=st.sampled_from(["BYE", "ACK", "INFO", "REGISTER", "INVITE"]),
       src=st.sampled_from([PHONE, NODE1]))
def test_changed_dialog_requests_route_the_same_either_way(edits, body, method, src):
    """A common BYE with up to three edits (a field dropped, copied, moved,
    renamed, given another value, or added), from a phone or from a node:
    the fast path either declines it or sends what the full path sends."""
    fields = [(n, v.replace("BYE", method)) for n, v in _COMMON_BYE]
    data = _request(method, _mutate(fields, edits), body)

    async def go():
        async with Pair() as pair:
            pair.feed(data, src)
    run(go)


def test_the_unchanged_common_request_is_taken():
    """The test above starts from a request the fast path takes."""
    async def go():
        async with Pair() as pair:
            assert pair.feed(_request("BYE", _COMMON_BYE))
            assert pair.feed(_request("BYE", _COMMON_BYE), NODE1)
    run(go)


def _mutated(data: bytes, draw) -> bytes:
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(raw) - 1))
        op = draw(st.sampled_from(["flip", "del", "ins"]))
        if op == "flip":
            raw[i] = draw(st.integers(0, 255))
        elif op == "del":
            del raw[i]
        else:
            raw.insert(i, draw(st.sampled_from(b',;<>":\r\n @=')))
    return bytes(raw)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_damaged_requests_route_the_same_either_way_and_never_raise(data):
    base, src = data.draw(st.sampled_from([
        (in_dialog("BYE"), PHONE), (in_dialog("ACK", via="SIP/2.0/UDP 10.0.0.5;branch=z9hG4bKn"), PHONE),
        (in_dialog("INVITE", to_tag=""), PHONE), (from_node("BYE"), NODE1), (from_node("ACK", route=OUR_ROUTE), NODE1),
        (in_dialog("REGISTER", to_tag="", route=None).replace(b"REGISTER sip:bob@", b"REGISTER sip:"), PHONE)]))
    raw = _mutated(base, data.draw)

    async def go():
        async with Pair() as pair:
            pair.feed(raw, src)
            fast = pair.proxies[0]
            fast.refuse_share = 1.0             # overloaded: a new INVITE or REGISTER may be refused from its bytes
            fast.forwarded.seen.entries.clear()        # ... as a first copy would be, not one let through above
            fast.sent.clear()
            if fast.fast_datagram(raw, PHONE, fast.transport) and fast.sent and fast.sent[0][0].startswith(b"SIP/"):
                answer = fast.sent[0][0]
                assert answer.startswith(b"SIP/2.0 503 ") and answer.endswith(b"\r\n\r\n")
                try:
                    req = parse_message(raw)
                except SipParseError:
                    return                      # refused before anyone read it closely: still an answer
                resp = parse_message(answer)
                assert (resp.call_id, resp.get("CSeq"), resp.get("From")) == (req.call_id, req.get("CSeq"),
                                                                              req.get("From"))
    run(go)


def test_remembered_request_uris_stay_short_and_bounded():
    """scan_request remembers parsed Request-URIs (a call's requests and a
    trunk's calls share one): a long URI is not kept, and a flood of new
    ones does not grow the memory."""
    from proxy import fastpath
    long_user = "u" * 300
    scan = fastpath.scan_request(in_dialog("BYE").replace(b"sip:bob@", f"sip:{long_user}@".encode()), DEFAULT_LIMITS)
    assert scan.ruri.user == long_user and not any(long_user.encode() in k for k in fastpath._URIS)
    for i in range(4096 + 10):
        data = in_dialog("BYE").replace(b"sip:bob@192.0.2.80", f"sip:b{i}@192.0.2.80".encode())
        assert fastpath.scan_request(data, DEFAULT_LIMITS).ruri.user == f"b{i}"
    assert 0 < len(fastpath._URIS) <= 4096
