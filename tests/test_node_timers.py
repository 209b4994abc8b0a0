"""node.app and node.sip, nodes in one process against real redis-servers:
how long a B2BUA lets a callee ring (RFC 3261 Timer C, §16.6 step 11
and §16.8: the callee's INVITE transaction has no end of its own once it
rang), and the INVITE of a call resumed by a partner. Timer B (64*T1)
is shortened here so the tests take seconds, not half a minute."""
from __future__ import annotations

import asyncio
import json

import pytest

import node.app
import node.sip
from nodekit import (CALL_ID, SDP, UDP, answered_call, caller_invite, dies_and_is_taken_over, of_method, of_status,
                     probe, settled, with_nodes)
from sipcore.bekey import bekey_of
from sipcore.message import make_response, parse_message

pytestmark = pytest.mark.e2e


@pytest.fixture
def short_timer_b(monkeypatch):
    monkeypatch.setattr(node.sip, "TIMEOUT", 1.0)


def to_caller(msgs) -> list[tuple[int, str]]:
    """What the caller heard, but the 100 Trying and the copies of a
    failure sent again until its ACK (Timer G), byte for byte the same."""
    heard = [m for m in msgs if getattr(m, "status", 0) > 100 and m.call_id == CALL_ID]
    return [(m.status, m.reason) for i, m in enumerate(heard)
            if not (m.status >= 300 and any(e.to_bytes() == m.to_bytes() for e in heard[:i]))]


async def ringing(n, sent):
    """A call on node `n` whose callee rings -> (bekey, the B-leg INVITE)."""
    bekey = bekey_of(CALL_ID)
    await n.new_call(parse_message(caller_invite(bekey)), bekey)
    b_invite, = of_method(sent[n], "INVITE")
    n.on_message(make_response(b_invite, 180, "Ringing", to_tag="callee-1"), *UDP)
    return bekey, b_invite


def test_a_callee_may_ring_longer_than_timer_b(tmp_path, short_timer_b):
    """A phone ringing for more than 32 s (64*T1) lost its call: the
    node's INVITE transaction gave up at Timer B even after the 180, told
    the caller 408, and hung up on the callee when it answered."""
    async def scenario(nodes, sent):
        n, = nodes
        bekey, b_invite = await ringing(n, sent)
        await settled(n)
        await asyncio.sleep(1.6)               # past Timer B, short of Timer C
        n.on_message(make_response(b_invite, 200, "OK", to_tag="callee-1",
                                   headers=[("Contact", "<sip:service@127.0.0.1:5998>")]), *UDP)
        await settled(n)
        return sent[n]

    out = with_nodes(tmp_path, 1, scenario, {"node.invite_timeout": 5})
    assert to_caller(out) == [(180, "Ringing"), (200, "OK")]
    assert not of_method(out, "BYE") and not of_method(out, "CANCEL")


def test_a_callee_ringing_past_timer_c_is_cancelled_and_the_caller_told_408(tmp_path, short_timer_b):
    """Timer C runs from the callee's last provisional answer (a 183 after
    the 180 sets it again); when it fires the node CANCELs that branch and
    the caller hears 408 Request Timeout (what Kamailio's fr_inv_timer
    does), not the 487 the callee answers the CANCEL with."""
    async def scenario(nodes, sent):
        n, = nodes
        bekey, b_invite = await ringing(n, sent)
        await asyncio.sleep(1.0)
        n.on_message(make_response(b_invite, 183, "Session Progress", to_tag="callee-1"), *UDP)
        await asyncio.sleep(1.0)               # 2 s after the 180, 1 s after the 183
        early = of_method(sent[n], "CANCEL")
        await asyncio.sleep(1.0)
        cancel, *copies = of_method(sent[n], "CANCEL")      # a copy at T1 if the callee is slow
        assert all(c.to_bytes() == cancel.to_bytes() for c in copies)
        n.on_message(make_response(cancel, 200, "OK", to_tag="callee-1"), *UDP)
        n.on_message(make_response(b_invite, 487, "Request Terminated", to_tag="callee-1"), *UDP)
        await settled(n)
        assert n.stats.as_dict().get("ring_timeouts") == 1
        return b_invite, early, cancel, sent[n], await n.store.load(bekey, [])

    b_invite, early, cancel, out, left = with_nodes(tmp_path, 1, scenario, {"node.invite_timeout": 1.5})
    assert early == []
    assert (cancel.top_via.branch, cancel.uri, cancel.cseq) == (b_invite.top_via.branch, b_invite.uri, (1, "CANCEL"))
    assert to_caller(out) == [(180, "Ringing"), (183, "Session Progress"), (408, "Request Timeout")]
    ack, = of_method(out, "ACK")
    assert ack.top_via.branch == b_invite.top_via.branch
    assert left == (None, "missing")


