"""In-process nodes (node.app.Node) against real redis-servers, one each,
with what each node sends captured instead of leaving on the wire; and
the messages a proxy would hand them."""
from __future__ import annotations

import asyncio

import node.app
from node.app import Node
from sipcore.bekey import ROUTE_HEADER, bekey_of
from sipcore.config import load_config
from sipcore.message import SipMessage, make_response, parse_message
from procs import start_redis
from sipha.sipp import free_port

PROXY = "127.0.0.1:5999"
CALL_ID = "hang-1@192.0.2.50"
# what on_message gets with a message from the proxy
UDP = (("127.0.0.1", 5999), "udp")


SDP = b"v=0\r\no=alice 1 1 IN IP4 192.0.2.50\r\ns=-\r\nc=IN IP4 192.0.2.50\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


def caller_invite(bekey: str, ruri: str = f"sip:service@{PROXY}", sdp: bytes = b"") -> bytes:
    """The caller's INVITE as the proxy hands it on; with `sdp`, an offer
    (without, a delayed offer: the caller answers in its ACK)."""
    ctype = "Content-Type: application/sdp\r\n" if sdp else ""
    return (f"INVITE {ruri} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {PROXY};branch=z9hG4bKsphproxy1\r\n"
            f"Via: SIP/2.0/UDP 192.0.2.50:5070;branch=z9hG4bKcaller1;rport=5070;received=192.0.2.50\r\n"
            f"Record-Route: <sip:{PROXY};lr;flow=udp:192.0.2.50:5070>\r\n"
            f"Max-Forwards: 69\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:service@example.com>\r\n"
            f"Call-ID: {CALL_ID}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@192.0.2.50:5070>\r\n"
            f"{ROUTE_HEADER}: bekey={bekey};owner=node1;partner=node2;reason=owner\r\n"
            f"{ctype}Content-Length: {len(sdp)}\r\n\r\n").encode() + sdp


def with_nodes(tmp_path, count: int, scenario, settings: dict | None = None):
    """Run `await scenario(nodes, sent)` with `count` nodes (node1, node2...),
    each on its own real redis-server, configured with `settings` on top;
    what each node sends is parsed into sent[node] instead of leaving on
    the wire. -> what scenario returned."""
    ports = [free_port() for _ in range(count)]
    redis = []
    for i, port in enumerate(ports):
        (tmp_path / str(i)).mkdir()
        redis.append(start_redis(port, tmp_path / str(i)))

    async def go():
        cfg = load_config(None, overrides={"node.admin": "off", "node.upstream": "sip:service@127.0.0.1:5998",
                                           "proxy.internal": PROXY, **(settings or {})},
                          nodes=[f"node{i + 1}=127.0.0.1:{7001 + i},redis://127.0.0.1:{port}/0"
                                 for i, port in enumerate(ports)])
        nodes = [Node(cfg, f"node{i + 1}") for i in range(count)]
        sent = {n: [] for n in nodes}
        for n in nodes:
            n.tx._send = lambda data, dest, n=n: sent[n].append(parse_message(data))
        try:
            return await scenario(nodes, sent)
        finally:
            for n in nodes:
                n.tx.close()
                await n.store.close()

    try:
        return asyncio.run(go())
    finally:
        for p in redis:
            p.kill()
            p.wait()


def probe(down: str = "") -> bytes:
    """The proxy's health probe, naming the nodes it sees down."""
    told = f"X-Sipha-Down: {down}\r\n" if down else ""
    return (f"OPTIONS sip:127.0.0.1:7002 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKsiphaprobe7\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:sipha-proxy@127.0.0.1>;tag=p1\r\nTo: <sip:127.0.0.1:7002>\r\n"
            f"Call-ID: probe-node2-p1@sipha\r\nCSeq: 7 OPTIONS\r\n{told}Content-Length: 0\r\n\r\n").encode()


def of_method(msgs, method: str) -> list:
    return [m for m in msgs if getattr(m, "method", None) == method]


def of_status(msgs, status: int) -> list:
    return [m for m in msgs if getattr(m, "status", None) == status]


async def settled(node: Node) -> None:
    """Until what on_message spawned on `node` has run."""
    await asyncio.sleep(0)
    while node.inflight:
        await asyncio.sleep(0.01)


