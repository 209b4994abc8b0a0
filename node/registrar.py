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

import logging
import time
from typing import TYPE_CHECKING

from sipcore.bekey import ROUTE_HEADER
from sipcore.errors import SipParseError
from sipcore.headers import is_digits
from sipcore.logfmt import event
from sipcore.message import SipRequest

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
    headers = [("Contact", f"<{b['c']}>;expires={max(0, int(b['x'] - now))}") for b in bindings]
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
