"""Flood and overload protection for the proxy.

SourceLimiter, per-source flood protection (in the manner of Kamailio's
pike): a token bucket per source IP address refilled at `rate` requests/s
up to `burst`; a source that empties its bucket is banned for `ban`
seconds, during which its requests are dropped without an answer (an
answer is what a flood wants). Legitimate sources keep their own buckets,
so they go on being served while one source floods. Memory is bounded: at
most `max_sources` buckets; when full, buckets idle for longer than a
refill are forgotten first (a full one is equivalent).

OverloadGuard: new calls refused while the proxy as a whole falls behind.
RecentCalls: the calls it let through lately, which it must never refuse.
"""
from __future__ import annotations

import collections
import time


class SourceLimiter:
    def __init__(self, rate: float, burst: int = 0, ban: float = 30.0, max_sources: int = 65536):
        self.rate = rate
        self.burst = float(burst or max(1, int(rate * 2)))
        self.ban = ban
        self.max_sources = max_sources
        self.buckets: dict[str, list[float]] = {}   # ip -> [tokens, last refill]
        self.banned: dict[str, float] = {}           # ip -> banned until

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def is_banned(self, ip: str) -> bool:
        until = self.banned.get(ip)
        return until is not None and time.monotonic() < until

    def allow(self, ip: str, now: float | None = None) -> tuple[bool, bool]:
        """-> (allowed, newly_banned)."""
        now = time.monotonic() if now is None else now
        until = self.banned.get(ip)
        if until is not None:
            if now < until:
                return False, False
            del self.banned[ip]
        b = self.buckets.get(ip)
        if b is None:
            if len(self.buckets) >= self.max_sources:
                self._forget(now)
            b = self.buckets[ip] = [self.burst, now]
        b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
        b[1] = now
        if b[0] >= 1.0:
            b[0] -= 1.0
            return True, False
        self.banned[ip] = now + self.ban
        del self.buckets[ip]
        return False, True

    def _forget(self, now: float) -> None:
        horizon = self.burst / self.rate
        for ip in [ip for ip, b in self.buckets.items() if now - b[1] > horizon]:
            del self.buckets[ip]
        if len(self.buckets) >= self.max_sources:   # all active: drop the oldest half
            for ip in sorted(self.buckets, key=lambda k: self.buckets[k][1])[: self.max_sources // 2]:
                del self.buckets[ip]
        for ip in [ip for ip, until in self.banned.items() if until <= now]:
            del self.banned[ip]


class OverloadGuard:
    """Watches how long datagrams wait in the proxy's UDP receive queue
    (SipTransport.measure_wait: the kernel's arrival stamp of a datagram
    against the time it is read, one every 10 ms). A proxy that cannot keep
    up lets the queue grow until every message waits longer than SIP's
    retransmission timer (T1, 500 ms); then every sender retransmits, the
    load doubles and nearly nothing completes (congestion collapse). So
    once messages wait longer than `delay` seconds, the proxy refuses a
    share of new calls with 503 (RFC 3261 §21.5.4; the local overload
    control of RFC 6357), a share that grows with the wait to all of them
    at twice `delay`, and keeps relaying everything of the calls it
    already has. Refusing early and in proportion (random early drop)
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


class RecentCalls:
    """Call-IDs of the new INVITEs the proxy forwarded in the last `ttl`
    seconds (64*T1, Timer B: as long as a caller may retransmit one). A
    stateless proxy cannot tell a retransmitted INVITE from a new one by
    its looks, and an overloaded one is slowest to answer, so that is when
    callers retransmit; refusing a retransmission with 503 would end a call
    its node already has (caller told no, callee ringing). Memory is
    bounded: at most `limit` entries, the oldest dropped first."""

    def __init__(self, ttl: float = 32.0, limit: int = 65536):
        self.ttl = ttl
        self.limit = limit
        self.until: collections.OrderedDict[str, float] = collections.OrderedDict()

    def add(self, call_id: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        until = self.until
        until[call_id] = now + self.ttl
        until.move_to_end(call_id)
        # forget the expired ones at the front, a few per call
        for _ in range(2):
            first = next(iter(until))
            if until[first] > now and len(until) <= self.limit:
                break
            del until[first]

    def __contains__(self, call_id: str) -> bool:
        until = self.until.get(call_id)
        return until is not None and until > time.monotonic()

    def __len__(self) -> int:
        return len(self.until)
