"""The proxy with real SIPp: UAC -> proxy -> two SIPp UAS acting as nodes."""
from __future__ import annotations

import asyncio
import time

import pytest

from sipha.sipp import Sipp, free_port

pytestmark = pytest.mark.e2e


def two_backends(procs, transport="udp", scenario="uas"):
    ports = {"node1": free_port(), "node2": free_port()}
    for nid, port in ports.items():
        procs.sipp_uas(nid, port, "udp", scenario)
    return {nid: ("127.0.0.1", p) for nid, p in ports.items()}


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_calls_complete_through_proxy_to_both_backends(procs, transport):
    nodes = two_backends(procs)
    proxy, addr = procs.proxy(nodes)
    result = asyncio.run(Sipp("uac", target=addr, transport=transport, calls=60, rate=30,
                              workdir=str(procs.tmp)).run(timeout=60))
    assert result.failed == 0, result.log_tail
    assert result.ok == 60
    routed = proxy.lines("event=route method=INVITE")
    assert len(routed) == 60
    # the ring spreads calls over both backends
    assert sum("node=node1" in line for line in routed) > 10
    assert sum("node=node2" in line for line in routed) > 10


def test_every_request_of_a_call_reaches_the_same_backend(procs):
    nodes = two_backends(procs)
    proxy, addr = procs.proxy(nodes)
    result = asyncio.run(Sipp("uac", target=addr, calls=30, rate=30, workdir=str(procs.tmp)).run(60))
    assert result.ok == 30 and result.failed == 0
    by_call: dict[str, set[str]] = {}
    for line in proxy.lines("event=route"):
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        by_call.setdefault(fields["call_id"], set()).add(fields["node"])
    assert len(by_call) == 30
    assert all(len(n) == 1 for n in by_call.values())


def test_killed_backend_costs_no_call(procs):
    """A SIPp backend killed under load: its calls' requests go to the
    other one. The backends answer 200 with no 180 first (uas_answer): a
    call that had the victim's 180 but not its 200 when it died waits
    for ever (the caller sends its INVITE again only until a
    provisional), which no stateless backend can help and a node's
    failover does (tests/test_cluster_e2e.py); a CI run lost one so."""
    nodes = two_backends(procs, scenario="uas_answer")
    proxy, addr = procs.proxy(nodes)
    victim = procs.all[0]

    async def scenario():
        uac = Sipp("uac", target=addr, calls=200, rate=40, workdir=str(procs.tmp))
        await uac.start()
        await asyncio.sleep(2)
        killed_at = time.monotonic()
        victim.kill()
        res = await uac.wait(90)
        return res, killed_at

    result, killed_at = asyncio.run(scenario())
    assert result.failed == 0, result.log_tail
    assert result.ok == 200
    down = proxy.lines("event=node_down node=node1")
    assert down, proxy.text()[-2000:]
    # after the kill, new calls go to the survivor
    late = [line for line in proxy.lines("event=route method=INVITE") if "reason=failover" in line]
    assert late
