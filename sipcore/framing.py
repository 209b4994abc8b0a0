"""Splitting a SIP byte stream (TCP) into messages (RFC 3261 §18.3).

`StreamFramer.feed(data)` returns what became complete: message bytes,
`PING` for a double-CRLF keep-alive (RFC 5626 §3.5.1: answered with a single
CRLF, `PONG`), and raises FramingError when framing is lost (no or bad
Content-Length, oversized header or body): the connection must then be
closed, since nothing after that point can be trusted.

Attack guarded against: a slow or endless header. The search for the end of
the header resumes where the last one stopped, so a message trickled in
one byte at a time costs O(bytes) and not O(bytes²); the buffer never grows
beyond the configured message limit.
"""
from __future__ import annotations

import re

from .errors import SipParseError
from .message import DEFAULT_LIMITS, Limits

PING = object()
PONG = b"\r\n"

_CL_RE = re.compile(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r?$")


class FramingError(SipParseError):
    pass


class StreamFramer:
    def __init__(self, limits: Limits = DEFAULT_LIMITS):
        self.limits = limits
        self._buf = bytearray()
        self._scan_from = 0          # where to resume looking for the header end
        self._need: int | None = None  # total bytes of the message being read

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list:
        self._buf += data
        out: list = []
        buf = self._buf
        while buf:
            if self._need is None:
                # keep-alives and stray CRLFs between messages
                if buf[0] in (13, 10):
                    if buf.startswith(b"\r\n\r\n"):
                        del buf[:4]
                        out.append(PING)
                        continue
                    if buf in (b"\r", b"\r\n", b"\r\n\r") or buf == b"\n":
                        break  # maybe the start of a ping; wait for more
                    strip = 2 if buf.startswith(b"\r\n") else 1
                    del buf[:strip]
                    continue
                end = buf.find(b"\r\n\r\n", max(0, self._scan_from - 3))
                sep = 4
                if end < 0:
                    lf = buf.find(b"\n\n", max(0, self._scan_from - 1))
                    if lf >= 0:
                        end, sep = lf, 2
                if end < 0:
                    self._scan_from = len(buf)
                    if len(buf) > self.limits.max_message:
                        raise FramingError("header too large")
                    break
                header = bytes(buf[:end + sep])
                matches = _CL_RE.findall(header)
                if not matches:
                    raise FramingError("missing Content-Length on a stream")
                values = {m.strip() for m in matches}
                if len(values) != 1:
                    raise FramingError("conflicting Content-Length headers")
                value = values.pop()
                if not value.isdigit() or len(value) > 9:
                    raise FramingError("bad Content-Length")
                self._need = end + sep + int(value)
                self._scan_from = 0
                if self._need > self.limits.max_message:
                    raise FramingError("message too large")
            if len(buf) < self._need:
                break
            out.append(bytes(buf[:self._need]))
            del buf[:self._need]
            self._need = None
        return out
