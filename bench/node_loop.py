"""A node's SIP and Redis work per call, without the proxy or SIPp: the
messages of a SIPp `uac` call through the full HA path as the owning node
sees them (the caller's INVITE, the callee's 180 and 200, the caller's
ACK and BYE, the callee's 200 to the BYE), fed to a real Node in waves
of concurrent calls under uvloop, its Redis and its partner's Redis real
redis-servers, its sends caught. A measurement, not a test: the figure
to watch while changing the node, as bench/proxy_loop.py is the proxy's.

    .venv/bin/python bench/node_loop.py [--calls 2000] [--wave 50] [--repeat 3] [--profile] [--gc python]

The figure is the node process's CPU a call (the Redis servers' is not
in it), less what this script spends writing the callee's answers. As
with proxy_loop, the best of several runs is the figure to compare on a
shared box. Loopback only: the redis-servers listen on 127.0.0.1, the
node sends nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.app import Node  # noqa: E402
from sipcore import heap  # noqa: E402
from sipcore.bekey import ROUTE_HEADER, bekey_of  # noqa: E402
from sipcore.config import load_config  # noqa: E402
from sipcore.logfmt import setup_logging  # noqa: E402
from sipcore.message import parse_message  # noqa: E402
from sipha.cluster import ClusterError, spawn_redis  # noqa: E402
from sipha.sipp import free_port  # noqa: E402

PROXY = "127.0.0.1:5999"
FROM_PROXY = ("127.0.0.1", 5999)
SDP = ("v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def caller(method: str, i: int, cseq: int, to_tag: str | None = None) -> bytes:
    """What SIPp's uac.xml sends for call `i`, as the proxy hands it to
    its owner (its Via on top, its Record-Route, its routing header)."""
    call_id = f"{i}-1234@127.0.0.1"
    body = SDP if method == "INVITE" else ""
    ctype = "Content-Type: application/sdp\r\n" if body else ""
    rr = f"Record-Route: <sip:{PROXY};lr>\r\n" if method == "INVITE" else ""
    return (f"{method} sip:service@{PROXY} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {PROXY};branch=z9hG4bKsph-{i}-{cseq}-{method}\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:45010;branch=z9hG4bK-{i}-{cseq}-{method};received=127.0.0.1;rport=45010\r\n"
            f"{rr}From: sipp <sip:sipp@127.0.0.1:45010>;tag={i}SIPpTag00{i}\r\n"
            f"To: service <sip:service@{PROXY}>{f';tag={to_tag}' if to_tag else ''}\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n"
            f"Contact: sip:sipp@127.0.0.1:45010\r\nMax-Forwards: 69\r\nSubject: Performance Test\r\n"
            f"{ROUTE_HEADER}: bekey={bekey_of(call_id)};owner=node1;partner=node2;reason=owner\r\n"
            f"{ctype}Content-Length: {len(body)}\r\n\r\n{body}").encode()


_FIELD = re.compile(rb"^(Via|From|To|Call-ID|CSeq): ?(.*?)\r$", re.M)


def callee(request: bytes, status: int, reason: str) -> bytes:
    """What SIPp's uas.xml answers to a request the node sent (through
    the proxy, whose Via is left out: the node's is the top one)."""
    lines = [f"SIP/2.0 {status} {reason}".encode()]
    for m in _FIELD.finditer(request.split(b"\r\n\r\n", 1)[0]):
        name, value = m.group(1), m.group(2)
        if name == b"To" and b";tag=" not in value:
            value += b";tag=uas-1"
        lines.append(name + b": " + value)
    return b"\r\n".join(lines + [b"Contact: <sip:127.0.0.1:45001;transport=UDP>", b"Content-Length: 0", b"", b""])


