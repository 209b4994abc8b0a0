"""A backend node: registrar + B2BUA whose every dialog survives its death.

Each request arrives from the proxy with the internal header naming the
BEKey, this node (owner) and the partner. Messages of one BEKey are handled
one at a time, in arrival order (a per-BEKey lock), so Redis round trips
never reorder the steps of one call.

Call record (JSON in Redis, see node.store), two legs:
    a: towards the caller (we are UAS)      b: towards the callee (we are UAC)
    each: cid (Call-ID), lt/rt (local/remote tag), lu/ru (local/remote URI),
          lc/rc (local/remote CSeq), tgt (remote target), rs (route set)
    ah:  the caller INVITE's Via/From/To/Call-ID/CSeq/Record-Route, so any
         node can answer that INVITE (CANCEL after a failover)
    forks: one per callee contact: the INVITE's R-URI, Route, branch and
         sending node (by: its Via; CANCEL, the non-2xx ACK and a
         retransmission by another node must match it) and final status
    ack: for each leg, the CSeq to ACK on the other leg when this leg ACKs
    dof: set when the caller's INVITE had no SDP (delayed offer): its ACK
         carries the answer, so a node never ACKs the callee's 2xx itself
    rp:  set when the caller's INVITE had a Replaces: the Replaces (and
         Require) the B-leg INVITE carries, naming the callee's dialog
    pr:  1 when the caller supports reliable provisional answers (RFC
         3262, option tag 100rel), 2 when it requires them: the B-leg
         INVITE says the same, and the callee's reliable ones are relayed
         reliably
    rel: the callee's reliable provisional answers relayed to the caller,
         each [RSeq told the caller, the callee's RSeq, its early dialog
         (rt, tgt, rs)]: the caller's PRACK names the first, the callee
         expects the second in the early dialog of the third
    sub: set for a subscription (a SUBSCRIBE's dialog, RFC 6665): legs as
         a call's, no forks; it ends with a NOTIFY that says terminated
    q:   the last in-dialog request relayed: leg it came on (l), method (m),
         its CSeq (c), the CSeq (o) and branch (br) it went on with from
         which node (by), its Via/From/To/Call-ID/CSeq (h), so the partner
         can answer it, or send it again as a retransmission,
         if this node dies before the answer comes back
Every tag and Call-ID we generate carries the BEKey stamp (sipcore.bekey),
so the proxy brings every later request of the call here, whichever leg.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import defaultdict

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sipcore import compiled, heap
from sipcore.admin import AdminServer, json_handler, json_query_handler, start_admin
from sipcore.bekey import (DOWN_HEADER, LEAVING_HEADER, ROUTE_HEADER, STORE_DOWN_HEADER, WARM_HEADER, bekey_of,
                           make_stamp, rank, read_stamp)
from sipcore.config import (NODE_LIVE, RELOAD_COUNTER, Config, ConfigError, applied_fields, changed_settings,
                             node_list_change, with_live_settings)
from sipcore.errors import SipParseError
from sipcore.expiring import remember
from sipcore.hep import HEP_COUNTER, HEP_SETTINGS, mirror_for
from sipcore.headers import (SipUri, format_params, hostport, is_digits, is_ip, parse_name_addr, parse_uri,
                             split_commas, split_params)
from sipcore.logfmt import event, utc_time
from sipcore.stats import Counters, prometheus
from sipcore.message import SipMessage, SipRequest, SipResponse, make_response, reason_phrase_safe
from sipcore.overload import NEW_WORK, OverloadGuard, RecentCalls
from sipcore.transport import SipTransport

from .auth import Authenticator, authenticate, load_users
from .registrar import bound_to, gruu_of, nat_flows, register, registrations, unregister
from .sip import AckGate, Transactions, new_branch, new_request, parse_request, random_hex
from .resp import RedisError
from .store import DialogStore, StoreUnavailable, decode

log = logging.getLogger("node")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, UPDATE, INFO, MESSAGE, SUBSCRIBE"
# what a dialog through a node takes (relay_in_dialog): told both ends in
# the INVITE and its 2xx (RFC 3261 §20.5), as phones look there before
# they send UPDATE, INFO, MESSAGE or a transfer's REFER (and SUBSCRIBE to
# refresh or end the subscription a REFER made, RFC 6665 §4.1.2)
ALLOW_IN_DIALOG = "INVITE, ACK, CANCEL, BYE, OPTIONS, PRACK, UPDATE, INFO, MESSAGE, NOTIFY, REFER, SUBSCRIBE"
# the extension a call through a node honours (new_call: Replaces), said in
# the same places (RFC 3261 §20.37), as phones look there before an
# attended transfer
SUPPORTED_IN_DIALOG = "replaces"
KNOWN_METHODS = frozenset(("INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REGISTER", "UPDATE", "INFO",
                           "PRACK", "SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE", "REFER"))


NODE_COUNTERS = {
    "dialogs": ("event",),          # created confirmed promoted migrated resumed sent_again terminated failed
                                    # upstream_failover
    "registrations": ("event",),    # added removed
    "no_dialog": (),
    "parse_rejections": (),
    "auth_failures": (),
    "overload_rejections": (),
    "ring_timeouts": (),            # forks CANCELled at Timer C (node.invite_timeout)
    "taken_over": ("what",),        # records of a node seen down taken on here: ringing / reinviting / lost
    "mirrored_again": (),           # records saved again, their partner seen down
    "stale_requests": (),           # queued through a stall, not handled (Node.stalled)
    "stale_responses": (),
    **HEP_COUNTER,
    **RELOAD_COUNTER,
}

# Option tags a request may Require of a node (RFC 3261 §8.2.2.3): Path,
# as a registrar (RFC 3327); Replaces (RFC 3891), which new_call honours
# across its two legs; 100rel (RFC 3262), whose reliable provisional
# answers and PRACKs go end to end, the callee's RSeq numbered again for
# the caller (relay_provisional); timer (RFC 4028), whose session timer
# the two ends agree on through the node (carried_request,
# session_timer); precondition (RFC 3312: IMS, VoLTE), whose QoS the two
# ends negotiate in the SDP of the reliable 183, the PRACK and the UPDATE
# before the answer, which the node relays with their bodies, the tag
# carried to the callee and back on its provisional answers
# (relay_provisional). Anything else gets 420 Bad Extension.
SUPPORTED_OPTIONS = frozenset(("path", "replaces", "100rel", "timer", "precondition"))

# Messages in progress above which new dialogs and registrations get 503.
MAX_INFLIGHT = 400
DIALOG_TTL_REASON = 'SIP;cause=408;text="no request in the dialog for node.dialog_ttl"'
OPERATOR_REASON = 'Q.850;cause=16;text="ended by the operator"'   # normal call clearing
TRYING_AFTER = 0.2     # s: the latest a 100 Trying may wait for the save (RFC 3261 §17.2.1)
# s after a takeover: what is still unanswered then is sent again (take_on);
# a callee that answered sends its 2xx again within T2 (RFC 3261 §17.2.1)
SEND_AGAIN_AFTER = 5.0
TICK = 0.1             # s: how often the event loop says it runs (Node.stalled)
STALL = 0.5            # s: a longer silence of it, and what this node kept in memory may be stale


# What a failure says to whoever sent the request, handed from one leg to
# the other as a proxy would (the far side's own headers, Server and the
# like, stay on its side): where a redirect goes, when to try again, why,
# what the far side accepts.
CARRIED_ON_FAILURE = frozenset(("retry-after", "warning", "reason", "error-info", "unsupported", "allow",
                                "accept", "accept-encoding", "accept-language", "min-se", "allow-events",
                                "min-expires"))


# What a request in a dialog (or a CANCEL) says to the far end, handed on
# with its body: without Refer-To a REFER (transfer) is void, without
# Event and Subscription-State a NOTIFY (RFC 6665); Reason says why a
# BYE or CANCEL came (a Q.850 cause, "call completed elsewhere");
# Session-Expires and Min-SE ask for a session timer (RFC 4028), which the
# two ends keep through the node as through a proxy: the refresher they
# agree on refreshes with a re-INVITE or UPDATE, which the node relays,
# and each side's "uac"/"uas" means the same party on both legs.
CARRIED_IN_REQUEST = frozenset(("refer-to", "referred-by", "refer-sub", "event", "subscription-state",
                                "allow-events", "info-package", "recv-info", "reason", "subject",
                                "priority", "expires", "accept", "session-expires", "min-se"))
# a proxy's 430 Flow Failed (RFC 5626 §5.3) as the node passes it on: what
# a registrar's proxy answers for a phone it cannot reach
FLOW_FAILED = "Temporarily Unavailable (flow failed)"


def flow_failed(resp: SipResponse) -> bool:
    return resp.status == 480 and resp.reason == FLOW_FAILED


def live_bindings(reg: dict) -> list[dict]:
    """A registration's bindings not expired yet, newest first."""
    now = time.time()
    return sorted((b for b in reg.get("b", []) if b["x"] > now), key=lambda b: -b["t"])


def one_flow_each(live: list[dict]) -> tuple[list[tuple[str, list[str]]], list[list[list]]]:
    """Bindings (newest first) -> ([(contact, Path)], [spares of each]): a
    SIP outbound phone (one +sip.instance) with several flows (reg-ids,
    through several edge proxies) is rung over its newest flow only, its
    other flows, newest first, kept as that target's spares for when the
    flow fails (RFC 5626 §5.2, §7): rung over all at once it would get
    the call twice. Other bindings are a target each."""
    targets: list[tuple[str, list[str]]] = []
    spares: list[list[list]] = []
    first_of: dict[str, int] = {}
    for b in live:
        flow = [b["c"], b.get("path", [])]
        instance = b.get("i") if "r" in b else None
        if instance is not None and instance in first_of:
            spares[first_of[instance]].append(flow)
            continue
        if instance is not None:
            first_of[instance] = len(targets)
        targets.append((flow[0], flow[1]))
        spares.append([])
    return targets, spares


# The Reason of the CANCELs to a user's other phones once one answered
# (RFC 3326), as Kamailio and Asterisk send it: a phone then shows no
# missed call
ANSWERED_ELSEWHERE = [("Reason", 'SIP;cause=200;text="Call completed elsewhere"')]
# ... and the option tags of its Supported and Require that go with them
CARRIED_OPTIONS = ("timer", "precondition")


def option_tags(msg: SipMessage, name: str) -> set[str]:
    """The option tags of a Require or Supported header, lower case."""
    return {t.lower() for t in msg.values(name)}


def carried_request(req: SipRequest) -> list[tuple[str, str]]:
    carried = [(f.name, f.value) for f in req.fields if f.key in CARRIED_IN_REQUEST]
    for name in ("Supported", "Require"):
        tags = option_tags(req, name)
        carried += [(name, t) for t in CARRIED_OPTIONS if t in tags]
    return carried


def session_timer(resp: SipResponse) -> list[tuple[str, str]]:
    """What a 2xx says of the session timer (RFC 4028 §9): its interval
    and refresher, and the Require: timer that makes the other end keep
    them; handed on with the 2xx, as a proxy would."""
    said = [("Session-Expires", v) for v in resp.values("Session-Expires")[:1]]
    return said + [("Require", "timer")] if said and "timer" in option_tags(resp, "Require") else said


def answering(req: SipRequest, *more: str) -> list[list[str]]:
    """The headers of `req` that answering it takes (Via, From, To,
    Call-ID, CSeq, and `more`), saved so that any node can answer it."""
    keys = ("via", "from", "to", "call-id", "cseq", *more)
    return [[f.name, f.value] for f in req.fields if f.key in keys]


def new_record(req: SipRequest, a: dict, b: dict, **more) -> dict:
    """The record of a dialog `req` starts through a node (a call, or a
    subscription with `sub`), with its legs, before any answer."""
    return {"k": "call", "st": "early", "ct": round(time.time(), 3), "a": a, "b": b,
            "ah": answering(req, "record-route"), "ack": {}, **more}


def far_end(resp: SipResponse) -> dict:
    """The dialog an answer to our request makes with the far side, as leg
    fields: its tag (rt), its Contact when it gave one (tgt), the route set
    (rs: its Record-Route reversed, RFC 3261 §12.1.2)."""
    end = {"rt": resp.to.tag, "rs": [r.raw for r in reversed(resp.record_routes)]}
    if resp.contacts:
        end["tgt"] = resp.contacts[0].uri
    return end


def b_leg_extra(carried: list, record: dict) -> list[tuple[str, str]]:
    """What a call's B-leg INVITE carries of the caller's: `carried`
    (carried_request), the Replaces the callee is to get (new_call), with
    its Require, and the caller's word on reliable provisional answers
    (record `pr`)."""
    rel = [("Supported", "100rel")] if record.get("pr") else []
    if record.get("pr") == 2:
        rel.append(("Require", "100rel"))
    return [(n, v) for n, v in carried] + [(n, v) for n, v in record.get("rp", ())] + rel


def setup_copy(req: SipRequest) -> dict:
    """What a B-leg INVITE takes of the caller's (record `inv`, kept until
    the call is answered): saved with the call, so that the node that
    takes it on after its owner died sends the INVITE the owner may not
    have sent (take_on), and fails over to the next node.upstream as the
    owner would have. So is a re-INVITE relayed (record q `re`, kept
    until its final answer: relay_again)."""
    return {"body": req.body.decode("latin-1"), "ct": req.get("Content-Type"), "mf": b_leg_hops(req),
            "x": carried_request(req)}


def remember_refer(record: dict, far: str, out_cseq: int, cseq: int) -> None:
    """A REFER of CSeq `cseq` relayed to leg `far` as `out_cseq` (record
    `rf`, the last few): its subscription's NOTIFYs and SUBSCRIBEs name
    it by the number each side saw (refer_ids)."""
    record["rf"] = record.get("rf", [])[-3:] + [[far, out_cseq, cseq]]


def refer_ids(record: dict, leg: str, carried: list) -> None:
    """`Event: refer;id=N` of a NOTIFY or SUBSCRIBE from `leg`, in
    `carried`, names a REFER by the CSeq its receiver saw (RFC 3515
    §2.4.6). The legs number their requests apart, so N goes on in the
    other leg's numbering: the transferee's NOTIFY with the transferor's
    REFER CSeq, the transferor's SUBSCRIBE with ours. Relayed as it came,
    the transferor (baresip) answered 481 Subscription Does Not Exist
    and showed the transfer failed."""
    for i, (name, value) in enumerate(carried):
        parts = value.split(";")
        if name.lower() not in ("event", "o") or parts[0].strip().lower() != "refer":
            continue
        for j, part in enumerate(parts[1:], 1):
            key, eq, number = part.partition("=")
            if not (eq and key.strip().lower() == "id" and is_digits(number.strip()) and len(number.strip()) <= 10):
                continue
            n = int(number)
            for far, out_cseq, cseq in record.get("rf", ()):
                if (leg, n) in ((far, out_cseq), (other(far), cseq)):
                    parts[j] = f"{key}={cseq if leg == far else out_cseq}"
                    carried[i] = (name, ";".join(parts))
                    break
            break


def outside_dialog(record: dict) -> dict:
    """The call's B leg as its forks' INVITEs and CANCELs go out: no To
    tag, whatever early dialog (an UPDATE's, a PRACK's) or answer set
    one since (RFC 3261 §8.1.1.2, §9.1)."""
    return {"b": dict(record["b"], rt=None)}


def relay_over(record: dict, leg: str, out_cseq: int) -> bool:
    """The re-INVITE from `leg` relayed as `out_cseq` has its final answer:
    its copy (record q `re`) goes. -> whether there was one."""
    q = record.get("q")
    return bool(q) and (q["l"], q["o"]) == (leg, out_cseq) and q.pop("re", None) is not None


