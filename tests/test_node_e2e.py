"""Nodes end to end: SIPp caller -> proxy -> node (B2BUA, Redis) -> proxy ->
SIPp trunk, with the Redis keyspaces checked against the design."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import urllib.request
import uuid

import pytest

from clusterkit import all_keys, assert_replicas_where_design_says, busiest, logged, owner_in_rank, run, uac
from node.store import PEER_BACKOFF
from sipcore.bekey import bekey_of, make_stamp, rank
from sipcore.headers import hostport
from sipcore.message import parse_message
from sipcore.logfmt import parse_logfmt
from sipha.cluster import Cluster
from sipha.logs import merged
from sipha.sipp import free_port, read_stats

pytestmark = pytest.mark.e2e


def callee_counts(c, scenario: str, calls: int) -> tuple[str, str]:
    """-> (successful, failed) calls of the cluster's SIPp trunk running
    `scenario`, once it counted `calls` (SIPp writes its statistics each
    second; a call ends 2 s after its BYE, in timewait)."""
    trunk = str(next((c.dir / "logs").glob(f"{scenario}-*.csv")))
    deadline = time.monotonic() + 10
    while int((stats := read_stats(trunk)).get("SuccessfulCall(C)", 0)) + int(stats.get("FailedCall(C)", 0)) < calls:
        assert time.monotonic() < deadline, stats
        time.sleep(0.5)
    return stats["SuccessfulCall(C)"], stats["FailedCall(C)"]


def test_call_keys_are_active_on_owner_replica_on_partner_and_gone_after_bye(make_cluster):
    c = make_cluster()

    async def scenario():
        s = uac(c, calls=8, rate=8, hold_ms=4000)
        await s.start()
        await asyncio.sleep(2.5)
        snap, n_active = assert_replicas_where_design_says(c)
        return await s.wait(60), n_active

    result, n_active = run(scenario())
    assert result.ok == 8 and result.failed == 0, result.log_tail
    assert n_active == 8
    for spaces in all_keys(c).values():
        assert spaces == {"active": {}, "replica": {}}
    # one call record each: answered, talked the 4 s SIPp held it, ended by the caller
    records = c.call_records(8)
    assert len(records) == 8 and len({r["call_id"] for r in records}) == 8
    for r in records:
        assert (r["status"], r["ended_by"], r["to"]) == ("200", "caller", f"sip:service@{hostport(c.proxy_addr)}")
        assert r["callee"].startswith(f"sip:127.0.0.1:{c.state['trunk']['port']};")     # the answering Contact
        assert 3.9 <= float(r["duration_s"]) <= 6 and 0 <= float(r["setup_s"]) < 1
        assert r["from"].startswith("sip:sipp@") and r["started"].endswith("Z")


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_reinvite_is_relayed_to_the_callee(make_cluster, transport):
    c = make_cluster(nodes=2)
    result = run(uac(c, "reinvite", calls=10, rate=10, hold_ms=500, transport=transport).run(60))
    assert result.ok == 10 and result.failed == 0, result.log_tail


def test_cancel_reaches_the_callee_and_caller_gets_487(make_cluster):
    c = make_cluster(nodes=2, trunk_scenario="uas_ring")
    result = run(uac(c, "cancel", calls=10, rate=10).run(60))
    assert result.ok == 10 and result.failed == 0, result.log_tail
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(c).values())
    assert [(r["status"], r["ended_by"], r["duration_s"]) for r in c.call_records(10)] == [("487", "caller", "0")] * 10


def test_bye_from_the_callee_reaches_the_caller(make_cluster):
    c = make_cluster(nodes=2, trunk_scenario="uas_hangup")
    result = run(uac(c, "uac_wait_bye", calls=10, rate=10, hold_ms=500).run(60))
    assert result.ok == 10 and result.failed == 0, result.log_tail
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(c).values())


def test_register_and_unregister(make_cluster):
    c = make_cluster(nodes=2)
    result = run(uac(c, "register", calls=5, rate=10, service="alice").run(60))
    assert result.ok == 5 and result.failed == 0, result.log_tail
    logs = "".join((c.dir / "logs" / f"{n}.log").read_text() for n in c.state["nodes"])
    assert logs.count("event=registration_added") == 5
    assert logs.count("event=registration_removed") == 5


def udp_request(addr, text: str, timeout=3.0):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.settimeout(timeout)
        s.sendto(text.replace("PORT", str(port)).encode(), addr)
        while True:
            msg = parse_message(s.recv(65535))
            if getattr(msg, "status", 0) >= 200:
                return msg


def bye(to_tag: str) -> str:
    return ("BYE sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:PORT;branch=z9hG4bK" + uuid.uuid4().hex +
            "\r\nMax-Forwards: 70\r\nFrom: <sip:a@127.0.0.1>;tag=1\r\n"
            f"To: <sip:b@127.0.0.1>;tag={to_tag}\r\nCall-ID: {uuid.uuid4().hex}\r\nCSeq: 5 BYE\r\n"
            "Content-Length: 0\r\n\r\n")


def test_a_call_the_upstream_sends_back_is_a_new_call_and_a_loop_ends_at_max_forwards(tmp_path, monkeypatch):
    """node.upstream pointing back at the cluster (a misrouted trunk, or a
    proxy upstream that hairpins the call): each pass is a new call, with
    a key of its own. It had its B-leg's key, stamped in the Call-ID, so
    the pass overwrote the record of the call before it, whose answer
    then found nothing: the caller never had one. And a B-leg at
    Max-Forwards 70 made the loop endless. Now the caller hears 483 and
    every record of the chain is gone."""
    port = free_port()
    monkeypatch.setenv("SIPHA_NODE_UPSTREAM", f"sip:127.0.0.1:{port}")
    c = Cluster(str(tmp_path / "loop"))
    c.up(nodes=2, port=port, trunk=None)
    try:
        invite = ("INVITE sip:nobody@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:PORT;branch=z9hG4bK"
                  f"{uuid.uuid4().hex}\r\nMax-Forwards: 70\r\nFrom: <sip:a@127.0.0.1>;tag=1\r\n"
                  f"To: <sip:nobody@127.0.0.1>\r\nCall-ID: {uuid.uuid4().hex}\r\nCSeq: 1 INVITE\r\n"
                  "Contact: <sip:a@127.0.0.1:PORT>\r\nContent-Length: 0\r\n\r\n")
        final = udp_request(c.proxy_addr, invite, timeout=10)
        time.sleep(1)                             # the last ACKs and deletes
        logs = "".join((c.dir / "logs" / f"{n}.log").read_text() for n in c.state["nodes"])
        keys = all_keys(c)
    finally:
        c.down()
    assert (final.status, final.reason) == (483, "Too Many Hops")
    created = logs.count("event=dialog_created")
    assert 15 < created < 35 and logs.count('reason="callee 483"') == created
    assert all(s == {"active": {}, "replica": {}} for s in keys.values())


def test_unknown_dialog_gets_481_and_forged_stamp_is_not_trusted(make_cluster):
    c = make_cluster(nodes=2)
    assert udp_request(c.proxy_addr, bye("plain-tag")).status == 481
    forged = make_stamp(b"not-the-cluster-secret", "0123456789abcdef")
    resp = udp_request(c.proxy_addr, bye(forged))
    assert resp.status == 481
    proxy_log = (c.dir / "logs" / "proxy.log").read_text()
    assert "key_from=stamp" not in proxy_log


def test_failover_promotes_the_replica_and_mirrors_it_to_the_new_partner(make_cluster):
    c = make_cluster(nodes=3)

    async def scenario():
        s = uac(c, "reinvite", calls=9, rate=9, hold_ms=3500)
        await s.start()
        await asyncio.sleep(2.0)               # all calls established, first hold
        before = all_keys(c)
        victim = busiest(before)
        moved = set(before[victim]["active"])
        c.kill(victim)
        await asyncio.sleep(4.5)               # re-INVITEs went to the partners
        alive = [n for n in before if n != victim]
        after, _ = assert_replicas_where_design_says(c, alive)
        res = await s.wait(60)
        return res, victim, moved, before, after

    result, victim, moved, before, after = run(scenario())
    assert result.ok == 9 and result.failed == 0, result.log_tail
    assert moved
    for bekey in moved:
        partner = before[victim]["active"][bekey]["p"]
        assert bekey in after[partner]["active"], f"{bekey} not promoted on {partner}"
    logs = "".join((c.dir / "logs" / f"{n}.log").read_text() for n in c.state["nodes"] if n != victim)
    assert logs.count("event=dialog_promoted") >= len(moved)
    # one call record per call, the killed node's calls' by their partners,
    # with the time they talked on both nodes
    records = c.call_records(9)
    assert sorted(r["call_id"] for r in records) == sorted({r["call_id"] for r in records}) and len(records) == 9
    moved_ids = {before[victim]["active"][k]["a"]["cid"] for k in moved}
    for r in records:
        if r["call_id"] in moved_ids:
            assert r["proc"] != victim and float(r["duration_s"]) > 6.5       # 3.5 s + re-INVITE + 3.5 s
    # one command follows that call across proxy and nodes
    bekey = sorted(moved)[0]
    call_id = before[victim]["active"][bekey]["a"]["cid"]
    trace = merged(str(c.dir), call=call_id)
    assert any(f"proc={victim} " in t and "event=dialog_created" in t for t in trace)
    assert any("proc=proxy " in t and "reason=failover" in t for t in trace)
    assert any("event=dialog_promoted" in t for t in trace)
    assert any("proc=proxy " in t and "reason=outbound" in t for t in trace), "B-leg lines missing"
    assert [parse_logfmt(t)["ts"] for t in trace] == sorted(parse_logfmt(t)["ts"] for t in trace)


def kill_busiest_and_restart(c, *, process_only: bool, gap: float, settle: float, inspect=all_keys):
    """9 calls (INVITE, hold 5 s, re-INVITE, hold 5 s, BYE); 2 s in, kill the
    node with the most active dialogs, restart it `gap` s later, and
    `settle` s after that -- once the re-INVITEs are through -- look at the
    keyspaces with `inspect(cluster)`. -> (SIPp result, victim, its dialogs, inspect's answer)."""
    async def scenario():
        s = uac(c, "reinvite", calls=9, rate=9, hold_ms=5000)
        await s.start()
        await asyncio.sleep(2.0)
        before = all_keys(c)
        victim = busiest(before)
        c.kill(victim, process_only=process_only)
        await asyncio.sleep(gap)
        await asyncio.to_thread(c.start_node, victim)
        await asyncio.sleep(settle)
        seen = inspect(c)
        return await s.wait(60), victim, set(before[victim]["active"]), seen
    return run(scenario())


def test_restarted_node_takes_its_dialogs_back(make_cluster):
    c = make_cluster(nodes=3, ramp=1.0)
    result, victim, mine, after = kill_busiest_and_restart(
        c, process_only=False, gap=0.5, settle=5.5,          # ramp done; re-INVITEs arrived
        inspect=lambda cl: assert_replicas_where_design_says(cl)[0])
    assert result.ok == 9 and result.failed == 0, result.log_tail
    assert mine
    assert mine <= set(after[victim]["active"]), "dialogs did not move back home"
    assert all(owner_in_rank(c, k) == victim for k in mine)
    log = (c.dir / "logs" / f"{victim}.log").read_text()
    assert log.count("event=dialog_migrated") >= len(mine)


def test_node_whose_redis_is_down_answers_503_to_probes_and_500_to_requests(make_cluster):
    c = make_cluster(nodes=2, trunk=None)
    c.kill_redis("node1")
    node1 = ("127.0.0.1", c.state["nodes"]["node1"]["sip"])
    deadline = time.monotonic() + 5
    while "event=redis_down" not in (c.dir / "logs" / "node1.log").read_text():
        assert time.monotonic() < deadline, "node1 did not notice its Redis is gone"
        time.sleep(0.1)
    probe = ("OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:PORT;branch=z9hG4bKp1\r\n"
             "Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=p\r\nTo: <sip:127.0.0.1>\r\n"
             "Call-ID: probe-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
    assert udp_request(node1, probe).status == 503
    resp = udp_request(node1, bye("sph-no-such-dialog"))
    assert resp.status == 500 and "dialog store" in resp.reason
    assert "event=redis_error" in (c.dir / "logs" / "node1.log").read_text()
    deadline = time.monotonic() + 5
    while "event=node_down node=node1" not in (c.dir / "logs" / "proxy.log").read_text():
        assert time.monotonic() < deadline, "the proxy kept node1 in the ring"
        time.sleep(0.1)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_info_update_and_options_in_dialog_are_relayed(make_cluster, transport):
    c = make_cluster(nodes=2)
    result = run(uac(c, "indialog", calls=5, rate=10, transport=transport).run(60))
    assert result.ok == 5 and result.failed == 0, result.log_tail
    trunk_stats = (c.dir / "logs").glob("uas-*.csv")
    assert list(trunk_stats)
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(c).values())


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_delayed_offer_is_answered_in_the_relayed_ack(make_cluster, transport):
    """INVITE without SDP (as many PBXes send it): the callee's 200 brings
    the offer, the caller's ACK the answer, which the node must relay
    (uas_delayed_offer.xml fails a call whose ACK has no SDP)."""
    c = make_cluster(nodes=2, trunk_scenario="uas_delayed_offer")
    result = run(uac(c, "uac_delayed_offer", calls=5, rate=10, transport=transport).run(60))
    assert result.ok == 5 and result.failed == 0, result.log_tail
    assert callee_counts(c, "uas_delayed_offer", 5) == ("5", "0")


def test_busy_callee_486_reaches_the_caller_and_the_dialog_is_gone(make_cluster):
    c = make_cluster(nodes=2, trunk_scenario="uas_busy")
    result = run(uac(c, "uac_busy", calls=5, rate=10).run(60))
    assert result.ok == 5 and result.failed == 0, result.log_tail
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(c).values())
    logs = "".join((c.dir / "logs" / f"{n}.log").read_text() for n in c.state["nodes"])
    assert logs.count('reason="callee 486"') == 5
    assert [(r["status"], r["ended_by"]) for r in c.call_records(5)] == [("486", "callee")] * 5


