"""The proxy's health view of the nodes: OPTIONS probes and ramp-up.

Each node is probed every `health.interval` seconds with an OPTIONS over a
UDP socket connected to that node alone, so an ICMP port-unreachable (the
node's process is gone) surfaces as ECONNREFUSED on that socket and takes
the node out at once, without waiting for probe timeouts. Otherwise a node
is down after `down_after` unanswered (or 503-answered: "not ready") probes
and up again after `up_after` 200s.

A node that comes back does not take its whole share at once: its load
factor starts at `ramp.start` and grows in `ramp.steps` equal steps to 1
over `ramp.duration` seconds (the ring admits keys under it, see
sipcore.bekey). A node seen up at the first probe after the proxy starts
gets factor 1 straight away: nothing is moving back to it.

Each probe names the nodes seen down (X-Sipha-Down), so that the others
take on what died with them (calls still ringing, records their Redis
lost) and mirror again what they had mirrored there.

Every change of state and every load-factor step is one log line.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field

from sipcore.bekey import DOWN_HEADER, LEAVING_HEADER, STORE_DOWN_HEADER, WARM_HEADER
from sipcore.config import Config, NodeConfig
from sipcore.errors import SipParseError
from sipcore.headers import hostport
from sipcore.logfmt import event
from sipcore.message import SipResponse, parse_message

log = logging.getLogger("proxy.health")


# Bumped whenever a node's `up` or `load_factor` changes: what the router
# remembered of the ring (Proxy._owner) holds until then.
VIEW_CHANGES = [0]
_VIEW_FIELDS = frozenset(("up", "load_factor"))


@dataclass
class NodeHealth:
    node: NodeConfig
    up: bool = True
    load_factor: float = 1.0
    hits: int = 0
    misses: int = 0
    pending: str | None = None       # branch of the probe awaiting an answer
    ever_probed: bool = False
    answered: bool = False                # a probe of this proxy's got an answer
    changed_at: float = field(default_factory=time.monotonic)
    ramp_started: float | None = None
    addr: tuple[str, int] | None = None  # resolved SIP address
    last_status: int | None = None        # of the last probe (None: it went unanswered or refused)
    warm: bool = False                    # came back with its dialogs in its own Redis
    store_down: bool = False              # its last probe said its Redis does not answer

    def __setattr__(self, name, value) -> None:
        if name in _VIEW_FIELDS and getattr(self, name, None) != value:
            VIEW_CHANGES[0] += 1
        object.__setattr__(self, name, value)

    @property
    def reachable(self) -> bool:
        """In the ring, or out of it but answering its probes: a node
        draining for a stop (503) still finishes what it has in hand, so
        the answers to the requests it sent are its own, not its
        partner's (as they are once it is dead or hung). Not one whose
        Redis is down: it can finish nothing (it would drop the callee's
        answer to a call ringing there, and the caller wait for ever)."""
        return self.up or (self.last_status is not None and not self.store_down)


class _ProbeSocket(asyncio.DatagramProtocol):
    def __init__(self, health: "HealthMonitor", node_id: str):
        self.health = health
        self.node_id = node_id
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        if self.node_id not in self.health.nodes:    # taken out by a reload
            return
        try:
            msg = parse_message(data)
        except SipParseError:
            return
        if isinstance(msg, SipResponse):
            self.health.probe_answered(self.node_id, msg)
        elif msg.has(LEAVING_HEADER) and addr[:2] == self.health.nodes[self.node_id].addr:
            self.health.node_left(self.node_id)

    def error_received(self, exc):
        if isinstance(exc, ConnectionRefusedError) and self.node_id in self.health.nodes:
            self.health.probe_refused(self.node_id)


class HealthMonitor:
    def __init__(self, cfg: Config, local_host: str):
        self.cfg = cfg
        self.local_host = local_host
        self.nodes: dict[str, NodeHealth] = {n.id: NodeHealth(n) for n in cfg.nodes}
        self.probing = bool(cfg["health.probe"])
        self._sockets: dict[str, _ProbeSocket] = {}
        self._seq = itertools.count(1)
        self._tag = uuid.uuid4().hex[:10]
        self._tasks: list[asyncio.Task] = []
        self._probes: dict[str, asyncio.Task] = {}
        self.on_change = None   # callback(node_id) when the ring changes
        self.on_first_answer = None     # callback(node_id) at a node's first answer to our probes

    # ---- the view the router reads -------------------------------------
    def healthy(self) -> dict[str, float]:
        return {nid: h.load_factor for nid, h in self.nodes.items() if h.up}

    # ---- lifecycle ---------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for h in self.nodes.values():
            h.addr = await self._resolve(h.node)
        if not self.probing:
            return
        for nid in self.nodes:
            self._probes[nid] = loop.create_task(self._probe_loop(nid))
        self._tasks.append(loop.create_task(self._ramp_loop()))

    async def close(self) -> None:
        for t in [*self._tasks, *self._probes.values()]:
            t.cancel()
        for s in self._sockets.values():
            if s.transport:
                s.transport.close()

    async def set_nodes(self, nodes: list[NodeConfig]) -> None:
        """A new node list (a reload): a node gone is no longer probed; a
        node at a new address is probed there, its state kept; a new node
        starts out of the ring and comes in as a returning one does, after
        `up_after` answers, ramped (unprobed: up at once, as at start). The
        addresses are resolved first: the view changes in one step, with
        no wait in it, so the caller updates its own view in the same step."""
        loop = asyncio.get_running_loop()
        wanted = {n.id: n for n in nodes}
        changed = [n for n in nodes if n.id not in self.nodes or self.nodes[n.id].node != n]
        resolved = {n.id: await self._resolve(n) for n in changed}
        for nid in [nid for nid in self.nodes if nid not in wanted]:
            self._forget(nid)
            del self.nodes[nid]
        for n in changed:
            h = self.nodes.get(n.id)
            if h is None:
                h = self.nodes[n.id] = NodeHealth(n)
                # worker 0's probes bring it in, for the workers that follow its view too
                if self.cfg["health.probe"]:
                    h.up, h.ever_probed = False, True
            else:
                self._forget(n.id)
                h.node, h.answered = n, False     # its first answer there counts as a first
            h.addr = resolved[n.id]
            if self.probing:
                self._probes[n.id] = loop.create_task(self._probe_loop(n.id))
        # in the order of the list, as at start
        self.nodes = {nid: self.nodes[nid] for nid in wanted}
        VIEW_CHANGES[0] += 1

    def _forget(self, nid: str) -> None:
        task = self._probes.pop(nid, None)
        if task is not None:
            task.cancel()
        sock = self._sockets.pop(nid, None)
        if sock is not None and sock.transport is not None:
            sock.transport.close()
        self.nodes[nid].pending = None

    async def _resolve(self, node: NodeConfig) -> tuple[str, int] | None:
        try:
            family = socket.AF_INET6 if ":" in self.local_host else socket.AF_INET    # the nodes' side
            infos = await asyncio.get_running_loop().getaddrinfo(
                node.host, node.port, family=family, type=socket.SOCK_DGRAM)
            return infos[0][4][0], node.port
        except OSError as exc:
            event(log, "node_unresolved", logging.WARNING, node=node.id, host=node.host, error=str(exc))
            return None

    # ---- probing -----------------------------------------------------
    async def _open(self, nid: str) -> _ProbeSocket | None:
        sock = self._sockets.get(nid)
        if sock is not None and sock.transport is not None and not sock.transport.is_closing():
            return sock
        h = self.nodes[nid]
        if h.addr is None:
            h.addr = await self._resolve(h.node)
            if h.addr is None:
                return None
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(
            lambda: _ProbeSocket(self, nid), local_addr=(self.local_host, 0), remote_addr=h.addr)
        self._sockets[nid] = proto
        return proto

    def _options(self, nid: str, proto: _ProbeSocket) -> tuple[str, bytes]:
        h = self.nodes[nid]
        seq = next(self._seq)
        lhost, lport = proto.transport.get_extra_info("sockname")[:2]
        branch = f"z9hG4bKsiphaprobe{seq}"
        host, port = h.addr
        down = [other for other, oh in self.nodes.items() if not oh.up and other != nid]
        told = f"{DOWN_HEADER}: {', '.join(down)}\r\n" if down else ""
        text = (f"OPTIONS sip:{hostport((host, port))} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {hostport((lhost, lport))};branch={branch};rport\r\n"
                f"Max-Forwards: 70\r\n"
                f"From: <sip:sipha-proxy@{hostport((lhost, lport))}>;tag={self._tag}\r\n"
                f"To: <sip:{hostport((host, port))}>\r\n"
                f"Call-ID: probe-{nid}-{self._tag}@sipha\r\n"
                f"CSeq: {seq} OPTIONS\r\n"
                f"User-Agent: sipha-proxy\r\n{told}"
                f"Content-Length: 0\r\n\r\n")
        return branch, text.encode()

    async def _probe_loop(self, nid: str) -> None:
        h = self.nodes[nid]
        while True:
            # read every round: a reload may change them
            interval = self.cfg["health.interval"]
            timeout = min(self.cfg["health.timeout"], interval)
            started = time.monotonic()
            try:
                proto = await self._open(nid)
                if proto is not None:
                    branch, data = self._options(nid, proto)
                    h.pending = branch
                    proto.transport.sendto(data)
            except OSError as exc:
                event(log, "probe_error", logging.DEBUG, node=nid, error=str(exc))
                proto = None
            await asyncio.sleep(timeout)
            if h.pending is not None:   # no answer in time
                h.pending = None
                h.last_status = None
                self._miss(nid, "timeout")
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def probe_answered(self, nid: str, resp: SipResponse) -> None:
        h = self.nodes[nid]
        try:
            branch = resp.top_via.branch
        except SipParseError:
            return
        if branch != h.pending:
            return  # a late answer to an earlier probe
        h.pending = None
        h.last_status = resp.status
        h.warm = resp.has(WARM_HEADER)
        h.store_down = resp.status == 503 and resp.has(STORE_DOWN_HEADER)
        if 200 <= resp.status < 300:
            self._hit(nid)
        elif resp.status >= 300:
            self._miss(nid, f"status {resp.status}")

    def node_left(self, nid: str) -> None:
        """The node drained and exits now (node/app.py say_leaving): the
        answers to what it sent go to its partners from now on."""
        h = self.nodes[nid]
        h.pending = None
        h.last_status = None
        if h.up:
            self._set_down(nid, "left")
        event(log, "node_left", node=nid)

    def probe_refused(self, nid: str) -> None:
        h = self.nodes[nid]
        h.pending = None
        h.last_status = None
        if h.up:
            self._set_down(nid, "refused")

    # ---- state changes -----------------------------------------------
    def _hit(self, nid: str) -> None:
        h = self.nodes[nid]
        h.misses = 0
        h.hits += 1
        first = not h.ever_probed
        h.ever_probed = True
        if not h.answered:
            h.answered = True
            if self.on_first_answer:
                self.on_first_answer(nid)
        if h.up:
            return
        if first or h.hits >= self.cfg["health.up_after"]:
            self._set_up(nid, ramp=not first)

    def _miss(self, nid: str, why: str) -> None:
        h = self.nodes[nid]
        h.hits = 0
        h.misses += 1
        h.ever_probed = True
        if h.up and h.misses >= self.cfg["health.down_after"]:
            self._set_down(nid, why)

    def _set_down(self, nid: str, why: str) -> None:
        h = self.nodes[nid]
        h.up = False
        h.hits = 0
        h.ramp_started = None
        h.changed_at = time.monotonic()
        event(log, "node_down", logging.WARNING, node=nid, addr=hostport((h.node.host, h.node.port)), reason=why)
        if self.on_change:
            self.on_change(nid)

    def _set_up(self, nid: str, *, ramp: bool) -> None:
        h = self.nodes[nid]
        h.up = True
        h.misses = 0
        h.changed_at = time.monotonic()
        if ramp and not h.warm and self.cfg["ramp.start"] < 1.0 and self.cfg["ramp.duration"] > 0:
            h.load_factor = self.cfg["ramp.start"]
            h.ramp_started = time.monotonic()
        else:
            h.load_factor = 1.0
        event(log, "node_up", node=nid, addr=hostport((h.node.host, h.node.port)),
              load_factor=round(h.load_factor, 3), warm=h.warm or None)
        if self.on_change:
            self.on_change(nid)

    def ramp_factor(self, h: NodeHealth, now: float) -> float:
        start = self.cfg["ramp.start"]
        steps = max(1, self.cfg["ramp.steps"])
        duration = self.cfg["ramp.duration"]
        if duration <= 0:
            return 1.0          # a reload turned ramping off during one
        done = int((now - h.ramp_started) / (duration / steps))
        return min(1.0, start + (1.0 - start) * done / steps)

    async def _ramp_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for nid, h in self.nodes.items():
                if not h.up or h.ramp_started is None:
                    continue
                f = self.ramp_factor(h, now)
                if f != h.load_factor:
                    h.load_factor = f
                    event(log, "load_factor", node=nid, load_factor=round(f, 3))
                    if f >= 1.0:
                        h.ramp_started = None
