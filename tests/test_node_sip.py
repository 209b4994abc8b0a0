"""node.sip: AckGate (which ACKs of a 2xx a node relays), and the
requests a node writes."""
from __future__ import annotations

import pytest

from node.sip import AckGate, new_request, parse_request


def test_one_ack_goes_on_for_each_2xx_relayed():
    gate = AckGate()
    gate.grant("c1", 1)
    assert gate.take("c1", 1)
    assert not gate.take("c1", 1)          # the caller ACKs a copy the callee never sent
    gate.grant("c1", 1)                     # the callee sent its 2xx again: our ACK was lost
    assert gate.take("c1", 1) and not gate.take("c1", 1)
    assert gate.take("c1", 2)               # a re-INVITE's ACK is another one


def test_an_ack_of_a_2xx_relayed_elsewhere_goes_on_once():
    gate = AckGate()
    assert gate.take("c2", 1) and not gate.take("c2", 1)


def test_entries_expire_and_stay_bounded():
    gate = AckGate(ttl=-1.0, limit=100)
    assert gate.take("c3", 1) and gate.take("c3", 1)      # 64*T1 later it is new again
    gate = AckGate(limit=100)
    for i in range(1000):
        gate.take(f"c{i}", 1)
    assert len(gate.entries) <= 101


@pytest.mark.parametrize("body", [b"", b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\n"])
def test_a_request_written_from_its_parts_is_the_one_its_text_parses_to(body):
    """The node writes its requests from their parts (Node.build) rather
    than writing their text and parsing it: the same bytes, the same
    fields read back."""
    fields = [("Via", "SIP/2.0/UDP 127.0.0.1:7001;branch=z9hG4bKb1;rport"), ("Max-Forwards", "70"),
              ("From", "<sip:alice@example.com>;tag=f1"), ("To", "<sip:bob@example.com>"),
              ("Call-ID", "c1@sipha"), ("CSeq", "1 INVITE"), ("Route", "<sip:127.0.0.1:5999;lr>"),
              ("Contact", "<sip:127.0.0.1:7001>"), ("Supported", "timer, 100rel")]
    if body:
        fields.append(("Content-Type", "application/sdp"))
    built = new_request("INVITE", "sip:bob@192.0.2.9:5060", fields, body)
    text = "".join(f"{n}: {v}\r\n" for n, v in fields) + f"Content-Length: {len(body)}\r\n\r\n"
    parsed = parse_request(f"INVITE sip:bob@192.0.2.9:5060 SIP/2.0\r\n{text}", body)
    assert built.to_bytes() == parsed.to_bytes()
    built.check()
    assert (built.method, built.ruri.host, built.top_via.branch, built.from_.tag, built.to.tag, built.cseq,
            built.call_id, built.body, built.values("Route")) == \
        ("INVITE", "192.0.2.9", "z9hG4bKb1", "f1", None, (1, "INVITE"), "c1@sipha", body, ["<sip:127.0.0.1:5999;lr>"])
