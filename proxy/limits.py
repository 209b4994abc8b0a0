"""Flood protection for the proxy.

SourceLimiter, per-source flood protection (in the manner of Kamailio's
pike): a token bucket per source IP address refilled at `rate` requests/s
up to `burst`; a source that empties its bucket is banned for `ban`
seconds, during which its requests are dropped without an answer (an
answer is what a flood wants). Legitimate sources keep their own buckets,
so they go on being served while one source floods. Memory is bounded: at
most `max_sources` buckets; when full, buckets idle for longer than a
refill are forgotten first (a full one is equivalent).
"""
from __future__ import annotations

import time


class SourceLimiter:
    def __init__(self, rate: float, burst: int = 0, ban: float = 30.0, max_sources: int = 65536):
        self.max_sources = max_sources
        self.buckets: dict[str, list[float]] = {}   # ip -> [tokens, last refill]
        self.banned: dict[str, float] = {}           # ip -> banned until
        self.configure(rate, burst, ban)

    def configure(self, rate: float, burst: int = 0, ban: float = 30.0) -> None:
        """New limits (a reload): the buckets go on, each capped at the new
        burst; a source banned now stays banned until its ban ends."""
        self.rate = rate
        self.burst = float(burst or max(1, int(rate * 2)))
        self.ban = ban
        for b in self.buckets.values():
            b[0] = min(b[0], self.burst)

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
