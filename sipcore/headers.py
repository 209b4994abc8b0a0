"""Structured views of the header values routing needs (RFC 3261 §20, §25).

Every function here takes an already unfolded header *value* (a str decoded
as latin-1, so bytes map 1:1 to characters) and returns a small immutable
view, or raises SipParseError naming what is wrong. Nothing here re-encodes:
the message keeps the original bytes, these views are only for reading, and
`str()` of a view is used only when a value must be written anew.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from .errors import SipParseError
from .expiring import remember

_WS = " \t"


def is_digits(text: str) -> bool:
    """1*DIGIT in the ABNF sense: ASCII 0-9 only (str.isdigit() also takes
    '²' and other Unicode digits, which int() then refuses)."""
    return text.isascii() and text.isdigit()


def hostport(addr: tuple[str, int]) -> str:
    """An address as host:port, an IPv6 one in brackets ([::1]:5060)."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip(host: str) -> bool:
    """Whether a host is an IP address (an IPv6 one in brackets or not),
    not a name to resolve."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


_TOKEN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")


def is_token(text: str) -> bool:
    """RFC 3261 token: ASCII only (a latin-1 byte such as 0xFF upper-cases to
    a character latin-1 cannot encode again)."""
    return bool(text) and _TOKEN.issuperset(text)


def split_commas(value: str) -> list[str]:
    """Split a comma-joined header value (RFC 3261 §7.3.1) outside quoted
    strings and angle brackets; empty elements are dropped."""
    if "," not in value:
        v = value.strip()
        return [v] if v else []
    if '"' not in value and "<" not in value:     # Via lists: nothing to skip over
        return [p for p in map(str.strip, value.split(",")) if p]
    out: list[str] = []
    start = 0
    in_quote = False
    in_angle = False
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if in_quote:
            if c == "\\":
                i += 1
            elif c == '"':
                in_quote = False
        elif c == '"':
            in_quote = True
        elif c == "<":
            in_angle = True
        elif c == ">":
            in_angle = False
        elif c == "," and not in_angle:
            part = value[start:i].strip()
            if part:
                out.append(part)
            start = i + 1
        i += 1
    if in_quote:
        raise SipParseError("unterminated quoted string")
    part = value[start:].strip()
    if part:
        out.append(part)
    return out


def split_params(text: str) -> dict[str, str | None]:
    """';name=value;flag' -> ordered dict with lower-cased names. The leading
    ';' is optional. Quoted values keep their quotes."""
    params: dict[str, str | None] = {}
    if not text:
        return params
    if '"' not in text:
        # fast path: no quoted values, so ';' and '=' cannot hide anywhere
        if " " not in text and "\t" not in text:
            # ... and no whitespace to strip or to find junk after
            for part in text.split(";"):
                if part:
                    name, sep, value = part.partition("=")
                    if not name:
                        raise SipParseError("parameter without a name")
                    params[name.lower()] = value if sep else None
            return params
        for part in text.split(";"):
            name, sep, value = part.partition("=")
            name = name.strip(_WS).lower()
            if not name:
                if sep or part.strip(_WS):
                    raise SipParseError("parameter without a name")
                continue
            if " " in name or "\t" in name:
                raise SipParseError(f"junk after parameter {name.split()[0]!r}")
            if sep:
                value = value.strip(_WS)
                if " " in value or "\t" in value:
                    raise SipParseError(f"junk after parameter {name!r}")
                params[name] = value
            else:
                params[name] = None
        return params
    i = 0
    n = len(text)
    while i < n:
        # skip separators and whitespace
        while i < n and (text[i] in _WS or text[i] == ";"):
            i += 1
        if i >= n:
            break
        j = i
        while j < n and text[j] not in "=;" + _WS:
            j += 1
        name = text[i:j].lower()
        while j < n and text[j] in _WS:
            j += 1
        if j < n and text[j] == "=":
            j += 1
            while j < n and text[j] in _WS:
                j += 1
            if j < n and text[j] == '"':
                k = j + 1
                while k < n and text[k] != '"':
                    if text[k] == "\\":
                        k += 1
                    k += 1
                if k >= n:
                    raise SipParseError("unterminated quoted parameter value")
                value = text[j:k + 1]
                j = k + 1
            else:
                k = j
                while k < n and text[k] not in ";" + _WS:
                    k += 1
                value = text[j:k]
                j = k
            if not name:
                raise SipParseError("parameter without a name")
            params[name] = value
        else:
            if not name:
                raise SipParseError("parameter without a name")
            params[name] = None
        while j < n and text[j] in _WS:
            j += 1
        if j < n and text[j] != ";":
            raise SipParseError(f"junk after parameter {name!r}")
        i = j
    return params


def format_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


# sent-by and URI host parts: every message of a call, and every call of
# a phone or trunk, repeat theirs (bounded: see remember)
_HOSTPORTS: dict[str, tuple[str, int | None]] = {}


def split_hostport(text: str) -> tuple[str, int | None]:
    """'host', 'host:port', '[v6]', '[v6]:port' -> (host, port). IPv6
    references keep their brackets (RFC 3261 §25.1 IPv6reference)."""
    known = _HOSTPORTS.get(text)
    if known is None:
        known = _split_hostport(text)
        remember(_HOSTPORTS, text, known)
    return known


def _split_hostport(text: str) -> tuple[str, int | None]:
    text = text.strip()
    if not text:
        raise SipParseError("empty host")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipParseError("unterminated IPv6 reference")
        host = text[:end + 1]
        rest = text[end + 1:]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise SipParseError("junk after IPv6 reference")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            _check_host(host)
            return host, None
        _check_host(host)
    port_text = port_text.strip()
    if not is_digits(port_text) or len(port_text) > 5 or int(port_text) > 65535:
        raise SipParseError(f"bad port {port_text!r}")
    return host, int(port_text)


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def _check_host(host: str) -> None:
    if not host or not _HOST_CHARS.issuperset(host):
        raise SipParseError(f"bad host {host!r}")


@dataclass(slots=True)
class SipUri:
    """sip: / sips: URI (RFC 3261 §19.1). Other schemes keep only `scheme`
    and `opaque`. `user` and `password` are unescaped; `raw` is the input."""
    scheme: str
    user: str | None = None
    password: str | None = None
    host: str = ""
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    headers: str = ""
    opaque: str = ""
    raw: str = ""

    @property
    def is_sip(self) -> bool:
        return self.scheme in ("sip", "sips")

    @property
    def transport(self) -> str:
        t = self.params.get("transport")
        if t:
            return t.lower()
        return "tls" if self.scheme == "sips" else "udp"

    @property
    def lr(self) -> bool:
        return "lr" in self.params

    def aor(self) -> str:
        """Address of record: scheme, user and host, no port or params,
        host lower-cased (RFC 3261 §10.3 step 5 compares such URIs)."""
        if not self.is_sip:
            return f"{self.scheme}:{self.opaque}"
        user = f"{self.user}@" if self.user else ""
        return f"{self.scheme}:{user}{self.host.lower()}"

    def __str__(self) -> str:
        return self.raw


_URI_FORBIDDEN = frozenset(' \t<>"')


def parse_uri(text: str) -> SipUri:
    text = text.strip()
    scheme, sep, rest = text.partition(":")
    if not sep or not scheme or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        raise SipParseError(f"bad URI {text[:64]!r}")
    scheme = scheme.lower()
    if scheme not in ("sip", "sips"):
        if not rest:
            raise SipParseError(f"empty {scheme} URI")
        return SipUri(scheme=scheme, opaque=rest, raw=text)
    if not _URI_FORBIDDEN.isdisjoint(rest):
        raise SipParseError(f"bad character in URI {text[:64]!r}")
    # '@' cannot appear unescaped in a SIP URI's host, parameters or headers
    # (RFC 3261 §25.1), so the last one ends the userinfo, which itself may
    # hold ';', '?', ':' and more.
    user = password = None
    at = rest.rfind("@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1:]
        if not userinfo:
            raise SipParseError("empty user part in URI")
        u, psep, p = userinfo.partition(":")
        try:
            user = unquote(u, errors="strict")
            password = unquote(p, errors="strict") if psep else None
        except UnicodeDecodeError as exc:
            raise SipParseError("bad escape in URI user part") from exc
    rest, _, headers = rest.partition("?")
    hostport, _, param_text = rest.partition(";")
    host, port = split_hostport(hostport)
    params = split_params(param_text)
    return SipUri(scheme=scheme, user=user, password=password, host=host, port=port,
                  params=params, headers=headers, raw=text)


@dataclass(slots=True)
class Via:
    """One via-parm (RFC 3261 §20.42)."""
    protocol: str       # "SIP/2.0"
    transport: str      # upper case: UDP, TCP, TLS, SCTP, WS ...
    host: str
    port: int | None
    params: dict[str, str | None]
    raw: str

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> int | None:
        v = self.params.get("rport")
        return int(v) if v and is_digits(v) else None

    @property
    def maddr(self) -> str | None:
        return self.params.get("maddr")

    @property
    def behind_nat(self) -> bool:
        """Whether the sender came from another address or port than it
        says (the received/rport a server stamped differ): a NAT between."""
        received, rport = self.received, self.rport
        return ((received is not None and received != self.host.strip("[]"))
                or (rport is not None and rport != (self.port or 5060)))

    def response_target(self) -> tuple[str, int]:
        """Where a response to this hop goes (RFC 3261 §18.2.2, RFC 3581 §4):
        maddr, then received (+ rport), then sent-by."""
        default = 5061 if self.transport == "TLS" else 5060
        host = self.maddr or self.received or self.host
        if host.startswith("["):
            host = host[1:-1]
        port = self.rport or self.port or default
        return host, port


# "SIP/2.0/UDP host:port;params" with no whitespace but the one space: what
# nearly every Via looks like, so it skips the character walk below.
_VIA_COMMON = re.compile(r"SIP/2\.0/([A-Za-z]+) ([^;\s]+)(?:;(\S*))?")


def parse_via(value: str) -> Via:
    # sent-protocol = protocol-name SLASH protocol-version SLASH transport,
    # with LWS allowed around the slashes (SLASH = SWS "/" SWS).
    text = value.strip()
    m = _VIA_COMMON.fullmatch(text)
    if m is not None:
        host, port = split_hostport(m.group(2))
        return Via("SIP/2.0", m.group(1).upper(), host, port, split_params(m.group(3) or ""), text)
    parts = []
    i = 0
    for _ in range(3):
        j = i
        while j < len(text) and text[j] not in "/" + _WS:
            j += 1
        parts.append(text[i:j])
        while j < len(text) and text[j] in _WS:
            j += 1
        if len(parts) < 3:
            if j >= len(text) or text[j] != "/":
                raise SipParseError("bad Via sent-protocol")
            j += 1
            while j < len(text) and text[j] in _WS:
                j += 1
        i = j
    name, version, transport = parts
    if name.upper() != "SIP" or not is_token(version) or not is_token(transport):
        raise SipParseError("bad Via sent-protocol")
    rest = text[i:].strip()
    sent_by, _, param_text = rest.partition(";")
    host, port = split_hostport(sent_by)
    return Via(protocol=f"{name}/{version}", transport=transport.upper(), host=host, port=port,
               params=split_params(param_text), raw=value.strip())


@dataclass(slots=True)
class NameAddr:
    """From / To / Contact / Route / Record-Route / Path value
    (RFC 3261 §20.10): optional display name, URI, header parameters."""
    display: str | None
    uri: str
    params: dict[str, str | None]
    raw: str
    wildcard: bool = False   # Contact: *

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    @property
    def parsed_uri(self) -> SipUri:
        return parse_uri(self.uri)

    @property
    def expires(self) -> int | None:
        v = self.params.get("expires")
        return int(v) if v and is_digits(v) else None

    def __str__(self) -> str:
        return self.raw


# name-addr values parsed: a call's messages repeat their From, To,
# Contact and Record-Route, and a phone's calls theirs. What it returns is
# shared, so read only (nothing changes a NameAddr: a new value is a new
# parse).
_NAME_ADDRS: dict[str, NameAddr] = {}


def parse_name_addr(value: str) -> NameAddr:
    known = _NAME_ADDRS.get(value)
    if known is None:
        known = _parse_name_addr(value)
        remember(_NAME_ADDRS, value, known)
    return known


def _parse_name_addr(value: str) -> NameAddr:
    text = value.strip()
    if text == "*":
        return NameAddr(display=None, uri="*", params={}, raw=text, wildcard=True)
    display = None
    lt = -1
    if text.startswith('"'):
        k = 1
        while k < len(text) and text[k] != '"':
            if text[k] == "\\":
                k += 1
            k += 1
        if k >= len(text):
            raise SipParseError("unterminated quoted display name")
        display = text[1:k].replace('\\"', '"').replace("\\\\", "\\")
        lt = text.find("<", k + 1)
        if lt < 0:
            raise SipParseError("display name without <URI>")
        if text[k + 1:lt].strip():
            raise SipParseError("junk between display name and <URI>")
    else:
        lt = text.find("<")
        if lt > 0:
            display = text[:lt].strip() or None
    if lt >= 0:
        gt = text.find(">", lt)
        if gt < 0:
            raise SipParseError("unterminated <URI>")
        uri = text[lt + 1:gt].strip()
        param_text = text[gt + 1:]
    else:
        # addr-spec without brackets: parameters after it belong to the header
        # (RFC 3261 §20.10), and the URI cannot carry params or headers.
        semi = text.find(";")
        uri, param_text = (text, "") if semi < 0 else (text[:semi], text[semi:])
        uri = uri.strip()
    if not uri:
        raise SipParseError("empty URI")
    param_text = param_text.strip()
    if param_text and not param_text.startswith(";"):
        raise SipParseError("junk after URI")
    scheme, colon, _ = uri.partition(":")
    if not colon or not scheme or not _URI_FORBIDDEN.isdisjoint(uri):
        raise SipParseError(f"bad URI {uri[:64]!r}")
    return NameAddr(display=display, uri=uri, params=split_params(param_text), raw=text)


def parse_max_forwards(value: str) -> int:
    """Max-Forwards = 1*DIGIT (RFC 3261 §20.22); more than 255 is refused."""
    if not is_digits(value) or len(value) > 10 or int(value) > 255:
        raise SipParseError("bad Max-Forwards")
    return int(value)


def parse_cseq(value: str) -> tuple[int, str]:
    num, _, method = value.strip().partition(" ")
    method = method.strip()
    if not is_digits(num) or len(num) > 10 or int(num) > 2**31 - 1:
        raise SipParseError("bad CSeq number")
    if not method or not method.isascii() or " " in method or "\t" in method:
        raise SipParseError("bad CSeq method")
    return int(num), method