def test_a_call_with_no_request_for_the_dialog_ttl_is_hung_up_on_both_sides(make_cluster, monkeypatch):
    """node.dialog_ttl (3 s here, 12 h by default): two phones that say
    nothing after the ACK (no BYE, no session refresh) each get a BYE from
    the node, and the call gets one call record, ended_by=timeout."""
    monkeypatch.setenv("SIPHA_NODE_DIALOG_TTL", "3")
    c = make_cluster(nodes=2)
    result = run(uac(c, "uac_wait_bye", calls=5, rate=10).run(60))
    assert result.ok == 5 and result.failed == 0, result.log_tail
    assert callee_counts(c, "uas", 5) == ("5", "0")
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(c).values())
    assert [(r["status"], r["ended_by"]) for r in c.call_records(5)] == [("200", "timeout")] * 5
    assert all(3 <= float(r["duration_s"]) < 6 for r in c.call_records())


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_callee_that_only_rings_is_cancelled_at_timer_c(make_cluster, monkeypatch, transport):
    """A phone that rings and is never picked up: after node.invite_timeout
    from its 180 the node CANCELs it (the SIPp callee takes the CANCEL and
    says 487) and the caller hears 408; nothing is left in Redis."""
    monkeypatch.setenv("SIPHA_NODE_INVITE_TIMEOUT", "2")
    c = make_cluster(nodes=2, trunk_scenario="uas_ring")
    result = run(uac(c, "uac_noanswer", calls=4, rate=4, transport=transport).run(30))
    assert result.ok == 4 and result.failed == 0, result.log_tail
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(c).values())
    logs = "".join((c.dir / "logs" / f"{n}.log").read_text() for n in c.state["nodes"])
    assert logs.count("event=fork_timeout") == 4 and logs.count('reason="callee 408"') == 4


