"""Messages over UDP relayed as bytes, in their common forms: most of
what the proxy forwards.

Responses: a response only needs its top Via removed (ours) and the next
Via read (where it goes), so the common case skips building a message
object: the header block is checked in one regular-expression pass, the
two Vias are found by a search on its lower-cased copy, the top one is cut
out of the datagram and the rest is sent unchanged.

Requests inside a dialog (a To-tag: ACK, BYE, re-INVITE, INFO, ...) and
new INVITEs, from outside the cluster and from the nodes on their way
out: scan_request finds and parses only the fields routing reads
(Request-URI, top Via, From, To, Call-ID, CSeq, Max-Forwards, Route,
User-Agent) with the parser's own value parsers, and the proxy writes its
few edits into the datagram (proxy/server.py fast_request, fast_outbound),
a Record-Route among them on a new INVITE.

New INVITEs, REGISTERs, SUBSCRIBEs and MESSAGEs while the proxy is
overloaded (sipcore/overload.py OverloadGuard): refuse_new_request writes
the 503 from the request's bytes.

Anything out of the common case returns None and takes the full parser,
which gives the same result or the rejection:

- leading CRLFs, folded or over-long lines, a header line that is not
  `token: value`, NUL bytes, more fields than the limit;
- compact forms (`v:`, `l:`, `f:`, `t:`, `i:`), or a name routing reads
  spelled with whitespace before its colon; quotes in a Via line;
- Content-Length that does not match the body exactly (the full parser
  truncates or rejects), or appearing twice;
- for requests: a missing or repeated Max-Forwards, several Vias on the
  top Via line, more than one Route entry or one that is not ours, the
  internal routing header, any field the full parser would reject.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from sipcore.bekey import ROUTE_HEADER
from sipcore.errors import SipParseError
from sipcore.expiring import remember
from sipcore.headers import SipUri, Via, parse_cseq, parse_max_forwards, parse_name_addr, parse_uri, parse_via
from sipcore.message import _TOKEN_CHARS, Limits

# header names and methods: the parser's token characters (RFC 3261 §25.1)
_NAME = "".join(re.escape(c) for c in sorted(_TOKEN_CHARS)).encode()
_STATUS_LINE = re.compile(rb"SIP/2\.0 ([1-6])[0-9][0-9] [^\r\n\x00]*\r\n")
_REQUEST_LINE = re.compile(rb"([" + _NAME + rb"]+) ([^ \t\r\n\x00]+) SIP/2\.0\r\n")
# the fields read here (lower case)
_READ = (b"via", b"content-length", b"from", b"to", b"call-id", b"cseq", b"max-forwards", b"route",
         b"user-agent", ROUTE_HEADER.lower().encode())
_ROUTE_KEY = _READ[-1]
# in the lower-cased header, at the start of a field line: not `token:`
# (a folded line, junk), or a compact form (`v:`, `l:`, `f:`, `t:`, `i:`),
# or a name read here with space before its colon
_ODD_LINE = re.compile(rb"\r\n(?:(?![" + _NAME + rb"]+[ \t]*:)|[vlfti][ \t:]|(?:"
                       + b"|".join(map(re.escape, _READ)) + rb")[ \t])")


def _header_block(data: bytes, start_end: int, limits: Limits) -> bytes | None:
    """Check the fields after the start line (ending at start_end) -> the
    start line and fields lower-cased, up to the last field's CRLF, or None.
    A field line is `token[ \t]*:` and a value without CR, LF or NUL: the
    CRs and LFs all pair up as line ends, and every line end before the
    blank line starts a line in that form."""
    if len(data) > limits.max_message:
        return None
    end = data.find(b"\r\n\r\n")
    if end < 0 or end > limits.max_line:
        return None
    head = data[:end + 2].lower()
    lines = head.count(b"\r\n")
    if (lines > limits.max_headers + 1 or head.count(b"\r") != lines or head.count(b"\n") != lines
            or b"\x00" in head or _ODD_LINE.search(head, start_end - 2, end) is not None):
        return None
    body = len(data) - end - 4
    cl = head.find(b"\r\ncontent-length:")
    if cl >= 0:
        if head.find(b"\r\ncontent-length:", cl + 2) >= 0:
            return None
        value = head[cl + 17:head.find(b"\r\n", cl + 2)].strip()
        if not value.isdigit() or len(value) > 9 or int(value) != body:
            return None
    return head


def _message(start_line: re.Pattern, data: bytes, limits: Limits) -> tuple[re.Match, bytes] | None:
    """-> (the start line's match, the header lower-cased) when both are in
    the common form, else None."""
    m = start_line.match(data)
    if m is None:
        return None
    head = _header_block(data, m.end(), limits)
    return None if head is None else (m, head)


def _value(data: bytes, line: tuple[int, int], name: bytes) -> str:
    return data[line[0] + len(name) + 1:line[1] - 2].strip(b" \t").decode("latin-1")


def first_value(data: bytes, head: bytes, name: bytes) -> str | None:
    """The value of the first field `name` (lower case) of a message whose
    header `head` is its lower-cased copy, or None."""
    at = head.find(b"\r\n" + name + b":")
    if at < 0:
        return None
    return _value(data, (at + 2, head.find(b"\r\n", at + 2) + 2), name)


def strip_top_via(data: bytes, limits: Limits) -> tuple[bytes, bytes, bytes, Via, int] | None:
    """-> (datagram without its top Via, its header lower-cased (for
    finding other fields), the top via-parm as it was, next Via, status
    class) or None when the full parser must look at it."""
    checked = _message(_STATUS_LINE, data, limits)
    if checked is None:
        return None
    m, head = checked
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


@dataclass(slots=True)
class RequestScan:
    """What routing reads of a request, with where its fields are. Lines
    are (start, end) offsets into the datagram, end past the CRLF."""
    method: str
    ruri: SipUri                 # the Request-URI, parsed (shared: read only)
    fields_start: int            # first header line
    fields_end: int              # past the last header line's CRLF
    head: bytes                  # start line and fields, lower-cased
    via_line: tuple[int, int]
    via: Via
    from_tag: str | None
    to_tag: str | None
    call_id: str
    mf_line: tuple[int, int]
    mf_name: bytes               # as spelled
    max_forwards: int
    route_line: tuple[int, int] | None
    route: str | None            # the Route value (one entry), not parsed yet
    user_agent: str | None       # lower-cased


# the fields scan_request reads, and the line that starts each in the
# lower-cased header
_FIELD_LINES = tuple((name, b"\r\n" + name + b":") for name in (b"via", *_READ[2:-1]))
_REQUIRED = frozenset((b"via", b"from", b"to", b"call-id", b"cseq", b"max-forwards"))
_UNIQUE = frozenset((b"max-forwards", b"route"))
_ROUTE_KEY_LINE = b"\r\n" + _ROUTE_KEY + b":"
# Request-URIs parsed (the requests of a call, and all calls of one phone
# or trunk, share theirs); bounded, forgotten all at once when full, short
# URIs only
_URIS: dict[bytes, SipUri] = {}


def _lines(head: bytes) -> dict[bytes, tuple[int, int]] | None:
    """-> {name: (start, end) of its first line} for the fields read here,
    or None when one required is missing, a unique one repeats, or the
    internal routing header is there (the full path strips it). `head`
    passed _header_block: every CR is a line end's."""
    if _ROUTE_KEY_LINE in head:
        return None
    lines: dict[bytes, tuple[int, int]] = {}
    for name, start in _FIELD_LINES:
        at = head.find(start)
        if at < 0:
            if name in _REQUIRED:
                return None
        elif name in _UNIQUE and head.find(start, at + 2) >= 0:
            return None
        else:
            lines[name] = (at + 2, head.find(b"\r\n", at + 2) + 2)
    return lines


# From and To values -> their tags: a call's requests repeat them
_TAGS: dict[str, str | None] = {}


def _tag(value: str) -> str | None:
    if value in _TAGS:
        return _TAGS[value]
    tag = parse_name_addr(value).tag
    remember(_TAGS, value, tag)
    return tag


def _parsed_uri(uri: bytes) -> SipUri:
    ruri = _URIS.get(uri)
    if ruri is None:
        ruri = parse_uri(uri.decode("latin-1"))
        remember(_URIS, uri, ruri)
    return ruri


def scan_request(data: bytes, limits: Limits) -> RequestScan | None:
    """A request in the common form, checked as SipRequest.check() does,
    or None when the full parser must look at it."""
    checked = _message(_REQUEST_LINE, data, limits)
    if checked is None:
        return None
    m, head = checked
    lines = _lines(head)
    if lines is None:
        return None
    via_text = _value(data, lines[b"via"], b"via")
    route_line = lines.get(b"route")
    route = _value(data, route_line, b"route") if route_line is not None else None
    if "," in via_text or '"' in via_text or (route is not None and "," in route):
        return None
    mf_line = lines[b"max-forwards"]
    call_id = _value(data, lines[b"call-id"], b"call-id")
    if not call_id:
        return None
    ua_line = lines.get(b"user-agent")
    method = m.group(1).decode("latin-1")
    try:
        ruri = _parsed_uri(m.group(2))
        max_forwards = parse_max_forwards(_value(data, mf_line, b"max-forwards"))
        via = parse_via(via_text)
        from_tag = _tag(_required(data, lines[b"from"], b"from"))
        to_tag = _tag(_required(data, lines[b"to"], b"to"))
        if parse_cseq(_required(data, lines[b"cseq"], b"cseq"))[1] != method:
            return None
    except SipParseError:
        return None
    return RequestScan(method, ruri, m.end(), len(head), head, lines[b"via"], via, from_tag, to_tag, call_id,
                       mf_line, data[mf_line[0]:mf_line[0] + len(b"max-forwards")], max_forwards, route_line, route,
                       _value(head, ua_line, b"user-agent") if ua_line is not None else None)


def _required(data: bytes, line: tuple[int, int], name: bytes) -> str:
    value = _value(data, line, name)
    if not value:
        raise SipParseError(f"missing {name.decode()}")
    return value


_ANSWER_FIELDS = re.compile(rb"\r\n(via|from|to|call-id|cseq|user-agent):")


def refuse_new_request(data: bytes, limits: Limits, status_line: bytes, to_tag: bytes,
                       extra: bytes) -> tuple[bytes, str, str | None] | None:
    """A final response to a request outside a dialog (no To-tag) in the
    common form, written from its bytes (Via, From, Call-ID and CSeq
    copied, a To-tag added, RFC 3261 §8.2.6), the request's Call-ID and its
    User-Agent lower-cased; or None. Cheap on purpose: it is how an overloaded proxy
    says no, and saying no must cost far less than the call or the
    registration would (one that costs as much as the work itself keeps
    the proxy as busy as before, and the guard refuses ever more)."""
    if data.count(b"tag=") > 1:
        return None
    checked = _message(_REQUEST_LINE, data, limits)
    if checked is None:
        return None
    m, head = checked
    parts = [status_line]
    seen = set()
    user_agent = call_id = None
    for f in _ANSWER_FIELDS.finditer(head):
        name = f.group(1)
        end = head.find(b"\r\n", f.end())
        if name == b"user-agent":
            if user_agent is None:
                user_agent = head[f.end():end].strip(b" \t").decode("latin-1")
            continue
        line = data[f.start() + 2:end]
        if name == b"to":
            if name in seen or b"tag=" in line.lower():
                return None
            line += b";tag=" + to_tag
        elif name != b"via" and name in seen:
            return None
        elif name == b"call-id":
            call_id = _value(data, (f.start() + 2, end + 2), name)
        seen.add(name)
        parts.append(line + b"\r\n")
    if len(seen) != 5:
        return None
    parts.append(extra)
    return b"".join(parts), call_id, user_agent
