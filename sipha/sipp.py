"""A small SIPp launcher, in the spirit of pysipp: build a `sipp` command
line, run it under asyncio with `-trace_stat`, read its statistics CSV and
return a result (calls ok / failed, rate, retransmissions, response times).

    result = await Sipp("uac", target=("127.0.0.1", 5060), calls=100, rate=50).run()
    assert result.failed == 0 and result.ok == 100

`scenario` is a SIPp built-in name (uac, uas, ...) or the name of a file in
sipp_scenarios/ (with or without .xml) or a path.
"""
from __future__ import annotations

import asyncio
import csv
import os
import random
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "sipp_scenarios"
BUILTIN = {"uac", "uas", "regexp", "3pcc-C-A", "3pcc-C-B", "3pcc-A", "3pcc-B", "branchc", "branchs",
           "uac_pcap"}


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on host right now, chosen below the
    kernel's ephemeral range: a port from that range may be taken by any
    outgoing socket (a Redis client, a probe) before our server binds it."""
    high = min(_ephemeral_low(), 65535)
    low = max(1024, high - 12000)
    for _ in range(200):
        port = random.randrange(low, high)
        if port in _handed_out:
            continue
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as u, socket.socket(family, socket.SOCK_STREAM) as t:
                u.bind((host, port))
                t.bind((host, port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise OSError("no free port")


def claim_port(port: int) -> int:
    """A port chosen otherwise, never to be handed out by free_port."""
    _handed_out.add(port)
    return port


def scenario_path(name: str) -> str | None:
    """The XML file's path (ours first: sipp_scenarios/uac.xml shadows the
    built-in uac), or None for a SIPp built-in."""
    for cand in (SCENARIO_DIR / f"{name}.xml", SCENARIO_DIR / name, Path(name)):
        if cand.is_file():
            return str(cand)
    if name in BUILTIN:
        return None
    raise FileNotFoundError(f"no SIPp scenario {name!r} (built-ins: {', '.join(sorted(BUILTIN))}; "
                            f"files: {', '.join(sorted(p.stem for p in SCENARIO_DIR.glob('*.xml')))})")


class SippError(RuntimeError):
    """SIPp could not run (bad option, port in use, cannot connect)."""


@dataclass
class SippResult:
    returncode: int
    ok: int = 0
    failed: int = 0
    created: int = 0
    retransmissions: int = 0
    rate: float = 0.0
    elapsed: float = 0.0
    response_time_ms: float | None = None
    call_length_ms: float | None = None
    stats: dict = field(default_factory=dict)
    log_tail: str = ""

    @property
    def all_ok(self) -> bool:
        return self.failed == 0 and self.ok > 0 and self.ok == self.created

    def __str__(self) -> str:
        return (f"sipp rc={self.returncode} created={self.created} ok={self.ok} failed={self.failed} "
                f"retransmissions={self.retransmissions} rate={self.rate:.1f}/s")


def _hms_to_s(text: str) -> float:
    """SIPp durations: 'HH:MM:SS' or 'HH:MM:SS:uuuuuu'."""
    parts = text.strip().split(":")
    try:
        h, m, s = int(parts[0]), int(parts[1]), int(parts[2])
        us = int(parts[3]) if len(parts) > 3 else 0
    except (ValueError, IndexError):
        return 0.0
    return h * 3600 + m * 60 + s + us / 1e6


def read_stats(path: str) -> dict:
    """The last row of a SIPp -trace_stat CSV, as {column: value}."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh, delimiter=";"))
    if len(rows) < 2:
        return {}
    header, last = rows[0], rows[-1]
    return {k: v for k, v in zip(header, last) if k}


