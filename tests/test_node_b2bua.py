"""node.app: what the B2BUA carries from one leg to the other, and what
it must not: a proxy (Kamailio, OpenSIPS) hands every header on, so a
caller behind sipha must not learn less from an answer than behind them
(where a redirect goes, when to try again, what the far side allows),
and a loop through the B2BUA must end as it would through a proxy."""
from __future__ import annotations

import pytest

from nodekit import (CALL_ID, SDP, UDP, answered_call, caller_invite, in_dialog, of_method, register, settled,
                     with_headers, with_nodes)
from sipcore.bekey import ROUTE_HEADER, bekey_of
from sipcore.message import make_response, parse_message

pytestmark = pytest.mark.e2e


def to_caller(msgs) -> list:
    return [m for m in msgs if getattr(m, "status", 0) > 100 and m.call_id == CALL_ID]


@pytest.mark.parametrize("status, reason, headers", [
    (302, "Moved Temporarily", [("Contact", "<sip:bob@192.0.2.99:5060>;q=0.9"), ("Contact", "<sip:bob@192.0.2.98>")]),
    (503, "Service Unavailable", [("Retry-After", "30"), ("Warning", '399 trunk "congested"')]),
    (486, "Busy Here", [("Retry-After", "120"), ("Reason", 'Q.850;cause=17;text="User busy"')]),
    (422, "Session Interval Too Small", [("Min-SE", "1800")]),      # RFC 4028: ask again with 1800
])
def test_a_callees_failure_reaches_the_caller_with_what_it_says(tmp_path, status, reason, headers):
    """A 3xx reached the caller without its Contact (nowhere to go), a 503
    or 486 without Retry-After (callers retried at once) or its Reason
    (the Q.850 cause a gateway's caller hears)."""
    async def scenario(nodes, sent):
        n, = nodes
        bekey = bekey_of(CALL_ID)
        await n.new_call(parse_message(caller_invite(bekey)), bekey)
        b_invite, = of_method(sent[n], "INVITE")
        n.on_message(make_response(b_invite, status, reason, to_tag="callee-1",
                                   headers=headers + [("Server", "trunk-9.1"), ("X-Internal", "1")]), *UDP)
        await settled(n)
        return sent[n]

    out = with_nodes(tmp_path, 1, scenario)
    final, = to_caller(out)
    assert (final.status, final.reason) == (status, reason)
    names = {name for name, _ in headers}
    assert [(f.name, f.value) for f in final.fields if f.name in names] == headers
    assert not final.has("Server") and not final.has("X-Internal")     # the far side's own stays there
    assert len(of_method(out, "ACK")) == 1


def test_an_in_dialog_refusal_reaches_the_other_side_with_its_allow(tmp_path):
    async def scenario(nodes, sent):
        n, = nodes
        bekey, ok, b_invite = await answered_call(n, sent)
        n.on_message(in_dialog("MESSAGE", 2, CALL_ID, "a1", ok.to.tag, "z9hG4bKmsg2"), *UDP)
        await settled(n)
        relayed, = of_method(sent[n], "MESSAGE")
        n.on_message(make_response(relayed, 405, "Method Not Allowed", headers=[("Allow", "INVITE, ACK, BYE")]), *UDP)
        await settled(n)
        return sent[n]

    refusal, = [m for m in to_caller(with_nodes(tmp_path, 1, scenario)) if m.status == 405]
    assert refusal.get("Allow") == "INVITE, ACK, BYE"


def test_the_callee_hears_the_callers_subject_and_priority_but_no_auto_answer(tmp_path):
    """Subject and Priority go on to the callee; Alert-Info and Call-Info,
    with which a caller from outside can make some phones answer by
    themselves (and listen in), do not."""
    async def scenario(nodes, sent):
        n, = nodes
        bekey = bekey_of(CALL_ID)
        invite = with_headers(caller_invite(bekey), [
            ("Subject", "quarterly numbers"), ("Priority", "urgent"),
            ("Alert-Info", "<http://127.0.0.1/ring>;info=alert-autoanswer"), ("Call-Info", "<sip:x>;answer-after=0")])
        await n.new_call(invite, bekey)
        return of_method(sent[n], "INVITE")

    b_invite, = with_nodes(tmp_path, 1, scenario)
    assert (b_invite.get("Subject"), b_invite.get("Priority")) == ("quarterly numbers", "urgent")
    assert "REFER" in b_invite.values("Allow") and "UPDATE" in b_invite.values("Allow")
    assert not b_invite.has("Alert-Info") and not b_invite.has("Call-Info")


