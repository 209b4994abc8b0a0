"""The converged load balancer: a stateless SIP proxy (RFC 3261 §16.11)
that sends every request of a call to the node owning its BEKey.

Two directions:
- inbound (from outside the cluster): strip the internal header, pop our
  own Route, find the BEKey (a verified stamp in the To-tag, From-tag or
  Call-ID; else the AOR of a REGISTER; else the Call-ID), pick owner and
  partner from the ring over healthy nodes, tell the node in the internal
  header, record-route dialog-creating requests (Path on REGISTER), push
  our Via and send to the owner.
- outbound (from a node): pop our own Route; a Route or Path we wrote
  carries the flow (`flow=udp:1.2.3.4:5060`) the phone called or registered
  on, so the request goes back over that flow; else loose routing by the
  next Route or the Request-URI (strict routers get the RFC 3261 §16.12
  rewrite). Record-route, push our Via, strip the internal header, send.

Responses follow the Via path: our Via is popped, the next Via says where
(received/rport, RFC 3581) and over which transport.

The Via branch we add is a hash of the incoming branch and Call-ID, so a
retransmission, the CANCEL and the non-2xx ACK of an INVITE carry the same
branch as the INVITE and reach the same node (RFC 3261 §16.11).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import ssl
import time
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily

from sipcore import compiled, heap
from sipcore.admin import AUTO_OFFSET, AdminServer, json_handler, start_admin
from sipcore.bekey import ROUTE_HEADER, bekey_of, choose, rank, read_stamp
from sipcore.config import (PROXY_LIVE, RELOAD_COUNTER, SETTINGS, STREAM_KINDS, Config, applied_fields,
                             changed_settings, node_list_change, with_live_settings)
from sipcore.errors import SipParseError
from sipcore.expiring import remember
from sipcore.headers import SipUri, Via, format_params, hostport, is_ip, parse_name_addr, split_hostport
from sipcore.logfmt import RateLimitedLog, event
from sipcore.stats import Counters, Histogram, prometheus
from sipcore.message import SipMessage, SipRequest, SipResponse, make_response, parse_message, reason_phrase_safe
from sipcore.overload import NEW_WORK, OverloadGuard, RecentCalls
from sipcore.hep import HEP_COUNTER, HEP_SETTINGS, mirror_for
from sipcore.transport import SipTransport

from .dns import DnsResolver, Hop, Target
from .fastpath import RequestScan, first_value, refuse_new_request, scan_request, strip_top_via
from .health import VIEW_CHANGES, HealthMonitor
from .limits import SourceLimiter
from .natping import NatPinger
from .relay import NodeRelay, Pending
from .workers import WorkerLink, WorkerRole

log = logging.getLogger("proxy")


@dataclass
class NamedTx:
    """A request sent to a named trunk with several servers: the servers
    in this call's order, the one it went to, since when."""
    method: str
    hops: list[Hop]
    started: float
    sent: float
    index: int = 0


BRANCH_PREFIX = "z9hG4bKsph"
DIALOG_CREATING = frozenset(("INVITE", "SUBSCRIBE", "REFER", "NOTIFY"))
TRANSPORTS = frozenset(("udp", "tcp", *STREAM_KINDS))     # transports a Via or a URI may name
_STATUS_CLASS = {c: f"{c}xx" for c in range(1, 10)}
OVERLOAD_REASON = "Service Unavailable (overloaded)"
OVERLOAD_RETRY_AFTER = "2"
_ROUTE_HEADER_LINE = f"\r\n{ROUTE_HEADER.lower()}:".encode()


# the request line's method -> its name, for the requests fast_refuse weighs
_NEW_WORK_METHODS = {m.encode(): m for m in NEW_WORK}


# User-Agents of SIP scanners seen in the wild (sipvicious calls itself
# "friendly-scanner"); nothing legitimate sends these.
SCANNER_AGENTS = ("friendly-scanner", "sipvicious", "sipcli", "sip-scan", "vaxsipuseragent", "sundayddr",
                  "iws-sip", "pplsip", "sipsak scan")

def _scanner(user_agent: str | None) -> bool:
    """A lower-cased User-Agent of a known scanner."""
    return bool(user_agent) and any(s in user_agent for s in SCANNER_AGENTS)


def wants_outbound(req: SipRequest) -> bool:
    """A REGISTER straight from a phone (one Via: we are its first hop)
    asking for SIP outbound: a Contact with +sip.instance and reg-id
    (RFC 5626 §4.2.1). Our Path then carries `ob` (§5.1)."""
    return len(req.vias) == 1 and any("reg-id" in c.params and "+sip.instance" in c.params
                                      for c in req.contacts if not c.wildcard)


PROXY_COUNTERS = {
    "requests": ("method", "reason"),     # reason: owner failover ramp outbound no-node rejected overload
    "responses": ("class",),
    "parse_rejections": (),
    "events": ("kind",),
    **HEP_COUNTER,
    **RELOAD_COUNTER,
}