def fail_busiest_while_calls_wait(c, caller: str, fail, after: float, hold_ms=None):
    """Six SIPp calls of `caller`; `after` seconds in (every call waits
    for the callee), `fail(node)` on the node that holds the most ->
    (SIPp's result, that node, the BEKeys it held)."""
    async def scenario():
        s = uac(c, caller, calls=6, rate=6, hold_ms=hold_ms)
        await s.start()
        await asyncio.sleep(after)
        before = all_keys(c)
        victim = busiest(before)
        fail(victim)
        return await s.wait(30), victim, set(before[victim]["active"])
    return run(scenario())


@pytest.mark.parametrize("caller, callee, hold_ms, ending, kill_at, timer_c", [
    ("uac_busy", "uas_busy_late", None, 'reason="callee 486"', 1.5, None),   # the callee says 486 at ~3 s
    ("cancel", "uas_ring", 2500, "reason=cancelled", 1.5, None),              # the caller cancels at ~2.5 s
    # re-INVITEs at ~1-2 s, answered at ~3 s
    ("reinvite", "uas_slow_reinvite", 1000, 'reason="bye from caller"', 1.5, None),
    # rings again at ~1.5-2.3 s, after the kill; the partner CANCELs it at Timer C (2 s) from then
    ("uac_noanswer", "uas_ring_again", None, 'reason="callee 408"', 1.1, "2"),
    # rings once at once, never again: the partner takes the call on when the
    # proxy's probe says its node is down, and CANCELs it at Timer C from then
    ("uac_noanswer", "uas_ring", None, 'reason="callee 408"', 1.1, "2"),
    # the callee's reliable 183 comes at ~1.5 s, after the kill: the partner
    # relays it with an RSeq of its own, and the caller's PRACK with the RAck
    # the callee expects (uas_prack.xml checks it)
    ("uac_prack", "uas_prack", None, 'reason="bye from caller"', 1.1, None),
])
def test_a_transaction_open_when_its_node_dies_ends_on_the_partner(make_cluster, monkeypatch, caller, callee,
                                                                   hold_ms, ending, kill_at, timer_c):
    """The node that sent a request on dies before the answer comes back:
    the proxy brings the answer (or the caller's CANCEL) to the call's new
    owner, which must finish what the dead node started. The caller, told
    Trying, does not send its INVITE or re-INVITE again: it must get the
    486, 487, 408 or 200 from the new owner; the callee must get its ACK
    (else it retransmits for 32 s); the call must end and leave no record."""
    if timer_c:
        monkeypatch.setenv("SIPHA_NODE_INVITE_TIMEOUT", timer_c)
    c = make_cluster(nodes=3, trunk_scenario=callee)
    result, victim, waiting = fail_busiest_while_calls_wait(c, caller, c.kill, kill_at, hold_ms)
    assert waiting, "the killed node held no call"
    assert result.ok == 6 and result.failed == 0, result.log_tail
    alive = [n for n in c.state["nodes"] if n != victim]
    time.sleep(0.5)                              # the last ACKs and deletes
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(c, alive).values())
    logs = "".join((c.dir / "logs" / f"{n}.log").read_text() for n in alive)
    assert logs.count(ending) == 6
    assert "event=dialog_promoted" in logs


