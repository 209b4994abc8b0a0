"""node.app, two nodes in one process against two real redis-servers: a
call whose owner saved the callee's answer and died before the caller had
it is finished by the partner when the callee sends its 2xx again."""
from __future__ import annotations

import asyncio

import pytest

from node.app import Node
from sipcore.bekey import ROUTE_HEADER, bekey_of
from sipcore.config import load_config
from sipcore.message import make_response, parse_message
from procs import start_redis
from sipha.sipp import free_port

pytestmark = pytest.mark.e2e

PROXY = "127.0.0.1:5999"
CALL_ID = "hang-1@192.0.2.50"


def caller_invite(bekey: str) -> bytes:
    return (f"INVITE sip:service@{PROXY} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {PROXY};branch=z9hG4bKsphproxy1\r\n"
            f"Via: SIP/2.0/UDP 192.0.2.50:5070;branch=z9hG4bKcaller1;rport=5070;received=192.0.2.50\r\n"
            f"Record-Route: <sip:{PROXY};lr;flow=udp:192.0.2.50:5070>\r\n"
            f"Max-Forwards: 69\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:service@example.com>\r\n"
            f"Call-ID: {CALL_ID}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@192.0.2.50:5070>\r\n"
            f"{ROUTE_HEADER}: bekey={bekey};owner=node1;partner=node2;reason=owner\r\n"
            f"Content-Length: 0\r\n\r\n").encode()


def test_the_partner_relays_a_saved_answer_the_dead_owner_may_not_have_sent(tmp_path):
    """Seen in a node killed under load: the owner saved the confirmed call
    (replica on its partner) and died before relaying the 2xx, so the
    caller, which had its 100 Trying, waited forever while the partner
    ACKed the callee's 2xx retransmission and relayed nothing."""
    ports = [free_port(), free_port()]
    redis = []
    for i, port in enumerate(ports):
        (tmp_path / str(i)).mkdir()
        redis.append(start_redis(port, tmp_path / str(i)))

    async def go():
        cfg = load_config(None, overrides={"node.admin": "off", "node.upstream": "sip:service@127.0.0.1:5998",
                                           "proxy.internal": PROXY},
                          nodes=[f"node1=127.0.0.1:7001,redis://127.0.0.1:{ports[0]}/0",
                                 f"node2=127.0.0.1:7002,redis://127.0.0.1:{ports[1]}/0"])
        owner, partner = Node(cfg, "node1"), Node(cfg, "node2")
        sent = {owner: [], partner: []}
        for n in (owner, partner):
            n.tx._send = lambda data, dest, n=n: sent[n].append(parse_message(data))
        try:
            bekey = bekey_of(CALL_ID)
            await owner.new_call(parse_message(caller_invite(bekey)), bekey)
            b_invite, = [m for m in sent[owner] if getattr(m, "method", None) == "INVITE"]
            answer = make_response(b_invite, 200, "OK", to_tag="callee-1",
                                   headers=[("Contact", "<sip:service@127.0.0.1:5998>")])
            await owner.on_invite_response(bekey, b_invite.top_via.branch, answer)   # saved, then relayed...
            assert any(getattr(m, "status", None) == 200 for m in sent[owner])
            # ... or not: the owner dies here, and the caller never had it.
            await partner.stray_2xx(bekey, answer)          # the callee sends its 2xx again
            return sent[partner]
        finally:
            for n in (owner, partner):
                n.tx.close()
                await n.store.close()

    try:
        out = asyncio.run(go())
    finally:
        for p in redis:
            p.kill()
            p.wait()
    to_caller = [m for m in out if getattr(m, "status", None) == 200 and m.call_id == CALL_ID]
    acks = [m for m in out if getattr(m, "method", None) == "ACK"]
    assert to_caller and to_caller[0].to.tag and to_caller[0].cseq == (1, "INVITE")
    assert [v.branch for v in to_caller[0].vias] == ["z9hG4bKsphproxy1", "z9hG4bKcaller1"]
    assert len(acks) == 1 and acks[0].call_id != CALL_ID            # and the callee its ACK


def test_the_caller_hears_trying_only_once_its_call_has_gone_on_to_the_callee(tmp_path):
    """Seen in a node killed under load: the node saved the call, sent the
    caller its 100 Trying and died before the B-leg INVITE went out; the
    caller, told Trying, never retransmitted, and nobody ever called the
    callee. The 100 now follows the B-leg INVITE, so a node that dies
    before it leaves the caller retransmitting to the partner."""
    port = free_port()
    redis = start_redis(port, tmp_path)

    async def go():
        cfg = load_config(None, overrides={"node.admin": "off", "node.upstream": "sip:service@127.0.0.1:5998",
                                           "proxy.internal": PROXY},
                          nodes=[f"node1=127.0.0.1:7001,redis://127.0.0.1:{port}/0"])
        n = Node(cfg, "node1")
        sent = []
        n.tx._send = lambda data, dest: sent.append(parse_message(data))
        try:
            bekey = bekey_of(CALL_ID)
            await n.new_call(parse_message(caller_invite(bekey).replace(b";partner=node2", b";partner=")), bekey)
            return [getattr(m, "method", None) or m.status for m in sent]
        finally:
            n.tx.close()
            await n.store.close()

    try:
        order = asyncio.run(go())
    finally:
        redis.kill()
        redis.wait()
    assert order == ["INVITE", 100]
