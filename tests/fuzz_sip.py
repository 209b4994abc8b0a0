"""Coverage-guided fuzzing (atheris) of everything that reads bytes from the
network: the parser, TCP framing, the proxy's byte paths and its handling
of whatever parses. Only SipParseError may come out.

    cp -r tests/fuzz_corpus /tmp/corpus    # libFuzzer adds what it finds to it
    .venv/bin/python tests/fuzz_sip.py -runs=200000 -max_len=2048 /tmp/corpus

A crash writes crash-<hash> here; keep it as a regression test in
test_message.py / test_hardening.py.
"""
from __future__ import annotations

import asyncio
import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports():
    from sipcore.errors import SipParseError
    from sipcore.framing import StreamFramer
    from sipcore.message import parse_message

from test_hardening import in_process_proxy  # noqa: E402

LOOP = asyncio.new_event_loop()
asyncio.set_event_loop(LOOP)
PROXY = in_process_proxy()


def one(data: bytes) -> None:
    try:
        for piece in StreamFramer().feed(data):
            if isinstance(piece, bytes):
                parse_message(piece, datagram=False)
    except SipParseError:
        pass
    # the byte paths (new INVITEs, requests in a dialog, a node's requests,
    # the overload refusal): they decline or relay, never raise
    for share in (0.0, 1.0):
        PROXY.refuse_share = share
        for src in (("192.0.2.7", 5060), ("127.0.0.1", 5070)):
            PROXY.fast_datagram(data, src, PROXY.transports[0])
    PROXY.refuse_share = 0.0
    PROXY.transports[0].sent.clear()
    try:
        msg = parse_message(data)
    except SipParseError:
        return
    LOOP.run_until_complete(route(msg))


async def route(msg) -> None:
    PROXY.on_message(msg, ("192.0.2.7", 5060), "udp")      # from outside
    PROXY.on_message(msg, ("127.0.0.1", 5070), "udp")      # from a node
    PROXY.transports[0].sent.clear()


def main() -> None:
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