class Proxy:
    def __init__(self, cfg: Config, worker: WorkerRole | None = None):
        if not cfg.nodes:
            raise ValueError("nodes: the node list is empty (give --node ID=HOST:PORT or [[nodes]])")
        self.cfg = cfg
        self.secret = cfg.secret
        self.node_ids = [n.id for n in cfg.nodes]
        self.nodes = {n.id: n for n in cfg.nodes}
        self._owners: dict[str, tuple[str | None, str | None, str]] = {}   # _owner's, for this view
        self._owners_view = -1
        self.listen = cfg.listen
        self.listen_streams: dict[str, list[tuple[str, int]]] = {}   # tls / ws / wss -> bound addresses
        # what the proxy can send over: UDP, TCP and the kinds it listens for
        self.sendable = ("udp", "tcp", *(kind for kind in STREAM_KINDS if cfg.stream_listen(kind)))
        # Dual stack: phones and trunks over IPv4 or IPv6, the nodes over
        # the family of proxy.internal. What goes to an address is sent
        # from a socket of its family, and the Via, Record-Route or Path
        # on it names the proxy in that family (advertise6), as the peer
        # will send to it.
        self.internal = cfg.internal
        adv = cfg.advertise
        first = min(self.listen, key=lambda a: ":" in a[0])    # an IPv4 one if any
        self.advertise6: tuple[str, int] | None = adv.get(True)
        # on IPv6 only: the IPv6 one, which whatever names us in no family
        # (the Via heads, a stream's address) then takes
        self.advertise = adv.get(False, first) if ":" not in first[0] else self.advertise6 or first
        self.transports: list[SipTransport] = []     # IPv4 ones first
        self.transport4: SipTransport | None = None
        self.transport6: SipTransport | None = None
        # TLS and WebSocket: servers on the transport of their family; our
        # address over one of them, by family, is the advertised host at
        # its port
        self.tls_server, self.tls_client, self.tls_mutual = self._tls_contexts(cfg)
        # named trunks (RFC 3263): their servers, and where each request
        # to one went, for failover
        self.dns = DnsResolver(cfg.dns_servers, frozenset(self.sendable))
        self.dns_failover = cfg["proxy.dns_failover"]
        self.named_tx: dict[str, NamedTx] = {}
        self._named_sweep = 0.0
        self.resolving: set[tuple[str, str]] = set()
        self.natping = (NatPinger(cfg["proxy.nat_ping"], self._keepalive) if cfg["proxy.nat_ping"] > 0
                        else None)
        self.stream_advertise: dict[tuple[str, bool], tuple[str, int]] = {}    # (kind, IPv6) -> address
        # the probes go from a listen address of the nodes' family
        v6_nodes = ":" in self.internal[0]
        self.health = HealthMonitor(cfg, next(h for h, _ in self.listen if (":" in h) == v6_nodes))
        self.node_by_addr: dict[tuple[str, int], str] = {}
        self.our_addrs: set[tuple[str, int]] = set()
        self.bad_input_log = RateLimitedLog()
        self.stats = Counters(PROXY_COUNTERS)
        self.hep = mirror_for(cfg, self.stats)
        self.routing_latency = Histogram(
            "sipha_proxy_routing_seconds", "time from a message's arrival to its forwarding",
            buckets=(0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05))
        self.queue_wait = Histogram(
            "sipha_proxy_queue_wait_seconds",
            "how long a datagram waited in the UDP receive queue (one sampled every 10 ms; see limits.overload_delay)",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64))
        # by the name the workers report them under (proxy/workers.py)
        self.histograms = {"latency": self.routing_latency, "wait": self.queue_wait}
        self.started = time.time()
        self.admin: AdminServer | None = None
        self.admin_addr = None
        self.relay = NodeRelay(self._resend_to_node)
        self.limiter = SourceLimiter(cfg["limits.rate"], cfg["limits.burst"], cfg["limits.ban"])
        self.drop_scanners = cfg["limits.drop_scanners"]
        self.scanner_log = RateLimitedLog()
        self.guards: list[tuple[SipTransport, OverloadGuard]] = []
        self.overloaded = False
        self.refuse_share = 0.0     # of new requests (NEW_WORK) refused now (OverloadGuard)
        self.forwarded = RecentCalls()   # ... never those of a Call-ID let through lately
        self._overload_timer: asyncio.TimerHandle | None = None
        # To-tag of the proxy's own final responses: the ACK to one is absorbed
        # (the same in every worker, so whichever gets the ACK knows it)
        self.reply_tag = "sph" + hashlib.blake2b(self.secret + b"|proxy-reply-tag", digest_size=6).hexdigest()
        self._reply_tag_bytes = self.reply_tag.encode()
        self._refusal_line = f"SIP/2.0 503 {OVERLOAD_REASON}\r\n".encode()
        self._refusal_tail = f"Retry-After: {OVERLOAD_RETRY_AFTER}\r\nServer: sipha-proxy\r\nContent-Length: 0\r\n\r\n".encode()
        self.our_via_heads: tuple[bytes, ...] = ()
        self._our_routes: dict[str, tuple[bool, str | None]] = {}   # Route value -> (names us, flow)
        # one of several worker processes (proxy/workers.py), or None
        self.link = WorkerLink(worker, self) if worker is not None else None
        self.primary = worker is None or worker.primary
        if not self.primary:
            self.health.probing = False    # worker 0 probes; this one follows its view

    # ---- lifecycle ---------------------------------------------------
    async def start(self) -> None:
        made = [(host, port, SipTransport(self.on_message, self.on_bad_input, fast_datagram=self.fast_datagram,
                                          on_send_failed=self._send_failed))
                for host, port in self.listen]
        # in place before the sockets bind: a datagram read while the next
        # one binds (a restart under load) is handled, and what it sends
        # leaves from a socket already bound (else: send_error, no crash)
        for _, _, t in made:
            t.hep = self.hep
            t.on_keepalive = self._keepalive_answered
        self.transports = [t for host, _, t in sorted(made, key=lambda m: ":" in m[0])]   # IPv4 ones first
        self._limit_connections(self.cfg)
        self.transport4 = next((t for host, _, t in made if ":" not in host), None)
        self.transport6 = next((t for host, _, t in made if ":" in host), None)
        for host, port, t in made:
            await t.listen(host, port, tcp=self.primary, reuse_port=self.link is not None)
        self.listen = [t.local for _, _, t in made]
        self._guard_overload(self.cfg["limits.overload_delay"])
        # port 0 (tests): what was bound
        if not self.cfg["proxy.internal"]:
            self.internal = self.transport.local
        adv = self.cfg.advertise
        if self.transport6 is not None:
            self.advertise6 = adv.get(True, self.transport6.local)
        self.advertise = adv.get(False, self.transport4.local) if self.transport4 is not None else self.advertise6
        self.our_addrs = {self.advertise, self.internal, *self.listen}
        if self.advertise6 is not None:
            self.our_addrs.add(self.advertise6)
        self.dns.ipv6 = self.transport6 is not None
        self.dns.ipv4 = self.transport4 is not None
        for t in self.transports:
            t.tls_client = self.tls_client
        for kind in STREAM_KINDS:
            # worker 0 holds the connections (the others hand it what goes there)
            for host, port in self.cfg.stream_listen(kind):
                v6 = ":" in host
                context = {"tls": self.tls_mutual, "wss": self.tls_server}.get(kind)
                bound = (await self.transport_for(host).listen_stream(kind, host, port, context)
                         if self.primary else (host, port))
                self.listen_streams.setdefault(kind, []).append(bound)
                ours = self.stream_advertise.setdefault((kind, v6), ((self.advertise6 if v6 else self.advertise)[0],
                                                                    bound[1]))
                self.our_addrs.update((bound, ours))
        # how every Via we write begins, up to the branch prefix (fast_response)
        self.our_via_heads = tuple({self.our_via(t, BRANCH_PREFIX, internal=i, v6=v6).encode("latin-1")
                                    for t in self.sendable
                                    for i in (False, True) for v6 in (False, self.advertise6 is not None)})
        if self.natping is not None:
            self.natping.start()
            if self.primary:
                self.health.on_first_answer = self._ask_nat_flows
        await self.health.start()
        if self.natping is not None and self.primary and not self.health.probing:
            for nid in self.health.nodes:   # no first answer to wait for: they count as up now
                self._ask_nat_flows(nid)
        self._index_nodes()
        if self.link is not None:
            self.link.start()
        if not self.primary:
            event(log, "worker_started", listen=",".join(hostport(a) for a in self.listen))
            return
        self.admin, self.admin_addr = await start_admin(
            self.cfg["proxy.admin"], "proxy.admin", self.listen[0],
            {"/status": json_handler(self.status), "/metrics": self.metrics})
        if self.cfg["cluster.secret"] == SETTINGS["cluster.secret"][1]:
            event(log, "default_secret", logging.WARNING,
                  msg="cluster.secret is the default: anyone can forge BEKey stamps; set SIPHA_CLUSTER_SECRET")
        event(log, "proxy_started", listen=",".join(hostport(a) for a in self.listen),
              **{kind: ",".join(map(hostport, addrs)) for kind, addrs in self.listen_streams.items()},
              admin=hostport(self.admin_addr) if self.admin_addr else None,
              nodes=",".join(f"{n.id}={hostport((n.host, n.port))}" for n in self.cfg.nodes),
              probe=self.health.probing, hep=hostport(self.hep.server) if self.hep else None,
              compiled=len(compiled.loaded()))
        compiled.warn_stale(log)

    def _limit_connections(self, cfg: Config) -> None:
        """The TCP connection limits, the WebSocket origins and the mutual
        TLS peer names let in, for the connections from then on (and the
        idle ones' next check)."""
        for t in self.transports:
            t.idle_timeout, t.header_timeout = cfg["limits.tcp_idle"], cfg["limits.tcp_message_timeout"]
            t.max_connections, t.max_per_source = cfg["limits.tcp_connections"], cfg["limits.tcp_per_source"]
            t.ws_origins, t.tls_peers = cfg.ws_origins, cfg.tls_peers

    @staticmethod
    def _tls_contexts(cfg: Config) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None, ssl.SSLContext | None]:
        """-> (server side, client side, server side of proxy.tls_listen:
        the same, or the one asking for the peer's certificate), all None
        without a TLS or WSS listen address."""
        server = cfg.tls_server_context()
        if server is None:
            return None, None, None
        mutual = cfg.tls_server_context(verify_clients=True) if cfg["proxy.tls_verify_client"] else server
        return server, cfg.tls_client_context(), mutual

    def _index_nodes(self) -> None:
        self.node_by_addr = {}
        for nid, h in self.health.nodes.items():
            if h.addr:
                self.node_by_addr[h.addr] = nid
            self.node_by_addr[(h.node.host, h.node.port)] = nid

    async def reload(self, cfg: Config) -> None:
        """The node list read again (SIGHUP, as Kamailio's
        dispatcher.reload): nodes added, removed or moved in place, every
        connection, transaction and flow kept; the TLS certificate, key
        and CAs read again (kamcmd tls.reload: a renewed certificate), for
        the connections from then on; the limits, probe timers and ramp
        (PROXY_LIVE).
        log.level is applied by the caller; the other settings are read
        at start only, and those that changed are named in the log. A
        file that does not load raises ConfigError before anything
        changed."""
        change = node_list_change(self.cfg, cfg, "proxy")
        merged = with_live_settings(self.cfg, cfg)
        tls = self._tls_contexts(merged) if self.tls_server is not None else None
        hep = mirror_for(merged, self.stats) if changed_settings(self.cfg, merged, HEP_SETTINGS) else self.hep
        if change.restart_only and self.primary:
            event(log, "reload_restart_needed", logging.WARNING, keys=",".join(change.restart_only),
                  hint=change.restart_hint)
        if change:
            if self.primary and self.health.probing:
                for nid in change.removed:
                    if self.health.nodes[nid].up:
                        # its calls go on at their partners, which hold
                        # their replicas, but what it does meanwhile (a
                        # timer, a hang-up) reaches no one
                        event(log, "node_removed_while_up", logging.WARNING, node=nid,
                              hint="stop a node first (SIGTERM: it drains), then reload without it")
            await self.health.set_nodes(cfg.nodes)
            # from here on in one step with the health view (no await)
            self.node_ids = [n.id for n in cfg.nodes]
            self.nodes = {n.id: n for n in cfg.nodes}
            self._index_nodes()
            if self.natping is not None and self.primary and not self.health.probing:
                for nid in change.added + change.moved:
                    self._ask_nat_flows(nid)
        applied = changed_settings(self.cfg, merged, PROXY_LIVE)
        self.limiter.configure(merged["limits.rate"], merged["limits.burst"], merged["limits.ban"])
        self.drop_scanners = merged["limits.drop_scanners"]
        self.dns_failover = merged["proxy.dns_failover"]
        self._guard_overload(merged["limits.overload_delay"])
        self._limit_connections(merged)
        self.health.cfg = merged    # probe timers and ramp, from their next round
        if hep is not self.hep:
            old, self.hep = self.hep, hep
            for t in self.transports:
                t.hep = hep
            if old is not None:
                old.close()
        self.cfg = merged       # its other settings kept
        if applied and self.primary:
            event(log, "settings_applied", **applied_fields(merged, applied))
        event(log, "nodes_reloaded", **change.fields(), nodes=",".join(f"{n.id}={hostport(n.sip)}" for n in cfg.nodes))
        if tls is not None:
            self.tls_server, self.tls_client, self.tls_mutual = tls
            for t in self.transports:
                t.tls_client = self.tls_client
                for kind in t.stream_tls:
                    t.stream_tls[kind] = {"tls": self.tls_mutual, "wss": self.tls_server}.get(kind)
            if self.primary:
                event(log, "tls_reloaded", cert=merged["proxy.tls_cert"], ca=merged["proxy.tls_ca"] or None)

    async def close(self) -> None:
        if self._overload_timer is not None:
            self._overload_timer.cancel()
        if self.natping is not None:
            self.natping.close()
        if self.link is not None:
            self.link.close()
        self.relay.close()
        if self.admin:
            await self.admin.close()
        await self.health.close()
        for t in self.transports:
            await t.close()
        if self.hep is not None:
            self.hep.close()

    async def status(self) -> dict:
        return {
            "role": "proxy",
            "uptime_s": round(time.time() - self.started, 1),
            "listen": [hostport(a) for a in self.listen],
            **{kind: [hostport(a) for a in addrs] for kind, addrs in self.listen_streams.items()},
            "probe": self.health.probing,
            "nodes": [{"id": nid, "sip": hostport((h.node.host, h.node.port)), "up": h.up,
                       "load_factor": round(h.load_factor, 3), "last_probe_status": h.last_status}
                      for nid, h in self.health.nodes.items()],
            "workers": self.link.role.count if self.link else 1,
            "overloaded": self._overloaded(),
            "counters": self._counters().as_dict(),
            # this worker's: named trunks and NAT-pinged phones
            "dns": self.dns.view(),
            "nat_flows": len(self.natping) if self.natping is not None else None,
            "hep": self.hep.view() if self.hep is not None else None,
            "compiled": compiled.view(),
            "gc": heap.view(),
        }

    def _counters(self) -> Counters:
        """This process's counters, or with several workers all of theirs."""
        return self.link.counters() if self.link else self.stats

    def _histograms(self) -> list[Histogram]:
        """This process's histograms, or with several workers all of theirs added."""
        return self.link.histograms() if self.link else list(self.histograms.values())

    def _overloaded(self) -> bool:
        """Whether this process, or with several workers any of them, refuses new work now."""
        return self.link.overloaded() if self.link else self.overloaded

    async def metrics(self) -> tuple[str, str]:
        return prometheus(self.collect)

    def collect(self):
        yield from self._counters().families("sipha_proxy")
        nodes = list(self.health.nodes.values())
        up = GaugeMetricFamily("sipha_proxy_node_up", "1 while the node is in the ring", labels=["node"])
        lf = GaugeMetricFamily("sipha_proxy_load_factor", "share of its keys a node admits (ramp-up)",
                               labels=["node"])
        for h in nodes:
            up.add_metric([h.node.id], int(h.up))
            lf.add_metric([h.node.id], h.load_factor)
        yield up
        yield lf
        yield GaugeMetricFamily("sipha_proxy_nodes_up", "nodes in the ring", value=sum(h.up for h in nodes))
        yield GaugeMetricFamily("sipha_proxy_overloaded", "1 while new INVITEs, REGISTERs, SUBSCRIBEs and MESSAGEs are being refused (limits.overload_delay)",
                                value=int(self._overloaded()))
        yield GaugeMetricFamily("sipha_proxy_uptime_seconds", "seconds since start",
                                value=round(time.time() - self.started, 1))
        for h in self._histograms():
            yield from h.collect()

    # ---- helpers -----------------------------------------------------
    @property
    def transport(self) -> SipTransport:
        """The first IPv4 one, else (on IPv6 only) the first one."""
        return self.transports[0]

    def transport_for(self, host: str) -> SipTransport | None:
        """What sends to an address (None: no listen address of its family)."""
        return self.transport6 if ":" in host else self.transport4

    def is_us(self, uri: SipUri) -> bool:
        if not uri.is_sip:
            return False
        host = uri.host.strip("[]")
        port = uri.port or (5061 if uri.transport == "tls" else 5060)
        return (host, port) in self.our_addrs

    def our_addr(self, transport: str, v6: bool) -> tuple[str, int]:
        """Where a peer of IPv6 or IPv4 reaches us over this transport."""
        if transport not in ("udp", "tcp"):
            ours = self.stream_advertise.get((transport, v6)) or self.stream_advertise.get((transport, not v6))
            if ours:
                return ours
        return self.advertise6 if v6 else self.advertise

    def our_uri(self, transport: str, flow: str | None = None, *, v6: bool = False, ob: bool = False) -> str:
        """Our Record-Route / Path URI, for a peer of IPv6 or not; `ob`: a
        Path that tells the registrar we keep the phone's flow (RFC 5626 §5.1)."""
        t = f";transport={transport}" if transport != "udp" else ""
        f = f";flow={flow}" if flow else ""
        return f"<sip:{hostport(self.our_addr(transport, v6))}{t};lr{f}{';ob' if ob else ''}>"

    def our_via(self, transport: str, branch: str, *, internal: bool = False, v6: bool = False) -> str:
        """Our Via, towards the nodes (internal), a peer of IPv6 or one of IPv4."""
        addr = self.internal if internal else self.our_addr(transport, v6)
        return f"SIP/2.0/{transport.upper()} {hostport(addr)};branch={branch}"

    @staticmethod
    def flow_of(transport: str, addr: tuple[str, int]) -> str:
        """The flow= value of a peer's address (RFC 5626 in spirit)."""
        return f"{transport}:{hostport(addr)}"

    @staticmethod
    def branch_for(req: SipRequest) -> str:
        via = req.top_via
        b = via.branch or ""
        if b.startswith("z9hG4bK"):
            return Proxy._branch(via, req.call_id)
        # RFC 2543 peer: hash what identifies its transaction
        seed = f"{req.to.tag}|{req.from_.tag}|{req.call_id}|{req.uri}|{req.cseq[0]}|{via.raw}"
        return BRANCH_PREFIX + hashlib.blake2b(seed.encode("latin-1"), digest_size=10).hexdigest()

    @staticmethod
    def _branch(via: Via, call_id: str) -> str:
        """Our branch for a request whose top Via has an RFC 3261 branch."""
        seed = f"{via.branch}|{via.host}|{via.port}|{call_id}"
        return BRANCH_PREFIX + hashlib.blake2b(seed.encode("latin-1"), digest_size=10).hexdigest()

    def send(self, msg: SipMessage, dest: tuple[str, int], transport: str,
             answered: tuple[str, int, str] | None = None) -> None:
        """`answered`: (branch, status, method) when msg is a response,
        for the worker that owns TCP (it may be retransmitting that branch)."""
        self.send_data(msg.to_bytes(stream=transport != "udp"), dest, transport, answered)

    def send_data(self, data: bytes, dest: tuple[str, int], transport: str,
                  answered: tuple[str, int, str] | None = None) -> None:
        if transport != "udp" and not self.primary:
            self.link.send_tcp(data, dest, answered, transport)
            return
        t = self.transport_for(dest[0])
        try:
            if t is None:
                raise OSError(f"an {'IPv6' if ':' in dest[0] else 'IPv4'} address, and proxy.listen has none")
            t.send(data, dest, transport)
        except OSError as exc:
            event(log, "send_error", logging.WARNING, dest=f"{hostport(dest)}/{transport}", error=str(exc))

    def reply(self, req: SipRequest, status: int, reason: str, src, transport: str,
              headers=()) -> None:
        if req.method == "ACK":
            return  # an ACK is never answered (RFC 3261 §17.1.1.3)
        resp = make_response(req, status, reason, headers=headers, to_tag=self.reply_tag)
        resp.add("Server", "sipha-proxy")
        self.send(resp, src, transport)

    def _send_failed(self, data: bytes, dest, flow_gone: bool) -> None:
        """A request could not go out over TCP: the phone's connection it
        was for is closed, or none could be opened to `dest`. Whoever sent
        it hears so at once, as from the next hop, through the response
        path: 430 Flow Failed (RFC 5626 §5.3), else 503. Before, the
        request was dropped and the sender (a node) waited for Timer B:
        a caller heard 408 after 32 s, calling a softphone that had quit."""
        try:
            req = parse_message(data, datagram=False)
        except SipParseError:
            return
        if not isinstance(req, SipRequest) or req.method == "ACK":
            return
        tx = None if flow_gone else self.named_tx.get(req.top_via.branch or "")
        if tx is not None and tx.index + 1 < len(tx.hops) and tx.hops[tx.index].dest == dest:
            # a named trunk's server refused: its next one, at once
            self._next_hop(tx, req.method, req.call_id, "connection failed")
            self.send_data(data, tx.hops[tx.index].dest, tx.hops[tx.index].transport)
            return
        status, reason = (430, "Flow Failed") if flow_gone else (503, "Service Unavailable (next hop unreachable)")
        self.stats.inc("events", "flow_failed" if flow_gone else "tcp_unreachable")
        event(log, "send_failed", logging.WARNING, method=req.method, call_id=req.call_id,
              dest=f"{hostport(dest)}/tcp", status=status)
        resp = make_response(req, status, reason, to_tag=self.reply_tag)
        resp.add("Server", "sipha-proxy")
        self.on_response(resp, dest, "tcp")

    # ---- input -------------------------------------------------------
    def on_bad_input(self, exc: SipParseError, data: bytes, src, transport: str) -> None:
        self.stats.inc("parse_rejections")
        msg = exc.message
        answered = False
        if isinstance(msg, SipRequest) and msg.method != "ACK":
            try:
                msg.top_via, msg.from_, msg.to, msg.call_id, msg.cseq
                resp = make_response(msg, 400, reason_phrase_safe(f"Bad Request ({exc.reason})"))
                # to the source, not the Via: robust against NAT and bogus sent-by
                self.send(resp, src, transport)
                answered = True
            except SipParseError:
                pass
        ok, suppressed = self.bad_input_log.allow()
        if ok:
            event(log, "parse_rejected", logging.INFO, src=f"{hostport(src)}/{transport}",
                  reason=exc.reason, bytes=len(data), answered=answered,
                  suppressed=suppressed or None)

    def on_message(self, msg: SipMessage, src, transport: str) -> None:
        t0 = time.perf_counter()
        try:
            if isinstance(msg, SipResponse):
                self.on_response(msg, src, transport)
            else:
                self.on_request(msg, src, transport)
        except SipParseError as exc:
            if exc.message is None:
                exc.message = msg
            self.on_bad_input(exc, msg._raw or b"", src, transport)
        self.routing_latency.observe(time.perf_counter() - t0)

    # ---- requests ----------------------------------------------------
    def _limited(self, src, method: str) -> bool:
        """Over its flood limit: the request is dropped (limits.rate)."""
        allowed, banned_now = self.limiter.allow(src[0])
        if allowed:
            return False
        self.stats.inc("events", "rate_limited")
        if banned_now:
            event(log, "source_banned", logging.WARNING, src=src[0], method=method,
                  rate=self.limiter.rate, ban_s=self.limiter.ban)
        return True

    def on_request(self, req: SipRequest, src, transport: str) -> None:
        if self.limiter.enabled and src not in self.node_by_addr and self._limited(src, req.method):
            return
        if self.drop_scanners and src not in self.node_by_addr and self._is_scanner(req):
            self.stats.inc("events", "scanner_dropped")
            ok, suppressed = self.scanner_log.allow()
            if ok:
                event(log, "scanner_dropped", src=f"{hostport(src)}/{transport}", method=req.method,
                      user_agent=req.get("User-Agent"), suppressed=suppressed or None)
            return
        req.check()
        if req.method == "ACK" and req.to.tag == self.reply_tag:
            return      # the ACK to our own final response ends there
        mf = req.max_forwards
        if mf is None:
            mf = 70
        if mf <= 0:
            self.stats.inc("requests", req.method, "rejected")
            event(log, "route", method=req.method, call_id=req.call_id, src=f"{hostport(src)}/{transport}",
                  node=None, reason="rejected", status=483, why="Max-Forwards exhausted")
            self.reply(req, 483, "Too Many Hops", src, transport)
            return
        from_node = self.node_by_addr.get(src) if transport == "udp" else None
        req.set("Max-Forwards", str(mf - 1))
        if from_node is not None:
            # a node's Via is left as it is: it names the node's own SIP
            # address, and a copy another node sends again stays the same request
            self.outbound(req, src, transport, from_node)
        else:
            self._stamp_incoming_via(req, src, transport)
            self.inbound(req, src, transport)

    def _stamp_incoming_via(self, req: SipRequest, src, transport: str) -> None:
        new = self._stamped_via(req.top_via, src, transport)
        if new is not None:
            self._replace_top_via(req, new)

    @staticmethod
    def _stamped_via(via: Via, src, transport: str) -> str | None:
        """The top Via with received/rport recorded (RFC 3261 §18.2.1,
        RFC 3581 §4), or None when it needs neither."""
        params = dict(via.params)
        changed = False
        # On TCP the response must return over the same connection, which
        # is known by its source address: always record it (force_rport).
        if "rport" in via.params or transport != "udp":
            params["rport"] = str(src[1])
            changed = True
        # a received of the sender's own is not believed (auth.trusted reads it)
        if via.host.strip("[]") != src[0] or changed or via.params.get("received", src[0]) != src[0]:
            params["received"] = src[0]
            changed = True
        if not changed:
            return None
        sent_by = via.host if via.port is None else f"{via.host}:{via.port}"
        return f"{via.protocol}/{via.transport} {sent_by}{format_params(params)}"

    @staticmethod
    def _replace_top_via(msg: SipMessage, value: str) -> None:
        msg.pop_first("Via")
        msg.add_top("Via", value)

    def _pop_our_routes(self, req: SipRequest) -> str | None:
        """Remove our own Route entries (loose routing, RFC 3261 §16.4);
        return the flow one of them carried, if any."""
        flow = None
        while True:
            routes = req.routes
            if not routes:
                break
            uri = routes[0].parsed_uri
            if not self.is_us(uri):
                break
            flow = uri.params.get("flow") or flow
            req.pop_first("Route")
        # strict-routing peer (RFC 3261 §16.4): it put our Record-Route URI
        # into the Request-URI and the remote target into the last Route
        ruri = req.ruri
        if self.is_us(ruri) and "lr" in ruri.params and req.routes:
            flow = ruri.params.get("flow") or flow
            last = req.routes[-1]
            values = [r.raw for r in req.routes[:-1]]
            req.remove("Route")
            for v in values:
                req.add("Route", v)
            req.set_uri(last.uri)
        return flow

    def bekey_for(self, req: SipRequest) -> tuple[str, str]:
        """-> (bekey, source of it: stamp / aor / call-id)."""
        stamped = self._stamped_bekey(req.to.tag, req.from_.tag, req.call_id)
        if stamped:
            return stamped, "stamp"
        if req.method == "REGISTER":
            return bekey_of(req.to.parsed_uri.aor()), "aor"
        return bekey_of(req.call_id), "call-id"

    def _stamped_bekey(self, to_tag: str | None, from_tag: str | None, call_id: str) -> str | None:
        """The BEKey a node stamped into a request of a dialog. Not for an
        initial request (no To-tag), which hashes its Call-ID (DESIGN.md):
        one stamped by a node is that node's own B-leg INVITE (or its
        CANCEL) sent back to the cluster by the upstream, a call of its
        own whose record must not take the place of the first one's."""
        if to_tag is None:
            return None
        for text in (to_tag, from_tag, call_id):
            k = read_stamp(self.secret, text)
            if k:
                return k
        return None

    def _owner(self, bekey: str) -> tuple[str | None, str | None, str]:
        """-> (owner, partner, why: owner / failover / ramp); owner None
        when no node is up. Remembered until the health view changes
        (every message of a call asks)."""
        if self._owners_view != VIEW_CHANGES[0]:
            self._owners.clear()
            self._owners_view = VIEW_CHANGES[0]
        known = self._owners.get(bekey)
        if known is None:
            order = rank(bekey, self.node_ids)
            owner, partner, ramp_skipped = choose(bekey, self.node_ids, self.health.healthy(), order=order)
            why = "ramp" if ramp_skipped else "owner" if owner == order[0] else "failover"
            known = (owner, partner, why)
            remember(self._owners, bekey, known)
        return known

    def _log_route(self, method: str, call_id: str, bekey: str, src, transport: str, owner: str,
                   partner: str | None, reason: str, how: str, initial: bool) -> None:
        level = logging.INFO if (initial or reason != "owner") and method != "ACK" else logging.DEBUG
        if log.isEnabledFor(level):
            event(log, "route", level, method=method, call_id=call_id, bekey=bekey,
                  src=f"{hostport(src)}/{transport}", node=owner, partner=partner, reason=reason,
                  key_from=how)

    def inbound(self, req: SipRequest, src, transport: str) -> None:
        req.remove(ROUTE_HEADER)
        flow_of_caller = self.flow_of(transport, src)
        self._pop_our_routes(req)
        initial = req.to.tag is None
        if (req.method == "OPTIONS" and initial and not req.routes and self.is_us(req.ruri)
                and not req.ruri.user):
            # a keep-alive ping addressed to the proxy itself
            self.reply(req, 200, "OK", src, transport,
                       headers=[("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, UPDATE, INFO, REFER, SUBSCRIBE, NOTIFY, MESSAGE, PRACK")])
            return
        # new work while overloaded (over UDP it was weighed by fast_refuse already, once)
        if (initial and self.refuse_share and req.method in NEW_WORK and transport != "udp"
                and random.random() < self.refuse_share and req.call_id not in self.forwarded):
            self._refused(src, transport, req.method, lambda: req.call_id)
            self.reply(req, 503, OVERLOAD_REASON, src, transport, headers=[("Retry-After", OVERLOAD_RETRY_AFTER)])
            return
        bekey, how = self.bekey_for(req)
        owner, partner, reason = self._owner(bekey)
        if owner is None:
            self.stats.inc("requests", req.method, "no-node")
            event(log, "route", logging.WARNING, method=req.method, call_id=req.call_id, bekey=bekey,
                  src=f"{hostport(src)}/{transport}", node=None, reason="no-node")
            self.reply(req, 503, "Service Unavailable (no node up)", src, transport,
                       headers=[("Retry-After", "5")])
            return
        self.stats.inc("requests", req.method, reason)
        if req.method == "REGISTER":
            req.add_top("Path", self.our_uri(transport, flow_of_caller, v6=":" in src[0], ob=wants_outbound(req)))
        elif initial and req.method in DIALOG_CREATING:
            req.add_top("Record-Route", self.our_uri(transport, flow_of_caller, v6=":" in src[0]))
        if self.guards and initial and req.method in NEW_WORK:
            self.forwarded.add(req.call_id)
        req.add(ROUTE_HEADER, self._route_header(bekey, owner, partner, reason))
        branch = self.branch_for(req)
        req.add_top("Via", self.our_via("udp", branch, internal=True))
        self._log_route(req.method, req.call_id, bekey, src, transport, owner, partner, reason, how, initial)
        dest = self.health.nodes[owner].addr or self.nodes[owner].sip
        self.send(req, dest, "udp")
        if transport != "udp" and req.method != "ACK":
            self.relay.track(branch, req, bekey, owner)

    @staticmethod
    def _is_scanner(req: SipRequest) -> bool:
        return _scanner((req.get("User-Agent") or "").lower())

    @staticmethod
    def _route_header(bekey: str, owner: str, partner: str | None, reason: str) -> str:
        return f"bekey={bekey};owner={owner};partner={partner or ''};reason={reason}"

    def _resend_to_node(self, p: Pending) -> None:
        """Retransmit a request that came over TCP to the key's owner now."""
        owner, partner, _ = choose(p.bekey, self.node_ids, self.health.healthy())
        if owner is None:
            return
        if owner != p.node:
            event(log, "route", method=p.req.method, call_id=p.req.call_id, bekey=p.bekey, node=owner,
                  partner=partner, reason="failover", previous=p.node, retransmission=True)
            self.stats.inc("requests", p.req.method, "failover")
            p.node = owner
            p.req.set(ROUTE_HEADER, self._route_header(p.bekey, owner, partner, "failover"))
        self.send(p.req, self.health.nodes[owner].addr or self.nodes[owner].sip, "udp")

    def outbound(self, req: SipRequest, src, transport: str, node: str) -> None:
        req.remove(ROUTE_HEADER)
        flow = self._pop_our_routes(req)
        initial = req.to.tag is None
        if flow:
            try:
                dest, out_transport = self._flow_hop(flow)
            except SipParseError:
                self.reply(req, 400, "Bad Request (bad flow in Route)", src, transport)
                return
        else:
            routes = req.routes
            if routes:
                target = routes[0].parsed_uri
                if "lr" not in target.params:
                    # next hop is a strict router (RFC 3261 §16.12.1.1)
                    values = [r.raw for r in routes[1:]] + [f"<{req.uri}>"]
                    req.remove("Route")
                    for v in values:
                        req.add("Route", v)
                    req.set_uri(target.raw)
            else:
                target = req.ruri
            if not target.is_sip:
                self.reply(req, 416, "Unsupported URI Scheme", src, transport)
                return
            dest, out_transport = self._uri_hop(target)
            if not is_ip(dest[0]) and out_transport not in ("ws", "wss"):
                self._named_outbound(req, target, src, transport, node, initial)
                return
        self._forward_out(req, dest, out_transport, flow, node, initial, src, transport)

    def _forward_out(self, req: SipRequest, dest, out_transport: str, flow: str | None, node: str,
                     initial: bool, src, transport: str, branch: str | None = None) -> None:
        # a destination needs a socket of its family
        v6 = ":" in dest[0]
        missing = (("IPv6" if v6 else "IPv4") if self.transport_for(dest[0]) is None
                   else out_transport.upper() if out_transport not in self.sendable else None)
        if missing:
            event(log, "route", logging.WARNING, method=req.method, call_id=req.call_id, node=node,
                  dest=f"{hostport(dest)}/{out_transport}", reason="outbound", status=503,
                  why=f"no {missing} listen address")
            self.reply(req, 503, f"Service Unavailable (no {missing} address to send from)", src, transport)
            return
        if initial and req.method in DIALOG_CREATING:
            # over a flow (a phone's Path), our Record-Route carries it: the
            # dialog's requests to that phone then take its connection or
            # NAT binding, not its Contact (a browser's is *.invalid)
            req.add_top("Record-Route", self.our_uri(out_transport, flow, v6=v6))
        req.add_top("Via", self.our_via(out_transport, branch or self.branch_for(req), v6=v6))
        self._log_outbound(req.method, req.call_id, req.from_.tag, node, dest, out_transport, initial)
        self.stats.inc("requests", req.method, "outbound")
        # (a TLS peer's name is resolved when connecting, and verified; a
        # WebSocket one is never dialled: 430 unless it is connected)
        self.send(req, dest, out_transport)

    def _named_outbound(self, req: SipRequest, uri: SipUri, src, transport: str, node: str,
                        initial: bool) -> None:
        """A request for a host name, a named trunk: to the servers its
        SRV or A records give (proxy/dns.py), looked up once per TTL. A
        retransmission that comes while the name is being looked up is
        dropped: the first goes when the answer is in."""
        target = Target(uri.params.get("maddr") or uri.host, uri.port,
                        (uri.params.get("transport") or "").lower() or None,
                        uri.scheme == "sips")
        hops = self.dns.cached(target)
        if hops is not None:
            self._to_hops(req, hops, target, src, transport, node, initial)
            return
        waiting = (self.branch_for(req), req.method)
        if waiting in self.resolving:
            return
        self.resolving.add(waiting)

        async def when_resolved() -> None:
            try:
                hops = await self.dns.lookup(target)
            finally:
                self.resolving.discard(waiting)
            self._to_hops(req, hops, target, src, transport, node, initial)
        asyncio.get_running_loop().create_task(when_resolved())

    def _to_hops(self, req: SipRequest, hops: list[Hop], target: Target, src, transport: str,
                 node: str, initial: bool) -> None:
        """Send to the first server of `hops` for this call; a request of
        a transaction already sent (its retransmission, CANCEL or non-2xx
        ACK) to the server that got it, or, for a retransmission
        unanswered for proxy.dns_failover seconds, to the next one."""
        if not hops:
            event(log, "route", logging.WARNING, method=req.method, call_id=req.call_id, node=node,
                  dest=target.name, reason="outbound", status=478, why="unresolvable")
            self.stats.inc("events", "unresolvable")
            self.reply(req, 478, "Unresolvable Destination", src, transport)
            return
        branch = self.branch_for(req)
        tx = self.named_tx.get(branch)
        if tx is None:
            hops = self.dns.ordered(hops, req.call_id)
            if len(hops) > 1 and self.dns_failover > 0:
                self._track_named(branch, req.method, hops)
            hop = hops[0]
        else:
            now = time.monotonic()
            if req.method == tx.method and now - tx.sent >= self.dns_failover and tx.index + 1 < len(tx.hops):
                self._next_hop(tx, req.method, req.call_id, f"no answer in {now - tx.sent:.1f} s")
            hop = tx.hops[tx.index]
        self._forward_out(req, hop.dest, hop.transport, None, node, initial, src, transport, branch)

    def _track_named(self, branch: str, method: str, hops: list[Hop]) -> None:
        now = time.monotonic()
        self.named_tx[branch] = NamedTx(method, hops, now, now)
        if now >= self._named_sweep:
            # a transaction is over within 64*T1 = 32 s
            self.named_tx = {b: t for b, t in self.named_tx.items() if now - t.started < 40.0}
            self._named_sweep = now + 5.0

    def _next_hop(self, tx: NamedTx, method: str, call_id: str, why: str) -> None:
        failed = tx.hops[tx.index]
        self.dns.failed(failed)
        tx.index += 1
        tx.sent = time.monotonic()
        nxt = tx.hops[tx.index]
        self.stats.inc("events", "dns_failover")
        event(log, "dns_failover", logging.WARNING, method=method, call_id=call_id,
              failed=f"{hostport(failed.dest)}/{failed.transport}", next=f"{hostport(nxt.dest)}/{nxt.transport}",
              why=why)

    def _log_outbound(self, method: str, call_id: str, from_tag: str | None, node: str, dest,
                      transport: str, initial: bool) -> None:
        level = logging.INFO if initial and method != "ACK" else logging.DEBUG
        if log.isEnabledFor(level):
            event(log, "route", level, method=method, call_id=call_id,
                  bekey=read_stamp(self.secret, call_id) or read_stamp(self.secret, from_tag),
                  node=node, dest=f"{hostport(dest)}/{transport}", reason="outbound")

    @staticmethod
    def _flow_hop(flow: str) -> tuple[tuple[str, int], str]:
        """-> (address, transport) of a flow= value (SipParseError if bad)."""
        out_transport, _, where = flow.partition(":")
        host, port = split_hostport(where)
        return (host.strip("[]"), port or 5060), out_transport

    @staticmethod
    def _uri_hop(target: SipUri) -> tuple[tuple[str, int], str]:
        """-> (address, transport) a request for a SIP URI goes to."""
        out_transport = target.transport if target.transport in TRANSPORTS else "tcp"
        maddr = target.params.get("maddr")
        return ((maddr or target.host).strip("[]"), target.port or 5060), out_transport

    def _ask_nat_flows(self, nid: str) -> None:
        """A node answers our probes for the first time: learn the flows
        of the phones behind NAT registered there (proxy/natping.py)."""
        node = self.health.nodes[nid].node
        admin = split_hostport(node.admin) if node.admin else (node.host, node.port + AUTO_OFFSET)
        self.natping.ask(nid, (admin[0].strip("[]"), admin[1]), self._nat_flow_of_path)

    def _nat_flow_of_path(self, path: str) -> tuple[str, int] | None:
        ours, flow = self._our_route(path)
        if not ours or not flow or not flow.startswith("udp:"):
            return None
        try:
            return self._flow_hop(flow)[0]
        except SipParseError:
            return None

    def _keepalive(self, data: bytes, flow) -> None:
        self.stats.inc("events", "nat_ping")
        self.send_data(data, flow, "udp")

    def _keepalive_answered(self, kind: str) -> None:
        self.stats.inc("events", f"{kind}_keepalive")

    def _guard_overload(self, delay: float) -> None:
        """Watch the UDP queues' wait against `delay` (OverloadGuard); 0:
        stop watching. At start and at every reload: the same delay again
        changes nothing."""
        if delay <= 0:
            if self._overload_timer is not None:
                self._overload_timer.cancel()
                self._overload_timer = None
            self.guards, self.overloaded, self.refuse_share = [], False, 0.0
        elif self.guards:
            for _, g in self.guards:
                g.low = delay
        else:
            self.guards = [(t, OverloadGuard(delay)) for t in self.transports if t.measure_wait()]
            if self.guards:
                self._overload_timer = asyncio.get_running_loop().call_later(0.01, self._watch_overload)

    def _watch_overload(self) -> None:
        """Every 10 ms: how long did the last datagram read wait in its
        socket's queue (OverloadGuard)?"""
        for t, g in self.guards:
            wait = g.poll(t, log, "proxy")
            if wait is not None:
                self.queue_wait.observe(wait)
        self.overloaded = any(g.active for _, g in self.guards)
        self.refuse_share = max(g.share for _, g in self.guards)
        self._overload_timer = asyncio.get_running_loop().call_later(0.01, self._watch_overload)

    def fast_datagram(self, data: bytes, src, transport: SipTransport) -> bool:
        if data[:4] == b"SIP/":
            return self.fast_response(data, src, transport)
        if self.refuse_share:
            space = data.find(b" ", 0, 10)
            method = _NEW_WORK_METHODS.get(data[:space]) if space > 0 else None
            if method is not None and self.fast_refuse(data, src, transport, method):
                return True
        return self.fast_request(data, src, transport)

    def fast_refuse(self, data: bytes, src, transport: SipTransport, method: str) -> bool:
        """While overloaded, a share of new requests (NEW_WORK) from outside
        is answered 503 from the bytes, without parsing: refusing through
        the full path would cost about half of what the call would and
        leave little for the calls in progress (for a REGISTER, about what
        forwarding it costs). One not in the common form is let through
        (over TCP, inbound() weighs them)."""
        if (src in self.node_by_addr or random.random() >= self.refuse_share
                or (self.limiter.enabled and self.limiter.is_banned(src[0]))):
            return False
        refusal = refuse_new_request(data, transport.limits, self._refusal_line, self._reply_tag_bytes,
                                     self._refusal_tail)
        if refusal is None:
            return False
        answer, call_id, user_agent = refusal
        if self.drop_scanners and _scanner(user_agent):
            return False                    # on_request drops it without an answer
        if call_id in self.forwarded:
            return False                    # a retransmission, or what follows one let through
        if self.limiter.enabled and self._limited(src, method):
            return True
        self._refused(src, "udp", method, lambda: call_id)
        self.send_data(answer, src, "udp")
        return True

    def _refused(self, src, transport: str, method: str, call_id) -> None:
        """Count a new request refused for overload and say so at debug
        level (`call_id`: a function, so nothing is looked up when that is off)."""
        self.stats.inc("requests", method, "overload")
        for _, g in self.guards:
            g.count_refusal()
        if log.isEnabledFor(logging.DEBUG):
            event(log, "route", logging.DEBUG, method=method, call_id=call_id(),
                  src=f"{hostport(src)}/{transport}", node=None, reason="overload", status=503)

    def fast_request(self, data: bytes, src, transport: SipTransport) -> bool:
        """A request from outside the cluster over UDP, inside a dialog or
        a new INVITE, in the common form (proxy/fastpath.py), routed as
        inbound() would and written as the datagram with our edits:
        Max-Forwards decremented, received/rport stamped, our Route popped,
        our Via and the internal header added, and on a new INVITE our
        Record-Route. False: on_request has to handle it."""
        node = self.node_by_addr.get(src)
        if node is not None:
            return self.fast_outbound(data, src, transport, node)
        if self.limiter.enabled and self.limiter.is_banned(src[0]):
            return False                    # dropped at once by on_request
        t0 = time.perf_counter()
        scan = self._scan(data, transport)
        if (scan is None or scan.method == "REGISTER"
                or (scan.route is not None and not self._our_route(scan.route)[0])
                or (self.drop_scanners and _scanner(scan.user_agent))):
            return False
        initial = scan.to_tag is None
        record_route = None
        if initial:
            record_route = self._record_route(scan, self.our_uri("udp", self.flow_of("udp", src), v6=":" in src[0]))
            if record_route is None:
                return False
        stamped = self._stamped_bekey(scan.to_tag, scan.from_tag, scan.call_id)
        bekey, how = (stamped, "stamp") if stamped else (bekey_of(scan.call_id), "call-id")
        owner, partner, reason = self._owner(bekey)
        if owner is None:
            return False                    # the full path answers 503
        if self.limiter.enabled and self._limited(src, scan.method):
            return True
        if scan.method == "ACK" and scan.to_tag == self.reply_tag:
            return True                     # the ACK to our own final response
        self.stats.inc("requests", scan.method, reason)
        if initial and self.guards:
            self.forwarded.add(scan.call_id)
        route = f"{ROUTE_HEADER}: {self._route_header(bekey, owner, partner, reason)}\r\n"
        ours = self.our_via("udp", self._branch(scan.via, scan.call_id), internal=True)
        out = self._edit_request(data, scan, src, ours, route.encode("latin-1"), record_route)
        self._log_route(scan.method, scan.call_id, bekey, src, "udp", owner, partner, reason, how, initial)
        self.send_data(out, self.health.nodes[owner].addr or self.nodes[owner].sip, "udp")
        self.routing_latency.observe(time.perf_counter() - t0)
        return True

    @staticmethod
    def _scan(data: bytes, transport: SipTransport) -> RequestScan | None:
        """A request for a byte path: in a dialog, or a new INVITE, in the
        common form (scan_request) with an RFC 3261 branch and hops left;
        None: the full path has to handle it."""
        if data.count(b"tag=") < 2 and not data.startswith(b"INVITE "):
            return None                     # no To-tag: a new request, and only INVITEs take this path
        scan = scan_request(data, transport.limits)
        if (scan is None or scan.max_forwards <= 0 or not (scan.via.branch or "").startswith("z9hG4bK")
                or (scan.to_tag is None and scan.method != "INVITE")):
            return None
        return scan

    @staticmethod
    def _record_route(scan: RequestScan, uri: str) -> tuple[int, int, bytes] | None:
        """Our Record-Route line for _edit_request, where add_top puts it:
        before the first Record-Route there is, else first of all; None
        when a Record-Route is spelled in a way this search could miss (the
        full path reads it). -> (offset, rank among insertions there: first
        of all goes before a Via inserted first of all as well, since it is
        added later, line)."""
        line = f"Record-Route: {uri}\r\n".encode("latin-1")
        at = scan.head.find(b"\r\nrecord-route:")
        if at >= 0:
            return at + 2, 2, line
        return None if b"record-route" in scan.head else (scan.fields_start, 0, line)

    def fast_outbound(self, data: bytes, src, transport: SipTransport, node: str) -> bool:
        """A request from a node on its way out (a B-leg INVITE, ACK or
        BYE, a BYE to the caller) in the common form, with no Route or our
        Route as its only one: sent where outbound() would send it, with
        Max-Forwards decremented, received/rport stamped, our Route popped,
        our Via added and, on an INVITE that starts a dialog, our
        Record-Route. False: on_request has to handle it."""
        t0 = time.perf_counter()
        scan = self._scan(data, transport)
        if scan is None:
            return False
        initial = scan.to_tag is None
        ours, flow = self._our_route(scan.route) if scan.route is not None else (True, None)
        if not ours:
            return False
        if flow:
            try:
                dest, out_transport = self._flow_hop(flow)
            except SipParseError:
                return False                # the full path answers 400
        else:
            target = scan.ruri
            if not target.is_sip or self.is_us(target):
                return False                # 416, or a strict router's request (full path)
            dest, out_transport = self._uri_hop(target)
        if out_transport != "udp" or not is_ip(dest[0]) or self.transport_for(dest[0]) is None:
            return False
        v6 = ":" in dest[0]
        record_route = None
        if initial:
            record_route = self._record_route(scan, self.our_uri("udp", flow, v6=v6))
            if record_route is None:
                return False
        elif scan.method == "ACK" and scan.to_tag == self.reply_tag:
            return True                     # the ACK to our own final response
        self.stats.inc("requests", scan.method, "outbound")
        ours_via = self.our_via("udp", self._branch(scan.via, scan.call_id), v6=v6)
        out = self._edit_request(data, scan, src, ours_via, b"", record_route, from_node=True)
        self._log_outbound(scan.method, scan.call_id, scan.from_tag, node, dest, "udp", initial)
        self.send_data(out, dest, "udp")
        self.routing_latency.observe(time.perf_counter() - t0)
        return True

    def _our_route(self, value: str) -> tuple[bool, str | None]:
        """-> (a Route value that parses and names us, i.e. one that
        _pop_our_routes pops; the flow it carries). Remembered: every
        in-dialog request of a phone or a trunk carries the same one."""
        known = self._our_routes.get(value)
        if known is None:
            try:
                uri = parse_name_addr(value).parsed_uri
                known = (self.is_us(uri), uri.params.get("flow"))
            except SipParseError:
                known = (False, None)
            remember(self._our_routes, value, known)
        return known

    def _edit_request(self, data: bytes, scan: RequestScan, src, our_via: str, internal: bytes,
                      record_route: tuple[int, int, bytes] | None = None, from_node: bool = False) -> bytes:
        """The datagram as inbound() or outbound() would serialize the
        parsed request, with `our_via` on top, `internal` last and the
        Record-Route line `record_route` (where, rank, what) when there is
        one; the sender's Via stamped unless it is a node's (on_request)."""
        ours = f"Via: {our_via}\r\n"
        stamped = None if from_node else self._stamped_via(scan.via, src, "udp")
        via_start, via_end = scan.via_line
        # (start, end, rank among insertions at one place, text)
        edits = [(scan.mf_line[0], scan.mf_line[1], 1, scan.mf_name + b": %d\r\n" % (scan.max_forwards - 1)),
                 (scan.fields_end, scan.fields_end, 1, internal)]
        if record_route is not None:
            at, rank_there, line = record_route
            edits.append((at, at, rank_there, line))
        if stamped is None:
            edits.append((via_start, via_start, 1, ours.encode("latin-1")))
        else:
            # SipMessage.pop_first + add_top: the stamped Via goes before
            # the next Via field, or first of all when there is none
            edits.append((via_start, via_end, 1, b""))
            nxt = scan.head.find(b"\r\nvia:", via_end - 2)
            at = nxt + 2 if nxt >= 0 else scan.fields_start
            edits.append((at, at, 1, f"{ours}Via: {stamped}\r\n".encode("latin-1")))
        if scan.route_line is not None:
            edits.append((scan.route_line[0], scan.route_line[1], 1, b""))
        edits.sort(key=lambda e: e[:3])
        parts = []
        pos = 0
        for start, end, _, text in edits:
            parts.append(data[pos:start])
            parts.append(text)
            pos = end
        parts.append(data[pos:])
        return b"".join(parts)

    # ---- responses ---------------------------------------------------
    def fast_response(self, data: bytes, src, transport: SipTransport) -> bool:
        """A UDP response in the common case (proxy/fastpath.py), relayed
        without a message object. False: on_response has to handle it (not
        ours, over TCP, to a node that is down, carrying the internal
        header, a TCP request waiting for it, or not in the common form)."""
        if self.relay.pending:
            return False
        t0 = time.perf_counter()
        cut = strip_top_via(data, transport.limits)
        if cut is None:
            return False
        out, head, top, nxt, klass = cut
        if not top.lstrip(b" \t").startswith(self.our_via_heads) or nxt.transport != "UDP":
            return False
        dest = nxt.response_target()
        node = self.node_by_addr.get(dest)
        if node is None:
            if _ROUTE_HEADER_LINE in head:
                return False
        elif not self.health.nodes[node].reachable:
            return False
        self.stats.inc("responses", _STATUS_CLASS[klass])
        if log.isEnabledFor(logging.DEBUG):
            event(log, "response", logging.DEBUG, status=int(data[8:11]), call_id=first_value(data, head, b"call-id"),
                  dest=f"{hostport(dest)}/udp")
        self.send_data(out, dest, "udp")
        self.routing_latency.observe(time.perf_counter() - t0)
        return True

    def on_response(self, resp: SipResponse, src, transport: str) -> None:
        top = resp.top_via
        if not (top.branch or "").startswith(BRANCH_PREFIX):
            self.stats.inc("events", "response_not_ours")
            event(log, "response_dropped", logging.DEBUG, status=resp.status,
                  src=f"{hostport(src)}/{transport}", reason="top Via is not ours")
            return
        if self.relay.pending:
            self.relay.answered(top.branch, resp.status, resp.cseq[1])
        nxt = resp.second_via
        if nxt is None:
            return
        resp.pop_first("Via")
        dest = nxt.response_target()
        out_transport = nxt.transport.lower()
        if out_transport not in TRANSPORTS:
            out_transport = "tcp"
        node = self.node_by_addr.get(dest)
        if node is None:
            if (self.natping is not None and resp.cseq[1] == "REGISTER" and 200 <= resp.status < 300
                    and src in self.node_by_addr):
                # the registrar says how long the phone's flow has a binding
                # (only for one behind NAT over UDP: node/registrar.py)
                left = re.search(r"flow_expires=(\d+)", resp.get(ROUTE_HEADER) or "")
                if left:
                    self.natping.note(dest, int(left.group(1)))
            resp.remove(ROUTE_HEADER)
        elif not self.health.nodes[node].reachable:
            # The node that sent this request is gone. A response to a
            # request of a stamped call (a B-leg) goes to the call's owner
            # now, which holds the replica: a retransmitted 2xx then still
            # gets its ACK and the callee keeps the call.
            bekey = read_stamp(self.secret, resp.call_id) or read_stamp(self.secret, resp.from_.tag)
            if bekey is not None:
                owner, _, _ = choose(bekey, self.node_ids, self.health.healthy())
                if owner is not None:
                    event(log, "response_rerouted", status=resp.status, call_id=resp.call_id, bekey=bekey,
                          dead=node, node=owner)
                    self.stats.inc("events", "response_rerouted")
                    dest = self.health.nodes[owner].addr or self.nodes[owner].sip
        self.stats.inc("responses", _STATUS_CLASS[resp.status // 100])
        if log.isEnabledFor(logging.DEBUG):
            event(log, "response", logging.DEBUG, status=resp.status, call_id=resp.call_id,
                  dest=f"{hostport(dest)}/{out_transport}")
        self.send(resp, dest, out_transport,
                  answered=(top.branch, resp.status, resp.cseq[1]) if out_transport != "udp" else None)
