"""Whatever parses reaches a node's B2BUA and registrar logic: every
request and answer of a call, with one field bent out of shape at a time
(emptied, doubled, cut short, numbers out of range, URIs that are not
URIs, a body that is not SDP), given to a node that holds the call in a
real Redis. The node must answer (400, 481, 500 at worst) or drop, and
never fail on it: no `internal_error`, no stack trace, and the call it
holds must still hang up cleanly afterwards."""
from __future__ import annotations

import logging
import random

from nodekit import PROXY, SDP, UDP, callee_says, calling, in_dialog, of_status, settled, with_nodes
from sipcore.bekey import ROUTE_HEADER, bekey_of
from sipcore.errors import SipParseError
from sipcore.message import SipMessage, parse_message

ODD_VALUES = [
    "", " ", "0", "-1", "4294967296", "99999999999999999999", "<>", "<sip:>", "sip:", "<sip:a@b", ";tag=",
    "<sip:x@[::1]:99999>", "*", '"unterminated <sip:a@b>', "a, b, , c", "x" * 600, "INVITE", "1 FOO",
    "<sip:a@b>;tag=a1;tag=a2", "sip:a@b;maddr=;transport=", "\u00ff\u00fe", "1 INVITE", "2 BYE",
    "SIP/2.0/UDP", "SIP/2.0/UDP 192.0.2.1:0;branch=", "<tel:+1>", "application/sdp", "100rel, timer",
    "timer", "90;refresher=nobody", "0;refresher=uas", "1 1 INVITE", "RSeq", "active;expires=-5",
]
# fields a request or an answer may carry, some of them broken: added one at a time
EXTRA_FIELDS = [
    "Require: 100rel", "Require: timer", "Require: foo", "Proxy-Require: foo", "Supported: ",
    "Replaces: hang-1@192.0.2.50;to-tag=x;from-tag=y", "Replaces: ;early-only", "RAck: 1 1 INVITE",
    "RAck: x y z", "RSeq: -1", "Session-Expires: 1", "Session-Expires: abc;refresher=uas", "Min-SE: -1",
    "Event: refer", "Event: ", "Refer-To: <sip:x@y>", "Refer-To: garbage", "Refer-To: <sip:x@y?Replaces=bad%>",
    "Referred-By: <", "Subscription-State: terminated", "Subscription-State: active;expires=abc",
    "Expires: 0", "Expires: 99999999999", "Reason: Q.850;cause=99999999999", 'Reason: SIP ;cause=abc;text="x',
    "P-Asserted-Identity: garbage", "Privacy: id", "Diversion: <sip:x>;reason=", "Target-Dialog: x;local-tag=",
    "Call-Info: <x>;answer-after=-1", "Content-Type: multipart/mixed;boundary=", "Accept: */*",
    "Allow-Events: presence, , dialog", "Authorization: Digest realm=, nonce", "Retry-After: x",
]
BODIES = [b"", b"v=0\r\n", b"not sdp at all", SDP.replace(b"m=audio 4000", b"m=audio 99999999"),
          b"v=0\r\no=\r\ns=\r\nc=IN IP4\r\nt=\r\nm=\r\n", b"\x00\xff" * 40]


def bent(data: bytes, rng: random.Random) -> list[bytes]:
    """Copies of `data` with one header field changed each: every field
    given odd values, removed and repeated, and the body replaced."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    out = []
    for i in range(1, len(lines)):
        name = lines[i].split(b":", 1)[0]
        for value in rng.sample(ODD_VALUES, 6):
            out.append(lines[:i] + [name + b": " + value.encode("latin-1")] + lines[i + 1:])
        out.append(lines[:i] + lines[i + 1:])
        out.append(lines[:i + 1] + lines[i:])
    for extra in EXTRA_FIELDS:
        out.append(lines + [extra.encode("latin-1")])
    messages = [b"\r\n".join(h) + b"\r\n\r\n" + body for h in out]
    for new_body in BODIES:
        kept = [ln for ln in lines if not ln.lower().startswith((b"content-length", b"content-type"))]
        messages.append(b"\r\n".join(kept + [b"Content-Type: application/sdp",
                                              b"Content-Length: %d" % len(new_body)]) + b"\r\n\r\n" + new_body)
    return messages


async def fresh_call(owner, sent, n: int, answered: bool = True) -> tuple[str, str | None, SipMessage]:
    """A call on `owner`, its own Call-ID, answered or still ringing ->
    (that Call-ID, the To-tag the caller got, the B-leg INVITE)."""
    call_id = f"fuzz-{n}@192.0.2.50"
    bekey, b_invite = await calling(owner, sent, call_id)
    if not answered:
        return call_id, None, b_invite
    await owner.on_invite_response(bekey, b_invite.top_via.branch, callee_says(b_invite, 200, "OK"))
    ok = [m for m in of_status(sent[owner], 200) if m.call_id == call_id][-1]
    return call_id, ok.to.tag, b_invite


def ringing_seeds(b_invite: SipMessage) -> list[bytes]:
    """The callee's answers to a call still ringing."""
    def says(status: int, reason: str, extra: str = "", body: bytes = b"") -> bytes:
        data = callee_says(b_invite, status, reason).to_bytes()
        ctype = "Content-Type: application/sdp\r\n" if body else ""
        return data.split(b"Content-Length", 1)[0] + \
            f"{extra}{ctype}Content-Length: {len(body)}\r\n\r\n".encode() + body
    return [says(180, "Ringing"), says(183, "Session Progress", "Require: 100rel\r\nRSeq: 1\r\n", SDP),
            says(200, "OK", "", SDP), says(486, "Busy Here"), says(302, "Moved", "Contact: <sip:x@192.0.2.1>\r\n")]


