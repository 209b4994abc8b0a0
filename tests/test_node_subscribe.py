"""node.app: SUBSCRIBE outside a dialog (RFC 6665), as softphones send it
for a buddy's presence, a busy lamp or message waiting. The node answered
405; a proxy without a presence server of its own (Kamailio's default
configuration) sends it on to the user's phone, and so does a node now,
through a dialog of two legs like a call's."""
from __future__ import annotations

import pytest

from nodekit import (UDP, in_dialog, of_method, of_status, register, settled, with_headers, with_nodes)
from sipcore.bekey import bekey_of
from sipcore.message import make_response, parse_message

pytestmark = pytest.mark.e2e

SUB_ID = "sub-1@192.0.2.70"


def subscribe(user: str = "bob", expires: int = 600) -> bytes:
    return (f"SUBSCRIBE sip:{user}@example.com SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKsphsub1\r\n"
            f"Via: SIP/2.0/UDP 192.0.2.70:5060;branch=z9hG4bKsub1;rport=5060;received=192.0.2.70\r\n"
            f"Record-Route: <sip:127.0.0.1:5999;lr;flow=udp:192.0.2.70:5060>\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=s1\r\nTo: <sip:{user}@example.com>\r\n"
            f"Call-ID: {SUB_ID}\r\nCSeq: 1 SUBSCRIBE\r\nContact: <sip:alice@192.0.2.70:5060>\r\n"
            f"Event: presence\r\nAccept: application/pidf+xml\r\nExpires: {expires}\r\n"
            f"Content-Length: 0\r\n\r\n").encode()


def notify(sub, state: str, cseq: int, body: bytes = b"<presence/>"):
    """The notifier's NOTIFY in the dialog of `sub` (the SUBSCRIBE it got)."""
    n = in_dialog("NOTIFY", cseq, sub.call_id, "bob-1", sub.from_.tag, f"z9hG4bKnot{cseq}")
    n = n.to_bytes().replace(b"<sip:someone@192.0.2.70:5060>", b"<sip:bob@192.0.2.80:5060>")
    return with_headers(n, [("Event", "presence"), ("Subscription-State", state)], body, "application/pidf+xml")


def to_subscriber(msgs) -> list[tuple[int, str]]:
    return [(m.status, m.cseq[1]) for m in msgs if getattr(m, "status", 0) and m.call_id == SUB_ID]


@pytest.mark.parametrize("notify_first", [False, True])
def test_a_presence_subscription_goes_to_the_phone_and_its_notifies_come_back(tmp_path, notify_first):
    async def scenario(nodes, sent):
        n, = nodes
        n.on_message(register("bob", ["<sip:bob@192.0.2.80:5060>"]), *UDP)
        await settled(n)
        sent[n].clear()
        n.on_message(parse_message(subscribe()), *UDP)
        await settled(n)
        sub, = of_method(sent[n], "SUBSCRIBE")
        ok = make_response(sub, 202, "Accepted", to_tag="bob-1",
                           headers=[("Contact", "<sip:bob@192.0.2.80:5060>"), ("Expires", "600")])
        first = notify(sub, "active;expires=600", 1)
        for msg in ((first, ok) if notify_first else (ok, first)):
            n.on_message(msg, *UDP)
            await settled(n)
        relayed = of_method(sent[n], "NOTIFY")
        n.on_message(make_response(relayed[0], 200, "OK"), *UDP)
        await settled(n)
        # the subscriber ends it: SUBSCRIBE Expires 0 in the dialog, then the last NOTIFY
        answer, = [m for m in of_status(sent[n], 202) if m.call_id == SUB_ID]
        bye = with_headers(in_dialog("SUBSCRIBE", 2, SUB_ID, "s1", answer.to.tag, "z9hG4bKsub2"),
                           [("Event", "presence"), ("Expires", "0")])
        n.on_message(bye, *UDP)
        await settled(n)
        refresh = of_method(sent[n], "SUBSCRIBE")[-1]
        n.on_message(make_response(refresh, 200, "OK", headers=[("Expires", "0")]), *UDP)
        last = notify(sub, "terminated;reason=timeout", 2, b"")
        n.on_message(last, *UDP)
        await settled(n)
        relayed = of_method(sent[n], "NOTIFY")
        n.on_message(make_response(relayed[-1], 200, "OK"), *UDP)
        await settled(n)
        return sub, answer, relayed, refresh, sent[n], await n.store.load(bekey_of(SUB_ID), [])

    sub, answer, relayed, refresh, out, left = with_nodes(tmp_path, 1, scenario)
    assert sub.uri == "sip:bob@192.0.2.80:5060" and sub.call_id != SUB_ID
    assert (sub.get("Event"), sub.get("Expires"), sub.get("Accept")) == ("presence", "600", "application/pidf+xml")
    assert answer.get("Expires") == "600" and answer.to.tag.startswith("sph")
    assert [(m.call_id, m.uri, m.get("Subscription-State")) for m in relayed] == [
        (SUB_ID, "sip:alice@192.0.2.70:5060", "active;expires=600"),
        (SUB_ID, "sip:someone@192.0.2.70:5060", "terminated;reason=timeout")]    # its refresh's Contact
    assert relayed[0].body == b"<presence/>" and relayed[0].from_.tag == answer.to.tag
    assert refresh.call_id == sub.call_id and refresh.to.tag == "bob-1" and refresh.get("Expires") == "0"
    assert refresh.uri == "sip:bob@192.0.2.80:5060"
    assert to_subscriber(out) == [(202, "SUBSCRIBE"), (200, "SUBSCRIBE")]
    assert [(m.status, m.cseq) for m in out if getattr(m, "status", 0) and m.call_id == sub.call_id] == \
        [(200, (1, "NOTIFY")), (200, (2, "NOTIFY"))]                   # the notifier's answers
    assert [m.get("Expires") for m in out if getattr(m, "status", 0) == 200 and m.cseq[1] == "SUBSCRIBE"] == ["0"]
    assert left == (None, "missing")