class Run:
    """One node, the calls fed to it in waves; `driver` counts the CPU
    this script spends writing answers, to leave out of the figure."""

    def __init__(self, node: Node):
        self.node = node
        self.sent: list[bytes] = []
        node.tx._send = lambda data, dest: self.sent.append(data)
        self.driver = 0.0
        # told when the node's last message task ends: waiting for that
        # by polling would add CPU of its own, most in small waves
        self.idle = asyncio.Event()
        handle = node._locked

        async def locked(*args) -> None:
            try:
                await handle(*args)
            finally:
                if not node.inflight:
                    self.idle.set()
        node._locked = locked

    async def settled(self) -> None:
        await asyncio.sleep(0)              # what on_message spawned starts (and counts in inflight)
        while self.node.inflight:
            self.idle.clear()
            await self.idle.wait()

    def feed(self, datagrams: list[bytes]) -> None:
        for data in datagrams:
            self.node.on_message(parse_message(data), FROM_PROXY, "udp")

    def take(self, start: bytes, count: int) -> list[bytes]:
        """The `count` datagrams the node sent that start with `start`
        (and forget what it sent)."""
        out = [d for d in self.sent if d.startswith(start)]
        if len(out) != count:
            raise SystemExit(f"the node sent {len(out)} {start.decode().strip()} for {count} calls")
        self.sent.clear()
        return out

    async def wave(self, first: int, count: int) -> None:
        calls = range(first, first + count)
        self.feed([caller("INVITE", i, 1) for i in calls])
        await self.settled()
        invites = self.take(b"INVITE ", count)
        for status, reason in ((180, "Ringing"), (200, "OK")):
            c0 = time.process_time()
            answers = [callee(inv, status, reason) for inv in invites]
            self.driver += time.process_time() - c0
            self.feed(answers)
            await self.settled()
        tags = {}
        for ok in self.take(b"SIP/2.0 200", count):
            call_id = re.search(rb"\r\nCall-ID: ([^\r]+)", ok).group(1).decode()
            tags[int(call_id.split("-")[0])] = re.search(rb"\r\nTo: [^\r]*;tag=([^\r;]+)", ok).group(1).decode()
        self.feed([caller("ACK", i, 1, tags[i]) for i in calls])
        self.feed([caller("BYE", i, 2, tags[i]) for i in calls])
        await self.settled()
        byes = self.take(b"BYE ", count)
        c0 = time.process_time()
        answers = [callee(bye, 200, "OK") for bye in byes]
        self.driver += time.process_time() - c0
        self.feed(answers)
        await self.settled()
        self.sent.clear()


async def measure(redis_ports: list[int], calls: int, wave: int, warm: int, profile, settle_heap: bool) -> float:
    cfg = load_config(None, overrides={"node.admin": "off", "node.upstream": "sip:service@127.0.0.1:45001",
                                       "proxy.internal": PROXY},
                      nodes=[f"node{i + 1}=127.0.0.1:{7001 + i},redis://127.0.0.1:{port}/0"
                             for i, port in enumerate(redis_ports)])
    node = Node(cfg, "node1")
    run = Run(node)
    if settle_heap:
        heap.settle()                       # as sipha node does once started
    try:
        for first in range(0, warm, wave):
            await run.wave(first, min(wave, warm - first))
        run.driver = 0.0
        if profile:
            profile.enable()
        c0 = time.process_time()
        for first in range(warm, warm + calls, wave):
            await run.wave(first, min(wave, warm + calls - first))
        cpu = time.process_time() - c0 - run.driver
        if profile:
            profile.disable()
    finally:
        node.tx.close()
        await node.store.close()
    return cpu / calls


async def main(args) -> None:
    with tempfile.TemporaryDirectory() as work:
        setup_logging("node", level=args.log_level, path=str(Path(work) / "node.log"))
        ports = [free_port(), free_port()]
        redis = []
        try:
            for p in ports:
                redis.append(spawn_redis(p, work))
            profile = cProfile.Profile() if args.profile else None
            figures = []
            for r in range(args.repeat):
                figures.append(await measure(ports, args.calls, args.wave, 200, profile, args.gc == "sipha"))
                left = [subprocess.run(["redis-cli", "-p", str(p), "dbsize"], capture_output=True,
                                       text=True).stdout.strip() for p in ports]
                if left != ["0", "0"]:      # every call ended: its record and replica are gone
                    raise SystemExit(f"keys left in the node's and the partner's Redis: {left}")
        except ClusterError as exc:
            raise SystemExit(str(exc))
        finally:
            for p in redis:
                p.kill()
                p.wait()
    figures.sort()
    print(f"{args.calls} calls x {args.repeat} in waves of {args.wave}, log level {args.log_level}, gc {args.gc}: "
          f"{figures[0] * 1e6:.0f} us of CPU a call at best, {figures[len(figures) // 2] * 1e6:.0f} median")
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--wave", type=int, default=50, help="calls set up, answered and ended together")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    ap.add_argument("--profile", action="store_true", help="cProfile the calls (slower; for where, not how much)")
    ap.add_argument("--gc", choices=["sipha", "python"], default="sipha",
                    help="the garbage collector as a node sets it (sipcore/heap.py), or Python's defaults")
    args = ap.parse_args()
    if args.calls < 1 or args.wave < 1 or args.repeat < 1:
        ap.error("--calls, --wave and --repeat must be at least 1")
    try:
        import uvloop                       # as the node runs (sipha/cli.py)
    except ImportError:
        uvloop = None
    (uvloop.run if uvloop is not None else asyncio.run)(main(args))
