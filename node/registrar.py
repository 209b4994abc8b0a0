"""The registrar (RFC 3261 §10.3, Path per RFC 3327).

Bindings of one address of record live in one record under the AOR's BEKey
(`{"k": "reg", "aor": ..., "b": [binding, ...]}`), saved and mirrored like a
dialog, with a TTL that is the longest binding's remaining life. A binding:
c = contact URI, x = absolute expiry, t = when it was (re)registered,
path = the Path header values to reach it (the proxy's flow), cid/cseq =
the Call-ID and CSeq that last wrote it (stale or reordered REGISTERs are
rejected, §10.3 step 7), i/r = the phone's +sip.instance and reg-id when
it gave them.

A binding is the contact URI's (§10.3 step 7), or, for a Contact with a
+sip.instance (RFC 5626 §6, RFC 5627: Linphone, Zoiper and most desk
phones send one), the instance's (with its reg-id): a phone that comes
back with another contact (restarted on another port, another address
after a network change) replaces its binding instead of leaving the old
one to be rung, and to answer for it, until it expires, as Kamailio's
registrar does.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import time
from typing import TYPE_CHECKING

from sipcore.bekey import ROUTE_HEADER, bekey_of, rank
from sipcore.errors import SipParseError
from sipcore.headers import is_digits, parse_uri
from sipcore.logfmt import event, utc_time
from sipcore.message import SipRequest

from .resp import RedisError
from .store import decode

if TYPE_CHECKING:
    from .app import Node

log = logging.getLogger("node.registrar")

DEFAULT_EXPIRES = 3600


def instance_of(contact, outbound: bool = True) -> tuple[str | None, str | None]:
    """-> (+sip.instance without its quotes, reg-id) of a Contact; the
    reg-id is ignored (None) when the REGISTER did not come through an
    edge proxy that keeps its flow (RFC 5626 §6)."""
    instance = (contact.params.get("+sip.instance") or "").strip('"') or None
    return instance, (contact.params.get("reg-id") if instance and outbound else None)


# ---- GRUU (RFC 5627) -------------------------------------------------------
# A phone that registers with a +sip.instance and `Supported: gruu` gets two
# URIs that reach that phone only, not every phone of its user: its public
# GRUU, the AOR with `gr=` the instance, and a temporary one that does not
# name the user, `sip:tgruu.TOKEN@host;gr`. The token is the AOR, the
# instance and a hash of the REGISTER's Call-ID, encrypted and
# authenticated with a key from cluster.secret (HMAC-SHA256 as the
# keystream and as the tag), so any node reads it back and nothing is
# stored; it stands as long as the phone's binding from that Call-ID does
# (a phone that restarts registers with another Call-ID: its earlier
# temporary GRUUs lapse, §5.4.1).
TGRUU = "tgruu."


def _gruu_key(secret: bytes) -> bytes:
    return hashlib.sha256(b"sipha temp-gruu\0" + secret).digest()


def _keystream(key: bytes, nonce: bytes, size: int) -> bytes:
    blocks = (hmac.new(key, nonce + i.to_bytes(4, "big"), hashlib.sha256).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def _cid_hash(call_id: str) -> str:
    return hashlib.sha256(call_id.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def temp_gruu(secret: bytes, aor: str, instance: str, call_id: str) -> str:
    """A new temporary GRUU of `instance` bound to `aor` by REGISTERs of `call_id`."""
    key, nonce = _gruu_key(secret), os.urandom(8)
    plain = f"{aor}\n{instance}\n{_cid_hash(call_id)}".encode("utf-8", "surrogateescape")
    sealed = bytes(a ^ b for a, b in zip(plain, _keystream(key, nonce, len(plain))))
    tag = hmac.new(key, b"tag" + nonce + sealed, hashlib.sha256).digest()[:10]
    token = base64.b32encode(nonce + sealed + tag).decode().rstrip("=").lower()
    host = aor.split("@", 1)[1] if "@" in aor else aor.split(":", 1)[1]
    return f"sip:{TGRUU}{token}@{host};gr"


def read_temp_gruu(secret: bytes, user: str) -> tuple[str, str, str] | None:
    """The user part of a temporary GRUU -> (AOR, instance, Call-ID
    hash), or None when it is not one of ours (forged, damaged)."""
    if not user.startswith(TGRUU):
        return None
    token = user[len(TGRUU):].upper()
    try:
        raw = base64.b32decode(token + "=" * (-len(token) % 8))
    except ValueError:
        return None
    if len(raw) < 8 + 10 + 5:
        return None
    key, nonce, sealed, tag = _gruu_key(secret), raw[:8], raw[8:-10], raw[-10:]
    if not hmac.compare_digest(tag, hmac.new(key, b"tag" + nonce + sealed, hashlib.sha256).digest()[:10]):
        return None
    parts = bytes(a ^ b for a, b in zip(sealed, _keystream(key, nonce, len(sealed)))).decode(
        "utf-8", "surrogateescape").split("\n")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None


def gruu_of(secret: bytes, uri) -> tuple[str, str, str | None] | None:
    """A request URI that is a GRUU -> (AOR, instance, Call-ID hash or
    None for a public GRUU); None for any other URI. A `gr` parameter that
    is no GRUU of ours gives ("", "", None): nobody is reached by it."""
    if not uri.is_sip or "gr" not in uri.params:
        return None
    value = uri.params.get("gr")
    if value:
        return uri.aor(), f"<{value}>", None
    return read_temp_gruu(secret, uri.user or "") or ("", "", None)


def bound_to(binding: dict, instance: str, cid_hash: str | None) -> bool:
    """Whether a binding is the phone a GRUU names (a temporary one: from
    the registration it was handed out for)."""
    return binding.get("i") == instance and (cid_hash is None or _cid_hash(binding["cid"]) == cid_hash)


def outbound_edge(req: SipRequest) -> bool:
    """Whether the phone's first hop, the last Path entry (each proxy adds
    its own on top), is an edge proxy that keeps its flow: `ob` in its
    URI (RFC 5626 §5.1, §6)."""
    if not req.paths:
        return False
    try:
        return "ob" in req.paths[-1].parsed_uri.params
    except SipParseError:
        return False


def same_binding(binding: dict, contact, instance: str | None, reg_id: str | None) -> bool:
    if instance is not None:
        return (binding.get("i"), binding.get("r")) == (instance, reg_id)
    return binding["c"] == contact.uri


async def register(node: "Node", req: SipRequest, bekey: str) -> None:
    to_uri = req.to.parsed_uri
    if not to_uri.is_sip or not to_uri.user:
        node.reply(req, 404, "Not Found (To is not a SIP AOR)")
        return
    aor = to_uri.aor()
    min_expires, max_expires = node.cfg["node.min_expires"], node.cfg["node.max_expires"]
    contacts = req.contacts
    expires_hdr = req.get("Expires")
    if expires_hdr is not None and not is_digits(expires_hdr.strip()):
        node.reply(req, 400, "Bad Request (bad Expires)")
        return
    default_exp = int(expires_hdr) if expires_hdr is not None else DEFAULT_EXPIRES
    wildcard = any(c.wildcard for c in contacts)
    if wildcard and (len(contacts) > 1 or default_exp != 0):
        node.reply(req, 400, "Bad Request (Contact: * needs Expires: 0 and no other Contact)")
        return
    for c in contacts:
        if not c.wildcard and "expires" in c.params and c.expires is None:
            node.reply(req, 400, "Bad Request (bad expires parameter)")
            return
        if not c.wildcard:
            exp = c.expires if c.expires is not None else default_exp
            if 0 < exp < min_expires:
                node.reply(req, 423, "Interval Too Brief", headers=[("Min-Expires", str(min_expires))])
                return

    phone = req.vias[1] if len(req.vias) > 1 else None      # below the proxy's
    # over UDP from behind NAT: the proxy keeps the flow open (proxy/natping.py);
    # marked on the binding so a restarted proxy can learn it again (nat_flows)
    natted = bool(req.paths and phone is not None and phone.transport == "UDP" and phone.behind_nat)
    record, how = await node.store.load(bekey, node.others(bekey))
    if node.overtaken(req):
        return          # the partner had its copy: saved now, what it read would undo the partner's
    if record is not None and record.get("k") != "reg":
        record = None
    now = time.time()
    record = record or {"k": "reg", "aor": aor, "b": []}
    bindings = [b for b in record["b"] if b["x"] > now]
    cid, cseq = req.call_id, req.cseq[0]
    added, removed = [], []
    outbound = outbound_edge(req)
    flows = False               # a binding is an outbound flow: 2xx says Require: outbound
    if wildcard:
        removed = [b["c"] for b in bindings]
        bindings = []
    for c in contacts:
        if c.wildcard:
            continue
        exp = min(c.expires if c.expires is not None else default_exp, max_expires)
        instance, reg_id = instance_of(c, outbound)
        existing = next((b for b in bindings if same_binding(b, c, instance, reg_id)), None)
        if existing is not None and existing["cid"] == cid and cseq <= existing["cseq"]:
            node.reply(req, 500, "Server Internal Error (REGISTER out of order)", headers=[("Retry-After", "1")])
            return
        if existing is not None:
            bindings.remove(existing)
        if exp == 0:
            if existing is not None:
                removed.append(existing["c"])
            continue
        binding = {"c": c.uri, "x": round(now + exp, 3), "t": round(now, 3),
                   "path": [p.raw for p in req.paths], "cid": cid, "cseq": cseq}
        if natted:
            binding["nat"] = 1
        if instance is not None:
            binding["i"] = instance
            if reg_id is not None:
                binding["r"] = reg_id
                flows = True
        bindings.append(binding)
        if existing is None or existing["c"] != c.uri:
            added.append(c.uri)
            if existing is not None:
                removed.append(existing["c"])
    most = node.cfg["node.max_contacts"]
    if most and added and len(bindings) > most:
        # a phone bug or an attack would otherwise ring (and store) without
        # end; what is bound stays as it was (Kamailio's max_contacts)
        node.reply(req, 403, f"Forbidden (too many registered contacts, at most {most})")
        event(log, "registration_refused", logging.WARNING, aor=aor, bekey=bekey, contacts=len(bindings),
              max_contacts=most)
        return
    record["b"] = bindings
    partner = node.partner_for(bekey, req)
    if bindings:
        record["ttl"] = int(max(b["x"] for b in bindings) - now) + 5
        await node.store.save(bekey, record, partner, node.others(bekey))
    else:
        await node.store.delete(bekey, record)
    for uri in added:
        node.stats.inc("registrations", "added")
        event(log, "registration_added", aor=aor, contact=uri, bekey=bekey)
    for uri in removed:
        node.stats.inc("registrations", "removed")
        event(log, "registration_removed", aor=aor, contact=uri, bekey=bekey)
    gruus = "gruu" in {t.lower() for t in req.values("Supported")}
    headers = [("Contact", f"<{b['c']}>;expires={max(0, int(b['x'] - now))}"
                + (gruu_params(node.secret, aor, b) if gruus and b.get("i") else ""))
               for b in bindings]
    if req.paths and bindings:
        headers += [("Path", p.raw) for p in req.paths]
    headers.append(("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))))
    if flows:
        # the phone keeps its flow alive (STUN over UDP, CRLF over TCP), at
        # the pace we ask for if we do
        headers.append(("Require", "outbound"))
        if node.cfg["node.flow_timer"]:
            headers.append(("Flow-Timer", str(node.cfg["node.flow_timer"])))
    if natted:
        # for the proxy (which strips it): how long a binding over this
        # request's flow lives yet, so it keeps that flow's NAT binding open
        flow = req.paths[0].raw
        left = max((b["x"] - now for b in bindings if b["path"][:1] == [flow]), default=0)
        headers.append((ROUTE_HEADER, f"flow_expires={int(left)}"))
    node.reply(req, 200, "OK", to_tag=node.new_tag(bekey), headers=headers)


def gruu_params(secret: bytes, aor: str, binding: dict) -> str:
    """A binding's +sip.instance and its GRUUs, for the 2xx to a REGISTER
    that says Supported: gruu (RFC 5627 §5.4)."""
    instance = binding["i"]
    urn = instance.strip("<>")
    public = f"{aor};gr={urn}"
    temp = temp_gruu(secret, aor, instance, binding["cid"])
    return f';+sip.instance="{instance}";pub-gruu="{public}";temp-gruu="{temp}"'


async def registrations(node: "Node", query: dict[str, str]) -> dict:
    """The admin page `/registrations` (Kamailio's `kamctl ul show`): the
    bindings this node holds as their owner (its active keyspace), by
    AOR, newest first; `?aor=sip:alice@example.com` for one AOR (read
    directly, wherever in the URI's form: a port or parameters are
    ignored as the registrar ignores them), looked up in every node's
    Redis, its owner's first, so any node answers it (`held_by`: the node
    whose active copy it is, or whose replica when no active one is
    left)."""
    now = time.time()
    wanted = query.get("aor")
    if wanted is not None:
        try:
            aor = parse_uri(wanted.strip().strip("<>")).aor()
        except SipParseError as exc:
            return {"node": node.id, "error": f"aor: not a SIP URI ({exc.reason})"}
        key = bekey_of(aor)
        found, holder = [], None
        for space in ("active", "replica"):
            for nid in rank(key, node.node_ids):
                client = node.store.own if nid == node.id else node.store.peer(nid)
                try:
                    raw = await client.get(node.store.key(space, key)) if client is not None else None
                except (RedisError, OSError):
                    continue
                if raw is not None:
                    found, holder = [(key, raw)], nid if space == "active" else f"{nid} (replica)"
                    break
            if found:
                break
    else:
        found, holder = await node.records("active", lambda raw: b'"k":"reg"' in raw), node.id
    out = []
    for bekey, raw in found:
        try:
            record = decode(raw)
            if record.get("k") != "reg":
                continue
            contacts = [{"contact": b["c"], "expires_in": int(b["x"] - now), "registered": utc_time(b["t"]),
                         "call_id": b["cid"], "cseq": b["cseq"], "path": b.get("path", []),
                         "instance": b.get("i"), "reg_id": b.get("r"), "nat": bool(b.get("nat"))}
                        for b in sorted(record["b"], key=lambda b: -b["t"]) if b["x"] > now]
        except (ValueError, KeyError, TypeError):
            continue                        # not a registration as this version writes them
        if contacts:
            out.append({"aor": record["aor"], "bekey": bekey, "held_by": holder, "contacts": contacts})
    return {"node": node.id, "registrations": sorted(out, key=lambda r: r["aor"])}


async def unregister(node: "Node", query: dict[str, str]) -> dict:
    """`POST /unregister?aor=[&contact=]` (Kamailio's `kamctl ul rm`): the
    bindings of an AOR this node holds removed, all of them or the one of
    `contact`, as an un-REGISTER would, each logged
    `registration_removed ... by=operator`. A phone still running
    registers again at its next refresh."""
    try:
        aor = parse_uri((query.get("aor") or "").strip().strip("<>")).aor()
    except SipParseError as exc:
        return {"node": node.id, "error": f"aor: not a SIP URI ({exc.reason})"}
    contact = query.get("contact")
    bekey = bekey_of(aor)
    outcome: dict = {}

    async def remove() -> None:
        record = await node.store.held(bekey)
        if not isinstance(record, dict) or record.get("k") != "reg" or record.get("aor") != aor:
            outcome["error"] = (record if isinstance(record, str) and record
                                else f"{aor} is not registered at {node.id}")
            return
        gone = [b for b in record["b"] if contact is None or b["c"] == contact]
        if not gone:
            outcome["error"] = f"{aor} has no contact {contact}"
            return
        record["b"] = [b for b in record["b"] if b not in gone]
        if record["b"]:
            record["ttl"] = int(max(b["x"] for b in record["b"]) - time.time()) + 5
            await node.save_held(bekey, record)
        else:
            await node.store.delete(bekey, record)
        for b in gone:
            node.stats.inc("registrations", "removed")
            event(log, "registration_removed", aor=aor, contact=b["c"], bekey=bekey, by="operator")
        outcome["removed"] = [b["c"] for b in gone]

    await node._locked(bekey, remove(), None)
    return {"node": node.id, **(outcome or {"error": f"{node.id}'s Redis failed (see its log)"})}


async def nat_flows(node: "Node") -> dict:
    """The flows (first Path entry: the proxy's, naming the phone's
    address) of the bindings registered over UDP from behind NAT in this
    node's Redis, its own and its partners' copies -> {path: seconds the
    longest binding over it lives yet}. A proxy that restarted asks every
    node for them and pings them again (proxy/natping.py): it would
    otherwise learn each one only at the phone's next REGISTER, often an
    hour away, while the routers close their bindings within minutes."""
    flows: dict[str, int] = {}
    now = time.time()
    for space in ("active", "replica"):
        for _, raw in await node.records(space, lambda raw: b'"nat":1' in raw):
            try:
                record = decode(raw)
                for b in record["b"]:
                    left = int(b["x"] - now)
                    if b.get("nat") and b["path"] and left > 0:
                        flows[b["path"][0]] = max(left, flows.get(b["path"][0], 0))
            except (ValueError, KeyError, TypeError):
                continue                    # not a registration
    return {"node": node.id, "flows": flows}
