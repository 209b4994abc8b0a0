"""Keep open the NAT bindings of the phones registered over UDP.

A phone behind NAT registers from a public address and port its router
opened for it; the router closes that binding after 30 s to a few minutes
of silence, long before the phone registers again (often an hour), and
from then on the calls for it reach nobody. Kamailio's and OpenSIPS's
nathelper ping such contacts (`natping_interval`); so does the proxy:
every `proxy.nat_ping` seconds it sends a CRLF keep-alive (RFC 5626
§4.4.1; a SIP stack ignores it) from its SIP port to each such flow.

A flow is added when a 2xx to its REGISTER passes the proxy on its way
back to the phone, if the phone is behind NAT: the proxy stamped
`received` on its Via (the sent-by host is not where it came from) or an
`rport` that is not its sent-by port. It lives as long as the longest
binding the registrar holds over that flow, which the registrar tells the
proxy in the response (`flow_expires` in the internal header, removed
before the phone sees it): 0 when the phone removed its last one. The flows are spread over the interval, so the
pings go out a slice a second rather than all at once.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable


KEEPALIVE = b"\r\n\r\n"
GRACE = 30.0            # seconds a flow is pinged past its registration's end (a late refresh)

Addr = tuple[str, int]


class NatPinger:
    def __init__(self, interval: float, send: Callable[[bytes, Addr], None]):
        self.interval = interval
        self.send = send
        # flows by slot: slot k is pinged at ticks k, k + n, ...
        self.slots: list[dict[Addr, float]] = [{} for _ in range(max(1, round(interval)))]
        self.tick = 0
        self.pings = 0
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return sum(len(s) for s in self.slots)

    def note(self, flow: Addr, seconds: int) -> None:
        slot = self.slots[hash(flow) % len(self.slots)]
        if seconds <= 0:
            slot.pop(flow, None)
        else:
            slot[flow] = time.monotonic() + seconds + GRACE

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.interval / len(self.slots), self._ping)

    def _ping(self) -> None:
        slot = self.slots[self.tick % len(self.slots)]
        self.tick += 1
        now = time.monotonic()
        for flow, until in list(slot.items()):
            if until < now:
                del slot[flow]
            else:
                self.send(KEEPALIVE, flow)
                self.pings += 1
        self.start()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