def test_node_crashing_with_its_redis_intact_serves_its_dialogs_again_without_failover(make_cluster):
    c = make_cluster(nodes=3, ramp=5.0)
    # 1.5 s is long enough for the proxy to take it out; 4 s for the re-INVITEs
    result, victim, mine, after = kill_busiest_and_restart(c, process_only=True, gap=1.5, settle=4.0)
    assert result.ok == 9 and result.failed == 0, result.log_tail
    assert mine and mine <= set(after[victim]["active"])
    logs = {n: (c.dir / "logs" / f"{n}.log").read_text() for n in c.state["nodes"]}
    assert not any("event=dialog_promoted" in text for text in logs.values())
    assert "event=dialog_migrated" not in logs[victim]
    proxy_log = (c.dir / "logs" / "proxy.log").read_text()
    assert f"event=node_down node={victim}" in proxy_log
    up = [line for line in proxy_log.splitlines() if f"event=node_up node={victim}" in line]
    assert up and "warm=true" in up[0] and "load_factor=1.0" in up[0]


def test_last_node_standing_keeps_serving_and_says_it_is_unmirrored(make_cluster):
    c = make_cluster(nodes=2)
    c.kill("node2")
    time.sleep(1.2)
    result = run(uac(c, "uac", calls=5, rate=10, hold_ms=200).run(30))
    assert result.ok == 5 and result.failed == 0, result.log_tail
    status = json.loads(urllib.request.urlopen(
        f"http://127.0.0.1:{c.state['nodes']['node1']['admin']}/status", timeout=3).read())
    assert status["replication"].startswith("no partner reachable")
    unmirrored = status["store"]["unmirrored_saves"]
    assert unmirrored >= 10                     # 2 saves a call at least
    log = (c.dir / "logs" / "node1.log").read_text()
    # one warning, not one a save (hundreds a second under load)
    warned = [line for line in log.splitlines() if "level=warning" in line and "event=mirror_skipped" in line]
    assert len(warned) == 1 and " saves=1 next_in_s=10" in warned[0], warned
    c.start_node("node2")
    time.sleep(PEER_BACKOFF + 0.5)             # node1 tries node2's Redis again
    # node2 owns half the calls again: 20, so that some are node1's (5 were
    # all node2's in one CI run out of 32)
    result = run(uac(c, "uac", calls=20, rate=20, hold_ms=200).run(30))
    assert result.ok == 20 and result.failed == 0, result.log_tail
    restored = logged(c.dir / "logs" / "node1.log", "event=mirroring_restored")
    assert "event=mirroring_restored unmirrored_s=" in restored and f" saves={unmirrored}\n" in restored