def test_a_callee_silent_after_timer_c_still_ends_the_call(tmp_path, short_timer_b):
    """The callee rang and then vanished: after the CANCEL, Timer B again
    and the caller hears 408 all the same (RFC 3261 §16.8)."""
    async def scenario(nodes, sent):
        n, = nodes
        bekey, b_invite = await ringing(n, sent)
        await asyncio.sleep(2.8)
        return b_invite, sent[n], await n.store.load(bekey, [])

    b_invite, out, left = with_nodes(tmp_path, 1, scenario, {"node.invite_timeout": 1.0})
    assert to_caller(out) == [(180, "Ringing"), (408, "Request Timeout")]
    assert {m.top_via.branch for m in of_method(out, "CANCEL")} == {b_invite.top_via.branch}
    assert left == (None, "missing")


def resumed(owner, partner, bekey, owner_dies: bool = True):
    """The owner dies (its timers stop), or the ramp moves the call; the
    caller's INVITE again, at the partner."""
    if owner_dies:
        owner.tx.close()
    again = caller_invite(bekey).replace(b"owner=node1;partner=node2", b"owner=node2;partner=")
    partner.on_message(parse_message(again), *UDP)


def test_a_resumed_invite_is_retransmitted_until_the_callee_answers(tmp_path):
    """The partner resuming a call sent the INVITE once: had that copy been
    lost too, the caller, told Trying, waited for ever. It now goes again
    at T1, 2*T1... like any INVITE, until the callee answers."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey = bekey_of(CALL_ID)
        await owner.new_call(parse_message(caller_invite(bekey)), bekey)
        first, = of_method(sent[owner], "INVITE")
        resumed(owner, partner, bekey)
        await settled(partner)
        await asyncio.sleep(2.2)               # copies at 0, 0.5 and 1.5 s
        copies = len(of_method(sent[partner], "INVITE"))
        partner.on_message(make_response(first, 180, "Ringing", to_tag="callee-1"), *UDP)
        await asyncio.sleep(2.0)               # the next would have gone at 3.5 s
        return first, copies, of_method(sent[partner], "INVITE")

    first, copies, invites = with_nodes(tmp_path, 2, scenario)
    assert copies == 3 and len(invites) == 3
    assert {(m.top_via.branch, m.top_via.port) for m in invites} == {(first.top_via.branch, first.top_via.port)}


def test_a_resumed_invite_stops_once_the_call_is_answered_elsewhere(tmp_path):
    """The node that sent the INVITE first was alive after all (the ramp
    brought the caller's INVITE again to the partner): once it had the
    callee's 2xx, copies from the partner would reach the callee as an
    INVITE after its ACK. The partner sends again only while the call is
    still ringing in Redis."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey = bekey_of(CALL_ID)
        await owner.new_call(parse_message(caller_invite(bekey)), bekey)
        first, = of_method(sent[owner], "INVITE")
        resumed(owner, partner, bekey, owner_dies=False)
        await settled(partner)
        # the callee answers the owner, which takes the call back and confirms it
        owner.on_message(make_response(first, 200, "OK", to_tag="callee-1",
                                       headers=[("Contact", "<sip:service@127.0.0.1:5998>")]), *UDP)
        await settled(owner)
        assert of_status(sent[owner], 200)
        await asyncio.sleep(1.7)
        return of_method(sent[partner], "INVITE"), dict(partner.in_setup)

    invites, in_setup = with_nodes(tmp_path, 2, scenario)
    assert len(invites) == 1 and not in_setup       # nor is the setup kept for ever


def test_a_resumed_call_nobody_answers_ends_at_timer_c(tmp_path, short_timer_b):
    """No answer at all to a resumed INVITE: the callee never had it, or
    its answers go to the first sender, alive after all. The partner
    cannot tell, so it waits Timer C, not Timer B, before it CANCELs and
    tells the caller 408."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey = bekey_of(CALL_ID)
        await owner.new_call(parse_message(caller_invite(bekey)), bekey)
        resumed(owner, partner, bekey)
        await settled(partner)
        await asyncio.sleep(1.5)               # Timer B: nothing yet
        before = to_caller(sent[partner])
        await asyncio.sleep(2.5)               # Timer C (2 s), then Timer B after the CANCEL
        return before, sent[partner], [await n.store.load(bekey, []) for n in nodes]

    before, out, left = with_nodes(tmp_path, 2, scenario, {"node.invite_timeout": 2})
    assert before == [] and of_status(out, 100)
    assert to_caller(out) == [(408, "Request Timeout")]
    assert of_method(out, "CANCEL")
    assert left == [(None, "missing")] * 2


@pytest.mark.parametrize("callee_answers_cancel", [True, False])
def test_a_call_ringing_when_its_node_died_keeps_its_early_media_and_timer_c(tmp_path, short_timer_b,
                                                                             callee_answers_cancel):
    """The owner sent the INVITE and died while the callee rang. The
    callee's next provisional answer (a 183 with early media, or the 180
    a UAS sends again every minute, RFC 3261 §13.3.1.1) reached the
    partner and was dropped, and nothing would ever end the ringing: the
    partner now relays it to the caller and runs the fork's Timer C."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey = bekey_of(CALL_ID)
        await owner.new_call(parse_message(caller_invite(bekey)), bekey)
        b_invite, = of_method(sent[owner], "INVITE")
        owner.tx.close()                                  # the owner dies
        progress = make_response(b_invite, 183, "Session Progress", to_tag="callee-1", body=SDP,
                                 content_type="application/sdp")
        partner.on_message(parse_message(progress.to_bytes()), *UDP)
        await settled(partner)
        early = to_caller(sent[partner])
        await asyncio.sleep(1.5)                          # Timer C (1 s) from the 183, then 64*T1 (1 s)
        cancels = of_method(sent[partner], "CANCEL")
        if callee_answers_cancel:
            partner.on_message(make_response(b_invite, 487, "Request Terminated", to_tag="callee-1"), *UDP)
            await settled(partner)
        else:
            await asyncio.sleep(1.2)                      # Timer B after the CANCEL
            await settled(partner)
        return b_invite, early, cancels, sent[partner], [await n.store.load(bekey, []) for n in nodes]

    b_invite, early, cancels, out, left = with_nodes(tmp_path, 2, scenario, {"node.invite_timeout": 1})
    assert early == [(183, "Session Progress")]
    assert [m.body for m in out if getattr(m, "status", 0) == 183] == [SDP]
    assert cancels and {(c.top_via.branch, c.top_via.port) for c in cancels} == \
        {(b_invite.top_via.branch, b_invite.top_via.port)}
    assert to_caller(out)[-1] == (408, "Request Timeout")
    assert len(of_method(out, "ACK")) == (1 if callee_answers_cancel else 0)
    assert left == [(None, "missing")] * 2


