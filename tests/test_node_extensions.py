"""node.app: a request that requires an extension the node does not have
(RFC 3261 §8.2.2.3, §20.32: Require is never to be ignored) gets 420 Bad
Extension naming it, as Asterisk and FreeSWITCH answer, instead of a call
in which the caller counts on something nobody does (a Replaces that
replaces nothing, a security agreement (RFC 3329) nobody makes)."""
from __future__ import annotations

import pytest

from nodekit import (CALL_ID, UDP, answered_call, caller_invite, in_dialog, of_method, of_status, register,
                     settled, with_headers, with_nodes)
from sipcore.bekey import bekey_of
from sipcore.message import make_response

pytestmark = pytest.mark.e2e


def test_an_invite_requiring_an_unknown_extension_gets_420_and_goes_nowhere(tmp_path):
    async def scenario(nodes, sent):
        n, = nodes
        bekey = bekey_of(CALL_ID)
        n.on_message(with_headers(caller_invite(bekey), [("Require", "100rel, sec-agree"), ("Require", "timer, x-Foo")]), *UDP)
        await settled(n)
        return sent[n], await n.store.load(bekey, [])

    out, left = with_nodes(tmp_path, 1, scenario)
    bad, = of_status(out, 420)
    assert bad.reason == "Bad Extension" and bad.get("Unsupported") == "sec-agree, x-Foo"
    assert bad.to.tag and bad.call_id == CALL_ID
    assert not of_method(out, "INVITE") and not of_status(out, 100)
    assert left == (None, "missing")


def test_in_a_dialog_too_but_never_for_ack_or_cancel(tmp_path):
    async def scenario(nodes, sent):
        n, = nodes
        bekey, ok, b_invite = await answered_call(n, sent)
        update = in_dialog("UPDATE", 2, CALL_ID, "a1", ok.to.tag, "z9hG4bKupd2")
        n.on_message(with_headers(update, [("Require", "sec-agree")]), *UDP)
        ack = in_dialog("ACK", 1, CALL_ID, "a1", ok.to.tag, "z9hG4bKack1")
        n.on_message(with_headers(ack, [("Require", "sec-agree")]), *UDP)
        await settled(n)
        return b_invite, sent[n]

    b_invite, out = with_nodes(tmp_path, 1, scenario)
    bad, = of_status(out, 420)
    assert bad.cseq == (2, "UPDATE") and bad.get("Unsupported") == "sec-agree" and not of_method(out, "UPDATE")
    acks = of_method(out, "ACK")
    assert len(acks) == 1 and acks[0].call_id == b_invite.call_id     # the ACK went on to the callee


def test_a_register_may_require_path(tmp_path):
    async def scenario(nodes, sent):
        n, = nodes
        n.on_message(with_headers(register("carol", ["<sip:carol@192.0.2.60:5060>"]), [("Require", "path")]), *UDP)
        await settled(n)
        return sent[n]

    assert [m.status for m in with_nodes(tmp_path, 1, scenario)] == [200]


def test_preconditions_go_to_the_callee_and_back_on_one_line_each(tmp_path):
    """Require: precondition (RFC 3312) is taken and carried: the B-leg
    INVITE says each of Supported and Require on one line (phones and
    SIPp read the first only), and the callee's reliable 183 that uses
    preconditions reaches the caller saying so, with 100rel, on one."""
    async def scenario(nodes, sent):
        n, = nodes
        bekey = bekey_of(CALL_ID)
        n.on_message(with_headers(caller_invite(bekey), [("Supported", "100rel, precondition, timer"),
                                                          ("Require", "100rel"), ("Require", "precondition")]), *UDP)
        await settled(n)
        b_invite, = of_method(sent[n], "INVITE")
        progress = make_response(b_invite, 183, "Session Progress", to_tag="callee-1",
                                 headers=[("Contact", "<sip:service@127.0.0.1:5998>"),
                                          ("Require", "100rel, precondition"), ("RSeq", "7")])
        await n.on_invite_response(bekey, b_invite.top_via.branch, progress)
        return b_invite, of_status(sent[n], 183)

    b_invite, (relayed,) = with_nodes(tmp_path, 1, scenario)
    def lines(msg, name):
        return [f.value for f in msg.fields if f.name == name]
    assert lines(b_invite, "Require") == ["precondition, 100rel"]
    assert [set(v.split(", ")) for v in lines(b_invite, "Supported")] == [{"precondition", "timer", "100rel", "replaces"}]
    assert lines(relayed, "Require") == ["100rel, precondition"] and relayed.get("RSeq") == "7"
