"""proxy.fastpath: a UDP response relayed as bytes must leave exactly as the
full parser would send it (top Via popped, the rest untouched, the same
next hop), and anything out of the common form must go to the full parser."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.fastpath import strip_top_via
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