def test_a_call_that_rang_before_its_node_died_ends_at_the_partners_timer_c(tmp_path, short_timer_b):
    """The callee rang once, then the owner died: no provisional or final
    answer, no CANCEL came after, and the caller (SIPp, a gateway) waited
    for ever; the owner's Timer C had died with it. Once the proxy's probe
    names the owner down, the partner takes the call and the INVITE
    transaction on, with a Timer C from then."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey, b_invite = await ringing(owner, sent)
        await settled(owner)
        owner.tx.close()                                  # the owner dies
        partner.on_message(parse_message(probe()), *UDP)
        await asyncio.sleep(0.2)
        quiet = await partner.store.own.get(partner.store.key("active", bekey))   # nobody said node1 was down
        partner.on_message(parse_message(probe("node1, node3")), *UDP)
        partner.on_message(parse_message(probe("node1")), *UDP)    # the same view again: no second CANCEL
        await asyncio.sleep(0.3)
        await settled(partner)
        held = [await n.store.own.get(n.store.key("active", bekey)) for n in nodes]
        await asyncio.sleep(1.0)                          # Timer C (1 s)
        cancels = of_method(sent[partner], "CANCEL")
        partner.on_message(make_response(b_invite, 487, "Request Terminated", to_tag="callee-1"), *UDP)
        await settled(partner)
        return b_invite, quiet, held, cancels, sent[partner], [await n.store.load(bekey, []) for n in nodes]

    b_invite, quiet, held, cancels, out, left = with_nodes(tmp_path, 2, scenario, {"node.invite_timeout": 1})
    assert quiet is None and held[0] is None and held[1] is not None        # the partner holds the call
    assert len(cancels) == 1 and (cancels[0].top_via.branch, cancels[0].top_via.port) == \
        (b_invite.top_via.branch, b_invite.top_via.port)
    assert to_caller(out) == [(408, "Request Timeout")]
    assert len(of_method(out, "ACK")) == 1                # of the 487
    assert left == [(None, "missing")] * 2




@pytest.mark.parametrize("status, reason", [(200, "OK"), (183, "Session Progress")])
def test_a_callee_that_answered_gets_no_copy_of_the_invite_after_the_takeover(tmp_path, monkeypatch, status, reason):
    """The owner died before the callee's 200 reached it. A SIPp UAS that
    answered 180 and 200 takes a copy of the INVITE for a new message
    and aborts the call, so the partner that took the call on waits
    before it sends the INVITE again (node.app.SEND_AGAIN_AFTER): the
    callee's 200, sent again until its ACK, comes first, and the call is
    answered without a copy; nor does a callee that said something else
    since (a 183: it has the INVITE) get one."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey, b_invite = await ringing(owner, sent)
        await settled(owner)
        owner.tx.close()                                  # the owner dies; the callee answers
        monkeypatch.setattr(node.app, "SEND_AGAIN_AFTER", 0.3)
        await partner.take_over("node1")
        partner.on_message(make_response(b_invite, status, reason, to_tag="callee-1",
                                         headers=[("Contact", "<sip:service@127.0.0.1:5998>")]), *UDP)
        await asyncio.sleep(0.5)
        await settled(partner)
        return of_method(sent[partner], "INVITE"), to_caller(sent[partner])

    invites, heard = with_nodes(tmp_path, 2, scenario)
    assert invites == [] and heard == [(status, reason)]