@pytest.mark.parametrize("hops, status, b_leg", [(69, None, "68"), (1, None, "0"), (0, 483, None)])
def test_max_forwards_goes_down_across_the_b2bua(tmp_path, hops, status, b_leg):
    """A B2BUA that starts its B-leg at Max-Forwards 70 turns a routing loop
    (an upstream that sends the call back to the cluster) into a storm of
    new calls that never ends: the B-leg INVITE carries the caller's
    Max-Forwards less one, and one that arrives at 0 gets 483."""
    async def scenario(nodes, sent):
        n, = nodes
        bekey = bekey_of(CALL_ID)
        invite = caller_invite(bekey).replace(b"Max-Forwards: 69", f"Max-Forwards: {hops}".encode())
        n.on_message(parse_message(invite), *UDP)
        await settled(n)
        return sent[n]

    out = with_nodes(tmp_path, 1, scenario)
    assert [m.get("Max-Forwards") for m in of_method(out, "INVITE")] == ([b_leg] if b_leg else [])
    finals = [(m.status, m.reason) for m in out if getattr(m, "status", 0) >= 200]
    assert finals == ([(483, "Too Many Hops")] if status else [])


def test_a_blind_transfer_goes_through(tmp_path):
    """A softphone's transfer button: REFER with Refer-To, then NOTIFYs of
    how the new call goes (RFC 3515). Relayed with their body alone, the
    REFER had no Refer-To (400 at the far side) and the NOTIFY no Event
    or Subscription-State (RFC 6665 requires both): no transfer."""
    refer_to = "<sip:carol@example.com?Replaces=abc%3Bto-tag%3D1%3Bfrom-tag%3D2>"

    async def scenario(nodes, sent):
        n, = nodes
        bekey, ok, b_invite = await answered_call(n, sent)
        refer = in_dialog("REFER", 2, CALL_ID, "a1", ok.to.tag, "z9hG4bKref2")
        n.on_message(with_headers(refer, [("Refer-To", refer_to), ("Referred-By", "<sip:alice@example.com>")]), *UDP)
        await settled(n)
        relayed, = of_method(sent[n], "REFER")
        n.on_message(make_response(relayed, 202, "Accepted"), *UDP)
        notify = in_dialog("NOTIFY", 2, b_invite.call_id, "callee-1", b_invite.from_.tag, "z9hG4bKnot2")
        n.on_message(with_headers(notify, [("Event", "refer"), ("Subscription-State", "terminated;reason=noresource")],
                                  b"SIP/2.0 200 OK\r\n", "message/sipfrag;version=2.0"), *UDP)
        await settled(n)
        return relayed, of_method(sent[n], "NOTIFY"), to_caller(sent[n])

    refer, notifies, answers = with_nodes(tmp_path, 1, scenario)
    ok, = [a for a in answers if a.cseq == (1, "INVITE")]
    assert "REFER" in ok.values("Allow") and "NOTIFY" in ok.values("Allow")   # the caller may transfer
    assert (refer.get("Refer-To"), refer.get("Referred-By")) == (refer_to, "<sip:alice@example.com>")
    assert [a.status for a in answers if a.cseq[1] == "REFER"] == [202]
    notify, = notifies
    assert notify.call_id == CALL_ID and notify.get("Event") == "refer"
    assert notify.get("Subscription-State") == "terminated;reason=noresource"
    assert notify.body == b"SIP/2.0 200 OK\r\n" and notify.get("Content-Type") == "message/sipfrag;version=2.0"


