"""Parser throughput: parse + routing fields + serialize of a typical
~800-byte INVITE, in messages per second (a measurement, not a test).

    .venv/bin/python bench/parse_bench.py [--seconds 3]
"""
from __future__ import annotations

import argparse
import time

from sipcore.bekey import bekey_of, read_stamp
from sipcore.message import parse_message

INVITE = (
    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK776asdhds;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>\r\n"
    b"From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@pc33.atlanta.example.com;transport=udp>\r\n"
    b"Allow: INVITE, ACK, CANCEL, OPTIONS, BYE, REFER, NOTIFY, MESSAGE, SUBSCRIBE, INFO, UPDATE\r\n"
    b"Supported: replaces, timer, path\r\n"
    b"User-Agent: Example Softphone 5.2.1 (Linux)\r\n"
    b"Session-Expires: 1800;refresher=uac\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 290\r\n"
    b"\r\n"
    b"v=0\r\no=alice 2890844526 2890844526 IN IP4 pc33.atlanta.example.com\r\ns=Session SDP\r\n"
    b"c=IN IP4 192.0.2.101\r\nt=0 0\r\nm=audio 49172 RTP/AVP 0 8 18 101\r\na=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:8 PCMA/8000\r\na=rtpmap:18 G729/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-15\r\na=ptime:20\r\na=sendrecv\r\na=rtcp:49173\r\n"
)


def once(secret: bytes) -> bytes:
    m = parse_message(INVITE)
    m.check()
    key = read_stamp(secret, m.to.tag) or read_stamp(secret, m.from_.tag) or bekey_of(m.call_id)
    m.set("Max-Forwards", str(m.max_forwards - 1))
    m.add_top("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKsph" + key[:10])
    return m.to_bytes()


def rate(fn, seconds: float) -> float:
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(1000):
            fn()
        n += 1000
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    assert len(INVITE) > 780, len(INVITE)
    print(f"message: {len(INVITE)} bytes INVITE")
    print(f"parse only:                         {rate(lambda: parse_message(INVITE), args.seconds):>10,.0f} msg/s")
    print(f"parse + routing fields + serialize: {rate(lambda: once(b'secret'), args.seconds):>10,.0f} msg/s")


if __name__ == "__main__":
    main()