def subscription_ttl(msg: SipMessage, default: int = 3600) -> int:
    """How long a subscription's record lives: its Expires (a SUBSCRIBE's
    or its 2xx's; RFC 6665 packages default to an hour, and a day is the
    most a record is kept for one), and two minutes for the refresh to
    come through."""
    value = (msg.get("Expires") or "").strip()
    return min(int(value[:9]) if is_digits(value) else default, 86400) + 120


def carried(resp: SipResponse) -> list[list[str]]:
    """The headers of a final failure that go on to the other leg (and a
    3xx's Contacts), as [name, value] (a fork keeps them in Redis)."""
    if resp.status < 300:
        return []
    keys = CARRIED_ON_FAILURE | {"contact"} if resp.status < 400 else CARRIED_ON_FAILURE
    return [[f.name, f.value] for f in resp.fields if f.key in keys]


# what a 2xx to an OPTIONS says of the phone that sent it (RFC 3261 §11.2)
CAPABILITIES = frozenset(("allow", "accept", "accept-encoding", "accept-language", "supported", "allow-events"))


def to_a_user(req: SipRequest) -> bool:
    """An OPTIONS outside a dialog for someone (sip:bob@...), which goes on
    to her phones as a proxy would send it (forward); one for no user
    pings us."""
    return req.method == "OPTIONS" and req.to.tag is None and req.ruri.is_sip and bool(req.ruri.user)


def best_failure(items: list, status=lambda item: item):
    """The final answer a forking element gives when every branch failed
    (RFC 3261 §16.7): the first 6xx, else the lowest status."""
    six = [i for i in items if status(i) >= 600]
    return six[0] if six else min(items, key=status)


def b_leg_hops(req: SipRequest) -> int:
    """Max-Forwards of a call's B-leg INVITE: the caller's less one, as
    a proxy would (negative: 483). A B2BUA that starts again at 70 turns a
    routing loop through it (an upstream that sends the call back) into
    new calls without end."""
    hops = req.max_forwards
    return 69 if hops is None else hops - 1


def other(leg: str) -> str:
    return "b" if leg == "a" else "a"


def without_tag(value: str) -> str:
    """A From/To value with its tag parameter removed."""
    na = parse_name_addr(value)
    params = format_params({k: v for k, v in na.params.items() if k != "tag"})
    display = f'"{na.display}" ' if na.display else ""
    return f"{display}<{na.uri}>{params}"


def _uri_of(name_addr: str) -> str:
    try:
        return parse_name_addr(name_addr).uri
    except SipParseError:
        return name_addr


def log_cdr(bekey: str, record: dict, status: int, ended_by: str) -> None:
    """One line per call that ended, for billing and for the operator, as
    Kamailio's acc module writes: who called whom, when, how long it rang
    and talked, how it ended. The node that ends the call writes it, the
    partner after a failover (the times are in the record), so a call
    has one line, whichever nodes served it; a call ended because no
    request came for node.dialog_ttl (Node.expire_idle) has ended_by=timeout."""
    now = time.time()
    created = record.get("ct", now)
    answered = record.get("at")
    event(log, "cdr", bekey=bekey, call_id=record["a"]["cid"],
          **{"from": _uri_of(record["a"]["ru"]), "to": _uri_of(record["a"]["lu"])},
          callee=record["b"]["tgt"], status=status, ended_by=ended_by, started=utc_time(created),
          setup_s=round((answered or now) - created, 3),
          duration_s=round(now - answered, 3) if answered else 0)


