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

The flows live in this process only; the registrations live on. So when a
node first answers the proxy's probes (the proxy started, or restarted
for an upgrade), the proxy asks that node's admin endpoint for the flows
of the bindings registered from behind NAT in its Redis (`/nat_flows`,
node/registrar.py) and pings them too; a proxy that does not probe
(`--no-probe`) asks every node when it starts. Without that, a restart would leave
each phone unreachable from the moment its router forgets the binding
until its next REGISTER. A node's admin endpoint is its `[[nodes]]`
admin, else its SIP host at its SIP port + 1000 (what `node.admin =
auto` binds on a single host: across hosts, give each node's admin).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from sipcore.admin import AdminFetchError, fetch_json
from sipcore.headers import hostport
from sipcore.logfmt import event

log = logging.getLogger("proxy")


KEEPALIVE = b"\r\n\r\n"
GRACE = 30.0            # seconds a flow is pinged past its registration's end (a late refresh)
ASK_TRIES = (1.0, 3.0, 10.0)    # seconds between asks of a node that did not answer /nat_flows

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
        self._asking: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return sum(len(s) for s in self.slots)

    def note(self, flow: Addr, seconds: int) -> None:
        slot = self.slots[hash(flow) % len(self.slots)]
        if seconds <= 0:
            slot.pop(flow, None)
        else:
            slot[flow] = time.monotonic() + seconds + GRACE

    def ask(self, node: str, admin: tuple[str, int], flow_of: Callable[[str], Addr | None]) -> None:
        """Learn the flows node `node` holds from its admin endpoint, in
        the background; `flow_of(path)`: the address a Path entry of ours
        names for UDP, or None."""
        task = asyncio.get_running_loop().create_task(self._ask(node, admin, flow_of))
        self._asking.add(task)
        task.add_done_callback(self._asking.discard)

    async def _ask(self, node: str, admin: tuple[str, int], flow_of) -> None:
        for pause in (*ASK_TRIES, None):
            try:
                answer = await fetch_json(*admin, "/nat_flows")
                flows = answer.get("flows") if isinstance(answer, dict) else None
                if not isinstance(flows, dict):
                    raise AdminFetchError(f"http://{hostport(admin)}/nat_flows: no flows in the answer")
                break
            except AdminFetchError as exc:
                if pause is None:
                    event(log, "nat_flows_unknown", logging.WARNING, node=node, error=str(exc),
                          msg="phones behind NAT registered there are pinged again at their next REGISTER")
                    return
                await asyncio.sleep(pause)
        learned = 0
        for path, seconds in flows.items():
            flow = flow_of(path) if isinstance(path, str) else None
            if flow is None or not isinstance(seconds, int):
                continue
            slot = self.slots[hash(flow) % len(self.slots)]
            if flow not in slot:            # what a REGISTER told us since is fresher
                self.note(flow, seconds)
                learned += 1
        event(log, "nat_flows_learned", node=node, flows=learned, pinged=len(self))

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
        for task in self._asking:
            task.cancel()
