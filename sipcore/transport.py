"""asyncio SIP transports: one UDP endpoint and one TCP server per listen
address, TLS and WebSocket servers (RFC 3261 §26.3.1: TCP with TLS on
its own port; RFC 7118: SIP over WebSocket, with TLS or not) added with
`listen_stream`, plus outgoing TCP and TLS connections, all independent
of routing.

Every message received, from any transport, reaches one callback:
`on_message(msg, source, transport)` with source = (host, port) and
transport = "udp" | "tcp" | "tls" | "ws" | "wss". Input that does not parse reaches
`on_bad_input(error, data, source, transport)`, which may answer 400 with
`send()`; on TCP the connection is closed after framing is lost.

Queue wait (UDP, Linux): `measure_wait()` has the kernel timestamp
datagrams as they arrive; then, after `wait_wanted` is set, the next
datagram read leaves in `last_wait` how long it sat in the socket's
receive queue (SIOCGSTAMP), the measure an overload guard needs.

Sending: `send(data, (host, port), transport)`. TCP and TLS reuse the
connection of that kind to that remote address in either direction (a
phone that registered over TCP is reached over its own connection, RFC
3261 §18.2.2 / RFC 5626), open one if there is none (TLS: the peer
verified with `tls_client`, against the host name or address it was
given), and close connections idle for `idle_timeout`. Write buffers
are bounded: a peer that does not read is disconnected. A peer whose own
connection closed is not dialled back (its port was that connection's),
and a connection that cannot be opened fails at once: either reaches
`on_send_failed(data, dest, flow_gone)`.

TCP defences (slowloris and friends): at most `max_connections` in all and
`max_per_source` from one IP address (further ones are closed at once); a
message that has started must be complete within `header_timeout`
seconds, else the connection is closed; read buffers are bounded by the
message size limit (see framing).
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import socket
import ssl
import struct
import time
from typing import Callable

from .errors import SipParseError
from .logfmt import RateLimitedLog, event
from .framing import PING, PONG, FramingError, StreamFramer
from .headers import hostport
from .hep import HepMirror
from . import stun
from .websocket import WsServer, frame
from .message import DEFAULT_LIMITS, Limits, SipMessage, parse_message

log = logging.getLogger("sipcore.transport")

Addr = tuple[str, int]
SOCKET_BUFFER = 4 * 1024 * 1024
GONE_FLOWS_KEPT = 10000      # closed peer connections remembered (SipTransport.gone_flows)
SIOCGSTAMP = 0x8906          # Linux: arrival time (struct timeval) of the last datagram read
_TIMEVAL = struct.Struct("@ll")


def _enlarge_buffers(sock: socket.socket) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass  # the OS caps it (net.core.rmem_max); what we get is fine


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: "SipTransport"):
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport):
        self.transport = transport
        # the socket's now: a datagram already queued for it (SO_REUSEPORT
        # hands a new socket its flows at once) may be read, and answered,
        # before create_datagram_endpoint's caller resumes
        self.owner.udp = self

    def datagram_received(self, data, addr):
        self.owner._received(data, (addr[0], addr[1]), "udp", datagram=True)

    def error_received(self, exc):
        # ICMP errors on an unconnected socket; routing learns of dead peers
        # through its own health probes.
        event(log, "udp_error", logging.DEBUG, error=str(exc))


def certificate_names(cert: dict) -> list[str]:
    """The names a peer's certificate (SSLObject.getpeercert()) carries, lower
    case: its subjectAltName DNS names and sip:/sips: URIs' hosts (RFC 5922
    §7.1), else, when it has none of those, its common names."""
    names = []
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            names.append(value)
        elif kind == "URI" and value.lower().startswith(("sip:", "sips:")):
            names.append(value.split(":", 1)[1].rsplit("@", 1)[-1].split(";", 1)[0].split(":", 1)[0])
    if not names:
        names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    return [n.lower().rstrip(".") for n in names]


def _one_label_wildcard(pattern: str, name: str) -> bool:
    return pattern.startswith("*.") and name.partition(".")[2] == pattern[2:] and name.partition(".")[0] != ""


def name_allowed(names: list[str], allowed: tuple[str, ...]) -> bool:
    """Whether one of a certificate's `names` is one of `allowed`: equal, or
    either side `*.rest` standing for one label before rest."""
    return any(n == a or _one_label_wildcard(a, n) or _one_label_wildcard(n, a) for n in names for a in allowed)


class _TcpConnection(asyncio.Protocol):
    def __init__(self, owner: "SipTransport", kind: str = "tcp", server_tls: ssl.SSLContext | None = None):
        self.owner = owner
        self.kind = kind         # "tcp", "tls", "ws" or "wss" (RFC 7118: WebSocket, over TLS or not)
        self.ws = WsServer(owner.limits.max_message, owner.ws_origins) if kind in ("ws", "wss") else None
        self.framer = StreamFramer(owner.limits)
        self.transport: asyncio.Transport | None = None
        self.peer: Addr | None = None
        self.last_active = time.monotonic()
        self.partial_since: float | None = None   # when an unfinished message (or TLS handshake) began
        self.closed = asyncio.get_running_loop().create_future()
        self.accepted = True
        self.dialled = False     # we connected (SipTransport._connect), not the peer
        # An accepted TLS connection: TLS is done here, over memory BIOs,
        # so the connection is counted against the limits as it is
        # accepted, like a TCP one, and its handshake is bounded as a
        # message is (header_timeout); those we dial use asyncio's.
        self.server_tls = server_tls
        self.tls: ssl.SSLObject | None = None
        self.handshaking = False

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1])
        self.accepted = self.owner._register(self)
        if not self.accepted:
            transport.abort()
            return
        if self.ws is not None:
            self.partial_since = time.monotonic()    # the upgrade is due within header_timeout
        if self.server_tls is not None:
            self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = self.server_tls.wrap_bio(self._in, self._out, server_side=True)
            self.handshaking = True
            self.partial_since = time.monotonic()

    def _decrypt(self, data: bytes) -> bytes | None:
        """TLS records in, what they carry out (None: the connection ended)."""
        self._in.write(data)
        try:
            if self.handshaking:
                self.tls.do_handshake()
                self.handshaking = False
                if self.ws is None:
                    self.partial_since = None
                if self.kind == "tls" and self.owner.tls_peers and not self._peer_allowed():
                    return None
            chunks = []
            while True:
                chunk = self.tls.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, OSError) as exc:     # a bad handshake, a close_notify, a broken record
            # a peer refused for its certificate (mutual TLS) is worth an
            # operator's eye; the rest is the noise of the Internet
            refused = self.handshaking and "CERTIFICATE" in str(exc).upper()
            event(log, "tls_refused" if refused else "tls_closed", logging.INFO if refused else logging.DEBUG,
                  peer=hostport(self.peer), handshake=self.handshaking, error=str(exc) or type(exc).__name__)
            self._flush()
            self.transport.close()
            return None
        self._flush()
        return b"" if self.handshaking else b"".join(chunks)

    def _peer_allowed(self) -> bool:
        """Mutual TLS with proxy.tls_peers: the certificate the peer showed
        names one of them; else the connection is closed, said once."""
        names = certificate_names(self.tls.getpeercert() or {})
        if name_allowed(names, self.owner.tls_peers):
            return True
        event(log, "tls_refused", peer=hostport(self.peer), handshake=False, names=",".join(names) or None,
              error="certificate names none of proxy.tls_peers")
        self._flush()
        self.transport.close()
        return False

    def awaited(self) -> str:
        """What an unfinished connection waits for (the reaper's reason)."""
        if self.handshaking:
            return "TLS handshake"
        if self.ws is not None and not self.ws.upgraded:
            return "WebSocket upgrade"
        return "message"

    def _flush(self) -> None:
        out = self._out.read()
        if out:
            self.transport.write(out)

    def data_received(self, data):
        if not self.accepted:
            return
        now = time.monotonic()
        self.last_active = now
        if self.tls is not None:
            data = self._decrypt(data)
            if not data:
                return
        if self.ws is not None:
            self._ws_received(data, now)
            return
        try:
            events = self.framer.feed(data)
        except FramingError as exc:
            self.owner._bad_input(exc, data, self.peer, self.kind)
            self.transport.close()
            return
        self.partial_since = (self.partial_since or now) if self.framer.buffered else None
        for ev in events:
            if ev is PING:
                self._write(PONG)
                if self.owner.on_keepalive is not None:
                    self.owner.on_keepalive("crlf")
            else:
                self.owner._received(ev, self.peer, self.kind, datagram=False)

    def _ws_received(self, data: bytes, now: float) -> None:
        """WebSocket: one SIP message a data frame, no Content-Length needed."""
        fed = self.ws.feed(data)
        for out in fed.out:
            self._write(out)
        for message in fed.messages:
            if message.strip(b"\r\n"):       # a frame of CRLFs is a keep-alive, not a message
                self.owner._received(message, self.peer, self.kind, datagram=False, framed=True)
        if fed.close:
            event(log, "ws_refused" if fed.refused else "ws_closed", logging.INFO if fed.refused else logging.DEBUG,
                  peer=hostport(self.peer), reason=fed.error)
            self.transport.close()
        pending = self.ws.buffered or not self.ws.upgraded
        self.partial_since = (self.partial_since or now) if pending else None

    def connection_lost(self, exc):
        if self.accepted:
            self.accepted = False
            self.owner._unregister(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def write(self, data: bytes) -> None:
        if self.handshaking or (self.ws is not None and (not self.ws.upgraded or self.ws.closing)):
            return      # never in clear: it is retransmitted, or fails as a request to a gone flow does
        self.last_active = time.monotonic()
        if self.transport.get_write_buffer_size() > self.owner.max_write_buffer:
            event(log, "tcp_closed", logging.WARNING, peer=hostport(self.peer),
                  reason="peer does not read (write buffer full)")
            self.transport.abort()
            return
        self._write(frame(data) if self.ws is not None else data)

    def _write(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.write(data)
            data = self._out.read()
        self.transport.write(data)


class SipTransport:
    def __init__(self, on_message: Callable[[SipMessage, Addr, str], None],
                 on_bad_input: Callable[[SipParseError, bytes, Addr, str], None] | None = None,
                 *, limits: Limits = DEFAULT_LIMITS, idle_timeout: float = 300.0,
                 max_write_buffer: int = 1024 * 1024, max_connections: int = 4096,
                 max_per_source: int = 64, header_timeout: float = 10.0,
                 fast_datagram: Callable[[bytes, Addr, "SipTransport"], bool] | None = None,
                 on_send_failed: Callable[[bytes, Addr, bool], None] | None = None):
        self.on_message = on_message
        # tried first for each datagram; True: it was handled without parsing
        self.fast_datagram = fast_datagram
        self.on_bad_input = on_bad_input
        # what could not go out over TCP, and whether it was for a flow gone
        # (a peer's own connection, closed): the owner may answer for it
        self.on_send_failed = on_send_failed
        self.limits = limits
        self.idle_timeout = idle_timeout
        self.max_write_buffer = max_write_buffer
        self.max_connections = max_connections
        self.max_per_source = max_per_source
        self.header_timeout = header_timeout
        self.per_source: dict[str, int] = {}
        self.refused_connections = 0
        self.refused_log = RateLimitedLog()
        # a keep-alive answered: "stun" over UDP (sipcore/stun.py), "crlf"
        # over a stream (RFC 5626 §4.4.1, 3.5.1)
        self.on_keepalive: Callable[[str], None] | None = None
        self.udp: _UdpProtocol | None = None
        self.tcp_servers: list[asyncio.base_events.Server] = []     # TLS ones too
        self.tls_client: ssl.SSLContext | None = None   # for the TLS connections we open
        # the TLS context each kind of stream server ("tls", "wss") accepts
        # with, looked up at each accept: a reload swaps it for new ones
        self.stream_tls: dict[str, ssl.SSLContext | None] = {}
        self.ws_origins: frozenset[str] = frozenset()     # WsServer: the web origins let in (empty: any)
        self.tls_peers: tuple[str, ...] = ()     # mutual TLS ("tls" kind): the certificate names let in (empty: any)
        self.connections: dict[Addr, _TcpConnection] = {}
        # peers whose own connection to us closed lately (a phone's flow,
        # RFC 5626): their port was theirs for that connection only
        self.gone_flows: dict[Addr, None] = {}
        self._connecting: dict[Addr, asyncio.Task] = {}
        self._reaper: asyncio.Task | None = None
        self.local: Addr | None = None
        self.wait_wanted = False                 # measure the next datagram's queue wait
        self.last_wait: float | None = None      # ... seconds it waited (measure_wait)
        self._stamp_fd = -1
        # wall clock: a datagram that arrived before it is marked stale (mark_backlog)
        self.backlog_before: float | None = None
        self.hep: HepMirror | None = None        # a copy of each message to a capture server (hep.server)

    # ---- lifecycle ---------------------------------------------------
    async def listen(self, host: str, port: int, *, udp: bool = True, tcp: bool = True,
                     reuse_port: bool = False) -> Addr:
        """Listen on host:port (port 0 picks a free one, shared by UDP and
        TCP). With reuse_port, several processes bind the same UDP port and
        the kernel spreads the flows (source address and port) among them,
        keeping each flow on one socket, so its messages stay in order."""
        loop = asyncio.get_running_loop()
        for attempt in range(20):
            try:
                await self._bind(host, port, udp=udp, tcp=tcp, reuse_port=reuse_port)
                break
            except OSError as exc:
                # port 0: the UDP port the kernel chose may be taken for TCP
                # by someone else; then choose again
                if port != 0 or not (udp and tcp) or exc.errno != errno.EADDRINUSE or attempt == 19:
                    raise
        bound = self.tcp_servers[-1].sockets[0] if tcp else self.udp.transport.get_extra_info("socket")
        self.local = (host, bound.getsockname()[1])
        if self._reaper is None:
            self._reaper = loop.create_task(self._reap_idle())
        return self.local

    async def listen_stream(self, kind: str, host: str, port: int, context: ssl.SSLContext | None = None) -> Addr:
        """A server of kind "tls", "ws" or "wss" on host:port (port 0
        picks one); `context`: the TLS one ("tls", "wss")."""
        self.stream_tls[kind] = context
        server = await asyncio.get_running_loop().create_server(
            lambda: _TcpConnection(self, kind, server_tls=self.stream_tls[kind]), host, port, reuse_address=True)
        self.tcp_servers.append(server)
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())
        return host, server.sockets[0].getsockname()[1]

    async def _bind(self, host: str, port: int, *, udp: bool, tcp: bool, reuse_port: bool) -> None:
        loop = asyncio.get_running_loop()
        udp_transport = None
        if udp:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
            try:
                _enlarge_buffers(sock)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((host, port))
            except OSError:
                sock.close()
                raise
            port = sock.getsockname()[1]
            before = self.udp
            # the new protocol is self.udp from its connection_made on: a
            # datagram may come, and be answered, while TCP binds
            udp_transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=sock)
        if tcp:
            try:
                server = await loop.create_server(lambda: _TcpConnection(self), host, port, reuse_address=True)
            except OSError:
                if udp_transport is not None:
                    udp_transport.close()
                    self.udp = before
                raise
            self.tcp_servers.append(server)

    async def close(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        for server in self.tcp_servers:
            server.close()
        for conn in list(self.connections.values()):
            conn.transport.abort()
        if self.udp and self.udp.transport:
            self.udp.transport.close()

    # ---- receiving ---------------------------------------------------
    def _received(self, data: bytes, source: Addr, transport: str, *, datagram: bool,
                  framed: bool = False) -> None:
        """`framed`: a whole message as its transport delimited it (a
        WebSocket frame): read as a datagram is, but not by the UDP fast path."""
        stale = False
        if datagram and data[:1] < b"\x40" and stun.is_stun(data):
            self._stun(data, source)
            return
        if self.hep is not None and len(data) > 4:       # not a keep-alive
            self.hep.copy(data, source, self.local, transport)
        if datagram:
            if self.wait_wanted:
                self._measure()
            if self.backlog_before is not None:
                stale = self._from_backlog()
            if self.fast_datagram is not None and self.fast_datagram(data, source, self):
                return
            if data.strip(b"\r\n") == b"":
                return  # UDP keep-alive (RFC 5626 §4.4.1 STUN-less CRLF)
        try:
            msg = parse_message(data, datagram=datagram or framed, limits=self.limits)
        except SipParseError as exc:
            self._bad_input(exc, data, source, transport)
            return
        msg.source = source
        msg.stale = stale
        self.on_message(msg, source, transport)

    def _stun(self, data: bytes, source: Addr) -> None:
        """A STUN message on the SIP port: a Binding request is answered
        (RFC 5626 §8); anything else STUN-shaped is dropped unanswered."""
        reply = stun.answer(data, source)
        if reply is None or self.udp is None or self.udp.transport is None:
            return
        try:
            self.udp.transport.sendto(reply, source)
        except (OSError, ValueError):
            return
        if self.on_keepalive is not None:
            self.on_keepalive("stun")

    def measure_wait(self) -> bool:
        """Have the kernel timestamp datagrams on arrival (their queue wait
        can be read then); False where it cannot (not Linux, no UDP)."""
        if self.udp is None or self.udp.transport is None:
            return False
        fd = self.udp.transport.get_extra_info("socket").fileno()
        try:
            fcntl.ioctl(fd, SIOCGSTAMP, bytes(_TIMEVAL.size))   # the first call turns stamping on
        except OSError as exc:
            if exc.errno != errno.ENOENT:                        # ENOENT: nothing read yet
                return False
        self._stamp_fd = fd
        return True

    def mark_backlog(self) -> bool:
        """The datagrams waiting in the UDP socket now are read as stale
        (msg.stale): those that arrived while this process stood still.
        Needs measure_wait() on since before they came (their arrival
        time); False where there is none."""
        if self._stamp_fd < 0:
            return False
        self.backlog_before = time.time()
        return True

    def _arrival(self) -> float | None:
        """When the datagram just read arrived (wall clock), if known."""
        try:
            sec, usec = _TIMEVAL.unpack(fcntl.ioctl(self._stamp_fd, SIOCGSTAMP, bytes(_TIMEVAL.size)))
        except OSError:
            return None
        return sec + usec / 1e6

    def _from_backlog(self) -> bool:
        arrival = self._arrival()
        if arrival is not None and arrival < self.backlog_before:
            return True
        self.backlog_before = None          # through it: this one came after
        return False

    def _measure(self) -> None:
        self.wait_wanted = False
        arrival = self._arrival()
        if arrival is not None:
            self.last_wait = max(0.0, time.time() - arrival)

    def _bad_input(self, exc: SipParseError, data: bytes, source: Addr, transport: str) -> None:
        if self.on_bad_input is not None:
            self.on_bad_input(exc, data, source, transport)

    def _register(self, conn: _TcpConnection) -> bool:
        ip = conn.peer[0]
        if len(self.connections) >= self.max_connections or self.per_source.get(ip, 0) >= self.max_per_source:
            self.refused_connections += 1
            ok, suppressed = self.refused_log.allow()
            if ok:
                event(log, "tcp_refused", logging.WARNING, src=ip, suppressed=suppressed or None,
                      reason="too many connections" if len(self.connections) >= self.max_connections
                      else "too many connections from this address")
            return False
        self.per_source[ip] = self.per_source.get(ip, 0) + 1
        self.connections[conn.peer] = conn
        self.gone_flows.pop(conn.peer, None)
        return True

    def _unregister(self, conn: _TcpConnection) -> None:
        ip = conn.peer[0]
        left = self.per_source.get(ip, 1) - 1
        if left > 0:
            self.per_source[ip] = left
        else:
            self.per_source.pop(ip, None)
        if self.connections.get(conn.peer) is conn:
            del self.connections[conn.peer]
        if not conn.dialled:
            self.gone_flows[conn.peer] = None
            if len(self.gone_flows) > GONE_FLOWS_KEPT:
                del self.gone_flows[next(iter(self.gone_flows))]

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.header_timeout / 2, self.idle_timeout / 4))
            now = time.monotonic()
            for conn in list(self.connections.values()):
                if conn.last_active < now - self.idle_timeout:
                    conn.transport.close()
                elif conn.partial_since is not None and conn.partial_since < now - self.header_timeout:
                    event(log, "tcp_closed", peer=hostport(conn.peer),
                          reason=f"{conn.awaited()} not complete "
                                 f"within {self.header_timeout:g}s")
                    conn.transport.abort()

    # ---- sending -----------------------------------------------------
    def send(self, data: bytes, dest: Addr, transport: str = "udp") -> None:
        if self.hep is not None and len(data) > 4:
            self.hep.copy(data, self.local, dest, transport)
        if transport == "udp":
            if self.udp is None or self.udp.transport is None:
                raise OSError("no UDP socket")
            try:
                self.udp.transport.sendto(data, dest)
            except ValueError as exc:
                # an address of the other family (an IPv6 Contact or
                # upstream from an IPv4 socket): cannot be sent, as OSError
                raise OSError(str(exc)) from None
            return
        conn = self.connections.get(dest)
        if conn is not None and conn.kind == transport:
            conn.write(data)
            return
        if dest in self.gone_flows or transport in ("ws", "wss"):
            # Not dialled back: the port was the peer's for the connection
            # it closed (a phone quit, lost its network); a connect would
            # be refused, or hang behind its NAT (RFC 5626 §5.3: the flow
            # failed, and is said so at once). WebSocket peers are never
            # dialled: a browser is reached over its own connection only.
            self._failed(data, dest, True)
            return
        task = self._connecting.get(dest)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(dest, transport))
            self._connecting[dest] = task
        task.add_done_callback(lambda t: self._after_connect(t, data, dest))

    def _after_connect(self, task: asyncio.Task, data: bytes, dest: Addr) -> None:
        if task.cancelled() or task.exception() is not None:
            event(log, "tcp_connect_failed", logging.WARNING, dest=hostport(dest),
                  error="cancelled" if task.cancelled() else str(task.exception()))
            self._failed(data, dest, False)
            return
        conn = task.result()
        conn.write(data)

    def _failed(self, data: bytes, dest: Addr, flow_gone: bool) -> None:
        if self.on_send_failed is not None:
            self.on_send_failed(data, dest, flow_gone)

    async def _connect(self, dest: Addr, kind: str) -> _TcpConnection:
        try:
            loop = asyncio.get_running_loop()
            tls = None
            if kind == "tls":
                if self.tls_client is None:
                    raise OSError("no TLS set up here")
                tls = self.tls_client
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _TcpConnection(self, kind), dest[0], dest[1], ssl=tls,
                                       server_hostname=dest[0] if tls else None), 5.0)
            # the connection is known by the address we dialled, so replies
            # and later requests to the same destination reuse it
            conn.dialled = True
            self.connections[dest] = conn
            return conn
        finally:
            self._connecting.pop(dest, None)
