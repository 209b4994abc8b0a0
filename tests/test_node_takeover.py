"""node.app, nodes in one process against real redis-servers (one each):
the windows in which a node dies with a call half done, and the partner
that finishes it when the callee or the caller sends again."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

import node.app
import node.sip

from nodekit import (CALL_ID, SDP, UDP, answered_call, callee_says, caller_invite, calling, dies_and_is_taken_over,
                     in_dialog, of_method, of_status, probe, register, settled, with_headers, with_nodes)
from node.resp import Redis
from sipcore.bekey import bekey_of
from sipcore.message import make_response, parse_message
from sipha.sipp import free_port

pytestmark = pytest.mark.e2e


def test_the_partner_relays_a_saved_answer_the_dead_owner_may_not_have_sent(tmp_path):
    """Seen in a node killed under load: the owner saved the confirmed call
    (replica on its partner) and died before relaying the 2xx, so the
    caller, which had its 100 Trying, waited forever while the partner
    ACKed the callee's 2xx retransmission and relayed nothing."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey, b_invite = await calling(owner, sent)
        answer = callee_says(b_invite, 200, "OK")
        await owner.on_invite_response(bekey, b_invite.top_via.branch, answer)   # saved, then relayed...
        assert of_status(sent[owner], 200)
        # ... or not: the owner dies here, and the caller never had it.
        partner.on_message(answer, ("127.0.0.1", 5999), "udp")     # the callee sends its 2xx again
        await settled(partner)
        return sent[partner]

    out = with_nodes(tmp_path, 2, scenario)
    to_caller = [m for m in of_status(out, 200) if m.call_id == CALL_ID]
    acks = of_method(out, "ACK")
    assert to_caller and to_caller[0].to.tag and to_caller[0].cseq == (1, "INVITE")
    assert [v.branch for v in to_caller[0].vias] == ["z9hG4bKsphproxy1", "z9hG4bKcaller1"]
    assert len(acks) == 1 and acks[0].call_id != CALL_ID            # and the callee its ACK