def test_100_trying_waits_for_the_write_up_to_200_ms(make_cluster):
    """A 100 Trying stops the caller's INVITE retransmissions (and the
    proxy's, for TCP). Sent before the record is in Redis, it would leave
    a call that dies with its node before the write with nobody to bring
    the INVITE to the partner. With the partner's Redis frozen the write
    waits for its 0.5 s timeout; the 100 waits too, but no longer than the
    200 ms RFC 3261 §17.2.1 allows."""
    c = make_cluster(nodes=2)
    cid = uuid.uuid4().hex
    owner = rank(bekey_of(cid), ["node1", "node2"])[0]
    partner = "node2" if owner == "node1" else "node1"
    redis_pid = c.procs()[f"redis-{partner}"]["pid"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        port = s.getsockname()[1]
        # no user in the Request-URI: no registrar look-up (which would wait
        # for the frozen Redis too), straight to the trunk
        invite = (f"INVITE sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{cid}\r\n"
                  f"Max-Forwards: 70\r\nFrom: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:service@127.0.0.1>\r\n"
                  f"Call-ID: {cid}\r\nCSeq: 1 INVITE\r\nContact: <sip:a@127.0.0.1:{port}>\r\n"
                  "Content-Length: 0\r\n\r\n")
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            s.sendto(invite.encode(), c.proxy_addr)
            seen = {}
            while 200 not in seen:
                status = parse_message(s.recv(65535)).status
                seen.setdefault(status, time.monotonic() - t0)
        finally:
            os.kill(redis_pid, signal.SIGCONT)
    # not at once (before the write), and from the 200 ms timer, not after the 0.5 s write
    assert 0.18 <= seen[100] < 0.5, f"100 Trying after {seen[100]:.3f} s"
    assert list(seen) == sorted(seen)                 # 100, (180,) 200: the call went on unmirrored
    log = (c.dir / "logs" / f"{owner}.log").read_text()
    assert f"call_id={cid}" in log and "event=mirror_" in log


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_subscription_to_someone_beyond_the_trunk(make_cluster, transport):
    """SUBSCRIBE for a user not registered here goes upstream (SIPp as the
    notifier): the 200, both NOTIFYs and the unsubscribe cross the nodes,
    and the last NOTIFY ends the subscription's record."""
    c = make_cluster(nodes=2, trunk_scenario="uas_notify")
    result = run(uac(c, "subscribe", calls=5, rate=5, hold_ms=200, transport=transport).run(30))
    assert result.ok == 5 and result.failed == 0, result.log_tail
    time.sleep(0.3)
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(c).values())
    logs = "".join((c.dir / "logs" / f"{n}.log").read_text() for n in c.state["nodes"])
    assert logs.count('reason="subscription ended"') == 5


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_reliable_early_media_and_its_prack_go_end_to_end(make_cluster, transport):
    """A caller that requires 100rel (RFC 3262) and a callee that sends its
    183 with SDP reliably: the 183 reaches the caller with Require: 100rel
    and an RSeq, its PRACK reaches the callee with the RAck the callee
    expects (uas_prack.xml checks it), the call is answered and ended."""
    c = make_cluster(nodes=2, trunk_scenario="uas_prack")
    result = run(uac(c, "uac_prack", calls=5, rate=10, transport=transport).run(60))
    assert result.ok == 5 and result.failed == 0, result.log_tail
    assert callee_counts(c, "uas_prack", 5) == ("5", "0")
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(c).values())


