"""asyncio SIP transports: one UDP endpoint and one TCP server per listen
address, plus outgoing TCP connections, all independent of routing.

Every message received, from either transport, reaches one callback:
`on_message(msg, source, transport)` with source = (host, port) and
transport = "udp" | "tcp". Input that does not parse reaches
`on_bad_input(error, data, source, transport)`, which may answer 400 with
`send()`; on TCP the connection is closed after framing is lost.

Sending: `send(data, (host, port), transport)`. TCP reuses the connection to
that remote address in either direction (a phone that registered over TCP
is reached over its own connection, RFC 3261 §18.2.2 / RFC 5626), opens one
if there is none, and closes connections idle for `idle_timeout`. Write
buffers are bounded: a peer that does not read is disconnected.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Callable

from .errors import SipParseError
from .framing import PING, PONG, FramingError, StreamFramer
from .message import DEFAULT_LIMITS, Limits, SipMessage, parse_message

log = logging.getLogger("sipcore.transport")

Addr = tuple[str, int]
SOCKET_BUFFER = 4 * 1024 * 1024


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

    def datagram_received(self, data, addr):
        self.owner._received(data, (addr[0], addr[1]), "udp", datagram=True)

    def error_received(self, exc):
        # ICMP errors on an unconnected socket; routing learns of dead peers
        # through its own health probes.
        log.debug("udp error: %s", exc)


class _TcpConnection(asyncio.Protocol):
    def __init__(self, owner: "SipTransport"):
        self.owner = owner
        self.framer = StreamFramer(owner.limits)
        self.transport: asyncio.Transport | None = None
        self.peer: Addr | None = None
        self.last_active = time.monotonic()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1])
        self.owner._register(self)

    def data_received(self, data):
        self.last_active = time.monotonic()
        try:
            events = self.framer.feed(data)
        except FramingError as exc:
            self.owner._bad_input(exc, data, self.peer, "tcp")
            self.transport.close()
            return
        for ev in events:
            if ev is PING:
                self.transport.write(PONG)
            else:
                self.owner._received(ev, self.peer, "tcp", datagram=False)

    def connection_lost(self, exc):
        self.owner._unregister(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def write(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self.transport.get_write_buffer_size() > self.owner.max_write_buffer:
            log.warning("tcp peer %s:%s does not read; closing", *self.peer)
            self.transport.abort()
            return
        self.transport.write(data)


class SipTransport:
    def __init__(self, on_message: Callable[[SipMessage, Addr, str], None],
                 on_bad_input: Callable[[SipParseError, bytes, Addr, str], None] | None = None,
                 *, limits: Limits = DEFAULT_LIMITS, idle_timeout: float = 300.0,
                 max_write_buffer: int = 1024 * 1024):
        self.on_message = on_message
        self.on_bad_input = on_bad_input
        self.limits = limits
        self.idle_timeout = idle_timeout
        self.max_write_buffer = max_write_buffer
        self.udp: _UdpProtocol | None = None
        self.tcp_servers: list[asyncio.base_events.Server] = []
        self.connections: dict[Addr, _TcpConnection] = {}
        self._connecting: dict[Addr, asyncio.Task] = {}
        self._reaper: asyncio.Task | None = None
        self.local: Addr | None = None

    # ---- lifecycle ---------------------------------------------------
    async def listen(self, host: str, port: int, *, udp: bool = True, tcp: bool = True) -> Addr:
        """Listen on host:port (port 0 picks a free one, shared by UDP and TCP)."""
        loop = asyncio.get_running_loop()
        if udp:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
            _enlarge_buffers(sock)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            _, proto = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=sock)
            self.udp = proto
        if tcp:
            server = await loop.create_server(lambda: _TcpConnection(self), host, port,
                                              reuse_address=True)
            port = server.sockets[0].getsockname()[1]
            self.tcp_servers.append(server)
        self.local = (host, port)
        if self._reaper is None:
            self._reaper = loop.create_task(self._reap_idle())
        return self.local

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
    def _received(self, data: bytes, source: Addr, transport: str, *, datagram: bool) -> None:
        if datagram and data.strip(b"\r\n") == b"":
            return  # UDP keep-alive (RFC 5626 §4.4.1 STUN-less CRLF)
        try:
            msg = parse_message(data, datagram=datagram, limits=self.limits)
        except SipParseError as exc:
            self._bad_input(exc, data, source, transport)
            return
        msg.source = source
        self.on_message(msg, source, transport)

    def _bad_input(self, exc: SipParseError, data: bytes, source: Addr, transport: str) -> None:
        if self.on_bad_input is not None:
            self.on_bad_input(exc, data, source, transport)

    def _register(self, conn: _TcpConnection) -> None:
        self.connections[conn.peer] = conn

    def _unregister(self, conn: _TcpConnection) -> None:
        if self.connections.get(conn.peer) is conn:
            del self.connections[conn.peer]

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, max(self.idle_timeout / 4, 0.5)))
            cutoff = time.monotonic() - self.idle_timeout
            for conn in list(self.connections.values()):
                if conn.last_active < cutoff:
                    conn.transport.close()

    # ---- sending -----------------------------------------------------
    def send(self, data: bytes, dest: Addr, transport: str = "udp") -> None:
        if transport == "udp":
            if self.udp is None or self.udp.transport is None:
                raise OSError("no UDP socket")
            self.udp.transport.sendto(data, dest)
            return
        conn = self.connections.get(dest)
        if conn is not None:
            conn.write(data)
            return
        task = self._connecting.get(dest)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(dest))
            self._connecting[dest] = task
        task.add_done_callback(lambda t: self._after_connect(t, data, dest))

    def _after_connect(self, task: asyncio.Task, data: bytes, dest: Addr) -> None:
        if task.cancelled() or task.exception() is not None:
            log.info("tcp connect to %s:%s failed: %s", dest[0], dest[1],
                     "cancelled" if task.cancelled() else task.exception())
            return
        conn = task.result()
        conn.write(data)

    async def _connect(self, dest: Addr) -> _TcpConnection:
        try:
            loop = asyncio.get_running_loop()
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _TcpConnection(self), dest[0], dest[1]), 5.0)
            # the connection is known by the address we dialled, so replies
            # and later requests to the same destination reuse it
            self.connections[dest] = conn
            return conn
        finally:
            self._connecting.pop(dest, None)