def test_a_cancel_at_timer_c_that_never_left_goes_out_from_the_partner(tmp_path, short_timer_b, monkeypatch):
    """The owner's Timer C fired: it saved the fork as timed out and died
    before its CANCEL left. The partner took the call on and did nothing
    (a fork CANCELled is not waited for), so the callee rang on and the
    caller waited for ever. The partner now waits for the callee's
    answer, and at its own Timer C sends the CANCEL; the callee's 487
    reaches the caller as 408."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey, b_invite = await ringing(owner, sent)
        await settled(owner)
        monkeypatch.setattr(owner, "send_cancel", lambda *a, **k: None)      # dies before it leaves
        await asyncio.sleep(1.2)                          # Timer C (1 s)
        await settled(owner)
        owner.tx.close()
        await partner.take_over("node1")
        await asyncio.sleep(1.2)                          # the partner's Timer C
        await settled(partner)
        cancels = of_method(sent[partner], "CANCEL")
        partner.on_message(make_response(b_invite, 487, "Request Terminated", to_tag="callee-1"), *UDP)
        await settled(partner)
        return b_invite, cancels, sent[partner]

    b_invite, cancels, out = with_nodes(tmp_path, 2, scenario, {"node.invite_timeout": 1})
    assert [(c.top_via.branch, c.top_via.port) for c in cancels] == [(b_invite.top_via.branch, 7001)]
    assert to_caller(out) == [(408, "Request Timeout")]
    assert not of_method(out, "INVITE")


def test_a_node_back_with_its_redis_times_its_calls_still_ringing_again(tmp_path, short_timer_b):
    """The owner's process restarted (its Redis kept the call): Node.start
    sweeps its active keyspace so (take_over), and the call that
    rang before the restart ends at Timer C."""
    async def scenario(nodes, sent):
        n, = nodes
        bekey, b_invite = await ringing(n, sent)
        await settled(n)
        n.tx.close()                                      # what the process had in memory is gone
        n.tx.client.clear()
        n.tx.start()
        await n.take_over(None)
        await settled(n)
        await asyncio.sleep(1.2)
        return b_invite, of_method(sent[n], "CANCEL")

    b_invite, cancels = with_nodes(tmp_path, 1, scenario, {"node.invite_timeout": 1})
    assert [c.top_via.branch for c in cancels] == [b_invite.top_via.branch]



@pytest.mark.parametrize("back", ["partner", "restart"])
def test_a_call_told_trying_whose_invite_never_left_goes_on_at_the_takeover(tmp_path, monkeypatch, back):
    """A save slower than 200 ms (a loaded box) lets the caller have its
    100 Trying before the call is saved and the callee has the INVITE
    (trying_once_saved). The owner then died between the save and the
    INVITE: the caller, told Trying, sent nothing more, and the partner
    (or the owner back with its Redis) took the call on waiting for
    answers to an INVITE nobody had sent, until Timer C; a SIPp caller
    waited for ever (one call short in a chaos run). The INVITE is now
    sent at the takeover, from the copy saved with the call, byte for
    byte the one the owner would have sent."""
    monkeypatch.setattr(node.app, "TRYING_AFTER", 0.0)            # the save is "slow"

    async def scenario(nodes, sent):
        owner, partner = nodes[0], nodes[-1]
        bekey = bekey_of(CALL_ID)
        lost = []
        monkeypatch.setattr(owner, "send_fork_invite", lambda bekey, invite, *a, **k: lost.append(invite))
        await owner.new_call(parse_message(caller_invite(bekey, sdp=SDP)), bekey)
        told = [m.status for m in sent[owner]]
        await dies_and_is_taken_over(owner, partner, back, monkeypatch)
        resent = of_method(sent[partner], "INVITE")
        partner.on_message(make_response(resent[0], 200, "OK", to_tag="callee-1",
                                         headers=[("Contact", "<sip:service@127.0.0.1:5998>")]), *UDP)
        await settled(partner)
        return lost, told, resent, to_caller(sent[partner])

    lost, told, resent, heard = with_nodes(tmp_path, 1 if back == "restart" else 2, scenario)
    assert told == [100]
    assert len(lost) == 1 and [m.to_bytes() for m in resent] == [lost[0].to_bytes()]
    assert resent[0].body == SDP
    assert heard == [(200, "OK")]


# ---- node.dialog_ttl ---------------------------------------------------------

async def aged(n, space: str, bekey: str, left: float) -> None:
    """Make a call's record in node `n`'s Redis look saved long ago: `left`
    seconds before Redis would expire it (a save sets dialog_ttl + grace)."""
    await n.store.own.execute("PEXPIRE", n.store.key(space, bekey), int(left * 1000))


def test_a_call_idle_for_the_dialog_ttl_is_ended_on_both_sides_with_a_call_record(tmp_path, caplog):
    """Kamailio's dialog default_timeout: no request in the dialog for
    node.dialog_ttl (a phone that crashed mid-call, a BYE lost for good)
    and the node ends the call: a BYE to each side, a call record with
    ended_by=timeout, the record and its replica gone. Before, the record
    just expired: the other phone stayed in the call, its BYE got 481,
    and the call had no call record. Exactly once: the partner, which
    holds the replica, finds nothing left to end."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey, ok, b_invite = await answered_call(owner, sent)
        assert await owner.expire_idle() == 0                      # fresh: left alone
        for n, space in ((owner, "active"), (partner, "replica")):
            await aged(n, space, bekey, n.store.grace - 1)
        ended = await owner.expire_idle()
        await settled(owner)
        left = [await owner.store.own.get(owner.store.key("active", bekey)),
                await partner.store.own.get(partner.store.key("replica", bekey))]
        return ended, await partner.expire_idle(), of_method(sent[owner], "BYE"), left, b_invite

    with caplog.at_level("INFO", logger="node"):
        ended, by_partner, byes, left, b_invite = with_nodes(tmp_path, 2, scenario, {"node.dialog_ttl": 3600})
    assert (ended, by_partner, left) == (1, 0, [None, None])
    assert sorted(b.call_id for b in byes) == sorted([CALL_ID, b_invite.call_id])
    assert all("dialog_ttl" in b.get("Reason") for b in byes)
    cdrs = [r.fields for r in caplog.records if getattr(r, "event", "") == "cdr"]
    assert [(c["status"], c["ended_by"]) for c in cdrs] == [(200, "timeout")]


