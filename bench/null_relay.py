"""The floor under the proxy path: a relay that does no SIP at all.

    python bench/null_relay.py LISTEN_PORT UAS_PORT

What arrives on LISTEN_PORT (from one SIPp UAC) leaves unchanged for the
SIPp UAS on UAS_PORT from a second socket, and what comes back on that
socket goes to the last UAC address seen. Same interpreter, event loop
(uvloop where installed) and socket buffers as the proxy, so bench.py's
"floor" path measures what Python's datagram I/O costs on this box, and
the proxy path's CPU per call above it is what its SIP work costs
(parsing, routing, editing the messages). Loopback only.
"""
from __future__ import annotations

import asyncio
import socket
import sys

BUFFER = 4 * 1024 * 1024


def _socket(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
    s.bind(("127.0.0.1", port))
    return s


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on_datagram):
        self.on_datagram = on_datagram
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.on_datagram(data, addr)


async def relay(listen_port: int, uas_port: int) -> None:
    loop = asyncio.get_running_loop()
    uac: list = [None]
    uas = ("127.0.0.1", uas_port)

    def from_uac(data: bytes, addr) -> None:
        uac[0] = addr
        back.transport.sendto(data, uas)

    def from_uas(data: bytes, addr) -> None:
        if uac[0] is not None:
            front.transport.sendto(data, uac[0])

    front, back = _Side(from_uac), _Side(from_uas)
    await loop.create_datagram_endpoint(lambda: front, sock=_socket(listen_port))
    await loop.create_datagram_endpoint(lambda: back, sock=_socket(0))
    await asyncio.Event().wait()


def main() -> None:
    if len(sys.argv) != 3 or not all(a.isdigit() for a in sys.argv[1:]):
        sys.exit("usage: null_relay.py LISTEN_PORT UAS_PORT")
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    try:
        asyncio.run(relay(int(sys.argv[1]), int(sys.argv[2])))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
