"""sipcore.transport over real loopback sockets: what becomes of a TCP
send that cannot go out."""
from __future__ import annotations

import asyncio
import socket

from sipha.sipp import free_port
from sipcore.transport import SipTransport


def failures_of(scenario) -> list:
    failed = []

    async def go():
        t = SipTransport(lambda *a: None, on_send_failed=lambda data, dest, gone: failed.append((data, dest, gone)))
        await t.listen("127.0.0.1", 0)
        try:
            await scenario(t)
            for _ in range(50):
                if failed:
                    break
                await asyncio.sleep(0.02)
        finally:
            await t.close()
    asyncio.run(go())
    return failed


def test_a_peer_whose_own_connection_closed_is_not_dialled_back():
    """Its port was its own for that connection (a phone's flow): a
    request for it fails at once, said to be for a flow gone."""
    async def scenario(t):
        phone = socket.create_connection(t.local)
        peer = phone.getsockname()
        await asyncio.sleep(0.05)
        assert peer in t.connections
        phone.close()
        await asyncio.sleep(0.05)
        t.send(b"INVITE ...", peer, "tcp")
        assert not t._connecting                   # no connect was tried
        scenario.peer = peer

    assert failures_of(scenario) == [(b"INVITE ...", scenario.peer, True)]


def test_a_connection_that_cannot_be_opened_is_said_so():
    dest = ("127.0.0.1", free_port())              # nobody listens there

    async def scenario(t):
        t.send(b"OPTIONS ...", dest, "tcp")

    assert failures_of(scenario) == [(b"OPTIONS ...", dest, False)]