def test_a_transfers_notifies_name_the_refer_as_the_transferor_sent_it(tmp_path):
    """The NOTIFYs of a REFER's subscription name it by its CSeq (Event:
    refer;id=N, RFC 3515 §2.4.6), and the node numbers the far leg's
    requests its own way: relayed with our number, baresip, the
    transferor, answered 481 Subscription Does Not Exist (the transfer
    shown failed); the transferor's SUBSCRIBE to that subscription goes
    the other way."""
    async def scenario(nodes, sent):
        n, = nodes
        bekey, ok, b_invite = await answered_call(n, sent)
        refer = in_dialog("REFER", 7, CALL_ID, "a1", ok.to.tag, "z9hG4bKref7")
        n.on_message(with_headers(refer, [("Refer-To", "<sip:carol@example.com>")]), *UDP)
        await settled(n)
        relayed, = of_method(sent[n], "REFER")
        n.on_message(make_response(relayed, 202, "Accepted"), *UDP)
        notify = in_dialog("NOTIFY", 2, b_invite.call_id, "callee-1", b_invite.from_.tag, "z9hG4bKnot2")
        n.on_message(with_headers(notify, [("Event", f"refer;ID={relayed.cseq[0]}"),
                                           ("Subscription-State", "active;expires=60")],
                                  b"SIP/2.0 100 Trying\r\n", "message/sipfrag"), *UDP)
        await settled(n)
        sub = in_dialog("SUBSCRIBE", 8, CALL_ID, "a1", ok.to.tag, "z9hG4bKsub8")
        n.on_message(with_headers(sub, [("Event", "refer;id=7"), ("Expires", "0")]), *UDP)
        other = in_dialog("NOTIFY", 3, b_invite.call_id, "callee-1", b_invite.from_.tag, "z9hG4bKnot3")
        n.on_message(with_headers(other, [("Event", "refer;id=99"), ("Subscription-State", "active")],
                                  b"SIP/2.0 100 Trying\r\n", "message/sipfrag"), *UDP)
        await settled(n)
        return relayed, of_method(sent[n], "NOTIFY"), of_method(sent[n], "SUBSCRIBE")

    refer, notifies, (sub,) = with_nodes(tmp_path, 1, scenario)
    assert refer.cseq[0] != 7
    assert [m.get("Event") for m in notifies] == ["refer;ID=7", "refer;id=99"]     # one it never relayed: as it is
    assert sub.get("Event") == f"refer;id={refer.cseq[0]}"


def test_the_transferor_may_end_the_subscription_its_refer_made(tmp_path):
    """A REFER makes a subscription to the transfer's progress, which the
    transferor ends (or refreshes) with a SUBSCRIBE in the dialog (RFC
    6665 §4.1.2.3, RFC 3515 §2.4.4); it got 501 Not Implemented."""
    async def scenario(nodes, sent):
        n, = nodes
        _, ok, _ = await answered_call(n, sent)
        sub = in_dialog("SUBSCRIBE", 3, CALL_ID, "a1", ok.to.tag, "z9hG4bKsub3")
        n.on_message(with_headers(sub, [("Event", "refer"), ("Expires", "0")]), *UDP)
        await settled(n)
        relayed, = of_method(sent[n], "SUBSCRIBE")
        n.on_message(make_response(relayed, 200, "OK"), *UDP)
        await settled(n)
        return ok, relayed, to_caller(sent[n])

    ok, relayed, answers = with_nodes(tmp_path, 1, scenario)
    assert "SUBSCRIBE" in ok.values("Allow")
    assert (relayed.get("Event"), relayed.get("Expires"), relayed.cseq[1]) == ("refer", "0", "SUBSCRIBE")
    assert [a.status for a in answers if a.cseq[1] == "SUBSCRIBE"] == [200]


