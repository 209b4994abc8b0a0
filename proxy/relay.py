"""Retransmission towards the nodes for requests that arrived over TCP.

A UDP client retransmits by itself, and each retransmission is routed anew
(so it reaches the partner once a node is out). A TCP client never
retransmits (RFC 3261 §17.1.1.2), but the proxy forwards to the nodes over
UDP: a request sent to a node that died the same instant would be lost and
the call would hang. For those requests the proxy keeps the forwarded
message until the node answers (any response for non-INVITE, a provisional
for INVITE) and retransmits it on the RFC timers (T1 doubling, T2 cap for
non-INVITE), each time to the key's current owner, for at most 64*T1.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

from sipcore.logfmt import event
from sipcore.message import SipRequest

log = logging.getLogger("proxy")

T1, T2 = 0.5, 4.0


@dataclass
class Pending:
    req: SipRequest
    bekey: str
    node: str
    started: float
    interval: float
    timer: asyncio.TimerHandle | None = None


class NodeRelay:
    def __init__(self, resend: Callable[[Pending], None]):
        self.resend = resend
        self.pending: dict[str, Pending] = {}

    def track(self, branch: str, req: SipRequest, bekey: str, node: str) -> None:
        p = Pending(req, bekey, node, time.monotonic(), T1)
        old = self.pending.pop(branch, None)
        if old and old.timer:
            old.timer.cancel()
        self.pending[branch] = p
        p.timer = asyncio.get_running_loop().call_later(T1, self._fire, branch)

    def answered(self, branch: str, status: int, method: str) -> None:
        p = self.pending.get(branch)
        if p is None or p.req.method != method:
            return
        if status >= 200 or method == "INVITE":
            self.pending.pop(branch, None)
            if p.timer:
                p.timer.cancel()

    def _fire(self, branch: str) -> None:
        p = self.pending.get(branch)
        if p is None:
            return
        if time.monotonic() - p.started >= 64 * T1:
            del self.pending[branch]
            event(log, "relay_timeout", logging.WARNING, method=p.req.method, call_id=p.req.call_id,
                  bekey=p.bekey, node=p.node)
            return
        self.resend(p)
        p.interval = p.interval * 2 if p.req.method == "INVITE" else min(p.interval * 2, T2)
        p.timer = asyncio.get_running_loop().call_later(p.interval, self._fire, branch)

    def close(self) -> None:
        for p in self.pending.values():
            if p.timer:
                p.timer.cancel()
        self.pending.clear()