def seeds(call_id: str, to_tag: str, b_invite: SipMessage) -> list[bytes]:
    """What may reach the node holding that call: the callee's answers,
    the caller's requests in the dialog, the callee's BYE, a new call and
    a REGISTER."""
    bekey = bekey_of(call_id)
    route = f"{ROUTE_HEADER}: bekey={bekey};owner=node1;partner=node2;reason=owner\r\n".encode()

    def routed(msg: SipMessage) -> bytes:
        return msg.to_bytes().replace(b"Content-Length", route + b"Content-Length", 1)
    out = [callee_says(b_invite, 200, "OK").to_bytes(), callee_says(b_invite, 180, "Ringing").to_bytes()]
    for n, method in enumerate(("BYE", "INVITE", "UPDATE", "INFO", "PRACK", "REFER", "NOTIFY", "CANCEL",
                                "ACK", "MESSAGE", "OPTIONS", "SUBSCRIBE")):
        out.append(routed(in_dialog(method, 10 + n, call_id, "a1", to_tag, f"z9hG4bKfz{n}")))
    out.append(routed(in_dialog("BYE", 5, b_invite.call_id, "callee-1", b_invite.from_.tag, "z9hG4bKfzb")))
    out.append(f"INVITE sip:service@{PROXY} SIP/2.0\r\nVia: SIP/2.0/UDP {PROXY};branch=z9hG4bKfznew\r\n"
               f"Max-Forwards: 69\r\nFrom: <sip:bob@example.com>;tag=b1\r\nTo: <sip:service@example.com>\r\n"
               f"Call-ID: {call_id}x\r\nCSeq: 1 INVITE\r\nContact: <sip:bob@192.0.2.9>\r\n".encode() + route
               + f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n".encode() + SDP)
    out.append(f"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP {PROXY};branch=z9hG4bKfzreg\r\n"
               f"Max-Forwards: 69\r\nFrom: <sip:carol@example.com>;tag=r1\r\nTo: <sip:carol@example.com>\r\n"
               f"Call-ID: {call_id}r\r\nCSeq: 1 REGISTER\r\nContact: <sip:carol@192.0.2.9>\r\n"
               f"Expires: 60\r\nPath: <sip:{PROXY};lr>\r\n".encode() + route + b"Content-Length: 0\r\n\r\n")
    return out


def test_a_node_answers_or_drops_any_bent_message_and_never_fails_on_it(tmp_path, caplog):
    """Each bent message goes to a call of its own, answered and held (or
    ringing, for the callee's answers to it), so that none finds the call
    already ended by an earlier one."""
    rng = random.Random(3261)

    async def scenario(nodes, sent):
        owner, _ = nodes
        template = await fresh_call(owner, sent, 0)
        bent_ones = [(data, True) for seed in seeds(*template) for data in bent(seed, rng)]
        bent_ones += [(data, False) for seed in ringing_seeds(template[2]) for data in bent(seed, rng)]
        fed = 0
        for n, (data, answered) in enumerate(bent_ones, 1):
            call_id, to_tag, b_invite = await fresh_call(owner, sent, n, answered)
            data = (data.replace(template[0].encode(), call_id.encode())
                    .replace(template[1].encode(), (to_tag or template[1]).encode())
                    .replace(bekey_of(template[0]).encode(), bekey_of(call_id).encode())
                    .replace(template[2].top_via.branch.encode(), b_invite.top_via.branch.encode())
                    .replace(template[2].call_id.encode(), b_invite.call_id.encode())
                    .replace(template[2].from_.tag.encode(), b_invite.from_.tag.encode()))
            try:
                msg = parse_message(data)
            except SipParseError:
                continue                    # the proxy refuses it; a node never sees it
            owner.on_message(msg, *UDP)
            fed += 1
            await settled(owner)
            sent[owner].clear()
        # the last call still ends cleanly
        call_id, to_tag, b_invite = await fresh_call(owner, sent, len(bent_ones) + 1)
        bye = seeds(call_id, to_tag, b_invite)[2]
        owner.on_message(parse_message(bye), *UDP)
        await settled(owner)
        return fed, [m for m in of_status(sent[owner], 200) if m.cseq[1] == "BYE"]

    with caplog.at_level(logging.WARNING):
        fed, bye_answered = with_nodes(tmp_path, 2, scenario)
    failures = [r for r in caplog.records
                if r.levelno >= logging.ERROR or getattr(r, "event", "") == "internal_error" or r.exc_info]
    assert fed > 1000
    assert not failures, [(r.getMessage(), getattr(r, "fields", None)) for r in failures[:5]]
    assert len(bye_answered) == 1