def test_why_a_call_ends_reaches_the_other_side(tmp_path):
    """Reason on a BYE (the Q.850 cause a gateway hangs up with) and on a
    CANCEL (a phone that shows no missed call for 'call completed
    elsewhere', RFC 3326)."""
    elsewhere = 'SIP;cause=200;text="Call completed elsewhere"'

    async def scenario(nodes, sent):
        n, = nodes
        bekey = bekey_of(CALL_ID)
        await n.new_call(parse_message(caller_invite(bekey)), bekey)
        cancel = caller_invite(bekey).replace(b"INVITE sip", b"CANCEL sip").replace(b"CSeq: 1 INVITE", b"CSeq: 1 CANCEL")
        n.on_message(with_headers(cancel, [("Reason", elsewhere)]), *UDP)
        await settled(n)
        b_cancel, = of_method(sent[n], "CANCEL")
        return b_cancel

    assert with_nodes(tmp_path, 1, scenario).get("Reason") == elsewhere

    async def hangup(nodes, sent):
        n, = nodes
        bekey, ok, b_invite = await answered_call(n, sent)
        bye = in_dialog("BYE", 1, b_invite.call_id, "callee-1", b_invite.from_.tag, "z9hG4bKbye1")
        n.on_message(with_headers(bye, [("Reason", "Q.850;cause=16")]), *UDP)
        await settled(n)
        return of_method(sent[n], "BYE")

    (tmp_path / "bye").mkdir()
    relayed, = with_nodes(tmp_path / "bye", 1, hangup)
    assert relayed.call_id == CALL_ID and relayed.get("Reason") == "Q.850;cause=16"


def test_a_cancel_that_crossed_the_callees_refusal_gets_200(tmp_path):
    """The caller CANCELs as the callee's 486 comes back: the node has
    answered the INVITE 486 and forgotten the call, but the CANCEL names
    an INVITE transaction it finished, so it gets 200 and changes nothing
    (RFC 3261 §9.2), not 481 (baresip hanging up as the callee refused);
    a CANCEL of another branch still gets 481."""
    async def scenario(nodes, sent):
        n, = nodes
        bekey = bekey_of(CALL_ID)
        invite = caller_invite(bekey, sdp=SDP)
        n.on_message(parse_message(invite), *UDP)
        await settled(n)
        b_invite, = of_method(sent[n], "INVITE")
        n.on_message(make_response(b_invite, 486, "Busy Here", to_tag="callee-1"), *UDP)
        await settled(n)
        cancel = invite.split(b"\r\nContent-Type")[0].replace(b"INVITE sip", b"CANCEL sip").replace(
            b"CSeq: 1 INVITE", b"CSeq: 1 CANCEL") + b"\r\nContent-Length: 0\r\n\r\n"
        n.on_message(parse_message(cancel), *UDP)
        n.on_message(parse_message(cancel.replace(b"z9hG4bKsphproxy1", b"z9hG4bKsphproxy2")), *UDP)
        await settled(n)
        return [(m.status, m.cseq[1], m.top_via.branch) for m in to_caller(sent[n])]

    assert with_nodes(tmp_path, 1, scenario) == [(486, "INVITE", "z9hG4bKsphproxy1"),
                                                 (200, "CANCEL", "z9hG4bKsphproxy1"),
                                                 (481, "CANCEL", "z9hG4bKsphproxy2")]


def chat(to: str) -> bytes:
    return (f"MESSAGE sip:{to}@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.50:5070;branch=z9hG4bKchat1\r\n"
            f"Max-Forwards: 69\r\nFrom: \"Alice\" <sip:alice@example.com>;tag=a1\r\nTo: <sip:{to}@example.com>\r\n"
            "Call-ID: chat-1@192.0.2.50\r\nCSeq: 7 MESSAGE\r\nContent-Length: 0\r\n\r\n").encode()


@pytest.mark.parametrize("answers, told", [
    ([(200, "OK"), None], 200),                          # the first phone takes it; told at once
    ([(480, "Temporarily Unavailable"), (202, "Accepted")], 202),
    ([(480, "Temporarily Unavailable"), (415, "Unsupported Media Type")], 415),
])
def test_a_chat_message_reaches_the_users_phones(tmp_path, answers, told):
    """Softphones chat with MESSAGE outside a dialog (RFC 3428): it got 405
    from the node. It now goes to each registered phone of the user, and
    the sender hears the first 2xx, or else the best failure."""
    async def scenario(nodes, sent):
        n, = nodes
        n.on_message(register("carol", ["<sip:carol@192.0.2.60:5060>", "<sip:carol@192.0.2.61:5060>"]), *UDP)
        await settled(n)
        msg = with_headers(chat("carol"), [("Subject", "lunch?")], b"at noon?", "text/plain")
        n.on_message(msg, *UDP)
        await settled(n)
        out = of_method(sent[n], "MESSAGE")
        for m, answer in zip(out, answers):
            if answer:
                n.on_message(make_response(m, *answer, to_tag="c1"), *UDP)
                await settled(n)
        return out, [m for m in sent[n] if getattr(m, "status", 0) and m.call_id == "chat-1@192.0.2.50"]

    out, replies = with_nodes(tmp_path, 1, scenario)
    assert sorted(m.uri for m in out) == ["sip:carol@192.0.2.60:5060", "sip:carol@192.0.2.61:5060"]
    for m in out:
        assert (m.body, m.get("Content-Type"), m.get("Subject")) == (b"at noon?", "text/plain", "lunch?")
        assert m.from_.uri == "sip:alice@example.com" and m.from_.display == "Alice" and m.call_id != "chat-1@192.0.2.50"
    assert [r.status for r in replies] == [told] and replies[0].to.tag