def test_a_call_saved_while_the_sweep_looked_goes_on(tmp_path):
    """The sweep takes a record only as it read it: a request that saved
    the call in between (a session refresh) keeps it going."""
    async def scenario(nodes, sent):
        owner, _ = nodes
        bekey, ok, b_invite = await answered_call(owner, sent)
        await aged(owner, "active", bekey, owner.store.grace - 1)
        key = owner.store.key("active", bekey)
        raw = await owner.store.own.get(key)
        record = json.loads(raw)
        await owner.save_held(bekey, json.loads(raw))              # the refresh, after the sweep read it
        ended = await owner.end_idle(bekey, "active", raw, record)
        return ended, await owner.store.own.get(key), of_method(sent[owner], "BYE")

    ended, still, byes = with_nodes(tmp_path, 2, scenario, {"node.dialog_ttl": 3600})
    assert (ended, byes) == (False, []) and still is not None


def test_the_partner_ends_an_idle_call_of_a_dead_owner(tmp_path):
    """The owner died with the call: its replica is ended by the partner,
    once past the owner's turn."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey, ok, b_invite = await answered_call(owner, sent)
        await owner.store.own.delete(owner.store.key("active", bekey))    # the owner's host is gone
        await aged(partner, "replica", bekey, partner.store.grace * 0.75)
        early = await partner.expire_idle()                               # still the owner's turn
        await aged(partner, "replica", bekey, partner.store.grace * 0.4)
        return early, await partner.expire_idle(), of_method(sent[partner], "BYE")

    early, ended, byes = with_nodes(tmp_path, 2, scenario, {"node.dialog_ttl": 3600})
    assert (early, ended, len(byes)) == (0, 1, 2)


def test_a_call_still_ringing_at_its_owner_is_not_ended_from_its_replica(tmp_path):
    """With a dialog_ttl shorter than Timer C, a call may ring longer than
    the dialog_ttl: its owner knows (it is setting the call up), its
    partner does not, and must not end it from the replica."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        bekey = bekey_of(CALL_ID)
        await owner.new_call(parse_message(caller_invite(bekey)), bekey)
        for n, space in ((owner, "active"), (partner, "replica")):
            await aged(n, space, bekey, 0.4 * n.store.grace)
        return await owner.expire_idle(), await partner.expire_idle()

    assert with_nodes(tmp_path, 2, scenario, {"node.dialog_ttl": 60}) == (0, 0)


