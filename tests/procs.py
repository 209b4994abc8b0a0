"""Start and stop the real processes end-to-end tests talk to."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sipha.cluster import spawn_redis as start_redis  # noqa: F401 (the tests' name for it)
from sipha.sipp import free_port


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class Proc:
    def __init__(self, name: str, popen: subprocess.Popen, log: Path):
        self.name, self.popen, self.log = name, popen, log

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def lines(self, needle: str) -> list[str]:
        return [line for line in self.text().splitlines() if needle in line]

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()


class Procs:
    def __init__(self, tmp: Path):
        self.tmp = Path(tmp)
        self.all: list[Proc] = []

    def start(self, name: str, cmd: list[str], *, ready: str | None = None,
              timeout: float = 10.0, env: dict | None = None) -> Proc:
        log = self.tmp / f"{name}.log"
        fh = open(log, "ab")
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                 env={**os.environ, **(env or {})}, cwd=self.tmp)
        proc = Proc(name, popen, log)
        self.all.append(proc)
        if ready:
            deadline = time.monotonic() + timeout
            while ready not in proc.text():
                if popen.poll() is not None:
                    raise RuntimeError(f"{name} exited (rc={popen.returncode}):\n{proc.text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready after {timeout}s:\n{proc.text()[-3000:]}")
                time.sleep(0.05)
        return proc

    def sipha(self, name: str, *args: str, ready: str | None = None, **kw) -> Proc:
        return self.start(name, [sys.executable, "-m", "sipha.cli", *args], ready=ready, **kw)

    def proxy(self, nodes: dict[str, tuple[str, int]], *extra: str, port: int | None = None,
              ready: str | None = "event=proxy_started", env: dict | None = None):
        port = port or free_port()
        args = ["proxy", "--listen", f"127.0.0.1:{port}", "--log-level", "debug", "--admin", "off", *extra]
        for nid, (h, p) in nodes.items():
            args += ["--node", f"{nid}={h}:{p}"]
        proc = self.sipha("proxy", *args, ready=ready, env=env)
        return proc, ("127.0.0.1", port)

    def sipp_uas(self, name: str, port: int, transport: str = "udp", scenario: str = "uas") -> Proc:
        from sipha.sipp import Sipp
        s = Sipp(scenario, local=("127.0.0.1", port), transport=transport, auto_answer=True,
                 workdir=str(self.tmp))
        proc = self.start(name, s.command())
        time.sleep(0.2)
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{name} exited: {proc.text()[-2000:]}")
        return proc

    def stop_all(self) -> None:
        for p in reversed(self.all):
            if p.popen.poll() is None:
                p.popen.terminate()
        deadline = time.monotonic() + 5
        for p in self.all:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