def test_resource_preconditions_go_end_to_end(make_cluster):
    """A caller that requires preconditions (RFC 3312: IMS, VoLTE) got 420
    from the node. Now its Require reaches the callee, whose reliable 183
    says precondition to the caller; the PRACK, the UPDATE in the early
    dialog once the caller reserved its resources, and the 200 with the
    callee's answer go end to end (each side's SIPp checks what it gets),
    and the call is answered and ended."""
    c = make_cluster(nodes=2, trunk_scenario="uas_precondition")
    result = run(uac(c, "uac_precondition", calls=5, rate=10).run(60))
    assert result.ok == 5 and result.failed == 0, result.log_tail
    assert callee_counts(c, "uas_precondition", 5) == ("5", "0")
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(c).values())


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_cancelled_reinvite_is_cancelled_at_the_callee_and_the_call_goes_on(make_cluster, transport):
    """A re-INVITE given up (RFC 3261 §9): the node answered the CANCEL and
    kept it, so the callee's user went on being asked and the caller's
    re-INVITE waited for its final answer. The CANCEL now reaches the
    callee, whose 487 reaches the caller (each side's SIPp checks its
    part); the call then ends with a BYE as usual."""
    c = make_cluster(nodes=2, trunk_scenario="uas_reinvite_cancel")
    result = run(uac(c, "reinvite_cancel", calls=4, rate=10, hold_ms=200, transport=transport).run(30))
    assert result.ok == 4 and result.failed == 0, result.log_tail
    assert callee_counts(c, "uas_reinvite_cancel", 4) == ("4", "0")
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(c).values())


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_session_timer_is_agreed_and_refreshed_end_to_end(make_cluster, transport):
    """RFC 4028 through the cluster: the caller's Session-Expires and
    Min-SE reach the callee, the callee's 2xx (Session-Expires with the
    refresher, Require: timer) reaches the caller, and so does the
    refresh and its answer; each side's SIPp checks what it gets."""
    c = make_cluster(nodes=2, trunk_scenario="uas_timer")
    result = run(uac(c, "uac_timer", calls=4, rate=10, hold_ms=200, transport=transport).run(30))
    assert result.ok == 4 and result.failed == 0, result.log_tail
    assert callee_counts(c, "uas_timer", 4) == ("4", "0")


