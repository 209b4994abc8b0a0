"""node.app: a request that requires an extension the node does not have
(RFC 3261 §8.2.2.3, §20.32: Require is never to be ignored) gets 420 Bad
Extension naming it, as Asterisk and FreeSWITCH answer, instead of a call
in which the caller counts on something nobody does (a Replaces that
replaces nothing, resource preconditions nobody reserves)."""
from __future__ import annotations

import pytest

from nodekit import (CALL_ID, UDP, answered_call, caller_invite, in_dialog, of_method, of_status, register,
                     settled, with_headers, with_nodes)
from sipcore.bekey import bekey_of

pytestmark = pytest.mark.e2e


def test_an_invite_requiring_an_unknown_extension_gets_420_and_goes_nowhere(tmp_path):
    async def scenario(nodes, sent):
        n, = nodes
        bekey = bekey_of(CALL_ID)
        n.on_message(with_headers(caller_invite(bekey), [("Require", "100rel, precondition"), ("Require", "timer, x-Foo")]), *UDP)
        await settled(n)
        return sent[n], await n.store.load(bekey, [])

    out, left = with_nodes(tmp_path, 1, scenario)
    bad, = of_status(out, 420)
    assert bad.reason == "Bad Extension" and bad.get("Unsupported") == "precondition, x-Foo"
    assert bad.to.tag and bad.call_id == CALL_ID
    assert not of_method(out, "INVITE") and not of_status(out, 100)
    assert left == (None, "missing")


def test_in_a_dialog_too_but_never_for_ack_or_cancel(tmp_path):
    async def scenario(nodes, sent):
        n, = nodes
        bekey, ok, b_invite = await answered_call(n, sent)
        update = in_dialog("UPDATE", 2, CALL_ID, "a1", ok.to.tag, "z9hG4bKupd2")
        n.on_message(with_headers(update, [("Require", "precondition")]), *UDP)
        ack = in_dialog("ACK", 1, CALL_ID, "a1", ok.to.tag, "z9hG4bKack1")
        n.on_message(with_headers(ack, [("Require", "precondition")]), *UDP)
        await settled(n)
        return b_invite, sent[n]

    b_invite, out = with_nodes(tmp_path, 1, scenario)
    bad, = of_status(out, 420)
    assert bad.cseq == (2, "UPDATE") and bad.get("Unsupported") == "precondition" and not of_method(out, "UPDATE")
    acks = of_method(out, "ACK")
    assert len(acks) == 1 and acks[0].call_id == b_invite.call_id     # the ACK went on to the callee


def test_a_register_may_require_path(tmp_path):
    async def scenario(nodes, sent):
        n, = nodes
        n.on_message(with_headers(register("carol", ["<sip:carol@192.0.2.60:5060>"]), [("Require", "path")]), *UDP)
        await settled(n)
        return sent[n]

    assert [m.status for m in with_nodes(tmp_path, 1, scenario)] == [200]
