"""A corpus in the categories of RFC 4475 (SIP torture tests), written for
sipha: unusual but legal messages must parse and round-trip byte for byte;
invalid ones must raise SipParseError naming the problem, nothing else."""
from __future__ import annotations

import pytest

from sipcore.errors import SipParseError
from sipcore.message import parse_message


def msg(start, headers, body=b""):
    return start.encode() + b"\r\n" + b"".join(h.encode() + b"\r\n" for h in headers) + b"\r\n" + body


BASE = [
    "To: <sip:bob@example.com>",
    "From: <sip:alice@example.com>;tag=f1",
    "Call-ID: torture-1",
    "CSeq: 1 OPTIONS",
    "Via: SIP/2.0/UDP host1.example.com;branch=z9hG4bK1",
    "Max-Forwards: 70",
    "Content-Length: 0",
]

VALID = {
    # whitespace everywhere the grammar allows it, folding, compact forms
    "wsinv": msg("INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0", [
        "TO :\r\n sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n",
        "from   : \"J Rosenberg \\\\\\\"\"       <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8",
        "MaX-fOrWaRdS: 0068",
        "Call-ID: wsinv.ndaksdj@192.0.2.1",
        "Content-Length   : 0",
        "cseq: 0009\r\n  INVITE",
        "Via  : SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=390skdjuw",
        "s :",
        "NewFangledHeader:   newfangled value\r\n continued newfangled value",
        "UnknownHeaderWithUnusualValue: ;;,,;;,;",
        "Contact: <sip:jdrosen@example.com>",
    ]),
    # an unusual but legal method token
    "intmeth": msg("!interesting-Method0123456789_*+`.%indeed'~ sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com SIP/2.0",
                   BASE[:3] + ["CSeq: 139122385 !interesting-Method0123456789_*+`.%indeed'~"] + BASE[4:]),
    # escaped characters in the Request-URI user part
    "esc01": msg("INVITE sip:sips%3Auser%40example.com@example.net SIP/2.0",
                 BASE[:3] + ["CSeq: 1 INVITE"] + BASE[4:]),
    # a header with no value and unknown headers
    "noreason": msg("SIP/2.0 100 ", ["Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2", *BASE[:4], "Content-Length: 0"]),
    # multiple Via values in one field and across fields
    "mvia": msg("OPTIONS sip:x@example.com SIP/2.0", [
        "v: SIP/2.0/UDP a.example.com;branch=z9hG4bK1, SIP/2.0/TCP b.example.com:5070;branch=z9hG4bK2",
        "Via: SIP/2.0/UDP [2001:db8::10]:5070;branch=z9hG4bK3;received=2001:db8::9;rport=1234", *BASE[:4],
        "Max-Forwards: 70", "l: 0"]),
    # long values, many headers
    "longreq": msg("OPTIONS sip:x@example.com SIP/2.0",
                   BASE + [f"X-Long-{i}: " + "a" * 200 for i in range(40)]),
    # body with binary bytes and exact Content-Length
    "binbody": msg("MESSAGE sip:x@example.com SIP/2.0",
                   BASE[:3] + ["CSeq: 1 MESSAGE"] + BASE[4:6] + ["Content-Type: application/octet-stream",
                                                                 "Content-Length: 6"], b"\x00\xff\r\n\x01\x02"),
    # unknown URI scheme in To/From is legal
    "unksm2": msg("REGISTER sip:example.com SIP/2.0",
                  ["To: isbn:2983792873", "From: <http://www.example.com>;tag=3234233", *BASE[2:3],
                   "CSeq: 2 REGISTER", *BASE[4:]]),
}

INVALID = {
    "clerr": (msg("INVITE sip:x@example.com SIP/2.0", BASE[:6] + ["Content-Length: 9999"], b"v=0"), "Content-Length larger"),
    "ncl": (msg("INVITE sip:x@example.com SIP/2.0", BASE[:6] + ["Content-Length: -999"]), "bad Content-Length"),
    "lwsstart": (msg("INVITE  sip:x@example.com SIP/2.0", BASE), "bad request line"),
    "trws": (msg("OPTIONS sip:x@example.com SIP/2.0 ", BASE), "bad request line"),
    "escruri": (msg("INVITE sip:user@example.com? SIP/2.0 extra", BASE), "bad request line"),
    "badvers": (msg("OPTIONS sip:t.watson@example.org SIP/7.0", BASE), "unsupported SIP version"),
    "bigcode": (msg("SIP/2.0 4294967301 better not break the receiver", BASE), "bad status code"),
    "nocolon": (msg("OPTIONS sip:x@example.com SIP/2.0", BASE + ["This is not a header"]), "without a colon"),
    "badname": (msg("OPTIONS sip:x@example.com SIP/2.0", BASE + ["Bad Name: x"]), "bad header name"),
    "dupcl": (msg("OPTIONS sip:x@example.com SIP/2.0", BASE + ["l: 5"]), "conflicting Content-Length"),
    "nohdrend": (b"OPTIONS sip:x@example.com SIP/2.0\r\nVia: x", "no end of header"),
    "nouri": (msg("OPTIONS example.com SIP/2.0", BASE), "bad Request-URI"),
}

INVALID_ON_CHECK = {
    "quotbal": ('From: "Mr. J. User <sip:j.user@example.com>;tag=93334', "unterminated"),
    "ltgtruri": ("To: <sip:b@example.com", "unterminated <URI>"),
    "scalar02": ("CSeq: 36893488147419103232 OPTIONS", "bad CSeq number"),
    "mf": ("Max-Forwards: 300", "bad Max-Forwards"),
    "viaport": ("Via: SIP/2.0/UDP host:99999;branch=z9hG4bK1", "bad port"),
    "viaproto": ("Via: HTTP/1.1/TCP host;branch=z9hG4bK1", "bad Via"),
    "v6": ("Via: SIP/2.0/UDP [2001:db8::1;branch=z9hG4bK1", "unterminated IPv6"),
    "mismatch": ("CSeq: 1 INVITE", "CSeq method does not match"),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_unusual_but_legal_messages_parse_and_round_trip(name):
    raw = VALID[name]
    m = parse_message(raw)
    m.check()
    assert m.to_bytes() == raw


def test_wsinv_fields_read_as_the_rfc_says():
    m = parse_message(VALID["wsinv"])
    assert m.to.tag == "1918181833n" and m.from_.tag == "98asjd8"
    assert m.max_forwards == 68 and m.cseq == (9, "INVITE")
    assert m.top_via.host == "192.0.2.2" and m.top_via.branch == "390skdjuw"
    assert m.get("NewFangledHeader") == "newfangled value continued newfangled value"


def test_escaped_user_part_is_unescaped():
    m = parse_message(VALID["esc01"])
    assert m.ruri.user == "sips:user@example.com" and m.ruri.host == "example.net"


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_messages_are_rejected_with_a_reason(name):
    raw, reason = INVALID[name]
    with pytest.raises(SipParseError, match=reason):
        parse_message(raw).check()


@pytest.mark.parametrize("name", sorted(INVALID_ON_CHECK))
def test_invalid_routing_fields_are_rejected_with_a_reason(name):
    header, reason = INVALID_ON_CHECK[name]
    key = header.split(":")[0].lower()
    headers = [h for h in BASE if h.split(":")[0].lower() != key] + [header]
    m = parse_message(msg("OPTIONS sip:x@example.com SIP/2.0", headers))
    with pytest.raises(SipParseError, match=reason) as exc:
        m.check()
    assert exc.value.message is m   # enough parsed to answer 400
