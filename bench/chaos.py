"""Calls through a local cluster while its parts fail one after another:
SIPp's own counts, and every warning and error the cluster logged.

    .venv/bin/python bench/chaos.py                         # 3200 calls, 40/s, held 6 s, UDP
    .venv/bin/python bench/chaos.py --scenario reinvite --hold 2500 --transport tcp

Over 80 s of calls, 8 s apart: a node killed with its Redis (a host
lost) and started again, a node hung (SIGSTOP, 4 s) and woken, a node
stopped for an upgrade (it drains) and started again, a node's process
killed with its Redis left and started again, a node's Redis killed and
started again (empty), the proxy killed and started again 2 s later
(over UDP only: SIPp's TCP connection ends with the proxy); with
--membership, then a node added and one removed, each a reload of the
node list (SIGHUP) in the proxy and every other node. A run ends
with SIPp's successful and failed calls and the log lines above info,
counted by process, level and event; the exit status is 1 when a call
failed. Runs like this found
the windows tests/test_node_takeover.py pins down (a hung node's queue
replayed after its partner finished the calls). Loopback only.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sipcore.logfmt import parse_logfmt  # noqa: E402
from sipha.cluster import Cluster, stop_on_sigterm  # noqa: E402
from sipha.sipp import Sipp, free_port  # noqa: E402

GAP = 8.0       # seconds between one failure and the next step


async def failures(c: Cluster, transport: str, membership: bool = False) -> None:
    steps = [
        ("kill node2 (and its Redis)", lambda: c.kill("node2")),
        ("start node2", lambda: c.start_node("node2")),
        ("hang node3", lambda: c.pause("node3")),
        ("wake node3", lambda: c.resume("node3")),
        ("stop node4 (drain)", lambda: c.stop("node4")),
        ("start node4", lambda: c.start_node("node4", redis=False)),
        ("kill node1's process (its Redis stays)", lambda: c.kill("node1", process_only=True)),
        ("start node1", lambda: c.start_node("node1", redis=False)),
        ("kill node3's Redis", lambda: c.kill_redis("node3")),
        ("start node3's Redis (empty)", lambda: c.start_redis("node3")),
        ("kill the proxy", lambda: c.kill("proxy")),
        ("start the proxy", c.restart_proxy),
    ]
    if membership:
        # each reloads the node list (SIGHUP) in the proxy and every other node
        steps += [("add a node", c.add_node), ("remove node1", lambda: c.remove_node("node1"))]
    if transport == "tcp":
        # its TCP connections end with the proxy, and SIPp's reconnection
        # (-max_reconnect) is not reliable enough to count calls by
        restart_proxy = {"kill the proxy", "start the proxy"}
        steps = [(what, do) for what, do in steps if what not in restart_proxy]
    pause = {"wake node3": 4.0, "start the proxy": 2.0}
    for i, (what, do) in enumerate(steps):
        await asyncio.sleep(pause.get(what, GAP if i % 2 == 0 else 6.0))
        print(f"  {what}", flush=True)
        await asyncio.to_thread(do)


def above_info(logs: Path) -> collections.Counter:
    seen: collections.Counter = collections.Counter()
    for path in sorted(logs.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if "level=warning" in line or "level=error" in line:
                f = parse_logfmt(line)
                seen[(path.stem, f.get("level", "?"), f.get("event", "?"))] += 1
    return seen


async def run(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="sipha-chaos-"))
    c = Cluster(str(work / "cluster"))
    c.up(nodes=4, port=free_port(), trunk="sipp", trunk_scenario=args.trunk_scenario, ramp=3.0, log_level="info",
         ipv6_nodes=args.ipv6_nodes, ipv6_only=args.ipv6_only)
    try:
        await asyncio.sleep(1.5)
        sipp = Sipp(args.scenario, target=c.proxy_addr, calls=args.calls, rate=args.rate, hold_ms=args.hold,
                    transport=args.transport, workdir=str(work), extra=["-recv_timeout", "40000"])
        print(f"{args.calls} calls ({args.scenario} to {args.trunk_scenario}, {args.transport}) at {args.rate:g}/s, "
              f"held {args.hold} ms")
        await sipp.start()
        await failures(c, args.transport, args.membership)
        result = await sipp.wait(args.calls / args.rate + 120)
    finally:
        c.down()
    print(f"SIPp: {result.ok} successful, {result.failed} failed, {result.retransmissions} retransmissions")
    for (proc, level, name), n in sorted(above_info(work / "cluster" / "logs").items()):
        print(f"  {n:5d}  {proc} {level} {name}")
    print(f"logs and SIPp's files: {work}")
    return 0 if result.failed == 0 and result.ok == args.calls else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3200)
    ap.add_argument("--rate", type=float, default=40.0, help="calls per second")
    ap.add_argument("--hold", type=int, default=6000, help="ms each call is held (the scenario's pause)")
    ap.add_argument("--scenario", default="uac", help="a SIPp scenario of sipp_scenarios/ (uac, reinvite, indialog)")
    ap.add_argument("--trunk-scenario", default="uas",
                    help="the SIPp trunk's scenario (uas; uas_hangup with uac_wait_bye, uas_prack with uac_prack...)")
    ap.add_argument("--ipv6-nodes", action="store_true", help="the nodes on [::1], the proxy reaching them over IPv6")
    ap.add_argument("--ipv6-only", action="store_true", help="--ipv6-nodes, and the proxy on [::1] only")
    ap.add_argument("--transport", choices=["udp", "tcp"], default="udp")
    ap.add_argument("--membership", action="store_true",
                    help="then a node added and one removed (sipha add-node, remove-node; UDP only): "
                         "give --calls 5600 to keep calls coming through them")
    args = ap.parse_args()
    if args.calls < 1 or args.rate <= 0 or args.hold < 0:
        ap.error("--calls, --rate and --hold must be positive")
    for option, name in (("--scenario", args.scenario), ("--trunk-scenario", args.trunk_scenario)):
        if not (ROOT / "sipp_scenarios" / f"{name}.xml").exists():
            ap.error(f"{option}: no sipp_scenarios/{name}.xml")
    stop_on_sigterm()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
