"""Where a request for a host name goes (RFC 3263 §4).

A trunk is often named, not numbered (`sip:carrier.example`): its
operator publishes NAPTR and SRV records saying which servers take SIP,
over which transport, in which order. For a URI with a host name:

- a port in the URI: that port on each address of the name;
- no port and no `transport=`: the name's NAPTR records first (§4.1):
  those for a transport the proxy can send over (`SIP+D2U` UDP,
  `SIP+D2T` TCP, `SIPS+D2T` TLS; only `SIPS+D2T` for a sips: URI) with
  the "s" flag, by order and then preference; the first whose SRV
  name (its replacement) has records wins;
- no port, no usable NAPTR (or none whose SRV name has records), or a
  `transport=`: SRV records `_sip._udp`, `_sip._tcp` and `_sips._tcp` of
  the name (only the URI's transport, when it names one; only
  `_sips._tcp` for a sips: URI); the first of those the proxy can send
  over that has records wins, UDP before TCP before TLS, as Kamailio
  prefers them; each record's target is then resolved to its addresses;
- no SRV records: the name's addresses, port 5060 (5061 for TLS).

A name's addresses are its IPv4 ones, then, when the proxy listens on
IPv6 as well, its IPv6 ones (A, then AAAA), so a server with both is
reached over IPv4 first and over IPv6 when that fails.

SRV records are ordered as RFC 2782 asks: by priority, and among one
priority by a draw weighted by their weights. The draw is seeded with the
Call-ID, so every request of one call (its CANCEL, its ACK, a request in
its dialog addressed by name) takes the same server while calls spread
over the servers by weight. A server that failed (no answer in
`proxy.dns_failover` seconds, or a TCP/TLS connection refused) goes last
for `DOWN_SECONDS`, as in Kamailio's destination blacklist.

NAPTR and SRV answers are cached for their TTL. Addresses come from the
system's resolver (getaddrinfo: /etc/hosts counts, unlike Kamailio's own
DNS cache), or when `proxy.dns_servers` names servers, from /etc/hosts
and else those servers (A and AAAA), never from /etc/resolv.conf's;
they are kept `A_TTL` seconds. A failed lookup is kept `NEGATIVE_TTL`
seconds, so a flood of calls to a bad name does not become a flood of
queries. Concurrent lookups of one name share a query. For TLS a target
stays a name: the connection verifies it.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from sipcore.headers import hostport, is_ip
from sipcore.logfmt import event

log = logging.getLogger("proxy")

A_TTL = 30.0            # seconds an address from getaddrinfo is reused
NEGATIVE_TTL = 5.0      # seconds a name that did not resolve is not asked again
MAX_TTL = 3600.0
DOWN_SECONDS = 60.0     # a server that failed is tried last for this long
SRV_SERVICE = {"udp": "_sip._udp", "tcp": "_sip._tcp", "tls": "_sips._tcp"}
NAPTR_SERVICE = {b"SIP+D2U": "udp", b"SIP+D2T": "tcp", b"SIPS+D2T": "tls"}     # RFC 3263 §4.1
DEFAULT_PORT = {"udp": 5060, "tcp": 5060, "tls": 5061}


@dataclass(frozen=True)
class Hop:
    """One server a request may go to: an IPv4 or IPv6 address (a name for TLS),
    port and transport; priority and weight from its SRV record."""
    host: str
    port: int
    transport: str
    priority: int = 0
    weight: int = 0

    @property
    def dest(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass
class Target:
    """What a URI's host part asks for: a name, the URI's port (None:
    SRV), its transport (None: any) and whether it is sips:."""
    name: str
    port: int | None
    transport: str | None
    sips: bool = False

    @property
    def key(self) -> tuple:
        return (self.name.lower(), self.port, self.transport, self.sips)


@dataclass
class _Entry:
    hops: list[Hop]
    expires: float
    srv: bool = field(default=False)


class DnsResolver:
    def __init__(self, servers: list[tuple[str, int]], usable: frozenset[str]):
        """`servers`: DNS servers to ask for NAPTR and SRV records and for
        the addresses of names /etc/hosts does not list (empty: those of
        /etc/resolv.conf, and addresses from the system's resolver);
        `usable`: transports the proxy can send over."""
        self.usable = usable
        self.ipv6 = False            # the proxy can send to IPv6 addresses (set once it listens)
        self.ipv4 = True             # ... and to IPv4 ones (not when it listens on IPv6 only)
        self._ask_addresses = bool(servers)
        self.hosts = HostsFile()
        self.cache: dict[tuple, _Entry] = {}
        self.pending: dict[tuple, asyncio.Future] = {}
        self.down: dict[tuple[str, int, str], float] = {}
        self.stats = {"lookups": 0, "failures": 0}
        try:
            self._srv = dns.asyncresolver.Resolver(configure=not servers)
        except dns.resolver.NoResolverConfiguration:
            self._srv = dns.asyncresolver.Resolver(configure=False)
            servers = servers or [("127.0.0.1", 53)]
        if servers:
            self._srv.nameservers = [h for h, _ in servers]
            self._srv.nameserver_ports = {h: p for h, p in servers}
        self._srv.timeout, self._srv.lifetime = 1.0, 2.0

    # ---- lookups ------------------------------------------------------
    def cached(self, target: Target) -> list[Hop] | None:
        entry = self.cache.get(target.key)
        if entry is None or entry.expires < time.monotonic():
            return None
        return entry.hops

    async def lookup(self, target: Target) -> list[Hop]:
        """Hops for `target`, unordered ([]: it does not resolve)."""
        hops = self.cached(target)
        if hops is not None:
            return hops
        key = target.key
        fut = self.pending.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self.pending[key] = fut
            entry = _Entry([], time.monotonic() + NEGATIVE_TTL)
            try:
                entry = await self._lookup(target)
            except Exception as exc:       # a bug must not leave waiters hanging
                event(log, "dns_error", logging.ERROR, host=target.name, error=repr(exc))
            finally:
                self.cache[key] = entry
                del self.pending[key]
                fut.set_result(entry.hops)
            if len(self.cache) > 10_000:
                # bounded: names come from the Contacts and Routes of
                # dialogs, which the far side chooses
                now = time.monotonic()
                self.cache = {k: e for k, e in self.cache.items() if e.expires >= now}
                if len(self.cache) > 10_000:
                    self.cache.clear()
        return await asyncio.shield(fut)

    async def _lookup(self, target: Target) -> _Entry:
        self.stats["lookups"] += 1
        now = time.monotonic()
        if target.port is None:
            found = await self._naptr_hops(target) if target.transport is None else None
            if found is None:
                transports = [target.transport] if target.transport else (
                    ["tls"] if target.sips else ["udp", "tcp", "tls"])
                transports = [t for t in transports if t in self.usable]
                qnames = [self._srv_name(target.name, t) for t in transports]
                srvs = await asyncio.gather(*(self._srv_hops(q, t) for q, t in zip(qnames, transports)))
                found = next(((q, hops, ttl, None) for q, (hops, ttl) in zip(qnames, srvs) if hops), None)
            if found is not None:
                qname, hops, ttl, naptr = found
                event(log, "dns_resolved", logging.INFO, host=target.name, naptr=naptr, service=qname.rstrip("."),
                      hops=" ".join(f"{hostport((h.host, h.port))}/{h.transport}" for h in hops), ttl=int(ttl))
                return _Entry(hops, now + ttl, srv=True)
        transport = target.transport or ("tls" if target.sips else "udp")
        port = target.port or DEFAULT_PORT.get(transport, 5060)
        if transport == "tls":
            return _Entry([Hop(target.name, port, transport)], now + A_TTL)
        addrs = await self._addresses(target.name)
        if not addrs:
            self.stats["failures"] += 1
            event(log, "dns_failed", logging.WARNING, host=target.name,
                  why="no SRV and no address" if target.port is None else "no address")
            return _Entry([], now + NEGATIVE_TTL)
        return _Entry([Hop(a, port, transport) for a in addrs], now + A_TTL)

    @staticmethod
    def _srv_name(name: str, transport: str) -> str:
        return f"{SRV_SERVICE[transport]}.{name.rstrip('.')}."

    async def _naptr_hops(self, target: Target) -> tuple[str, list[Hop], float, str] | None:
        """RFC 3263 §4.1: the servers of the first NAPTR record, by order
        and preference, for a transport we can send over and whose SRV
        name has records -> (that SRV name, its hops, the shorter TTL, the
        record's service for the log); None: no such record (the caller
        asks the SRV names itself)."""
        answer = await self._query(target.name.rstrip(".") + ".", "NAPTR")
        if answer is None:
            return None
        wanted = [r for r in answer
                  if r.flags.lower() == b"s" and NAPTR_SERVICE.get(r.service.upper()) in self.usable
                  and (not target.sips or r.service.upper() == b"SIPS+D2T")]
        ttl = _ttl(answer)
        for r in sorted(wanted, key=lambda r: (r.order, r.preference)):
            qname = r.replacement.to_text()
            hops, srv_ttl = await self._srv_hops(qname, NAPTR_SERVICE[r.service.upper()])
            if hops:
                return qname, hops, min(ttl, srv_ttl), r.service.decode("latin-1")
        return None

    async def _query(self, qname: str, rtype: str):
        """The answer of the DNS servers, or None (no such name or record,
        or they did not answer: logged)."""
        try:
            return await self._srv.resolve(qname, rtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.DNSException as exc:
            event(log, "dns_error", logging.WARNING, host=qname, type=rtype, error=type(exc).__name__)
            return None

    async def _srv_hops(self, qname: str, transport: str) -> tuple[list[Hop], float]:
        """The servers the SRV records of `qname` list, each target resolved
        ([] when there are none, or the DNS did not answer)."""
        answer = await self._query(qname, "SRV")
        if answer is None:
            return [], 0.0
        records = [r for r in answer if str(r.target) != "."]     # "." : no such service here
        hops: list[Hop] = []
        for r in records:
            target = str(r.target).rstrip(".")
            hosts = [target] if transport == "tls" else await self._addresses(target)
            hops.extend(Hop(h, r.port, transport, r.priority, r.weight) for h in hosts)
        return hops, _ttl(answer)

    async def _addresses(self, name: str) -> list[str]:
        """IPv4 addresses first, then IPv6 ones, each family when we can send to it:
        the system resolver's (getaddrinfo), or with proxy.dns_servers
        set, /etc/hosts' and else those servers' (A, AAAA): the system's
        DNS servers are then never asked."""
        found: list[str] = []
        v6s = [v6 for v6, sendable in ((False, self.ipv4), (True, self.ipv6)) if sendable]
        if self._ask_addresses:
            known = self.hosts.get(name.rstrip(".").lower()) or []
            found = [a for v6 in v6s for a in known if (":" in a) == v6]
            if not found:
                for v6 in v6s:
                    answer = await self._query(name.rstrip(".") + ".", "AAAA" if v6 else "A")
                    found.extend(r.address for r in answer or ())
            return list(dict.fromkeys(found))
        loop = asyncio.get_running_loop()
        for family in (socket.AF_INET6 if v6 else socket.AF_INET for v6 in v6s):
            try:
                infos = await loop.getaddrinfo(name, None, family=family, type=socket.SOCK_DGRAM)
            except OSError:
                continue
            found.extend(info[4][0] for info in infos if info[0] == family)
        return list(dict.fromkeys(found))

    # ---- choosing -----------------------------------------------------
    def ordered(self, hops: list[Hop], call_id: str) -> list[Hop]:
        """`hops` in the order to try them for this call: by priority, a
        weighted draw (RFC 2782) seeded by the Call-ID among equals, the
        servers that failed lately last."""
        if len(hops) > 1:
            rng = random.Random(hashlib.blake2b(call_id.encode("latin-1", "replace"), digest_size=8).digest())
            out: list[Hop] = []
            for prio in sorted({h.priority for h in hops}):
                group = [h for h in hops if h.priority == prio]
                while group:
                    total = sum(h.weight for h in group)
                    if total == 0:
                        out.extend(group)
                        break
                    pick = rng.uniform(0, total)
                    for i, h in enumerate(group):
                        pick -= h.weight
                        if pick <= 0 or i == len(group) - 1:
                            out.append(group.pop(i))
                            break
            hops = out
        if self.down:
            now = time.monotonic()
            hops = sorted(hops, key=lambda h: self.down.get((h.host, h.port, h.transport), 0.0) > now)
        return hops

    def view(self) -> dict:
        """For /status: each name looked up and what it gave (until when),
        and the servers tried last after failing (kamcmd dns.view and
        dst_blacklist.view)."""
        now = time.monotonic()
        names = {}
        for (name, port, transport, sips), entry in sorted(self.cache.items(), key=lambda kv: str(kv[0])):
            if entry.expires > now:
                key = name + (f":{port}" if port else "") + (f";transport={transport}" if transport else "") + \
                    (" (sips)" if sips else "")
                names[key] = {"servers": [f"{hostport((h.host, h.port))}/{h.transport}" for h in entry.hops],
                              "srv": entry.srv, "expires_in_s": round(entry.expires - now, 1)}
        down = {f"{hostport((host, port))}/{transport}": round(until - now, 1)
                for (host, port, transport), until in self.down.items() if until > now}
        return {"names": names, "servers_down_s": down, **self.stats}

    def failed(self, hop: Hop) -> None:
        self.down[(hop.host, hop.port, hop.transport)] = time.monotonic() + DOWN_SECONDS
        if len(self.down) > 1000:
            now = time.monotonic()
            self.down = {k: t for k, t in self.down.items() if t > now}


def _ttl(answer) -> float:
    return min(max(float(answer.rrset.ttl), 1.0), MAX_TTL)


class HostsFile:
    """The addresses /etc/hosts gives each name, read again when it changes."""

    def __init__(self, path: str = "/etc/hosts"):
        self.path = path
        self._mtime: float | None = None
        self._names: dict[str, list[str]] = {}

    def get(self, name: str) -> list[str] | None:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            return None
        if mtime != self._mtime:
            self._mtime, self._names = mtime, {}
            try:
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        fields = line.split("#", 1)[0].split()
                        if len(fields) >= 2 and is_ip(fields[0].split("%", 1)[0]):
                            for alias in fields[1:]:
                                self._names.setdefault(alias.lower(), []).append(fields[0])
            except OSError:
                return None
        return self._names.get(name)
