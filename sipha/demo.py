"""`sipha demo`: the main job, the README's first command after installing.

    sipha up --nodes 4 --trunk sipp
    sipha load (calls with a hold)   -- half-way: sipha kill <busiest node>
                                     -- later:    sipha start <that node>
    summary: calls attempted / succeeded / failed, dialogs promoted and
             migrated back, the proxy log lines showing failover and ramp
    sipha down

Everything runs on loopback under a fresh directory; nothing is left
running, even when interrupted.
"""
from __future__ import annotations

import asyncio
import os
import tempfile
import time

from sipcore.logfmt import parse_logfmt

from .cluster import Cluster, port_in_use, render, run_load, stop_on_sigterm
from .sipp import Sipp, free_port


async def busiest(cluster: Cluster) -> str:
    rows = (await asyncio.to_thread(cluster.status))["nodes"]
    return max(rows, key=lambda r: r["active"] or 0)["node"]


async def drive(cluster: Cluster, calls: int, rate: float, hold: float, transport: str):
    sipp = Sipp("uac", target=cluster.proxy_addr, calls=calls, rate=rate, hold_ms=int(hold * 1000),
                transport=transport, workdir=str(cluster.dir / "logs"))
    offered = calls / rate
    plan = {"kill_at": offered / 2, "start_at": offered / 2 + 4.0}
    t0 = time.monotonic()
    done = {}

    async def tick(_stats):
        now = time.monotonic() - t0
        if "killed" not in done and now >= plan["kill_at"]:
            victim = await busiest(cluster)
            cluster.kill(victim)
            done["killed"] = victim
            print(f"\n>>> sipha kill {victim}   (the node holding the most active dialogs: SIGKILL, with its Redis)")
        elif "killed" in done and "started" not in done and now >= plan["start_at"]:
            await asyncio.to_thread(cluster.start_node, done["killed"])
            done["started"] = True
            print(f"\n>>> sipha start {done['killed']}   (it comes back empty and ramps up)")

    result = await run_load(sipp, tick)
    return result, done.get("killed")


def call_records(cluster: Cluster, calls: int) -> str:
    """How many calls the nodes wrote a call record (event=cdr) for (of
    the `calls` that completed)."""
    ids = [r.get("call_id") for r in cluster.call_records(calls)]
    return (f"call records (event=cdr in the node logs): {len(ids)}, for {len(set(ids))} calls "
            f"(one per call, whichever node ended it)")


def summary(cluster: Cluster, result, victim: str | None) -> str:
    st = cluster.status()
    promoted = sum(r["promoted"] or 0 for r in st["nodes"])
    migrated = sum(r["migrated"] or 0 for r in st["nodes"])
    lines = ["", "=== summary ===",
             f"calls attempted {result.created}, succeeded {result.ok}, failed {result.failed} "
             f"(SIPp retransmissions {result.retransmissions})",
             f"killed and restarted: {victim}",
             f"dialogs promoted from replicas: {promoted}; dialogs migrated between nodes: {migrated}",
             call_records(cluster, result.ok)]
    rows = [("node", "health", "load", "active", "replica", "promoted", "migrated")]
    for r in st["nodes"]:
        rows.append((r["node"], r["health"], r["load_factor"], r["active"], r["replica"], r["promoted"], r["migrated"]))
    lines.append(render(rows))
    log = cluster.dir / "logs" / "proxy.log"
    wanted = []
    first_failover = first_ramp = None
    for line in log.read_text(errors="replace").splitlines():
        f = parse_logfmt(line)
        ev = f.get("event")
        if ev in ("node_down", "node_up"):
            wanted.append(line)
        elif ev == "load_factor" and f.get("load_factor") in ("1.0", "1"):
            wanted.append(line)
        elif ev == "route" and f.get("reason") == "failover" and first_failover is None:
            first_failover = line
            wanted.append(line)
        elif ev == "route" and f.get("reason") == "ramp" and first_ramp is None:
            first_ramp = line
            wanted.append(line)
    lines.append(f"proxy log lines showing failover and ramp (all in {log}):")
    lines += ["  " + w for w in wanted[:10]]
    example = parse_logfmt(first_failover).get("call_id") if first_failover else "CALL-ID"
    lines.append(f"follow a failed-over call across every process: sipha logs --dir {cluster.dir} --call {example}")
    return "\n".join(lines)


def cmd_demo(args) -> int:
    directory = args.dir or tempfile.mkdtemp(prefix="sipha-demo-")
    os.makedirs(directory, exist_ok=True)
    port = args.port
    if port_in_use("127.0.0.1", port):
        port = free_port()
        print(f"port {args.port} is busy; the proxy uses {port}")
    cluster = Cluster(directory)
    print(f"$ sipha up --nodes {args.nodes} --trunk sipp --dir {directory}")
    stop_on_sigterm()
    try:
        cluster.up(nodes=args.nodes, port=port, trunk="sipp", ramp=args.ramp)
        print(cluster.table())
        print(f"$ sipha load --calls {args.calls} --rate {args.rate:g} --hold {args.hold:g}")
        result, victim = asyncio.run(drive(cluster, args.calls, args.rate, args.hold, args.transport))
        time.sleep(1.0)
        print(summary(cluster, result, victim))
        ok = result.failed == 0 and result.ok == args.calls
    finally:
        cluster.down()
        print(f"$ sipha down   (logs kept in {directory}/logs)")
    return 0 if ok else 1


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="the main job: a 4-node cluster, calls, a node killed and restarted")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--hold", type=float, default=8.0, help="seconds each call is held")
    p.add_argument("--ramp", type=float, default=6.0, help="ramp-up seconds of the returning node")
    p.add_argument("--transport", choices=["udp", "tcp"], default="udp")
    p.add_argument("--port", type=int, default=5060)
    p.add_argument("--dir", help="where the cluster lives (default: a new temporary directory)")
    p.set_defaults(func=cmd_demo)
