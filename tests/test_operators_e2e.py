"""What operators see: log events with their fields, JSON logs, rotation,
rate-limited rejections, /status and /metrics, provoked for real."""
from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from clusterkit import run, uac
from procs import has_ipv6_loopback
from sipcore import compiled, heap
from sipcore.admin import fetch_json, json_handler, start_admin
from sipcore.logfmt import parse_logfmt
from sipha.sipp import free_port

pytestmark = pytest.mark.e2e


def events(path, name):
    return [parse_logfmt(line) for line in path.read_text().splitlines() if f"event={name} " in line + " "]


def metric(text: str, name: str, **labels) -> float:
    lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
    want = f"{name}{{{lab}}}" if lab else name
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{want} not in /metrics")


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
        return r.read().decode()


def test_failover_and_ramp_are_logged_and_counted_everywhere(make_cluster):
    c = make_cluster(nodes=3, ramp=2.0)
    logs = c.dir / "logs"

    async def scenario():
        s = uac(c, "reinvite", calls=60, rate=20, hold_ms=2500)
        await s.start()
        await asyncio.sleep(2.0)
        c.kill("node1")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(c.start_node, "node1")
        return await s.wait(60)

    result = run(scenario())
    assert result.ok == 60 and result.failed == 0, result.log_tail
    proxy_log = logs / "proxy.log"
    routes = events(proxy_log, "route")
    first = next(r for r in routes if r.get("reason") == "owner" and r["method"] == "INVITE")
    for field in ("ts", "level", "method", "call_id", "bekey", "src", "node", "reason"):
        assert first.get(field), field
    reasons = {r["reason"] for r in routes}
    assert {"owner", "failover", "outbound"} <= reasons
    assert events(proxy_log, "node_down")[0]["node"] == "node1"
    assert events(proxy_log, "node_up")[0]["load_factor"] == "0.1"
    steps = [float(e["load_factor"]) for e in events(proxy_log, "load_factor") if e["node"] == "node1"]
    assert steps == sorted(steps) and steps[-1] == 1.0 and len(steps) >= 5
    node_events = {parse_logfmt(line)["event"] for n in ("node1", "node2", "node3")
                   for line in (logs / f"{n}.log").read_text().splitlines() if line.startswith("ts=")}
    assert {"dialog_created", "dialog_confirmed", "dialog_promoted", "dialog_migrated",
            "dialog_terminated"} <= node_events
    secret = (c.dir / "cluster.toml").read_text().split('secret = "')[1].split('"')[0]
    for f in logs.glob("*.log"):
        assert secret not in f.read_text(), f"cluster secret in {f.name}"

    prom = get(c.state["proxy"]["admin"], "/metrics")
    assert metric(prom, "sipha_proxy_requests_total", method="INVITE", reason="owner") > 0
    assert metric(prom, "sipha_proxy_requests_total", method="INVITE", reason="outbound") >= 60
    assert metric(prom, "sipha_proxy_responses_total", **{"class": "2xx"}) > 0
    assert metric(prom, "sipha_proxy_nodes_up") == 3
    assert metric(prom, "sipha_proxy_load_factor", node="node1") == 1.0
    assert metric(prom, "sipha_proxy_routing_seconds_count") > 0
    failovers = sum(metric(prom, "sipha_proxy_requests_total", method=m, reason="failover")
                    for m in ("INVITE", "ACK", "BYE") if f'method="{m}",reason="failover"' in prom)
    assert failovers > 0
    status = json.loads(get(c.state["proxy"]["admin"], "/status"))
    assert [n["up"] for n in status["nodes"]] == [True, True, True]
    # what runs compiled: every module of COMPILED where this checkout was compiled (CI's is)
    built = bool(compiled.read_manifest(compiled.directory()))
    assert status["compiled"] == {"modules": len(compiled.COMPILED) if built else 0, "as_python": []}
    node_status = json.loads(get(c.state["nodes"]["node1"]["admin"], "/status"))
    shared = [m for m in compiled.COMPILED if m.startswith("sipcore.")]      # a node imports no proxy module
    assert node_status["compiled"] == {"modules": len(shared) if built else 0, "as_python": []}
    # the collector as sipcore/heap.py sets it once a process has started
    for s in (status, node_status):
        assert s["gc"]["gen0"] == heap.GEN0 and s["gc"]["frozen"] > 10000, s["gc"]

    node_prom = "".join(get(n["admin"], "/metrics") for n in c.state["nodes"].values())
    assert "sipha_node_dialogs_total{event=\"promoted\"}" in node_prom
    assert "sipha_node_dialogs_total{event=\"migrated\"}" in node_prom
    assert "sipha_node_redis_seconds_count" in node_prom
    assert 'sipha_node_records{keyspace="active",kind="call"}' in node_prom


def test_node_status_tells_dialogs_from_registrations(make_cluster):
    from phone import Phone
    c = make_cluster(nodes=2, trunk_scenario="uas")
    phones = [Phone(f"user{i}", c.proxy_addr) for i in range(3)]
    try:
        assert all(p.register(300).status == 200 for p in phones)

        async def held():
            s = uac(c, "uac", calls=4, rate=20, hold_ms=3000)
            await s.start()
            await asyncio.sleep(1.5)
            snap = [json.loads(get(n["admin"], "/status")) for n in c.state["nodes"].values()]
            return snap, await s.wait(30)
        snap, result = run(held())
        assert result.ok == 4
        assert sum(st["dialogs"]["active"] for st in snap) == 4
        assert sum(st["registrations"]["active"] for st in snap) == 3
        assert sum(st["registrations"]["replica"] for st in snap) == 3
    finally:
        for p in phones:
            p.stop()


