"""Test helpers around a real local cluster (sipha.cluster.Cluster)."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import redis

from sipcore.bekey import rank
from sipha.sipp import Sipp


def redis_of(cluster, nid: str) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=cluster.state["nodes"][nid]["redis"], socket_timeout=2)


def keys(cluster, nid: str) -> dict[str, dict[str, dict]]:
    """{'active': {bekey: record}, 'replica': {...}} in one node's Redis."""
    r = redis_of(cluster, nid)
    out: dict[str, dict[str, dict]] = {"active": {}, "replica": {}}
    for key in r.scan_iter(match="sipha:*", count=1000):
        _, space, bekey = key.decode().split(":")
        raw = r.get(key)
        if raw is not None:
            out[space][bekey] = json.loads(raw)
    return out


def all_keys(cluster, alive=None) -> dict[str, dict]:
    return {nid: keys(cluster, nid) for nid in cluster.state["nodes"] if alive is None or nid in alive}


def assert_replicas_where_design_says(cluster, alive=None):
    """Every active record has its replica on the partner it names, and that
    partner is a live node other than the owner."""
    snap = all_keys(cluster, alive)
    n_active = 0
    for nid, spaces in snap.items():
        for bekey, rec in spaces["active"].items():
            n_active += 1
            partner = rec.get("p")
            assert partner and partner != nid, (nid, bekey, rec)
            assert bekey in snap[partner]["replica"], f"{bekey} active on {nid}, no replica on {partner}"
    return snap, n_active


def busiest(snap: dict[str, dict], space: str = "active") -> str:
    """The node with the most records in `space` of a snapshot (all_keys)."""
    return max(snap, key=lambda n: len(snap[n][space]))


def node_ids(cluster) -> list[str]:
    return list(cluster.state["nodes"])


def owner_in_rank(cluster, bekey: str) -> str:
    return rank(bekey, node_ids(cluster))[0]


def run(coro):
    return asyncio.run(coro)


def uac(cluster, scenario="uac", **kw) -> Sipp:
    kw.setdefault("workdir", str(cluster.dir / "logs"))
    return Sipp(scenario, target=cluster.proxy_addr, **kw)


def calls_reach(cluster, phone, calls: int = 2) -> None:
    """SIPp calls the user of `phone` (registered, not yet started)
    `calls` times over UDP: each call completes, and the phone takes each
    INVITE and, once the node answered the caller's BYE, its own BYE."""
    phone.start()
    result = run(uac(cluster, "uac", calls=calls, rate=5, hold_ms=300, service=phone.user).run(30))
    assert result.ok == calls and result.failed == 0, result.log_tail
    deadline = time.monotonic() + 3
    while phone.got.count("BYE") < calls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert phone.got.count("INVITE") == calls and phone.got.count("BYE") == calls


def logged(path, needle: str, seconds: float = 3.0) -> str:
    """The text of the log at `path` once `needle` is in it (a process
    logs what it did after doing it), or as it is after `seconds`."""
    deadline = time.monotonic() + seconds
    text = path.read_text()
    while needle not in text and time.monotonic() < deadline:
        time.sleep(0.05)
        text = path.read_text()
    return text


def first_read(sock: socket.socket, seconds: float) -> bytes | None:
    """What the peer sends first within `seconds`: b"" when it closes (or
    resets) the connection, None when it sends nothing."""
    sock.settimeout(seconds)
    try:
        return sock.recv(100)
    except ConnectionResetError:
        return b""
    except socket.timeout:
        return None
