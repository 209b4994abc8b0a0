"""sipcore.framing: splitting a TCP stream into messages (RFC 3261 §18.3, RFC 5626)."""
from __future__ import annotations

import pytest

from sipcore.framing import PING, FramingError, StreamFramer
from sipcore.message import Limits, parse_message
from sipmsgs import INVITE, RESPONSE, request


def test_pipelined_messages_come_out_one_by_one():
    f = StreamFramer()
    out = f.feed(INVITE + RESPONSE + INVITE)
    assert out == [INVITE, RESPONSE, INVITE]
    assert f.buffered == 0


def test_partial_reads_byte_by_byte():
    f = StreamFramer()
    got = []
    for i in range(len(INVITE)):
        got += f.feed(INVITE[i:i + 1])
    assert got == [INVITE]
    assert parse_message(got[0], datagram=False).to_bytes() == INVITE


def test_double_crlf_is_a_ping_and_single_crlfs_between_messages_are_skipped():
    f = StreamFramer()
    assert f.feed(b"\r\n\r\n") == [PING]
    assert f.feed(b"\r\n" + RESPONSE) == [RESPONSE]


def test_missing_content_length_loses_framing():
    with pytest.raises(FramingError, match="missing Content-Length"):
        StreamFramer().feed(request(cl=False))


@pytest.mark.parametrize("value", [b"-1", b"abc", b"99999999999"])
def test_bad_content_length_loses_framing(value):
    with pytest.raises(FramingError, match="bad Content-Length"):
        StreamFramer().feed(request().replace(b"Content-Length: 0", b"Content-Length: " + value))


def test_huge_content_length_is_refused_before_buffering():
    with pytest.raises(FramingError, match="too large"):
        StreamFramer().feed(request().replace(b"Content-Length: 0", b"Content-Length: 900000"))


def test_endless_header_is_bounded():
    f = StreamFramer(Limits(max_message=4096))
    with pytest.raises(FramingError, match="header too large"):
        for _ in range(100):
            f.feed(b"X-Junk: " + b"a" * 100 + b"\r\n")


def test_compact_content_length_frames_too():
    raw = request(body=b"abc").replace(b"Content-Length: 3", b"l : 3")
    assert StreamFramer().feed(raw + raw) == [raw, raw]
