"""node.app: an INVITE with Replaces (RFC 3891), as a transferee sends it
in an attended transfer. Through a B2BUA the dialog it names is one leg
of a call; the phone that is to drop it has the other leg, under another
Call-ID and other tags. The node used to answer Require: replaces with
420, and without Require sent the Replaces nowhere: the target rang as a
new call and the transferor's call went on."""
from __future__ import annotations

import pytest

from nodekit import (CALL_ID, PROXY, UDP, answered_call, callee_says, caller_invite, calling, in_dialog, of_method,
                     of_status, settled, with_headers, with_nodes)
from sipcore.bekey import bekey_of
from sipcore.message import parse_message

pytestmark = pytest.mark.e2e

XFER = "xfer-3@192.0.2.51"


def transferee_invite(replaces: str, ruri: str = "sip:carol@example.com", require: bool = False,
                      call_id: str = XFER):
    """-> (BEKey, the transferee's INVITE with `replaces`) as the proxy hands it on."""
    bekey = bekey_of(call_id)
    data = caller_invite(bekey, ruri=ruri).replace(CALL_ID.encode(), call_id.encode()).replace(b"tag=a1", b"tag=t3")
    return bekey, with_headers(data, [("Replaces", replaces)] + ([("Require", "replaces")] if require else []))


def transfer(tmp_path, replaces, **kw):
    """A call answered on node1, then the transferee's INVITE with
    `replaces(ok, b_invite)` -> (the callee's B-leg INVITE, its 200 to
    the caller, what node1 sent since)."""
    async def scenario(nodes, sent):
        n, = nodes
        _, ok, b_invite = await answered_call(n, sent)
        sent[n].clear()
        _, invite = transferee_invite(replaces(ok, b_invite), **kw)
        n.on_message(invite, *UDP)
        await settled(n)
        return b_invite, ok, sent[n]
    return with_nodes(tmp_path, 1, scenario)


def test_the_callers_leg_named_reaches_the_callee_as_its_own_dialog(tmp_path):
    """The caller transfers: the transferee names the caller's leg, and the
    callee gets the INVITE at its Contact (not at the request URI, here
    an AOR the node would send upstream) naming the callee's leg."""
    b_invite, ok, out = transfer(tmp_path, lambda ok, b: f"{CALL_ID};to-tag={ok.to.tag};from-tag=a1", require=True)
    assert not of_status(out, 420) and not of_status(out, 481)
    invite, = of_method(out, "INVITE")
    assert invite.uri == "sip:service@127.0.0.1:5998" and invite.to.uri == b_invite.to.uri
    assert invite.get("Replaces") == f"{b_invite.call_id};to-tag=callee-1;from-tag={b_invite.from_.tag}"
    assert invite.get("Require") == "replaces"
    assert invite.call_id not in (b_invite.call_id, XFER)
    # both ends of a call were told they may transfer it so
    assert b_invite.get("Supported") == "replaces" and ok.get("Supported") == "replaces"


def test_the_callees_leg_named_reaches_the_caller_through_its_route(tmp_path):
    b_invite, ok, out = transfer(
        tmp_path, lambda ok, b: f"{b.call_id};to-tag={b.from_.tag};from-tag=callee-1;early-only")
    invite, = of_method(out, "INVITE")
    assert invite.uri == "sip:alice@192.0.2.50:5070"
    assert invite.values("Route") == [f"<sip:{PROXY};lr;flow=udp:192.0.2.50:5070>"]
    assert invite.get("Replaces") == f"{CALL_ID};to-tag=a1;from-tag={ok.to.tag};early-only"
    assert not invite.has("Require")


