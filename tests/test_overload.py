"""Overload: while the proxy's UDP receive queue backs up, a share of new
INVITEs gets 503 (cheaply, from the bytes) and everything of the calls in
progress is still relayed. The wait is measured on a real socket; the
proxy is driven with datagrams and its sends are captured."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

from proxy.server import Proxy
from proxy.workers import WorkerLink, WorkerRole
from sipcore.config import load_config
from sipcore.message import parse_message
from sipcore.overload import OverloadGuard, RecentCalls
from sipcore.transport import SipTransport

PHONE = ("192.0.2.50", 5070)
NODE = ("127.0.0.1", 7001)


def test_the_transport_measures_how_long_a_datagram_waited_in_the_queue():
    async def go():
        t = SipTransport(lambda *a: None)
        await t.listen("127.0.0.1", 0, tcp=False)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            assert t.measure_wait()
            tx.sendto(b"\r\n\r\n", t.local)           # stamping is switched on in the background
            await asyncio.sleep(0.1)
            t.wait_wanted = True
            tx.sendto(b"\r\n\r\n", t.local)
            time.sleep(0.08)                              # the proxy busy with something else
            await asyncio.sleep(0.02)
            assert 0.07 < t.last_wait < 1 and not t.wait_wanted
            t.last_wait = None
            tx.sendto(b"\r\n\r\n", t.local)           # not asked: not measured
            await asyncio.sleep(0.02)
            assert t.last_wait is None
        finally:
            tx.close()
            await t.close()
    asyncio.run(go())


def test_a_standing_wait_starts_refusals_in_proportion_and_a_calm_second_ends_them():
    g = OverloadGuard(0.04)
    assert g.sample(0.1, now=100.0) is None and g.share == 0         # a burst, so far
    assert g.sample(0.1, now=100.3) is None and g.share == 0
    assert g.sample(0.1, now=100.5) == "start" and g.share == 1 and g.active   # still there after T1
    assert g.sample(0.06, now=100.6) is None and g.share == pytest.approx(0.5)
    assert g.sample(0.03, now=100.7) is None and g.share == 0 and g.active     # under the threshold
    assert g.sample(0.01, now=100.8) is None and g.active                      # under half of it
    assert g.sample(0.05, now=101.0) is None and g.active                      # not for a second
    assert g.sample(None, now=101.1) is None and g.active                      # nothing waiting
    assert g.sample(0.01, now=102.1) == "end" and not g.active and g.share == 0


def test_a_burst_that_clears_within_the_hold_refuses_nothing():
    g = OverloadGuard(0.04)
    for n in range(40):                                  # 0.4 s of a long wait, then none
        assert g.sample(0.2, now=200.0 + n / 100) is None and g.share == 0
    assert g.sample(0.0, now=200.45) is None and g.sample(0.2, now=200.6) is None
    assert g.share == 0 and not g.active


def invite(to_tag="", method="INVITE", cseq="1 INVITE", extra=""):
    to = "<sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else "")
    return (f"{method} sip:bob@example.com SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {PHONE[0]}:{PHONE[1]};branch=z9hG4bKov1;rport\r\n"
            f"Via: SIP/2.0/UDP 198.51.100.7;branch=z9hG4bKup\r\n"
            f"Max-Forwards: 70\r\nFrom: \"Alice\" <sip:alice@example.com>;tag=a1\r\nTo: {to}\r\n"
            f"Call-ID: ov-1@example.com\r\nCSeq: {cseq}\r\nContact: <sip:alice@{PHONE[0]}:{PHONE[1]}>\r\n"
            f"{extra}Content-Length: 0\r\n\r\n").encode()


async def overloaded_proxy() -> Proxy:
    cfg = load_config(None, overrides={"proxy.listen": "127.0.0.1:0", "proxy.admin": "off",
                                       "health.probe": False},
                      nodes=[f"node1={NODE[0]}:{NODE[1]}"])
    p = Proxy(cfg)
    await p.start()
    p.sent = []
    p.transport.send = lambda data, dest, tr="udp": p.sent.append((data, dest))
    p.refuse_share = 1.0            # as the guard sets it with the queue at twice its threshold (no await
                                    # follows before the test is done, so its 10 ms timer cannot reset it)
    return p


def test_new_invites_get_503_and_the_ack_to_it_ends_at_the_proxy():
    async def go():
        answers = []
        for transport in ("udp", "tcp"):       # from the bytes; through the full path
            p = await overloaded_proxy()
            if transport == "udp":
                p.transport._received(invite(), PHONE, "udp", datagram=True)
            else:
                p.on_message(parse_message(invite()), PHONE, "tcp")
            (data, dest), = p.sent
            resp = parse_message(data)
            assert dest == PHONE and resp.status == 503 and resp.get("Retry-After") == "2"
            assert [v.branch for v in resp.vias] == ["z9hG4bKov1", "z9hG4bKup"]
            assert resp.from_.tag == "a1" and resp.call_id == "ov-1@example.com" and resp.cseq == (1, "INVITE")
            assert resp.to.tag == p.reply_tag
            assert p.stats.get("requests", "INVITE", "overload") == 1
            answers.append((resp.status, resp.reason, resp.to.raw, resp.get("From")))
            # the caller's ACK to the 503 (RFC 3261 §17.1.1.3) is not sent on to a node
            ack = invite(p.reply_tag, "ACK", "1 ACK")
            if transport == "udp":
                p.transport._received(ack, PHONE, "udp", datagram=True)
            else:
                p.on_message(parse_message(ack), PHONE, "tcp")
            assert len(p.sent) == 1
            await p.close()
        assert answers[0] == answers[1]      # the cheap refusal says what the full path says
    asyncio.run(go())


def test_calls_in_progress_and_calls_from_the_nodes_go_on():
    async def go():
        p = await overloaded_proxy()
        p.transport._received(invite("b2", "BYE", "2 BYE"), PHONE, "udp", datagram=True)
        p.transport._received(invite("b2", "ACK", "1 ACK"), PHONE, "udp", datagram=True)
        p.transport._received(invite("b2", "INVITE", "3 INVITE"), PHONE, "udp", datagram=True)   # re-INVITE
        assert [dest for _, dest in p.sent] == [NODE] * 3
        p.sent.clear()
        # a B-leg INVITE from a node: the call was already taken on
        p.transport._received(invite(extra=f"Route: <sip:{PHONE[0]}:{PHONE[1]};lr>\r\n")
                              .replace(f"{PHONE[0]}:{PHONE[1]};branch".encode(), f"{NODE[0]}:{NODE[1]};branch".encode()),
                              NODE, "udp", datagram=True)
        assert [dest for _, dest in p.sent] == [PHONE]
        assert parse_message(p.sent[0][0]).method == "INVITE"
        assert p.stats.get("requests", "INVITE", "overload") == 0
        await p.close()
    asyncio.run(go())


def test_no_invite_is_refused_while_the_queue_is_short():
    async def go():
        p = await overloaded_proxy()
        p.refuse_share = 0.0
        p.transport._received(invite(), PHONE, "udp", datagram=True)
        assert [dest for _, dest in p.sent] == [NODE]
        await p.close()
    asyncio.run(go())


def test_a_retransmitted_invite_of_a_call_let_through_is_never_refused():
    """Seen in the HA benchmark: callers retransmit most when the proxy is
    slowest, and a 503 to the retransmission of an INVITE the node already
    has ended a call whose callee was ringing."""
    async def go():
        p = await overloaded_proxy()
        p.refuse_share = 0.0
        p.transport._received(invite(), PHONE, "udp", datagram=True)
        p.refuse_share = 1.0
        p.transport._received(invite(), PHONE, "udp", datagram=True)            # its retransmission
        p.on_message(parse_message(invite()), PHONE, "tcp")                     # the same call over TCP
        p.transport._received(invite().replace(b"ov-1@", b"ov-2@"), PHONE, "udp", datagram=True)   # a new one
        assert [dest for _, dest in p.sent] == [NODE, NODE, NODE, PHONE]
        assert parse_message(p.sent[3][0]).status == 503
        assert p.stats.get("requests", "INVITE", "overload") == 1
        await p.close()
    asyncio.run(go())


def register(cseq=1, call_id="reg-1@example.com"):
    return (f"REGISTER sip:example.com SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {PHONE[0]}:{PHONE[1]};branch=z9hG4bKrg{cseq};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=r1\r\nTo: <sip:alice@example.com>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:alice@{PHONE[0]}:{PHONE[1]}>\r\n"
            f"Expires: 300\r\nContent-Length: 0\r\n\r\n").encode()


def test_a_registration_avalanche_is_shed_like_a_call_flood_but_not_what_was_let_in():
    """Phones re-registering all at once after an outage overload as surely
    as calls do (seen in the benchmark: 1000 REGISTER pairs/s on 2 nodes
    collapsed into 30,000 retransmissions with nothing refused). A new
    REGISTER gets 503 as a new INVITE does; the retransmission of one let
    through does not, nor what follows it in its Call-ID (its retry with
    credentials after a 401, or its un-REGISTER: refusing those wastes the
    work done for the first); in-dialog requests go on."""
    async def go():
        p = await overloaded_proxy()
        p.refuse_share = 0.0
        p.transport._received(register(1), PHONE, "udp", datagram=True)          # let through
        p.refuse_share = 1.0
        p.transport._received(register(1), PHONE, "udp", datagram=True)          # its retransmission
        p.on_message(parse_message(register(2)), PHONE, "tcp")                   # what follows it
        p.transport._received(register(1, "reg-2@example.com"), PHONE, "udp", datagram=True)   # a new phone
        p.on_message(parse_message(register(1, "reg-3@example.com")), PHONE, "tcp")             # another
        p.transport._received(invite("b2", "BYE", "2 BYE"), PHONE, "udp", datagram=True)   # a call it has
        assert [dest for _, dest in p.sent] == [NODE, NODE, NODE, PHONE, PHONE, NODE]
        refusals = [parse_message(p.sent[i][0]) for i in (3, 4)]
        assert [(r.status, r.call_id, r.get("Retry-After")) for r in refusals] == [
            (503, "reg-2@example.com", "2"), (503, "reg-3@example.com", "2")]
        # the UDP one was written from the bytes, the TCP one by the full path: the same answer
        udp, tcp = ((r.reason, r.to.raw, r.get("From"), r.cseq, r.get("Server"), [v.branch for v in r.vias])
                    for r in refusals)
        assert udp == tcp and udp[3] == (1, "REGISTER")
        assert p.stats.get("requests", "REGISTER", "overload") == 2
        await p.close()
    asyncio.run(go())


def test_the_calls_let_through_are_remembered_for_timer_b_and_no_more_than_the_limit():
    recent = RecentCalls(ttl=32.0, limit=3)
    t = time.monotonic()
    recent.add("a", now=t)
    recent.add("b", now=t + 1)
    assert "a" in recent and "b" in recent and "c" not in recent
    for n, cid in enumerate("cdef"):
        recent.add(cid, now=t + 2 + n)
    assert len(recent) == 3 and "a" not in recent and list(recent.seen.entries) == ["d", "e", "f"]
    recent.add("g", now=t + 40)        # d, e expired: forgotten a few per addition
    recent.add("h", now=t + 40)
    assert list(recent.seen.entries) == ["g", "h"]
    recent.add("g", now=t + 41)        # seen again: its time starts over
    assert list(recent.seen.entries) == ["h", "g"] and recent.seen.entries["g"][0] == t + 73
    recent.seen.entries["h"][0] = time.monotonic() - 0.001
    assert "h" not in recent           # expired, even before it is forgotten


def test_floods_and_scanners_get_no_answer_even_while_overloaded():
    """An answer is what a flood or a scanner wants: the flood limit and the
    scanner filter come before the refusal."""
    async def go():
        p = await overloaded_proxy()
        p.transport._received(invite(extra="User-Agent: friendly-scanner\r\n"), PHONE, "udp", datagram=True)
        assert p.sent == [] and p.stats.get("events", "scanner_dropped") == 1
        p.limiter.rate, p.limiter.burst = 1.0, 1.0            # one request, then banned
        for _ in range(3):
            p.transport._received(invite(), PHONE, "udp", datagram=True)
        assert len(p.sent) == 1 and p.sent[0][0].startswith(b"SIP/2.0 503 ")
        assert p.stats.get("events", "rate_limited") == 2
        await p.close()
    asyncio.run(go())


def test_queue_waits_are_a_histogram_and_workers_report_theirs_and_their_overload():
    """sipha_proxy_queue_wait_seconds: the wait of the datagram sampled every
    10 ms, for operators to see how close the proxy runs to the guard; with
    several workers, worker 0's /metrics and /status add the others'."""
    async def go():
        p0, p1 = await overloaded_proxy(), await overloaded_proxy()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        b.setblocking(False)                    # as WorkerLink.start() sets it
        try:
            for p, wait in ((p0, 0.003), (p1, 0.05)):
                t, _ = p.guards[0]
                t.last_wait = wait
                p._watch_overload()
                t.last_wait = None              # nothing read in the next 10 ms: nothing observed
                p._watch_overload()
                assert p.queue_wait.count == 1
            p1.overloaded = True
            w0, w1 = WorkerLink(WorkerRole(0, 2, None, [b]), p0), WorkerLink(WorkerRole(1, 2, None, [a]), p1)
            p0.link = w0
            w1._send_stats()
            w0._receive(b)
            wait, = [h for h in w0.histograms() if h.name == "sipha_proxy_queue_wait_seconds"]
            assert wait.count == 2 and wait.sum == pytest.approx(0.053)
            _, text = await p0.metrics()
            assert 'sipha_proxy_queue_wait_seconds_bucket{le="0.005"} 1.0' in text
            assert 'sipha_proxy_queue_wait_seconds_bucket{le="0.08"} 2.0' in text
            assert "sipha_proxy_overloaded 1.0" in text and (await p0.status())["overloaded"] is True
        finally:
            a.close()
            b.close()
            p0.link = None
            for p in (p0, p1):
                await p.close()
    asyncio.run(go())


def test_a_node_falling_behind_refuses_new_calls_and_registrations_but_not_a_call_it_has():
    """The nodes watch their own queue as the proxy does (with the nodes on
    their own machines the proxy may have room while a node drowns)."""
    from node.app import Node

    async def go():
        cfg = load_config(None, overrides={"node.admin": "off"},
                          nodes=["node1=127.0.0.1:0,redis://127.0.0.1:1/0", "node2=127.0.0.1:7002,redis://127.0.0.1:2/0"])
        n = Node(cfg, "node1")
        await n.transport.listen("127.0.0.1", 0)
        assert n.transport.measure_wait()
        n.guard = OverloadGuard(cfg["limits.overload_delay"])
        sent = []
        n.tx._send = lambda data, dest: sent.append(data)
        n.spawn = lambda bekey, coro, req=None: coro.close()      # what a call would do next: not here
        try:
            first = invite().replace(b"ov-1@", b"ov-7@")
            n.transport._received(first, NODE, "udp", datagram=True)        # before: taken on
            n.transport._received(register(1, "reg-9@x"), NODE, "udp", datagram=True)
            assert sent == []
            n.guard.share = 1.0                                               # now it is behind
            n.transport._received(first, NODE, "udp", datagram=True)        # a retransmission: not refused
            n.transport._received(invite("b2", "BYE", "2 BYE"), NODE, "udp", datagram=True)   # a call it has
            n.transport._received(register(2, "reg-9@x"), NODE, "udp", datagram=True)  # what follows it
            assert sent == []
            n.transport._received(invite(), NODE, "udp", datagram=True)     # a new call
            n.transport._received(register(), NODE, "udp", datagram=True)   # a new registration
            assert [parse_message(d).cseq for d in sent] == [(1, "INVITE"), (1, "REGISTER")]
            for resp in map(parse_message, sent):
                assert resp.status == 503 and resp.reason == "Service Unavailable (overloaded)"
                assert resp.get("Retry-After") == "2"
            assert n.stats.get("overload_rejections") == 2
        finally:
            await n.transport.close()
            await n.store.close()
    asyncio.run(go())