def test_the_partner_tells_the_caller_a_failure_the_dead_owner_never_had(tmp_path):
    """The owner sent the B-leg INVITE and died; the callee's 486 comes to
    the partner (the proxy reroutes it) and was dropped there: the caller,
    told Trying, hung, and the callee retransmitted its 486 for 32 s. The
    partner now ACKs the 486, answers the caller with it, and ends the call
    in both Redis."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey = bekey_of(CALL_ID)
        await owner.new_call(parse_message(caller_invite(bekey)), bekey)
        b_invite, = of_method(sent[owner], "INVITE")
        busy = make_response(b_invite, 486, "Busy Here", to_tag="callee-1")
        partner.on_message(busy, ("127.0.0.1", 5999), "udp")   # the owner died; here comes the 486
        await settled(partner)
        left = [await n.store.load(bekey, []) for n in nodes]
        return b_invite, sent[partner], left

    b_invite, out, left = with_nodes(tmp_path, 2, scenario)
    to_caller = [m for m in of_status(out, 486) if m.call_id == CALL_ID]
    ack, = of_method(out, "ACK")
    assert to_caller and [v.branch for v in to_caller[0].vias] == ["z9hG4bKsphproxy1", "z9hG4bKcaller1"]
    # the ACK of a failure is part of the INVITE transaction (RFC 3261 §17.1.1.3)
    assert (ack.call_id, ack.top_via.branch, ack.uri) == (b_invite.call_id, b_invite.top_via.branch, b_invite.uri)
    assert ack.to.tag == "callee-1"
    assert left == [(None, "missing")] * 2


def test_the_caller_hears_the_best_failure_once_every_fork_has_failed(tmp_path):
    """A call to a user registered from two phones rings both; the first
    fork's failure was kept only in memory, and the second fork's failure,
    read from Redis, still found the first one pending: the caller never
    had an answer. RFC 3261 §16.7: the lowest status when no 6xx."""
    async def scenario(nodes, sent):
        n, = nodes
        aor_key = bekey_of("sip:carol@example.com")
        await n.on_request(register("carol", ["<sip:carol@192.0.2.60:5060>", "<sip:carol@192.0.2.61:5060>"]), aor_key)
        assert of_status(sent[n], 200)
        bekey = bekey_of(CALL_ID)
        await n.new_call(parse_message(caller_invite(bekey, "sip:carol@example.com")), bekey)
        forks = of_method(sent[n], "INVITE")
        assert len(forks) == 2
        for fork, (status, reason) in zip(forks, [(486, "Busy Here"), (480, "Temporarily Unavailable")]):
            n.on_message(make_response(fork, status, reason, to_tag=f"t{status}"), ("127.0.0.1", 5999), "udp")
            await settled(n)
        return sent[n], await n.store.load(bekey, [])

    out, left = with_nodes(tmp_path, 1, scenario)
    finals = [m.status for m in out if getattr(m, "status", 0) >= 300 and m.call_id == CALL_ID]
    assert finals == [480] and len(of_method(out, "ACK")) == 2
    assert left == (None, "missing")


def test_the_caller_hears_trying_only_once_its_call_has_gone_on_to_the_callee(tmp_path):
    """Seen in a node killed under load: the node saved the call, sent the
    caller its 100 Trying and died before the B-leg INVITE went out; the
    caller, told Trying, never retransmitted, and nobody ever called the
    callee. The 100 now follows the B-leg INVITE, so a node that dies
    before it leaves the caller retransmitting to the partner."""
    async def scenario(nodes, sent):
        n, = nodes
        bekey = bekey_of(CALL_ID)
        await n.new_call(parse_message(caller_invite(bekey).replace(b";partner=node2", b";partner=")), bekey)
        return [getattr(m, "method", None) or m.status for m in sent[n]]

    assert with_nodes(tmp_path, 1, scenario) == ["INVITE", 100]


def test_an_invite_in_hand_when_the_node_stood_still_goes_no_further(tmp_path):
    """Seen in CI (a node hung under load, SIGSTOP): the node was waiting
    for Redis on a caller's INVITE when it stopped; the partner took the
    call from its retransmission and connected it; on waking, the node
    went on: a 100 Trying after the 200 (SIPp aborts the call) and the
    callee called a second time. The INVITE in hand now goes no further,
    as the ones that waited in the queue."""
    async def scenario(nodes, sent):
        n, = nodes
        bekey = bekey_of(CALL_ID)
        req = parse_message(caller_invite(bekey).replace(b";partner=node2", b";partner="))
        n.came_in(req)
        task = asyncio.get_running_loop().create_task(n.new_call(req, bekey))
        await asyncio.sleep(0)          # in hand: waiting for Redis
        n.stalled(time.monotonic())
        await task
        await asyncio.sleep(0.3)        # past the 100 Trying's timer
        return [getattr(m, "method", None) or m.status for m in sent[n]], n.stats.get("stale_requests")

    assert with_nodes(tmp_path, 1, scenario) == ([], 1)


@pytest.mark.parametrize("method", ["BYE", "INFO", "CANCEL", "REGISTER"])
def test_a_bye_cancel_or_register_in_hand_when_the_node_stood_still_goes_no_further(tmp_path, method):
    """As the INVITE above: a BYE or re-INVITE the node was reading the
    call for when it stood still is the partner's by the time it wakes
    (the caller sent it again there). Going on, the node would hang up or
    re-offer a call the partner has moved on (a second BYE to the callee,
    a 200 after the partner's), or save over the bindings the partner
    saved since. Nothing goes out, the call's record stays, no binding is
    saved."""
    async def scenario(nodes, sent):
        owner, _ = nodes
        bekey, ok, b_invite = await answered_call(owner, sent)
        before = len(sent[owner])
        if method == "CANCEL":       # the caller's CANCEL of its INVITE, still ringing
            await owner.store.delete(bekey, await owner.load_call(bekey, None))
            bekey = bekey_of(CALL_ID)
            await owner.new_call(parse_message(caller_invite(bekey).replace(b"z9hG4bK", b"z9hG4bKx")), bekey)
            before = len(sent[owner])
            req = in_dialog("CANCEL", 1, CALL_ID, ok.from_.tag, "", "z9hG4bKcancel1")
            req.set("To", "<sip:other@example.com>")
        elif method == "REGISTER":
            req = register("alice", ["<sip:alice@192.0.2.9:5060>"])
        else:
            req = in_dialog(method, 2, CALL_ID, ok.from_.tag, ok.to.tag, f"z9hG4bK{method}2")
        owner.on_message(req, ("127.0.0.1", 5999), "udp")
        await asyncio.sleep(0)          # in hand: reading the call from Redis
        owner.stalled(time.monotonic())
        await settled(owner)
        record, _ = await owner.store.load(bekey, [])
        binding, _ = await owner.store.load(bekey_of("sip:alice@example.com"), [])
        return sent[owner][before:], owner.stats.get("stale_requests"), record is not None and binding is None

    assert with_nodes(tmp_path, 2, scenario) == ([], 1, True)



def test_a_cancel_is_saved_before_a_word_of_it_goes_out_and_said_again_at_timer_c(tmp_path, monkeypatch):
    """The caller CANCELs a call ringing. Before, the node answered 200,
    CANCELled the callee and told the caller 487, then saved: dead in
    between, it left a ringing call the partner would send the INVITE
    again for after the takeover. Now nothing goes out before the save
    (dead before it, the caller sends its CANCEL again, to the partner).
    A partner that takes on a call saved cancelled sends nothing at once
    (a SIPp UAS aborts the call on a copy of a CANCEL it answered 200 and
    487), but if the callee has not answered by Timer C, the CANCEL and
    the 487 go again, byte for byte the owner's (the Reason the caller
    gave too): its CANCEL may never have left."""
    monkeypatch.setattr(node.sip, "TIMEOUT", 1.0)

    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey = bekey_of(CALL_ID)
        await owner.new_call(parse_message(caller_invite(bekey)), bekey)
        b_invite, = of_method(sent[owner], "INVITE")
        owner.on_message(callee_says(b_invite, 180, "Ringing"), *UDP)
        await settled(owner)
        before = len(sent[owner])
        gate, save = asyncio.Event(), owner.store.save

        async def slow_save(*args, **kwargs):
            await gate.wait()
            return await save(*args, **kwargs)
        monkeypatch.setattr(owner.store, "save", slow_save)
        cancel = caller_invite(bekey).replace(b"INVITE sip:", b"CANCEL sip:").replace(
            b"CSeq: 1 INVITE", b"CSeq: 1 CANCEL").replace(
            b"Content-Length", b'Reason: SIP;cause=200;text="elsewhere"\r\nContent-Length')
        owner.on_message(parse_message(cancel), *UDP)
        await asyncio.sleep(0.05)
        unsaid = sent[owner][before:]
        gate.set()
        await settled(owner)
        said = sent[owner][before:]
        owner.tx.close()                                  # the owner dies, the callee has not answered the CANCEL
        await dies_and_is_taken_over(owner, partner, "partner", monkeypatch)
        at_once = list(sent[partner])
        await asyncio.sleep(1.0)                          # Timer C (1 s)
        again = list(sent[partner])
        partner.on_message(make_response(b_invite, 487, "Request Terminated", to_tag="callee-1"), *UDP)
        await settled(partner)
        return unsaid, said, at_once, again, sent[partner], [await n.store.load(bekey, []) for n in nodes]

    unsaid, said, at_once, again, out, left = with_nodes(tmp_path, 2, scenario, {"node.invite_timeout": 1})
    assert unsaid == [] and at_once == []
    assert [getattr(m, "method", None) or m.status for m in said] == [200, "CANCEL", 487]
    assert said[1].get("Reason") == 'SIP;cause=200;text="elsewhere"'
    assert [m.to_bytes() for m in again] == [m.to_bytes() for m in said[1:]]
    assert len(of_method(out, "ACK")) == 1                # of the callee's 487
    assert left == [(None, "missing")] * 2


def test_a_request_the_dead_owner_relayed_goes_on_from_the_partner(tmp_path):
    """The owner relayed the caller's INFO and died before the answer came
    back. The caller's retransmission reaches the partner, which said 500
    (CSeq out of order: the owner had saved that CSeq); it now relays it
    again with the same CSeq and answers with what the callee says."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey, ok, b_invite = await answered_call(owner, sent)
        info = in_dialog("INFO", 2, CALL_ID, "a1", ok.to.tag, "z9hG4bKinfo2")
        owner.on_message(info, ("127.0.0.1", 5999), "udp")
        await settled(owner)
        first, = of_method(sent[owner], "INFO")
        # the owner dies; the caller sends its INFO again
        partner.on_message(in_dialog("INFO", 2, CALL_ID, "a1", ok.to.tag, "z9hG4bKinfo2"), ("127.0.0.1", 5999), "udp")
        await settled(partner)
        again, = of_method(sent[partner], "INFO")
        partner.on_message(make_response(again, 200, "OK"), ("127.0.0.1", 5999), "udp")
        await settled(partner)
        return first, again, sent[partner]

    first, again, out = with_nodes(tmp_path, 2, scenario)
    assert (again.call_id, again.cseq) == (first.call_id, first.cseq) == (again.call_id, (2, "INFO"))
    # a retransmission of the owner's: the callee answers it again rather
    # than taking the DTMF twice
    assert (again.top_via.branch, again.top_via.port) == (first.top_via.branch, first.top_via.port) == \
        (first.top_via.branch, 7001)
    to_caller = [m for m in out if getattr(m, "status", None) and m.call_id == CALL_ID]
    assert [(m.status, m.cseq) for m in to_caller] == [(200, (2, "INFO"))]


