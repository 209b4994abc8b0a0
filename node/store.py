"""The dialog store: one Redis per node, active and replica keyspaces.

    <prefix>:active:<bekey>    records this node owns (dialogs, registrations)
    <prefix>:replica:<bekey>   copies of records its partners own

A record is a small JSON object with a version (`v`), timestamps and the
partner it was last mirrored to (`p`). Every key has a TTL that each save
refreshes, so an abandoned record disappears by itself.

- save: own active key and the partner's replica key, written concurrently,
  one round trip each; if the partner changed, the old partner's replica
  is deleted. A failed mirror write is logged and counted; the call goes on.
- load, in order:
  1. own active keyspace;
  2. own replica keyspace -> promotion: RENAME replica -> active inside the
     node's own Redis (atomic; no other node is asked);
  3. the other nodes' Redis, in rank order, active keyspace first, then
     replica -> migration: GETDEL there (atomic, so two nodes can never both
     take it), then stored as own active.
  The caller mirrors a promoted or migrated record to its partner.
- Expiry: a call's record outlives its `node.dialog_ttl` by `grace`
  seconds in Redis, so the node can end the call when no request has
  refreshed it for dialog_ttl (Node.expire_idle): it finds those by
  their TTL (idle) and takes one only if unchanged since it read it
  (take_if_unchanged), so a call saved meanwhile goes on, and a record
  is taken once. Registrations and subscriptions carry their own `ttl`
  and simply expire.
- Redis is spoken to through node.resp (one pipelined connection per
  server). Redis unreachable (own): StoreUnavailable, which the node turns into a
  500 with a reason; other nodes' Redis being down is only logged.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

try:
    import orjson
except ImportError:
    orjson = None

from node.resp import Redis, RedisError
from sipcore.config import ConfigError
from sipcore.logfmt import event
from sipcore.stats import Histogram

log = logging.getLogger("node.store")


PEER_BACKOFF = 2.0
# with no partner Redis reachable every save goes unmirrored: one warning
# line at first and then one every this many seconds, counting them (a
# line per save flooded the log with hundreds a second under load)
SKIPPED_EVERY = 10.0


class StoreUnavailable(Exception):
    pass


def _client(nid: str, url: str) -> Redis:
    # One pipelined connection per Redis (see node.resp): a burst of
    # requests costs no extra sockets on the Redis server; a command not
    # answered within 0.5 s fails, and so does everything queued behind it.
    try:
        return Redis(url, timeout=0.5, connect_timeout=0.5)
    except ValueError as exc:
        raise ConfigError(f"nodes: Redis URL of node {nid}: {exc}") from None


def encode(record: dict) -> bytes:
    """A record as stored: compact JSON, keys in the order written (the
    scans read `{"k":"call"` at the start of a call's)."""
    if orjson is not None:
        return orjson.dumps(record)
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()


# orjson writes and reads a call record 3-17 times faster than the
# standard library (about 45 us of a node's CPU a call on this box); the
# two write the same bytes for it, so nodes with and without it share
# one cluster
decode = orjson.loads if orjson is not None else json.loads


class DialogStore:
    def __init__(self, node_id: str, prefix: str, urls: dict[str, str], ttl: int):
        self.node_id = node_id
        self.prefix = prefix
        self.set_ttl(ttl)
        self.urls = urls
        self.clients = {nid: _client(nid, url) for nid, url in urls.items() if url}
        if node_id not in self.clients:
            raise ConfigError(f"nodes: node {node_id} has no Redis URL (ID=HOST:PORT,redis://HOST:PORT/DB)")
        self.own = self.clients[node_id]
        # a peer whose Redis just failed is skipped for a while, so a dead
        # host (connect timeouts, not refusals) does not slow every call
        self.peer_down_until: dict[str, float] = {}
        self.latency = Histogram("sipha_node_redis_seconds", "round trip of this node's own Redis operations",
                                 buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25))
        self.replication = "ok"   # what the last save could do, for /status
        self.skipped = 0          # unmirrored saves not in a mirror_skipped line yet
        self.skipped_all = 0      # unmirrored saves since the last mirrored one
        self.skipped_since = 0.0  # when the first of them was; 0: the saves are mirrored
        self.skipped_said = 0.0   # when the last mirror_skipped line went out
        self.stats = {"unmirrored_saves": 0, "mirror_failures": 0, "promotions": 0, "migrations": 0, "redis_errors": 0}

    def set_ttl(self, ttl: int) -> None:
        """node.dialog_ttl: for the records saved from now on."""
        self.ttl = ttl
        # seconds a call's record stays in Redis past its dialog_ttl: time
        # for the owner's expiry sweeps (every grace/3), then its partner's
        # (on the replica, from grace/2 on), to end the call. A sweep asks
        # every key's TTL: at 12 h, every 100 s (100,000 records: 1000
        # commands a second)
        self.grace = max(3, min(300, ttl // 10))

    async def set_urls(self, urls: dict[str, str]) -> None:
        """The other nodes' Redis servers of a new node list (a reload):
        clients for the new ones, those of nodes gone or moved closed.
        Ours stays as it is. A bad URL raises ConfigError, nothing changed."""
        made = {nid: _client(nid, url) for nid, url in urls.items()
                if url and nid != self.node_id and self.urls.get(nid) != url}
        for nid in [nid for nid in self.clients if nid != self.node_id
                    and (nid not in urls or nid in made or not urls[nid])]:
            await self.clients.pop(nid).aclose()
            self.peer_down_until.pop(nid, None)
        self.clients.update(made)
        self.urls = {**urls, self.node_id: self.urls[self.node_id]}

    def peer(self, nid: str | None) -> Redis | None:
        if not nid or nid == self.node_id:
            return None
        if self.peer_down_until.get(nid, 0) > time.monotonic():
            return None
        return self.clients.get(nid)

    def peer_failed(self, nid: str) -> None:
        self.peer_down_until[nid] = time.monotonic() + PEER_BACKOFF

    def key(self, space: str, bekey: str) -> str:
        return f"{self.prefix}:{space}:{bekey}"

    async def close(self) -> None:
        for c in self.clients.values():
            await c.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self.own.ping())
        except (RedisError, OSError):
            return False

    async def holds(self, bekey: str) -> bool:
        """Whether our active keyspace still has `bekey`: not once the call
        ended or another node took it over. True when Redis cannot say."""
        try:
            return bool(await self.own.exists(self.key("active", bekey)))
        except (RedisError, OSError):
            return True

    async def held(self, bekey: str) -> dict | str:
        """Our active copy of `bekey` as it is (no promotion, no move: an
        operator's action on what this node holds) -> the record, "" when
        there is none, or what Redis said when it failed."""
        try:
            raw = await self.own.get(self.key("active", bekey))
        except (RedisError, OSError) as exc:
            return f"Redis: {exc}"
        return decode(raw) if raw is not None else ""

    async def lost_at(self, nid: str, bekeys: list[str]) -> set[str]:
        """Which of `bekeys` have no active copy in node `nid`'s Redis any
        more: all of them when it does not answer (its host died), some or
        all when it came back empty."""
        client = self.clients.get(nid)
        lost: set[str] = set()
        for i in range(0, len(bekeys), 500):
            batch = bekeys[i:i + 500]
            try:
                if client is None:
                    raise OSError("no such node")
                values = await client.mget([self.key("active", b) for b in batch])
            except (RedisError, OSError):
                self.peer_failed(nid)
                return lost | set(bekeys[i:])
            lost.update(b for b, v in zip(batch, values) if v is None)
        return lost

    async def active(self, bekey: str) -> dict | None:
        """Our own active copy of a record, if there is one; nothing else is
        asked, nothing moved."""
        try:
            raw = await self.own.get(self.key("active", bekey))
        except (RedisError, OSError) as exc:
            self.stats["redis_errors"] += 1
            raise StoreUnavailable(str(exc)) from exc
        return None if raw is None else decode(raw)

    # ---- load ----------------------------------------------------------
    async def load(self, bekey: str, others: list[str]) -> tuple[dict | None, str]:
        """-> (record, how): how is active / promoted / migrated:<node> / missing."""
        active = self.key("active", bekey)
        try:
            t0 = time.perf_counter()
            raw = await self.own.get(active)
            self.latency.observe(time.perf_counter() - t0)
            if raw is not None:
                return decode(raw), "active"
            # promotion: atomic within our own Redis
            try:
                if await self.own.renamenx(self.key("replica", bekey), active):
                    raw = await self.own.get(active)
                    if raw is not None:
                        self.stats["promotions"] += 1
                        record = decode(raw)
                        await self.retire_old_owner(bekey, record.get("o"))
                        return record, "promoted"
                else:
                    # someone wrote active between our GET and RENAMENX
                    raw = await self.own.get(active)
                    if raw is not None:
                        return decode(raw), "active"
            except RedisError as exc:
                if "no such key" not in str(exc).lower():
                    raise
        except (RedisError, OSError) as exc:
            self.stats["redis_errors"] += 1
            event(log, "redis_error", logging.ERROR, op="load", bekey=bekey, error=str(exc))
            raise StoreUnavailable(str(exc)) from exc
        # migration from another node's Redis. Look before taking: one MGET
        # on each of them at once, where taking asks one key of one node
        # after another. Nothing anywhere is the common case (a phone's
        # first REGISTER, a request for a call long gone): one round trip.
        if not others or await self.peek(bekey, others) is None:
            return None, "missing"
        for space in ("active", "replica"):
            for nid in others:
                client = self.peer(nid)
                if client is None:
                    continue
                try:
                    raw = await client.getdel(self.key(space, bekey))
                except (RedisError, OSError):
                    self.peer_failed(nid)
                    continue  # that node (and its Redis) may be the one that died
                if raw is None:
                    continue
                record = decode(raw)
                try:
                    await self.own.set(active, raw, ex=self.expiry(record))
                except (RedisError, OSError) as exc:
                    # put it back where it was, so it is not lost
                    try:
                        await client.set(self.key(space, bekey), raw, ex=self.expiry(record))
                    except (RedisError, OSError):
                        pass
                    raise StoreUnavailable(str(exc)) from exc
                self.stats["migrations"] += 1
                return record, f"migrated:{nid}:{space}"
        return None, "missing"

    async def retire_old_owner(self, bekey: str, old_owner: str | None) -> None:
        """After a promotion: if the old owner's Redis is still there (its
        process crashed, its Redis did not), remove its active copy, so that
        when it comes back it cannot serve a stale version of the call."""
        client = self.peer(old_owner)
        if client is None:
            return
        try:
            await client.delete(self.key("active", bekey))
        except (RedisError, OSError):
            self.peer_failed(old_owner)

    async def peek(self, bekey: str, order: list[str]) -> dict | None:
        return (await self.peek_many([bekey], order))[0]

    async def peek_many(self, bekeys: list[str], order: list[str]) -> list[dict | None]:
        """Read (not take) records wherever they are: for each BEKey, its
        active copy in the first node of `order` that has one, else a
        replica. Used for registrar look-ups: one MGET of all the keys per
        node, all nodes at once (a miss, the common case for calls to a
        trunk, costs one round trip, not one per key and node)."""
        keys = [self.key(space, bekey) for bekey in bekeys for space in ("active", "replica")]
        asked = [(nid, self.own if nid == self.node_id else self.peer(nid)) for nid in order]
        asked = [(nid, c) for nid, c in asked if c is not None]
        results = await asyncio.gather(*(c.mget(keys) for _, c in asked), return_exceptions=True)
        for nid, r in zip([nid for nid, _ in asked], results):
            if isinstance(r, (RedisError, OSError)) and nid != self.node_id:
                self.peer_failed(nid)
            elif isinstance(r, BaseException) and not isinstance(r, (RedisError, OSError)):
                raise r
        replies = [r for r in results if not isinstance(r, BaseException)]
        found = []
        for i in range(len(bekeys)):
            raw = next((r[index] for index in (2 * i, 2 * i + 1) for r in replies if r[index] is not None), None)
            found.append(None if raw is None else decode(raw))
        return found

    # ---- save / delete -------------------------------------------------
    async def save(self, bekey: str, record: dict, partner: str | None,
                   fallbacks: list[str] = ()) -> None:
        """Write own active key and the partner's replica concurrently. When
        the partner's Redis is down (or fails now), the replica goes to the
        next node in `fallbacks` that answers, and the record says where."""
        old_partner = record.get("p")
        candidates = [n for n in dict.fromkeys([partner, *fallbacks]) if n and n != self.node_id]
        if partner and partner != self.node_id and self.peer(partner) is None:
            self.stats["mirror_failures"] += 1   # its Redis failed moments ago
        target = next((n for n in candidates if self.peer(n) is not None), None)
        record["v"] = record.get("v", 0) + 1
        record["ut"] = round(time.time(), 3)
        record["o"] = self.node_id
        ttl = self.expiry(record)
        own_key = self.key("active", bekey)
        while True:
            t0 = time.perf_counter()
            record["p"] = target
            data = encode(record)
            tasks = [self.own.set(own_key, data, ex=ttl)]
            if target is not None:
                tasks.append(self.peer(target).set(self.key("replica", bekey), data, ex=ttl))
            results = await asyncio.gather(*tasks, return_exceptions=True)
            self.latency.observe(time.perf_counter() - t0)
            if isinstance(results[0], BaseException):
                self.stats["redis_errors"] += 1
                event(log, "redis_error", logging.ERROR, op="save", bekey=bekey, error=str(results[0]))
                if record["v"] == 1 and target is not None and not isinstance(results[1], BaseException):
                    # a record that never was: its replica alone would pass
                    # at the partner (which gets the request handed over)
                    # for a call this node had set up
                    await self._forget_replica(target, bekey)
                raise StoreUnavailable(str(results[0]))
            if target is None or not isinstance(results[1], BaseException):
                break
            self.stats["mirror_failures"] += 1
            self.peer_failed(target)
            event(log, "mirror_failed", logging.WARNING, bekey=bekey, partner=target, error=str(results[1]))
            target = next((n for n in candidates if self.peer(n) is not None), None)
        self.replication = "ok" if target is not None else (
            "no partner reachable: dialogs are not mirrored" if candidates else "single node: nothing to mirror to")
        if target is None and candidates:
            self.stats["unmirrored_saves"] += 1
            self.unmirrored(bekey)
        elif self.skipped_since and target is not None:
            self.mirrored_again()
        if target is not None and target != partner:
            event(log, "mirrored", bekey=bekey, partner=target, previous=old_partner,
                  reason=f"partner {partner} unreachable" if partner else "no partner named")
        elif target is not None and old_partner and old_partner != target:
            event(log, "mirrored", bekey=bekey, partner=target, previous=old_partner)
        # the previous replica is stale now (it may be in our own replica
        # keyspace, when we took the record over from the node we mirrored)
        if old_partner and old_partner != target:
            await self._forget_replica(old_partner, bekey)

    def unmirrored(self, bekey: str) -> None:
        """A save that reached no partner Redis: said at once the first
        time, then every SKIPPED_EVERY seconds with how many since
        (`saves=`); each one at debug level."""
        now = time.monotonic()
        self.skipped += 1
        self.skipped_all += 1
        self.skipped_since = self.skipped_since or now
        if now - self.skipped_said >= SKIPPED_EVERY:
            event(log, "mirror_skipped", logging.WARNING, bekey=bekey, reason="no partner Redis reachable",
                  saves=self.skipped, next_in_s=int(SKIPPED_EVERY))
            self.skipped, self.skipped_said = 0, now
        elif log.isEnabledFor(logging.DEBUG):
            event(log, "mirror_skipped", logging.DEBUG, bekey=bekey, reason="no partner Redis reachable")

    def mirrored_again(self) -> None:
        """The first save mirrored after some that were not: for how long,
        and how many were not."""
        event(log, "mirroring_restored", unmirrored_s=round(time.monotonic() - self.skipped_since, 1),
              saves=self.skipped_all)
        self.skipped = self.skipped_all = 0
        self.skipped_since = self.skipped_said = 0.0

    async def _forget_replica(self, nid: str, bekey: str) -> None:
        """Delete the replica of `bekey` in node `nid`'s Redis (ours too), if it answers."""
        client = self.own if nid == self.node_id else self.peer(nid)
        try:
            if client is not None:
                await client.delete(self.key("replica", bekey))
        except (RedisError, OSError):
            if nid != self.node_id:
                self.peer_failed(nid)

    def expiry(self, record: dict) -> int:
        """Seconds a record lives in Redis from its last save."""
        return int(record.get("ttl") or self.ttl + self.grace)

    async def idle(self, space: str, within: float) -> list[tuple[str, bytes]]:
        """(BEKey, raw record) of the keys of a keyspace of our own Redis
        that expire within `within` seconds: for a call's record, those
        not saved for dialog_ttl + grace - `within` (a save sets the TTL
        afresh; a promotion keeps it). Asks each key's TTL, then reads
        only those."""
        due: list[bytes] = []
        async for keys in self._key_batches(space):
            ttls = await asyncio.gather(*(self.own.execute("PTTL", k) for k in keys))
            due.extend(k for k, left in zip(keys, ttls) if 0 <= left <= within * 1000)
        out: list[tuple[str, bytes]] = []
        for i in range(0, len(due), 500):
            out.extend(_named(due[i:i + 500], await self.own.mget(due[i:i + 500])))
        return out

    async def take_if_unchanged(self, space: str, bekey: str, raw: bytes) -> bool:
        """Delete our own copy of a record if it still is `raw` (no save
        since it was read), atomically: True when this call took it."""
        try:
            return bool(await self.own.execute("EVAL", _TAKE_IF_UNCHANGED, 1, self.key(space, bekey), raw))
        except (RedisError, OSError) as exc:
            self.stats["redis_errors"] += 1
            event(log, "redis_error", logging.WARNING, op="expire", bekey=bekey, error=str(exc))
            return False

    async def delete(self, bekey: str, record: dict | None) -> None:
        tasks = [self.own.delete(self.key("active", bekey))]
        mirror = self.peer((record or {}).get("p"))
        if mirror is not None:
            tasks.append(mirror.delete(self.key("replica", bekey)))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                self.stats["redis_errors"] += 1
                event(log, "redis_error", logging.WARNING, op="delete", bekey=bekey, error=str(r))

    async def claim_once(self, name: str, ttl: int) -> bool:
        """True the first time `name` is claimed within `ttl` seconds (SET NX)."""
        try:
            return bool(await self.own.set(f"{self.prefix}:{name}", b"1", nx=True, ex=ttl))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def counts(self) -> dict[str, int]:
        """Records per keyspace in our own Redis (-1 when it is down)."""
        kinds = await self.kinds()
        return {space: (-1 if by is None else sum(by.values())) for space, by in kinds.items()}

    async def kinds(self) -> dict[str, dict[str, int] | None]:
        """{'active': {'call': n, 'reg': m}, 'replica': {...}}: dialogs and
        registrations told apart by the record's kind, read in batches
        (for /status and /metrics, not for the call path)."""
        out: dict[str, dict[str, int] | None] = {}
        for space in ("active", "replica"):
            by = {"call": 0, "reg": 0}
            try:
                async for _, raw in self.scan(space):
                    by["reg" if raw.startswith(b'{"k":"reg"') else "call"] += 1
                out[space] = by
            except (RedisError, OSError):
                out[space] = None
        return out

    async def scan(self, space: str):
        """Every (BEKey, raw record) of a keyspace of our own Redis, read
        in batches (not for the call path)."""
        async for keys in self._key_batches(space):
            for item in _named(keys, await self.own.mget(keys)):
                yield item

    async def _key_batches(self, space: str):
        """The keys of a keyspace of our own Redis, 500 at a time."""
        keys: list[bytes] = []
        async for key in self.own.scan_iter(match=self.key(space, "*"), count=1000):
            keys.append(key)
            if len(keys) >= 500:
                yield keys
                keys = []
        if keys:
            yield keys


_TAKE_IF_UNCHANGED = ("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) "
                      "else return 0 end")


def _named(keys: list[bytes], values: list):
    for key, raw in zip(keys, values):
        if raw is not None:            # else expired between SCAN and MGET
            yield key.decode().rpartition(":")[2], raw
