"""SIP transaction plumbing for a node: client transactions with UDP
retransmission (RFC 3261 §17.1: timers A/E doubling from T1 up to T2,
given up after 64*T1; an INVITE that rang, after Timer C), a cache of
the responses we sent so retransmitted requests are answered identically
(§17.2), and 2xx retransmission until the ACK arrives (§13.3.1.4).
Everything a node sends goes to the proxy over UDP.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from sipcore.expiring import Expiring
from sipcore.message import HeaderField, SipRequest, SipResponse, parse_message

log = logging.getLogger("node.sip")

T1 = 0.5
T2 = 4.0
TIMEOUT = 64 * T1


_random = {"hex": "", "at": 0}


def random_hex(n: int) -> str:
    """n hex digits from the OS's random source (tags, branches, Call-IDs:
    RFC 3261 §19.3 wants them cryptographically random), read 2 KiB at a
    time rather than with a system call each (7 per call)."""
    pool, at = _random["hex"], _random["at"]
    if at + n > len(pool):
        pool, at = os.urandom(2048).hex(), 0
        _random["hex"] = pool
    _random["at"] = at + n
    return pool[at:at + n]


def new_branch() -> str:
    return "z9hG4bK" + random_hex(20)


@dataclass
class ClientTx:
    branch: str
    method: str
    data: bytes
    on_response: Callable[[SipResponse | None], Any]
    interval: float = T1
    provisional: bool = False
    final: bool = False
    expired: bool = False                           # Timer C fired, expire() was called
    timer: asyncio.TimerHandle | None = None        # Timer A/E: the next copy
    deadline: asyncio.TimerHandle | None = None     # Timer B/F, or C once it rang
    still: Callable[[], Awaitable[bool]] | None = None
    expire: Callable[[], Any] | None = None

    def stop_timers(self) -> None:
        for h in (self.timer, self.deadline):
            if h:
                h.cancel()


class Transactions:
    def __init__(self, send: Callable[[bytes, tuple[str, int]], None], proxy: tuple[str, int],
                 invite_timeout: float = 180.0):
        self._send = send
        self.proxy = proxy
        self.invite_timeout = invite_timeout
        self.client: dict[tuple[str, str], ClientTx] = {}
        self.responses: dict[tuple, tuple[float, bytes, tuple[str, int]]] = {}
        self.pending_2xx: dict[tuple, asyncio.TimerHandle] = {}
        # failures to INVITE, sent again until their ACK (Timer G, RFC 3261
        # §17.2.1): a lost 487 or 486 is never asked for again, the caller
        # having had a provisional answer; not counted in busy()
        self.pending_failures: dict[tuple, asyncio.TimerHandle] = {}
        self._sweeper: asyncio.Task | None = None

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def close(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        for tx in self.client.values():
            tx.stop_timers()
        for h in (*self.pending_2xx.values(), *self.pending_failures.values()):
            h.cancel()

    # ---- client side -----------------------------------------------------
    def request(self, req: SipRequest, on_response: Callable[[SipResponse | None], Any], *,
                expire: Callable[[], Any] | None = None,
                still: Callable[[], Awaitable[bool]] | None = None,
                answer_within: float | None = None) -> None:
        """Send a request to the proxy; `on_response` gets every response,
        or None when no final response came in time (then act as on 408).

        An INVITE that had a provisional answer waits for its final one up
        to `invite_timeout` from the last (Timer C, RFC 3261 §16.6), then
        `expire()` is called (it CANCELs) and, should no final answer come
        within 64*T1 more, on_response(None) (§16.8). For an INVITE that
        another node sent first (resume_call), `still()` is asked before
        each copy (none once it says False), and no answer at all also
        waits for Timer C rather than Timer B: the answers may be going to
        that node. `answer_within`: an INVITE with no answer at all (not
        even 100 Trying) in that many seconds is given up, as at Timer B
        (there is another server to try)."""
        branch = req.top_via.branch
        data = req.to_bytes()
        if req.method == "ACK":
            self._send(data, self.proxy)
            return
        tx = ClientTx(branch, req.method, data, on_response, still=still, expire=expire)
        self.client[(branch, req.method)] = tx
        self._send(data, self.proxy)
        loop = asyncio.get_running_loop()
        tx.timer = loop.call_later(T1, self._retransmit, tx)
        ringing = req.method == "INVITE" and still is not None
        tx.deadline = loop.call_later(self.invite_timeout if ringing else answer_within or TIMEOUT,
                                      self._deadline, tx)

    def busy(self) -> bool:
        """Whether a request we sent still waits for its final answer (but
        an INVITE that rang, which waits up to Timer C), or a 2xx for its
        ACK."""
        return bool(self.pending_2xx) or any(
            not tx.final and not (tx.method == "INVITE" and tx.provisional) for tx in self.client.values())

    def adopt(self, branch: str, on_response: Callable[[SipResponse | None], Any],
              expire: Callable[[], Any]) -> None:
        """Take on an INVITE transaction another node started and left (it
        died, or this node restarted): once a provisional answer to it
        came here, or when its call still rang at the takeover. The further
        answers come to `on_response`, and its Timer C runs from now, as
        for an INVITE this node sent. Nothing is sent (the callee has the
        INVITE, or its answers would have come)."""
        if (branch, "INVITE") in self.client:
            return
        tx = ClientTx(branch, "INVITE", b"", on_response, provisional=True, expire=expire)
        self.client[(branch, "INVITE")] = tx
        tx.deadline = asyncio.get_running_loop().call_later(self.invite_timeout, self._deadline, tx)

    def _open(self, tx: ClientTx) -> bool:
        return not tx.final and self.client.get((tx.branch, tx.method)) is tx

    def _retransmit(self, tx: ClientTx) -> None:
        if not self._open(tx) or (tx.method == "INVITE" and tx.provisional):
            return
        if tx.still is None:
            self._resend(tx)
            return

        def then(t: asyncio.Task) -> None:
            if t.cancelled() or t.exception() is not None or t.result():
                self._resend(tx)
            elif self._open(tx):
                # settled elsewhere: not this node's transaction any more
                # (an answer coming here after all is a stray one)
                self._drop(tx)
        asyncio.get_running_loop().create_task(tx.still()).add_done_callback(then)

    def _drop(self, tx: ClientTx) -> None:
        del self.client[(tx.branch, tx.method)]
        tx.final = True
        tx.stop_timers()

    def _resend(self, tx: ClientTx) -> None:
        if not self._open(tx) or (tx.method == "INVITE" and tx.provisional):
            return
        self._send(tx.data, self.proxy)
        tx.interval = tx.interval * 2 if tx.method == "INVITE" else min(tx.interval * 2, T2)
        if tx.method != "INVITE" or tx.interval < TIMEOUT:
            tx.timer = asyncio.get_running_loop().call_later(tx.interval, self._retransmit, tx)

    def _deadline(self, tx: ClientTx) -> None:
        if not self._open(tx):
            return
        if (tx.method == "INVITE" and tx.expire is not None and not tx.expired
                and (tx.provisional or tx.still is not None)):
            tx.expired = True
            tx.deadline = asyncio.get_running_loop().call_later(TIMEOUT, self._deadline, tx)
            tx.expire()
            return
        self._drop(tx)
        tx.on_response(None)

    def response(self, resp: SipResponse) -> bool:
        """Hand a response to its client transaction (matched by branch and
        CSeq method, RFC 3261 §17.1.3: a CANCEL shares its INVITE's branch);
        False if none."""
        tx = self.client.get((resp.top_via.branch, resp.cseq[1]))
        if tx is None:
            return False
        if resp.status < 200:
            if tx.method == "INVITE" and not tx.final and not tx.expired and (
                    resp.status > 100 or not tx.provisional):
                # Timer C, from each provisional answer but a repeated 100
                # (§16.7 step 2); after it fired, the CANCEL's 64*T1 runs
                if tx.deadline:
                    tx.deadline.cancel()
                tx.deadline = asyncio.get_running_loop().call_later(self.invite_timeout, self._deadline, tx)
            tx.provisional = True
            # a 100 only stops retransmissions (it is hop-by-hop, never
            # relayed): the call's handlers, its lock and Redis never see it
            if not tx.final and resp.status > 100:
                tx.on_response(resp)
            return True
        if tx.final:
            # a retransmitted final response: only a 2xx to INVITE matters
            if tx.method == "INVITE" and resp.status < 300:
                tx.on_response(resp)
            return True
        tx.final = True
        tx.stop_timers()
        tx.still = tx.expire = None     # the closures of a lingering INVITE (held calls' memory)
        # keep INVITE transactions a while to absorb retransmitted 2xx
        linger = TIMEOUT if tx.method == "INVITE" else 0
        if linger:
            tx.timer = asyncio.get_running_loop().call_later(linger, self.client.pop, (tx.branch, tx.method), None)
        else:
            self.client.pop((tx.branch, tx.method), None)
        tx.on_response(resp)
        return True

    # ---- server side -----------------------------------------------------
    @staticmethod
    def server_key(req: SipRequest) -> tuple:
        return (req.call_id, req.from_.tag, req.cseq[0], req.method, req.top_via.branch)

    def cached(self, req: SipRequest) -> bool:
        """True for a retransmitted request: it is answered with the response
        we sent last, or absorbed while the first copy is still being handled.
        False for a new request, whose transaction starts now."""
        key = self.server_key(req)
        hit = self.responses.get(key)
        if hit is None:
            self.responses[key] = (time.monotonic(), None, None)
            return False
        if hit[1] is not None:
            self._send(hit[1], hit[2])
        return True

    def answered(self, req: SipRequest, method: str | None = None) -> bool:
        """Whether a final response to `req` has gone out; with `method`
        INVITE, to the INVITE a CANCEL `req` names (same branch, RFC 3261
        §9.1)."""
        key = self.server_key(req)
        hit = self.responses.get(key if method is None else key[:3] + (method,) + key[4:])
        return hit is not None and hit[1] is not None and not hit[1].startswith(b"SIP/2.0 1")

    def respond(self, req: SipRequest, resp: SipResponse, *, retransmit_2xx: bool = False,
                still_ours: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Send `resp` to `req` and keep it for retransmissions of `req`. A
        2xx to INVITE with `retransmit_2xx` is sent again until its ACK
        comes (RFC 3261 §13.3.1.4), as long as `still_ours()` says the call
        is still this node's: once another node took it over, the ACK goes
        there, and copies sent on would only be ACKed again, or taken by a
        UA as the answer to its next INVITE (SIPp does)."""
        # Everything reaches a node through the proxy: answer where the
        # request came from (the proxy's internal address), not the Via
        # sent-by, which names the proxy's public side.
        dest = req.source or req.top_via.response_target()
        data = resp.to_bytes()
        self.responses[self.server_key(req)] = (time.monotonic(), data, dest)
        self._send(data, dest)
        key = (req.call_id, req.cseq[0])
        if retransmit_2xx and 200 <= resp.status < 300:
            self._schedule_final(self.pending_2xx, key, data, dest, T1, time.monotonic(), still_ours)
        elif req.method == "INVITE" and resp.status >= 300:
            self._schedule_final(self.pending_failures, key, data, dest, T1, time.monotonic(), None)

    def _schedule_final(self, pending: dict, key, data, dest, interval, started, still_ours) -> None:
        """Send a final answer to INVITE again after `interval`, doubling
        up to T2, until acked() or 64*T1 (or `still_ours()` says no)."""
        loop = asyncio.get_running_loop()

        def again(ours: bool = True) -> None:
            if key not in pending:
                return                      # ACKed meanwhile
            if not ours or time.monotonic() - started >= TIMEOUT:
                pending.pop(key, None)
                return
            self._send(data, dest)
            self._schedule_final(pending, key, data, dest, min(interval * 2, T2), started, still_ours)

        def fire() -> None:
            if still_ours is None:
                again()
            else:
                loop.create_task(still_ours()).add_done_callback(
                    lambda t: again(t.cancelled() or t.exception() is not None or t.result()))
        pending[key] = loop.call_later(interval, fire)

    def acked(self, call_id: str, cseq: int) -> None:
        for pending in (self.pending_2xx, self.pending_failures):
            h = pending.pop((call_id, cseq), None)
            if h:
                h.cancel()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(5)
            cutoff = time.monotonic() - TIMEOUT
            for k in [k for k, v in self.responses.items() if v[0] < cutoff]:
                del self.responses[k]


class AckGate:
    """Which ACKs of a 2xx a B2BUA relays to the other leg: one for each 2xx
    the far side sent (the first, and each retransmission of it, which
    means our ACK was lost), never the copies in between. A caller ACKs
    every copy of a 2xx it receives (RFC 3261 §13.2.2.4), and it may
    receive copies the far side never sent: the node that relayed the 2xx
    retransmits it until it sees the ACK (§13.3.1.4), and when the ramp
    brings that ACK to another node (the call moved home), it never does.
    A callee that gets an ACK it already had as a new message may drop the
    call (SIPp aborts it: seen in a kill-and-restart run). An ACK this
    node has no 2xx for (its call came over from another node) is relayed
    the first time. Entries live for 64*T1, at most `limit` of them."""

    def __init__(self, ttl: float = TIMEOUT, limit: int = 65536):
        self.entries = Expiring(ttl, limit)      # (call_id, cseq) -> ACKs still to relay

    def grant(self, call_id: str, cseq: int) -> None:
        """A 2xx to (call_id, cseq) went to the side that will ACK it."""
        now = time.monotonic()
        self.entries.put((call_id, cseq), self.entries.get((call_id, cseq), now, 0) + 1, now)

    def take(self, call_id: str, cseq: int) -> bool:
        """An ACK of (call_id, cseq) came: True if it is to be relayed."""
        now = time.monotonic()
        owed = self.entries.get((call_id, cseq), now)
        if owed == 0:
            return False
        self.entries.put((call_id, cseq), 0 if owed is None else owed - 1, now)
        return True


def parse_request(text: str, body: bytes = b"") -> SipRequest:
    msg = parse_message(text.encode("latin-1") + body)
    assert isinstance(msg, SipRequest)
    return msg


def new_request(method: str, uri: str, fields: list[tuple[str, str]], body: bytes = b"") -> SipRequest:
    """A request of ours from its parts, Content-Length added: what
    parse_request makes of the same text, without writing and parsing it
    (a node sends five a call, and answers from two more). The parts are
    ours or read from messages the parser took, so there is nothing to
    check; its bytes are written once, on sending."""
    req = SipRequest(method, uri)
    req.fields = [HeaderField(name, value) for name, value in fields]
    req.fields.append(HeaderField("Content-Length", str(len(body))))
    req.body = body
    return req