def test_calls_go_to_the_next_upstream_when_one_is_silent_or_unavailable(make_cluster, procs, monkeypatch):
    """node.upstream lists three trunks: the first does not answer at all
    (nothing listens), the second answers 503 (Retry-After: 30), the third
    takes the call. A call goes on to the next after node.upstream_timeout
    (1 s here) and after the 503, as Kamailio's dispatcher fails over;
    the caller waits but loses nothing. A node then sets the two aside (60
    s, 30 s), so its later calls go straight to the third (one node here,
    so that which calls wait is known: those of the first second)."""
    silent, unavailable, good = free_port(), free_port(), free_port()
    procs.sipp_uas("unavailable", unavailable, scenario="uas_unavailable")
    procs.sipp_uas("good", good)
    monkeypatch.setenv("SIPHA_NODE_UPSTREAM", f"sip:127.0.0.1:{silent}, sip:127.0.0.1:{unavailable},"
                                              f"sip:127.0.0.1:{good}")
    monkeypatch.setenv("SIPHA_NODE_UPSTREAM_TIMEOUT", "1.0")
    c = make_cluster(nodes=1, trunk=None)
    result = run(uac(c, "uac", calls=8, rate=2, hold_ms=200).run(60))
    assert result.ok == 8 and result.failed == 0, result.log_tail
    assert result.retransmissions == 0
    log = (c.dir / "logs" / "node1.log").read_text()
    # the calls of the first second (at 0 and 0.5 s, and maybe the one at
    # 1 s) wait for the silent one and get the 503; the later ones do not
    assert 2 <= log.count(f"failed=sip:service@127.0.0.1:{silent} status=408 ") <= 3
    assert 2 <= log.count(f"failed=sip:service@127.0.0.1:{unavailable} status=503 ") <= 3
    assert "set_aside_s=60" in log and "set_aside_s=30" in log
    records = sorted(c.call_records(8), key=lambda r: r["started"])
    assert [r["callee"].split(";")[0] for r in records] == [f"sip:127.0.0.1:{good}"] * 8
    assert all(float(r["setup_s"]) < 0.5 for r in records[3:])        # straight to the good one
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(c).values())