def test_a_chat_message_to_nobody_gets_404(tmp_path):
    async def scenario(nodes, sent):
        n, = nodes
        n.on_message(parse_message(chat("dave")), *UDP)
        await settled(n)
        return sent[n]

    out = with_nodes(tmp_path, 1, scenario, {"node.upstream": ""})
    assert [(m.status, m.reason) for m in out] == [(404, "Not Found")]


def ping(to: str) -> bytes:
    """An OPTIONS outside a dialog for `to` (no user: the server), as the
    proxy hands it on (its routing header: not a probe of its own)."""
    user = f"{to}@" if to else ""
    return (f"OPTIONS sip:{user}example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.50:5070;branch=z9hG4bKping1\r\n"
            f"Max-Forwards: 69\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:{user}example.com>\r\n"
            f"Call-ID: ping-{to}@192.0.2.50\r\nCSeq: 3 OPTIONS\r\nAccept: application/sdp\r\n"
            f"{ROUTE_HEADER}: bekey={bekey_of(f'ping-{to}@192.0.2.50')};owner=node1;partner=node2;reason=owner\r\n"
            "Content-Length: 0\r\n\r\n").encode()


def test_an_options_for_a_user_asks_her_phone(tmp_path):
    """OPTIONS sip:carol@... (is she there, what can her phone do, RFC 3261
    §11) was answered 200 by the node whoever carol was: it now goes to
    her phones, and the sender hears the first 2xx with what it says of
    the phone. One for a user not registered here (a carrier's ping of
    its trunk, often) and one for no user are answered 200 here, never
    sent up the trunk."""
    async def scenario(nodes, sent):
        n, = nodes
        n.on_message(register("carol", ["<sip:carol@192.0.2.60:5060>"]), *UDP)
        await settled(n)
        for to in ("carol", "dave", ""):
            n.on_message(parse_message(ping(to)), *UDP)
            await settled(n)
        asked, = of_method(sent[n], "OPTIONS")
        n.on_message(make_response(asked, 200, "OK", to_tag="c1", body=b"v=0\r\n", content_type="application/sdp",
                                   headers=[("Allow", "INVITE, ACK, BYE"), ("Supported", "replaces"),
                                            ("User-Agent", "phone 1.0")]), *UDP)
        await settled(n)
        return asked, [m for m in sent[n] if getattr(m, "status", 0) and m.call_id.startswith("ping-")]

    asked, replies = with_nodes(tmp_path, 1, scenario, {"node.upstream": "sip:192.0.2.99:5060"})
    assert asked.uri == "sip:carol@192.0.2.60:5060" and asked.get("Accept") == "application/sdp"
    assert asked.call_id != "ping-carol@192.0.2.50"
    by_call = {r.call_id.split("@")[0]: r for r in replies}
    assert {k: r.status for k, r in by_call.items()} == {"ping-carol": 200, "ping-dave": 200, "ping-": 200}
    assert "INVITE" in by_call["ping-dave"].get("Allow")
    carol = by_call["ping-carol"]
    assert (carol.get("Allow"), carol.get("Supported"), carol.body) == ("INVITE, ACK, BYE", "replaces", b"v=0\r\n")
    assert not carol.has("User-Agent") and carol.to.tag


