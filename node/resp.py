"""A small pipelining Redis client for the dialog store.

One connection per Redis server, every command written at once and its
reply matched in order (Redis answers a connection's commands in the order
they came), replies parsed by hiredis. The store needs a dozen commands,
and a general client's per-command machinery (pool checkout, connection
checks, response callbacks) cost ~120 us of CPU per command on the node;
this costs ~13 us, which is most of a node's CPU per call.

- URLs: redis://[[user]:password@]host[:port][/db] and rediss:// (TLS) with
  the query options ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs
  (none, optional, required) and db; unix:///path/to/socket?db=N.
- Connection: made on first use and again after it is lost, AUTH and SELECT
  sent first; a failure to connect is a RedisConnectionError naming the
  server, never the password.
- Writes: the commands of one event-loop tick go out in one write (one
  system call for all the calls being handled at that moment).
- Timeouts: a command not answered within `timeout` seconds closes the
  connection and fails every command waiting on it (RedisTimeout); one
  timer per connection watches the oldest command, not one per command.
- Errors the server sends (-ERR ...) are raised as RedisError.
"""
from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis


class RedisError(Exception):
    """An error reply from the server, or the base of the ones below."""


class RedisConnectionError(RedisError, ConnectionError):
    pass


class RedisTimeout(RedisConnectionError):
    pass


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_QUERY = {"db", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"}


@dataclass
class Endpoint:
    host: str = ""
    port: int = 6379
    path: str = ""                 # unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None

    @property
    def name(self) -> str:
        return self.path or f"{self.host}:{self.port}"


def parse_url(url: str) -> Endpoint:
    """redis:// rediss:// unix:// -> Endpoint; ValueError saying what is wrong
    (the message never contains the password)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("not a redis://host:port/db URL (bad port?)") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"scheme must be redis, rediss or unix, not {parts.scheme or 'none'!r}")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = sorted(set(query) - _QUERY)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(_QUERY))})")
    ep = Endpoint(username=unquote(parts.username) if parts.username else None,
                  password=unquote(parts.password) if parts.password is not None else None)
    db = query.get("db", "")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("unix:// needs a socket path")
        ep.path = parts.path
    else:
        if not parts.hostname:
            raise ValueError("no host")
        ep.host, ep.port = parts.hostname, port or 6379
        db = parts.path.lstrip("/") or db
    if db:
        if not db.isdigit():
            raise ValueError(f"database must be a number, not {db!r}")
        ep.db = int(db)
    if parts.scheme == "rediss":
        reqs = query.get("ssl_cert_reqs", "required").lower()
        if reqs not in _CERT_REQS:
            raise ValueError(f"ssl_cert_reqs must be none, optional or required, not {reqs!r}")
        try:
            ctx = ssl.create_default_context(cafile=query.get("ssl_ca_certs") or None)
            if reqs != "required":
                ctx.check_hostname = False
            ctx.verify_mode = _CERT_REQS[reqs]
            if query.get("ssl_certfile"):
                ctx.load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile") or None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"TLS files: {exc}") from None
        ep.tls = ctx
    elif any(k.startswith("ssl_") for k in query):
        raise ValueError("ssl_* options need a rediss:// URL")
    return ep


class _Connection(asyncio.Protocol):
    def __init__(self, client: "Redis"):
        self.client = client
        self.reader = hiredis.Reader(replyError=RedisError)
        self.pending: collections.deque = collections.deque()   # (future, deadline)
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.timer: asyncio.TimerHandle | None = None
        self.outbox: list[bytes] = []     # commands of this loop tick, written together

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, packed: bytes) -> asyncio.Future:
        loop = self.client.loop
        fut = loop.create_future()
        if not self.pending:
            self.timer = loop.call_at(loop.time() + self.client.timeout, self._watch)
        self.pending.append((fut, loop.time() + self.client.timeout))
        if not self.outbox:
            loop.call_soon(self.flush)
        self.outbox.append(packed)
        return fut

    def flush(self) -> None:
        if self.outbox and not self.lost:
            self.transport.write(b"".join(self.outbox))
        self.outbox.clear()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(RedisConnectionError(f"Redis at {self.client.ep.name}: protocol error: {exc}"))
                return
            if reply is False:
                break
            if not pending:
                self.abort(RedisConnectionError(f"Redis at {self.client.ep.name}: reply without a command"))
                return
            fut, _ = pending.popleft()
            if fut.done():
                continue                  # its caller went away (cancelled)
            if isinstance(reply, RedisError):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)
        if not pending and self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _watch(self) -> None:
        self.timer = None
        if not self.pending:
            return
        deadline = self.pending[0][1]
        left = deadline - self.client.loop.time()
        if left <= 0:
            self.abort(RedisTimeout(f"Redis at {self.client.ep.name} did not answer within "
                                    f"{self.client.timeout:g} s"))
        else:
            self.timer = self.client.loop.call_at(self.client.loop.time() + left, self._watch)

    def connection_lost(self, exc) -> None:
        self.abort(RedisConnectionError(f"Redis at {self.client.ep.name} closed the connection"
                                        + (f": {exc}" if exc else "")))

    def abort(self, error: Exception) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.abort()
        while self.pending:
            fut, _ = self.pending.popleft()
            if not fut.done():
                fut.set_exception(error)


class Redis:
    """The commands the store uses; replies are bytes / int / list / None,
    as Redis sends them."""

    def __init__(self, url: str, *, timeout: float = 0.5, connect_timeout: float = 0.5,
                 max_pending: int = 20000):
        self.ep = parse_url(url)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_pending = max_pending
        self.conn: _Connection | None = None
        self.connecting: asyncio.Future | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def execute(self, *args) -> Awaitable:
        """Send a command -> an awaitable of its reply. Connected, that is
        the reply's future itself, so awaiting it, or gathering the writes
        of one save, runs no coroutine or task of its own (a call makes a
        dozen commands); else a coroutine that connects first."""
        conn = self.conn
        if conn is None or conn.lost:
            return self._connect_and_send(args)
        return self._send(conn, args)

    def _send(self, conn: _Connection, args) -> asyncio.Future:
        if len(conn.pending) >= self.max_pending:
            fut = self.loop.create_future()
            fut.set_exception(RedisConnectionError(
                f"Redis at {self.ep.name}: {self.max_pending} commands already waiting"))
            return fut
        return conn.send(hiredis.pack_command(args))

    async def _connect_and_send(self, args) -> object:
        return await self._send(await self._connect(), args)

    async def _connect(self) -> _Connection:
        if self.connecting is not None:           # someone is connecting already: wait for that
            return await asyncio.shield(self.connecting)
        self.loop = asyncio.get_running_loop()
        self.connecting = self.loop.create_future()
        try:
            conn = await asyncio.wait_for(self._open(), self.connect_timeout)
        except asyncio.CancelledError:
            self.connecting.cancel()
            self.connecting = None
            raise
        except BaseException as exc:
            if isinstance(exc, asyncio.TimeoutError):
                exc = RedisTimeout(f"cannot connect to Redis at {self.ep.name}: "
                                   f"no answer within {self.connect_timeout:g} s")
            elif isinstance(exc, OSError) and not isinstance(exc, RedisError):
                exc = RedisConnectionError(f"cannot connect to Redis at {self.ep.name}: "
                                           f"{exc.strerror or exc}")
            self.connecting.set_exception(exc)
            self.connecting.exception()           # retrieved: no "never retrieved" warning
            self.connecting = None
            raise exc from None
        self.conn = conn
        self.connecting.set_result(conn)
        self.connecting = None
        return conn

    async def _open(self) -> _Connection:
        ep = self.ep
        if ep.path:
            _, conn = await self.loop.create_unix_connection(lambda: _Connection(self), ep.path)
        else:
            _, conn = await self.loop.create_connection(
                lambda: _Connection(self), ep.host, ep.port, ssl=ep.tls,
                server_hostname=ep.host if ep.tls else None)
        try:
            if ep.password is not None:
                auth = (ep.username, ep.password) if ep.username else (ep.password,)
                await conn.send(hiredis.pack_command(("AUTH", *auth)))
            if ep.db:
                await conn.send(hiredis.pack_command(("SELECT", ep.db)))
        except RedisError as exc:
            conn.abort(exc)
            raise RedisConnectionError(f"Redis at {ep.name} refused the connection: {exc}") from None
        except BaseException:             # timed out or cancelled half-way: do not leak the socket
            conn.abort(RedisConnectionError(f"Redis at {ep.name}: connection abandoned"))
            raise
        return conn

    async def aclose(self) -> None:
        if self.conn is not None:
            self.conn.abort(RedisConnectionError(f"Redis at {self.ep.name}: client closed"))
            self.conn = None

    # ---- commands --------------------------------------------------------
    def ping(self):
        return self.execute("PING")

    def get(self, key):
        return self.execute("GET", key)

    def mget(self, keys):
        return self.execute("MGET", *keys)

    def set(self, key, value, *, ex: int | None = None, nx: bool = False):
        args = ["SET", key, value]
        if ex is not None:
            args += ["EX", ex]
        if nx:
            args.append("NX")
        return self.execute(*args)

    def getdel(self, key):
        return self.execute("GETDEL", key)

    def renamenx(self, src, dst):
        return self.execute("RENAMENX", src, dst)

    def delete(self, *keys):
        return self.execute("DEL", *keys)

    def exists(self, *keys):
        return self.execute("EXISTS", *keys)

    async def scan_iter(self, match: str, count: int = 1000):
        cursor = b"0"
        while True:
            cursor, keys = await self.execute("SCAN", cursor, "MATCH", match, "COUNT", count)
            for key in keys:
                yield key
            if cursor == b"0":
                return
