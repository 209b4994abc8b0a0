"""Responses over UDP relayed as bytes: half of what the proxy forwards.

A response only needs its top Via removed (ours) and the next Via read
(where it goes), so the common case skips building a message object:
the header block is checked in one regular-expression pass, the two Vias
are found by a search on its lower-cased copy, the top one is cut out of
the datagram and the rest is sent unchanged. Anything out of the common
case returns None and takes the full parser (proxy/server.py
on_response), which gives the same result or the rejection:

- leading CRLFs, folded or over-long lines, a header line that is not
  `token: value`, NUL bytes, more fields than the limit;
- compact Via (`v:`) or Content-Length (`l:`) forms, a `Via` spelled with
  whitespace before its colon, quotes in a Via line;
- Content-Length that does not match the body exactly (the full parser
  truncates or rejects), or appearing twice.
"""
from __future__ import annotations

import re

from sipcore.errors import SipParseError
from sipcore.headers import Via, parse_via
from sipcore.message import _TOKEN_CHARS, Limits

_STATUS_LINE = re.compile(rb"SIP/2\.0 ([1-6])[0-9][0-9] [^\r\n\x00]*\r\n")
# header names: the parser's token characters (RFC 3261 §25.1), nothing more
_NAME = "".join(re.escape(c) for c in sorted(_TOKEN_CHARS)).encode()
_FIELDS = re.compile(rb"(?:[" + _NAME + rb"]+[ \t]*:[^\r\n\x00]*\r\n)*\r\n")
# in the lower-cased header: compact forms, or a name with space before its colon
_ODD_NAMES = re.compile(rb"\r\n(?:[vl][ \t:]|via[ \t]|content-length[ \t])")


def strip_top_via(data: bytes, limits: Limits) -> tuple[bytes, bytes, bytes, Via, int] | None:
    """-> (datagram without its top Via, its header lower-cased (for
    finding other fields), the top via-parm as it was, next Via, status
    class) or None when the full parser must look at it."""
    m = _STATUS_LINE.match(data)
    if m is None or len(data) > limits.max_message:
        return None
    end = data.find(b"\r\n\r\n")
    if end < 0 or end > limits.max_line or _FIELDS.fullmatch(data, m.end(), end + 4) is None:
        return None
    head = data[:end + 2].lower()          # from the start line to the last field's CRLF
    if head.count(b"\r\n") > limits.max_headers + 1 or _ODD_NAMES.search(head) is not None:
        return None
    body = len(data) - end - 4
    cl = head.find(b"\r\ncontent-length:")
    if cl >= 0:
        if head.find(b"\r\ncontent-length:", cl + 2) >= 0:
            return None
        value = head[cl + 17:head.find(b"\r\n", cl + 2)].strip()
        if not value.isdigit() or len(value) > 9 or int(value) != body:
            return None
    first = head.find(b"\r\nvia:")
    if first < 0:
        return None
    first_end = head.find(b"\r\n", first + 2)
    line = data[first + 6:first_end]
    if b'"' in line:
        return None
    try:
        comma = line.find(b",")
        if comma >= 0:                     # "Via: ours, next, ..." on one line
            top = line[:comma]
            rest = line[comma + 1:].strip(b" \t")
            nxt_text = rest.split(b",", 1)[0]
            out = data[:first + 6] + b" " + rest + data[first_end:]
        else:
            second = head.find(b"\r\nvia:", first_end)
            if second < 0:
                return None                # nowhere to send it: the full path drops it
            nxt_line = data[second + 6:head.find(b"\r\n", second + 2)]
            if b'"' in nxt_line:
                return None
            top = line
            nxt_text = nxt_line.split(b",", 1)[0]
            out = data[:first] + data[first_end:]
        nxt = parse_via(nxt_text.decode("latin-1"))
    except SipParseError:
        return None
    return out, head, top, nxt, int(m.group(1))
