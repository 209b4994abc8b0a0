"""What a SIP element recalls for as long as a transaction may still send
(64*T1), in memory it can count on under a flood."""
from __future__ import annotations

import collections
from typing import Any, Hashable


class Expiring:
    """Keys remembered for `ttl` seconds from when each was last put, with
    a value each; at most `limit` of them. No sweeper: every put forgets
    up to two entries at the front (the oldest), when they are expired or
    over the limit, so the map follows the rate of puts."""

    __slots__ = ("ttl", "limit", "entries")

    def __init__(self, ttl: float, limit: int):
        self.ttl, self.limit = ttl, limit
        self.entries: collections.OrderedDict[Hashable, list] = collections.OrderedDict()   # key -> [until, value]

    def get(self, key: Hashable, now: float, default: Any = None) -> Any:
        entry = self.entries.get(key)
        return default if entry is None or entry[0] <= now else entry[1]

    def put(self, key: Hashable, value: Any, now: float) -> None:
        entries = self.entries
        entries[key] = [now + self.ttl, value]
        entries.move_to_end(key)
        for _ in range(2):
            first = next(iter(entries), None)
            if first is None or (entries[first][0] > now and len(entries) <= self.limit):
                break
            del entries[first]

    def __len__(self) -> int:
        return len(self.entries)


def remember(memo: dict, key, value, size: int = 4096, longest: int = 256) -> None:
    """Keep `value` for `key` in a memo of what is parsed or hashed again
    and again (the messages of a call, the calls of a phone): keys of
    `longest` at most (long ones are rare and would fill memory), `size`
    entries at most, forgotten all at once when full."""
    if len(key) <= longest:
        if len(memo) >= size:
            memo.clear()
        memo[key] = value
