"""node.sip.AckGate: which ACKs of a 2xx a node relays."""
from __future__ import annotations

from node.sip import AckGate


def test_one_ack_goes_on_for_each_2xx_relayed():
    gate = AckGate()
    gate.grant("c1", 1)
    assert gate.take("c1", 1)
    assert not gate.take("c1", 1)          # the caller ACKs a copy the callee never sent
    gate.grant("c1", 1)                     # the callee sent its 2xx again: our ACK was lost
    assert gate.take("c1", 1) and not gate.take("c1", 1)
    assert gate.take("c1", 2)               # a re-INVITE's ACK is another one


def test_an_ack_of_a_2xx_relayed_elsewhere_goes_on_once():
    gate = AckGate()
    assert gate.take("c2", 1) and not gate.take("c2", 1)


def test_entries_expire_and_stay_bounded():
    gate = AckGate(ttl=-1.0, limit=100)
    assert gate.take("c3", 1) and gate.take("c3", 1)      # 64*T1 later it is new again
    gate = AckGate(limit=100)
    for i in range(1000):
        gate.take(f"c{i}", 1)
    assert len(gate.entries) <= 101
