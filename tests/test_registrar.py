"""node.registrar against a real Redis: what the registrar refuses."""
from __future__ import annotations

import pytest

from nodekit import UDP, register, settled, with_headers, with_nodes
from sipcore.message import SipMessage, parse_message

pytestmark = pytest.mark.e2e


def again(msg: SipMessage, cseq: int, contacts: str) -> SipMessage:
    """`msg` (a REGISTER) sent again with another CSeq and Contact."""
    text = msg.to_bytes().decode()
    text = text.replace("CSeq: 1 REGISTER", f"CSeq: {cseq} REGISTER")
    head, rest = text.split("Contact: ", 1)
    return parse_message((head + f"Contact: {contacts}\r\n" + rest.split("\r\n", 1)[1]).encode())


def test_an_aor_binds_at_most_max_contacts(tmp_path):
    """Without a limit, a phone that registers a new contact at every
    network change (or anyone with the password) made one AOR ring, and
    its record grow, without end. Past node.max_contacts a REGISTER that
    adds gets 403 and changes nothing; refreshing or removing still works."""
    async def scenario(nodes, sent):
        n, = nodes
        first = register("gina", ["<sip:gina@192.0.2.60:5060>", "<sip:gina@192.0.2.61:5060>"])
        steps = [first,
                 again(first, 2, "<sip:gina@192.0.2.62:5060>"),                 # a third: refused
                 again(first, 3, "<sip:gina@192.0.2.61:5060>;expires=600"),     # a refresh
                 again(first, 4, "<sip:gina@192.0.2.60:5060>;expires=0"),       # a removal
                 again(first, 5, "<sip:gina@192.0.2.62:5060>")]                 # room again
        for msg in steps:
            n.on_message(msg, *UDP)
            await settled(n)
        return sent[n]

    answers = with_nodes(tmp_path, 1, scenario, {"node.max_contacts": "2"})
    assert [(a.status, a.reason) for a in answers] == [
        (200, "OK"), (403, "Forbidden (too many registered contacts, at most 2)"), (200, "OK"), (200, "OK"),
        (200, "OK")]
    assert [len(a.contacts) for a in answers] == [2, 0, 2, 1, 2]


def test_outbound_flows_only_through_an_edge_that_keeps_them(tmp_path):
    """RFC 5626 §6: a Contact's reg-id names a flow only when the phone's
    first hop (the last Path entry) is an edge proxy that keeps flows
    (`ob` in its URI); then one instance may have two flows bound, and the
    2xx says Require: outbound (with node.flow_timer as Flow-Timer) so the
    phone keeps them alive. Through any other hop the reg-id is ignored:
    a second REGISTER of the instance replaces its binding."""
    instance = ';+sip.instance="<urn:uuid:00000000-0000-1000-8000-000a95a0e128>"'
    edge = "<sip:192.0.2.1;lr;flow=udp:192.0.2.60:5060;ob>"
    plain = "<sip:192.0.2.1;lr;flow=udp:192.0.2.60:5060>"

    async def scenario(nodes, sent):
        n, = nodes
        for user, path in (("olga", edge), ("otto", plain), ("oleg", None)):
            first = register(user, [f"<sip:{user}@192.0.2.60:5060>{instance};reg-id=1"])
            second = again(first, 2, f"<sip:{user}@192.0.2.61:5070>{instance};reg-id=2")
            for msg in (first, second):
                n.on_message(with_headers(msg, [("Path", path)] if path else []), *UDP)
                await settled(n)
        return sent[n]

    answers = with_nodes(tmp_path, 1, scenario, {"node.flow_timer": "20"})
    assert [a.status for a in answers] == [200] * 6
    assert [len(a.contacts) for a in answers] == [1, 2, 1, 1, 1, 1]
    assert [(a.get("Require"), a.get("Flow-Timer")) for a in answers] == [("outbound", "20")] * 2 + [(None, None)] * 4


def test_a_temporary_gruu_reads_back_only_with_our_secret_and_names_nobody():
    from node.registrar import _cid_hash, read_temp_gruu, temp_gruu
    from sipcore.headers import parse_uri
    aor, instance = "sip:gina@example.com", "<urn:uuid:00000000-0000-1000-8000-000000000001>"
    one, two = (temp_gruu(b"s" * 32, aor, instance, "boot-1") for _ in range(2))
    assert one != two                                   # a new one at every REGISTER (§5.4)
    uri = parse_uri(one)
    assert uri.host == "example.com" and "gr" in uri.params and uri.params["gr"] is None
    assert "gina" not in one and "uuid" not in one
    assert read_temp_gruu(b"s" * 32, uri.user) == (aor, instance, _cid_hash("boot-1"))
    assert read_temp_gruu(b"t" * 32, uri.user) is None                  # another cluster's
    flipped = uri.user[:-1] + ("a" if uri.user[-1] != "a" else "b")
    for bad in (flipped, uri.user[:20], "tgruu.", "tgruu.!!!!", "gina"):
        assert read_temp_gruu(b"s" * 32, bad) is None, bad
