"""The cluster commands as a user types them: up, status, load, kill,
start, down, and their errors."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from sipha.cluster import Cluster
from sipha.sipp import free_port

pytestmark = pytest.mark.e2e


def sipha(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "sipha.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_up_status_load_kill_start_down(tmp_path):
    d = str(tmp_path / "c")
    port = free_port()
    r = sipha("up", "--dir", d, "--nodes", "2", "--port", str(port), "--trunk", "sipp", "--ramp", "1")
    assert r.returncode == 0, r.stderr
    try:
        assert f"127.0.0.1:{port} udp+tcp" in r.stdout and "node2" in r.stdout
        st = json.loads(sipha("status", "--dir", d, "--json").stdout)
        assert [n["health"] for n in st["nodes"]] == ["up", "up"]
        r = sipha("load", "--dir", d, "--calls", "10", "--rate", "20")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "succeeded 10, failed 0" in r.stdout and "calls done" in r.stdout
        assert sipha("kill", "--dir", d, "node1").returncode == 0
        assert sipha("kill", "--dir", d, "node2").returncode == 0
        st = json.loads(sipha("status", "--dir", d, "--json").stdout)
        assert [n["process"] for n in st["nodes"]] == ["stopped", "stopped"]
        assert sipha("kill", "--dir", d, "node1").returncode == 2     # not running any more
        # no node left: the proxy answers 503, SIPp counts failures, load exits 1
        r = sipha("load", "--dir", d, "--calls", "2", "--rate", "10")
        assert r.returncode == 1 and "failed 2" in r.stdout
        assert sipha("start", "--dir", d, "node1").returncode == 0
        assert sipha("start", "--dir", d, "node2").returncode == 0
        r = sipha("load", "--dir", d, "--calls", "10", "--rate", "20", "--transport", "tcp")
        assert r.returncode == 0, r.stdout + r.stderr
        r = sipha("stop", "--dir", d, "node1")
        assert r.returncode == 0 and "drained" in r.stdout, r.stdout + r.stderr
        assert json.loads(sipha("status", "--dir", d, "--json").stdout)["nodes"][0]["process"] == "stopped"
        assert sipha("stop", "--dir", d, "node1").returncode == 2      # not running any more
        assert sipha("start", "--dir", d, "node1").returncode == 0
        assert sipha("kill", "--dir", d, "proxy").returncode == 0
        assert not json.loads(sipha("status", "--dir", d, "--json").stdout)["proxy"]["running"]
        assert sipha("kill", "--dir", d, "proxy").returncode == 2      # not running any more
        assert sipha("start", "--dir", d, "proxy").returncode == 0
        assert sipha("start", "--dir", d, "proxy").returncode == 2     # running already
        r = sipha("load", "--dir", d, "--calls", "10", "--rate", "20")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        r = sipha("down", "--dir", d)
    assert r.returncode == 0 and "proxy" in r.stdout
    st = json.loads(sipha("status", "--dir", d, "--json").stdout)
    assert not st["proxy"]["running"] and all(n["process"] == "stopped" for n in st["nodes"])


def test_down_stops_the_nodes_before_their_redis_and_logs_no_error(tmp_path):
    """`sipha down` used to stop every Redis with the nodes, and each
    node logged redis_down, an error, at every shutdown: noise in the
    lines an operator greps for errors."""
    d = tmp_path / "c"
    r = sipha("up", "--dir", str(d), "--nodes", "2", "--port", str(free_port()), "--trunk", "sipp", "--ramp", "1")
    assert r.returncode == 0, r.stderr
    r = sipha("down", "--dir", str(d))
    assert r.returncode == 0
    logs = {p.name: p.read_text() for p in (d / "logs").glob("*.log")}
    assert "node1.log" in logs and "proxy.log" in logs
    assert [line for text in logs.values() for line in text.splitlines() if "level=error" in line] == []


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        r = sipha("up", "--dir", str(tmp_path / "c"), "--port", str(port))
    assert r.returncode == 2
    assert f"--port: 127.0.0.1:{port}/udp is already in use" in r.stderr


def test_commands_without_a_cluster_name_the_directory(tmp_path):
    r = sipha("status", "--dir", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "--dir" in r.stderr and "Traceback" not in r.stderr
    r = sipha("load", "--dir", str(tmp_path), "--target", "127.0.0.1:9", "--scenario", "nosuch")
    assert r.returncode == 2 and "no SIPp scenario 'nosuch'" in r.stderr


def test_a_process_just_started_is_alive_and_one_that_exited_is_not():
    """The cluster tells its processes' life from /proc. Popen returns once
    exec has closed the close-on-exec pipe, a moment before the new
    program's arguments are readable: a node checked right after its start
    read as dead about once in 25 starts, and `sipha up` (and the tests)
    gave up on it ("node2 did not start", with an empty log). Nor may a
    pid read as ours once a kernel thread has it (`sipha up` then said a
    cluster already ran)."""
    from sipha.cluster import _alive
    for _ in range(200):
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            assert _alive(p.pid, sys.executable)
        finally:
            p.kill()
        while not _zombie(p.pid):
            time.sleep(0.01)
        assert not _alive(p.pid, sys.executable)      # exited, not reaped yet
        p.wait()
        assert not _alive(p.pid, sys.executable)
    # a pid the kernel gave to one of its threads (no arguments either) is not ours
    kernel_threads = [int(d) for d in os.listdir("/proc") if d.isdigit() and _parent(int(d)) == 2]
    assert all(not _alive(pid, sys.executable) for pid in kernel_threads[:50])


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rpartition(b")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return fh.read().rpartition(b")")[2].split()[0] == b"Z"


def test_the_demo_kills_and_restarts_a_node_and_no_call_fails(tmp_path):
    """The main job, shorter: a node killed half-way and started again,
    every call completed, one call record each, nothing left running."""
    d = tmp_path / "demo"
    r = sipha("demo", "--dir", str(d), "--port", str(free_port()), "--calls", "60", "--rate", "20",
              "--hold", "3", "--ramp", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "calls attempted 60, succeeded 60, failed 0" in r.stdout
    assert "killed and restarted: node" in r.stdout and "event=node_down" in r.stdout
    assert "call records (event=cdr in the node logs): 60, for 60 calls" in r.stdout
    demo = Cluster(str(d))
    assert len(demo.procs()) >= 6                      # 2 Redis and 2 nodes at least, the proxy, the trunk
    deadline = time.monotonic() + 10                   # nothing left running (a node may drain a moment)
    while time.monotonic() < deadline and any(demo.running(name) for name in demo.procs()):
        time.sleep(0.2)
    assert not [name for name in demo.procs() if demo.running(name)]


def test_a_demo_ended_by_sigterm_takes_its_cluster_down(tmp_path):
    """`timeout 60 sipha demo`, a cancelled CI job: SIGTERM ends the demo
    as Ctrl-C does, with what it started (Redis, nodes, proxy, trunk,
    the calling SIPp), instead of leaving them running."""
    d = tmp_path / "demo"
    demo = subprocess.Popen([sys.executable, "-m", "sipha.cli", "demo", "--dir", str(d), "--port", str(free_port()),
                             "--calls", "2000", "--rate", "20", "--hold", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(d.glob("**/uac-*.csv")):   # the calls are under way
            assert demo.poll() is None, demo.stdout.read()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)
        cluster = Cluster(str(d))
        assert cluster.running("proxy")
        demo.terminate()
        out, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130, out[-3000:]
    assert "$ sipha down" in out
    assert not [name for name in cluster.procs() if cluster.running(name)]
    uac = subprocess.run(["pgrep", "-f", f"sipp.*{d}"], capture_output=True, text=True)
    assert uac.stdout == "", uac.stdout


def test_the_proxy_port_given_is_never_drawn_again_for_another_part(tmp_path, monkeypatch):
    """`sipha demo --port P` with P free but not bound yet: the ports the
    cluster draws for itself (a node's SIP, Redis or admin address) must
    not land on P, or the proxy cannot bind it (a CI run saw node2's admin
    take the proxy's port, and every call of the demo failed)."""
    import random

    from sipha import sipp
    from sipha.cluster import ClusterError
    port = free_port()
    sipp._handed_out.discard(port)                     # as a port chosen by another process
    first = iter([port] * 20)
    draw = random.randrange
    monkeypatch.setattr(sipp.random, "randrange", lambda a, b: next(first, None) or draw(a, b))

    def stop(self, nid):
        raise ClusterError("stopped before starting anything")
    monkeypatch.setattr(Cluster, "start_redis", stop)
    c = Cluster(str(tmp_path))
    with pytest.raises(ClusterError, match="stopped before"):
        c.up(nodes=2, port=port)
    drawn = [c.state["proxy"]["admin"], *(p for n in c.state["nodes"].values() for p in n.values())]
    assert port not in drawn and len(set(drawn)) == len(drawn)
