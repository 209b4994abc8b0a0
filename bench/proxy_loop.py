"""The proxy's SIP work per call, without sockets or other processes: the
six datagrams of a SIPp `uac` call through the proxy-only path (INVITE,
180, 200, ACK, BYE, 200), fed to a real Proxy's byte paths in a loop, its
sends caught. A measurement, not a test: the figure to watch while
changing the hot path, steadier than a SIPp run on a shared box.

    .venv/bin/python bench/proxy_loop.py [--calls 3000] [--repeat 5] [--log-level info] [--profile]

The calls are written first (their answers need the branches the proxy
writes), then replayed through fresh proxies, so what one remembers of a
Call-ID is not there yet, as for a new call. On a shared box a run can
cost 40 % more than the next: the best of several is the figure to
compare, the median says how noisy the box was. Loopback only: the proxy
binds a free port on 127.0.0.1 and sends nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import fastpath  # noqa: E402
from proxy.server import Proxy  # noqa: E402
from sipcore import bekey, headers, heap  # noqa: E402
from sipcore.config import load_config  # noqa: E402
from sipcore.logfmt import setup_logging  # noqa: E402
from sipcore.message import parse_message  # noqa: E402
from sipha.sipp import free_port  # noqa: E402

BACKEND = ("127.0.0.1", 45001)      # the SIPp UAS the proxy routes to, as a node
CALLER = ("127.0.0.1", 45010)
SDP = ("v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def request(method: str, i: int, cseq: int, to_tag: str | None = None, routes=(), body: str = "") -> bytes:
    """What SIPp's uac.xml sends for call `i`."""
    ctype = "Content-Type: application/sdp\r\n" if body else ""
    return (f"{method} sip:service@127.0.0.1:5090 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:45010;branch=z9hG4bK-{i}-{cseq}-{method}\r\n"
            f"From: sipp <sip:sipp@127.0.0.1:45010>;tag={i}SIPpTag00{i}\r\n"
            f"To: service <sip:service@127.0.0.1:5090>{f';tag={to_tag}' if to_tag else ''}\r\n"
            f"Call-ID: {i}-1234@127.0.0.1\r\nCSeq: {cseq} {method}\r\n"
            + "".join(f"Route: {r}\r\n" for r in routes)
            + f"Contact: sip:sipp@127.0.0.1:45010\r\nMax-Forwards: 70\r\nSubject: Performance Test\r\n"
            f"{ctype}Content-Length: {len(body)}\r\n\r\n{body}").encode()


def answer(forwarded: bytes, status: int, reason: str, to_tag: str) -> bytes:
    """What SIPp's uas.xml answers to a request the proxy forwarded."""
    m = parse_message(forwarded)
    to = m.get("To") + ("" if ";tag=" in m.get("To") else f";tag={to_tag}")
    return ("".join([f"SIP/2.0 {status} {reason}\r\n", *(f"Via: {v}\r\n" for v in m.values("Via")),
                     *(f"Record-Route: {v}\r\n" for v in m.values("Record-Route"))])
            + f"From: {m.get('From')}\r\nTo: {to}\r\nCall-ID: {m.call_id}\r\nCSeq: {m.get('CSeq')}\r\n"
            f"Contact: <sip:127.0.0.1:45001;transport=UDP>\r\nContent-Length: 0\r\n\r\n").encode()


async def start_proxy(port: int, level: str) -> tuple[Proxy, list]:
    cfg = load_config(None, overrides={"proxy.listen": f"127.0.0.1:{port}", "proxy.admin": "off",
                                       "health.probe": False, "log.level": level},
                      nodes=[f"node1={BACKEND[0]}:{BACKEND[1]}"])
    proxy = Proxy(cfg)
    await proxy.start()
    heap.settle()                   # as sipha proxy does once started
    sent: list = []
    proxy.transport.send = lambda data, dest, transport="udp": sent.append(data)
    return proxy, sent


async def write_calls(port: int, n: int, level: str) -> list[list[tuple[bytes, tuple]]]:
    proxy, sent = await start_proxy(port, level)
    calls = []
    try:
        for i in range(n):
            tag = f"uas{i}"
            invite = request("INVITE", i, 1, body=SDP)
            if not proxy.fast_datagram(invite, CALLER, proxy.transport):
                raise SystemExit("the INVITE took the full parser: not what this measures")
            forwarded = sent[-1]
            routes = parse_message(forwarded).values("Record-Route")
            bye = request("BYE", i, 2, tag, routes)
            proxy.fast_datagram(bye, CALLER, proxy.transport)
            calls.append([(invite, CALLER), (answer(forwarded, 180, "Ringing", tag), BACKEND),
                          (answer(forwarded, 200, "OK", tag), BACKEND), (request("ACK", i, 1, tag, routes), CALLER),
                          (bye, CALLER), (answer(sent[-1], 200, "OK", tag), BACKEND)])
    finally:
        await proxy.close()
    return calls


def forget_memos() -> None:
    """Empty what the modules remember across proxies (a Call-ID's BEKey,
    a From's tag, a BEKey's ranking...): a replayed call must cost what a
    new one does, not what the same call seen in the last replay does."""
    for memo in (bekey._BEKEYS, bekey._STAMPS, bekey._RANKS, fastpath._URIS, fastpath._TAGS, headers._HOSTPORTS,
                 headers._NAME_ADDRS):
        memo.clear()


async def replay(port: int, calls, level: str, profile: cProfile.Profile | None) -> float:
    """CPU seconds a fresh proxy takes for calls[200:], after calls[:200]."""
    await asyncio.sleep(0.2)                    # the last proxy's port is free again
    proxy, sent = await start_proxy(port, level)
    forget_memos()
    try:
        def play(some):
            for call in some:
                for data, src in call:
                    if not proxy.fast_datagram(data, src, proxy.transport):
                        raise SystemExit(f"took the full parser: {data[:30]!r}")
            sent.clear()
        play(calls[:200])                       # warm up
        if profile:
            profile.enable()
        c0 = time.process_time()
        play(calls[200:])
        cpu = time.process_time() - c0
        if profile:
            profile.disable()
    finally:
        await proxy.close()
    return cpu


async def main(args) -> None:
    port = free_port()
    n = args.calls
    with tempfile.TemporaryDirectory() as work:
        setup_logging("proxy", level=args.log_level, path=f"{work}/proxy.log")
        calls = await write_calls(port, n + 200, args.log_level)
        written = len(Path(f"{work}/proxy.log").read_text(errors="replace").splitlines())
        profile = cProfile.Profile() if args.profile else None
        runs = sorted([await replay(port, calls, args.log_level, profile) for _ in range(args.repeat)])
        lines = len(Path(f"{work}/proxy.log").read_text(errors="replace").splitlines()) - written
    best, median = runs[0] / n * 1e6, runs[len(runs) // 2] / n * 1e6
    print(f"{n} calls x {args.repeat}, log level {args.log_level}: {best:.0f} us of CPU a call at best, "
          f"{median:.0f} median ({best / 6:.1f} and {median / 6:.1f} a message); "
          f"{lines / (n + 200) / args.repeat:.1f} log lines a call")
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=5, help="fresh proxies replaying the calls; the best and the median")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    ap.add_argument("--profile", action="store_true", help="cProfile the replay (slower; for where, not how much)")
    args = ap.parse_args()
    if args.calls < 1 or args.repeat < 1:
        ap.error("--calls and --repeat must be at least 1")
    asyncio.run(main(args))
