"""A minimal admin HTTP endpoint (GET only) for /status and /metrics.

Loopback by default; requests are bounded (8 KiB header, 5 s to send it)
so a stray client cannot hold the process. Handlers are coroutines
returning (content type, body).
"""
from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from typing import Awaitable, Callable

from .headers import hostport

log = logging.getLogger("sipcore.admin")

Handler = Callable[[], Awaitable[tuple[str, str]]]


AUTO_OFFSET = 1000


async def start_admin(setting: str, key: str, sip_addr: tuple[str, int], routes: dict[str, Handler]):
    """Start the admin endpoint as configured: 'auto' (the default) is
    loopback at the SIP port + 1000, 127.0.0.1 or, for a SIP address on
    IPv6, ::1 (where the proxy looks for an IPv6 node's), skipped with a
    warning when that port is taken; '' or 'off' disables it; an explicit
    HOST:PORT must bind. -> (server, (host, port)) or (None, None)."""
    from .config import parse_hostport
    from .logfmt import event
    if setting in ("", "off"):
        return None, None
    server = AdminServer(routes)
    if setting == "auto":
        host, port = ("::1" if ":" in sip_addr[0] else "127.0.0.1"), sip_addr[1] + AUTO_OFFSET
        if not 0 < port < 65536:
            return None, None
        try:
            return server, await server.start(host, port)
        except OSError as exc:
            event(log, "admin_unavailable", logging.WARNING, key=key, addr=hostport((host, port)), error=str(exc))
            return None, None
    host, port = parse_hostport(setting, key, ipv6=True)
    return server, await server.start(host, port)


def json_handler(fn: Callable[[], Awaitable[dict]]) -> Handler:
    async def handle():
        return "application/json", json.dumps(await fn(), indent=1, default=str) + "\n"
    return handle


def json_query_handler(fn: Callable[[dict[str, str]], Awaitable[dict]], post: bool = False) -> Handler:
    """A JSON page that reads the query string (`?aor=...`): `fn` gets
    its fields, the last of each name. `post`: an action (it changes
    something), taken by POST only, never by a GET a crawler or a
    browser's prefetch could send."""
    async def handle(query: dict[str, str]):
        return "application/json", json.dumps(await fn(query), indent=1, default=str) + "\n"
    handle.takes_query = True  # type: ignore[attr-defined]
    handle.post = post  # type: ignore[attr-defined]
    return handle


class AdminServer:
    def __init__(self, routes: dict[str, Handler]):
        self.routes = routes
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._client, host, port, reuse_address=True, limit=8192)
        return self.server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self.server:
            self.server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            if len(parts) != 3 or parts[0] not in ("GET", "HEAD", "POST"):
                await self._write(writer, 405, "text/plain", "only GET, or POST for an action\n")
                return
            path, _, query = parts[1].partition("?")
            handler = self.routes.get(path)
            if handler is None:
                await self._write(writer, 404, "text/plain", f"no such path; try {', '.join(self.routes)}\n")
                return
            if (parts[0] == "POST") != getattr(handler, "post", False):
                await self._write(writer, 405, "text/plain",
                                  f"{path} is an action: POST it\n" if parts[0] != "POST" else "only GET here\n")
                return
            if getattr(handler, "takes_query", False):
                ctype, body = await handler(dict(urllib.parse.parse_qsl(query)))
            else:
                ctype, body = await handler()
            await self._write(writer, 200, ctype, body, head_only=parts[0] == "HEAD")
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        except Exception:  # the admin page must never take the process down
            log.exception("admin handler failed")
            try:
                await self._write(writer, 500, "text/plain", "internal error\n")
            except ConnectionError:
                pass
        finally:
            writer.close()

    @staticmethod
    async def _write(writer, status: int, ctype: str, body: str, head_only: bool = False) -> None:
        data = body.encode()
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + (b"" if head_only else data))
        await writer.drain()


class AdminFetchError(Exception):
    pass


async def fetch_json(host: str, port: int, path: str, timeout: float = 5.0) -> dict:
    """GET `path` from another process's admin endpoint -> its JSON body
    (AdminFetchError naming the address and what went wrong)."""
    where = f"http://{hostport((host, port))}{path}"

    async def get() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode("latin-1"))
            return await reader.read()
        finally:
            writer.close()
    try:
        data = await asyncio.wait_for(get(), timeout)
    except asyncio.TimeoutError:
        raise AdminFetchError(f"{where}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise AdminFetchError(f"{where}: {exc.strerror or exc}") from None
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    if status_line.split(" ")[1:2] != ["200"]:
        raise AdminFetchError(f"{where}: {status_line or 'no answer'}")
    try:
        return json.loads(body)
    except ValueError:
        raise AdminFetchError(f"{where}: not JSON") from None
