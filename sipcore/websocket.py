"""The WebSocket server side SIP needs (RFC 6455, RFC 7118): the HTTP
Upgrade handshake with the `sip` subprotocol, then one SIP message per
data frame. Only what a SIP server takes from browsers and WebRTC
clients (JsSIP, SIP.js): client frames masked, fragments reassembled,
ping answered, close echoed; nothing is compressed (no extensions).

`WsServer.feed(data)` takes bytes as they arrive and returns what to do:
bytes to send back (the handshake's answer, a pong, a close), SIP
messages, and whether the connection is to close. Errors never raise:
an unusable handshake gets an HTTP error, a bad frame a close with the
status of RFC 6455 §7.4.1.
"""
from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass, field

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HANDSHAKE = 8192
# opcodes (RFC 6455 §5.2)
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
# close statuses (§7.4.1)
PROTOCOL_ERROR, TOO_BIG = 1002, 1009


@dataclass
class Fed:
    """What feed() found: `out` to send, `messages` (complete SIP
    messages, bytes), `close` (close the connection once `out` is sent)."""
    out: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    close: bool = False
    error: str | None = None     # why it closes, for the log
    refused: bool = False        # a page of an origin not let in


def _http_error(status: str, why: str, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(why) + 2}\r\n{extra}"
            f"Connection: close\r\n\r\n{why}\r\n").encode()


def frame(payload: bytes, opcode: int | None = None) -> bytes:
    """A server frame (unmasked, final): text if the payload is UTF-8, else binary."""
    if opcode is None:
        try:
            payload.decode("utf-8")
            opcode = TEXT
        except UnicodeDecodeError:
            opcode = BINARY
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def close_frame(status: int, reason: str = "") -> bytes:
    return frame(struct.pack("!H", status) + reason.encode()[:120], CLOSE)


def origin_key(origin: str) -> str:
    """An Origin as compared: lower case, no trailing slash."""
    return origin.strip().lower().rstrip("/")


