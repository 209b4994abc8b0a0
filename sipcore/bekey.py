"""BEKey, BEKey stamps and the ring: the one routing function shared by the
proxy and the nodes (DESIGN.md, "The way a request travels").

BEKey: 16 hex digits (64 bits of BLAKE2b). An initial request's BEKey hashes
its Call-ID; a REGISTER's hashes its address of record, so every binding of
an AOR lives on one node.

Stamp: nodes write `sph<bekey><mac>` into every tag and B-leg Call-ID they
generate; the MAC is 8 hex digits of BLAKE2b keyed with the cluster secret.
The proxy reads the BEKey back from any later request of the call. A stamp
whose MAC does not verify is ignored, so an outsider cannot steer a call to
a node of its choosing.

Ring: rendezvous (highest-random-weight) hashing. rank(bekey) orders all
configured nodes by BLAKE2b(node id, bekey); it is deterministic across
processes and machines, spreads keys evenly without virtual nodes, and
removing or adding a node moves only the keys whose first choice that node
is. The owner is the first healthy node in rank that admits the key under
its load factor; the partner is the node that would be owner if the owner
were down, so a replica sits exactly where failover lands.

Admission under a load factor f (0 < f <= 1, ramp-up after a restart) is a
second, independent hash of (node, bekey) mapped to [0, 1): a key is
admitted when it falls below f, so a key once admitted stays admitted while
f grows.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from typing import Iterable, Mapping

from .expiring import remember

STAMP_PREFIX = "sph"
# The header the proxy adds to tell the node the BEKey, owner and partner;
# stripped from anything arriving from or leaving for outside the cluster.
ROUTE_HEADER = "X-Sipha-Route"
# In a node's answer to the proxy's probe: it restarted with N active
# records still in its Redis, so its calls can go straight back to it.
WARM_HEADER = "X-Sipha-Warm"
# In the proxy's health probe: the nodes it sees down, so that the others
# take on what died with them and mirror again what was mirrored there.
DOWN_HEADER = "X-Sipha-Down"
# In a node's 503 to the probe: its own Redis does not answer, so it can
# finish nothing it has in hand; the answers to the requests it sent go to
# the calls' partners, which hold the replicas.
STORE_DOWN_HEADER = "X-Sipha-Store-Down"
# In the request a drained node sends each proxy's probe socket as it
# exits: the answers to what it sent go to the partners from now on, not
# once a probe has gone unanswered.
LEAVING_HEADER = "X-Sipha-Leaving"
_STAMP_RE = re.compile(r"sph([0-9a-f]{16})([0-9a-f]{8})")


def _h64(*parts: str) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p.encode("utf-8", "surrogateescape"))
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "big")


# what the byte paths ask for every message of a call, remembered: the
# messages of a call's set-up come within a second or two, so a few
# thousand entries do (4096: ~1 MB each, per process)
_MEMO_SIZE = 4096
_BEKEYS: dict[str, str] = {}
_STAMPS: dict[str, tuple[bytes, str | None]] = {}     # text -> (secret, BEKey)


def bekey_of(text: str) -> str:
    """BEKey of a Call-ID or an address of record (remembered: the
    requests of a call ask for their Call-ID's one after another)."""
    key = _BEKEYS.get(text)
    if key is None:
        key = f"{_h64('bekey', text):016x}"
        remember(_BEKEYS, text, key, _MEMO_SIZE)
    return key


def _mac(secret: bytes, bekey: str) -> str:
    return hashlib.blake2b(bekey.encode(), digest_size=4, key=secret[:64]).hexdigest()


def make_stamp(secret: bytes, bekey: str) -> str:
    return f"{STAMP_PREFIX}{bekey}{_mac(secret, bekey)}"


def read_stamp(secret: bytes, text: str | None) -> str | None:
    """The BEKey stamped into a tag or Call-ID, if one verifies."""
    if not text or STAMP_PREFIX not in text:
        return None
    known = _STAMPS.get(text)            # a dialog's tag, seen in each of its messages
    if known is not None and known[0] == secret:
        return known[1]
    found = None
    for m in _STAMP_RE.finditer(text):
        bekey, mac = m.group(1), m.group(2)
        if hmac.compare_digest(mac, _mac(secret, bekey)):
            found = bekey
            break
    remember(_STAMPS, text, (secret, found), _MEMO_SIZE)
    return found


_RANKS: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}


def rank(bekey: str, nodes: Iterable[str]) -> list[str]:
    """All nodes, best first, for this BEKey. Remembered (a hash per node
    and a sort, asked several times for every message of a call); the
    memory is bounded and forgotten all at once when full."""
    key = (bekey, tuple(nodes))
    order = _RANKS.get(key)
    if order is None:
        order = tuple(sorted(key[1], key=lambda n: (-_h64("rank", n, bekey), n)))
        remember(_RANKS, key, order, 16384)
    return list(order)


def admits(node: str, bekey: str, load_factor: float) -> bool:
    if load_factor >= 1.0:
        return True
    if load_factor <= 0.0:
        return False
    return _h64("admit", node, bekey) / 2**64 < load_factor


def choose(bekey: str, nodes: Iterable[str], healthy: Mapping[str, float],
           exclude: frozenset | set = frozenset(),
           order: list[str] | None = None) -> tuple[str | None, str | None, bool]:
    """-> (owner, partner, ramp_skipped). `order` is rank(bekey, nodes) when
    the caller has it already.

    `healthy` maps each healthy node to its load factor; missing nodes are
    down. The owner is the first healthy node in rank that admits the key;
    the partner is the owner's choice with the owner removed.
    `ramp_skipped` tells whether a healthy node earlier in rank turned the
    key away under its load factor.
    """
    if order is None:
        order = rank(bekey, nodes)
    owner = partner = None
    skipped = False
    for n in order:
        if n in exclude or n not in healthy:
            continue
        if not admits(n, bekey, healthy[n]):
            if owner is None:
                skipped = True
            continue
        if owner is None:
            owner = n
        else:
            partner = n
            break
    if owner is None:
        # every node up is ramping and turns this key away (nodes started
        # again one after another, each while the last still ramps): the
        # ramp moves load while there is somewhere to move it, and a call
        # on a ramping node is better than a 503
        owner = next((n for n in order if n in healthy and n not in exclude), None)
    if owner is not None and partner is None:
        # every other node is turning this key away under its load factor
        # or is down: a ramping node still holds a replica better than none
        for n in order:
            if n != owner and n in healthy and n not in exclude:
                partner = n
                break
    return owner, partner, skipped