def test_the_partner_relays_the_answer_to_a_re_invite_the_dead_owner_sent(tmp_path):
    """The callee re-INVITEs (hold); the owner relays it to the caller and
    dies. The caller's 200 (found by the stamp in the From-tag: the Call-ID
    is the caller's) reaches the partner, which ACKs it and relays it to
    the callee; the callee, told Trying, would otherwise wait for ever."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey, ok, b_invite = await answered_call(owner, sent)
        reinvite = in_dialog("INVITE", 1, b_invite.call_id, "callee-1", b_invite.from_.tag, "z9hG4bKhold1")
        owner.on_message(reinvite, ("127.0.0.1", 5999), "udp")
        await settled(owner)
        to_caller = [m for m in of_method(sent[owner], "INVITE") if m.call_id == CALL_ID]
        assert to_caller and of_status(sent[owner], 100)
        # the owner dies; the caller answers
        partner.on_message(make_response(to_caller[0], 200, "OK", headers=[("Contact", "<sip:alice@192.0.2.50:5070>")]),
                           ("127.0.0.1", 5999), "udp")
        await settled(partner)
        return b_invite, to_caller[0], sent[partner]

    b_invite, relayed, out = with_nodes(tmp_path, 2, scenario)
    to_callee = of_status(out, 200)
    assert [(m.call_id, m.cseq) for m in to_callee] == [(b_invite.call_id, (1, "INVITE"))]
    assert [v.branch for v in to_callee[0].vias] == ["z9hG4bKsphz9hG4bKhold1", "z9hG4bKhold1"]
    ack, = of_method(out, "ACK")
    assert (ack.call_id, ack.cseq) == (CALL_ID, relayed.cseq[:1] + ("ACK",))



@pytest.mark.parametrize("back", ["partner", "restart"])
def test_a_re_invite_told_trying_that_never_left_goes_on_at_the_takeover(tmp_path, monkeypatch, back):
    """The caller's re-INVITE had its 100 Trying at 200 ms, before the
    save (a loaded box), and the owner died before relaying it: the
    caller sends it no more, and nobody sent it on (one call short, SIPp
    waiting for the 200, in a chaos run with re-INVITEs). The copy saved
    with the call (record q) now goes out at the takeover, byte for byte
    what the owner would have sent; its 200 reaches the caller once, the
    caller's ACK the callee, and the copy is gone with the answer."""
    monkeypatch.setattr(node.app, "TRYING_AFTER", 0.0)            # the save is "slow"

    async def scenario(nodes, sent):
        owner, partner = nodes[0], nodes[-1]
        bekey, ok, b_invite = await answered_call(owner, sent)
        before = len(sent[owner])
        lost = []
        send = owner.tx.request
        monkeypatch.setattr(owner.tx, "request", lambda req, *a, **k: lost.append(req) if req.method == "INVITE"
                            else send(req, *a, **k))
        hold = with_headers(in_dialog("INVITE", 2, CALL_ID, "a1", ok.to.tag, "z9hG4bKhold2"),
                            [("Content-Type", "application/sdp")], SDP)
        owner.on_message(hold, *UDP)
        await settled(owner)
        told = [m.status for m in sent[owner][before:]]
        sent[partner].clear()
        await dies_and_is_taken_over(owner, partner, back, monkeypatch)
        resent = of_method(sent[partner], "INVITE")
        sent[partner].clear()
        partner.on_message(make_response(resent[0], 200, "OK", to_tag="callee-1", body=SDP,
                                         headers=[("Contact", "<sip:service@127.0.0.1:5998>")],
                                         content_type="application/sdp"), *UDP)
        await settled(partner)
        answered = [(m.status, m.cseq) for m in sent[partner] if getattr(m, "status", 0) > 100]
        partner.on_message(in_dialog("ACK", 2, CALL_ID, "a1", ok.to.tag, "z9hG4bKack2"), *UDP)
        await settled(partner)
        acks = of_method(sent[partner], "ACK")
        record = (await partner.store.load(bekey, []))[0]
        return lost, told, resent, answered, acks, record

    lost, told, resent, answered, acks, record = with_nodes(tmp_path, 1 if back == "restart" else 2, scenario)
    assert told == [100]
    assert len(lost) == 1 and [m.to_bytes() for m in resent] == [lost[0].to_bytes()]
    assert resent[0].body == SDP and resent[0].top_via.port == 7001
    assert answered == [(200, (2, "INVITE"))]
    assert [a.call_id for a in acks] == [resent[0].call_id]
    assert "re" not in record["q"]



