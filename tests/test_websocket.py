"""sipcore.websocket: the handshake and frames a SIP-over-WebSocket server
takes (RFC 6455, RFC 7118), and what it answers to ones it cannot."""
from __future__ import annotations

import base64
import hashlib
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from sipcore.websocket import BINARY, CLOSE, PING, PONG, TEXT, WsServer, frame

KEY = base64.b64encode(b"0123456789abcdef").decode()


def upgrade(protocol="sip", version="13", key=KEY, extra="") -> bytes:
    return (f"GET / HTTP/1.1\r\nHost: proxy.example.com\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n"
            f"Sec-WebSocket-Protocol: {protocol}\r\nOrigin: https://phone.example.com\r\n{extra}\r\n").encode()


def client_frame(payload: bytes, opcode=TEXT, fin=True, mask=None) -> bytes:
    """A frame as a browser sends it: masked."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    while data:
        opcode, n, at = data[0] & 0x0F, data[1] & 0x7F, 2
        assert not data[1] & 0x80, "a server frame is never masked"
        if n == 126:
            n, at = struct.unpack_from("!H", data, 2)[0], 4
        elif n == 127:
            n, at = struct.unpack_from("!Q", data, 2)[0], 10
        out.append((opcode, data[at:at + n]))
        data = data[at + n:]
    return out


def opened() -> WsServer:
    ws = WsServer(65535)
    fed = ws.feed(upgrade())
    assert not fed.close and fed.out[0].startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    return ws


def test_the_handshake_accepts_with_the_key_hash_and_the_sip_subprotocol():
    ws = WsServer(65535)
    fed = ws.feed(upgrade(protocol="chat, sip"))
    answer = fed.out[0].decode()
    accept = base64.b64encode(hashlib.sha1(KEY.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
    assert f"Sec-WebSocket-Accept: {accept}\r\n" in answer and "Sec-WebSocket-Protocol: sip\r\n" in answer
    assert ws.upgraded and not fed.close


@pytest.mark.parametrize("request_bytes, status", [
    (upgrade(protocol="chat"), b"400"),                                     # no sip subprotocol (RFC 7118)
    (upgrade(version="8"), b"426"),
    (upgrade(key="short"), b"400"),
    (upgrade().replace(b"Upgrade: websocket\r\n", b""), b"426"),
    (upgrade().replace(b"GET /", b"POST /"), b"400"),
    (b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 0\r\n\r\n", b"400"),        # SIP, not a WebSocket
])
def test_a_handshake_it_cannot_take_gets_an_http_error_and_a_close(request_bytes, status):
    ws = WsServer(65535)
    fed = ws.feed(request_bytes)
    assert fed.close and fed.out[0].startswith(b"HTTP/1.1 " + status) and not ws.upgraded
    assert fed.error.startswith("handshake: ")


def test_a_handshake_in_pieces_and_a_message_in_the_same_read():
    ws = WsServer(65535)
    data = upgrade() + client_frame(b"OPTIONS sip:a SIP/2.0\r\n\r\n")
    fed1, fed2 = ws.feed(data[:30]), ws.feed(data[30:])
    assert fed1.out == [] and fed2.out[0].startswith(b"HTTP/1.1 101")
    assert fed2.messages == [b"OPTIONS sip:a SIP/2.0\r\n\r\n"]


def test_messages_masked_fragmented_and_split_across_reads_come_out_whole():
    ws = opened()
    big = b"MESSAGE sip:b SIP/2.0\r\n\r\n" + b"x" * 70000 * 0 + b"y" * 300
    data = client_frame(big[:10], TEXT, fin=False) + client_frame(b"", PING) + client_frame(big[10:], 0)
    data += client_frame(b"BYE sip:c SIP/2.0\r\n\r\n")
    messages, out = [], []
    for i in range(0, len(data), 7):
        fed = ws.feed(data[i:i + 7])
        messages += fed.messages
        out += fed.out
        assert not fed.close
    assert messages == [big, b"BYE sip:c SIP/2.0\r\n\r\n"]
    assert server_frames(b"".join(out)) == [(PONG, b"")]          # a ping between fragments is answered


@pytest.mark.parametrize("data, why", [
    (client_frame(b"x")[:1] + bytes([1]) + b"x", "client frame not masked"),
    (bytes([0x80 | 0x40 | TEXT]) + client_frame(b"x")[1:], "reserved bits"),
    (client_frame(b"x", 0), "continuation of nothing"),
    (client_frame(b"x", TEXT, fin=False) + client_frame(b"y", TEXT), "a new message before"),
    (client_frame(b"x", 0x3), "unknown opcode 3"),
    (client_frame(b"p", PING, fin=False), "bad control frame"),
    (client_frame(b"z" * 2000), "message too big"),
])
def test_a_bad_frame_gets_a_close_with_its_status(data, why):
    ws = WsServer(1000)
    ws.feed(upgrade())
    fed = ws.feed(data)
    assert fed.close and why in fed.error
    (opcode, payload), = server_frames(fed.out[-1])
    assert opcode == CLOSE and struct.unpack("!H", payload[:2])[0] in (1002, 1009)
    assert ws.feed(client_frame(b"after")).messages == []          # nothing taken once closing


def test_a_close_is_echoed():
    ws = opened()
    fed = ws.feed(client_frame(struct.pack("!H", 1000) + b"bye", CLOSE))
    assert fed.close and server_frames(fed.out[0]) == [(CLOSE, struct.pack("!H", 1000))]


def test_server_frames_are_text_for_utf8_and_binary_otherwise_with_every_length_form():
    for n in (0, 125, 126, 65535, 65536):
        (opcode, payload), = server_frames(frame(b"a" * n))
        assert opcode == TEXT and len(payload) == n
    assert server_frames(frame(b"\xff\xfe"))[0][0] == BINARY


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 50))
def test_any_bytes_after_the_handshake_never_raise(junk, step):
    ws = opened()
    for i in range(0, len(junk), step):
        fed = ws.feed(junk[i:i + step])
        assert all(isinstance(m, bytes) for m in fed.messages)


@pytest.mark.parametrize("origin, status", [
    ("https://phone.example.com", b"101"), ("HTTPS://PHONE.EXAMPLE.COM/", b"101"),
    ("https://evil.example", b"403"), ("https://phone.example.com.evil.example", b"403"), ("null", b"403"),
])
def test_an_origin_list_lets_in_only_its_pages(origin, status):
    ws = WsServer(65535, frozenset({"https://phone.example.com"}))
    fed = ws.feed(upgrade().replace(b"Origin: https://phone.example.com", f"Origin: {origin}".encode()))
    assert fed.out[0].startswith(b"HTTP/1.1 " + status) and fed.close == fed.refused == (status == b"403")


def test_without_an_origin_list_any_page_and_no_origin_get_in():
    assert WsServer(65535).feed(upgrade()).out[0].startswith(b"HTTP/1.1 101")
    no_origin = upgrade().replace(b"Origin: https://phone.example.com\r\n", b"")
    assert WsServer(65535, frozenset({"https://x.example"})).feed(no_origin).out[0].startswith(b"HTTP/1.1 101")
