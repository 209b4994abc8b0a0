"""A scripted SIP phone on a UDP socket, for tests that need a callee
that registered (SIPp cannot register and then take calls in one run)."""
from __future__ import annotations

import base64
import os
import socket
import ssl
import struct
import threading
import time
import uuid

from sipcore.framing import StreamFramer
from sipcore.headers import hostport
from sipcore.message import SipRequest, make_response, parse_message

SDP = b"v=0\r\no=phone 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0\r\n"


class WsClient:
    """The browser's side of SIP over WebSocket (RFC 7118), for the tests:
    the upgrade, then masked frames out and messages in."""

    def __init__(self, sock: socket.socket, origin: str | None = None):
        """`origin`: the page's, as a browser sends it (None: none, as
        JsSIP under Node.js)."""
        key = base64.b64encode(os.urandom(16)).decode()
        origin_line = f"Origin: {origin}\r\n" if origin else ""
        sock.sendall(f"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                     f"{origin_line}"
                     f"Sec-WebSocket-Protocol: sip\r\n\r\n".encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise OSError("closed during the WebSocket handshake")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101") or b"Sec-WebSocket-Protocol: sip" not in head:
            raise OSError(f"WebSocket upgrade refused: {head[:200]!r}")

    @staticmethod
    def frame(payload: bytes) -> bytes:
        mask, n = os.urandom(4), len(payload)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    def feed(self, data: bytes) -> list[bytes]:
        """-> the messages of the (server, unmasked) frames complete so far."""
        self.buf += data
        out = []
        while len(self.buf) >= 2:
            n, at = self.buf[1] & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    break
                n, at = struct.unpack_from("!H", self.buf, 2)[0], 4
            if len(self.buf) < at + n:
                break
            if self.buf[0] & 0x0F in (1, 2):
                out.append(self.buf[at:at + n])
            self.buf = self.buf[at + n:]
        return out


class Phone:
    """answer=True: 180 then 200 to INVITE; False: 180 and ring until CANCEL."""

    def __init__(self, user: str, proxy: tuple[str, int], answer: bool = True, transport: str = "udp",
                 cafile: str | None = None, sock: socket.socket | None = None,
                 cert: tuple[str, str] | None = None, origin: str | None = None):
        """transport "tls": `cafile` holds the CA the proxy's certificate
        is verified against (its name: localhost); `cert`: (certificate,
        key) files the phone presents if asked; `origin`: the Origin a
        browser phone (ws, wss) sends. `sock`: a connection
        the proxy opened to us (we are its TCP or TLS server: a trunk)."""
        self.user, self.proxy, self.answer, self.transport = user, proxy, answer, transport
        # a phone on IPv6 when the proxy address it is given is one
        self.host = "::1" if ":" in proxy[0] else "127.0.0.1"
        if sock is not None:
            self.sock = sock
            self.framer = StreamFramer()
            self.pending = []
        elif transport != "udp":
            # one connection to the proxy, kept open: the proxy must reach
            # this phone over it (RFC 5626 flow, via the Path it added)
            self.sock = socket.create_connection(proxy)
            if transport in ("tls", "wss"):
                ctx = ssl.create_default_context(cafile=cafile)
                if cert:
                    ctx.load_cert_chain(*cert)
                self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")
            self.framer = StreamFramer()
            self.pending: list[bytes] = []
            if transport in ("ws", "wss"):
                self.framer = WsClient(self.sock, origin)
        else:
            self.framer = None
            self.sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((self.host, 0))
        self.port = self.sock.getsockname()[1]
        self.got: list[str] = []
        self.messages: list[bytes] = []     # bodies of the MESSAGEs it took
        self.tag = uuid.uuid4().hex[:8]
        self.invite: SipRequest | None = None
        self.dialogs: dict[str, SipRequest] = {}   # Call-ID -> the INVITE it answered
        self.replaced: list[str] = []               # Call-IDs of dialogs a Replaces ended
        self.subscriptions: dict[str, SipRequest] = {}   # Call-ID -> the SUBSCRIBE that began it
        self.notified = 0
        self._stop = False
        self._thread: threading.Thread | None = None

    @property
    def contact(self) -> str:
        t = f";transport={self.transport}" if self.transport != "udp" else ""
        return f"sip:{self.user}@{self.hostport}{t}"

    @property
    def hostport(self) -> str:
        if self.transport in ("ws", "wss"):
            return f"ws{self.port}.invalid"      # a browser has no address of its own to give (RFC 7118 §5.2)
        return hostport((self.host, self.port))

    def _sendto(self, data: bytes, dest) -> None:
        if isinstance(self.framer, WsClient):
            self.sock.sendall(self.framer.frame(data))
        elif self.transport != "udp":
            self.sock.sendall(data)
        else:
            self.sock.sendto(data, dest)

    def _recv(self) -> tuple[bytes, tuple]:
        if self.transport == "udp":
            return self.sock.recvfrom(65535)
        while not self.pending:
            chunk = self.sock.recv(65535)
            if not chunk:
                raise OSError("connection closed")
            self.pending += [m for m in self.framer.feed(chunk) if isinstance(m, bytes)]
        return self.pending.pop(0), self.proxy

    def register(self, expires: int = 300, contacts: str | None = None, cseq: int = 1,
                 call_id: str | None = None, extra: str = ""):
        contact_hdr = contacts if contacts is not None else f"<{self.contact}>"
        text = (f"REGISTER sip:127.0.0.1 SIP/2.0\r\n"
                f"Via: SIP/2.0/{self.transport.upper()} {self.hostport};branch=z9hG4bK{uuid.uuid4().hex};rport\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:{self.user}@127.0.0.1>;tag={self.tag}\r\n"
                f"To: <sip:{self.user}@127.0.0.1>\r\nCall-ID: {call_id or 'reg-' + self.tag}\r\n"
                f"CSeq: {cseq} REGISTER\r\nContact: {contact_hdr}\r\nExpires: {expires}\r\n{extra}"
                f"Content-Length: 0\r\n\r\n")
        self.sock.settimeout(5)
        self._sendto(text.encode(), self.proxy)
        while True:
            resp = parse_message(self._recv()[0])
            if resp.status >= 200:
                return resp

    def call(self, user: str, hold: float = 0.2, uri: str | None = None) -> list[int]:
        """Call `user` (at request URI `uri` if given: a GRUU) through the
        proxy: INVITE, ACK of the 200, BYE after `hold` s (not with
        start()). -> the statuses heard: the INVITE's, then the BYE's."""
        call_id, branch = uuid.uuid4().hex, uuid.uuid4().hex
        head = (f"Max-Forwards: 70\r\nFrom: <sip:{self.user}@127.0.0.1>;tag={self.tag}\r\n"
                f"To: <sip:{user}@127.0.0.1>TO_TAG\r\nCall-ID: {call_id}\r\n")

        def request(method: str, uri: str, cseq: int, routes: list[str], to_tag: str = "", body=b"") -> None:
            via = f"SIP/2.0/{self.transport.upper()} {self.hostport};branch=z9hG4bK{branch if method == 'ACK' else uuid.uuid4().hex};rport"
            text = (f"{method} {uri} SIP/2.0\r\nVia: {via}\r\n" + "".join(f"Route: {r}\r\n" for r in routes)
                    + head.replace("TO_TAG", f";tag={to_tag}" if to_tag else "")
                    + f"CSeq: {cseq} {method}\r\nContact: <{self.contact}>\r\n"
                    + ("Content-Type: application/sdp\r\n" if body else "") + f"Content-Length: {len(body)}\r\n\r\n")
            self._sendto(text.encode() + body, self.proxy)

        def final(method: str):
            while True:
                resp = parse_message(self._recv()[0])
                if getattr(resp, "status", 0) >= 200 and resp.cseq[1] == method:
                    return resp

        self.sock.settimeout(10)
        heard = []
        request("INVITE", uri or f"sip:{user}@{hostport(self.proxy)}", 1, [], body=SDP)
        ok = final("INVITE")
        heard.append(ok.status)
        if ok.status != 200:
            return heard
        routes = list(reversed(ok.values("Record-Route")))     # the caller's route set (RFC 3261 §12.1.2)
        target, to_tag = ok.contacts[0].uri, ok.to.tag
        request("ACK", target, 1, routes, to_tag)
        time.sleep(hold)
        request("BYE", target, 2, routes, to_tag)
        heard.append(final("BYE").status)
        return heard

    def start(self) -> "Phone":
        self.sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        if self._thread:
            self._thread.join(2)
        self.sock.close()

    def _send(self, resp, dest) -> None:
        self._sendto(resp.to_bytes(), dest)

    def _run(self) -> None:
        while not self._stop:
            try:
                data, src = self._recv()
            except socket.timeout:
                continue
            except OSError:
                return
            if not data.strip(b"\r\n"):
                continue                # a keep-alive (the proxy's NAT ping)
            msg = parse_message(data)
            if not isinstance(msg, SipRequest):
                continue
            self.got.append(msg.method)
            rr = [("Record-Route", v) for v in msg.values("Record-Route")]
            if msg.method == "INVITE" and msg.to.tag is None:
                self.invite = msg
                contact = [("Contact", f"<{self.contact}>")]
                old = self._replaced(msg.get("Replaces"))
                if old is not None:
                    # RFC 3891 §3: the new dialog is answered at once and
                    # the one it replaces ended with a BYE
                    self._send(make_response(msg, 200, "OK", to_tag=self.tag, headers=rr + contact,
                                             body=SDP, content_type="application/sdp"), src)
                    self._bye(old)
                    continue
                if self.answer:
                    self.dialogs[msg.call_id] = msg
                self._send(make_response(msg, 180, "Ringing", to_tag=self.tag, headers=rr + contact), src)
                if self.answer:
                    self._send(make_response(msg, 200, "OK", to_tag=self.tag, headers=rr + contact,
                                             body=SDP, content_type="application/sdp"), src)
            elif msg.method == "CANCEL":
                self._send(make_response(msg, 200, "OK", to_tag=self.tag), src)
                if self.invite is not None:
                    self._send(make_response(self.invite, 487, "Request Terminated", to_tag=self.tag), src)
            elif msg.method == "SUBSCRIBE":
                self._subscribed(msg, src)
            elif msg.method == "MESSAGE":
                self.messages.append(msg.body)
                self._send(make_response(msg, 200, "OK", to_tag=self.tag), src)
            elif msg.method in ("BYE", "OPTIONS", "INFO", "UPDATE", "INVITE"):
                self._send(make_response(msg, 200, "OK", to_tag=self.tag), src)

    def _replaced(self, value: str | None) -> SipRequest | None:
        """The answered INVITE of the dialog a Replaces names as this phone
        has it: its Call-ID, our tag as to-tag, the caller's as from-tag."""
        if not value:
            return None
        call_id, *params = [p.strip() for p in value.split(";")]
        tags = dict(p.partition("=")[::2] for p in params)
        old = self.dialogs.get(call_id)
        if old is None or tags.get("to-tag") != self.tag or tags.get("from-tag") != old.from_.tag:
            return None
        return old

    def _bye(self, invite: SipRequest) -> None:
        """Hang up the dialog `invite` began."""
        del self.dialogs[invite.call_id]
        self.replaced.append(invite.call_id)
        self._request_in(invite, "BYE", 1)

    def _request_in(self, first: SipRequest, method: str, cseq: int, extra: str = "", body: bytes = b"") -> None:
        """Send a request in the dialog `first` began (we answered it: the
        route set is its Record-Route as it is, its Contact the target)."""
        routes = "".join(f"Route: {r}\r\n" for r in first.values("Record-Route"))
        text = (f"{method} {first.contacts[0].uri} SIP/2.0\r\n"
                f"Via: SIP/2.0/{self.transport.upper()} {self.hostport};branch=z9hG4bK{uuid.uuid4().hex};rport\r\n"
                f"Max-Forwards: 70\r\n{routes}From: {first.get('To')};tag={self.tag}\r\nTo: {first.get('From')}\r\n"
                f"Call-ID: {first.call_id}\r\nCSeq: {cseq} {method}\r\nContact: <{self.contact}>\r\n{extra}"
                f"Content-Length: {len(body)}\r\n\r\n")
        self._sendto(text.encode() + body, self.proxy)

    def _subscribed(self, msg: SipRequest, src) -> None:
        """A presence SUBSCRIBE: 200 and a NOTIFY of our state, as a phone
        that shares its presence does (RFC 3856); terminated for Expires 0."""
        first = self.subscriptions.setdefault(msg.call_id, msg)
        expires = msg.get("Expires") or "600"
        self._send(make_response(msg, 200, "OK", to_tag=self.tag,
                                 headers=[("Record-Route", v) for v in msg.values("Record-Route")]
                                 + [("Contact", f"<{self.contact}>"), ("Expires", expires)]), src)
        state = "terminated;reason=timeout" if expires == "0" else f"active;expires={expires}"
        body = f"<presence entity='sip:{self.user}@127.0.0.1'><tuple id='p'><status><basic>open</basic>" \
               f"</status></tuple></presence>".encode()
        self.notified += 1
        self._request_in(first, "NOTIFY", self.notified, f"Event: presence\r\nSubscription-State: {state}\r\n"
                         "Content-Type: application/pidf+xml\r\n", body)