def test_an_update_before_the_answer_reaches_the_callees_early_dialog(tmp_path):
    """An UPDATE in the early dialog (RFC 3311 §5.1: a new offer while the
    callee plays early media): the node sent it to the callee without its
    tag, outside any dialog of the callee's (481 there). It now goes in the
    early dialog of the callee's last provisional answer, to its Contact."""
    async def scenario(nodes, sent):
        n, = nodes
        bekey = bekey_of(CALL_ID)
        await n.new_call(parse_message(caller_invite(bekey, sdp=SDP)), bekey)
        b_invite, = of_method(sent[n], "INVITE")
        n.on_message(make_response(b_invite, 183, "Session Progress", to_tag="callee-1",
                                   headers=[("Contact", "<sip:callee@192.0.2.90:5060>"),
                                            ("Record-Route", "<sip:edge.example.com;lr>")],
                                   body=SDP, content_type="application/sdp"), *UDP)
        await settled(n)
        progress, = [m for m in sent[n] if getattr(m, "status", 0) == 183]
        update = in_dialog("UPDATE", 2, CALL_ID, "a1", progress.to.tag, "z9hG4bKupd2")
        n.on_message(with_headers(update, [], SDP, "application/sdp"), *UDP)
        await settled(n)
        relayed, = of_method(sent[n], "UPDATE")
        n.on_message(make_response(relayed, 200, "OK", body=SDP, content_type="application/sdp"), *UDP)
        await settled(n)
        return b_invite, relayed, to_caller(sent[n])

    b_invite, relayed, answers = with_nodes(tmp_path, 1, scenario)
    assert (relayed.uri, relayed.to.tag, relayed.call_id) == ("sip:callee@192.0.2.90:5060", "callee-1", b_invite.call_id)
    assert relayed.values("Route") == ["<sip:edge.example.com;lr>"] and relayed.cseq == (2, "UPDATE")
    assert relayed.body == SDP
    assert [(a.status, a.cseq[1]) for a in answers if a.cseq[1] == "UPDATE"] == [(200, "UPDATE")]


def test_a_users_other_phones_stop_ringing_as_answered_elsewhere(tmp_path):
    """Two phones of carol ring; one answers. The other gets a CANCEL
    that is its INVITE's (RFC 3261 §9.1: no To tag; it carried the tag of
    the phone that answered) and says why (RFC 3326: a phone then shows
    no missed call, as behind Kamailio or Asterisk)."""
    async def scenario(nodes, sent):
        n, = nodes
        n.on_message(register("carol", ["<sip:carol@192.0.2.60:5060>", "<sip:carol@192.0.2.61:5060>"]), *UDP)
        await settled(n)
        n.on_message(parse_message(caller_invite(bekey_of(CALL_ID), "sip:carol@example.com", SDP)), *UDP)
        await settled(n)
        forks = of_method(sent[n], "INVITE")
        n.on_message(make_response(forks[0], 180, "Ringing", to_tag="ring-0",
                                   headers=[("Contact", f"<{forks[0].uri}>")]), *UDP)
        await settled(n)
        n.on_message(make_response(forks[1], 200, "OK", to_tag="took-1", body=SDP, content_type="application/sdp",
                                   headers=[("Contact", f"<{forks[1].uri}>")]), *UDP)
        await settled(n)
        return forks, of_method(sent[n], "CANCEL")

    forks, (cancel,) = with_nodes(tmp_path, 1, scenario)
    assert (cancel.uri, cancel.top_via.branch) == (forks[0].uri, forks[0].top_via.branch)
    assert cancel.get("To") == forks[0].get("To") and cancel.to.tag is None
    assert cancel.get("From") == forks[0].get("From") and cancel.cseq == (1, "CANCEL")
    assert cancel.get("Reason") == 'SIP;cause=200;text="Call completed elsewhere"'