async def dies_and_is_taken_over(owner: Node, partner: Node, back: str, monkeypatch) -> None:
    """`owner` dies (node1); its partner takes its calls on (back
    "partner"), or it restarts with its Redis (back "restart": what it
    had in memory gone, `monkeypatch`'s patches undone); and what is
    still unanswered is sent again (node.app.SEND_AGAIN_AFTER, 5 s,
    made 50 ms)."""
    owner.tx.close()
    if back == "restart":
        monkeypatch.undo()
        owner.tx.client.clear()
        owner.tx.start()
    monkeypatch.setattr(node.app, "SEND_AGAIN_AFTER", 0.05)
    await (owner.take_over(None) if back == "restart" else partner.take_over("node1"))
    await asyncio.sleep(0.1)
    await settled(partner)


def in_dialog(method: str, cseq: int, call_id: str, from_tag: str, to_tag: str, branch: str) -> SipMessage:
    """A request within a dialog as the proxy hands it to a node."""
    return parse_message((
        f"{method} sip:node@127.0.0.1:7001 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {PROXY};branch=z9hG4bKsph{branch}\r\nVia: SIP/2.0/UDP 192.0.2.70:5060;branch={branch}\r\n"
        f"Max-Forwards: 69\r\nFrom: <sip:someone@example.com>;tag={from_tag}\r\nTo: <sip:other@example.com>;tag={to_tag}\r\n"
        f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContact: <sip:someone@192.0.2.70:5060>\r\n"
        f"Content-Length: 0\r\n\r\n").encode())


def callee_says(b_invite: SipMessage, status: int, reason: str) -> SipMessage:
    """The callee's answer to a node's B-leg INVITE (its tag callee-1)."""
    return make_response(b_invite, status, reason, to_tag="callee-1",
                         headers=[("Contact", "<sip:service@127.0.0.1:5998>")])


async def calling(owner: Node, sent, call_id: str = CALL_ID) -> tuple[str, SipMessage]:
    """The caller's INVITE (with an offer) taken by `owner` -> (bekey, the
    B-leg INVITE it sent the callee: the one whose Call-ID carries that
    BEKey, whatever else `owner` sent)."""
    bekey = bekey_of(call_id)
    await owner.new_call(parse_message(caller_invite(bekey, sdp=SDP).replace(CALL_ID.encode(), call_id.encode())),
                         bekey)
    b_invite, = [m for m in of_method(sent[owner], "INVITE") if m.call_id.startswith("sph" + bekey)]
    return bekey, b_invite


async def answered_call(owner: Node, sent) -> tuple[str, SipMessage, SipMessage]:
    """A call set up on `owner` -> (bekey, its 200 to the caller, its B-leg INVITE)."""
    bekey = bekey_of(CALL_ID)
    await owner.new_call(parse_message(caller_invite(bekey)), bekey)
    b_invite, = of_method(sent[owner], "INVITE")
    await owner.on_invite_response(bekey, b_invite.top_via.branch, callee_says(b_invite, 200, "OK"))
    ok, = of_status(sent[owner], 200)
    return bekey, ok, b_invite


def with_headers(msg, headers: list[tuple[str, str]], body: bytes = b"", ctype: str = "") -> SipMessage:
    """`msg` (a message or its bytes) with `headers` added, and a body."""
    data = msg if isinstance(msg, bytes) else msg.to_bytes()
    head = data.split(b"Content-Length:", 1)[0]
    extra = "".join(f"{n}: {v}\r\n" for n, v in headers) + (f"Content-Type: {ctype}\r\n" if ctype else "")
    return parse_message(head + extra.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def register(user: str, contacts: list[str]) -> SipMessage:
    """`user`@example.com registering `contacts` for 300 s."""
    return parse_message(
        f"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.60:5060;branch=z9hG4bKreg{user}\r\n"
        f"From: <sip:{user}@example.com>;tag=r1\r\nTo: <sip:{user}@example.com>\r\nCall-ID: reg-{user}\r\n"
        f"CSeq: 1 REGISTER\r\nContact: {', '.join(contacts)}\r\nExpires: 300\r\nContent-Length: 0\r\n\r\n".encode())

