"""node.app: the caller's INVITE, rebuilt from the call record to answer
it, is parsed once per call and never served for a record that differs
(a partner's copy after a failover, a record read back from Redis)."""
from __future__ import annotations

import asyncio
import json

from node.app import Node
from sipcore.config import load_config
from sipcore.message import make_response


def record(via_branch: str = "z9hG4bK1") -> dict:
    return {"a": {"cid": "c1@192.0.2.50", "tgt": "sip:alice@192.0.2.50:5070"},
            "ah": [["Via", f"SIP/2.0/UDP 10.0.0.1:5060;branch={via_branch}"],
                   ["From", "<sip:alice@example.com>;tag=a1"], ["To", "<sip:bob@example.com>"],
                   ["Call-ID", "c1@192.0.2.50"], ["CSeq", "1 INVITE"]]}


def test_the_callers_invite_is_parsed_once_per_call_and_only_reused_for_the_same_record():
    async def go():
        cfg = load_config(None, overrides={"node.admin": "off"},
                          nodes=["node1=127.0.0.1:0,redis://127.0.0.1:1/0"])
        n = Node(cfg, "node1")
        try:
            first = n.a_invite(record())
            again = n.a_invite(json.loads(json.dumps(record())))      # as read back from Redis
            other = n.a_invite(record("z9hG4bK2"))                    # same call, other headers
            answer = make_response(again, 180, "Ringing", to_tag="b1")
            return first, again, other, answer
        finally:
            await n.store.close()
    first, again, other, answer = asyncio.run(go())
    assert again is first and other is not first
    assert other.top_via.branch == "z9hG4bK2" and first.top_via.branch == "z9hG4bK1"
    assert answer.get("To") == "<sip:bob@example.com>;tag=b1" and first.get("To") == "<sip:bob@example.com>"