@pytest.mark.parametrize("status", [200, 491, None])
def test_an_answered_re_invite_is_not_sent_again_at_the_takeover(tmp_path, monkeypatch, status):
    """A re-INVITE the far side answered (2xx, a failure, or none by Timer
    B: 408 to its sender) is over: a takeover must not send it again (a
    SIPp callee aborts the call on an INVITE after its ACK)."""
    monkeypatch.setattr(node.sip, "TIMEOUT", 0.3)

    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey, ok, b_invite = await answered_call(owner, sent)
        owner.on_message(in_dialog("INVITE", 2, CALL_ID, "a1", ok.to.tag, "z9hG4bKhold2"), *UDP)
        await settled(owner)
        relayed = [m for m in of_method(sent[owner], "INVITE") if m.call_id == b_invite.call_id][-1]
        if status is None:
            await asyncio.sleep(0.5)
        else:
            owner.on_message(make_response(relayed, status, "Answered", to_tag="callee-1",
                                           headers=[("Contact", "<sip:service@127.0.0.1:5998>")]), *UDP)
        await settled(owner)
        owner.tx.close()                                  # the owner dies
        await dies_and_is_taken_over(owner, partner, "partner", monkeypatch)
        return of_method(sent[partner], "INVITE"), (await partner.store.load(bekey, []))[0]

    resent, record = with_nodes(tmp_path, 2, scenario)
    assert resent == [] and record["q"]["o"] == 2 and "re" not in record["q"]