def test_a_failure_to_the_caller_is_sent_again_until_its_ack(tmp_path, monkeypatch):
    """An INVITE's final failure (the callee's 486, a CANCEL's 487) went
    out once: the caller, which had a provisional answer, never sends its
    INVITE again, so a 487 lost (the proxy restarting at that instant, in
    a chaos run) left it waiting, one call failed. It is now sent again,
    T1 doubling, until the caller's ACK (Timer G, RFC 3261 §17.2.1),
    which may reach a node that no longer has the call."""
    monkeypatch.setattr(node.sip, "T1", 0.05)

    async def scenario(nodes, sent):
        n, = nodes
        bekey, b_invite = await ringing(n, sent)
        await settled(n)
        n.on_message(make_response(b_invite, 486, "Busy Here", to_tag="callee-1"), *UDP)
        await settled(n)
        await asyncio.sleep(0.2)                    # 0.05 + 0.1: sent twice more
        busy = of_status(sent[n], 486)
        ack = parse_message(caller_invite(bekey).replace(b"INVITE sip", b"ACK sip").replace(
            b"CSeq: 1 INVITE", b"CSeq: 1 ACK").replace(b"To: <sip:service@example.com>",
                                                       f"To: <sip:service@example.com>;tag={busy[0].to.tag}".encode()))
        n.on_message(ack, *UDP)
        await settled(n)
        before = len(of_status(sent[n], 486))
        await asyncio.sleep(0.5)
        return [m for m in busy if m.call_id == CALL_ID], before, len(of_status(sent[n], 486))

    busy, before, after = with_nodes(tmp_path, 1, scenario)
    assert len(busy) >= 3 and len({m.to_bytes() for m in busy}) == 1      # the same answer again
    assert after == before                                                # none after the ACK