class Node:
    def __init__(self, cfg: Config, node_id: str):
        self.cfg = cfg
        self.id = node_id
        me = cfg.node(node_id)
        self.addr = me.sip
        self.node_ids = [n.id for n in cfg.nodes]
        self.secret = cfg.secret
        self.proxy_addr = cfg.internal
        self.upstreams = self._upstreams(cfg)
        self.upstream_timeout = cfg["node.upstream_timeout"]
        # trunks that failed lately (no answer, 408, 503 with Retry-After):
        # (host, port) -> until when they are tried last
        self.upstream_down: dict[tuple[str, int | None], float] = {}
        self.store = DialogStore(node_id, cfg["node.redis_prefix"],
                                 {n.id: n.redis for n in cfg.nodes}, cfg["node.dialog_ttl"])
        self.transport = SipTransport(self.on_message, self.on_bad_input)
        self.auth: Authenticator | None = self._authenticator(cfg)
        self.tx = Transactions(self._send, self.proxy_addr, cfg["node.invite_timeout"])
        self.acks = AckGate()       # which ACKs of a 2xx go on to the other leg
        self.locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # calls this node is setting up (B-leg INVITE in progress), as saved:
        # a provisional answer is relayed from here, without a read
        self.in_setup: dict[str, dict] = {}
        # ... and the early dialog of the callee's last provisional answer
        self.early: dict[str, dict] = {}
        # when the event loop last ran its timers (Node.stalled), and how
        # many times it stood still (overtaken)
        self.loop_seen = time.monotonic()
        self.stalls = 0
        self._ticker: asyncio.TimerHandle | None = None
        self.closed = False
        self.inflight = 0        # messages being handled (waiting for their lock or Redis)
        self.healthy = False
        self.stats = Counters(NODE_COUNTERS)
        self.transport.hep = mirror_for(cfg, self.stats)
        self._tasks: list[asyncio.Task] = []
        self.contact = f"<sip:{hostport(self.addr)}>"
        self.started = time.time()
        self.warm = 0            # active records found in our Redis at start
        # new work (NEW_WORK) refused while messages wait too long in our UDP queue
        # (limits.overload_delay, as on the proxy)
        self.guard: OverloadGuard | None = None
        self.stamped = False            # the kernel stamps our datagrams' arrival (the guard needs it)
        self.admitted = RecentCalls()   # ... but not what continues a Call-ID let in lately
        self.warm_until = 0.0
        self.admin: AdminServer | None = None
        # the nodes the proxy's last probe said are down (DOWN_HEADER)
        self.peers_down: frozenset[str] = frozenset()
        self._sweeps: set[asyncio.Task] = set()
        self.draining = False        # stopping: probes get 503 (drain)
        self.probes_refused = 0
        self.last_probe = 0.0
        self.probers: dict[tuple[str, int], float] = {}     # where probes came from -> when last
        # the other nodes' SIP addresses, resolved (hand_over)
        self.peer_addrs: dict[str, tuple[str, int]] = {
            n.id: n.sip for n in cfg.nodes if n.id != node_id and is_ip(n.sip[0])}

    # ---- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.healthy = await self.store.ping()
        if self.healthy:
            self.warm = (await self.store.counts()).get("active", 0)
            self.warm_until = time.monotonic() + 60
        self.proxy_addr = await self._resolve(self.proxy_addr)
        await self._resolve_peers()
        self.tx.proxy = self.proxy_addr
        await self.transport.listen(*self.addr)
        self._tick()
        # arrival stamps: for the overload guard, and to know what waited through a stall
        self.stamped = self.transport.measure_wait()
        self._guard_overload(self.cfg["limits.overload_delay"])
        self.tx.start()
        self._tasks.append(loop.create_task(self._watch_redis()))
        self._tasks.append(loop.create_task(self._expire_dialogs()))
        if self.warm:
            # restarted with its Redis: its calls still ringing lost their
            # Timer C with the process that ran it
            self._sweep(self.take_over(None))
            self._sweep(self.mirror_again(None))
        setting = self.cfg["node.admin"]
        if setting == "auto" and self.cfg.node(self.id).admin:
            setting = self.cfg.node(self.id).admin
        routes = {"/status": json_handler(self.status), "/metrics": self.metrics,
                  "/nat_flows": json_handler(lambda: nat_flows(self)),
                  "/registrations": json_query_handler(lambda query: registrations(self, query)),
                  "/unregister": json_query_handler(lambda query: unregister(self, query), post=True),
                  "/calls": json_query_handler(self.calls),
                  "/hangup": json_query_handler(self.hangup, post=True)}
        self.admin, admin_addr = await start_admin(setting, "node.admin", self.addr, routes)
        event(log, "node_started", node=self.id, sip=hostport(self.addr),
              proxy=hostport(self.proxy_addr), redis_ok=self.healthy,
              upstream=",".join(map(str, self.upstreams)) or None, warm_records=self.warm or None,
              hep=hostport(self.transport.hep.server) if self.transport.hep else None,
              admin=hostport(admin_addr) if admin_addr else None, compiled=len(compiled.loaded()))
        compiled.warn_stale(log)

    @staticmethod
    def _upstreams(cfg: Config) -> list[SipUri]:
        """The trunks of node.upstream, in order."""
        out = []
        for up in (u.strip() for u in cfg["node.upstream"].split(",")):
            if not up:
                continue
            try:
                uri = parse_uri(up)
            except SipParseError:
                raise ConfigError(f"node.upstream: not a URI: {up!r}") from None
            if not uri.is_sip:
                raise ConfigError(f"node.upstream: not a SIP URI: {up!r}")
            out.append(uri)
        return out

    def _authenticator(self, cfg: Config) -> Authenticator | None:
        """Digest authentication with the users of auth.users_file (read
        now), None without one."""
        trusted, algorithms = cfg.trusted, cfg.digest_algorithms
        if trusted and not cfg["auth.users_file"]:
            raise ConfigError("auth.trusted: no auth.users_file, so every source is let in already")
        if not cfg["auth.users_file"]:
            return None
        try:
            users = load_users(cfg["auth.users_file"])
        except (OSError, ValueError) as exc:
            raise ConfigError(f"auth.users_file: {exc}") from None
        return Authenticator(users, cfg["auth.realm"], self.secret, cfg["auth.nonce_ttl"], self.store, trusted,
                             algorithms)

    async def reload(self, cfg: Config) -> None:
        """The node list read again (SIGHUP): partners, the other nodes'
        Redis servers and addresses follow it in place, with every call,
        transaction and connection kept. What this node had mirrored to a
        node gone from the list, or to one whose Redis moved, is mirrored
        again (`mirrored_again`). Its own entry cannot change without a
        restart. auth.users_file is read again (a user added or removed,
        a password changed), with auth.trusted, realm and nonce TTL; the
        trunks, registration limits and timers (NODE_LIVE) apply to the
        calls and registrations from then on. log.level is applied by
        the caller; the other settings are read at start only, and those
        that changed are named in the log. Raises ConfigError before
        anything changed on what it refuses."""
        change = node_list_change(self.cfg, cfg, "node")
        try:
            me = cfg.node(self.id)
        except ConfigError:
            raise ConfigError(f"nodes: {self.id} is not in the new list: stop it (it drains) "
                              "rather than reloading it") from None
        if me != self.cfg.node(self.id):
            raise ConfigError(f"nodes: the entry of {self.id} itself changed: restart it to move it")
        merged = with_live_settings(self.cfg, cfg)
        auth = self._authenticator(merged)
        upstreams = self._upstreams(merged)
        hep = (mirror_for(merged, self.stats) if changed_settings(self.cfg, merged, HEP_SETTINGS)
               else self.transport.hep)
        if change.restart_only:
            event(log, "reload_restart_needed", logging.WARNING, node=self.id, keys=",".join(change.restart_only),
                  hint=change.restart_hint)
        before = {n.id: n for n in self.cfg.nodes}
        if change:
            await self.store.set_urls({n.id: n.redis for n in cfg.nodes})
            self.node_ids = [n.id for n in cfg.nodes]
            for nid in change.removed + change.moved:
                self.peer_addrs.pop(nid, None)
            self.peer_addrs.update({n.id: n.sip for n in cfg.nodes
                                    if n.id != self.id and n.id not in self.peer_addrs and is_ip(n.sip[0])})
            self.peers_down = self.peers_down & frozenset(self.node_ids)
            if change.removed:
                self._sweep(self.mirror_again(None))
            for nid in change.moved:
                if before[nid].redis != cfg.node(nid).redis:
                    self._sweep(self.mirror_again(nid))
        applied = changed_settings(self.cfg, merged, NODE_LIVE)
        # a call already sent to a trunk goes on to the next of its own list
        self.upstreams, self.upstream_timeout = upstreams, merged["node.upstream_timeout"]
        # Timer C of the INVITEs sent from now on; the TTL of the records saved from now on
        self.tx.invite_timeout = merged["node.invite_timeout"]
        self.store.set_ttl(merged["node.dialog_ttl"])
        self._guard_overload(merged["limits.overload_delay"])
        if hep is not self.transport.hep:
            old, self.transport.hep = self.transport.hep, hep
            if old is not None:
                old.close()
        self.cfg = merged       # its other settings kept (registration limits are read from it)
        if applied:
            event(log, "settings_applied", node=self.id, **applied_fields(merged, applied))
        if self.auth is not None or auth is not None:
            self.auth = auth
            event(log, "users_reloaded", node=self.id, file=merged["auth.users_file"] or None,
                  users=len(auth.users) if auth is not None else None,
                  auth="on" if auth is not None else "off")
        event(log, "nodes_reloaded", node=self.id, **change.fields(), nodes=",".join(self.node_ids))
        await self._resolve_peers()

    async def _resolve(self, addr):
        infos = await asyncio.get_running_loop().getaddrinfo(addr[0], addr[1], type=2)
        return infos[0][4][0], addr[1]

    async def status(self) -> dict:
        kinds = await self.store.kinds()
        counts = {space: (-1 if by is None else sum(by.values())) for space, by in kinds.items()}
        return {"role": "node", "id": self.id, "uptime_s": round(time.time() - self.started, 1),
                "compiled": compiled.view(), "gc": heap.view(),
                "sip": hostport(self.addr), "redis_ok": self.healthy, "nodes": self.node_ids,
                "keys": counts,
                "dialogs": {space: by and by["call"] for space, by in kinds.items()},
                "registrations": {space: by and by["reg"] for space, by in kinds.items()}, "calls_in_memory_locks": len(self.locks),
                "replication": self.store.replication,
                "overloaded": self.guard is not None and self.guard.active,
                "peers_down": sorted(self.peers_down),
                "counters": self.stats.as_dict(), "store": self.store.stats,
                "hep": self.transport.hep.view() if self.transport.hep is not None else None}

    async def metrics(self) -> tuple[str, str]:
        kinds = await self.store.kinds()

        def collect():
            yield from self.stats.families("sipha_node")
            for name, value in sorted(self.store.stats.items()):
                yield CounterMetricFamily(f"sipha_node_{name}", f"dialog store: {name.replace('_', ' ')}",
                                          value=value)
            records = GaugeMetricFamily("sipha_node_records", "dialogs (kind=call) and registrations "
                                        "(kind=reg) in this node's Redis", labels=["keyspace", "kind"])
            for space, by in kinds.items():
                for kind, n in (by or {"call": -1, "reg": -1}).items():
                    records.add_metric([space, kind], n)
            yield records
            yield GaugeMetricFamily("sipha_node_redis_up", "1 while this node's Redis answers",
                                    value=int(self.healthy))
            yield from self.store.latency.collect()
        return prometheus(collect)

    async def drain(self) -> None:
        """A planned stop (SIGTERM: an upgrade, a move): the proxy's probes
        get 503, so it routes this node's calls to their partners, which
        hold the replicas, after `health.down_after` of them; meanwhile
        and until then this node serves all that comes, then what it has
        in hand (requests being handled, requests it sent on, 2xx awaiting
        their ACK), for up to two seconds more; then it tells the proxies
        it is gone (say_leaving). A kill loses the messages
        of the proxy's detection window (retransmitted, or answered by the
        partner from its replica); a drain loses none of them. Calls still
        ringing here are the partner's at the proxy's next probe
        (take_over). Without probes (the proxy gone, or health.probe off),
        it does not wait for them."""
        self.draining = True
        interval, misses = self.cfg["health.interval"], self.cfg["health.down_after"]
        event(log, "node_draining", node=self.id)
        started = time.monotonic()
        deadline = started + interval * (misses + 2) + 1.0
        while time.monotonic() < deadline and self.probes_refused <= misses:
            if time.monotonic() - max(self.last_probe, started) > 2 * interval + 0.2:
                break                   # nobody probes: nobody to tell
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and (self.inflight or self.tx.busy()):
            await asyncio.sleep(0.05)
        self.say_leaving(interval)
        event(log, "node_drained", node=self.id, after_s=round(time.monotonic() - started, 2),
              probes_refused=self.probes_refused, left_inflight=self.inflight or None)

    def say_leaving(self, interval: float) -> None:
        """Tell each proxy that probed lately that this node is gone now.
        A node that answers its probes, even 503, gets the answers to the
        requests it sent (proxy/health.py NodeHealth.reachable); from its
        exit until a probe finds it gone they would reach nobody, and the
        partner that took a call on waits for their retransmissions (seen
        in a chaos run: the callee's 200 to a CANCEL the partner sent for
        a re-INVITE relayed here, and its 487)."""
        now = time.monotonic()
        host, port = self.transport.local
        for n, prober in enumerate(p for p, seen in self.probers.items() if now - seen < 2 * interval + 0.2):
            self._send((f"OPTIONS sip:{hostport(prober)} SIP/2.0\r\n"
                        f"Via: SIP/2.0/UDP {hostport((host, port))};branch=z9hG4bKleaving{n}{random_hex(6)}\r\n"
                        f"Max-Forwards: 0\r\nFrom: <sip:{self.id}@{hostport((host, port))}>;tag={random_hex(8)}\r\n"
                        f"To: <sip:{hostport(prober)}>\r\nCall-ID: leaving-{self.id}-{random_hex(8)}@sipha\r\n"
                        f"CSeq: 1 OPTIONS\r\n{LEAVING_HEADER}: {self.id}\r\nContent-Length: 0\r\n\r\n").encode(),
                       prober)

    async def close(self) -> None:
        self.closed = True
        if self._ticker is not None:
            self._ticker.cancel()
        if self.admin:
            await self.admin.close()
        for t in [*self._tasks, *self._sweeps]:
            t.cancel()
        self.tx.close()
        await self.transport.close()
        if self.transport.hep is not None:
            self.transport.hep.close()
        await self.store.close()

    async def _resolve_peers(self) -> None:
        """The other nodes' SIP addresses (hand_over): a name not known yet
        (a container not started) is asked again every 30 s."""
        for n in self.cfg.nodes:
            if n.id != self.id and n.id not in self.peer_addrs:
                try:
                    self.peer_addrs[n.id] = await self._resolve(n.sip)
                except OSError:
                    pass

    async def _watch_redis(self) -> None:
        for tick in itertools.count(1):
            await asyncio.sleep(0.5)
            if tick % 60 == 0 and len(self.peer_addrs) < len(self.node_ids) - 1:
                await self._resolve_peers()
            ok = await self.store.ping()
            if ok != self.healthy:
                self.healthy = ok
                if not ok:
                    # its calls being set up go on at their partners: what
                    # this node kept of them in memory may soon be stale
                    self.in_setup.clear()
                    self.early.clear()
                event(log, "redis_up" if ok else "redis_down", logging.INFO if ok else logging.ERROR,
                      node=self.id)

    def _guard_overload(self, delay: float) -> None:
        """Watch our UDP queue's wait against `delay` (OverloadGuard); 0:
        stop watching. At start and at every reload: the same delay again
        changes nothing."""
        if delay <= 0 or not self.stamped:
            self.guard = None           # its watch ends with it
        elif self.guard is not None:
            self.guard.low = delay
        else:
            self.guard = OverloadGuard(delay)
            self._tasks = [t for t in self._tasks if not t.done()]      # a watch ended by an earlier reload
            self._tasks.append(asyncio.get_running_loop().create_task(self._watch_overload(self.guard)))

    async def _watch_overload(self, guard: OverloadGuard) -> None:
        """Every 10 ms: how long did the last datagram read wait (OverloadGuard)?"""
        while self.guard is guard:
            await asyncio.sleep(0.01)
            guard.poll(self.transport, log, "node", node=self.id)

    def _send(self, data: bytes, dest) -> None:
        try:
            self.transport.send(data, dest, "udp")
        except OSError as exc:
            # closing: what is still being handled has nowhere to go, as expected
            event(log, "send_error", logging.DEBUG if self.closed else logging.WARNING,
                  dest=hostport(dest), error=str(exc))

    # ---- input -----------------------------------------------------------
    def on_bad_input(self, exc: SipParseError, data: bytes, src, transport: str) -> None:
        self.stats.inc("parse_rejections")
        msg = exc.message
        if isinstance(msg, SipRequest) and msg.method != "ACK":
            try:
                self.tx.respond(msg, make_response(msg, 400, reason_phrase_safe(f"Bad Request ({exc.reason})")))
            except SipParseError:
                pass
        event(log, "parse_rejected", src=f"{hostport(src)}/{transport}", reason=exc.reason)

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self.loop_seen > STALL and self._ticker is not None:
            self.stalled(now)
        self.loop_seen = now
        self._ticker = asyncio.get_running_loop().call_later(TICK, self._tick)

    def stalled(self, now: float) -> None:
        """This node's event loop did not run for a while (the process was
        stopped, its VM paused, its host swapping): the messages it finds
        now waited in its queue while the proxy took it out of the ring,
        and its partners went on with its calls. What it kept in memory of
        their setup (in_setup, early) is forgotten, so their answers are
        read against the records wherever they are now: else a callee's
        183 sent again, queued here, reaches the caller after the 200 the
        partner relayed, and SIPp aborts the call (seen in chaos runs).
        And the requests that waited in the socket meanwhile are not
        handled (on_message): their copies reached the partners, and
        their senders, if they still wait, send them again. Replayed, a
        caller's INVITE whose call the partner had set up and ended
        started a second call to the callee (seen in a chaos run), a BYE
        got a stray 481, a REGISTER could bring back a binding removed
        since. (An ACK is handled: nobody sends it again.) Noticed by
        whichever comes first on waking, the loop's timer (_tick) or a
        message (on_message): which it is depends on how the kernel wakes
        the loop's poll."""
        event(log, "node_stalled", logging.WARNING, node=self.id, seconds=round(now - self.loop_seen, 1),
              calls_in_setup=len(self.in_setup))
        self.in_setup.clear()
        self.early.clear()
        self.transport.mark_backlog()
        self.loop_seen = now
        self.stalls += 1

    def came_in(self, req: SipRequest) -> int:
        """The stall count when `req` came in (on_message asks on arrival;
        else the first to ask)."""
        return req._cached(":node-stalls", lambda: self.stalls)

    def stood_still_since(self, req: SipRequest) -> bool:
        """Whether this node stalled since `req` came in."""
        return self.came_in(req) != self.stalls

    def overtaken(self, req: SipRequest) -> bool:
        """This node stood still while handling `req`: as with what waited
        in its queue (stalled), the partner had its copies meanwhile and
        went on with the call, so it goes no further here; its sender, if
        it still waits, sends it again. Seen under test: an INVITE in hand
        when the node hung was answered 100 Trying, and its callee called a
        second time, after the partner had connected the call. Asked after
        the reads a request starts with: a new call's (twice), a request
        within a call's, a CANCEL's, a REGISTER's. An ACK goes on (nobody
        sends it again)."""
        if not self.stood_still_since(req):
            return False
        self.stats.inc("stale_requests")
        event(log, "request_dropped", logging.DEBUG, method=req.method, call_id=req.call_id,
              reason="stood still while handling it")
        return True

    def on_message(self, msg: SipMessage, src, transport: str) -> None:
        now = time.monotonic()
        if now - self.loop_seen > STALL and self._ticker is not None:
            self.stalled(now)
            msg.stale = True        # read from the backlog, before the stamps say so
        if msg.is_request:
            self.came_in(msg)
        try:
            msg.check()
        except SipParseError as exc:
            self.on_bad_input(exc, msg.to_bytes(), src, transport)
            return
        if msg.stale and not (msg.is_request and msg.method == "ACK"):
            # its partners may have gone on with the call meanwhile; whoever
            # still needs this message sends it again (a request unanswered,
            # a final answer until it is ACKed, a 100rel provisional until
            # PRACKed, an answer to our request when we resend it). Not an
            # ACK: nobody sends it again.
            kind, what = ("request", {"method": msg.method}) if msg.is_request else ("response", {"status": msg.status})
            self.stats.inc(f"stale_{kind}s")
            event(log, f"{kind}_dropped", logging.DEBUG, **what, call_id=msg.call_id, reason="waited through a stall")
            return
        if isinstance(msg, SipResponse):
            if msg.status == 430:
                # the proxy's word that a phone's connection is gone (RFC
                # 5626 §5.3), meant for its registrar: the caller hears
                # what a proxy with a registrar answers then
                msg.status, msg.reason = 480, FLOW_FAILED
            if self.tx.response(msg):
                return
            # B-leg Call-IDs carry the stamp; requests sent on leg a carry
            # it in the From-tag (as the proxy reads it)
            bekey = read_stamp(self.secret, msg.call_id) or read_stamp(self.secret, msg.from_.tag)
            if bekey and msg.status >= 200:
                # a final answer to a request another node sent (it died)
                self.spawn(bekey, self.stray_final(bekey, msg), msg)
                return
            if bekey and msg.status > 100 and msg.cseq[1] == "INVITE":
                self.spawn(bekey, self.stray_provisional(bekey, msg), msg)
                return
            event(log, "response_dropped", logging.DEBUG, status=msg.status, call_id=msg.call_id,
                  reason="no transaction")
            return
        if msg.method == "OPTIONS" and msg.to.tag is None and not msg.has(ROUTE_HEADER):
            # the proxy's health probe: answered at once, outside any lock.
            # A node that restarted with its Redis intact says so, so the
            # proxy sends its calls straight back instead of ramping.
            warm = [(WARM_HEADER, str(self.warm))] if self.warm and time.monotonic() < self.warm_until else []
            self.peers_seen_down(frozenset(split_commas(msg.get(DOWN_HEADER) or "")) - {self.id})
            self.last_probe = time.monotonic()
            remember(self.probers, src, self.last_probe, size=64)
            if self.draining:
                self.probes_refused += 1
                self.reply(msg, 503, "Service Unavailable (shutting down)")
                return
            if self.healthy:
                self.reply(msg, 200, "OK", headers=warm)
            else:       # the proxy then brings the answers for our calls to their partners
                self.reply(msg, 503, "Service Unavailable (Redis down)", headers=[(STORE_DOWN_HEADER, "1")])
            return
        if msg.method != "ACK" and self.tx.cached(msg):
            return
        if msg.to.tag is None and msg.method in NEW_WORK:
            if self.inflight >= MAX_INFLIGHT or (
                    self.guard is not None and self.guard.share and random.random() < self.guard.share
                    and msg.call_id not in self.admitted):
                # overload: turn new work away (RFC 3261 §21.5.4) and keep serving
                # calls in progress (a retransmission was answered above)
                self.stats.inc("overload_rejections")
                if self.guard is not None:
                    self.guard.count_refusal()
                self.reply(msg, 503, "Service Unavailable (overloaded)", headers=[("Retry-After", "2")])
                return
            if self.guard is not None:
                self.admitted.add(msg.call_id)
        bekey = self._route_info(msg)[0]
        self.spawn(bekey, self.on_request(msg, bekey), msg)

    def spawn(self, bekey: str, coro, msg: SipMessage | None = None) -> None:
        """Run `coro` after everything already queued for this BEKey; `msg`:
        the message it handles, what a failure is told to (a request) or
        handed on (see _locked)."""
        asyncio.get_running_loop().create_task(self._locked(bekey, coro, msg))

    async def _locked(self, bekey: str, coro, msg: SipMessage | None) -> None:
        lock = self.locks[bekey]
        self.inflight += 1
        req = msg if isinstance(msg, SipRequest) else None
        try:
            async with lock:
                await coro
        except StoreUnavailable as exc:
            if isinstance(msg, SipResponse):
                self.hand_answer_over(bekey, msg, exc)
            elif req is not None and not self.hand_over(req, exc):
                self.reply(req, 500, reason_phrase_safe(f"Server Internal Error (dialog store: {exc})"))
        except SipParseError as exc:
            if req is not None:
                self.reply(req, 400, reason_phrase_safe(f"Bad Request ({exc.reason})"))
        except Exception as exc:  # a bug must not kill the node or leave the caller hanging
            log.exception("unhandled error")
            event(log, "internal_error", logging.ERROR, bekey=bekey, error=repr(exc))
            if req is not None:
                self.reply(req, 500, "Server Internal Error")
        finally:
            self.inflight -= 1
            if not lock.locked() and not getattr(lock, "_waiters", None):
                self.locks.pop(bekey, None)

    def hand_over(self, req: SipRequest, exc: StoreUnavailable) -> bool:
        """Our Redis failed on `req`: the partner the proxy named has the
        call's replica and a Redis of its own, and gets the request as the
        proxy sends it once it sees this node out (we answer its probes
        503), rather than the caller a 500 meanwhile (up to a second of
        requests, a BYE among them). Once only (reason=handoff), and not
        after a final answer went out."""
        bekey, partner, reason = self._route_info(req)
        addr = self.peer_addrs.get(partner)
        if not reason or reason == "handoff" or addr is None or self.tx.answered(req):
            return False
        req.set(ROUTE_HEADER, f"bekey={bekey};owner={partner};partner=;reason=handoff")
        self.tx._send(req.to_bytes(), addr)
        event(log, "request_handed_over", logging.WARNING, method=req.method, call_id=req.call_id, bekey=bekey,
              to=partner, error=str(exc))
        return True

    def hand_answer_over(self, bekey: str, resp: SipResponse, exc: StoreUnavailable) -> None:
        """Our Redis failed on an answer from the far side: it goes to the
        call's partner, which has the replica (as requests do, hand_over),
        or sent the request with our Via (a CANCEL of our INVITE must
        carry it, RFC 3261 §9.1; a copy sent again). Dropped here, the
        answer was sent again, or the request was, until the proxy sent
        the answers to the partner itself on seeing our Redis down: a SIPp
        UAS aborted the call on the CANCEL sent again (chaos, node3's Redis
        killed). Once: not an answer a partner handed here."""
        partner = self.partner_for(bekey)
        addr = self.peer_addrs.get(partner) if partner else None
        if addr is None or resp.source in self.peer_addrs.values():
            return
        self.tx._send(resp.to_bytes(), addr)
        event(log, "response_handed_over", logging.WARNING, status=resp.status, cseq=resp.get("CSeq"),
              call_id=resp.call_id, bekey=bekey, to=partner, error=str(exc))

    def _route_info(self, req: SipRequest) -> tuple[str, str | None, str]:
        """-> (bekey, partner, reason): from the proxy's internal header
        when there is one (reason: the proxy's, owner, failover, ramp, or
        handoff from a node, see hand_over), else from the message itself
        (reason ""). Read once per message (several steps of one request
        ask)."""
        return req._cached("x-sipha-route:info", lambda: self._read_route_info(req))

    def _read_route_info(self, req: SipRequest) -> tuple[str, str | None, str]:
        value = req.get(ROUTE_HEADER)
        if value:
            try:
                params = split_params(value)
            except SipParseError:
                params = {}
            bekey = params.get("bekey")
            if bekey and len(bekey) == 16:
                reason = params.get("reason") or "proxy"
                if reason == "handoff":
                    # from the node that handed it over (hand_over): the
                    # answers go by the Via, to the proxy, not back to it
                    req.source = None
                return bekey, params.get("partner") or None, reason
        for text in (req.to.tag, req.from_.tag, req.call_id):
            k = read_stamp(self.secret, text)
            if k:
                return k, None, ""
        if req.method == "REGISTER":
            return bekey_of(req.to.parsed_uri.aor()), None, ""
        return bekey_of(req.call_id), None, ""

    def partner_for(self, bekey: str, req: SipRequest | None = None) -> str | None:
        """The partner the proxy named (None when it named none: no other
        node is up); without a proxy decision, the next node in rank that
        the proxy does not see down."""
        if req is not None:
            _, partner, reason = self._route_info(req)
            if reason:
                return partner
        for n in rank(bekey, self.node_ids):
            if n != self.id and n not in self.peers_down:
                return n
        return None

    def others(self, bekey: str) -> list[str]:
        return [n for n in rank(bekey, self.node_ids) if n != self.id]

    # ---- responding --------------------------------------------------------
    def reply(self, req: SipRequest, status: int, reason: str, *, to_tag: str | None = None,
              headers=(), body: bytes = b"", content_type: str | None = None) -> None:
        if req.method == "ACK":
            return
        resp = make_response(req, status, reason, to_tag=to_tag, headers=list(headers), body=body,
                             content_type=content_type)
        self.tx.respond(req, resp)

    def new_tag(self, bekey: str) -> str:
        return f"{make_stamp(self.secret, bekey)}.{random_hex(8)}"

    # ---- requests ----------------------------------------------------------
    async def on_request(self, req: SipRequest, bekey: str) -> None:
        method = req.method
        if method == "ACK":
            self.tx.acked(req.call_id, req.cseq[0])     # a failure's too, the call gone with it
        if method not in ("ACK", "CANCEL") and req.has("Require"):
            # never applies to ACK and CANCEL (RFC 3261 §8.2.2.3)
            unknown = [t for t in req.values("Require") if t.lower() not in SUPPORTED_OPTIONS]
            if unknown:
                self.reply(req, 420, "Bad Extension", to_tag=None if req.to.tag else self.new_tag(bekey),
                           headers=[("Unsupported", ", ".join(unknown))])
                return
        if (self.auth is not None and (method == "REGISTER" or (method in ("INVITE", "MESSAGE", "SUBSCRIBE")
                                                                and req.to.tag is None))
                and not await authenticate(self, req)):
            return
        if method == "REGISTER":
            await register(self, req, bekey)
            return
        if req.to.tag is None:
            if method in ("INVITE", "MESSAGE", "SUBSCRIBE") and b_leg_hops(req) < 0:
                # what goes on from here would go with Max-Forwards -1
                self.reply(req, 483, "Too Many Hops", to_tag=self.new_tag(bekey))
            elif method == "INVITE":
                await self.new_call(req, bekey)
            elif method == "CANCEL":
                await self.cancel(req, bekey)
            elif method == "MESSAGE" or to_a_user(req):
                await self.forward(req, bekey)
            elif method == "SUBSCRIBE":
                await self.subscribe(req, bekey)
            elif method == "OPTIONS":
                # a ping of the server itself (no user): answered here
                self.reply(req, 200, "OK", to_tag=self.new_tag(bekey), headers=[("Allow", ALLOW)])
            elif method == "ACK":
                pass
            elif method in KNOWN_METHODS:
                self.reply(req, 405, "Method Not Allowed", headers=[("Allow", ALLOW)])
            else:
                self.reply(req, 501, "Not Implemented", headers=[("Allow", ALLOW)])
            return
        partner = self.partner_for(bekey, req)
        record = await self.load_call(bekey, partner)
        if method != "ACK" and self.overtaken(req):
            return
        if record is None:
            if method != "ACK":
                self.stats.inc("no_dialog")
                self.reply(req, 481, "Call/Transaction Does Not Exist")
            return
        leg = "a" if req.call_id == record["a"]["cid"] else "b"
        if method == "ACK":
            self.ack(req, record, leg)
        elif method == "BYE":
            await self.bye(req, bekey, record, leg)
        elif method == "CANCEL":
            self.reply(req, 200, "OK")
            self.cancel_relayed(req, record, leg)
        elif method in ("INVITE", "UPDATE", "INFO", "OPTIONS", "MESSAGE", "NOTIFY", "REFER", "SUBSCRIBE", "PRACK"):
            await self.relay_in_dialog(req, bekey, record, leg, partner)
        else:
            self.reply(req, 501, "Not Implemented", headers=[("Allow", ALLOW_IN_DIALOG)])

    async def load_call(self, bekey: str, partner: str | None, kind: str | None = "call") -> dict | None:
        """The call record, wherever it is: promoted from our replica
        keyspace or migrated from another node's Redis if need be (then
        logged and mirrored to `partner`). None if there is no such call
        (kind None: a record of any kind, a registration too)."""
        record, how = await self.store.load(bekey, self.others(bekey))
        if record is None or (kind is not None and record.get("k") != kind):
            return None
        call_id = record["a"]["cid"] if record.get("k") == "call" else None
        if how == "promoted" and call_id:
            self.stats.inc("dialogs", "promoted")
            event(log, "dialog_promoted", bekey=bekey, call_id=call_id, partner=partner)
        elif how not in ("active", "promoted") and call_id:
            self.stats.inc("dialogs", "migrated")
            _, source, space = how.split(":")
            event(log, "dialog_migrated", bekey=bekey, call_id=call_id, source=source,
                  keyspace=space, partner=partner)
        if how != "active":
            await self.store.save(bekey, record, partner, self.others(bekey))
        return record

    async def save_held(self, bekey: str, record: dict) -> None:
        """Save a call this node holds, mirrored where it is mirrored already
        (else to the partner the ring names)."""
        await self.store.save(bekey, record, record.get("p") or self.partner_for(bekey), self.others(bekey))

    # ---- a new call ------------------------------------------------------
    async def find_targets(self, req: SipRequest, bekey: str) -> tuple[list[tuple[str, list[str]]], bool, dict | None,
                                                                     list[list[list]]]:
        """-> ([(request-URI, route set)], registered, earlier, spares): every
        live contact of a registered AOR (newest first, each via its Path;
        a SIP outbound phone's newest flow, with the others as its spares:
        one_flow_each), else the upstream trunk, else nothing (404); and
        this call's record if one is stored already (resume_call), read in
        the registrar's MGET."""
        ruri = req.ruri
        gruu = gruu_of(self.secret, ruri)
        if gruu is not None:
            # one phone of the user (RFC 5627 §6): its bindings only; a GRUU
            # whose phone is not registered now gets 480, a forged one 404
            return await self.gruu_targets(bekey, *gruu)
        aor = bekey_of(ruri.aor()) if ruri.is_sip and ruri.user else None
        if aor is None:
            # no registrar look-up: where a resumed call's record would be
            # found, our own Redis (our replica of the dead node's, or our
            # own from before a restart), without waiting for the others
            earlier, reg = await self.store.peek(bekey, [self.id]), None
        else:
            earlier, reg = await self.store.peek_many([bekey, aor], rank(aor, self.node_ids))
        if reg is not None and reg.get("k") == "reg":
            live = live_bindings(reg)
            if live:
                targets, spares = one_flow_each(live)
                return targets, True, earlier, spares
        return self.upstream_target(req), False, earlier, []

    async def gruu_targets(self, bekey: str, aor: str, instance: str, cid_hash: str | None
                           ) -> tuple[list[tuple[str, list[str]]], bool, dict | None, list[list[list]]]:
        """find_targets for a GRUU: the live bindings of `instance` under
        `aor` (registered: True however many, so none gets 480, not 404)."""
        if not aor:
            return [], False, await self.store.peek(bekey, [self.id]), []
        key = bekey_of(aor)
        earlier, reg = await self.store.peek_many([bekey, key], rank(key, self.node_ids))
        live = live_bindings(reg) if reg is not None and reg.get("k") == "reg" else []
        targets, spares = one_flow_each([b for b in live if bound_to(b, instance, cid_hash)])
        return targets, reg is not None or cid_hash is not None, earlier, spares

    def not_found(self, req: SipRequest, registered: bool, tag: str) -> None:
        """No one to send `req` to: 404, or 480 for a phone that is known
        but not registered now (a GRUU's, RFC 5627 §6)."""
        if registered:
            self.reply(req, 480, "Temporarily Unavailable", to_tag=tag)
        else:
            self.reply(req, 404, "Not Found", to_tag=tag)

    def upstream_target(self, req: SipRequest) -> list[tuple[str, list[str]]]:
        """[each node.upstream with the request URI's user], in order, the
        ones set aside after a failure last."""
        ruri = req.ruri
        user = f"{ruri.user}@" if ruri.is_sip and ruri.user else ""
        ups = self.upstreams
        if self.upstream_down:
            now = time.monotonic()
            ups = sorted(ups, key=lambda up: self.upstream_down.get((up.host.lower(), up.port), 0) > now)
        return [(f"{up.scheme}:{user}{up.host if up.port is None else f'{up.host}:{up.port}'}"
                 f"{format_params(up.params)}", []) for up in ups]

    def set_aside(self, ruri: str, resp: SipResponse | None) -> float:
        """A trunk of several failed a call: no answer or 408 sets it aside
        (tried last) for 60 s, a 503 for its Retry-After (RFC 3261
        §21.5.4: no request to it meanwhile), so the next calls go
        straight to the next trunk instead of each waiting. -> seconds."""
        if resp is None or resp.status == 408:
            seconds = 60.0
        elif resp.status == 503 and (after := (resp.get("Retry-After") or "").split(";")[0].strip()).isdigit():
            seconds = float(min(int(after), 3600))
        else:
            return 0.0
        try:
            uri = parse_uri(ruri)
        except SipParseError:
            return 0.0
        self.upstream_down[(uri.host.lower(), uri.port)] = time.monotonic() + seconds
        return seconds

    async def new_call(self, req: SipRequest, bekey: str, resume: bool = True) -> None:
        self.came_in(req)
        targets, registered, earlier, spares = await self.find_targets(req, bekey)
        if self.overtaken(req):
            return
        if (resume and earlier is not None and earlier.get("k") == "call" and earlier["a"]["cid"] == req.call_id
                and earlier["a"]["rt"] == req.from_.tag):
            await self.resume_call(req, bekey)
            return
        replaces: list[list[str]] = []
        far = None
        if req.has("Replaces"):
            found = await self.replacing(req, bekey)
            if found is None:
                return                          # answered
            value, far = found
            replaces.append(["Replaces", value])
            if "replaces" in (t.lower() for t in req.values("Require")):
                replaces.append(["Require", "replaces"])
            if far is not None:
                # only the party of the replaced dialog can honour it
                targets, registered = [(far["tgt"], far["rs"])], False
        if not targets:
            self.not_found(req, registered, self.new_tag(bekey))
            return
        # trunks are tried one after the other (upstream_failover), a
        # registered user's phones all at once
        later = [] if registered else [uri for uri, _ in targets[1:]]
        targets = targets if registered else targets[:1]
        partner = self.partner_for(bekey, req)
        trying = self.trying_once_saved(req)
        a, b = self.legs(req, bekey, targets[0], registered)
        first_uri = b["tgt"]
        # one fork per contact (parallel forking): same B-leg Call-ID and
        # From-tag, a branch each; the first 2xx wins, the rest are cancelled
        forks = [{"ruri": u, "route": list(r), "br": new_branch(), "st": None, "by": self.id} for u, r in targets]
        for fork, spare in zip(forks, spares if registered and not far else ()):
            if spare:
                fork["sp"] = spare
        record = new_record(req, a, b, forks=forks)
        if not req.body:
            record["dof"] = 1
        if "100rel" in option_tags(req, "Require"):
            record["pr"] = 2
        elif "100rel" in option_tags(req, "Supported"):
            record["pr"] = 1
        if replaces:
            record["rp"] = replaces
            if far is not None:
                b["ru"] = far["ru"]
        if later:
            record["nx"] = later
        record["inv"] = inv = setup_copy(req)
        try:
            await self.store.save(bekey, record, partner, self.others(bekey))
            if self.overtaken(req):
                return
            self.stats.inc("dialogs", "created")
            event(log, "dialog_created", bekey=bekey, call_id=req.call_id, b_call_id=b["cid"],
                  target=first_uri, forks=len(forks) if len(forks) > 1 else None, partner=partner)
            for fork in forks:
                self.send_fork_invite(bekey, self.fork_invite(record, fork, inv), fork["br"],
                                      answer_within=self.upstream_timeout if later else None)
            self.in_setup[bekey] = record      # until a final answer or timeout (on_invite_response)
        finally:
            trying()

    def legs(self, req: SipRequest, bekey: str, target: tuple[str, list[str]], registered: bool) -> tuple[dict, dict]:
        """The two legs of a dialog `req` starts (a call, a subscription):
        a as the sender has it, b towards `target` (request URI, route)."""
        contact = req.contacts[0].uri if req.contacts else req.from_.uri
        a = {"cid": req.call_id, "lt": self.new_tag(bekey), "rt": req.from_.tag,
             "lu": without_tag(req.get("To")), "ru": without_tag(req.get("From")),
             "lc": 0, "rc": req.cseq[0], "tgt": contact, "rs": [r.raw for r in req.record_routes]}
        uri, route = target
        b = {"cid": f"{make_stamp(self.secret, bekey)}-{random_hex(12)}@sipha",
             "lt": self.new_tag(bekey), "rt": None, "lu": a["ru"],
             "ru": f"<{req.uri}>" if registered else f"<{uri}>",
             "lc": 1, "rc": 0, "tgt": uri, "rs": list(route)}
        return a, b

    # ---- subscriptions -----------------------------------------------------
    async def subscribe(self, req: SipRequest, bekey: str) -> None:
        """A SUBSCRIBE outside a dialog (RFC 6665: a buddy's presence, a busy
        lamp, message waiting) goes on to the user's newest live contact
        (else upstream, else 404), as a proxy without a presence server of
        its own does; peers that answer subscriptions do the rest. The
        subscription is a dialog through this node like a call (record
        `sub`, saved and mirrored): the notifier's NOTIFYs are relayed to
        the subscriber, its refreshes the other way, and the record goes
        with the NOTIFY that says terminated, or its Expires."""
        targets, registered, earlier, _ = await self.find_targets(req, bekey)
        if earlier and earlier.get("sub") and (earlier["a"]["cid"], earlier["a"]["rt"]) == (req.call_id, req.from_.tag):
            # the SUBSCRIBE again, here: the node that took it died before
            # the answer came, which the proxy brings here (stray_final);
            # a second subscription would leave the first one orphaned
            if earlier["st"] == "confirmed":
                self.reply(req, 200, "OK", to_tag=earlier["a"]["lt"], headers=[("Contact", self.contact)])
            return
        if (req.get("Event") or "").split(";")[0].strip().lower() == "message-summary":
            # message waiting (RFC 3842) is the voicemail's to tell, not the
            # user's own phone's: upstream, where the voicemail is, or none
            # (Kamailio's default configuration answers so too)
            targets, registered = self.upstream_target(req), False
            if not targets:
                self.reply(req, 404, "Not Found (no voicemail service)", to_tag=self.new_tag(bekey))
                return
        if not targets:
            self.not_found(req, registered, self.new_tag(bekey))
            return
        a, b = self.legs(req, bekey, targets[0], registered)
        record = new_record(req, a, b, sub=1, forks=[], ttl=subscription_ttl(req))
        await self.store.save(bekey, record, self.partner_for(bekey, req), self.others(bekey))
        self.stats.inc("dialogs", "created")
        event(log, "dialog_created", bekey=bekey, call_id=req.call_id, b_call_id=b["cid"], target=b["tgt"],
              kind="subscription", package=req.get("Event"))
        out = self.build(record, "b", "SUBSCRIBE", 1, body=req.body, content_type=req.get("Content-Type"),
                         hops=b_leg_hops(req), extra=carried_request(req))
        self.tx.request(out, lambda resp: self.spawn(bekey, self.on_subscribe_response(bekey, resp)))

    async def on_subscribe_response(self, bekey: str, resp: SipResponse | None) -> None:
        if resp is not None and resp.status < 200:
            return
        record = await self.load_call(bekey, self.partner_for(bekey))
        if record is None or not record.get("sub") or record["st"] != "early":
            return
        req = self.answerable("SUBSCRIBE", record["a"]["tgt"], record["ah"])
        if resp is None or resp.status >= 300:
            status, reason = (408, "Request Timeout") if resp is None else (resp.status, resp.reason)
            self.reply(req, status, reason, to_tag=record["a"]["lt"], headers=carried(resp) if resp else [])
            await self.store.delete(bekey, record)
            return
        record["b"].update(far_end(resp))
        record["st"] = "confirmed"
        record["ttl"] = subscription_ttl(resp, record["ttl"])
        await self.save_held(bekey, record)
        headers = self.dialog_headers(record) + [("Expires", v) for v in resp.values("Expires")[:1]]
        self.reply(req, resp.status, resp.reason, to_tag=record["a"]["lt"], headers=headers)

    async def replacing(self, req: SipRequest, bekey: str) -> tuple[str, dict | None] | None:
        """An INVITE's Replaces (RFC 3891: attended transfer, call pickup)
        names a dialog as its sender has it. When that dialog runs through
        us, its sender has one leg of a call and the callee the other,
        under another Call-ID and other tags: -> (the Replaces as the
        callee knows the dialog, that leg); the INVITE then goes to that
        leg's party whatever its request URI says (a transferor's
        Refer-To may name our Contact, or an AOR with several phones of
        which one has the dialog). A pickup names a ringing phone's early
        dialog, and so reaches the caller, who originated its own early
        dialog with us and may replace it (§7.1). A dialog not of ours
        (no stamp of ours in its tags or Call-ID) may be beyond us: ->
        (the Replaces as it came, None). None: answered here, 400 for a
        Replaces that names no dialog, 481 when the one it names is over
        (§3)."""
        value = req.get("Replaces") or ""
        call_id, _, params = value.partition(";")
        call_id = call_id.strip()
        try:
            p = split_params(params)
        except SipParseError:
            p = {}
        to_tag, from_tag = p.get("to-tag"), p.get("from-tag")
        if not call_id or not to_tag or not from_tag or len(req.values("Replaces")) > 1:
            self.reply(req, 400, "Bad Request (Replaces: one Call-ID with to-tag and from-tag)",
                       to_tag=self.new_tag(bekey))
            return None
        key = read_stamp(self.secret, to_tag) or read_stamp(self.secret, call_id)
        if key is None:
            return value, None
        record = await self.store.peek(key, rank(key, self.node_ids))
        # our tag is the sender's remote one: to-tag (§6.1). A call still
        # ringing has no callee tag saved (each phone rings with its own,
        # which only its answer makes ours): a pickup names one of those
        # early dialogs, and our stamped tag with its Call-ID is what
        # only the callee's side could have told the picker.
        leg = record and record.get("k") == "call" and next(
            (side for side in ("a", "b") if record[side]["cid"] == call_id and record[side]["lt"] == to_tag
             and (record[side]["rt"] == from_tag or (side == "b" and record[side]["rt"] is None))), None)
        far = leg and record[other(leg)]
        if not far or not far["rt"]:
            self.reply(req, 481, "Call/Transaction Does Not Exist (the dialog to replace)",
                       to_tag=self.new_tag(bekey))
            return None
        early = ";early-only" if "early-only" in p else ""
        return f"{far['cid']};to-tag={far['rt']};from-tag={far['lt']}{early}", far

    async def forward(self, req: SipRequest, bekey: str) -> None:
        """A MESSAGE outside a dialog (RFC 3428, softphones' chat), or an
        OPTIONS for a registered user (is she there, what can her phone
        do: RFC 3261 §11): sent on to every live contact of the user it
        is for (a MESSAGE else upstream, else 404), the first 2xx or else
        the best failure told the sender, as a forking proxy would; a 2xx
        with what it says of the phone (Allow, Accept, Supported... and
        its body). No dialog,
        so nothing is saved: should this node die meanwhile, the sender's
        retransmission reaches the partner, which sends it again.

        An OPTIONS for someone not registered here is answered here, 200,
        as one for no user: it is a carrier's ping of its trunk as often
        as not (sip:ping@..., its own number), which must neither go
        back up the trunk nor fail. One for a registered user needs
        credentials, as a MESSAGE does, when auth is on."""
        targets, registered, _, _ = await self.find_targets(req, bekey)
        tag = self.new_tag(bekey)
        if req.method == "OPTIONS" and not registered:
            self.reply(req, 200, "OK", to_tag=tag, headers=[("Allow", ALLOW)])
            return
        if req.method == "OPTIONS" and self.auth is not None and not await authenticate(self, req):
            return
        if not targets:
            self.not_found(req, registered, tag)
            return
        leg = {"cid": f"{make_stamp(self.secret, bekey)}-{random_hex(12)}@sipha", "lt": self.new_tag(bekey),
               "rt": None, "lu": without_tag(req.get("From")), "ru": without_tag(req.get("To"))}
        failures: list[SipResponse] = []
        told = False

        def answered(resp: SipResponse | None) -> None:
            nonlocal told
            if resp is None:
                resp = make_response(req, 408, "Request Timeout")
            if told or resp.status < 200:
                return
            if resp.status >= 300:
                failures.append(resp)
                if len(failures) < len(targets):
                    return                      # others may take it yet
                resp = best_failure(failures, lambda r: r.status)
            told = True
            if resp.status < 300 and req.method == "OPTIONS":
                self.reply(req, resp.status, resp.reason, to_tag=tag, body=resp.body,
                           content_type=resp.get("Content-Type") if resp.body else None,
                           headers=[(f.name, f.value) for f in resp.fields if f.key in CAPABILITIES])
            else:
                self.reply(req, resp.status, resp.reason, to_tag=tag, headers=carried(resp))

        for uri, route in targets:
            out = self.build({"b": dict(leg, tgt=uri, rs=list(route))}, "b", req.method, 1, body=req.body,
                             content_type=req.get("Content-Type"), hops=b_leg_hops(req), extra=carried_request(req))
            self.tx.request(out, answered)

    async def resume_call(self, req: SipRequest, bekey: str) -> None:
        """The caller's INVITE again, at a node other than the one that took
        it: that node died (or this one restarted) before the caller had
        its 100 Trying. The call goes on from its record rather than as a
        second call to the callee, whose answers to the first would find
        nobody (and a node restarting with the first record in its Redis
        would serve a dialog the caller does not have). The INVITE on
        each open fork goes out again as a retransmission of the first
        (same branch, the first sender's Via: the proxy makes its own
        branch from those, so the callee sees the same transaction), in
        case the first never left; the callee's answers come here, as the
        proxy sends what is for a dead node to the call's owner."""
        record = await self.load_call(bekey, self.partner_for(bekey, req))
        if record is None or record["a"]["cid"] != req.call_id:
            await self.new_call(req, bekey, resume=False)     # gone meanwhile: then it is new
            return
        if record["st"] != "early":
            # Answered: the callee sends its 2xx until it is ACKed, and it
            # reaches the caller from here (stray_2xx). The INVITE is
            # absorbed, as an INVITE server transaction does once it has
            # sent a 2xx (RFC 6026 §7.1): it may be a copy that waited in
            # the queue of a node that hung while the call went on at its
            # partner, and a 100 Trying after the caller's 200 and ACK is
            # a stray answer (SIPp aborts the call on it).
            event(log, "invite_absorbed", logging.DEBUG, bekey=bekey, call_id=req.call_id, state=record["st"])
            return
        if record.get("cancel"):
            self.answer_a(bekey, record, 487, "Request Terminated")
            return
        # Retransmitted (a lost copy would leave the caller waiting) only
        # while the call still rings in Redis: if the node that sent it is
        # alive after all (the ramp brought the caller's INVITE here), the
        # callee's answers go to it, and a copy after its 2xx and ACK would
        # be a new INVITE to the callee. For the same reason no answer here
        # gives the fork up only at Timer C, not Timer B.
        inv = record.get("inv") or setup_copy(req)
        for fork in record["forks"]:
            if fork["st"] is None:
                self.send_fork_invite(bekey, self.fork_invite(record, fork, inv), fork["br"], resumed=True)
        self.in_setup[bekey] = record
        self.reply(req, 100, "Trying")
        self.stats.inc("dialogs", "resumed")
        event(log, "dialog_resumed", bekey=bekey, call_id=req.call_id, b_call_id=record["b"]["cid"])

    def fork_invite(self, record: dict, fork: dict, inv: dict) -> SipRequest:
        """A fork's INVITE from the caller's as saved (`inv`, setup_copy),
        as the node that sent it first (fork_via) sent it: a copy from
        another node is a retransmission of it, byte for byte."""
        return self.build(outside_dialog(record), "b", "INVITE", 1, body=inv["body"].encode("latin-1"),
                          content_type=inv["ct"],
                          branch=fork["br"], ruri=fork["ruri"], routes=fork["route"], via=self.fork_via(fork),
                          hops=inv["mf"], extra=b_leg_extra(inv["x"], record))

    def send_fork_invite(self, bekey: str, invite: SipRequest, branch: str, resumed: bool = False,
                         answer_within: float | None = None) -> None:
        """Send one fork's INVITE."""
        on_response, expire = self.fork_handlers(bekey, branch)
        self.tx.request(invite, on_response, expire=expire, answer_within=answer_within,
                        still=(lambda: self.still_ringing(bekey, branch)) if resumed else None)

    def fork_handlers(self, bekey: str, branch: str) -> tuple:
        """-> (on_response, expire) of a fork's INVITE transaction: its
        answers, and its end at Timer C, go through the call's lock."""
        return (lambda resp: self.spawn(bekey, self.on_invite_response(bekey, branch, resp), resp),
                lambda: self.spawn(bekey, self.fork_expired(bekey, branch)))

    def setup_over(self, bekey: str) -> None:
        """Forget what this node kept in memory for a call's setup (the
        record as saved, the callee's early dialog): answered, given up,
        cancelled; what changes now is read from Redis."""
        self.in_setup.pop(bekey, None)
        self.early.pop(bekey, None)

    async def still_ringing(self, bekey: str, branch: str) -> bool:
        """Whether a fork has no answer yet, wherever the call is saved.
        When not, the resumed INVITE is given up here (Transactions), and
        with it what this node kept for the call's setup."""
        record = await self.store.peek(bekey, [self.id] + self.others(bekey))
        fork = record and record.get("k") == "call" and self.fork_of(record, branch)
        ringing = bool(fork) and record["st"] == "early" and not record.get("cancel") and fork["st"] is None \
            and not fork.get("tc")
        if not ringing:
            self.setup_over(bekey)
        return ringing

    # ---- what died with another node ------------------------------------
    def peers_seen_down(self, down: frozenset[str]) -> None:
        """The proxy's probe named the nodes it sees down: their partners
        take on what died with them, and what each node had mirrored to
        them is mirrored again elsewhere."""
        for nid in down - self.peers_down:
            if nid in self.node_ids:
                self._sweep(self.take_over(nid))
                self._sweep(self.mirror_again(nid))
        self.peers_down = down

    def _sweep(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)

    async def mirror_again(self, dead: str | None) -> None:
        """Our records mirrored to `dead` have no other copy now: each is
        saved again, to the partner the ring names among the nodes up (as
        Redis Cluster replicates again), so that a call or a registration
        also outlives this node dying next, before `dead` is back. `dead`
        None, at a restart with our Redis: those mirrored to a node no
        longer in the node list (removed from the cluster), or to none."""
        if dead is None:
            marks = [f'"p":"{n}"'.encode() for n in self.node_ids if n != self.id]
            if not marks:
                return                          # a single node: nowhere to mirror to

            def wanted(raw: bytes) -> bool:
                return not any(m in raw for m in marks)
        else:
            mark = f'"p":"{dead}"'.encode()

            def wanted(raw: bytes) -> bool:
                return mark in raw
        found = [bekey for bekey, _ in await self.records("active", wanted)]
        await self._each(found, lambda bekey: self._mirror_again(bekey, dead))
        if found:
            self.stats.inc("mirrored_again", n=len(found))
            event(log, "mirrored_again", node=self.id, partner_down=dead or "not in the node list",
                  records=len(found))

    async def _mirror_again(self, bekey: str, dead: str | None) -> None:
        record = await self.store.active(bekey)
        if record is not None and (record.get("p") == dead if dead else record.get("p") not in self.node_ids):
            await self.store.save(bekey, record, self.partner_for(bekey), self.others(bekey))

    async def take_over(self, dead: str | None) -> None:
        """What only `dead` had, of the replicas in our Redis (or, dead
        None, of our own active records after a restart):
        - calls still ringing: the dead node (or this one, restarted) ran
          their Timer C, and nothing else ends a call whose callee rang
          before the death and rings on without a word, to a caller who
          waits (SIPp, a gateway). Each is taken here, and its INVITE
          transactions with a Timer C from now (take_on): a callee ringing
          on says 180 again within it (every minute, RFC 3261 §13.3.1.1);
          one that does not is CANCELled at its end, and the caller hears
          408. An INVITE still unanswered SEND_AGAIN_AFTER later is sent
          again (send_again);
        - calls with a re-INVITE relayed and not answered yet: it is sent
          again then (relay_again), its sender having had 100 Trying;
        - every record whose active copy is gone with the dead node's
          Redis (its host died, or its Redis came back empty): our replica
          is the only copy left, promoted and mirrored at once rather than
          when the call's next request comes, by which time we may have
          died as well. What a node's Redis still holds stays there for
          its restart."""
        space = "active" if dead is None else "replica"
        owner = f'"o":"{dead}"'.encode()
        ringing, reinviting, others = [], [], []
        for bekey, raw in await self.records(space, lambda raw: dead is None or owner in raw):
            if not raw.startswith(b'{"k":"call"'):
                others.append(bekey)
            elif b'"st":"early"' in raw:
                ringing.append(bekey)
            elif b'"re":{' in raw:              # the copy of a relayed re-INVITE (record q)
                reinviting.append(bekey)
            else:
                others.append(bekey)
        lost = await self.store.lost_at(dead, others) if dead is not None and others else set()
        lost_ones = [bekey for bekey in others if bekey in lost]
        found = ringing + reinviting + lost_ones
        await self._each(found, self.take_on)
        counts = {"ringing": len(ringing), "reinviting": len(reinviting), "lost": len(lost_ones)}
        for what, n in counts.items():
            if n:
                self.stats.inc("taken_over", what, n=n)
        if found:
            event(log, "taken_over", node=self.id, keyspace=space, owner=dead or self.id, **counts)

    async def take_on(self, bekey: str) -> None:
        """A call still ringing, or with a re-INVITE relayed and not
        answered yet, taken on from a dead node (or from before a
        restart). The ringing call's INVITE transactions are adopted:
        answers come here, with a Timer C from now. And the dead node may
        have told the caller Trying before the call (or the re-INVITE) was
        saved and died before it went on (trying_once_saved, under a slow
        save): the caller sends nothing more, and the call waited for
        Timer C, or for ever. So what is still unanswered SEND_AGAIN_AFTER
        from now is sent again then (send_again), from the copy saved with
        the call. Not at once: a SIPp UAS that answered 180 and 200 takes
        a copy of the INVITE for a new message and aborts the call (it
        tells a retransmission only from the last message it answered),
        and its 2xx, sent again until the ACK, reaches us within T2."""
        record = await self.load_call(bekey, self.partner_for(bekey), kind=None)
        if record is None or record.get("k") != "call":
            return
        if record["st"] == "early":
            for fork in record["forks"]:
                if fork["st"] is None:
                    self.tx.adopt(fork["br"], *self.fork_handlers(bekey, fork["br"]))
            if record.get("inv") is None or record.get("cancel"):
                return
        elif "re" not in (record.get("q") or {}):
            return
        asyncio.get_running_loop().call_later(SEND_AGAIN_AFTER, lambda: self.spawn(bekey, self.send_again(bekey)))

    async def send_again(self, bekey: str) -> None:
        """What a call taken on (take_on) still has unanswered, if it is
        still ours: each open fork's INVITE, or the re-INVITE relayed, byte
        for byte as the dead node sent it (or would have); a callee that
        had it answers again what it answered."""
        try:
            record = await self.store.active(bekey)
        except StoreUnavailable:
            return
        if record is None or record.get("k") != "call" or record.get("cancel"):
            return
        if record["st"] != "early":
            q = record.get("q")
            if q and "re" in q:
                self.relay_again(bekey, record, q)
            return
        if bekey in self.early:
            return              # the callee has spoken here since: it has the INVITE
        inv = record.get("inv")
        unanswered = [f for f in record["forks"] if f["st"] is None and not f.get("tc")] if inv else []
        for fork in unanswered:
            self.send_fork_invite(bekey, self.fork_invite(record, fork, inv), fork["br"], resumed=True)
        if unanswered:
            self.stats.inc("dialogs", "sent_again")
            self.in_setup[bekey] = record
            event(log, "invite_sent_again", bekey=bekey, call_id=record["a"]["cid"], b_call_id=record["b"]["cid"])

    def relay_again(self, bekey: str, record: dict, q: dict) -> None:
        """A re-INVITE the dead node relayed (record `q`, its copy `re`)
        and had no final answer to: sent again, byte for byte as it went
        (or would have gone), and answered from here. Its sender had 100
        Trying and sends it no more; if the node died before it went on,
        nobody else would ever send it (one call short, SIPp waiting, in
        a chaos run with re-INVITEs)."""
        re, leg, far = q["re"], q["l"], other(q["l"])
        out = self.build(record, far, "INVITE", q["o"], body=re["body"].encode("latin-1"), content_type=re["ct"],
                         branch=q["br"], via=self.fork_via(q), extra=re["x"])
        orig = self.answerable("INVITE", record[leg]["tgt"], q["h"])
        contact = self.contact_of(self.fork_via(q))
        self.tx.request(out, lambda resp: self.spawn(
            bekey, self.on_relay_response(bekey, orig, leg, q["o"], resp, contact)),
            still=lambda: self.still_relaying(bekey, q["o"]))
        self.stats.inc("dialogs", "sent_again")
        event(log, "invite_sent_again", bekey=bekey, call_id=record["a"]["cid"], cseq=q["o"])

    async def still_relaying(self, bekey: str, out_cseq: int) -> bool:
        """Whether the re-INVITE sent again (relay_again) has no final
        answer yet, wherever the call is saved (else the node that relayed
        it is alive after all and had it)."""
        record = await self.store.peek(bekey, [self.id] + self.others(bekey))
        q = record and record.get("k") == "call" and record.get("q")
        return bool(q) and q["o"] == out_cseq and "re" in q

    async def records(self, space: str, wanted) -> list[tuple[str, bytes]]:
        """(BEKey, raw record) of a keyspace of our Redis, those `wanted`."""
        try:
            return [(bekey, raw) async for bekey, raw in self.store.scan(space) if wanted(raw)]
        except (RedisError, OSError) as exc:
            event(log, "redis_error", logging.ERROR, op="scan", keyspace=space, error=str(exc))
            return []

    async def _each(self, bekeys: list[str], step) -> None:
        """`step(bekey)` under each call's lock, a hundred at a time."""
        for i in range(0, len(bekeys), 100):
            await asyncio.gather(*(self._locked(bekey, step(bekey), None) for bekey in bekeys[i:i + 100]))

    async def fork_expired(self, bekey: str, branch: str) -> None:
        """Timer C: the callee rang for node.invite_timeout without a final
        answer (or a resumed INVITE had none at all). One CANCELled (the
        caller's CANCEL, an earlier Timer C) and still not answered may
        never have had the CANCEL: its node died after saving it and
        before it left (take_on adopted the fork). It is CANCELled again,
        and a caller that CANCELled is told 487 again (a copy, if it had
        it)."""
        record, fork = await self.open_fork(bekey, branch)
        if fork:
            await self.cancel_ringing(bekey, record, fork)
            return
        fork = record and self.fork_of(record, branch)
        if fork and record["st"] == "early" and fork["st"] is None:
            cancelled = bool(record.get("cancel"))
            self.send_cancel(record, fork, record.get("cx", ()) if cancelled else ())
            if cancelled:
                self.answer_a(bekey, record, 487, "Request Terminated")

    async def open_fork(self, bekey: str, branch: str) -> tuple[dict | None, dict | None]:
        """-> (the call, its fork `branch`), the fork None unless the call
        still rings there (no final answer, not cancelled, by us at Timer C
        either)."""
        record = await self.load_call(bekey, self.partner_for(bekey))
        fork = record and self.fork_of(record, branch)
        if not fork or record["st"] != "early" or record.get("cancel") or fork["st"] is not None or fork.get("tc"):
            return record, None
        return record, fork

    async def cancel_ringing(self, bekey: str, record: dict, fork: dict) -> None:
        """The fork is CANCELled; the 487 it gets is told the caller as 408
        Request Timeout (marked `tc`, saved: that answer may reach another
        node). A 2xx crossing the CANCEL still makes the call."""
        fork["tc"] = 1
        await self.save_held(bekey, record)
        self.send_cancel(record, fork)
        self.stats.inc("ring_timeouts")
        event(log, "fork_timeout", bekey=bekey, call_id=record["a"]["cid"], target=fork["ruri"])

    # ---- node.dialog_ttl ------------------------------------------------
    async def _expire_dialogs(self) -> None:
        while True:
            await asyncio.sleep(self.store.grace / 3)
            if not self.healthy:
                continue
            try:
                await self.expire_idle()
            except Exception as exc:    # a bug must not end the sweeps
                log.exception("expiry sweep")
                event(log, "internal_error", logging.ERROR, op="expire", error=repr(exc))

    async def expire_idle(self) -> int:
        """End the calls in our Redis that no request has saved for
        node.dialog_ttl, as Kamailio's dialog module does at its
        default_timeout: a BYE to each side, the call record (ended_by=
        timeout), the record gone. Before, the record just expired: the
        phone still in the call had its BYE answered 481 and not relayed,
        and the call had no call record. Our own calls first; a replica
        of a partner's from grace/2 later (it ends them itself, replica
        and all, unless it is dead). -> how many were ended."""
        due = []
        for space, within in (("active", self.store.grace), ("replica", self.store.grace / 2)):
            try:
                found = await self.store.idle(space, within)
            except (RedisError, OSError) as exc:
                event(log, "redis_error", logging.WARNING, op="expire", keyspace=space, error=str(exc))
                continue
            for bekey, raw in found:
                if raw.startswith(b'{"k":"call"') and bekey not in self.in_setup:
                    record = decode(raw)
                    if record.get("ttl"):              # a subscription: it expires by itself
                        continue
                    if space == "replica" and record["st"] == "early":
                        continue                        # may ring on at its owner (a dialog_ttl under Timer C)
                    due.append((bekey, space, raw, record))
        ended = [False] * len(due)

        async def end(i: int, bekey: str, space: str, raw: bytes, record: dict) -> None:
            ended[i] = await self.end_idle(bekey, space, raw, record)

        for i in range(0, len(due), 100):
            await asyncio.gather(*(self._locked(d[0], end(i + j, *d), None) for j, d in enumerate(due[i:i + 100])))
        return sum(ended)

    async def end_idle(self, bekey: str, space: str, raw: bytes, record: dict) -> bool:
        if not await self.store.take_if_unchanged(space, bekey, raw):
            return False                # a request saved it meanwhile: the call goes on
        if space == "active":
            await self.store.delete(bekey, record)                    # its replica
        else:
            await self.store.retire_old_owner(bekey, record.get("o"))
        answered = record["st"] != "early"
        if answered:
            self.bye_both(record, DIALOG_TTL_REASON)
        self.stats.inc("dialogs", "expired")
        event(log, "dialog_terminated", bekey=bekey, call_id=record["a"]["cid"], reason="node.dialog_ttl",
              idle_s=round(time.time() - record.get("ut", time.time())), keyspace=space)
        log_cdr(bekey, record, 200 if answered else 408, "timeout")
        return True

    def bye_both(self, record: dict, reason: str) -> None:
        """End a call the node ends itself: a BYE to each side."""
        for leg in ("a", "b"):
            record[leg]["lc"] += 1
            bye = self.build(record, leg, "BYE", record[leg]["lc"], extra=[("Reason", reason)])
            self.tx.request(bye, lambda r: None)

    # ---- what an operator asks (admin pages) -------------------------------
    async def calls(self, query: dict[str, str]) -> dict:
        """`/calls` (Kamailio's dlg.list): the calls and subscriptions this
        node holds (its active keyspace), oldest first; `?call_id=` for
        one, by either leg's Call-ID."""
        wanted = query.get("call_id")
        now = time.time()
        out = []
        for bekey, raw in await self.records("active", lambda raw: raw.startswith(b'{"k":"call"')):
            try:
                r = decode(raw)
                a, b = r["a"], r["b"]
                if wanted is not None and wanted not in (a["cid"], b["cid"]):
                    continue
                answered = r.get("at")
                out.append({"call_id": a["cid"], "b_call_id": b["cid"], "bekey": bekey,
                            "kind": "subscription" if r.get("sub") else "call", "state": r["st"],
                            "from": _uri_of(a["ru"]), "to": _uri_of(a["lu"]), "callee": b["tgt"],
                            "started": utc_time(r["ct"]), "answered": utc_time(answered) if answered else None,
                            "duration_s": round(now - answered) if answered else 0,
                            "partner": r.get("p"), "forks": len(r.get("forks") or ())})
            except (ValueError, KeyError, TypeError):
                continue                    # not a call as this version writes them
        return {"node": self.id, "calls": sorted(out, key=lambda c: c["started"])}

    async def hangup(self, query: dict[str, str]) -> dict:
        """`POST /hangup?call_id=` (Kamailio's dlg.end_dlg): end a call this
        node holds, answered, by either leg's Call-ID: a BYE to each side
        (Reason: ended by the operator), its call record (ended_by=
        operator), its records gone. A call still ringing is left alone
        (its caller can cancel it), as one held by another node (ask
        that one: `held_by` in `sipha calls`)."""
        call_id = (query.get("call_id") or "").strip()
        if not call_id:
            return {"node": self.id, "error": "call_id: missing (POST /hangup?call_id=CALL-ID)"}
        bekey = read_stamp(self.secret, call_id) or bekey_of(call_id)
        outcome: dict = {}

        async def end() -> None:
            record = await self.store.held(bekey)
            if not isinstance(record, dict) or record.get("k") != "call" \
                    or call_id not in (record["a"]["cid"], record["b"]["cid"]):
                outcome["error"] = (record if isinstance(record, str) and record
                                    else f"no call {call_id} held by {self.id}")
                return
            if record["st"] != "confirmed":
                outcome["error"] = f"call {call_id} is {record['st']}: only an answered call is ended here"
                return
            self.bye_both(record, OPERATOR_REASON)
            await self.store.delete(bekey, record)
            self.stats.inc("dialogs", "terminated")
            event(log, "dialog_terminated", bekey=bekey, call_id=record["a"]["cid"], reason="hangup by the operator")
            if not record.get("sub"):
                log_cdr(bekey, record, 200, "operator")
            outcome["ended"] = record["a"]["cid"]

        await self._locked(bekey, end(), None)
        return {"node": self.id, **(outcome or {"error": f"{self.id}'s Redis failed (see its log)"})}

    def fork_via(self, sent: dict) -> tuple[str, int]:
        """The Via sent-by of a fork's INVITE, or of the relayed request in
        record `q`: that of the node that sent it (`by`)."""
        try:
            return self.cfg.node(sent.get("by") or self.id).sip
        except ConfigError:
            return self.addr

    def trying_once_saved(self, req: SipRequest):
        """-> a function that sends the 100 Trying for `req` if it has not
        gone yet; call it once the call is saved and the INVITE it leads to
        has gone out. The 100 stops the caller's INVITE retransmissions
        (and the proxy's, for TCP), which would otherwise bring the INVITE
        to the partner if this node died first; a caller told Trying by a
        node that died before sending the INVITE on waits forever (seen in
        a kill under load). So it waits for both, but no longer than the
        200 ms RFC 3261 §17.2.1 allows (a slow save under load must not
        draw retransmissions)."""
        sent = False

        def send() -> None:
            nonlocal sent
            if not sent:
                sent = True
                if not self.stood_still_since(req):       # else overtaken: no word of it
                    self.reply(req, 100, "Trying")
        timer = asyncio.get_running_loop().call_later(TRYING_AFTER, send)

        def now() -> None:
            timer.cancel()
            send()
        return now

    def a_invite(self, record: dict) -> SipRequest:
        """The caller's INVITE as far as answering it needs (from `ah`)."""
        return self.answerable("INVITE", record["a"]["tgt"], record["ah"])

    @staticmethod
    def answerable(method: str, uri: str, headers: list) -> SipRequest:
        """A request as far as answering it needs, from saved headers."""
        return new_request(method, uri, headers)

    def dialog_headers(self, record: dict) -> list[tuple[str, str]]:
        """What an answer that makes the caller's dialog carries: its
        Record-Route as it came, and the Contact of the node that took the
        call (its first fork's sender), whichever node answers now. The
        callee sends its 180 again for an INVITE sent again (take_on,
        resume_call), and the caller then has a copy of the 180 the dead
        node relayed: the same bytes, it is a retransmission; with
        another Contact, a SIPp caller aborted the call on it. (The
        proxy routes the caller's requests by their BEKey, whatever node
        the Contact names.)"""
        forks = record.get("forks")
        return [("Record-Route", v) for n, v in record["ah"] if n.lower() == "record-route"] + \
            [("Contact", self.contact_of(self.fork_via(forks[0])) if forks else self.contact)]

    def contact_of(self, sip: tuple[str, int]) -> str:
        """Our Contact, or that of the node at `sip` (its copy of a message)."""
        return self.contact if sip == self.addr else f"<sip:{hostport(sip)}>"

    def answer_a(self, bekey: str, record: dict, status: int, reason: str, resp: SipResponse | None = None,
                 headers: list = ()) -> None:
        """`headers`: what a failure says ([name, value], see carried), or
        what a provisional answer says beyond the dialog's headers."""
        inv = self.a_invite(record)
        if 100 < status < 300:
            headers = self.dialog_headers(record) + list(headers)
            if status >= 200:
                headers += [("Allow", ALLOW_IN_DIALOG), ("Supported", SUPPORTED_IN_DIALOG)]
                headers += session_timer(resp) if resp is not None else []
        else:
            headers = list(headers)
        body = resp.body if resp is not None else b""
        ctype = resp.get("Content-Type") if resp is not None and resp.body else None
        out = make_response(inv, status, reason, to_tag=record["a"]["lt"], headers=headers, body=body,
                            content_type=ctype)
        self.tx.respond(inv, out, retransmit_2xx=True, still_ours=lambda: self.store.holds(bekey))
        if 200 <= status < 300:
            self.acks.grant(inv.call_id, inv.cseq[0])

    @staticmethod
    def fork_of(record: dict, branch: str) -> dict | None:
        return next((f for f in record.get("forks", []) if f["br"] == branch), None)

    async def on_invite_response(self, bekey: str, branch: str, resp: SipResponse | None,
                                 record: dict | None = None) -> None:
        """`record`: the call as just loaded, if the caller has it."""
        provisional = resp is not None and resp.status < 200
        if record is None and provisional and not self.draining:
            # (draining, the partner took the call's record on at the
            # proxy's probe: this copy may be stale)
            record = self.in_setup.get(bekey)
        if not provisional:
            # the setup is over (a final answer or a timeout): what changes
            # now is read from Redis, where a partner may have changed it
            self.setup_over(bekey)
        elif resp.to.tag:
            # the callee's early dialog, for a request the caller sends in
            # its own (relay_in_dialog): an UPDATE before the answer
            self.early[bekey] = far_end(resp)
        if record is None:
            # wherever it is: a request for this call may have taken it to
            # another node meanwhile (the ramp), while the answers to this
            # node's INVITE still come here
            record = await self.load_call(bekey, self.partner_for(bekey))
        if record is None:
            if resp is not None and 200 <= resp.status < 300:
                # answered after the call ended (CANCEL race): ACK and hang up
                await self._ack_and_bye_orphan(resp)
            return
        fork = self.fork_of(record, branch)
        if fork is None:
            return
        if resp is not None and resp.status < 200:
            if not record.get("cancel") and record["st"] == "early":
                await self.relay_provisional(bekey, record, resp)
            return
        if resp is None or resp.status >= 300:
            if resp is not None:
                self.ack_fork_failure(record, resp)
            if resp is None or (fork.get("tc") and resp.status == 487):
                fork["st"], fork["reason"] = 408, "Request Timeout"     # no answer, or Timer C
            else:
                fork["st"], fork["reason"] = resp.status, resp.reason
                if said := carried(resp):
                    fork["h"] = said
            if (fork.get("sp") and resp is not None and flow_failed(resp) and "inv" in record
                    and record["st"] == "early" and not record.get("cancel")):
                await self.next_flow(bekey, record, fork)
                return
            aside = self.set_aside(fork["ruri"], resp) if "nx" in record and not fork.get("tc") else 0.0
            if (record.get("nx") and "inv" in record and record["st"] == "early" and not record.get("cancel")
                    and not fork.get("tc") and (fork["st"] == 408 or 500 <= fork["st"] < 600)):
                await self.next_upstream(bekey, record, fork, aside)
                return
            await self._forks_done(bekey, record)
            return
        if record["st"] == "early" and not record.get("cancel"):
            fork["st"] = resp.status
            await self.confirm(bekey, record, resp)
            for other_fork in record["forks"]:
                if other_fork["st"] is None:
                    self.send_cancel(record, other_fork, ANSWERED_ELSEWHERE)
            return
        if record["st"] == "confirmed" and resp.to.tag == record["b"]["rt"]:
            self.answer_a(bekey, record, resp.status, resp.reason, resp)   # 2xx retransmission
            return
        # a second fork answered, or the caller cancelled meanwhile
        await self._ack_and_bye_orphan(resp)

    async def next_upstream(self, bekey: str, record: dict, failed: dict, aside: float) -> None:
        """The trunk this call went to failed it (408, 5xx, or no answer in
        node.upstream_timeout): the call goes to the next node.upstream,
        a new fork of the same B-leg, as Kamailio's dispatcher fails over
        in a failure route. The caller hears nothing of it but the wait.
        The INVITE is the one saved with the call (setup_copy), so the
        partner that took the call on does the same."""
        uri = record["nx"].pop(0)
        fork = {"ruri": uri, "route": [], "br": new_branch(), "st": None, "by": self.id}
        record["forks"].append(fork)
        await self.save_held(bekey, record)
        self.stats.inc("dialogs", "upstream_failover")
        event(log, "upstream_failover", logging.WARNING, bekey=bekey, call_id=record["a"]["cid"],
              failed=failed["ruri"], status=failed["st"], next=uri, set_aside_s=int(aside) or None)
        self.send_fork_invite(bekey, self.fork_invite(record, fork, record["inv"]), fork["br"],
                              answer_within=self.upstream_timeout if record["nx"] else None)
        self.in_setup[bekey] = record

    async def next_flow(self, bekey: str, record: dict, failed: dict) -> None:
        """The flow a SIP outbound phone was rung over is gone (the proxy's
        430, RFC 5626 §5.3): the phone is rung over its next newest flow
        (§7), a new fork of the same B-leg, as next_upstream does for a
        trunk. The caller hears nothing of it."""
        (uri, route), *rest = failed["sp"]
        fork = {"ruri": uri, "route": list(route), "br": new_branch(), "st": None, "by": self.id}
        if rest:
            fork["sp"] = rest
        record["forks"].append(fork)
        await self.save_held(bekey, record)
        self.stats.inc("dialogs", "flow_failover")
        event(log, "flow_failover", bekey=bekey, call_id=record["a"]["cid"], contact=failed["ruri"],
              failed=failed["route"][0] if failed["route"] else None, next=fork["route"][0] if fork["route"] else None)
        self.send_fork_invite(bekey, self.fork_invite(record, fork, record["inv"]), fork["br"])
        self.in_setup[bekey] = record

    async def relay_provisional(self, bekey: str, record: dict, resp: SipResponse) -> None:
        """The callee's provisional answer, told the caller. A reliable one
        (RFC 3262: Require 100rel, an RSeq) goes on reliably to a caller
        that takes them (record `pr`): the callee sends it again until the
        caller's PRACK reaches it, and each copy is relayed. RSeq counts
        per early dialog, and the caller has one with us where the callee
        side may have several (forks), so the caller gets numbers of our
        own, one up from the last (the first as the callee's); which
        callee answer each stands for is saved before the caller has it,
        so that whichever node the PRACK reaches can relay it."""
        # the callee uses preconditions (RFC 3312 §11: its answer says so)
        required = ["precondition"] if "precondition" in option_tags(resp, "Require") else []
        headers = []
        value = (resp.get("RSeq") or "").strip()
        rseq = int(value) if is_digits(value) and len(value) <= 10 else 0
        if record.get("pr") and resp.to.tag and "100rel" in option_tags(resp, "Require") and 0 < rseq < 2 ** 31:
            rel = record.setdefault("rel", [])
            mine = next((n for n, theirs, end in rel if (theirs, end["rt"]) == (rseq, resp.to.tag)), None)
            if mine is None:
                mine = rel[-1][0] % (2 ** 31 - 1) + 1 if rel else rseq
                rel.append([mine, rseq, far_end(resp)])
                del rel[:-8]             # each is PRACKed before the next: a few are plenty
                await self.save_held(bekey, record)
            required.insert(0, "100rel")
            headers = [("RSeq", str(mine))]
        if required:
            headers.insert(0, ("Require", ", ".join(required)))     # one line: some phones read only the first
        self.answer_a(bekey, record, resp.status, resp.reason, resp, headers)

    async def _forks_done(self, bekey: str, record: dict) -> None:
        """When every fork has failed, the caller gets the best final
        response (RFC 3261 §16.7: a 6xx first, else the lowest status)."""
        forks = record["forks"]
        if record["st"] != "early":
            return
        if any(f["st"] is None for f in forks):
            # the next fork's answer reads the record from Redis: it must
            # find this fork's failure there, or the caller never hears
            await self.save_held(bekey, record)
            return
        best = best_failure(forks, lambda f: f["st"])
        if not record.get("cancel"):
            self.answer_a(bekey, record, best["st"], best.get("reason") or "Failed", headers=best.get("h", ()))
        await self.store.delete(bekey, record)
        self.stats.inc("dialogs", "failed")
        event(log, "dialog_terminated", bekey=bekey, call_id=record["a"]["cid"],
              reason="cancelled" if record.get("cancel") else f"callee {best['st']}")
        if not record.get("sub"):
            log_cdr(bekey, record, 487 if record.get("cancel") else best["st"],
                    "caller" if record.get("cancel") else "callee")

    async def confirm(self, bekey: str, record: dict, resp: SipResponse) -> None:
        """The callee answered: take its dialog, save, relay the 2xx."""
        record["b"].update(far_end(resp))
        record["st"] = "confirmed"
        record["at"] = round(time.time(), 3)       # answered (the CDR's duration)
        record.pop("inv", None)                    # no trunk to fail over to any more
        record["ack"]["a"] = resp.cseq[0]   # the caller's ACK is relayed with this CSeq on leg b
        await self.save_held(bekey, record)
        self.answer_a(bekey, record, resp.status, resp.reason, resp)
        self.stats.inc("dialogs", "confirmed")
        event(log, "dialog_confirmed", bekey=bekey, call_id=record["a"]["cid"])

    async def stray_final(self, bekey: str, resp: SipResponse) -> None:
        """A final response to a request sent by a node that died before it
        had it (the proxy brings it to the call's new owner): this node
        holds the call now and finishes what the dead node started."""
        record = await self.load_call(bekey, self.partner_for(bekey))
        cseq, method = resp.cseq
        q = record and record.get("q")
        if q and (q["o"], q["m"]) == (cseq, method) and record[other(q["l"])]["cid"] == resp.call_id:
            await self.stray_relayed(bekey, record, resp)
        elif (method, cseq) == ("SUBSCRIBE", 1) and record is not None and record["b"]["cid"] == resp.call_id:
            await self.on_subscribe_response(bekey, resp)       # the subscriber waits for it
        elif method != "INVITE":
            event(log, "response_dropped", logging.DEBUG, status=resp.status, call_id=resp.call_id,
                  reason="no transaction")
        elif resp.status < 300:
            await self.stray_2xx(bekey, record, resp)
        elif record is not None and record["b"]["cid"] == resp.call_id:
            # the callee's failure (486, 480, 408...): the caller still waits
            # for a final answer, the callee for its ACK (RFC 3261 §17.2.1)
            await self.on_invite_response(bekey, resp.top_via.branch, resp, record)
        else:
            event(log, "response_dropped", logging.DEBUG, status=resp.status, call_id=resp.call_id,
                  reason="no call")

    async def stray_provisional(self, bekey: str, resp: SipResponse) -> None:
        """The callee rings or plays early media (a 183 with SDP; a 180 sent
        again, as a UAS does every minute, RFC 3261 §13.3.1.1) for an
        INVITE a node that died had sent: the caller hears it from here,
        and this node takes the INVITE transaction on, with its Timer C,
        which died with that node (else a callee that rings on would ring
        for ever)."""
        record, fork = await self.open_fork(bekey, resp.top_via.branch)
        if fork is None or record["b"]["cid"] != resp.call_id:
            return
        await self.relay_provisional(bekey, record, resp)
        self.tx.adopt(fork["br"], *self.fork_handlers(bekey, fork["br"]))

    async def stray_relayed(self, bekey: str, record: dict, resp: SipResponse) -> None:
        """The answer to an in-dialog request the dead node relayed (record
        `q`): the side that sent it waits for it (after a 100 Trying, a
        re-INVITE is never sent again)."""
        q = record["q"]
        orig = self.answerable(q["m"], record[q["l"]]["tgt"], q["h"])
        self.relay_answer(orig, resp, self.contact_of(self.fork_via(q)))
        if q["m"] != "INVITE":
            return
        far = other(q["l"])
        if resp.status >= 300:
            self.send_ack_for(record, far, q["o"], resp.top_via.branch)
            await self.relay_failed(bekey, record, q["l"], q["o"])
            return
        # as for a stray 2xx of the first INVITE, the ACK goes now: the
        # caller's ACK may have gone to the dead node
        if resp.contacts:
            record[far]["tgt"] = resp.contacts[0].uri
        record.get("ack", {}).pop(q["l"], None)
        relay_over(record, q["l"], q["o"])
        self.send_ack_for(record, far, q["o"])
        await self.save_held(bekey, record)
        event(log, "callee_acked", bekey=bekey, call_id=record["a"]["cid"], cseq=q["o"])

    async def stray_2xx(self, bekey: str, record: dict | None, resp: SipResponse) -> None:
        """A callee's (retransmitted) 2xx for an INVITE sent by a node that
        died before it could ACK: this node sends the ACK the callee is
        waiting for (and hangs up if the call is gone)."""
        if record is None or record["b"]["cid"] != resp.call_id:
            await self._ack_and_bye_orphan(resp)
            return
        cseq = resp.cseq[0]
        fork = self.fork_of(record, resp.top_via.branch)
        if record["st"] == "early" and (record.get("cancel") or fork is None or fork["st"] is not None) or (
                record["st"] == "confirmed" and resp.to.tag != record["b"]["rt"]):
            # answered as the caller gave up, or by another fork than the
            # one that won: that callee gets its ACK and a BYE
            await self._ack_and_bye_orphan(resp)
            return
        if record["st"] == "early":
            # it died before relaying the answer: the caller still waits
            fork["st"] = resp.status
            await self.confirm(bekey, record, resp)
            for other_fork in record["forks"]:
                if other_fork["st"] is None:
                    self.send_cancel(record, other_fork, ANSWERED_ELSEWHERE)
        elif cseq == 1:
            # It saved the answer, and may have died before relaying it: the
            # callee still sending its 2xx means no ACK got through, so the
            # caller may be waiting yet (seen in a kill under load: one call
            # in 300 hung). The caller gets the 2xx again; one it already
            # had is a retransmission, which it ACKs again (RFC 3261
            # §13.2.2.4), and this node takes that ACK.
            self.answer_a(bekey, record, resp.status, resp.reason, resp)
        if record.get("dof") and cseq == 1:
            return   # the caller's ACK carries the SDP answer: it is relayed (ack "a"), not made here
        if record.get("ack", {}).get("a") == cseq:
            del record["ack"]["a"]   # the caller's ACK will not be relayed twice
        self.send_ack_for(record, "b", cseq)
        await self.save_held(bekey, record)
        event(log, "callee_acked", bekey=bekey, call_id=record["a"]["cid"], cseq=cseq)

    async def _ack_and_bye_orphan(self, resp: SipResponse) -> None:
        contact = resp.contacts[0].uri if resp.contacts else resp.to.uri
        routes = [r.raw for r in reversed(resp.record_routes)]
        base = (f"Max-Forwards: 70\r\nFrom: {resp.get('From')}\r\nTo: {resp.get('To')}\r\n"
                f"Call-ID: {resp.call_id}\r\n" + "".join(f"Route: {r}\r\n" for r in routes))
        via = f"SIP/2.0/UDP {hostport(self.addr)}"
        ack = parse_request(f"ACK {contact} SIP/2.0\r\nVia: {via};branch={new_branch()};rport\r\n{base}"
                            f"CSeq: {resp.cseq[0]} ACK\r\nContent-Length: 0\r\n\r\n")
        self.tx.request(ack, lambda r: None)
        bye = parse_request(f"BYE {contact} SIP/2.0\r\nVia: {via};branch={new_branch()};rport\r\n{base}"
                            f"CSeq: {resp.cseq[0] + 1} BYE\r\nContent-Length: 0\r\n\r\n")
        self.tx.request(bye, lambda r: None)

    # ---- building requests ----------------------------------------------------
    def build(self, record: dict, leg: str, method: str, cseq: int, *, body: bytes = b"",
              content_type: str | None = None, branch: str | None = None, ruri: str | None = None,
              routes: list[str] | None = None, extra: list[tuple[str, str]] = (),
              via: tuple[str, int] | None = None, hops: int = 70) -> SipRequest:
        """A request on leg `leg` of a call. `via`: the sent-by of the
        node that sent it first (fork_via), whose Contact it also takes: a
        copy another node sends again is then the same request, byte for
        byte, as a retransmission must be (a SIPp UAS, which tells one by
        its bytes, aborted the call on a copy with another Contact)."""
        L = record[leg]
        via = via or self.addr
        contact = self.contact_of(via)
        to = L["ru"] + (f";tag={L['rt']}" if L["rt"] else "")
        routes = L["rs"] if routes is None else routes
        fields = [("Via", f"SIP/2.0/UDP {hostport(via)};branch={branch or new_branch()};rport"),
                  ("Max-Forwards", str(hops)),
                  ("From", f"{L['lu']};tag={L['lt']}"),
                  ("To", to),
                  ("Call-ID", L["cid"]),
                  ("CSeq", f"{cseq} {method}")]
        fields += [("Route", r) for r in routes]
        if method in ("INVITE", "UPDATE", "SUBSCRIBE", "REFER", "NOTIFY"):
            fields.append(("Contact", contact))
        # one Supported (ours and any `extra` names) and one Require: SIPp,
        # and some phones, read only a first one
        required = [v for n, v in extra if n.lower() == "require"]
        if method == "INVITE":
            supported = [SUPPORTED_IN_DIALOG] + [v for n, v in extra if n.lower() == "supported"]
            extra = [(n, v) for n, v in extra if n.lower() != "supported"]
            fields += [("Allow", ALLOW_IN_DIALOG), ("Supported", ", ".join(supported))]
        if required:
            fields.append(("Require", ", ".join(required)))
        fields += [(n, v) for n, v in extra if n.lower() != "require"]
        if body and content_type:
            fields.append(("Content-Type", content_type))
        return new_request(method, ruri or L["tgt"], fields, body)

    def ack_fork_failure(self, record: dict, resp: SipResponse) -> None:
        """ACK a fork's failure: the ACK belongs to the INVITE transaction,
        same R-URI, Route, branch and Via as that fork's INVITE (RFC 3261
        §17.1.1.3)."""
        fork = self.fork_of(record, resp.top_via.branch)
        if fork is None:
            return
        b = dict(record["b"], rt=resp.to.tag)
        ack = self.build({"b": b}, "b", "ACK", 1, branch=fork["br"], ruri=fork["ruri"],
                         routes=fork["route"], via=self.fork_via(fork))
        self.tx.request(ack, lambda r: None)

    # ---- in-dialog requests ------------------------------------------------
    def ack(self, req: SipRequest, record: dict, leg: str) -> None:
        if not self.acks.take(req.call_id, req.cseq[0]):
            return  # a copy for a 2xx the far side did not send again (AckGate)
        cseq = record.get("ack", {}).pop(leg, None)
        if cseq is None:
            return  # ACK of a non-2xx we sent, or a retransmission
        ack = self.build(record, other(leg), "ACK", cseq, body=req.body,
                         content_type=req.get("Content-Type"))
        self.tx.request(ack, lambda r: None)
        # Not saved: the only change is that this ACK was relayed, and the
        # AckGate keeps the caller's further copies here. Should a partner
        # take the call over from the replica, it relays the first copy it
        # sees once more, which the callee takes as the 2xx retransmission's
        # ACK. Two Redis writes a call fewer.

    async def bye(self, req: SipRequest, bekey: str, record: dict, leg: str) -> None:
        self.reply(req, 200, "OK")
        far = other(leg)
        record[far]["lc"] += 1
        bye = self.build(record, far, "BYE", record[far]["lc"], extra=carried_request(req))
        self.tx.request(bye, lambda r: None)
        await self.store.delete(bekey, record)
        self.stats.inc("dialogs", "terminated")
        event(log, "dialog_terminated", bekey=bekey, call_id=record["a"]["cid"],
              reason="bye from caller" if leg == "a" else "bye from callee")
        log_cdr(bekey, record, 200, "caller" if leg == "a" else "callee")

    async def cancel(self, req: SipRequest, bekey: str) -> None:
        record = await self.load_call(bekey, self.partner_for(bekey, req))
        if self.overtaken(req):
            return
        gone = record is None or record["a"]["cid"] != req.call_id
        if gone and not self.tx.answered(req, "INVITE"):
            self.reply(req, 481, "Call/Transaction Does Not Exist")
            return
        if gone or record["st"] != "early" or record.get("cancel"):
            # answered meanwhile (a 486 the CANCEL crossed, whose call is
            # gone): the CANCEL matched all the same, so 200, and it changes
            # nothing (RFC 3261 §9.2)
            self.reply(req, 200, "OK")
            return
        record["cancel"] = True
        if said := carried_request(req):
            record["cx"] = said                 # for the CANCELs sent again (take_on)
        self.setup_over(bekey)
        # Saved before a word goes out: a node that dies first leaves the
        # caller sending its CANCEL again (to the partner); one that dies
        # after leaves a record that says cancelled, whose CANCELs (and
        # 487) the partner sends again at Timer C if no answer came
        # (fork_expired). Before, a node dead between its CANCELs and the
        # save left a ringing call the partner sent the INVITE again for.
        try:
            await self.store.save(bekey, record, self.partner_for(bekey, req), self.others(bekey))
        except BaseException:
            self.say_cancelled(bekey, record, req)      # as before the save failed
            raise
        if self.overtaken(req):
            return
        self.say_cancelled(bekey, record, req)
        event(log, "dialog_cancelled", bekey=bekey, call_id=record["a"]["cid"])

    def say_cancelled(self, bekey: str, record: dict, req: SipRequest) -> None:
        """The caller's CANCEL `req` of a call ringing (record `cancel`):
        200 to it, a CANCEL to each fork not answered yet, 487 to the
        INVITE."""
        self.reply(req, 200, "OK")
        for fork in record["forks"]:
            if fork["st"] is None:
                self.send_cancel(record, fork, record.get("cx", ()))
        self.answer_a(bekey, record, 487, "Request Terminated")

    def send_cancel(self, record: dict, fork: dict, extra: list[tuple[str, str]] = ()) -> None:
        """CANCEL one fork: same R-URI, Route, branch, CSeq number, From and
        To as its INVITE (RFC 3261 §9.1), so no To tag: it carried the tag
        of the phone that answered, or of one that rang."""
        cancel = self.build(outside_dialog(record), "b", "CANCEL", 1, branch=fork["br"], ruri=fork["ruri"],
                            routes=fork["route"], via=self.fork_via(fork), extra=extra)
        self.tx.request(cancel, lambda r: None)

    async def relay_in_dialog(self, req: SipRequest, bekey: str, record: dict, leg: str, partner) -> None:
        L = record[leg]
        far = other(leg)
        q = record.get("q")
        again = q and (q["l"], q["c"], q["m"], q["o"]) == (leg, req.cseq[0], req.method, record[far]["lc"])
        if again and req.method == "INVITE" and record.get("ack", {}).get(leg) == q["o"]:
            # Its 2xx came back and was relayed (the record waits for the
            # sender's ACK of it): a copy that waited in the queue of a
            # node that hung while the node that relayed it finished it.
            # Absorbed, as the call's first INVITE is (resume_call): a 100
            # Trying after the 200 would be a stray answer.
            event(log, "invite_absorbed", logging.DEBUG, bekey=bekey, call_id=req.call_id, cseq=req.cseq[0])
            return
        if again:
            # Relayed by a node that died before the answer came back (this
            # node would have answered a retransmission of its own from its
            # transaction cache): it goes on again as a retransmission of
            # what that node sent (its Via and branch, the same CSeq), so
            # the far side answers again what it answered, if it had it,
            # rather than taking it a second time (a NOTIFY, a DTMF). The
            # record is as it was saved.
            out_cseq = q["o"]
            branch, via = q.get("br"), self.fork_via(q)
        elif req.cseq[0] <= L["rc"]:
            self.reply(req, 500, "Server Internal Error (CSeq out of order)", headers=[("Retry-After", "1")])
            return
        extra = carried_request(req)
        if req.method in ("NOTIFY", "SUBSCRIBE"):
            refer_ids(record, leg, extra)
        if req.method == "PRACK" and leg == "a":
            # the caller acknowledges a reliable provisional answer by the
            # RSeq we gave it: the callee gets its own, in its early dialog
            found = self.acknowledged(req, record)
            if found is None:
                return                          # answered
            rseq, end = found
            extra.append(("RAck", f"{rseq} 1 INVITE"))     # every B-leg INVITE is CSeq 1
            if record["st"] == "early" and not again:
                record["b"].update(end)
        elif not again and record[far]["rt"] is None and far == "b" and not record.get("sub"):
            # before the answer: the callee's early dialog (RFC 3311 §5.1),
            # that of its last provisional answer here
            early = self.early.get(bekey)
            if early is None:
                self.reply(req, 481, "Call/Transaction Does Not Exist (no early dialog with the callee)")
                return
            record["b"].update(early)
        trying = self.trying_once_saved(req) if req.method == "INVITE" else (lambda: None)
        if not again:
            L["rc"] = req.cseq[0]
            sub = record.get("sub") and req.method in ("SUBSCRIBE", "NOTIFY")
            if (req.method in ("INVITE", "UPDATE") or sub) and req.contacts:
                L["tgt"] = req.contacts[0].uri   # target refresh (RFC 3261 §12.2.2, RFC 6665 §4.1.2.1)
            if leg == "b" and L["rt"] is None:
                # the callee's request before its 2xx: an UPDATE in its early
                # dialog, a NOTIFY before the SUBSCRIBE's 2xx (RFC 6665 §4.1.2.4)
                L["rt"] = req.from_.tag
            if sub and req.method == "SUBSCRIBE":
                record["ttl"] = subscription_ttl(req)
            record[far]["lc"] += 1
            out_cseq = record[far]["lc"]
            branch, via = new_branch(), None
            record["q"] = {"l": leg, "m": req.method, "c": req.cseq[0], "o": out_cseq, "h": answering(req),
                           "br": branch, "by": self.id}
            if req.method == "INVITE":
                record["q"]["re"] = setup_copy(req)     # until its final answer (relay_again)
            elif req.method == "REFER":
                remember_refer(record, far, out_cseq, req.cseq[0])
        try:
            if not again:
                await self.store.save(bekey, record, partner, self.others(bekey))
            out = self.build(record, far, req.method, out_cseq, body=req.body, branch=branch, via=via,
                             content_type=req.get("Content-Type"), extra=extra)
            self.tx.request(out, lambda resp: self.spawn(
                bekey, self.on_relay_response(bekey, req, leg, out_cseq, resp), resp))
        finally:
            trying()

    def cancel_relayed(self, req: SipRequest, record: dict, leg: str) -> None:
        """A CANCEL of a re-INVITE (RFC 3261 §9: the user gave up a video
        upgrade, a transfer's hold) goes on to the far side, for the
        re-INVITE relayed for it (record `q`: its CSeq, branch and
        sender), which then answers it 487, relayed back. Before, the
        CANCEL was answered here and the far side went on ringing its
        user, or the sender's re-INVITE timed out (some phones hang up
        then)."""
        q = record.get("q")
        if not q or (q["l"], q["m"], q["c"]) != (leg, "INVITE", req.cseq[0]):
            return
        cancel = self.build(record, other(leg), "CANCEL", q["o"], branch=q.get("br"),
                            via=self.fork_via(q), extra=carried_request(req))
        self.tx.request(cancel, lambda r: None)

    def acknowledged(self, req: SipRequest, record: dict) -> tuple[int, dict] | None:
        """-> (the callee's RSeq, its early dialog) of the reliable
        provisional answer a caller's PRACK names by its RAck (record
        `rel`); None when answered here: 400 for an RAck that names none,
        481 when it is not one we relayed (RFC 3262 §3)."""
        rack = (req.get("RAck") or "").split()
        if len(rack) != 3 or not is_digits(rack[0]) or not is_digits(rack[1]) or len(rack[0]) > 10:
            self.reply(req, 400, "Bad Request (RAck: response number, CSeq number, method)")
            return None
        found = next(((theirs, end) for mine, theirs, end in record.get("rel", ())
                      if mine == int(rack[0]) and rack[2].upper() == "INVITE"), None)
        if found is None:
            self.reply(req, 481, "Call/Transaction Does Not Exist (no such reliable provisional response)")
        return found

    async def on_relay_response(self, bekey: str, orig: SipRequest, leg: str, out_cseq: int,
                                resp: SipResponse | None, contact: str | None = None) -> None:
        """`contact`: that of the node that relayed the request first
        (relay_again), for a copy of its answer to be the same bytes."""
        if resp is None:
            self.reply(orig, 408, "Request Timeout")
        else:
            self.relay_answer(orig, resp, contact)
        if orig.method == "NOTIFY" and (orig.get("Subscription-State") or "").lower().startswith("terminated"):
            # the subscription is over (RFC 6665 §4.1.3): its record goes
            record = await self.load_call(bekey, self.partner_for(bekey))
            if record is not None and record.get("sub"):
                await self.store.delete(bekey, record)
                self.stats.inc("dialogs", "terminated")
                event(log, "dialog_terminated", bekey=bekey, call_id=record["a"]["cid"], reason="subscription ended")
            return
        if orig.method != "INVITE" or (resp is not None and resp.status < 200):
            return
        if resp is not None and resp.status < 300:
            self.acks.grant(orig.call_id, orig.cseq[0])
        record = await self.load_call(bekey, self.partner_for(bekey))
        if record is None:
            return
        if resp is None:
            if relay_over(record, leg, out_cseq):
                await self.save_held(bekey, record)
        elif resp.status < 300:
            far = other(leg)
            if resp.contacts:
                record[far]["tgt"] = resp.contacts[0].uri
            record.setdefault("ack", {})[leg] = out_cseq
            relay_over(record, leg, out_cseq)
            await self.save_held(bekey, record)
        else:
            # the far side expects its ACK for the failed re-INVITE
            self.send_ack_for(record, other(leg), out_cseq, resp.top_via.branch)
            await self.relay_failed(bekey, record, leg, out_cseq)

    async def relay_failed(self, bekey: str, record: dict, leg: str, out_cseq: int) -> None:
        """A re-INVITE from `leg` failed (487 after its CANCEL, 491, 488):
        the ACK its sender sends for the failure is the transaction's own
        (RFC 3261 §17.1.1.3), not one to relay; what the record still says
        of a 2xx ACK to relay from that leg (ack() relays the first one
        without saving) would send the far side an ACK of its old 2xx
        again, which SIPp takes for a broken call. And the re-INVITE is
        over: no copy of it for a takeover to send again (relay_over)."""
        forgot = record.get("ack", {}).pop(leg, None) is not None
        if relay_over(record, leg, out_cseq) or forgot:
            await self.save_held(bekey, record)

    def relay_answer(self, orig: SipRequest, resp: SipResponse, contact: str | None = None) -> None:
        """Answer `orig` as the far side answered the request relayed for
        it, with our Contact or `contact`."""
        headers = [("Contact", contact or self.contact)] \
            if orig.method in ("INVITE", "UPDATE") and resp.status < 300 else []
        if orig.method in ("INVITE", "UPDATE") and 200 <= resp.status < 300:
            headers += session_timer(resp)      # a refresh's answer (RFC 4028 §9)
        if orig.method == "SUBSCRIBE" and 200 <= resp.status < 300:
            headers += [("Expires", v) for v in resp.values("Expires")[:1]]   # RFC 6665 §4.2.1.1
        headers += carried(resp)
        self.reply(orig, resp.status, resp.reason, headers=headers, body=resp.body,
                   content_type=resp.get("Content-Type") if resp.body else None)

    def send_ack_for(self, record: dict, leg: str, cseq: int, branch: str | None = None) -> None:
        """ACK an INVITE sent on `leg`: a 2xx's ACK is a new transaction,
        a failure's belongs to the INVITE's (its branch)."""
        self.tx.request(self.build(record, leg, "ACK", cseq, branch=branch), lambda r: None)

