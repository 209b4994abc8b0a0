"""sipcore.message: parsing, accessors, byte-exact serialization (RFC 3261 §7, §25)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from sipcore.errors import SipParseError
from sipcore.message import SipRequest, SipResponse, make_response, parse_message
from sipmsgs import INVITE, RESPONSE, request


def test_unchanged_message_serializes_to_the_input_bytes():
    for raw in (INVITE, RESPONSE):
        assert parse_message(raw).to_bytes() == raw


def test_request_start_line_and_routing_fields():
    m = parse_message(INVITE)
    assert isinstance(m, SipRequest)
    assert (m.method, m.uri) == ("INVITE", "sip:bob@biloxi.com")
    assert m.ruri.user == "bob" and m.ruri.host == "biloxi.com"
    assert m.top_via.branch == "z9hG4bK776asdhds"
    assert m.from_.tag == "1928301774" and m.from_.display == "Alice"
    assert m.to.tag is None and m.to.uri == "sip:bob@biloxi.com"
    assert m.call_id == "a84b4c76e66710@pc33.atlanta.com"
    assert m.cseq == (314159, "INVITE")
    assert m.max_forwards == 70
    assert m.content_length == 141 == len(m.body)


def test_response_status_and_via_path():
    m = parse_message(RESPONSE)
    assert isinstance(m, SipResponse)
    assert (m.status, m.reason) == (180, "Ringing")
    assert [v.host for v in m.vias] == ["server10.biloxi.com", "pc33.atlanta.com"]
    assert m.vias[1].response_target() == ("192.0.2.1", 5060)


def test_compact_forms_are_the_same_headers():
    raw = (b"OPTIONS sip:b@x SIP/2.0\r\nv: SIP/2.0/TCP h:5070;branch=z9hG4bK1\r\n"
           b"f: <sip:a@x>;tag=1\r\nt: <sip:b@x>\r\ni: c1\r\nCSeq: 2 OPTIONS\r\n"
           b"m: <sip:a@h>\r\nl: 0\r\n\r\n")
    m = parse_message(raw)
    m.check()
    assert m.get("Via") == m.get("v") and m.top_via.transport == "TCP"
    assert m.call_id == "c1" and m.from_.tag == "1"
    assert m.contacts[0].uri == "sip:a@h"
    assert m.to_bytes() == raw


def test_header_names_are_case_insensitive():
    m = parse_message(request(extra=b"cALL-iD: other\r\n"))
    assert m.get("CALL-ID") == "cid-1@192.0.2.1"
    assert len(m.get_fields("call-id")) == 2


def test_folded_lines_are_joined_and_kept_byte_exact():
    raw = request(extra=b"Subject: I know you're there,\r\n pick up the phone\r\n\t and talk to me!\r\n")
    m = parse_message(raw)
    assert m.get("Subject") == "I know you're there, pick up the phone and talk to me!"
    assert m.to_bytes() == raw


def test_lws_before_colon_is_allowed():
    m = parse_message(request(extra=b"Subject \t:  hi\r\n"))
    assert m.get("subject") == "hi"


def test_comma_values_split_outside_quotes_and_brackets():
    raw = request(extra=b'Contact: "Doe, John" <sip:j@a;x=1,2>, <sip:k@b>;expires=60\r\n'
                        b"Route: <sip:p1;lr>,<sip:p2;lr>\r\nRoute: <sip:p3;lr>\r\n")
    m = parse_message(raw)
    assert [c.uri for c in m.contacts] == ["sip:j@a;x=1,2", "sip:k@b"]
    assert m.contacts[0].display == "Doe, John"
    assert m.contacts[1].expires == 60
    assert [r.uri for r in m.routes] == ["sip:p1;lr", "sip:p2;lr", "sip:p3;lr"]


def test_contact_star():
    m = parse_message(request("REGISTER", "sip:example.com", extra=b"Contact: *\r\nExpires: 0\r\n"))
    assert m.contacts[0].wildcard


def test_via_ipv6_rport_received_maddr():
    m = parse_message(request(extra=b"") .replace(
        b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc",
        b"Via: SIP / 2.0 / tcp [2001:db8::9]:5070;branch=z9hG4bKx;rport=6000;received=2001:db8::1;maddr=239.1.1.1"))
    v = m.top_via
    assert (v.transport, v.host, v.port) == ("TCP", "[2001:db8::9]", 5070)
    assert v.rport == 6000 and v.received == "2001:db8::1" and v.maddr == "239.1.1.1"
    assert v.response_target() == ("239.1.1.1", 6000)


def test_remembered_host_ports_answer_alike_stay_bounded_and_errors_are_not_kept():
    """split_hostport remembers what it parsed (a phone's every message
    repeats its sent-by): the remembered answer is the parsed one, a
    flood of new hosts does not grow the memory, and a bad one is refused
    every time it comes."""
    from sipcore import headers
    assert headers.split_hostport(" 192.0.2.1:5070") == headers.split_hostport(" 192.0.2.1:5070") == ("192.0.2.1", 5070)
    assert headers.split_hostport("[2001:db8::9]") == ("[2001:db8::9]", None)
    for _ in range(2):
        with pytest.raises(SipParseError, match="bad port"):
            headers.split_hostport("192.0.2.1:99999")
    for i in range(4096 + 10):
        assert headers.split_hostport(f"h{i}.example.com:{i % 65535 + 1}") == (f"h{i}.example.com", i % 65535 + 1)
    assert 0 < len(headers._HOSTPORTS) <= 4096


@pytest.mark.parametrize("via, nat", [
    ("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKa", False),                                 # nothing stamped
    ("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKa;rport=5060;received=192.0.2.1", False),  # as it says
    ("SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKa;rport=5060;received=192.0.2.1", False),       # 5060 by default
    ("SIP/2.0/UDP [2001:db8::9]:5070;branch=z9hG4bKa;rport=5070;received=2001:db8::9", False),
    ("SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bKa;rport=5060;received=198.51.100.4", True),  # another address
    ("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKa;rport=40112;received=192.0.2.1", True),   # another port
])
def test_a_via_tells_a_nat_by_its_received_and_rport(via, nat):
    m = parse_message(request(extra=b"").replace(b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc",
                                                 f"Via: {via}".encode()))
    assert m.top_via.behind_nat is nat


def test_sip_uri_parts_and_escapes():
    from sipcore.headers import parse_uri
    u = parse_uri("sips:al%20ice:se%63ret@[2001:db8::1]:5071;transport=tcp;lr?subject=x&h=y")
    assert (u.scheme, u.user, u.password) == ("sips", "al ice", "secret")
    assert (u.host, u.port) == ("[2001:db8::1]", 5071)
    assert u.params == {"transport": "tcp", "lr": None}
    assert u.headers == "subject=x&h=y"
    assert u.transport == "tcp" and u.lr
    assert parse_uri("sip:Bob@BILOXI.com:5060;x=1").aor() == "sip:Bob@biloxi.com"
    assert parse_uri("tel:+1-201-555-0123").opaque == "+1-201-555-0123"


def test_changed_message_rewrites_only_changed_fields():
    raw = INVITE.replace(b"Max-Forwards: 70", b"max-forwards:70").replace(b"To: Bob", b"t: Bob")
    m = parse_message(raw)
    m.set("Max-Forwards", "69")
    m.add_top("Via", "SIP/2.0/UDP proxy.example;branch=z9hG4bKp")
    out = m.to_bytes()
    assert out.startswith(b"INVITE sip:bob@biloxi.com SIP/2.0\r\nVia: SIP/2.0/UDP proxy.example;branch=z9hG4bKp\r\n"
                          b"Via: SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bK776asdhds\r\nmax-forwards: 69\r\n")
    assert b"\r\nt: Bob <sip:bob@biloxi.com>\r\n" in out
    assert out.endswith(m.body)
    again = parse_message(out)
    assert again.max_forwards == 69 and len(again.vias) == 2


def test_pop_first_removes_one_value_of_a_comma_list():
    m = parse_message(RESPONSE.replace(b"Via: SIP/2.0/UDP server10", b"Via: SIP/2.0/UDP a;branch=z9hG4bKa, SIP/2.0/UDP server10"))
    assert len(m.vias) == 3
    assert m.pop_first("Via") == "SIP/2.0/UDP a;branch=z9hG4bKa"
    assert [v.host for v in parse_message(m.to_bytes()).vias] == ["server10.biloxi.com", "pc33.atlanta.com"]


def test_body_change_keeps_content_length_consistent():
    m = parse_message(INVITE)
    m.set_body(b"v=0\r\n")
    out = parse_message(m.to_bytes())
    assert out.content_length == 5 and out.body == b"v=0\r\n"


def test_stream_serialization_adds_missing_content_length():
    m = parse_message(request(cl=False))
    assert m.content_length is None
    assert b"Content-Length: 0\r\n" in m.to_bytes(stream=True)


def test_datagram_content_length_shorter_truncates_body():
    raw = request(body=b"hello") + b"garbage"
    assert parse_message(raw).body == b"hello"


def test_datagram_content_length_larger_is_an_error():
    raw = request(body=b"hello")[:-2]
    with pytest.raises(SipParseError, match="Content-Length larger than body"):
        parse_message(raw)


def test_missing_content_length_on_a_datagram_means_rest_of_packet():
    assert parse_message(request(cl=False) + b"abc").body == b"abc"


def test_missing_content_length_on_a_stream_is_an_error():
    with pytest.raises(SipParseError, match="missing Content-Length"):
        parse_message(request(cl=False), datagram=False)


@pytest.mark.parametrize("raw, reason", [
    (b"INVITE  sip:a@b SIP/2.0\r\n\r\n", "bad request line"),
    (b"INVITE sip:a@b SIP/7.0\r\nVia: x\r\n\r\n", "unsupported SIP version"),
    (b"SIP/2.0 2000 OK\r\n\r\n", "bad status code"),
    (b"INV<ITE sip:a@b SIP/2.0\r\n\r\n", "bad method"),
    (b"INVITE sip:a@b SIP/2.0\r\nVia: x", "no end of header"),
    (b"INVITE sip:a@b SIP/2.0\r\nNoColonHere\r\n\r\n", "without a colon"),
    (b"INVITE sip:a@b SIP/2.0\r\n folded-first\r\n\r\n", "folded line before"),
    (b"INVITE sip:a@b SIP/2.0\r\nContent-Length: -3\r\n\r\n", "bad Content-Length"),
    (b"INVITE sip:a@b SIP/2.0\r\nContent-Length: 1\r\nl: 2\r\n\r\nab", "conflicting Content-Length"),
    (b"", "empty message"),
])
def test_malformed_messages_raise_parse_error_with_reason(raw, reason):
    with pytest.raises(SipParseError, match=reason):
        parse_message(raw)


@pytest.mark.parametrize("extra, reason", [
    (b'From: "unterminated <sip:a@b>;tag=1\r\n', "unterminated"),
    (b"To: <sip:b@x\r\n", "unterminated <URI>"),
])
def test_bad_header_values_fail_on_access_with_reason(extra, reason):
    raw = request().replace(b"From: <sip:alice@example.com>;tag=ft\r\n", b"").replace(b"To: <sip:bob@example.com>\r\n", b"")
    raw = raw.replace(b"Call-ID", extra + b"From: <sip:f@x>;tag=1\r\nTo: <sip:t@x>\r\nCall-ID", 1) if b"From" in extra else \
        raw.replace(b"Call-ID", extra + b"From: <sip:f@x>;tag=1\r\nCall-ID", 1)
    m = parse_message(raw)
    with pytest.raises(SipParseError, match=reason):
        m.check()


def test_check_names_a_missing_mandatory_header():
    raw = request().replace(b"Call-ID: cid-1@192.0.2.1\r\n", b"")
    with pytest.raises(SipParseError, match="missing Call-ID"):
        parse_message(raw).check()


def test_cseq_method_must_match_request_method():
    raw = request().replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE")
    with pytest.raises(SipParseError, match="CSeq method"):
        parse_message(raw).check()


def test_limits_bound_size_headers_and_line_length():
    from sipcore.message import Limits
    with pytest.raises(SipParseError, match="too large"):
        parse_message(request(body=b"x" * 70000))
    with pytest.raises(SipParseError, match="too many header"):
        parse_message(request(extra=b"X-A: 1\r\n" * 300))
    with pytest.raises(SipParseError, match="line too long"):
        parse_message(request(extra=b"X-A: " + b"a" * 9000 + b"\r\n"))
    assert parse_message(request(extra=b"X-A: 1\r\n" * 300), limits=Limits(max_headers=400))


def test_bare_lf_line_endings_are_tolerated():
    raw = request().replace(b"\r\n", b"\n")
    m = parse_message(raw)
    m.check()
    assert m.to_bytes() == raw


def test_make_response_copies_dialog_fields_and_adds_to_tag():
    req = parse_message(INVITE)
    resp = parse_message(make_response(req, 486, "Busy Here", to_tag="xyz").to_bytes())
    assert resp.status == 486 and resp.to.tag == "xyz"
    assert resp.call_id == req.call_id and resp.cseq == req.cseq
    assert resp.top_via.branch == req.top_via.branch and resp.content_length == 0


# ---- properties ------------------------------------------------------------

token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(name=token, value=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
       body=st.binary(max_size=200))
def test_parse_serialize_roundtrip(name, value, body):
    raw = request(extra=f"X-{name}: {value}\r\n".encode(), body=body)
    m = parse_message(raw)
    assert m.to_bytes() == raw
    m.set("Max-Forwards", "10")
    again = parse_message(m.to_bytes())
    assert again.get(f"X-{name}") == value.strip() and again.body == body and again.max_forwards == 10


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_random_mutations_raise_nothing_but_parse_error(data):
    raw = bytearray(INVITE)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "del", "ins"]))
        b = data.draw(st.integers(0, 255))
        if op == "flip":
            raw[i] = b
        elif op == "del":
            del raw[i]
        else:
            raw.insert(i, b)
    try:
        m = parse_message(bytes(raw))
        m.check()
        m.set("Max-Forwards", "1")
        m.to_bytes()
        for prop in ("routes", "record_routes", "contacts", "paths"):
            getattr(m, prop)
    except SipParseError:
        pass


@pytest.mark.parametrize("field", ["Max-Forwards: \u00b270", "CSeq: \u00b2 OPTIONS", "Content-Length: \u00b9"])
def test_unicode_digits_are_not_digits(field):
    """Found by the mutation test: latin-1 byte 0xB2 decodes to '²', which
    str.isdigit() accepts and int() refuses."""
    name = field.split(":")[0]
    raw = b"\r\n".join(line for line in request().split(b"\r\n") if not line.startswith(name.encode()))
    raw = raw.replace(b"Via:", field.encode("latin-1") + b"\r\nVia:", 1)
    with pytest.raises(SipParseError):
        parse_message(raw).check()


def test_via_transport_must_be_an_ascii_token():
    """Found by atheris: 'UDP\\xff' upper-cased to a character latin-1 cannot
    encode, and rewriting that Via (received/rport) then failed."""
    raw = request().replace(b"SIP/2.0/UDP 192.0.2.1", b"SIP/2.0/UDP\xff 192.0.2.1")
    with pytest.raises(SipParseError, match="bad Via"):
        parse_message(raw).check()


def test_a_name_addr_is_parsed_once_for_the_messages_that_repeat_it():
    """A call's messages repeat their From, To, Contact and Record-Route:
    a value is parsed once and its NameAddr shared (read only); a bad one
    is refused every time; the memo stays bounded."""
    from sipcore import headers
    value = '"Alice" <sip:alice@example.com>;tag=memo-1'
    first = headers.parse_name_addr(value)
    assert headers.parse_name_addr(value) is first and (first.display, first.tag) == ("Alice", "memo-1")
    a = parse_message(INVITE.replace(b"tag=1928301774", b"tag=memo-2"))
    b = parse_message(INVITE.replace(b"tag=1928301774", b"tag=memo-2"))
    assert a.from_ is b.from_ and a.from_.tag == "memo-2"
    for _ in range(2):
        with pytest.raises(SipParseError):
            headers.parse_name_addr("<sip:alice@example.com")
    for i in range(5000):
        headers.parse_name_addr(f"<sip:u{i}@example.com>")
    assert len(headers._NAME_ADDRS) <= 4096
