"""Digest authentication for the registrar and for new calls
(RFC 3261 §22, RFC 7616 / 2617 MD5, RFC 8760 SHA-256).

Users come from a file, one `user:password` a line (`#` starts a comment).
A REGISTER without valid credentials gets 401 with WWW-Authenticate, an
INVITE 407 with Proxy-Authenticate; both offer a challenge for each of
the algorithms of `auth.algorithms`, in its order (RFC 8760 §2.4: the
client takes the first it supports), qop=auth. MD5 alone unless set
otherwise: baresip 1.0 (Debian 12's) gives up on any challenge it does
not know, even one that follows an MD5 challenge.

Nonces are stateless: `<issued>.<random>.<mac>`, the MAC keyed with the
cluster secret, so any node can check one another node issued. A nonce
older than `auth.nonce_ttl` is refused with `stale=true` (the client
retries without asking its user). A (nonce, nc) pair is accepted once:
it is recorded in the node's Redis with the nonce's lifetime (SET NX), so
a replayed request is challenged again. Passwords, digests and the secret
never reach a log line.

Requests from `auth.trusted` addresses (a carrier's trunk, a PBX: they
do not answer challenges) need no credentials, as with Kamailio's
allow_source_address. Where a request came from is the address the
proxy saw it come from: its Via below the proxy's, whose `received` the
proxy sets to the source address whenever the sent-by host is another
(RFC 3261 §18.2.1) or the sender wrote a `received` of its own.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import time

from sipcore.errors import SipParseError
from sipcore.headers import split_commas
from sipcore.logfmt import event
from sipcore.message import SipRequest

log = logging.getLogger("node.auth")

ALGORITHMS = {"SHA-256": hashlib.sha256, "MD5": hashlib.md5}


def load_users(path: str) -> dict[str, str]:
    users = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, password = line.partition(":")
            if not sep or not user:
                raise ValueError(f"auth.users_file: line {n}: expected user:password")
            users[user] = password
    return users


def parse_credentials(value: str) -> dict[str, str]:
    """'Digest username="a", realm="r", ...' -> {name: unquoted value}."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        raise SipParseError("credentials are not Digest")
    out = {}
    for part in split_commas(rest):
        name, sep, val = part.partition("=")
        if not sep:
            raise SipParseError("bad Digest parameter")
        val = val.strip()
        if len(val) >= 2 and val[0] == '"' and val[-1] == '"':
            val = val[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        out[name.strip().lower()] = val
    return out


def digest(algorithm: str, user: str, realm: str, password: str, method: str, uri: str, nonce: str,
           nc: str | None = None, cnonce: str | None = None, qop: str | None = None) -> str:
    h = ALGORITHMS[algorithm]

    def H(s: str) -> str:
        return h(s.encode()).hexdigest()
    ha1 = H(f"{user}:{realm}:{password}")
    ha2 = H(f"{method}:{uri}")
    if qop:
        return H(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return H(f"{ha1}:{nonce}:{ha2}")


def source_address(req: SipRequest) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address the proxy got `req` from (its sender's Via, the second),
    or None when that is not known."""
    try:
        vias = req.vias
        if len(vias) < 2:
            return None
        return ipaddress.ip_address(vias[1].params.get("received") or vias[1].host.strip("[]"))
    except (SipParseError, ValueError):
        return None


class Authenticator:
    def __init__(self, users: dict[str, str], realm: str, secret: bytes, nonce_ttl: float, store,
                 trusted=(), algorithms: tuple[str, ...] = ("MD5",)):
        self.trusted = list(trusted)
        self.algorithms = algorithms        # offered, in this order; answers in others are refused
        self.users = users
        self.realm = realm
        self.secret = secret
        self.nonce_ttl = nonce_ttl
        self.store = store

    # ---- nonces -----------------------------------------------------------
    def make_nonce(self, now: float | None = None) -> str:
        issued = str(int(now if now is not None else time.time()))
        rand = base64.urlsafe_b64encode(os.urandom(9)).decode()
        mac = hmac.new(self.secret, f"{issued}.{rand}".encode(), hashlib.sha256).hexdigest()[:16]
        return f"{issued}.{rand}.{mac}"

    def nonce_state(self, nonce: str) -> str:
        """'ok', 'stale' or 'bad'."""
        parts = nonce.split(".")
        if len(parts) != 3 or not parts[0].isascii() or not parts[0].isdigit():
            return "bad"
        mac = hmac.new(self.secret, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).hexdigest()[:16]
        if not hmac.compare_digest(mac, parts[2]):
            return "bad"
        return "ok" if time.time() - int(parts[0]) <= self.nonce_ttl else "stale"

    def challenges(self, stale: bool = False) -> list[str]:
        nonce = self.make_nonce()
        extra = ", stale=true" if stale else ""
        return [f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={alg}, qop="auth"{extra}'
                for alg in self.algorithms]

    # ---- checking ---------------------------------------------------------
    async def check(self, req: SipRequest) -> tuple[bool, bool, str]:
        """-> (authenticated, stale, why-not). Looks at Authorization for
        REGISTER and Proxy-Authorization for everything else."""
        header = "Authorization" if req.method == "REGISTER" else "Proxy-Authorization"
        values = [v for v in (f.value for f in req.get_fields(header))]
        if not values:
            return False, False, "no credentials"
        for value in values:
            try:
                c = parse_credentials(value)
            except SipParseError as exc:
                return False, False, exc.reason
            if c.get("realm") != self.realm:
                continue
            user, nonce = c.get("username", ""), c.get("nonce", "")
            algorithm = c.get("algorithm", "MD5").upper()
            if algorithm not in self.algorithms:
                return False, False, f"unsupported algorithm {algorithm[:16]}"
            password = self.users.get(user)
            if password is None:
                return False, False, "unknown user"
            state = self.nonce_state(nonce)
            if state == "bad":
                return False, False, "nonce not ours"
            qop, nc, cnonce = c.get("qop"), c.get("nc"), c.get("cnonce")
            if qop and qop != "auth":
                return False, False, "unsupported qop"
            expected = digest(algorithm, user, self.realm, password, req.method, c.get("uri", ""), nonce,
                              nc, cnonce, qop)
            if not hmac.compare_digest(expected, c.get("response", "")):
                return False, False, "wrong password or digest"
            if state == "stale":
                return False, True, "nonce expired"
            if not await self.store.claim_once(f"nonce:{nonce}:{nc or '-'}", int(self.nonce_ttl) + 5):
                return False, False, "replayed nonce"
            return True, False, user
        return False, False, "no credentials for this realm"


async def authenticate(node, req: SipRequest) -> bool:
    """True when the request may proceed; else it has been challenged."""
    auth = node.auth
    if auth.trusted:
        source = source_address(req)
        if source is not None and any(source in net for net in auth.trusted):
            return True
    ok, stale, why = await auth.check(req)
    if ok:
        return True
    if why not in ("no credentials", "nonce expired"):
        event(log, "auth_failed", logging.WARNING, method=req.method, call_id=req.call_id,
              user=req.from_.parsed_uri.user if req.from_.uri.startswith("sip") else None, reason=why)
        node.stats.inc("auth_failures")
    header = "WWW-Authenticate" if req.method == "REGISTER" else "Proxy-Authenticate"
    status, reason = (401, "Unauthorized") if req.method == "REGISTER" else (407, "Proxy Authentication Required")
    node.reply(req, status, reason, to_tag=node.new_tag(node._route_info(req)[0]),
               headers=[(header, c) for c in auth.challenges(stale)])
    return False
