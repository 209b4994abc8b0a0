"""SIP message model (RFC 3261 §7, §25): parse, read, change, serialize.

Operations: `parse_message(bytes)` -> SipRequest | SipResponse; typed,
lazily parsed accessors for what routing needs; small edits (set / add /
remove a header, pop the first value of a list header, change the
Request-URI or body); `to_bytes()`.

Goals:
- Byte-exact: every header field keeps the exact text it was read from
  (spelling, compact form, folding, whitespace). An unchanged message
  serializes to the bytes that came in; a changed one re-writes only the
  fields that changed, in place.
- Lean: parsing splits lines and names only; values are parsed on first
  access and cached, so a proxy pays only for the headers it reads.
- Safe: every malformed input raises SipParseError with a human reason and
  nothing else; sizes, header count and line length are bounded so a hostile
  message costs O(bytes) and no more.

Text is decoded as latin-1, which maps each byte to one character and back,
so indices into the text are indices into the bytes and nothing is lost.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import SipParseError
from .headers import (NameAddr, SipUri, Via, is_digits, parse_cseq, parse_max_forwards, parse_name_addr,
                      parse_uri, parse_via, split_commas)

# RFC 3261 §7.3.3 and the IANA registry: compact form -> canonical long name.
COMPACT_FORMS = {
    "i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length",
    "f": "from", "s": "subject", "k": "supported", "t": "to", "v": "via",
    "c": "content-type", "o": "event", "u": "allow-events", "r": "refer-to",
    "b": "referred-by", "x": "session-expires", "y": "identity",
    "a": "accept-contact", "j": "reject-contact", "d": "request-disposition",
}

_TOKEN_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")


@dataclass(frozen=True, slots=True)
class Limits:
    max_message: int = 65536
    max_headers: int = 256
    max_line: int = 8192


DEFAULT_LIMITS = Limits()


_NAME_CACHE: dict[str, str] = {}
# header key -> the "key:suffix" cache entries read from it (see _cached)
_DERIVED: dict[str, set[str]] = {}


def canonical_name(name: str) -> str:
    """Lower-case long form of a header name; memoised (bounded, so names
    made up by a hostile peer cannot grow it without limit)."""
    key = _NAME_CACHE.get(name)
    if key is None:
        key = name.lower()
        key = COMPACT_FORMS.get(key, key)
        if len(_NAME_CACHE) < 4096:
            _NAME_CACHE[name] = key
    return key


class HeaderField:
    """One header field line as read (or as written anew when `raw` is None)."""
    __slots__ = ("name", "key", "value", "raw")

    def __init__(self, name: str, value: str, raw: str | None = None, key: str | None = None):
        self.name = name                  # as spelled on the wire
        self.key = key or canonical_name(name)   # lower-case long form
        self.value = value                # unfolded, surrounding whitespace stripped
        self.raw = raw                    # exact text incl. line ending, or None if changed

    def __repr__(self) -> str:
        return f"HeaderField({self.name!r}, {self.value!r})"


class SipMessage:
    __slots__ = ("fields", "body", "source", "stale", "_raw", "_start_raw", "_blank", "_dirty", "_cache")

    is_request = False

    def __init__(self) -> None:
        self.fields: list[HeaderField] = []
        self.body: bytes = b""
        self.source: tuple[str, int] | None = None   # set by the transport that received it
        self.stale = False      # it waited in the socket through a stall (SipTransport.mark_backlog)
        self._raw: bytes | None = None
        self._start_raw: str | None = None
        self._blank = "\r\n"
        self._dirty = True
        self._cache: dict = {}

    # ---- reading -----------------------------------------------------
    def get(self, name: str) -> str | None:
        """Value of the first field with this name (any spelling/compact form)."""
        key = canonical_name(name)
        for f in self.fields:
            if f.key == key:
                return f.value
        return None

    def get_fields(self, name: str) -> list[HeaderField]:
        key = canonical_name(name)
        return [f for f in self.fields if f.key == key]

    def values(self, name: str) -> list[str]:
        """All values of a list header, split on commas across all its fields."""
        key = canonical_name(name)
        out: list[str] = []
        for f in self.fields:
            if f.key == key:
                out.extend(split_commas(f.value))
        return out

    def has(self, name: str) -> bool:
        key = canonical_name(name)
        return any(f.key == key for f in self.fields)

    def _cached(self, key, fn):
        """Value of `fn()`, computed once. `key` is the canonical name of
        the header it is read from, or that name, ':' and a suffix; an edit
        of that header forgets it (see _touch)."""
        try:
            return self._cache[key]
        except KeyError:
            v = self._cache[key] = fn()
            if ":" in key:
                _DERIVED.setdefault(key.partition(":")[0], set()).add(key)
            return v

    @property
    def vias(self) -> list[Via]:
        return self._cached("via", lambda: [parse_via(v) for v in self.values("via")])

    def _via_value(self, index: int) -> str | None:
        """The index-th via-parm without splitting every Via of the message."""
        seen = 0
        for f in self.fields:
            if f.key == "via":
                parts = split_commas(f.value) if "," in f.value else [f.value.strip()]
                if index - seen < len(parts):
                    return parts[index - seen]
                seen += len(parts)
        return None

    @property
    def top_via(self) -> Via:
        v = self._cache.get("via:top")
        if v is None:
            v = self._cached("via:top", self._parse_top_via)
        return v

    def _parse_top_via(self) -> Via:
        if "via" in self._cache:
            vias = self._cache["via"]
            if not vias:
                raise SipParseError("missing Via")
            return vias[0]
        v = self._via_value(0)
        if v is None:
            raise SipParseError("missing Via")
        return parse_via(v)

    @property
    def second_via(self) -> Via | None:
        """The Via below the top one (where a proxy sends a response)."""
        def parse():
            v = self._via_value(1)
            return None if v is None else parse_via(v)
        return self._cached("via:second", parse)

    def _required(self, name: str) -> str:
        v = self.get(name)
        if v is None or not v:
            raise SipParseError(f"missing {name}")
        return v

    # the four below are read for every message: no closure per access
    @property
    def from_(self) -> NameAddr:
        v = self._cache.get("from")
        if v is None:
            v = self._cache["from"] = parse_name_addr(self._required("From"))
        return v

    @property
    def to(self) -> NameAddr:
        v = self._cache.get("to")
        if v is None:
            v = self._cache["to"] = parse_name_addr(self._required("To"))
        return v

    @property
    def call_id(self) -> str:
        v = self._cache.get("call-id")
        if v is None:
            v = self._cache["call-id"] = self._required("Call-ID")
        return v

    @property
    def cseq(self) -> tuple[int, str]:
        v = self._cache.get("cseq")
        if v is None:
            v = self._cache["cseq"] = parse_cseq(self._required("CSeq"))
        return v

    @property
    def max_forwards(self) -> int | None:
        def parse():
            v = self.get("Max-Forwards")
            return None if v is None else parse_max_forwards(v)
        return self._cached("max-forwards", parse)

    def _name_addrs(self, name: str) -> list[NameAddr]:
        return self._cached(name, lambda: [parse_name_addr(v) for v in self.values(name)])

    @property
    def routes(self) -> list[NameAddr]:
        return self._name_addrs("route")

    @property
    def record_routes(self) -> list[NameAddr]:
        return self._name_addrs("record-route")

    @property
    def paths(self) -> list[NameAddr]:
        return self._name_addrs("path")

    @property
    def contacts(self) -> list[NameAddr]:
        return self._name_addrs("contact")

    @property
    def content_length(self) -> int | None:
        v = self.get("Content-Length")
        return None if v is None else int(v)

    def check(self) -> None:
        """Parse the fields every SIP message must have (RFC 3261 §8.1.1)
        so a later access cannot fail; raises SipParseError with this
        message attached."""
        try:
            self.top_via
            self.from_
            self.to
            self.call_id
            self.cseq
            self.max_forwards
        except SipParseError as exc:
            exc.message = self
            raise

    # ---- changing ----------------------------------------------------
    def _touch(self, key: str) -> None:
        """The header `key` changed: forget what was read from it."""
        self._dirty = True
        cache = self._cache
        if cache:
            cache.pop(key, None)
            for k in _DERIVED.get(key, ()):
                cache.pop(k, None)

    def set(self, name: str, value: str) -> None:
        """Replace the first field of this name (keeping its spelling and
        place), drop later ones; append if there is none."""
        key = canonical_name(name)
        first = None
        kept = []
        for f in self.fields:
            if f.key == key:
                if first is None:
                    first = f
                    f.value = value
                    f.raw = None
                    kept.append(f)
            else:
                kept.append(f)
        if first is None:
            kept.append(HeaderField(name, value))
        self.fields = kept
        self._touch(key)

    def add(self, name: str, value: str) -> None:
        """Append a field at the end of the header."""
        field = HeaderField(name, value)
        self.fields.append(field)
        self._touch(field.key)

    def add_top(self, name: str, value: str) -> None:
        """Insert a field before the first field of the same name (or first
        of all): how Via, Record-Route and Path are pushed."""
        key = canonical_name(name)
        idx = 0
        for i, f in enumerate(self.fields):
            if f.key == key:
                idx = i
                break
        self.fields.insert(idx, HeaderField(name, value))
        self._touch(key)

    def remove(self, name: str) -> int:
        key = canonical_name(name)
        before = len(self.fields)
        self.fields = [f for f in self.fields if f.key != key]
        removed = before - len(self.fields)
        if removed:
            self._touch(key)
        return removed

    def pop_first(self, name: str) -> str | None:
        """Remove the first value of a (possibly comma-joined) list header:
        how a proxy removes its own Via or Route."""
        key = canonical_name(name)
        for i, f in enumerate(self.fields):
            if f.key == key:
                parts = split_commas(f.value)
                if len(parts) <= 1:
                    del self.fields[i]
                else:
                    f.value = ", ".join(parts[1:])
                    f.raw = None
                self._touch(key)
                return parts[0] if parts else None
        return None

    def set_body(self, body: bytes, content_type: str | None = None) -> None:
        self.body = body
        if content_type is not None:
            self.set("Content-Type", content_type)
        self.set("Content-Length", str(len(body)))

    # ---- writing -----------------------------------------------------
    def start_line(self) -> str:
        raise NotImplementedError

    def to_bytes(self, *, stream: bool = False) -> bytes:
        """Serialize. With stream=True a missing Content-Length is added,
        since streams need it for framing (RFC 3261 §18.3)."""
        if stream and not self.has("Content-Length"):
            self.set("Content-Length", str(len(self.body)))
        if not self._dirty and self._raw is not None:
            return self._raw
        start = self._start_raw if self._start_raw is not None else self.start_line() + "\r\n"
        parts = [start]
        for f in self.fields:
            raw = f.raw
            parts.append(raw if raw is not None else f"{f.name}: {f.value}\r\n")
        parts.append(self._blank)
        out = "".join(parts).encode("latin-1") + self.body
        self._raw = out
        self._dirty = False
        return out

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    @property
    def summary(self) -> str:
        return self.start_line()


class SipRequest(SipMessage):
    __slots__ = ("method", "uri", "version")
    is_request = True

    def __init__(self, method: str, uri: str, version: str = "SIP/2.0") -> None:
        super().__init__()
        self.method = method
        self.uri = uri
        self.version = version

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {self.version}"

    @property
    def ruri(self) -> SipUri:
        return self._cached(":ruri", lambda: parse_uri(self.uri))

    def set_uri(self, uri: str) -> None:
        self.uri = uri
        self._start_raw = None
        self._touch(":ruri")

    def check(self) -> None:
        super().check()
        try:
            self.ruri
            if self.cseq[1] != self.method:
                raise SipParseError("CSeq method does not match request method")
        except SipParseError as exc:
            exc.message = self
            raise

    def __repr__(self) -> str:
        return f"<SipRequest {self.method} {self.uri}>"


class SipResponse(SipMessage):
    __slots__ = ("status", "reason", "version")

    def __init__(self, status: int, reason: str, version: str = "SIP/2.0") -> None:
        super().__init__()
        self.status = status
        self.reason = reason
        self.version = version

    def start_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"<SipResponse {self.status} {self.reason}>"


def _find_header_end(text: str) -> tuple[int, int]:
    """-> (index just past the last header line's terminator, body start)."""
    crlf = text.find("\r\n\r\n")
    lf = text.find("\n\n")
    if crlf < 0 and lf < 0:
        return -1, -1
    if lf >= 0 and (crlf < 0 or lf < crlf + 1):
        # bare-LF header (tolerated, as most stacks do)
        return lf + 1, lf + 2
    return crlf + 2, crlf + 4


def parse_start_line(line: str) -> SipMessage:
    if line.startswith("SIP/"):
        parts = line.split(" ", 2)
        if len(parts) < 2:
            raise SipParseError("bad status line")
        version = parts[0]
        code = parts[1]
        if version.upper() != "SIP/2.0":
            raise SipParseError(f"unsupported SIP version {version[:16]!r}")
        if len(code) != 3 or not is_digits(code) or code[0] == "0":
            raise SipParseError("bad status code")
        return SipResponse(int(code), parts[2] if len(parts) > 2 else "", version)
    parts = line.split(" ")
    if len(parts) != 3:
        raise SipParseError("bad request line")
    method, uri, version = parts
    if not method or not _TOKEN_CHARS.issuperset(method):
        raise SipParseError("bad method")
    if version.upper() != "SIP/2.0":
        if version.upper().startswith("SIP/"):
            raise SipParseError(f"unsupported SIP version {version[:16]!r}")
        raise SipParseError("bad request line")
    if ":" not in uri:
        raise SipParseError("bad Request-URI")
    return SipRequest(method, uri, version)


# Header names as spelled on the wire (up to the colon, before any
# whitespace is stripped) that were already found valid -> (name, canonical
# key). Bounded like _NAME_CACHE.
_WIRE_NAMES: dict[str, tuple[str, str]] = {}


def _field_name(line: str, colon: int) -> tuple[str, str]:
    """Validate the name of a header line -> (name, canonical key)."""
    if colon <= 0:
        raise SipParseError("header line without a colon")
    spelled = line[:colon]
    name = spelled.rstrip(" \t")
    if not name or not _TOKEN_CHARS.issuperset(name):
        raise SipParseError("bad header name")
    key = canonical_name(name)
    if len(_WIRE_NAMES) < 4096:
        _WIRE_NAMES[spelled] = (name, key)
    return name, key


def _parse_fields_slow(lines: list[str], fields: list[HeaderField], limits: Limits) -> None:
    """Header lines with folding (RFC 3261 §7.3.1) and length checks."""
    for line in lines[1:]:
        if len(line) > limits.max_line:
            raise SipParseError("header line too long")
        content = line[:-1] if line.endswith("\r") else line
        if content[:1] in (" ", "\t"):
            # folded continuation: joins the previous field
            if not fields:
                raise SipParseError("folded line before the first header")
            prev = fields[-1]
            prev.raw += line + "\n"
            extra = content.strip(" \t")
            if extra:
                prev.value = f"{prev.value} {extra}" if prev.value else extra
            if len(prev.raw) > limits.max_line * 4:
                raise SipParseError("header field too long")
            continue
        name, key = _field_name(content, content.find(":"))
        fields.append(HeaderField(name, content[content.find(":") + 1:].strip(" \t"), line + "\n", key))


def parse_message(data: bytes, *, datagram: bool = True,
                  limits: Limits = DEFAULT_LIMITS) -> SipMessage:
    """Parse one SIP message. `datagram` applies RFC 3261 §18.3: a
    Content-Length larger than the body is an error, a smaller one truncates
    the body, a missing one means the rest of the datagram."""
    if len(data) > limits.max_message:
        raise SipParseError("message too large")
    # RFC 3261 §7.5: CRLFs before the start line are ignored.
    if data[:1] in (b"\r", b"\n"):
        data = data.lstrip(b"\r\n")
    if not data:
        raise SipParseError("empty message")
    text = data.decode("latin-1")
    head_end, body_start = _find_header_end(text)
    if head_end < 0:
        raise SipParseError("truncated message: no end of header")
    lines = text[:head_end].split("\n")
    lines.pop()  # empty string after the final "\n"
    if len(lines) - 1 > limits.max_headers:
        raise SipParseError("too many header fields")
    first = lines[0]
    if len(first) > limits.max_line:
        raise SipParseError("start line too long")
    start = first[:-1] if first.endswith("\r") else first
    msg = parse_start_line(start)
    msg._start_raw = first + "\n"
    fields = msg.fields
    head = text[len(first) + 1:head_end]
    try:
        cl_values: set[str] = set()
        if "\n " in head or "\n\t" in head or head[:1] in (" ", "\t") or len(head) > limits.max_line:
            _parse_fields_slow(lines, fields, limits)
            cl_values = {f.value for f in fields if f.key == "content-length"}
        else:
            # the common case: no folded line, no line over the limit
            wire = _WIRE_NAMES
            append = fields.append
            for line in lines[1:]:
                colon = line.find(":")
                known = wire.get(line[:colon]) if colon > 0 else None
                name, key = known or _field_name(line, colon)
                value = (line[colon + 1:-1] if line[-1:] == "\r" else line[colon + 1:]).strip(" \t")
                append(HeaderField(name, value, line + "\n", key))
                if key == "content-length":
                    cl_values.add(value)
        msg._blank = text[head_end:body_start]
        body = data[body_start:]
        if cl_values:
            if len(cl_values) > 1:
                raise SipParseError("conflicting Content-Length headers")
            cl_text = cl_values.pop()
            if not is_digits(cl_text) or len(cl_text) > 9:
                raise SipParseError("bad Content-Length")
            cl = int(cl_text)
            if cl > len(body):
                raise SipParseError("Content-Length larger than body")
            if cl < len(body):
                body = body[:cl]
                data = data[:body_start + cl]
        elif not datagram:
            raise SipParseError("missing Content-Length on a stream")
    except SipParseError as exc:
        exc.message = msg
        raise
    msg.body = body
    msg._raw = data
    msg._dirty = False
    return msg


def make_response(request: SipRequest, status: int, reason: str, *,
                  to_tag: str | None = None, headers: list[tuple[str, str]] | tuple = (),
                  body: bytes = b"", content_type: str | None = None) -> SipResponse:
    """A response to `request` per RFC 3261 §8.2.6: Via, From, To, Call-ID
    and CSeq copied; a To-tag added when given and the To has none."""
    resp = SipResponse(status, reason)
    fields = resp.fields
    for f in request.fields:
        if f.key in ("via", "from", "call-id", "cseq"):
            fields.append(HeaderField(f.name, f.value))
        elif f.key == "to":
            value = f.value
            if to_tag and status > 100 and "tag" not in request.to.params:
                value = f"{value};tag={to_tag}"
            fields.append(HeaderField(f.name, value))
    for name, value in headers:
        fields.append(HeaderField(name, value))
    if content_type is not None:
        fields.append(HeaderField("Content-Type", content_type))
    fields.append(HeaderField("Content-Length", str(len(body))))
    resp.body = body
    return resp


def reason_phrase_safe(text: str) -> str:
    """A reason phrase cannot hold CR/LF; keep it printable and short."""
    cleaned = "".join(c if " " <= c <= "~" else " " for c in text)
    return cleaned[:120].strip() or "Bad Request"
