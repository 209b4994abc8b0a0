"""Dual stack end to end: phones and a trunk on IPv6 ([::1]) through the
proxy, the nodes on IPv4 behind it, with SIPp and a scripted phone."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from clusterkit import all_keys, busiest, calls_reach, run, uac
from phone import Phone
from procs import has_ipv6_loopback
from sipha.sipp import Sipp, read_stats

pytestmark = pytest.mark.e2e


if not has_ipv6_loopback():
    pytest.skip("this host has no IPv6 loopback (::1)", allow_module_level=True)


def uac6(c, scenario="uac", **kw) -> Sipp:
    return Sipp(scenario, target=c.proxy_addr6, workdir=str(c.dir / "logs"), **kw)   # from [::1]


def trunk_counts(c, calls: int) -> tuple[str, str]:
    """-> (successful, failed) calls of the cluster's SIPp trunk, once it counted `calls`."""
    csv = str(next((c.dir / "logs").glob("uas-*.csv")))
    deadline = time.monotonic() + 10
    while int((stats := read_stats(csv)).get("SuccessfulCall(C)", 0)) + int(stats.get("FailedCall(C)", 0)) < calls:
        assert time.monotonic() < deadline, stats
        time.sleep(0.5)
    return stats["SuccessfulCall(C)"], stats["FailedCall(C)"]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_ipv6_callers_reach_an_ipv6_trunk_through_ipv4_nodes(make_cluster, transport):
    c = make_cluster(nodes=2, ipv6=True)
    result = run(uac6(c, calls=10, rate=10, hold_ms=300, transport=transport).run(60))
    assert result.ok == 10 and result.failed == 0, result.log_tail
    assert trunk_counts(c, 10) == ("10", "0")
    proxy_log = (c.dir / "logs" / "proxy.log").read_text()
    assert proxy_log.count("event=route method=INVITE") >= 20       # caller's and each B-leg
    assert "src=[::1]:" in proxy_log and f"dest=[::1]:{c.state['trunk']['port']}/udp" in proxy_log
    assert "level=error" not in proxy_log and "send_error" not in proxy_log
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(c).values())


def test_an_ipv4_caller_reaches_the_same_trunk_on_ipv6(make_cluster):
    c = make_cluster(nodes=2, ipv6=True)
    result = run(uac(c, calls=5, rate=10, hold_ms=300).run(60))
    assert result.ok == 5 and result.failed == 0, result.log_tail
    assert trunk_counts(c, 5) == ("5", "0")


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_phone_registered_over_ipv6_is_called_from_ipv4(make_cluster, transport):
    """The proxy is the bridge: the phone's Path names the proxy's IPv6
    address and its flow; the INVITE reaches it from [::1] with our IPv6
    Record-Route, so its BYE comes back to the same address."""
    c = make_cluster(nodes=2, trunk=None, ipv6=True)
    phone = Phone("vera", c.proxy_addr6, transport=transport)
    try:
        resp = phone.register(300)
        assert resp.status == 200, resp.reason
        port = c.state["proxy"]["port"]
        assert resp.get("Path").startswith(f"<sip:[::1]:{port}") and f"flow={transport}:[::1]:" in resp.get("Path")
        calls_reach(c, phone, 2)
        assert phone.invite.top_via.host == "[::1]"
        assert phone.invite.values("Record-Route")[0].startswith(f"<sip:[::1]:{port}")
    finally:
        phone.stop()


def test_sipha_load_calls_through_the_ipv6_address(make_cluster):
    c = make_cluster(nodes=2, ipv6=True)
    r = subprocess.run([sys.executable, "-m", "sipha.cli", "load", "--target", f"[::1]:{c.state['proxy']['port']}",
                        "--calls", "5", "--rate", "10"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "succeeded 5, failed 0" in r.stdout


@pytest.mark.parametrize("only", [False, True], ids=["dual-stack-proxy", "ipv6-only"])
def test_nodes_on_ipv6_carry_calls_through_a_node_killed_and_one_stopped(make_cluster, only):
    """`proxy.internal` and the nodes on [::1] (an IPv6-only back end):
    the probes, the calls, a node killed under load (its partner takes
    its calls on) and another stopped for an upgrade (it drains and says
    it leaves), all over IPv6 behind the proxy; the callers come over
    IPv4, or, with the proxy on [::1] only (an IPv6-only network), over
    IPv6 too."""
    c = make_cluster(nodes=3, ipv6_nodes=True, ipv6_only=only)

    async def scenario():
        s = uac(c, "reinvite", calls=120, rate=30, hold_ms=1500)
        await s.start()
        await asyncio.sleep(1.5)
        snapshot = all_keys(c)
        killed = busiest(snapshot)
        stopped = busiest({n: k for n, k in snapshot.items() if n != killed})
        await asyncio.to_thread(c.kill, killed)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(c.stop, stopped)
        return await s.wait(60), killed, stopped

    result, killed, stopped = run(scenario())
    assert result.ok == 120 and result.failed == 0, result.log_tail
    proxy_log = (c.dir / "logs" / "proxy.log").read_text()
    assert f"event=node_down node={killed} addr=[::1]:" in proxy_log
    assert f"event=node_left node={stopped}" in proxy_log
    assert "level=error" not in proxy_log and "send_error" not in proxy_log
    assert (f"listen=[::1]:{c.proxy_addr[1]} " if only else f"listen=127.0.0.1:{c.proxy_addr[1]},[::1]:") in proxy_log
    for nid in c.state["nodes"]:
        node_log = (c.dir / "logs" / f"{nid}.log").read_text()
        assert "level=error" not in node_log and f"sip=[::1]:{c.state['nodes'][nid]['sip']}" in node_log