def test_json_logs_rotation_and_rate_limited_rejections(procs, tmp_path):
    node = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    node.bind(("127.0.0.1", free_port()))
    log = tmp_path / "proxy.json"
    proxy, addr = procs.proxy({"node1": node.getsockname()}, "--no-probe", "--log-format", "json",
                              "--log-file", str(log), ready=None)
    deadline = time.monotonic() + 5
    while not log.exists() or "proxy_started" not in log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first, started = (json.loads(x) for x in log.read_text().splitlines()[:2])
    assert first["event"] == "default_secret" and first["level"] == "warning"   # no --secret given
    assert started["event"] == "proxy_started" and started["proc"] == "proxy" and "ts" in started
    log.rename(tmp_path / "proxy.json.1")            # what logrotate does
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(200):                          # a flood of garbage
            s.sendto(b"\x16\x03\x01 not sip at all\r\n\r\n", addr)
        time.sleep(1.2)
        s.sendto(b"more garbage\r\n\r\n", addr)
    deadline = time.monotonic() + 5
    while not log.exists() or '"suppressed"' not in log.read_text():
        assert time.monotonic() < deadline, "no line reports the suppressed rejections"
        time.sleep(0.1)
    # the proxy looks for a rotation once a second: lines of that second may
    # still land in the moved file, none is lost, the later ones are in the new one
    moved = [json.loads(x) for x in (tmp_path / "proxy.json.1").read_text().splitlines()[2:]]
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines and all(x["event"] == "parse_rejected" for x in moved + lines)
    rejected = moved + lines
    assert 1 <= len(rejected) <= 25                  # rate-limited, not 201 lines
    assert sum(x.get("suppressed") or 0 for x in rejected) + len(rejected) == 201
    assert rejected[0]["src"].startswith("127.0.0.1:") and rejected[0]["reason"]
    node.close()


def test_admin_is_on_by_default_on_loopback_at_sip_port_plus_1000(procs):
    port = free_port()
    while port + 1000 >= 32768:          # keep the admin port out of the ephemeral range
        port = free_port()
    node = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    node.bind(("127.0.0.1", free_port()))
    procs.sipha("proxy", "proxy", "--listen", f"127.0.0.1:{port}", "--no-probe", "--node", f"n1=127.0.0.1:{node.getsockname()[1]}",
                ready="event=proxy_started")
    status = json.loads(get(port + 1000, "/status"))
    assert status["role"] == "proxy" and status["listen"] == [f"127.0.0.1:{port}"]
    node.close()


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_auto_admin_of_an_ipv6_sip_address_is_on_ipv6_loopback():
    """The proxy asks a node without an admin address at its SIP host and
    port + 1000: for a node on [::1], that is where auto must bind."""
    async def status():
        return {"role": "node"}

    async def main():
        port = free_port("::1")
        while port + 1000 >= 32768:
            port = free_port("::1")
        server, addr = await start_admin("auto", "node.admin", ("::1", port), {"/status": json_handler(status)})
        try:
            assert addr[:2] == ("::1", port + 1000)
            assert await fetch_json("::1", port + 1000, "/status") == {"role": "node"}
        finally:
            await server.close()
    asyncio.run(main())


def test_an_operator_lists_the_calls_and_ends_one(make_cluster):
    """`sipha calls` (Kamailio's dlg.list) lists the calls in progress
    with the node holding each; `sipha hangup CALL-ID` (dlg.end_dlg) ends
    an answered one, a BYE to each side: SIPp callers that wait for the
    far end's BYE get it and complete, and each call's record says
    ended_by=operator. The action takes POST only; an unknown Call-ID is
    a clear error."""
    import subprocess
    import sys
    c = make_cluster(nodes=2)

    def sipha(*args):
        return subprocess.run([sys.executable, "-m", "sipha.cli", *args, "--dir", str(c.dir)],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    async def scenario():
        s = uac(c, "uac_wait_bye", calls=3, rate=10, timeout_s=30)
        await s.start()
        for _ in range(100):
            listed = json.loads((await asyncio.to_thread(sipha, "calls", "--json")).stdout)
            if len(listed) == 3 and all(call["state"] == "confirmed" for call in listed):
                break
            await asyncio.sleep(0.1)
        assert {call["held_by"] for call in listed} <= set(c.state["nodes"]), listed
        table = (await asyncio.to_thread(sipha, "calls")).stdout
        assert all(call["call_id"] in table for call in listed), table
        node = c.state["nodes"][listed[0]["held_by"]]["admin"]
        with pytest.raises(urllib.error.HTTPError, match="405"):
            get(node, f"/hangup?call_id={listed[0]['call_id']}")
        for call in listed:
            ended = await asyncio.to_thread(sipha, "hangup", call["call_id"])
            assert ended.returncode == 0 and f"ended {call['call_id']} on {call['held_by']}" in ended.stdout, ended
        return listed, await s.wait(30)

    listed, result = run(scenario())
    assert result.ok == 3 and result.failed == 0, result.log_tail
    records = [r for r in c.call_records(at_least=3)]
    assert sorted((r["call_id"], r["ended_by"]) for r in records) == sorted((call["call_id"], "operator") for call in listed)
    gone = sipha("hangup", listed[0]["call_id"])
    assert gone.returncode == 2 and "no call" in gone.stderr
    assert sipha("calls").stderr.strip() == "no call in progress"
