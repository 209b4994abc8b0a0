"""A copy of every SIP message to a capture server, as HEP version 3
(Homer's encapsulation: Kamailio's siptrace and sipcapture, OpenSIPS's
proto_hep, heplify): operators search calls in Homer instead of running
tcpdump on each host, and a cluster's proxy and nodes show up there as
the hops of one call.

Each message a process sends or receives (after TLS or WebSocket framing,
as SIP) goes out as one UDP datagram: generic chunks (vendor 0) for the
address family, the transport (UDP or TCP), both addresses and ports, the
time, the payload type (SIP), the capture agent's id, an optional
password, and the message. Sending never waits and never fails a call:
a copy that cannot go (no route, a full buffer) is counted and dropped.
"""
from __future__ import annotations

import socket
import struct
import time

from .headers import hostport, is_ip
from .stats import Counters

Addr = tuple[str, int]

_PROTO = {"udp": socket.IPPROTO_UDP}      # TCP, TLS, WebSocket: TCP
_SIP = 1                                  # the payload type chunk's value for SIP


def _chunk(kind: int, value: bytes) -> bytes:
    return struct.pack("!HHH", 0, kind, 6 + len(value)) + value


def encode_hep3(payload: bytes, src: Addr, dst: Addr, transport: str, capture_id: int,
                when: float | None = None, password: str = "") -> bytes:
    """One HEP3 packet carrying `payload`, seen going from `src` to `dst`
    over `transport` (udp, tcp, tls, ws, wss). Both addresses are of one
    family: an IPv4 one beside an IPv6 one is written as IPv4-mapped."""
    v6 = ":" in src[0] or ":" in dst[0]
    family = socket.AF_INET6 if v6 else socket.AF_INET

    def packed(host: str) -> bytes:
        if v6 and ":" not in host:
            host = "::ffff:" + host
        return socket.inet_pton(family, host)

    when = time.time() if when is None else when
    seconds = int(when)
    parts = [
        _chunk(1, bytes([2 if not v6 else 10])),           # the family as HEP numbers it (AF_INET, AF_INET6)
        _chunk(2, bytes([_PROTO.get(transport, socket.IPPROTO_TCP)])),
        _chunk(5 if v6 else 3, packed(src[0])),
        _chunk(6 if v6 else 4, packed(dst[0])),
        _chunk(7, struct.pack("!H", src[1])),
        _chunk(8, struct.pack("!H", dst[1])),
        _chunk(9, struct.pack("!I", seconds)),
        _chunk(10, struct.pack("!I", int((when - seconds) * 1_000_000))),
        _chunk(11, bytes([_SIP])),
        _chunk(12, struct.pack("!I", capture_id)),
    ]
    if password:
        parts.append(_chunk(14, password.encode()))
    parts.append(_chunk(15, payload))
    body = b"".join(parts)
    return b"HEP3" + struct.pack("!H", 6 + len(body)) + body


# the counter a process keeps of its copies (with its own, so that
# /metrics and the workers' sums count them): result sent or dropped
HEP_COUNTER = {"hep_copies": ("result",)}


class HepMirror:
    """Copies to one capture server over UDP, from a socket of its own,
    counted in `counters` (HEP_COUNTER)."""

    MAX_PAYLOAD = 65535 - 200        # the packet's length field is 16 bits

    def __init__(self, server: Addr, capture_id: int, password: str = "", counters: Counters | None = None):
        self.server = server
        self.capture_id = capture_id
        self.password = password
        self.counters = counters if counters is not None else Counters(HEP_COUNTER)
        self.sock = socket.socket(socket.AF_INET6 if ":" in server[0] else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def copy(self, payload: bytes, src: Addr, dst: Addr, transport: str) -> None:
        if len(payload) > self.MAX_PAYLOAD or not (is_ip(src[0]) and is_ip(dst[0])):
            self.counters.inc("hep_copies", "dropped")
            return
        try:
            self.sock.sendto(encode_hep3(payload, src, dst, transport, self.capture_id, password=self.password),
                             self.server)
            self.counters.inc("hep_copies", "sent")
        except OSError:
            # no route, a full buffer: the call goes on without its copy
            self.counters.inc("hep_copies", "dropped")

    def view(self) -> dict:
        """For /status: where the copies go, how many went and how many
        could not (this process's; the counters sum a proxy's workers)."""
        return {"server": hostport(self.server), "sent": self.counters.get("hep_copies", "sent"),
                "dropped": self.counters.get("hep_copies", "dropped")}

    def close(self) -> None:
        self.sock.close()


# the settings of the copies: changed on a reload (SIGHUP), as Kamailio's
# siptrace.status turns tracing on and off at run time
HEP_SETTINGS = ("hep.server", "hep.capture_id", "hep.password")


def mirror_for(cfg, counters: Counters) -> HepMirror | None:
    """The copies `cfg` (a Config) asks for, or None when hep.server is off."""
    server = cfg.hep_server
    return HepMirror(server, cfg["hep.capture_id"], cfg["hep.password"], counters) if server else None