class WsServer:
    def __init__(self, max_message: int, origins: frozenset[str] = frozenset()):
        """`origins`: the web origins (origin_key) whose pages may connect;
        empty: any. A client that sends no Origin is no browser, and no
        page of another site can make it connect: it is let in."""
        self.max_message = max_message
        self.origins = origins
        self.upgraded = False
        self.closing = False
        self._buf = bytearray()
        self._parts: list[bytes] = []     # the fragments of a message being sent in pieces

    @property
    def buffered(self) -> bool:
        """Part of a handshake or a frame waits for the rest."""
        return bool(self._buf) or bool(self._parts)

    def feed(self, data: bytes) -> Fed:
        fed = Fed()
        if self.closing:
            return fed
        self._buf += data
        if not self.upgraded:
            self._handshake(fed)
        while self.upgraded and not fed.close and self._frame(fed):
            pass
        return fed

    # ---- the opening handshake (RFC 6455 §4.2) ----------------------------
    def _handshake(self, fed: Fed) -> None:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HANDSHAKE:
                self._refuse(fed, "431 Request Header Fields Too Large", "handshake too long")
            return
        head = bytes(self._buf[:end]).decode("latin-1")
        del self._buf[:end + 4]
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                key = name.strip().lower()
                fields[key] = f"{fields[key]}, {value.strip()}" if key in fields else value.strip()
        tokens = lambda name: {t.strip().lower() for t in fields.get(name, "").split(",")}  # noqa: E731
        key = fields.get("sec-websocket-key", "")
        if len(parts) != 3 or parts[0] != "GET" or not parts[2].startswith("HTTP/1.1"):
            self._refuse(fed, "400 Bad Request", "not an HTTP/1.1 GET")
        elif "websocket" not in tokens("upgrade") or "upgrade" not in tokens("connection"):
            self._refuse(fed, "426 Upgrade Required", "a WebSocket upgrade is needed",
                         "Upgrade: websocket\r\n")
        elif fields.get("sec-websocket-version") != "13":
            self._refuse(fed, "426 Upgrade Required", "WebSocket version 13 only",
                         "Sec-WebSocket-Version: 13\r\n")
        elif len(_b64(key)) != 16:
            self._refuse(fed, "400 Bad Request", "bad Sec-WebSocket-Key")
        elif "sip" not in tokens("sec-websocket-protocol"):
            # RFC 7118 §4.1: the client asks for the sip subprotocol
            self._refuse(fed, "400 Bad Request", "Sec-WebSocket-Protocol must offer sip")
        elif self.origins and "origin" in fields and origin_key(fields["origin"]) not in self.origins:
            # RFC 6455 §10.2: a page of another site (cross-site WebSocket
            # hijacking would use the victim browser's session)
            self._refuse(fed, "403 Forbidden", "origin not allowed")
            fed.error = f"handshake: origin {fields['origin'][:100]!r} not allowed"
            fed.refused = True
        else:
            accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
            fed.out.append(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                            f"Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: sip\r\n\r\n").encode())
            self.upgraded = True

    def _refuse(self, fed: Fed, status: str, why: str, extra: str = "") -> None:
        fed.out.append(_http_error(status, why, extra))
        fed.close, fed.error = True, f"handshake: {why}"
        self.closing = True
        self._buf.clear()

    # ---- frames (§5) ------------------------------------------------------------
    def _frame(self, fed: Fed) -> bool:
        """One frame out of the buffer, if it is all there (-> True)."""
        buf = self._buf
        if len(buf) < 2:
            return False
        b0, b1 = buf[0], buf[1]
        fin, opcode, masked, n = b0 & 0x80, b0 & 0x0F, b1 & 0x80, b1 & 0x7F
        at = 2
        if n == 126:
            if len(buf) < 4:
                return False
            n, at = struct.unpack_from("!H", buf, 2)[0], 4
        elif n == 127:
            if len(buf) < 10:
                return False
            n, at = struct.unpack_from("!Q", buf, 2)[0], 10
        if b0 & 0x70:
            return self._fail(fed, PROTOCOL_ERROR, "reserved bits set (no extension was agreed)")
        if not masked:
            return self._fail(fed, PROTOCOL_ERROR, "client frame not masked")
        if n + sum(map(len, self._parts)) > self.max_message:
            return self._fail(fed, TOO_BIG, "message too big")
        if len(buf) < at + 4 + n:
            return False
        mask = bytes(buf[at:at + 4])
        payload = _unmask(bytes(buf[at + 4:at + 4 + n]), mask)
        del buf[:at + 4 + n]
        if opcode >= CLOSE:
            if not fin or n > 125:
                return self._fail(fed, PROTOCOL_ERROR, "bad control frame")
            if opcode == PING:
                fed.out.append(frame(payload, PONG))
            elif opcode == CLOSE:
                fed.out.append(frame(payload[:2], CLOSE) if len(payload) >= 2 else frame(b"", CLOSE))
                fed.close, fed.error = True, "closed by the peer"
                self.closing = True
            return True
        if opcode == CONTINUATION:
            if not self._parts:
                return self._fail(fed, PROTOCOL_ERROR, "continuation of nothing")
        elif opcode in (TEXT, BINARY):
            if self._parts:
                return self._fail(fed, PROTOCOL_ERROR, "a new message before the last one ended")
        else:
            return self._fail(fed, PROTOCOL_ERROR, f"unknown opcode {opcode}")
        self._parts.append(payload)
        if fin:
            fed.messages.append(b"".join(self._parts))
            self._parts = []
        return True

    def _fail(self, fed: Fed, status: int, why: str) -> bool:
        fed.out.append(close_frame(status, why))
        fed.close, fed.error = True, why
        self.closing = True
        self._buf.clear()
        return False


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return b""


def _unmask(data: bytes, mask: bytes) -> bytes:
    if not data:
        return data
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")