def test_a_ringing_call_is_picked_up_through_the_caller(tmp_path):
    """Call pickup (RFC 3891 §7.1): a phone that saw the callee ringing
    (its dialog event package) names the callee's early dialog, ours to
    it, whose callee tag the node does not save before the answer. The
    caller originated the early dialog it has with us, so it is the one
    that can honour the Replaces: it gets the INVITE at its Contact,
    through its route, naming its own early dialog (answering it, it
    cancels its first INVITE, and the callee's phones stop ringing)."""
    async def scenario(nodes, sent):
        n, = nodes
        bekey, b_invite = await calling(n, sent)
        await n.on_invite_response(bekey, b_invite.top_via.branch, callee_says(b_invite, 180, "Ringing"))
        ringing, = of_status(sent[n], 180)
        sent[n].clear()
        _, invite = transferee_invite(f"{b_invite.call_id};to-tag={b_invite.from_.tag};from-tag=callee-1;early-only")
        n.on_message(invite, *UDP)
        await settled(n)
        wrong = f"{b_invite.call_id};to-tag={b_invite.from_.tag}x;from-tag=callee-1"
        n.on_message(transferee_invite(wrong, call_id="pickup-2@192.0.2.52")[1], *UDP)
        await settled(n)
        return ringing, sent[n]

    ringing, out = with_nodes(tmp_path, 1, scenario)
    invite, = of_method(out, "INVITE")
    assert invite.uri == "sip:alice@192.0.2.50:5070"
    assert invite.values("Route") == [f"<sip:{PROXY};lr;flow=udp:192.0.2.50:5070>"]
    assert invite.get("Replaces") == f"{CALL_ID};to-tag=a1;from-tag={ringing.to.tag};early-only"
    # a tag not ours for that Call-ID: no such dialog
    assert [m.status for m in out if getattr(m, "status", 0) >= 300] == [481]


@pytest.mark.parametrize("replaces, status", [
    (lambda ok, b: f"{CALL_ID};to-tag={ok.to.tag};from-tag=someone-else", 481),   # not that dialog
    (lambda ok, b: f"{CALL_ID};to-tag={ok.to.tag}", 400),                         # no from-tag
    (lambda ok, b: ";to-tag=x;from-tag=y", 400),                                  # no Call-ID
], ids=["another-dialog", "no-from-tag", "no-call-id"])
def test_a_replaces_that_names_no_dialog_of_ours_is_refused(tmp_path, replaces, status):
    b_invite, ok, out = transfer(tmp_path, replaces)
    refused, = [m for m in out if getattr(m, "status", 0) >= 300]
    assert refused.status == status and refused.call_id == XFER and refused.to.tag
    assert not of_method(out, "INVITE")


def test_a_replaces_of_a_call_hung_up_gets_481(tmp_path):
    async def scenario(nodes, sent):
        n, = nodes
        _, ok, _ = await answered_call(n, sent)
        n.on_message(in_dialog("BYE", 2, CALL_ID, "a1", ok.to.tag, "z9hG4bKbye2"), *UDP)
        await settled(n)
        sent[n].clear()
        _, invite = transferee_invite(f"{CALL_ID};to-tag={ok.to.tag};from-tag=a1")
        n.on_message(invite, *UDP)
        await settled(n)
        return sent[n]

    out = with_nodes(tmp_path, 1, scenario)
    assert [m.status for m in out] == [481] and not of_method(out, "INVITE")


def test_a_dialog_not_through_us_is_named_as_it_came(tmp_path):
    """No stamp of ours: the dialog may be beyond the trunk, which gets the
    INVITE as for any call to that user."""
    _, _, out = transfer(tmp_path, lambda ok, b: "abc@elsewhere;to-tag=1;from-tag=2")
    invite, = of_method(out, "INVITE")
    assert invite.uri == "sip:carol@127.0.0.1:5998" and invite.get("Replaces") == "abc@elsewhere;to-tag=1;from-tag=2"


def test_a_resumed_call_names_the_replaced_dialog_again(tmp_path):
    """The node that took the transferee's INVITE dies before its 100; at
    the partner the INVITE goes again, the same as the first: to the
    callee of the replaced dialog, with its Replaces."""
    async def scenario(nodes, sent):
        owner, partner = nodes
        _, ok, b_invite = await answered_call(owner, sent)
        sent[owner].clear()
        bekey, invite = transferee_invite(f"{CALL_ID};to-tag={ok.to.tag};from-tag=a1")
        owner.on_message(invite, *UDP)
        await settled(owner)
        first, = of_method(sent[owner], "INVITE")
        owner.tx.close()
        again = invite.to_bytes().replace(b"owner=node1;partner=node2", b"owner=node2;partner=")
        partner.on_message(parse_message(again), *UDP)
        await settled(partner)
        return first, of_method(sent[partner], "INVITE")

    first, resent = with_nodes(tmp_path, 2, scenario)
    assert [(m.uri, m.call_id, m.top_via.branch, m.get("Replaces")) for m in resent] == \
        [(first.uri, first.call_id, first.top_via.branch, first.get("Replaces"))]
    assert first.uri == "sip:service@127.0.0.1:5998" and first.get("Replaces").split(";")[1] == "to-tag=callee-1"
