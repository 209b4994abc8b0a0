"""The proxy as several worker processes on one port (proxy.workers), with
real SIPp: UAC -> proxy (2 workers) -> two SIPp UAS acting as nodes."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from sipcore.logfmt import parse_logfmt
from sipha.sipp import Sipp, free_port

from test_proxy_e2e import two_backends

pytestmark = pytest.mark.e2e


def start_proxy(procs, nodes, workers=2):
    admin = free_port()
    proxy, addr = procs.proxy(nodes, "--workers", str(workers), "--admin", f"127.0.0.1:{admin}")
    wait_for(lambda: len(proxy.lines("event=worker_started")) == workers - 1, proxy)
    return proxy, addr, admin


def wait_for(cond, proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; log:\n{proc.text()[-3000:]}")
        time.sleep(0.05)


def status(admin_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/status", timeout=5) as r:
        return json.loads(r.read())


def worker_pids(supervisor_pid: int) -> list[int]:
    with open(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_calls_complete_through_two_workers(procs, transport):
    proxy, addr, admin = start_proxy(procs, two_backends(procs))
    result = asyncio.run(Sipp("uac", target=addr, transport=transport, calls=100, rate=50,
                              workdir=str(procs.tmp)).run(timeout=60))
    assert result.failed == 0 and result.ok == 100, result.log_tail
    # one admin endpoint counts the requests of both workers (the other
    # worker reports its counters every second: a report can hold every
    # INVITE and not yet the last BYE, so both are waited for)
    def routed() -> list:
        counters = status(admin)["counters"]        # one read for both counts
        return [counters.get(f"requests{{method={m},reason=owner}}") for m in ("INVITE", "BYE")]
    wait_for(lambda: routed() == [100, 100], proxy)
    assert status(admin)["workers"] == 2
    # every log line says which worker wrote it
    assert proxy.lines("worker=0 event=proxy_started") and proxy.lines("worker=1 event=worker_started")
    if transport == "tcp":
        # the UAS answer over UDP to whichever worker the kernel picks for
        # their flow; the responses still leave over the caller's connection
        # (worker 0's) and no request was retransmitted to a node for lack
        # of the answer having been seen
        assert not proxy.lines("event=relay_timeout")


def test_one_health_view_across_workers(procs):
    """A backend killed mid-run: worker 0 sees it down and every worker
    stops routing to it; no call that starts afterwards is lost."""
    nodes = two_backends(procs)
    proxy, addr, _ = start_proxy(procs, nodes)
    victim = procs.all[0]

    async def scenario():
        # two UACs: two flows, which the kernel may give to either worker
        # (-recv_timeout: a call whose callee died between its 180 and its
        # 200 fails after 5 s instead of waiting for that 200 forever)
        uacs = [Sipp("uac", target=addr, calls=150, rate=30, workdir=str(procs.tmp),
                     extra=["-recv_timeout", "5000"]) for _ in range(2)]
        for u in uacs:
            await u.start()
        await asyncio.sleep(2)
        victim.kill()
        return [await u.wait(90) for u in uacs]

    results = asyncio.run(scenario())
    for r in results:
        # The backends here are the callees themselves (SIPp UAS), so a call
        # the victim was in the middle of answering dies with it: at most
        # one per caller. (With nodes, the partner carries such a call on:
        # tests/test_cluster_e2e.py.) Every other call completes.
        assert r.ok + r.failed == 150 and r.failed <= 1, r.log_tail
    down = proxy.lines("worker=0 event=node_down node=node1")
    assert down
    # from shortly after (the other worker copies the view every 20 ms)
    # nothing more is routed to node1, by any worker
    routed = [f for f in map(parse_logfmt, proxy.lines("event=route method=INVITE"))
              if f["ts"] > stamp_after(parse_logfmt(down[0])["ts"], 0.1)]
    assert {f["worker"] for f in routed} <= {"0", "1"} and routed
    assert not [f for f in routed if f["node"] == "node1"]


def stamp_after(ts: str, seconds: float) -> str:
    """The log timestamp `seconds` after `ts` (same format, so they compare as text)."""
    from datetime import datetime, timedelta
    t = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ") + timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def test_a_dead_worker_is_restarted_and_stop_ends_them_all(procs):
    proxy, addr, admin = start_proxy(procs, two_backends(procs))
    first = worker_pids(proxy.popen.pid)
    assert len(first) == 2
    os.kill(first[1], signal.SIGKILL)
    wait_for(lambda: proxy.lines("event=worker_exited") and len(proxy.lines("event=worker_started")) == 2, proxy)
    assert "action=restarting" in proxy.lines("event=worker_exited")[0]
    result = asyncio.run(Sipp("uac", target=addr, calls=50, rate=50, workdir=str(procs.tmp)).run(60))
    assert result.failed == 0 and result.ok == 50, result.log_tail
    now = worker_pids(proxy.popen.pid)
    assert len(now) == 2 and first[1] not in now
    proxy.popen.terminate()
    assert proxy.popen.wait(10) == 0
    for pid in now:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


@pytest.mark.parametrize("args, needle", [
    (["--workers", "0", "--listen", "127.0.0.1:5999"], "proxy.workers: expected 1 to 64, got 0"),
    (["--workers", "2", "--listen", "127.0.0.1:0"], "proxy.workers: several workers need fixed ports"),
])
def test_bad_worker_settings_are_named(args, needle):
    r = subprocess.run([sys.executable, "-m", "sipha.cli", "proxy", "--node", "n1=127.0.0.1:5998", *args],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and needle in r.stderr, r.stderr


def test_port_in_use_is_a_clear_error_with_workers(procs):
    import socket
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        r = subprocess.run([sys.executable, "-m", "sipha.cli", "proxy", "--node", "n1=127.0.0.1:5998",
                            "--workers", "2", "--listen", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and f"cannot bind 127.0.0.1:{port}" in r.stderr, r.stderr


def test_sighup_reloads_the_node_list_in_every_worker_and_a_bad_file_changes_nothing(procs):
    """`kill -HUP` on the supervisor: it reads --config again and hands the
    signal to each worker, which takes the new node list in place (the
    new node comes in after its probes, ramped); log.level changes at
    once; other settings are named as needing a restart. A file that no
    longer parses is logged and counted by each worker, and the running
    list kept."""
    backends = two_backends(procs)
    port, admin = free_port(), free_port()
    conf = procs.tmp / "proxy.toml"

    def write(node_ids, extra=""):
        conf.write_text(f'[proxy]\nlisten = "127.0.0.1:{port}"\nadmin = "127.0.0.1:{admin}"\nworkers = 2\n'
                        '[health]\ninterval = 0.2\n[ramp]\nduration = 0.5\n' + extra
                        + "".join(f'[[nodes]]\nid = "{n}"\nsip = "127.0.0.1:{backends[n][1]}"\n' for n in node_ids))

    write(["node1"])
    proxy = procs.sipha("proxy", "proxy", "--config", str(conf), ready="event=proxy_started")
    wait_for(lambda: proxy.lines("event=worker_started"), proxy)

    def calls():
        r = asyncio.run(Sipp("uac", target=("127.0.0.1", port), calls=40, rate=50, workdir=str(procs.tmp)).run(60))
        assert r.failed == 0 and r.ok == 40, r.log_tail

    calls()
    write(["node1", "node2"], '[limits]\ntcp_idle = 100\n[cluster]\nsecret = "another"\n')
    os.kill(proxy.popen.pid, signal.SIGHUP)
    wait_for(lambda: [n["id"] for n in status(admin)["nodes"] if n["up"]] == ["node1", "node2"], proxy)
    wait_for(lambda: len(proxy.lines("event=nodes_reloaded")) == 2, proxy)
    assert {parse_logfmt(line)["worker"] for line in proxy.lines("event=nodes_reloaded")} == {"0", "1"}
    assert all("added=node2" in line for line in proxy.lines("event=nodes_reloaded"))
    assert "keys=cluster.secret" in proxy.lines("event=reload_restart_needed")[0]
    assert "limits.tcp_idle=100" in proxy.lines("event=settings_applied")[0]
    before = len(proxy.lines("event=route method=INVITE"))
    calls()
    assert [line for line in proxy.lines("event=route method=INVITE")[before:] if "node=node2" in line]
    write(["node1", "node2"], '[limits]\ntcp_idle = 100\n[cluster]\nsecret = "another"\n[log]\nlevel = "warning"\n')
    os.kill(proxy.popen.pid, signal.SIGHUP)
    wait_for(lambda: len(proxy.lines("event=log_level")) == 3, proxy)    # the supervisor and each worker
    time.sleep(0.2)
    before = len(proxy.lines("event=route"))
    calls()
    assert len(proxy.lines("event=route")) == before          # at warning now: no route lines
    conf.write_text("[proxy\n")
    os.kill(proxy.popen.pid, signal.SIGHUP)
    wait_for(lambda: len(proxy.lines("event=reload_failed")) == 2, proxy)        # each worker says so
    failed = [parse_logfmt(line) for line in proxy.lines("event=reload_failed")]
    assert {f["worker"] for f in failed} == {"0", "1"} and all(f["error"].startswith("--config: ") for f in failed)
    assert proxy.popen.poll() is None and [n["id"] for n in status(admin)["nodes"]] == ["node1", "node2"]
    # and counts it, for an alert: two reloads taken by both workers, one refused by both
    wait_for(lambda: status(admin)["counters"].get("reloads{result=failed}") == 2, proxy)
    assert status(admin)["counters"]["reloads{result=ok}"] == 4