def test_a_stale_copy_of_an_answered_re_invite_gets_no_reply(tmp_path):
    """Seen in a chaos run with re-INVITEs: the caller's re-INVITE waited
    in the queue of a hung node while its copy went through the partner,
    200 and ACK; resumed, the hung node sent it to the callee again and
    told the caller 100 Trying, on which SIPp aborted the call. A copy of
    a re-INVITE whose 2xx came back is now absorbed; one whose answer
    never came still goes on (the test above and the INFO one)."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey, ok, b_invite = await answered_call(owner, sent)
        hold = in_dialog("INVITE", 2, CALL_ID, "a1", ok.to.tag, "z9hG4bKhold2")
        owner.on_message(hold, ("127.0.0.1", 5999), "udp")
        await settled(owner)
        relayed = [m for m in of_method(sent[owner], "INVITE") if m.call_id == b_invite.call_id][-1]
        owner.on_message(make_response(relayed, 200, "OK", headers=[("Contact", "<sip:service@127.0.0.1:5998>")]),
                         ("127.0.0.1", 5999), "udp")
        await settled(owner)
        assert [m.cseq for m in of_status(sent[owner], 200)][-1] == (2, "INVITE")
        before = len(sent[partner])
        partner.on_message(in_dialog("INVITE", 2, CALL_ID, "a1", ok.to.tag, "z9hG4bKhold2"), ("127.0.0.1", 5999), "udp")
        await settled(partner)
        return sent[partner][before:]

    assert with_nodes(tmp_path, 2, scenario) == []


def test_an_ack_goes_on_once_for_each_2xx_the_callee_sent(tmp_path):
    """Seen in a kill-and-restart run: the ramp brought the caller's ACK to
    the node the call belongs home to (it took the call over), while the
    node that had relayed the 2xx, never seeing that ACK, kept sending the
    2xx; each copy the caller ACKed went on to the callee, and SIPp
    aborted the call on the second ACK. Copies are kept back now; an ACK
    after a retransmission by the callee itself (our ACK was lost) goes on."""
    async def scenario(nodes, sent):
        home, other = nodes
        bekey, ok, b_invite = await answered_call(other, sent)     # the 2xx went out from `other`
        acked = []
        for copy in range(3):               # the caller ACKs each copy of the 2xx `other` sends
            home.on_message(in_dialog("ACK", 1, CALL_ID, "a1", ok.to.tag, f"z9hG4bKack{copy}"),
                            ("127.0.0.1", 5999), "udp")
            await settled(home)
            acked.append(len(of_method(sent[home], "ACK")))
        # the callee had no ACK after all and sends its 2xx again: home relays it, and the next ACK
        home.on_message(callee_says(b_invite, 200, "OK"), ("127.0.0.1", 5999), "udp")
        await settled(home)
        again = [m for m in of_status(sent[home], 200) if m.call_id == CALL_ID]
        home.on_message(in_dialog("ACK", 1, CALL_ID, "a1", ok.to.tag, "z9hG4bKack9"), ("127.0.0.1", 5999), "udp")
        await settled(home)
        return acked, again, of_method(sent[home], "ACK")

    acked, again, acks = with_nodes(tmp_path, 2, scenario)
    assert acked == [1, 1, 1]
    assert again and len(acks) == 2 and {a.call_id for a in acks} == {acks[0].call_id} != {CALL_ID}


@pytest.mark.parametrize("taken_over", [True, False])
def test_the_2xx_is_sent_again_only_while_the_call_is_this_nodes(tmp_path, taken_over):
    """Seen in a kill-and-restart run: the node that sent the caller its 2xx
    kept sending it after the call had moved home with its ACK; SIPp took a
    copy that came while its re-INVITE was out for the re-INVITE's answer
    and aborted the call. A node stops once its Redis no longer has the
    call, and keeps on (RFC 3261 §13.3.1.4) while it does."""
    async def scenario(nodes, sent):
        home, other = nodes
        bekey, ok, b_invite = await answered_call(other, sent)
        if taken_over:     # the caller's ACK went home, which took the call over
            home.on_message(in_dialog("ACK", 1, CALL_ID, "a1", ok.to.tag, "z9hG4bKack1"), ("127.0.0.1", 5999), "udp")
            await settled(home)
            assert of_method(sent[home], "ACK")
        await asyncio.sleep(0.8)     # the first copy is due at T1 (0.5 s)
        return [m for m in of_status(sent[other], 200) if m.call_id == CALL_ID]

    copies = with_nodes(tmp_path, 2, scenario)
    assert len(copies) == (1 if taken_over else 2)


def test_the_callers_invite_again_at_the_partner_resumes_the_call(tmp_path):
    """Seen in a kill-and-restart run: the owner saved the call and sent
    the callee its INVITE, and crashed (its Redis kept) before the caller
    had its 100 Trying. The caller's INVITE again went to the partner,
    which started a second call to the callee; the owner, back with the
    first call in its Redis, then took the caller's re-INVITE into a
    dialog the caller did not have. The partner now resumes the call: the
    same dialog, and the INVITE sent again as the first one's
    retransmission, byte for byte (the owner's Via and Contact: a SIPp
    UAS that had answered aborted the call on a copy with the partner's
    Contact, seen in a chaos run)."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey = bekey_of(CALL_ID)
        await owner.new_call(parse_message(caller_invite(bekey)), bekey)
        first, = of_method(sent[owner], "INVITE")
        # the owner dies; the caller sends its INVITE again, to the partner
        again = caller_invite(bekey).replace(b"owner=node1;partner=node2", b"owner=node2;partner=")
        partner.on_message(parse_message(again), ("127.0.0.1", 5999), "udp")
        await settled(partner)
        resent = of_method(sent[partner], "INVITE")
        assert of_status(sent[partner], 100)
        partner.on_message(callee_says(resent[0], 200, "OK"), ("127.0.0.1", 5999), "udp")
        await settled(partner)
        a_tag = (await partner.store.load(bekey, []))[0]["a"]["lt"]
        left = [await n.store.own.get(n.store.key("active", bekey)) for n in nodes]
        assert partner.stats.as_dict().get("dialogs{event=resumed}") == 1
        return first, resent, of_status(sent[partner], 200), a_tag, left

    first, resent, answered, a_tag, left = with_nodes(tmp_path, 2, scenario)
    assert len(resent) == 1
    assert resent[0].to_bytes() == first.to_bytes()
    assert (first.top_via.host, first.top_via.port, first.contacts[0].uri) == ("127.0.0.1", 7001, "sip:127.0.0.1:7001")
    assert [(m.call_id, m.to.tag) for m in answered] == [(CALL_ID, a_tag)]
    assert a_tag.startswith("sph") and left[0] is None and left[1] is not None   # one call, now the partner's


def test_a_stale_copy_of_the_callers_invite_after_the_answer_gets_no_reply(tmp_path):
    """Seen in a chaos run (a node SIGSTOPped for 4 s under 40 calls/s):
    the caller's INVITE waited in the hung owner's queue while its copy
    made the call at the partner; resumed, the owner found the answered
    call and told the caller 100 Trying, after its 200 and ACK, and SIPp
    aborted 5 calls of 2400 on that stray answer. A copy of the INVITE of
    an answered call at a node that did not take it is now absorbed: no
    answer, nothing to the callee. (At the node that took it, the copy
    is its transaction's: the 200 goes again, which SIPp ACKs again.)"""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey, b_invite = await calling(owner, sent)
        await owner.on_invite_response(bekey, b_invite.top_via.branch, callee_says(b_invite, 200, "OK"))
        assert of_status(sent[owner], 200)
        before = {n: len(sent[n]) for n in nodes}
        copy = caller_invite(bekey, sdp=SDP)
        owner.on_message(parse_message(copy), ("127.0.0.1", 5999), "udp")
        # the copy that waited in the queue of the owner the ring names, hung
        partner.on_message(parse_message(copy.replace(b"owner=node1;partner=node2", b"owner=node2;partner=")),
                           ("127.0.0.1", 5999), "udp")
        await settled(owner)
        await settled(partner)
        return [sent[n][before[n]:] for n in nodes]

    at_owner, at_partner = with_nodes(tmp_path, 2, scenario)
    assert [m.status for m in at_owner] == [200]
    assert at_partner == []