@pytest.mark.parametrize("status, headers, expected", [
    (489, [("Allow-Events", "dialog")], (489, "dialog")),     # the phone has no presence
    (None, [], (404, None)),                                   # nobody of that name
])
def test_a_subscription_refused_or_for_nobody_leaves_nothing(tmp_path, status, headers, expected):
    async def scenario(nodes, sent):
        n, = nodes
        if status:
            n.on_message(register("bob", ["<sip:bob@192.0.2.80:5060>"]), *UDP)
            await settled(n)
        sent[n].clear()
        n.on_message(parse_message(subscribe() if status else subscribe("nobody")), *UDP)
        await settled(n)
        for sub in of_method(sent[n], "SUBSCRIBE"):
            n.on_message(make_response(sub, status, "Bad Event", to_tag="bob-1", headers=headers), *UDP)
            await settled(n)
        return sent[n], await n.store.load(bekey_of(SUB_ID), [])

    out, left = with_nodes(tmp_path, 1, scenario, {"node.upstream": ""})
    final, = [m for m in out if getattr(m, "status", 0) >= 300]
    assert (final.status, final.get("Allow-Events")) == expected and final.call_id == SUB_ID
    assert left == (None, "missing")


@pytest.mark.parametrize("upstream", ["sip:vm@127.0.0.1:5998", ""])
def test_message_waiting_goes_to_the_voicemail_not_to_the_phone(tmp_path, upstream):
    """A phone subscribes to its own message-summary (RFC 3842): that is
    the voicemail's to answer, upstream; with no upstream, 404."""
    async def scenario(nodes, sent):
        n, = nodes
        n.on_message(register("alice", ["<sip:alice@192.0.2.70:5060>"]), *UDP)
        await settled(n)
        sent[n].clear()
        mwi = parse_message(subscribe("alice").replace(b"Event: presence", b"Event: message-summary"))
        n.on_message(mwi, *UDP)
        await settled(n)
        return sent[n]

    out = with_nodes(tmp_path, 1, scenario, {"node.upstream": upstream})
    if upstream:
        sub, = of_method(out, "SUBSCRIBE")
        assert sub.uri == "sip:alice@127.0.0.1:5998" and sub.get("Event") == "message-summary"
    else:
        assert [(m.status, m.reason) for m in out] == [(404, "Not Found (no voicemail service)")]


def test_a_subscription_is_kept_no_longer_than_it_asked_for_and_a_day_at_most():
    from node.app import subscription_ttl
    assert [subscription_ttl(parse_message(subscribe(expires=e))) for e in (600, 0, 10 ** 30)] == \
        [720, 120, 86520]
    odd = parse_message(subscribe().replace(b"Expires: 600", "Expires: ²".encode("latin-1")))
    assert subscription_ttl(odd) == 3720                     # not a number: the default hour


def test_a_subscription_whose_node_died_before_the_answer_is_answered_by_the_partner(tmp_path):
    """The node that sent the SUBSCRIBE on died; the phone's 202 reached
    the partner (the proxy sends it to the call's new owner), which
    dropped it, and the subscriber's SUBSCRIBE again made a second
    subscription there, the first one left orphaned at the phone."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        owner.on_message(register("bob", ["<sip:bob@192.0.2.80:5060>"]), *UDP)
        await settled(owner)
        first = subscribe().replace(b"Max-Forwards: 70\r\n",
                                    b"Max-Forwards: 70\r\nX-Sipha-Route: bekey=%s;owner=node1;partner=node2\r\n"
                                    % bekey_of(SUB_ID).encode())
        owner.on_message(parse_message(first), *UDP)
        await settled(owner)
        sub, = of_method(sent[owner], "SUBSCRIBE")
        owner.tx.close()                                            # the owner dies
        again = first.replace(b"owner=node1;partner=node2", b"owner=node2;partner=")
        partner.on_message(parse_message(again), *UDP)              # the subscriber's retransmission
        await settled(partner)
        partner.on_message(make_response(sub, 202, "Accepted", to_tag="bob-1",
                                         headers=[("Contact", "<sip:bob@192.0.2.80:5060>"), ("Expires", "600")]),
                           *UDP)
        await settled(partner)
        return sent[partner], await partner.store.load(bekey_of(SUB_ID), [])

    out, (record, how) = with_nodes(tmp_path, 2, scenario)
    assert not of_method(out, "SUBSCRIBE")                          # no second subscription
    assert to_subscriber(out) == [(202, "SUBSCRIBE")]
    assert record["st"] == "confirmed" and record["b"]["rt"] == "bob-1" and how == "active"
