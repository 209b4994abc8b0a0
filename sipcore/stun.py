"""STUN Binding on a SIP UDP port: the keep-alive of SIP outbound.

A phone that registered with SIP outbound (RFC 5626 §4.4.2) over UDP keeps
its NAT binding open, and checks its flow, with STUN Binding requests
(RFC 5389) sent to the SIP port it registered through. A SIP message
starts with a letter or a CR/LF, a STUN message with two zero bits and
has the magic cookie at bytes 4-7 (RFC 5626 §8), so one socket carries
both. `answer()` builds the server's reply from the request and the
address it came from:

- a Binding request: a success response with XOR-MAPPED-ADDRESS (where
  the phone is seen from here: a change tells it its NAT moved);
- a request whose attributes are cut short or of another method: an
  error response 400; one with an attribute we must understand but do
  not (types below 0x8000, RFC 5389 §7.3.1): 420 with UNKNOWN-ATTRIBUTES;
- an indication, a response, a FINGERPRINT that does not match, or a
  message that is not RFC 5389 STUN at all: None (nothing is sent).

The response carries a FINGERPRINT when the request did. No
authentication: a keep-alive is not authenticated (RFC 5626 §8).
"""
from __future__ import annotations

import ipaddress
import struct
import zlib

MAGIC = b"\x21\x12\xa4\x42"
HEADER = 20
BINDING = 0x001
REQUEST, INDICATION, SUCCESS, ERROR = 0x000, 0x010, 0x100, 0x110
XOR_MAPPED_ADDRESS = 0x0020
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
FINGERPRINT = 0x8028
FINGERPRINT_XOR = 0x5354554E
# comprehension-required attributes a Binding request may carry that a
# server without authentication accepts (RFC 5389 §15, RFC 8445 §16.1 for
# ICE's PRIORITY and USE-CANDIDATE); any other below 0x8000 gets 420
UNDERSTOOD = {0x0001, 0x0006, 0x0008, 0x0009, 0x000A, 0x0014, 0x0015, 0x0020, 0x0024, 0x0025}


def is_stun(data: bytes) -> bool:
    """Whether a datagram has the shape of an RFC 5389 STUN message (and
    so is not SIP)."""
    return len(data) >= HEADER and data[0] < 0x40 and data[4:8] == MAGIC


def _attr(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + b"\x00" * (-len(value) % 4)


def _message(kind: int, txid: bytes, attrs: bytes, fingerprint: bool) -> bytes:
    if not fingerprint:
        return struct.pack("!HH", kind, len(attrs)) + MAGIC + txid + attrs
    head = struct.pack("!HH", kind, len(attrs) + 8) + MAGIC + txid + attrs
    crc = (zlib.crc32(head) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
    return head + _attr(FINGERPRINT, struct.pack("!I", crc))


def _xor_mapped(source: tuple[str, int], txid: bytes) -> bytes | None:
    try:
        ip = ipaddress.ip_address(source[0].split("%", 1)[0].strip("[]"))
    except ValueError:
        return None
    mask = MAGIC if ip.version == 4 else MAGIC + txid
    xaddr = bytes(a ^ b for a, b in zip(ip.packed, mask))
    return struct.pack("!BBH", 0, 1 if ip.version == 4 else 2, source[1] ^ 0x2112) + xaddr


def _error(txid: bytes, code: int, reason: str, fingerprint: bool, extra: bytes = b"") -> bytes:
    value = struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode()
    return _message(BINDING | ERROR, txid, _attr(ERROR_CODE, value) + extra, fingerprint)


def answer(data: bytes, source: tuple[str, int]) -> bytes | None:
    """The reply to a STUN message `data` from `source`, or None."""
    if not is_stun(data):
        return None
    kind, length = struct.unpack_from("!HH", data)
    if length != len(data) - HEADER or length % 4:
        return None
    txid = data[8:HEADER]
    method = (kind & 0x000F) | ((kind & 0x00E0) >> 1) | ((kind & 0x3E00) >> 2)
    klass = kind & 0x0110
    attrs: list[tuple[int, int]] = []       # (type, offset of the attribute)
    at, cut = HEADER, False
    while at < len(data):
        if at + 4 > len(data):
            cut = True
            break
        atype, alen = struct.unpack_from("!HH", data, at)
        if at + 4 + alen > len(data):
            cut = True
            break
        attrs.append((atype, at))
        at += 4 + alen + (-alen % 4)
    fingerprint = bool(attrs) and attrs[-1][0] == FINGERPRINT
    if fingerprint:
        at = attrs[-1][1]
        (crc,) = struct.unpack_from("!I", data, at + 4)
        if (zlib.crc32(data[:at]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF != crc:
            return None                     # not STUN after all, or damaged
    if klass != REQUEST:
        return None                         # indications and responses get no reply
    if cut:
        return _error(txid, 400, "Bad Request (attributes cut short)", fingerprint)
    if method != BINDING:
        return _error(txid, 400, "Bad Request (only Binding is served here)", fingerprint)
    unknown = [t for t, _ in attrs if t < 0x8000 and t not in UNDERSTOOD]
    if unknown:
        listed = b"".join(struct.pack("!H", t) for t in unknown[:16])
        return _error(txid, 420, "Unknown Attribute", fingerprint, _attr(UNKNOWN_ATTRIBUTES, listed))
    mapped = _xor_mapped(source, txid)
    if mapped is None:
        return None
    return _message(BINDING | SUCCESS, txid, _attr(XOR_MAPPED_ADDRESS, mapped), fingerprint)