def test_after_a_takeover_a_delayed_offer_is_answered_by_the_callers_ack(tmp_path):
    """The caller's INVITE had no SDP: the callee's 2xx carries the offer
    and the caller's ACK the answer. The partner that relays a dead
    owner's 2xx used to ACK the callee itself, without SDP, and drop the
    caller's ACK: no media. It now relays the caller's ACK instead."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey = bekey_of(CALL_ID)
        await owner.new_call(parse_message(caller_invite(bekey)), bekey)     # no SDP
        b_invite, = of_method(sent[owner], "INVITE")
        offer = make_response(b_invite, 200, "OK", to_tag="callee-1", body=SDP, content_type="application/sdp",
                              headers=[("Contact", "<sip:service@127.0.0.1:5998>")])
        partner.on_message(parse_message(offer.to_bytes()), ("127.0.0.1", 5999), "udp")   # the owner died
        await settled(partner)
        ok = [m for m in of_status(sent[partner], 200) if m.call_id == CALL_ID]
        own_acks = len(of_method(sent[partner], "ACK"))
        ack = in_dialog("ACK", 1, CALL_ID, "a1", ok[0].to.tag, "z9hG4bKack1").to_bytes()
        ack = ack.replace(b"Content-Length: 0\r\n\r\n", b"Content-Type: application/sdp\r\nContent-Length: "
                          + str(len(SDP)).encode() + b"\r\n\r\n" + SDP)
        partner.on_message(parse_message(ack), ("127.0.0.1", 5999), "udp")
        await settled(partner)
        return ok, own_acks, of_method(sent[partner], "ACK")

    ok, own_acks, acks = with_nodes(tmp_path, 2, scenario)
    assert ok and ok[0].body == SDP                  # the offer reached the caller
    assert own_acks == 0
    assert len(acks) == 1 and acks[0].call_id != CALL_ID and acks[0].body == SDP


def test_a_2xx_after_the_caller_cancelled_is_hung_up_by_the_partner(tmp_path):
    """The caller cancelled, the owner died, and the callee had answered
    meanwhile: the partner used to ACK that 2xx with no To-tag and leave
    the callee in a call nobody has. It now ACKs and hangs up (BYE)."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey, b_invite = await calling(owner, sent)
        cancel = parse_message(caller_invite(bekey).replace(b"INVITE sip", b"CANCEL sip")
                               .replace(b"CSeq: 1 INVITE", b"CSeq: 1 CANCEL"))
        await owner.cancel(cancel, bekey)
        answer = callee_says(b_invite, 200, "OK")
        partner.on_message(answer, ("127.0.0.1", 5999), "udp")    # the owner died
        await settled(partner)
        return [(getattr(m, "method", None), m.call_id, m.to.tag) for m in sent[partner]]

    out = with_nodes(tmp_path, 2, scenario)
    assert [m for m, _, _ in out] == ["ACK", "BYE"]
    assert all(cid != CALL_ID and tag == "callee-1" for _, cid, tag in out)


def test_what_a_node_mirrored_to_a_dead_partner_is_mirrored_again(tmp_path):
    """A call's owner and then its partner die a few seconds apart (a hunt
    with kills lost 13 of 300 calls so): the only copy left died with the
    second. Once the proxy's probe names the partner down, the owner saves
    what it had mirrored there again, to the next partner up; records
    mirrored elsewhere are left as they are."""
    async def scenario(nodes, sent):
        n1 = nodes[0]
        bekey, _, _ = await answered_call(n1, sent)               # mirrored to node2
        for user in ("ann", "bo", "cy", "di"):
            n1.on_message(register(user, [f"<sip:{user}@192.0.2.60:5060>"]), *UDP)
        await settled(n1)
        before = {k: json.loads(v) for k, v in await active_records(n1)}
        n1.on_message(parse_message(probe("node2")), *UDP)
        while n1._sweeps:
            await asyncio.sleep(0.01)
        after = {k: json.loads(v) for k, v in await active_records(n1)}
        replicas = {n.id: {k async for k, _ in n.store.scan("replica")} for n in nodes}
        return bekey, before, after, replicas, n1.stats.get("mirrored_again")

    bekey, before, after, replicas, counted = with_nodes(tmp_path, 3, scenario)
    assert counted == sum(1 for r in before.values() if r["p"] == "node2")
    assert before[bekey]["p"] == "node2" and after[bekey]["p"] == "node3"
    assert {b for b, r in before.items() if r["p"] == "node2"} > {bekey}          # a registration too
    for b, r in after.items():
        assert r["p"] == "node3" and b in replicas["node3"]
        if before[b]["p"] == "node3":
            assert r["v"] == before[b]["v"]                       # left as it was
        else:
            assert r["v"] == before[b]["v"] + 1 and b not in replicas["node2"]


@pytest.mark.parametrize("how", ["host", "redis emptied", "process"])
def test_the_partner_of_a_dead_node_promotes_the_replicas_it_alone_has(tmp_path, how):
    """The owner's host died, its Redis with it (or its Redis came back
    empty): the partner's replica was the only copy of its calls, promoted
    only when a call's next request came; should the partner die first,
    the call was lost. It is promoted (and mirrored on) when the probe
    names the owner down. When only the owner's process died, its Redis
    keeps the calls for its restart and nothing moves."""
    async def scenario(nodes, sent):
        owner, partner, third = nodes
        bekey, _, _ = await answered_call(owner, sent)            # mirrored to node2
        if how == "host":
            partner.store.clients["node1"] = Redis(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5,
                                                   connect_timeout=0.5)
        elif how == "redis emptied":
            await owner.store.own.delete(owner.store.key("active", bekey))
        partner.on_message(parse_message(probe("node1")), *UDP)
        while partner._sweeps:
            await asyncio.sleep(0.01)
        status = await partner.status()
        return [{space: {k async for k, _ in n.store.scan(space)} for space in ("active", "replica")}
                for n in nodes], bekey, status

    held, bekey, status = with_nodes(tmp_path, 3, scenario)
    assert status["peers_down"] == ["node1"]
    if how != "process":
        assert bekey in held[1]["active"] and bekey in held[2]["replica"] and bekey not in held[1]["replica"]
        assert status["counters"]["taken_over{what=lost}"] == 1
    else:
        assert bekey in held[0]["active"] and bekey in held[1]["replica"] and bekey not in held[1]["active"]
        assert not any(k.startswith("taken_over") for k in status["counters"])


