"""`sipha demo`: the README's first command after installation.

Starts the proxy with two SIPp UAS as backends on free loopback ports, runs
SIPp calls through it, SIGKILLs one backend half-way, and prints a summary:
calls attempted / succeeded / failed and the proxy log lines that show the
failover. Leaves nothing running.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time

from .sipp import Sipp, free_port


async def _wait_for(path: str, needle: str, proc, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"process exited early; see {path}")
        try:
            with open(path, errors="replace") as fh:
                if needle in fh.read():
                    return
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"not ready after {timeout}s; see {path}")


async def run_demo(calls: int, rate: float, workdir: str) -> int:
    procs = []
    backends = []
    try:
        ports = {"node1": free_port(), "node2": free_port()}
        for nid, port in ports.items():
            uas = Sipp("uas", local=("127.0.0.1", port), auto_answer=True, workdir=workdir)
            await uas.start()
            backends.append(uas)
        proxy_port = free_port()
        proxy_log = os.path.join(workdir, "proxy.log")
        cmd = [sys.executable, "-m", "sipha.cli", "proxy", "--listen", f"127.0.0.1:{proxy_port}",
               "--log-file", proxy_log]
        for nid, port in ports.items():
            cmd += ["--node", f"{nid}=127.0.0.1:{port}"]
        proxy = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL)
        procs.append(proxy)
        await _wait_for(proxy_log, "event=proxy_started", proxy)
        print(f"proxy on 127.0.0.1:{proxy_port} (udp+tcp), backends "
              + ", ".join(f"{n}=127.0.0.1:{p}" for n, p in ports.items()) + f"; logs in {workdir}")
        uac = Sipp("uac", target=("127.0.0.1", proxy_port), calls=calls, rate=rate, workdir=workdir)
        await uac.start()
        half = calls / rate / 2
        t0 = time.monotonic()
        killed = False
        while uac.proc.returncode is None:
            await asyncio.sleep(0.5)
            st = uac.progress()
            print(f"\r  calls done {st.get('SuccessfulCall(C)', 0):>5}  failed {st.get('FailedCall(C)', 0):>3}"
                  f"  rate {float(st.get('CallRate(C)', 0) or 0):6.1f}/s", end="", flush=True)
            if not killed and time.monotonic() - t0 >= half:
                backends[0].proc.send_signal(signal.SIGKILL)
                killed = True
                print("\n  SIGKILL node1 (a SIPp backend)")
        result = await uac.wait(120)
        print()
        print(f"calls attempted {result.created}, succeeded {result.ok}, failed {result.failed}, "
              f"retransmissions {result.retransmissions}")
        with open(proxy_log, errors="replace") as fh:
            lines = [ln.rstrip() for ln in fh if "event=node_down" in ln or "event=node_up" in ln
                     or "reason=failover" in ln]
        print("proxy log lines showing the failover:")
        for ln in lines[:6]:
            print("  " + ln)
        return 0 if result.failed == 0 and result.ok == calls else 1
    finally:
        for b in backends:
            await b.stop(0.5)
        for p in procs:
            if p.returncode is None:
                p.terminate()
                await p.wait()


def cmd_demo(args) -> int:
    workdir = args.dir or tempfile.mkdtemp(prefix="sipha-demo-")
    os.makedirs(workdir, exist_ok=True)
    return asyncio.run(run_demo(args.calls, args.rate, workdir))


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="run calls through a proxy, kill a backend half-way, summarize")
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--rate", type=float, default=40.0)
    p.add_argument("--dir", help="where logs go (default: a new temporary directory)")
    p.set_defaults(func=cmd_demo)