def test_reliable_provisional_answers_of_two_phones_reach_the_caller_numbered_in_one_sequence(tmp_path):
    """100rel (RFC 3262): an INVITE that required it got 420, and one that
    only supported it reached the callee without saying so. Now the B-leg
    INVITE says what the caller said; each phone's reliable 183 reaches
    the caller reliably, numbered in the one early dialog the caller has
    with the node (both phones start at RSeq 1, the caller must see 1, 2);
    the caller's PRACK reaches the phone whose 183 it names, in that
    phone's early dialog, with that phone's RSeq."""
    async def scenario(nodes, sent):
        n, = nodes
        n.on_message(register("carol", ["<sip:carol@192.0.2.60:5060>", "<sip:carol@192.0.2.61:5060>"]), *UDP)
        await settled(n)
        bekey = bekey_of(CALL_ID)
        n.on_message(with_headers(caller_invite(bekey, "sip:carol@example.com"), [("Supported", "timer, 100rel")],
                                  SDP, "application/sdp"), *UDP)
        await settled(n)
        forks = of_method(sent[n], "INVITE")
        for i, fork in enumerate(forks):
            n.on_message(make_response(fork, 183, "Session Progress", to_tag=f"c{i}", body=SDP,
                                       content_type="application/sdp",
                                       headers=[("Contact", f"<{fork.uri}>"), ("Require", "100rel"),
                                                ("RSeq", "1")]), *UDP)
            await settled(n)
        n.on_message(make_response(forks[0], 183, "Session Progress", to_tag="c0", body=SDP,     # sent again
                                   content_type="application/sdp",
                                   headers=[("Contact", f"<{forks[0].uri}>"), ("Require", "100rel"), ("RSeq", "1")]),
                     *UDP)
        await settled(n)
        progress = [m for m in to_caller(sent[n]) if m.status == 183]
        for cseq, rack in ((2, "2 1 INVITE"), (3, "9 1 INVITE"), (4, "two")):
            n.on_message(with_headers(in_dialog("PRACK", cseq, CALL_ID, "a1", progress[0].to.tag, f"z9hG4bKpr{cseq}"),
                                      [("RAck", rack)]), *UDP)
            await settled(n)
        pracks = of_method(sent[n], "PRACK")
        return forks, progress, pracks, [m for m in to_caller(sent[n]) if m.cseq[1] == "PRACK"]

    forks, progress, pracks, refused = with_nodes(tmp_path, 1, scenario)
    assert len(forks) == 2
    for fork in forks:
        assert "100rel" in fork.values("Supported") and not fork.has("Require")
    assert [(m.get("Require"), m.get("RSeq")) for m in progress] == [("100rel", "1"), ("100rel", "2"), ("100rel", "1")]
    assert len({m.to.tag for m in progress}) == 1
    prack, = pracks
    assert (prack.uri, prack.to.tag, prack.call_id) == (forks[1].uri, "c1", forks[1].call_id)
    assert prack.get("RAck") == "1 1 INVITE"
    assert [(m.status, m.reason) for m in refused] == [
        (481, "Call/Transaction Does Not Exist (no such reliable provisional response)"),
        (400, "Bad Request (RAck: response number, CSeq number, method)")]


@pytest.mark.parametrize("supported, rseq", [
    # a callee that sends a reliable 183 all the same (RFC 3262 §3 says it
    # must not): the caller never said 100rel, nor did the B-leg INVITE
    ([], "1"),
    # an RSeq out of its range (1 to 2**31 - 1, §7.1): the node failed on
    # one of 5000 digits, and the caller never heard the callee
    ([("Supported", "100rel")], "1" + "0" * 5000),
    ([("Supported", "100rel")], "0"),
])
def test_a_caller_is_not_asked_for_a_prack_it_cannot_send(tmp_path, supported, rseq):
    async def scenario(nodes, sent):
        n, = nodes
        bekey = bekey_of(CALL_ID)
        n.on_message(with_headers(caller_invite(bekey), supported, SDP, "application/sdp"), *UDP)
        await settled(n)
        fork, = of_method(sent[n], "INVITE")
        n.on_message(make_response(fork, 183, "Session Progress", to_tag="c0", body=SDP,
                                   content_type="application/sdp",
                                   headers=[("Require", "100rel"), ("RSeq", rseq)]), *UDP)
        await settled(n)
        return fork, [m for m in to_caller(sent[n]) if m.status == 183]

    fork, (progress,) = with_nodes(tmp_path, 1, scenario)
    assert ("100rel" in fork.values("Supported")) == bool(supported)
    assert not progress.has("RSeq") and not progress.has("Require") and progress.body == SDP