async def active_records(n) -> list[tuple[str, bytes]]:
    return [(k, raw) async for k, raw in n.store.scan("active")]


def test_a_node_whose_redis_died_hands_requests_to_the_partner(tmp_path):
    """The node's Redis died; until the proxy sees the node out (its probes
    get 503 within half a second, the proxy needs two), each request the
    node had got 500, a caller's BYE among them. It now goes to the
    partner the proxy named, which has the replica: the call ends there."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey, ok, b_invite = await answered_call(owner, sent)
        dead = Redis(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5, connect_timeout=0.5)
        owner.store.own = owner.store.clients["node1"] = dead
        bye = with_headers(in_dialog("BYE", 2, CALL_ID, "a1", ok.to.tag, "z9hG4bKbye2"),
                           [("X-Sipha-Route", f"bekey={bekey};owner=node1;partner=node2;reason=owner")])
        owner.on_message(bye, *UDP)
        await settled(owner)
        handed = [m for m in of_method(sent[owner], "BYE") if m.call_id == CALL_ID]
        dests = []
        partner.tx._send = lambda data, dest: (sent[partner].append(parse_message(data)), dests.append(dest))
        for m in handed:
            again = parse_message(m.to_bytes())
            again.source = ("127.0.0.1", 7001)            # it comes from the owner
            partner.on_message(again, *UDP)
        await settled(partner)
        return b_invite, handed, of_status(sent[owner], 500), sent[partner], \
            [await n.store.load(bekey, []) for n in (partner,)], dests

    b_invite, handed, errors, out, left, dests = with_nodes(tmp_path, 2, scenario)
    assert set(dests) == {("127.0.0.1", 5999)}                # answers and the BYE on go to the proxy
    assert not errors and len(handed) == 1
    assert handed[0].get("X-Sipha-Route").endswith("owner=node2;partner=;reason=handoff")
    assert [(m.status, m.cseq) for m in out if getattr(m, "status", 0)] == [(200, (2, "BYE"))]
    assert [m.call_id for m in of_method(out, "BYE")] == [b_invite.call_id]     # on to the callee
    assert left == [(None, "missing")]



def test_a_node_whose_redis_died_hands_the_answers_it_gets_to_the_partner(tmp_path):
    """The owner's Redis died while its call rang; the caller's CANCEL was
    handed to the partner, which CANCELled the callee with the owner's
    Via (RFC 3261 §9.1). The callee's 200 to the CANCEL and its 487 came
    to the owner, which dropped them for want of its Redis: the partner
    sent its CANCEL again until the proxy saw the owner's Redis down, and
    a SIPp UAS aborted the call on the copy (chaos, node3's Redis
    killed). The owner now hands such answers to the partner, once."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey, b_invite = await calling(owner, sent)
        owner.on_message(callee_says(b_invite, 180, "Ringing"), *UDP)
        await settled(owner)
        dead = Redis(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5, connect_timeout=0.5)
        owner.store.own = owner.store.clients["node1"] = dead
        dests = {n: [] for n in nodes}
        for n in nodes:
            n.tx._send = lambda data, dest, n=n: (sent[n].append(parse_message(data)), dests[n].append(dest))
        cancel = caller_invite(bekey).replace(b"INVITE sip:", b"CANCEL sip:").replace(b"CSeq: 1 INVITE",
                                                                                     b"CSeq: 1 CANCEL")
        partner.on_message(parse_message(cancel.replace(b"owner=node1;partner=node2;reason=owner",
                                                        b"owner=node2;partner=;reason=handoff")), *UDP)
        await settled(partner)
        callee_cancel, = of_method(sent[partner], "CANCEL")
        before, dests[owner] = len(sent[owner]), [None] * len(sent[owner])
        for resp in (make_response(callee_cancel, 200, "OK", to_tag="callee-1"),
                     make_response(b_invite, 487, "Request Terminated", to_tag="callee-1")):
            came = parse_message(resp.to_bytes())
            came.source = ("127.0.0.1", 5999)                # from the proxy
            owner.on_message(came, *UDP)
        await settled(owner)
        handed = list(zip(sent[owner][before:], dests[owner][before:]))
        for resp, _ in handed:
            came = parse_message(resp.to_bytes())
            came.source = ("127.0.0.1", 7001)                # from the owner
            partner.on_message(came, *UDP)
        await settled(partner)
        await asyncio.sleep(0.7)                            # past T1: no CANCEL again
        return callee_cancel, handed, sent[partner], await partner.store.load(bekey, [])

    callee_cancel, handed, out, left = with_nodes(tmp_path, 2, scenario)
    assert callee_cancel.top_via.port == 7001
    assert [(m.status, m.cseq[1], dest) for m, dest in handed] == \
        [(200, "CANCEL", ("127.0.0.1", 7002)), (487, "INVITE", ("127.0.0.1", 7002))]
    assert len(of_method(out, "CANCEL")) == 1
    assert [m.call_id for m in of_method(out, "ACK")] == [callee_cancel.call_id]      # of the 487
    assert left == (None, "missing")


