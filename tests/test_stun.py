"""STUN Binding on the SIP UDP port (RFC 5389, for RFC 5626 §8): what
sipcore.stun answers, checked against the test vectors of RFC 5769 and
a decoder written here from RFC 5389 §6 and §15."""
from __future__ import annotations

import os
import struct
import zlib

import pytest

from sipcore import stun

# RFC 5769 §2.2 / §2.3: the transaction and the mapped address of the
# sample responses, and their XOR-MAPPED-ADDRESS attributes byte for byte
TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
XMA_V4 = bytes.fromhex("00200008" "0001a147e112a643")
XMA_V6 = bytes.fromhex("00200014" "0002a147" "0113a9faa5d3f179bc25f4b5bed2b9d9")


def request(attrs: bytes = b"", *, kind: int = 0x0001, txid: bytes = TXID, fingerprint: bool = False) -> bytes:
    length = len(attrs) + (8 if fingerprint else 0)
    head = struct.pack("!HH", kind, length) + b"\x21\x12\xa4\x42" + txid + attrs
    if fingerprint:
        crc = (zlib.crc32(head) ^ 0x5354554E) & 0xFFFFFFFF
        head += struct.pack("!HHI", 0x8028, 4, crc)
    return head


def attributes(msg: bytes) -> list[tuple[int, bytes]]:
    kind, length = struct.unpack_from("!HH", msg)
    assert length == len(msg) - 20 and length % 4 == 0 and msg[4:8] == b"\x21\x12\xa4\x42"
    out, at = [], 20
    while at < len(msg):
        t, n = struct.unpack_from("!HH", msg, at)
        out.append((t, msg[at + 4:at + 4 + n]))
        at += 4 + n + (-n % 4)
    assert at == len(msg)
    return out


def test_binding_answered_with_the_rfc_5769_mapped_address_v4_and_v6():
    v4 = stun.answer(request(), ("192.0.2.1", 32853))
    assert v4[:2] == b"\x01\x01" and v4[8:20] == TXID
    assert v4[20:] == XMA_V4
    v6 = stun.answer(request(), ("2001:db8:1234:5678:11:2233:4455:6677", 32853))
    assert v6[:2] == b"\x01\x01" and v6[20:] == XMA_V6
    # a source as asyncio gives it for a link-local peer, scope and all
    assert stun.answer(request(), ("fe80::1%lo", 5060)) is not None


def test_fingerprint_mirrored_and_checked():
    resp = stun.answer(request(fingerprint=True), ("127.0.0.1", 5070))
    (t1, _), (t2, crc) = attributes(resp)
    assert (t1, t2) == (0x0020, 0x8028)
    assert struct.unpack("!I", crc)[0] == (zlib.crc32(resp[:-8]) ^ 0x5354554E) & 0xFFFFFFFF
    bad = bytearray(request(fingerprint=True))
    bad[-1] ^= 1
    assert stun.answer(bytes(bad), ("127.0.0.1", 5070)) is None
    assert len(attributes(stun.answer(request(), ("127.0.0.1", 5070)))) == 1   # none asked, none sent


def test_attributes_understood_or_refused():
    # ICE's PRIORITY and an optional SOFTWARE: answered as any binding
    ice = struct.pack("!HHI", 0x0024, 4, 1) + struct.pack("!HH", 0x8022, 5) + b"phone\x00\x00\x00"
    assert stun.answer(request(ice), ("127.0.0.1", 1))[:2] == b"\x01\x01"
    # a comprehension-required attribute we do not know: 420 naming it
    resp = stun.answer(request(struct.pack("!HHI", 0x0042, 4, 0)), ("127.0.0.1", 1))
    assert resp[:2] == b"\x01\x11" and resp[8:20] == TXID
    attrs = dict(attributes(resp))
    assert attrs[0x0009][2:4] == bytes([4, 20]) and attrs[0x000A] == b"\x00\x42"
    # attributes cut short: 400 with its reason
    resp = stun.answer(request(struct.pack("!HH", 0x0024, 8) + b"\x00" * 4), ("127.0.0.1", 1))
    code = dict(attributes(resp))[0x0009]
    assert code[2:4] == bytes([4, 0]) and b"cut short" in code[4:]
    # another method (Allocate, a TURN request) is not served here
    resp = stun.answer(request(kind=0x0003), ("127.0.0.1", 1))
    assert dict(attributes(resp))[0x0009][2:4] == bytes([4, 0])


@pytest.mark.parametrize("data", [
    request(kind=0x0011),                       # a Binding indication (ICE keep-alive): no reply
    request(kind=0x0101),                       # a response
    request()[:-1],                             # shorter than its header
    request() + b"\x00\x00\x00\x00",            # length field says 0, 4 bytes follow
    b"\x00\x01\x00\x00" + b"\x00" * 16,         # no magic cookie (RFC 3489): not ours to answer
    b"OPTIONS sip:a@b SIP/2.0\r\n\r\n",         # SIP
    b"\r\n\r\n",                                # a CRLF keep-alive
    b"",
])
def test_not_answered(data):
    assert stun.answer(data, ("127.0.0.1", 5060)) is None


def test_random_input_never_raises():
    rnd = __import__("random").Random(5389)
    for _ in range(3000):
        body = bytes(rnd.getrandbits(8) for _ in range(rnd.choice((0, 4, 8, 12, 20, 33))))
        data = struct.pack("!HH", rnd.choice((0x0001, 0x0011, rnd.getrandbits(14))), len(body)) \
            + b"\x21\x12\xa4\x42" + os.urandom(12) + body
        stun.answer(data, ("127.0.0.1", 9))
        stun.answer(data[:rnd.randrange(len(data) + 1)], ("::1", 9))