def test_a_busy_trunk_is_not_failed_over(make_cluster, procs, monkeypatch):
    """486 (or any 4xx, 6xx) is the callee's answer, not the trunk's
    failure: the caller hears it, the next trunk is not tried."""
    busy, good = free_port(), free_port()
    procs.sipp_uas("busy", busy, scenario="uas_busy")
    procs.sipp_uas("good", good)
    monkeypatch.setenv("SIPHA_NODE_UPSTREAM", f"sip:127.0.0.1:{busy},sip:127.0.0.1:{good}")
    c = make_cluster(nodes=2, trunk=None)
    result = run(uac(c, "uac_busy", calls=3, rate=3).run(30))
    assert result.ok == 3 and result.failed == 0, result.log_tail
    assert [(r["status"], r["ended_by"]) for r in c.call_records(3)] == [("486", "callee")] * 3
    assert "upstream_failover" not in "".join((c.dir / "logs" / f"{n}.log").read_text() for n in c.state["nodes"])


def test_the_partner_of_a_node_that_died_fails_the_call_over_to_the_next_trunk(make_cluster, procs, monkeypatch):
    """The node that sent a call to its first trunk dies (host and Redis)
    before the trunk says 503. Its partner, holding the call's replica,
    gets the 503 and sends the call on to the next node.upstream with the
    caller's offer, saved with the call while trunks are left to try, as
    the dead node would have: the caller is connected, not told 503."""
    late, good = free_port(), free_port()
    procs.sipp_uas("late", late, scenario="uas_unavailable_late")
    procs.sipp_uas("good", good)
    monkeypatch.setenv("SIPHA_NODE_UPSTREAM", f"sip:127.0.0.1:{late},sip:127.0.0.1:{good}")
    monkeypatch.setenv("SIPHA_NODE_UPSTREAM_TIMEOUT", "10")
    c = make_cluster(nodes=2, trunk=None)

    async def scenario():
        caller = await uac(c, "uac", calls=1, rate=1, hold_ms=500).start()
        owner, deadline = None, time.monotonic() + 5
        while owner is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            owner = next((n for n in c.state["nodes"]
                          if "event=dialog_created" in (c.dir / "logs" / f"{n}.log").read_text()), None)
        assert owner is not None
        record = next(iter(all_keys(c)[owner]["active"].values()))
        assert record["inv"]["body"].startswith("v=0") and record["nx"] == [f"sip:service@127.0.0.1:{good}"]
        c.kill(owner)
        return owner, await caller.wait(30)

    owner, result = run(scenario())
    assert result.ok == 1 and result.failed == 0, result.log_tail
    partner = next(n for n in c.state["nodes"] if n != owner)
    log = (c.dir / "logs" / f"{partner}.log").read_text()
    assert "event=upstream_failover" in log and f"failed=sip:service@127.0.0.1:{late} status=503 " in log
    assert [r["callee"].split(";")[0] for r in c.call_records(1)] == [f"sip:127.0.0.1:{good}"]


def test_the_callees_answer_to_a_node_whose_redis_died_reaches_the_partner(make_cluster):
    """A node's own Redis dies while its calls ring (the callee says 486
    at ~3 s). Its requests were handed to the partners, but the callee's
    answers followed the Via back to it: it answers the proxy's probes
    (503), so it counted as able to finish what it had in hand, and could
    not (no Redis): the 486 was dropped and the callers waited. It now
    says so in its 503 (X-Sipha-Store-Down), and the proxy brings those
    answers to the calls' partners, as for a node that died."""
    c = make_cluster(nodes=3, trunk_scenario="uas_busy_late")
    result, victim, waiting = fail_busiest_while_calls_wait(c, "uac_busy", c.kill_redis, 1.5)
    assert waiting, "the node held no call"
    assert result.ok == 6 and result.failed == 0, result.log_tail
    alive = [n for n in c.state["nodes"] if n != victim]
    logs = "".join((c.dir / "logs" / f"{n}.log").read_text() for n in alive)
    assert logs.count('reason="callee 486"') >= len(waiting)