def test_a_session_timer_is_agreed_and_refreshed_through_the_node(tmp_path):
    """Session timers (RFC 4028), as trunks and IMS cores ask for them: an
    INVITE that required "timer" got 420, and the Session-Expires of one
    that only supported it stayed at the node (the callee never heard of
    it, the caller never learnt the interval it must refresh within). Now
    they go end to end as through a proxy: the request's Session-Expires,
    Min-SE and timer tags, the 2xx's Session-Expires and Require: timer,
    and the same for a refresh (an UPDATE here)."""
    async def scenario(nodes, sent):
        n, = nodes
        bekey = bekey_of(CALL_ID)
        timer = [("Supported", "timer, replaces"), ("Require", "timer"), ("Session-Expires", "1800;refresher=uac"),
                 ("Min-SE", "90")]
        n.on_message(with_headers(caller_invite(bekey), timer, SDP, "application/sdp"), *UDP)
        await settled(n)
        b_invite, = of_method(sent[n], "INVITE")
        n.on_message(make_response(b_invite, 200, "OK", to_tag="callee-1", body=SDP, content_type="application/sdp",
                                   headers=[("Contact", "<sip:callee@192.0.2.90>"), ("Require", "timer"),
                                            ("Session-Expires", "1800;refresher=uac")]), *UDP)
        await settled(n)
        ok, = [m for m in to_caller(sent[n]) if m.status == 200]
        refresh = with_headers(in_dialog("UPDATE", 2, CALL_ID, "a1", ok.to.tag, "z9hG4bKupd2"),
                               [("Supported", "timer"), ("Session-Expires", "1800;refresher=uac")])
        n.on_message(refresh, *UDP)
        await settled(n)
        update, = of_method(sent[n], "UPDATE")
        n.on_message(make_response(update, 200, "OK", headers=[("Require", "timer"),
                                                               ("Session-Expires", "1800;refresher=uac")]), *UDP)
        await settled(n)
        refreshed, = [m for m in to_caller(sent[n]) if m.cseq == (2, "UPDATE")]
        return b_invite, ok, update, refreshed

    b_invite, ok, update, refreshed = with_nodes(tmp_path, 1, scenario)
    assert "timer" in b_invite.values("Supported") and b_invite.values("Require") == ["timer"]
    assert (b_invite.get("Session-Expires"), b_invite.get("Min-SE")) == ("1800;refresher=uac", "90")
    assert "timer" in update.values("Supported") and update.get("Session-Expires") == "1800;refresher=uac"
    for answer in (ok, refreshed):
        assert answer.get("Session-Expires") == "1800;refresher=uac" and answer.values("Require") == ["timer"]


def test_the_ack_of_a_failed_reinvite_is_not_relayed_as_the_2xx_ack_again(tmp_path):
    """A re-INVITE refused (491 glare, 488, 487 after its CANCEL): the node
    ACKs the callee's refusal itself, and the caller's ACK of the
    refusal it relayed is the end of that transaction. The node relayed
    it as the ACK of the call's first 2xx (still owed in the record),
    and the callee got that ACK a second time: SIPp drops such a call."""
    async def scenario(nodes, sent):
        n, = nodes
        bekey, ok, b_invite = await answered_call(n, sent)
        n.on_message(in_dialog("ACK", 1, CALL_ID, "a1", ok.to.tag, "z9hG4bKack1"), *UDP)
        await settled(n)
        n.on_message(in_dialog("INVITE", 2, CALL_ID, "a1", ok.to.tag, "z9hG4bKre2"), *UDP)
        await settled(n)
        reinvite = [m for m in of_method(sent[n], "INVITE") if m.cseq[0] == 2][0]
        n.on_message(make_response(reinvite, 491, "Request Pending"), *UDP)
        await settled(n)
        n.on_message(in_dialog("ACK", 2, CALL_ID, "a1", ok.to.tag, "z9hG4bKre2"), *UDP)
        await settled(n)
        return [(m.cseq, m.top_via.branch == reinvite.top_via.branch) for m in of_method(sent[n], "ACK")
                if m.call_id == b_invite.call_id]

    acks = with_nodes(tmp_path, 1, scenario)
    assert acks == [((1, "ACK"), False), ((2, "ACK"), True)]    # the 2xx's, relayed; the 491's, the node's own