def woken_owner_scenario(stall: bool, drain: bool):
    """The owner sends the B-leg INVITE, then stands still (or drains); the
    callee's 180 and 200 reach the partner, which relays them and takes
    the call; then the owner finds a copy of the 180 in its queue."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey, b_invite = await calling(owner, sent)
        ringing = callee_says(b_invite, 180, "Ringing")
        answer = callee_says(b_invite, 200, "OK")
        for resp in (ringing, answer):                      # what the proxy brought the partner
            partner.on_message(parse_message(resp.to_bytes()), ("127.0.0.1", 5999), "udp")
            await settled(partner)
        assert [m.status for m in sent[partner] if m.call_id == CALL_ID] == [180, 200]
        owner._tick()
        if stall:
            owner.loop_seen -= 5.0                          # its loop did not run for 5 s
        owner.draining = drain
        before = len(sent[owner])
        owner.on_message(parse_message(ringing.to_bytes()), ("127.0.0.1", 5999), "udp")
        await settled(owner)
        owner._ticker.cancel()
        return [m for m in sent[owner][before:] if m.call_id == CALL_ID]
    return scenario


@pytest.mark.parametrize("stall, drain", [(True, False), (False, True)])
def test_a_woken_or_draining_owner_tells_the_caller_no_ringing_after_the_answer(tmp_path, stall, drain):
    """Seen in a chaos run with reliable provisional answers (100rel): a
    node SIGSTOPped for 4 s found copies of the callee's 183 in its queue
    when woken, and relayed them from what it kept in memory of the call's
    setup, after the 200 the partner had relayed; SIPp aborted 7 calls of
    2400 on them. A draining node did the same, and saved the 183's RSeq
    where the partner, which took its ringing calls at the proxy's probe,
    did not look: the caller's PRACK got 481 (4 calls). A stalled node now
    forgets that memory at the first message it finds (and drops that
    message, read from its backlog), and a draining one does not use it:
    the 180 is read against the answered call."""
    to_caller = with_nodes(tmp_path, 2, woken_owner_scenario(stall, drain))
    assert [m.status for m in to_caller] == []


def test_requests_that_waited_through_a_stall_are_not_handled(tmp_path):
    """Seen in a chaos run (cancel.xml, a node SIGSTOPped for 4 s): the
    caller's INVITE waited in the hung owner's queue, its retransmission
    made the call at the partner, and the caller cancelled it there; woken,
    the owner found no call, started a second one to the callee and told
    the caller 100 Trying after its 487 (SIPp aborted 2 calls of 2400). A
    request read from a stalled node's backlog (msg.stale, as the
    transport marks it) is dropped: a sender that still waits sends it
    again. An ACK is handled, as nobody sends it again."""
    async def scenario(nodes, sent):
        owner, _ = nodes
        bekey = bekey_of(CALL_ID)
        for data in (caller_invite(bekey, sdp=SDP), register("alice", ["<sip:alice@192.0.2.9:5060>"]).to_bytes(),
                     in_dialog("BYE", 2, CALL_ID, "caller-1", "gone-1", "z9hG4bKbye7").to_bytes()):
            msg = parse_message(data)
            msg.stale = True
            owner.on_message(msg, ("127.0.0.1", 5999), "udp")
        await settled(owner)
        dropped = owner.stats.as_dict().get("stale_requests")
        before = len(sent[owner])
        bekey, ok, b_invite = await answered_call(owner, sent)
        ack = in_dialog("ACK", 1, CALL_ID, ok.from_.tag, ok.to.tag, "z9hG4bKack7")
        ack.stale = True
        owner.on_message(ack, ("127.0.0.1", 5999), "udp")
        await settled(owner)
        return sent[owner][:before], dropped, of_method(sent[owner][before:], "ACK")

    early, dropped, acks = with_nodes(tmp_path, 2, scenario)
    assert early == [] and dropped == 3
    assert len(acks) == 1 and acks[0].call_id != CALL_ID          # the ACK went on to the callee


def test_a_response_that_waited_through_a_stall_is_not_relayed(tmp_path):
    """Seen in a chaos run (uac_prack over TCP, a node SIGSTOPped for 4
    s): the callee's reliable 183 waited in the hung owner's queue while
    the partner relayed its retransmission, took the PRACK and the answer;
    woken, the owner relayed its copy from the B-leg transaction it still
    held, and the caller, already answered, aborted the call on it. A
    response read from a stalled node's backlog is dropped, as a request
    is: the callee sends it again while it matters (a 100rel 183 until its
    PRACK), and that fresh copy is relayed."""
    async def scenario(nodes, sent):
        owner, _ = nodes
        _, b_invite = await calling(owner, sent)
        reliable = with_headers(callee_says(b_invite, 183, "Session Progress"),
                                [("Require", "100rel"), ("RSeq", "1")], SDP, "application/sdp").to_bytes()
        before = len(sent[owner])
        stale = parse_message(reliable)
        stale.stale = True
        owner.on_message(stale, ("127.0.0.1", 5999), "udp")
        await settled(owner)
        dropped = sent[owner][before:], owner.stats.as_dict().get("stale_responses")
        owner.on_message(parse_message(reliable), ("127.0.0.1", 5999), "udp")
        await settled(owner)
        return dropped, [m.status for m in sent[owner][before:] if m.call_id == CALL_ID]

    (relayed, counted), fresh = with_nodes(tmp_path, 2, scenario)
    assert relayed == [] and counted == 1
    assert fresh == [183]
