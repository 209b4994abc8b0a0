"""Real softphones (baresip) through a local cluster: they register, call
each other, hold and resume, hang up, refuse, cancel, transfer, ring on
two phones of one user and answer digest challenges, as users do; a
call goes on when the node that set it up dies with its Redis, and a
phone is called when the node holding its registration did. Media flows
phone to phone (the B2BUA carries the SDP), so a call's RTCP summary
must show packets both ways."""
from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

from softphone import Baresip, installed

pytestmark = pytest.mark.e2e


@pytest.fixture
def phone(procs):
    if not installed():
        if os.environ.get("CI"):
            pytest.fail("CI needs baresip (package baresip-core; .ci/install adds it)")
        pytest.skip("baresip is not installed (apt-get install baresip-core)")
    made: list[Baresip] = []

    def make(user: str, proxy: tuple[str, int], **kw) -> Baresip:
        made.append(Baresip(procs, user, proxy, **kw))
        made[-1].registered()
        return made[-1]
    yield make
    for p in made:
        p.close()


def nodes_that_logged(cluster, *needles: str, seconds: float = 3.0) -> list[str]:
    """The nodes with a log line holding all of `needles` (the one that
    created a call, that took a registration), once there is one."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = [nid for nid in cluster.state["nodes"]
                 if any(all(n in line for n in needles)
                        for line in (cluster.dir / "logs" / f"{nid}.log").read_text(errors="replace").splitlines())]
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no node logged {needles}")


def answered_offer(caller: Baresip, callee: Baresip, command: str) -> None:
    """`command` (hold, resume) on the caller: a re-INVITE, whose offer the
    callee gets and whose answer the caller gets back."""
    a, b = caller.mark(), callee.mark()
    assert caller.command(command)["ok"]
    assert callee.wait("CALL_REMOTE_SDP", since=b)["param"] == "offer"
    assert caller.wait("CALL_REMOTE_SDP", since=a)["param"] == "answer"


def test_softphones_call_and_the_call_outlives_its_node(make_cluster, phone):
    c = make_cluster(nodes=2, trunk=None)
    alice, bob = phone("alice", c.proxy_addr), phone("bob", c.proxy_addr)
    assert alice.command("dial", f"sip:bob@{c.proxy_host}")["ok"]
    call_id = alice.wait("CALL_ESTABLISHED")["id"]
    bob.wait("CALL_ESTABLISHED")
    owner, = nodes_that_logged(c, "event=dialog_created ", f" call_id={call_id} ")
    partner = next(n for n in c.state["nodes"] if n != owner)
    time.sleep(5)                   # an RTCP report each way
    c.kill(owner)                   # the host is lost: its Redis with it
    time.sleep(0.5)
    answered_offer(alice, bob, "hold")
    answered_offer(alice, bob, "resume")
    assert "ESTABLISHED" in alice.calls() and "ESTABLISHED" in bob.calls()
    assert bob.command("hangup")["ok"]
    assert "peer" in alice.wait("CALL_CLOSED")["param"]
    bob.wait("CALL_CLOSED")
    records = [r for r in c.call_records(at_least=1) if r["call_id"] == call_id]
    assert [(r["proc"], r["status"], r["ended_by"]) for r in records] == [(partner, "200", "callee")], records
    for p in (alice, bob):
        (summary,) = p.media()
        assert int(summary.get("PR", 0)) > 0 and int(summary.get("PS", 0)) > 0, (p.user, summary)


def test_softphones_refuse_cancel_and_miss_over_tcp(make_cluster, phone):
    c = make_cluster(nodes=2, trunk=None)
    alice = phone("alice", c.proxy_addr, transport="tcp")
    bob = phone("bob", c.proxy_addr, transport="tcp", answer="manual")
    bob_uri = f"sip:bob@{c.proxy_host}"

    # bob refuses: alice hears his busy
    b = bob.mark()
    assert alice.command("dial", bob_uri)["ok"]
    bob.wait("CALL_INCOMING", since=b)
    a = alice.mark()
    assert bob.command("hangup")["ok"]
    assert "486" in alice.wait("CALL_CLOSED", since=a)["param"]

    # alice gives up while bob's phone rings: his stops
    a, b = alice.mark(), bob.mark()
    assert alice.command("dial", bob_uri)["ok"]
    bob.wait("CALL_INCOMING", since=b)
    alice.wait("CALL_RINGING", since=a)
    assert alice.command("hangup")["ok"]
    bob.wait("CALL_CLOSED", since=b)

    # nobody of that name
    a = alice.mark()
    assert alice.command("dial", f"sip:nobody@{c.proxy_host}")["ok"]
    assert "404" in alice.wait("CALL_CLOSED", since=a)["param"]

    statuses = sorted(r["status"] for r in c.call_records(at_least=2) if r.get("callee", "").startswith("sip:bob"))
    assert statuses == ["486", "487"], statuses
    assert "ESTABLISHED" not in alice.calls() + bob.calls()


def test_a_softphone_transfers_a_call(make_cluster, phone):
    """bob's transfer button (a blind transfer: REFER to alice): alice
    calls carol, and bob hears how it went from alice's NOTIFYs, which
    name his REFER by his own CSeq (refer_ids): he hangs up once carol
    answered, and alice never hears that the transfer failed."""
    c = make_cluster(nodes=2, trunk=None)
    alice, bob, carol = (phone(user, c.proxy_addr) for user in ("alice", "bob", "carol"))
    assert alice.command("dial", f"sip:bob@{c.proxy_host}")["ok"]
    alice.wait("CALL_ESTABLISHED")
    bob.wait("CALL_ESTABLISHED")
    a = alice.mark()
    assert bob.command("transfer", f"sip:carol@{c.proxy_host}")["ok"]
    assert alice.wait("CALL_ESTABLISHED", since=a)["peeruri"].startswith(f"sip:carol@{c.proxy_host}")
    carol.wait("CALL_ESTABLISHED")
    assert bob.wait("CALL_CLOSED")["param"] == "Call transfered"      # baresip's spelling
    assert "TRANSFER_FAILED" not in [e["type"] for e in alice.events]
    assert "ESTABLISHED" in carol.calls() and "ESTABLISHED" not in bob.calls()
    a = alice.mark()
    assert carol.command("hangup")["ok"]
    alice.wait("CALL_CLOSED", since=a)


def test_a_users_two_phones_ring_and_one_takes_the_call(make_cluster, phone):
    """bob has a desk phone and a softphone: both ring, the softphone
    answers, the desk phone stops ringing (its CANCEL answered 200, its
    INVITE 487) and the call goes on with the one that answered."""
    c = make_cluster(nodes=2, trunk=None)
    alice = phone("alice", c.proxy_addr)
    desk = phone("bob", c.proxy_addr, answer="manual", device="-desk")
    soft = phone("bob", c.proxy_addr, device="-soft")
    assert alice.command("dial", f"sip:bob@{c.proxy_host}")["ok"]
    alice.wait("CALL_ESTABLISHED")
    soft.wait("CALL_ESTABLISHED")
    desk.wait("CALL_INCOMING")
    desk.wait("CALL_CLOSED")
    assert "ESTABLISHED" in soft.calls() and "INCOMING" not in desk.calls()
    log = desk.proc.text()
    assert 'Reason: SIP;cause=200;text="Call completed elsewhere"' in log and "SIP/2.0 487" in log


def trace(phone: Baresip, since: int = 0, count: int = 0, seconds: float = 5.0) -> list[str]:
    """The first lines of the REGISTERs, INVITEs, OPTIONS and responses
    in `phone`'s SIP trace (each after its `UDP a -> b` line), from the
    `since`th on, once there are `count` of them (or as they are after
    `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        lines = phone.proc.text().splitlines()
        said = [line for before, line in zip(lines, lines[1:])
                if before.startswith(("UDP ", "TCP ")) and " -> " in before
                and line.startswith(("SIP/2.0 ", "REGISTER ", "INVITE ", "OPTIONS "))][since:]
        if len(said) >= count or time.monotonic() > deadline:
            return said
        time.sleep(0.05)


def test_softphones_answer_the_digest_challenges(make_cluster, phone, monkeypatch, tmp_path):
    """With auth.users_file, baresip registers (401, then its credentials),
    calls (407) and asks another phone what it can do (OPTIONS, 407); a
    wrong password registers nothing. baresip 1.0 gave up on every
    challenge while a SHA-256 one came with the MD5 one: MD5 alone is the
    default (auth.algorithms)."""
    users = tmp_path / "users"
    users.write_text("alice:wonderland\nbob:builder\nmallory:guessed\n")
    monkeypatch.setenv("SIPHA_AUTH_USERS_FILE", str(users))
    c = make_cluster(nodes=2, trunk=None)
    alice = phone("alice", c.proxy_addr, password="wonderland")
    bob = phone("bob", c.proxy_addr, password="builder")
    assert alice.command("dial", f"sip:bob@{c.proxy_host}")["ok"]
    alice.wait("CALL_ESTABLISHED")
    bob.wait("CALL_ESTABLISHED")
    said = trace(alice)
    assert said[:7] == ["REGISTER sip:127.0.0.1;transport=udp SIP/2.0", "SIP/2.0 401 Unauthorized",
                        "REGISTER sip:127.0.0.1;transport=udp SIP/2.0", "SIP/2.0 200 OK",
                        "INVITE sip:bob@127.0.0.1;transport=udp SIP/2.0", "SIP/2.0 407 Proxy Authentication Required",
                        "INVITE sip:bob@127.0.0.1;transport=udp SIP/2.0"], said
    n = len(said)
    assert alice.command("options", f"sip:bob@{c.proxy_host}")["ok"]
    assert trace(alice, n, 4) == ["OPTIONS sip:bob@127.0.0.1 SIP/2.0", "SIP/2.0 407 Proxy Authentication Required",
                                  "OPTIONS sip:bob@127.0.0.1 SIP/2.0", "SIP/2.0 200 OK"]
    assert any(line.startswith("OPTIONS sip:bob-") for line in bob.proc.text().splitlines())
    assert alice.command("options", f"sip:nobody@{c.proxy_host}")["ok"]     # a ping: answered, unchallenged
    assert trace(alice, n + 4, 2) == ["OPTIONS sip:nobody@127.0.0.1 SIP/2.0", "SIP/2.0 200 OK"]
    assert bob.command("hangup")["ok"]
    alice.wait("CALL_CLOSED")
    with pytest.raises(AssertionError, match="not registered .*ERR"):
        phone("mallory", c.proxy_addr, password="wrong")


def test_a_phone_whose_registrar_node_died_is_called_over_tcp_with_early_media(make_cluster, phone):
    """bob registered over TCP on a node that then dies with its Redis: his
    binding is in the partner's replica, his TCP flow at the proxy, so
    alice's call reaches him. His phone answers with early media first
    (183 with SDP): alice has his answer to her offer before he picks up
    (baresip 1.0 itself sends no sound before then)."""
    c = make_cluster(nodes=2, trunk=None)
    bob = phone("bob", c.proxy_addr, transport="tcp", answer="early")
    alice = phone("alice", c.proxy_addr, transport="tcp")
    registrar, = nodes_that_logged(c, "event=registration_added aor=sip:bob@")
    c.kill(registrar)
    time.sleep(0.5)
    assert alice.command("dial", f"sip:bob@{c.proxy_host}")["ok"]
    alice.wait("CALL_PROGRESS")
    assert alice.wait("CALL_REMOTE_SDP")["param"] == "answer"      # the 183's
    assert "ESTABLISHED" not in alice.calls()
    assert bob.command("accept")["ok"]
    alice.wait("CALL_ESTABLISHED")
    bob.wait("CALL_ESTABLISHED")
    a = alice.mark()
    assert bob.command("hangup")["ok"]
    alice.wait("CALL_CLOSED", since=a)


def test_an_outbound_phone_keeps_its_udp_flow_with_stun(make_cluster, phone, monkeypatch):
    """baresip set for SIP outbound (its Contact has +sip.instance and
    reg-id) registers over UDP: the proxy, its first hop, marks its Path
    `ob`, so the registrar answers Require: outbound with our Flow-Timer;
    the phone then sends STUN Binding requests to the proxy's SIP port
    at that pace and, answered, stays registered and is called over its
    flow. Unanswered, libre drops its registration and starts over. It
    says Supported: gruu too, and gets its GRUUs (RFC 5627). (Over TCP
    libre's CRLF keep-alives come 20 s apart at the soonest: the
    transport's test answers one.)"""
    monkeypatch.setenv("SIPHA_NODE_FLOW_TIMER", "2")
    c = make_cluster(nodes=2, trunk=None)
    alice = phone("alice", c.proxy_addr, sipnat="outbound")
    bob = phone("bob", c.proxy_addr)
    register, answer = alice.proc.text().split("SIP/2.0 200 OK", 1)
    assert ";reg-id=1" in register.rsplit("REGISTER ", 1)[1] and "+sip.instance" in register.rsplit("REGISTER ", 1)[1]
    ok = answer.split("\n\n", 1)[0]
    assert "Require: outbound" in ok and "Flow-Timer: 2" in ok, ok
    assert 'pub-gruu="sip:alice@127.0.0.1;gr=urn:uuid:' in ok and 'temp-gruu="sip:tgruu.' in ok, ok   # it said Supported: gruu
    assert "Require: outbound" not in bob.proc.text()
    admin = f"http://127.0.0.1:{c.state['proxy']['admin']}/status"
    time.sleep(4.5)                 # a keep-alive every 1.6-2 s
    counters = json.loads(urllib.request.urlopen(admin, timeout=3).read())["counters"]
    assert counters.get("events{kind=stun_keepalive}", 0) >= 2, counters
    assert "OK" in alice.registered()
    registrations = sum(line.startswith("REGISTER ") for line in alice.proc.text().splitlines())
    assert registrations == 1       # no flow failure made it register again
    a = alice.mark()
    assert bob.command("dial", f"sip:alice@{c.proxy_host}")["ok"]
    alice.wait("CALL_ESTABLISHED", since=a)
    bob.wait("CALL_ESTABLISHED")
    assert alice.command("hangup")["ok"]
    bob.wait("CALL_CLOSED")