class Sipp:
    def __init__(self, scenario: str, *, target: tuple[str, int] | None = None,
                 local: tuple[str, int] | None = None, transport: str = "udp",
                 calls: int | None = None, rate: float | None = None, hold_ms: int | None = None,
                 limit: int | None = None, keys: dict[str, str] | None = None,
                 extra: list[str] | None = None, timeout_s: float | None = None,
                 auto_answer: bool = False, workdir: str | None = None, service: str | None = None):
        if transport not in ("udp", "tcp"):
            raise ValueError(f"--transport: expected udp or tcp, got {transport!r}")
        self.scenario = scenario
        self.target = target
        # by default the loopback address of the target's family
        here = "::1" if target is not None and ":" in target[0] else "127.0.0.1"
        self.local = local or (here, free_port(here))
        self.transport = transport
        self.calls, self.rate, self.hold_ms, self.limit = calls, rate, hold_ms, limit
        self.keys = keys or {}
        self.extra = extra or []
        self.timeout_s = timeout_s
        self.auto_answer = auto_answer
        self.service = service
        # a directory of our own when none is given: removed after a run
        # that went well, kept (SIPp's error log in it) after one that did not
        self.own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="sipp-")
        self.stat_file = os.path.join(self.workdir, f"{Path(scenario).stem}-{self.local[1]}.csv")
        self.log_file = os.path.join(self.workdir, f"{Path(scenario).stem}-{self.local[1]}.log")
        self.proc: asyncio.subprocess.Process | None = None

    def command(self) -> list[str]:
        sipp = shutil.which("sipp")
        if sipp is None:
            raise FileNotFoundError("sipp is not installed (Debian package sip-tester)")
        cmd = [sipp]
        path = scenario_path(self.scenario)
        cmd += ["-sn", self.scenario] if path is None else ["-sf", path]
        if self.target:
            host = f"[{self.target[0]}]" if ":" in self.target[0] else self.target[0]
            cmd.append(f"{host}:{self.target[1]}")      # an IPv6 address in brackets
        cmd += ["-i", self.local[0], "-p", str(self.local[1])]
        cmd += ["-t", "u1" if self.transport == "udp" else "t1"]
        if self.calls is not None:
            cmd += ["-m", str(self.calls)]
        if self.rate is not None:
            cmd += ["-r", f"{self.rate:g}"]
            if self.rate > 0 and self.rate != int(self.rate):
                cmd += ["-rp", "1000"]
        if self.hold_ms is not None:
            cmd += ["-d", str(self.hold_ms)]
        if self.limit is not None:
            cmd += ["-l", str(self.limit)]
        if self.service:
            cmd += ["-s", self.service]
        if self.auto_answer:
            cmd.append("-aa")
        if self.timeout_s is not None:
            cmd += ["-timeout", f"{int(self.timeout_s)}s", "-timeout_error"]
        for k, v in self.keys.items():
            cmd += ["-key", k, str(v)]
        cmd += ["-trace_stat", "-stf", self.stat_file, "-fd", "1",
                "-trace_err", "-error_file", self.log_file, "-nostdin"]
        cmd += self.extra
        return cmd

    async def start(self) -> "Sipp":
        self.proc = await asyncio.create_subprocess_exec(
            *self.command(), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, cwd=self.workdir)
        # SIPp binds its socket at once; fail early when it could not.
        # Exit codes 0 / 1 / 97 / 99 are results (all ok, some failed, ...),
        # 254 / 255 (-2 / -1) are fatal errors.
        try:
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), 0.3)
        except asyncio.TimeoutError:
            return self
        if self.proc.returncode in (0, 1, 97, 99):
            return self
        err = (await self.proc.stderr.read()).decode(errors="replace")
        raise SippError(f"sipp exited at start (rc={self.proc.returncode}): {err.strip()[-500:]}")

    def progress(self) -> dict:
        try:
            return read_stats(self.stat_file)
        except (OSError, csv.Error):
            return {}

    async def wait(self, timeout: float | None = None) -> SippResult:
        assert self.proc is not None
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            await self.stop()
        except BaseException:
            # cancelled (Ctrl-C, SIGTERM on the run driving it): SIPp goes with it
            if self.proc.returncode is None:
                self.proc.kill()
            raise
        err = b""
        if self.proc.stderr is not None:
            try:
                err = await asyncio.wait_for(self.proc.stderr.read(), 2)
            except asyncio.TimeoutError:
                pass
        result = self.result(err.decode(errors="replace"))
        if self.own_workdir and result.returncode == 0 and not result.failed:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return result

    async def run(self, timeout: float | None = None) -> SippResult:
        await self.start()
        return await self.wait(timeout)

    async def stop(self, grace: float = 3.0) -> None:
        """Soft stop (SIGUSR1: stop new calls, finish running ones), then kill."""
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            self.proc.send_signal(signal.SIGUSR1)
            await asyncio.wait_for(self.proc.wait(), grace)
        except (asyncio.TimeoutError, ProcessLookupError):
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            await self.proc.wait()

    def result(self, stderr: str = "") -> SippResult:
        stats = self.progress()
        tail = stderr[-2000:]
        try:
            with open(self.log_file, errors="replace") as fh:
                tail += fh.read()[-2000:]
        except OSError:
            pass

        def num(key: str) -> int:
            try:
                return int(float(stats.get(key, "0") or 0))
            except ValueError:
                return 0

        rt = stats.get("ResponseTime1(C)")
        cl = stats.get("CallLength(C)")
        return SippResult(
            returncode=self.proc.returncode if self.proc and self.proc.returncode is not None else -1,
            ok=num("SuccessfulCall(C)"), failed=num("FailedCall(C)"), created=num("TotalCallCreated"),
            retransmissions=num("Retransmissions(C)"),
            rate=float(stats.get("CallRate(C)", "0") or 0),
            elapsed=_hms_to_s(stats.get("ElapsedTime(C)", "0:0:0")),
            response_time_ms=_hms_to_s(rt) * 1000 if rt else None,
            call_length_ms=_hms_to_s(cl) * 1000 if cl else None,
            stats=stats, log_tail=tail)
