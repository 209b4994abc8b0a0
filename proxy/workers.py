"""Several proxy processes on one port (`proxy.workers` > 1).

    supervisor   forks the workers, restarts one that dies, stops them all
                 on SIGTERM / SIGINT (and they stop by themselves should
                 the supervisor be killed)
    worker 0     UDP (SO_REUSEPORT), TCP, the health probes, the admin HTTP
    worker k     UDP (SO_REUSEPORT)

The kernel hands each UDP flow (source address and port) to one worker's
socket, so the messages of one flow are handled by one process in the
order they came. (Workers that all read one shared socket, as some C
proxies do, let the messages of one call overtake each other.)

One health view: worker 0 probes the nodes and publishes each node's state
(up, load factor, warm, last probe status) in a shared memory page every
PUBLISH_EVERY seconds; the other workers copy it as often.

TCP lives in worker 0. Another worker that must send over TCP (a response
to a request that came over TCP, a request to a phone registered over TCP)
hands the bytes to worker 0 over a Unix datagram socket; for a response it
also says which branch was answered, so worker 0 stops retransmitting that
request to the node. Every second each worker sends worker 0 its counters,
so /status and /metrics count the whole proxy.
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import mmap
import os
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from sipcore.config import MAX_NODES
from sipcore.logfmt import RateLimitedLog, event
from sipcore.stats import Counters, Histogram

log = logging.getLogger("proxy")

PUBLISH_EVERY = 0.02
STATS_EVERY = 1.0
# id, up, warm, load factor, last probe status (-1: none)
_NODE = struct.Struct("<32sBBdi")
_HEAD = struct.Struct("<QI")            # sequence, nodes published
_HANDOFF_BUFFER = 4 * 1024 * 1024


class SharedHealth:
    """The nodes' health in a shared anonymous mapping, created before the
    workers are forked: a slot per node, named by its id, for as many
    nodes as a configuration may list (a reload can add some). One writer
    (worker 0); a sequence number, odd while a write is under way, lets
    readers retry a torn read. A worker copies the slots of the nodes it
    knows: after a reload (SIGHUP) the workers may briefly disagree on the
    list, each routing by its own."""

    def __init__(self, slots: int = MAX_NODES):
        self.slots = slots
        self.mem = mmap.mmap(-1, _HEAD.size + _NODE.size * slots)

    def publish(self, nodes: dict) -> None:
        seq = _HEAD.unpack_from(self.mem, 0)[0]
        seq += seq % 2     # odd: a writer died mid-write; that write is void
        _HEAD.pack_into(self.mem, 0, seq + 1, 0)
        listed = list(nodes.items())[:self.slots]
        for i, (nid, h) in enumerate(listed):
            status = -1 if h.last_status is None else h.last_status
            _NODE.pack_into(self.mem, _HEAD.size + i * _NODE.size, nid.encode(), h.up, h.warm, h.load_factor, status)
        _HEAD.pack_into(self.mem, 0, seq + 2, len(listed))

    def read(self) -> dict[str, tuple[bool, bool, float, int | None]]:
        out: dict[str, tuple[bool, bool, float, int | None]] = {}
        for _ in range(100):   # bounded: the writer may have died mid-write
            before, count = _HEAD.unpack_from(self.mem, 0)
            out = {}
            for i in range(min(count, self.slots)):
                nid, up, warm, lf, status = _NODE.unpack_from(self.mem, _HEAD.size + i * _NODE.size)
                out[nid.rstrip(b"\0").decode()] = (bool(up), bool(warm), lf, None if status < 0 else status)
            if before % 2 == 0 and _HEAD.unpack_from(self.mem, 0)[0] == before:
                break
            time.sleep(0)
        return out

    def copy_into(self, nodes: dict) -> None:
        for nid, (up, warm, lf, status) in self.read().items():
            h = nodes.get(nid)
            if h is not None:
                h.up, h.warm, h.load_factor, h.last_status = up, warm, lf, status


@dataclass
class WorkerRole:
    index: int
    count: int
    health: SharedHealth
    channels: list[socket.socket]     # worker 0: one per other worker; worker k: its one to worker 0
    snapshots: dict[int, dict] = field(default_factory=dict)   # worker 0: the others' counters
    hangup_missed: bool = False     # a SIGHUP came before the worker's loop took them over

    @property
    def primary(self) -> bool:
        return self.index == 0


# ---- the worker side ------------------------------------------------------

class WorkerLink:
    """What a Proxy does with its WorkerRole: publish or follow the health
    view, hand TCP sends to worker 0, send or gather counters."""

    def __init__(self, role: WorkerRole, proxy):
        self.role = role
        self.proxy = proxy
        self.tasks: list[asyncio.Task] = []
        self.drop_log = RateLimitedLog()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.role.primary:
            self.tasks.append(loop.create_task(self._every(PUBLISH_EVERY, self._publish)))
            for ch in self.role.channels:
                ch.setblocking(False)
                loop.add_reader(ch.fileno(), self._receive, ch)
        else:
            self.role.health.copy_into(self.proxy.health.nodes)
            ch = self.role.channels[0]
            ch.setblocking(False)
            self.tasks.append(loop.create_task(self._every(PUBLISH_EVERY, self._follow)))
            self.tasks.append(loop.create_task(self._every(STATS_EVERY, self._send_stats)))

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.role.primary:
            loop = asyncio.get_running_loop()
            for ch in self.role.channels:
                loop.remove_reader(ch.fileno())

    @staticmethod
    async def _every(seconds: float, fn: Callable[[], None]) -> None:
        while True:
            fn()
            await asyncio.sleep(seconds)

    def _publish(self) -> None:
        self.role.health.publish(self.proxy.health.nodes)

    def _follow(self) -> None:
        self.role.health.copy_into(self.proxy.health.nodes)

    # worker k -> worker 0
    def _post(self, data: bytes) -> None:
        try:
            self.role.channels[0].send(data)
        except OSError as exc:   # full (worker 0 is behind) or gone (being restarted)
            ok, suppressed = self.drop_log.allow()
            if ok:
                event(log, "handoff_dropped", logging.WARNING, worker=self.role.index, error=str(exc),
                      suppressed=suppressed or None)

    def send_tcp(self, data: bytes, dest: tuple[str, int], answered: tuple[str, int, str] | None,
                 transport: str = "tcp") -> None:
        """Worker 0 holds the TCP and TLS connections: it sends these bytes."""
        branch, status, method = answered or ("-", 0, "-")
        self._post(f"T {dest[0]} {dest[1]} {branch} {status} {method} {transport}\n".encode() + data)

    def _send_stats(self) -> None:
        snap = {"counters": [[list(k), v] for k, v in self.proxy.stats.values.items()],
                "overloaded": self.proxy.overloaded,
                **{name: {"counts": h.counts, "sum": h.sum} for name, h in self.proxy.histograms.items()}}
        self._post(b"S " + str(self.role.index).encode() + b"\n" + json.dumps(snap).encode())

    # worker 0
    def _receive(self, ch: socket.socket) -> None:
        for _ in range(256):
            try:
                data = ch.recv(70000)
            except (BlockingIOError, InterruptedError):
                return
            head, _, payload = data.partition(b"\n")
            parts = head.decode("ascii", "replace").split(" ")
            try:
                if parts[0] == "T" and len(parts) == 7:
                    _, host, port, branch, status, method, transport = parts
                    if branch != "-" and self.proxy.relay.pending:
                        self.proxy.relay.answered(branch, int(status), method)
                    t = self.proxy.transport_for(host)
                    if t is None:
                        raise OSError(f"no listen address of the family of {host}")
                    t.send(payload, (host, int(port)), transport)
                elif parts[0] == "S" and len(parts) == 2:
                    self.role.snapshots[int(parts[1])] = json.loads(payload)
            except (ValueError, OSError) as exc:
                event(log, "handoff_failed", logging.WARNING, error=str(exc))

    # merged views for /status and /metrics
    def counters(self) -> Counters:
        merged = Counters(self.proxy.stats.schema)
        merged.values.update(self.proxy.stats.values)
        for snap in self.role.snapshots.values():
            for key, v in snap["counters"]:
                merged.values[tuple(key)] += v
        return merged

    def histograms(self) -> list[Histogram]:
        """Each of this process's histograms with the other workers' added."""
        out = []
        for name, own in self.proxy.histograms.items():
            merged = Histogram(own.name, own.doc, own.buckets)
            merged.counts = list(own.counts)
            merged.sum = own.sum
            for snap in self.role.snapshots.values():
                theirs = snap.get(name)
                if theirs is not None:
                    merged.counts = [a + b for a, b in zip(merged.counts, theirs["counts"])]
                    merged.sum += theirs["sum"]
            out.append(merged)
        return out

    def overloaded(self) -> bool:
        """Whether any worker is refusing new work now (as of its last report)."""
        return self.proxy.overloaded or any(snap.get("overloaded") for snap in self.role.snapshots.values())


# ---- the supervisor -------------------------------------------------------

def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(count: int, run_worker: Callable[[WorkerRole], int], reload: Callable[[], None] | None = None) -> int:
    """Fork `count` workers running run_worker(role) and keep them running
    until SIGTERM / SIGINT. On SIGHUP, `reload()` (the configuration read
    again, for workers started from now on), then the SIGHUP to each
    worker, which reloads too. -> exit status."""
    health = SharedHealth()
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(count - 1)]
    for a, b in pairs:
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _HANDOFF_BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _HANDOFF_BUFFER)
    supervisor = os.getpid()
    pids: dict[int, int] = {}
    stopping = False
    restarts: list[float] = []

    def spawn(index: int) -> None:
        channels = [a for a, _ in pairs] if index == 0 else [pairs[index - 1][1]]
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                role = WorkerRole(index, count, health, channels)
                # until its loop handles them: noted, and applied once started
                signal.signal(signal.SIGHUP, lambda _s, _f: setattr(role, "hangup_missed", True))
                _die_with_parent()
                if os.getppid() != supervisor:
                    os._exit(1)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = run_worker(role)
            except BaseException as exc:   # noqa: BLE001 - a worker must never fall back into this loop
                event(log, "worker_failed", logging.ERROR, worker=index, error=repr(exc))
            finally:
                logging.shutdown()
                os._exit(code)
        pids[pid] = index

    def signal_all(sig: int) -> None:
        for pid in list(pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        signal_all(signal.SIGTERM)

    def hangup(_signum, _frame) -> None:
        if os.getpid() != supervisor or stopping:
            return
        try:
            if reload is not None:
                reload()
        except Exception as exc:   # noqa: BLE001 - the supervisor outlives a failed reload
            event(log, "reload_failed", logging.ERROR, error=repr(exc), action="kept the running configuration")
            return
        signal_all(signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hangup)
    for i in range(count):
        spawn(i)
    event(log, "workers_started", workers=count, pids=",".join(str(p) for p in pids))
    status = 0
    while pids:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        index = pids.pop(pid, None)
        if index is None or stopping:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        now = time.monotonic()
        restarts = [t for t in restarts if t > now - 60] + [now]
        if len(restarts) > 5:
            event(log, "worker_exited", logging.ERROR, worker=index, pid=pid, code=code,
                  action="giving up: more than 5 restarts in a minute")
            status = 1
            stop(None, None)
            continue
        event(log, "worker_exited", logging.ERROR, worker=index, pid=pid, code=code, action="restarting")
        time.sleep(0.5)
        if not stopping:
            spawn(index)
    return status
