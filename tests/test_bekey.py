"""sipcore.bekey: BEKeys, stamps and the ring shared by proxy and nodes."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter

from sipcore.bekey import admits, bekey_of, choose, make_stamp, rank, read_stamp

SECRET = b"test-secret"
NODES = ["node1", "node2", "node3", "node4"]


def test_bekey_is_stable_across_processes():
    out = subprocess.run([sys.executable, "-c", "from sipcore.bekey import bekey_of, rank;"
                          "print(bekey_of('abc@host'), rank(bekey_of('abc@host'), ['node1','node2','node3']))"],
                         capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"})
    key = bekey_of("abc@host")
    assert out.stdout.split()[0] == key and len(key) == 16
    assert str(rank(key, ["node1", "node2", "node3"])) in out.stdout


def test_stamp_round_trips_inside_a_tag():
    key = bekey_of("call-1")
    tag = f"{make_stamp(SECRET, key)}.7f3a"
    assert read_stamp(SECRET, tag) == key


def test_forged_or_foreign_stamps_are_ignored():
    key = bekey_of("call-1")
    stamp = make_stamp(SECRET, key)
    forged = stamp[:-8] + "00000000"
    assert read_stamp(SECRET, forged) is None
    assert read_stamp(b"other-secret", stamp) is None
    assert read_stamp(SECRET, "sph" + "0" * 24) is None
    assert read_stamp(SECRET, None) is None


def test_a_remembered_stamp_is_only_ever_read_with_its_own_secret():
    """read_stamp remembers what it found in a tag (a dialog's messages
    repeat it): the same tag read with another secret is checked again,
    not answered from memory, and the memory stays bounded."""
    from sipcore import bekey
    key = bekey_of("call-2")
    tag = make_stamp(SECRET, key)
    for _ in range(2):
        assert read_stamp(SECRET, tag) == key
        assert read_stamp(b"other-secret", tag) is None
    assert read_stamp(SECRET, tag) == key
    for i in range(bekey._MEMO_SIZE + 10):
        read_stamp(SECRET, f"sph{i:024x}")
        bekey_of(f"call-{i}")
    assert len(bekey._STAMPS) <= bekey._MEMO_SIZE and len(bekey._BEKEYS) <= bekey._MEMO_SIZE
    assert bekey_of("call-1") == bekey._h64("bekey", "call-1").to_bytes(8, "big").hex()


def test_ring_balance_with_four_nodes_and_100k_keys():
    owners = Counter(rank(f"{i:016x}", NODES)[0] for i in range(100_000))
    mean = 100_000 / len(NODES)
    assert max(owners.values()) <= mean * 1.10


def test_removing_a_node_moves_only_its_keys():
    keys = [bekey_of(f"k{i}") for i in range(20_000)]
    before = {k: rank(k, NODES)[0] for k in keys}
    after = {k: rank(k, NODES[:3])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "node4" for k in moved)


def test_adding_a_node_moves_keys_only_to_it():
    keys = [bekey_of(f"k{i}") for i in range(20_000)]
    before = {k: rank(k, NODES)[0] for k in keys}
    after = {k: rank(k, NODES + ["node5"])[0] for k in keys}
    assert all(after[k] == "node5" for k in keys if before[k] != after[k])


def test_owner_and_partner_with_all_up():
    key = bekey_of("x")
    order = rank(key, NODES)
    assert choose(key, NODES, {n: 1.0 for n in NODES}) == (order[0], order[1], False)


def test_partner_is_where_failover_lands():
    for i in range(200):
        key = bekey_of(f"call-{i}")
        up = {n: 1.0 for n in NODES}
        owner, partner, _ = choose(key, NODES, up)
        del up[owner]
        assert choose(key, NODES, up)[0] == partner


def test_no_healthy_node_means_no_owner():
    assert choose(bekey_of("x"), NODES, {}) == (None, None, False)


def test_admission_is_monotonic_in_the_load_factor():
    keys = [bekey_of(f"k{i}") for i in range(5000)]
    admitted_low = {k for k in keys if admits("node1", k, 0.1)}
    admitted_high = {k for k in keys if admits("node1", k, 0.5)}
    assert admitted_low <= admitted_high
    assert 350 < len(admitted_low) < 650


def test_ramping_node_turns_keys_to_their_next_choice():
    keys = [bekey_of(f"k{i}") for i in range(4000)]
    mine = [k for k in keys if rank(k, NODES)[0] == "node1"]
    health = {n: 1.0 for n in NODES}
    health["node1"] = 0.1
    results = [choose(k, NODES, health) for k in mine]
    kept = [r for r in results if r[0] == "node1"]
    assert 0.03 * len(mine) < len(kept) < 0.2 * len(mine)
    assert all(r[2] for r in results if r[0] != "node1")


def test_a_key_every_ramping_node_turns_away_still_gets_an_owner():
    """Nodes restarted one after another (a rolling upgrade, a node added),
    each while the one before still ramps: a key none of them admits yet
    goes to its first in rank, rather than to nobody (a 503 to the caller)."""
    health = {"node1": 0.2, "node3": 0.3}
    keys = [bekey_of(f"k{i}") for i in range(2000)]
    refused = [k for k in keys if not any(admits(n, k, lf) for n, lf in health.items())]
    assert refused
    for k in refused:
        up_in_rank = [n for n in rank(k, NODES) if n in health]
        assert choose(k, NODES, health) == (up_in_rank[0], up_in_rank[1], True)
