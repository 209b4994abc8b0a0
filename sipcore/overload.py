"""Local overload control for a SIP server reading UDP (RFC 6357): refuse a
share of new work (NEW_WORK: calls, registrations, subscriptions, pager
messages) while messages wait too long in the receive queue.
The proxy and the nodes use it alike; SipTransport.measure_wait gives the
waits."""
from __future__ import annotations

import logging
import time

from .expiring import Expiring
from .logfmt import event

# out-of-dialog requests that start new work: what an overloaded proxy or
# node refuses (every phone registering at once after an outage, RFC
# 5390's "avalanche restart", overloads as surely as a call flood), while
# everything inside a dialog goes on
NEW_WORK = frozenset(("INVITE", "REGISTER", "SUBSCRIBE", "MESSAGE"))


class OverloadGuard:
    """Watches how long datagrams wait in a UDP receive queue
    (SipTransport.measure_wait: the kernel's arrival stamp of a datagram
    against the time it is read, one every 10 ms). A proxy that cannot keep
    up lets the queue grow until every message waits longer than SIP's
    retransmission timer (T1, 500 ms); then every sender retransmits, the
    load doubles and nearly nothing completes (congestion collapse). So
    once messages wait longer than `delay` seconds, the proxy (or a node)
    refuses a share of new calls with 503 (RFC 3261 §21.5.4; the local
    overload control of RFC 6357), a share that grows with the wait to all
    of them at twice `delay`, and keeps relaying everything of the calls
    it already has. Refusing early and in proportion (random early drop)
    keeps the queue short without swinging between all and nothing.

    The wait is what matters, not the bytes queued: a message of a call
    crosses the proxy several times before its answer is back (a BYE four
    times on its way through a node and back), and T1 is for all of them.
    It is also what the queue's size cannot tell: the kernel gives back
    the memory of datagrams read in chunks of a quarter of the buffer, so
    the bytes it reports may be mostly messages already handled.

    A wait that is gone within `hold` seconds (T1 by default) refuses
    nothing: queues are there to absorb bursts, and one that clears within
    T1 has cost no retransmission (it is a standing queue, in CoDel's
    words, that needs an answer)."""

    def __init__(self, delay: float, hold: float = 0.5):
        self.active = False          # between overload_start and overload_end
        self.share = 0.0             # of new calls to refuse now
        self.since = 0.0
        self.refused = 0
        self.hold = hold
        self.low = delay             # seconds of wait that start the refusals
        self.wait = 0.0              # the last one measured
        self.above_since: float | None = None   # the wait over the threshold since
        self.below_since: float | None = None   # ... under half of it since (while active)
        self.calm = 1.0                          # seconds under half of it that end the state

    def sample(self, wait: float | None, now: float | None = None) -> str | None:
        """Take the wait of a datagram read since the last sample (None:
        none was read, so none was waiting); -> "start" | "end" when the
        state changes. The state ends once the wait has stayed below half
        the threshold for `calm` seconds; until then the share follows the
        wait (none while it is under the threshold), so a proxy still at
        its limit is not let off the leash only to fill up again."""
        now = time.monotonic() if now is None else now
        self.wait = wait = wait or 0.0
        if wait <= self.low:
            self.above_since = None
        elif self.above_since is None:
            self.above_since = now
        sustained = self.above_since is not None and now - self.above_since >= self.hold
        if sustained or self.active:
            # refuse in proportion to the excess, all at twice the threshold
            self.share = max(0.0, min(1.0, (wait - self.low) / self.low))
        else:
            self.share = 0.0
        if not self.active and sustained:
            self.active, self.since, self.refused, self.below_since = True, now, 0, None
            return "start"
        if self.active:
            if wait > self.low / 2:
                self.below_since = None
            elif self.below_since is None:
                self.below_since = now
            elif now - self.below_since >= self.calm:
                self.active = False
                self.share = 0.0
                return "end"
        return None

    def poll(self, transport, log: logging.Logger, who: str, **fields) -> float | None:
        """Every 10 ms: sample the wait `transport` measured since the last
        poll, ask it to measure the next datagram, and log overload_start /
        overload_end (`who` falls behind; `fields` first on the line).
        -> the wait sampled (None: nothing was read)."""
        wait = transport.last_wait
        change = self.sample(wait)
        transport.last_wait, transport.wait_wanted = None, True
        if change == "start":
            event(log, "overload_start", logging.WARNING, **fields, wait_ms=round(self.wait * 1000),
                  limit_ms=round(self.low * 1000),
                  msg=f"the {who} is falling behind: a share of new INVITEs, REGISTERs, SUBSCRIBEs and "
                      "MESSAGEs gets 503 until its queue drains")
        elif change == "end":
            event(log, "overload_end", **fields, refused=self.refused,
                  duration_s=round(time.monotonic() - self.since, 3))
        return wait

    def count_refusal(self) -> None:
        """A new call was refused (counted for overload_end while active)."""
        self.refused += self.active


class RecentCalls:
    """Call-IDs of the new requests (NEW_WORK) let through in the last
    `ttl` seconds (64*T1, Timer B: as long as a sender may retransmit one),
    which the overload guard must not refuse again. A stateless proxy
    cannot tell a retransmission from a new request by its looks, and an
    overloaded one is slowest to answer, so that is when phones retransmit;
    a 503 to a retransmission would end a call its node already has
    (caller told no, callee ringing). The Call-ID rather than the request:
    what follows a request let through in the same Call-ID finishes what
    was started and must not be wasted either (the INVITE or REGISTER
    again with credentials after a 401/407, a phone's un-REGISTER); a
    phone's next refresh, minutes later, is new work again. Memory is
    bounded: at most `limit` entries, the oldest dropped first."""

    def __init__(self, ttl: float = 32.0, limit: int = 65536):
        self.seen = Expiring(ttl, limit)

    def add(self, call_id: str, now: float | None = None) -> None:
        self.seen.put(call_id, True, time.monotonic() if now is None else now)

    def __contains__(self, call_id: str) -> bool:
        return self.seen.get(call_id, time.monotonic(), False)

    def __len__(self) -> int:
        return len(self.seen)
