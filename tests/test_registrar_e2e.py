"""The registrar through the proxy (RFC 3261 §10.3, Path per RFC 3327), and
calls to registered users forked to all their contacts."""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time

import pytest

from clusterkit import all_keys, calls_reach, run, uac
from phone import Phone
from sipha.cluster import admin_get

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(make_cluster, monkeypatch):
    monkeypatch.setenv("SIPHA_NODE_MIN_EXPIRES", "1")
    return make_cluster(nodes=2, trunk=None)


def contacts_of(resp) -> dict[str, int]:
    return {c.uri: c.expires for c in resp.contacts}


def test_register_several_contacts_refresh_and_remove_all(cluster):
    p = Phone("carol", cluster.proxy_addr)
    try:
        resp = p.register(300, contacts="<sip:carol@127.0.0.1:7001>, <sip:carol@127.0.0.1:7002>;expires=120")
        assert resp.status == 200
        got = contacts_of(resp)
        assert 295 <= got["sip:carol@127.0.0.1:7001"] <= 300 and 115 <= got["sip:carol@127.0.0.1:7002"] <= 120
        assert resp.paths, "the 200 echoes the Path the proxy added (RFC 3327)"
        resp = p.register(600, contacts="<sip:carol@127.0.0.1:7002>", cseq=2)
        assert contacts_of(resp)["sip:carol@127.0.0.1:7002"] > 590            # refreshed
        assert "sip:carol@127.0.0.1:7001" in contacts_of(resp)              # kept
        resp = p.register(0, contacts="*", cseq=3)
        assert resp.status == 200 and not resp.contacts
        assert all(not s["active"] and not s["replica"] for s in all_keys(cluster).values())
    finally:
        p.stop()


def test_bindings_expire_on_time(cluster):
    p = Phone("dave", cluster.proxy_addr)
    try:
        assert p.register(2).status == 200
        other = Phone("dave", cluster.proxy_addr)
        resp = other.register(300, call_id="second-device")
        assert len(resp.contacts) == 2
        time.sleep(2.5)
        resp = other.register(300, call_id="second-device", cseq=2)
        assert [c.uri for c in resp.contacts] == [other.contact]
        other.stop()
    finally:
        p.stop()


@pytest.mark.parametrize("contacts, expires, status", [
    ("*", 300, 400),                       # Contact: * needs Expires: 0
    ("<sip:x@127.0.0.1:7001>;expires=abc", 300, 400),
])
def test_bad_registrations_get_a_clear_4xx(cluster, contacts, expires, status):
    p = Phone("erin", cluster.proxy_addr)
    try:
        resp = p.register(expires, contacts=contacts)
        assert resp.status == status and "Bad Request (" in resp.reason
    finally:
        p.stop()


def test_too_brief_interval_gets_423_with_min_expires(make_cluster):
    c = make_cluster(nodes=2, trunk=None)
    p = Phone("fred", c.proxy_addr)
    try:
        resp = p.register(10)
        assert resp.status == 423 and resp.get("Min-Expires") == "60"
    finally:
        p.stop()


def test_call_to_a_registered_user_rings_all_contacts_and_the_first_answer_wins(cluster):
    ringer = Phone("alice", cluster.proxy_addr, answer=False)
    answerer = Phone("alice", cluster.proxy_addr, answer=True)
    try:
        assert ringer.register(300, call_id="dev1").status == 200
        assert answerer.register(300, call_id="dev2").status == 200
        ringer.start()
        answerer.start()
        result = run(uac(cluster, "uac", calls=1, rate=1, hold_ms=500, service="alice").run(30))
        assert result.ok == 1 and result.failed == 0, result.log_tail
        deadline = time.monotonic() + 3
        while answerer.got.count("BYE") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answerer.got[:3] == ["INVITE", "ACK", "BYE"]
        assert ringer.got == ["INVITE", "CANCEL", "ACK"]   # the ACK of its 487
    finally:
        ringer.stop()
        answerer.stop()


def test_a_phone_back_with_another_contact_replaces_its_binding_by_its_instance(cluster):
    """A phone that restarts (another port, another Call-ID) or changes
    network registers a new contact: its old one stayed bound until it
    expired, so calls also rang a contact nobody answers at, and one that
    another phone now holds. With +sip.instance (RFC 5626 §6, as Linphone
    and Zoiper send it) the new contact replaces the old; a phone without
    one keeps RFC 3261's binding per contact."""
    instance = ';+sip.instance="<urn:uuid:00000000-0000-1000-8000-000a95a0e128>";reg-id=1'
    before = Phone("erin", cluster.proxy_addr)
    after = Phone("erin", cluster.proxy_addr, answer=True)
    other = Phone("erin", cluster.proxy_addr)
    elsewhere = Phone("erin", cluster.proxy_addr)
    try:
        assert before.register(300, contacts=f"<{before.contact}>{instance}", call_id="boot-1").status == 200
        assert other.register(300, call_id="desk").status == 200
        resp = after.register(300, contacts=f"<{after.contact}>{instance}", call_id="boot-2")
        assert resp.status == 200 and sorted(contacts_of(resp)) == sorted([after.contact, other.contact])
        before.start()
        after.start()
        result = run(uac(cluster, "uac", calls=1, rate=1, hold_ms=200, service="erin").run(30))
        assert result.ok == 1 and result.failed == 0, result.log_tail
        assert before.got == [] and after.got[:2] == ["INVITE", "ACK"]
        # its un-REGISTER, sent from another socket (`after` reads its own now)
        resp = elsewhere.register(0, contacts=f"<{after.contact}>{instance}", call_id="boot-2", cseq=2)
        assert [c.uri for c in resp.contacts] == [other.contact]
    finally:
        for p in (before, after, other, elsewhere):
            p.stop()


def test_an_outbound_phone_with_two_flows_is_rung_over_the_newest_then_the_other(cluster):
    """A SIP outbound phone registered over two TCP flows (one
    +sip.instance, reg-id 1 and 2: RFC 5626 §4.2) is one phone: a call
    rings it over its newest flow only (rung over both it got the call
    twice). With that flow gone, the proxy answers 430 Flow Failed and
    the node rings the phone over its other flow (§7): the call is
    answered, the caller none the wiser."""
    instance = ';+sip.instance="<urn:uuid:00000000-0000-1000-8000-0000000f1011>"'
    older = Phone("flo", cluster.proxy_addr, transport="tcp")
    newer = Phone("flo", cluster.proxy_addr, transport="tcp")
    try:
        for phone, reg_id in ((older, 1), (newer, 2)):
            resp = phone.register(300, contacts=f"<{phone.contact}>{instance};reg-id={reg_id}", call_id=f"flow-{reg_id}")
            assert resp.status == 200 and resp.get("Require") == "outbound"
            time.sleep(0.01)                        # newer is newer
        assert len(resp.contacts) == 2
        older.start()
        newer.start()
        result = run(uac(cluster, "uac", calls=1, rate=1, hold_ms=200, service="flo").run(30))
        assert result.ok == 1 and result.failed == 0, result.log_tail
        assert newer.got[:2] == ["INVITE", "ACK"] and older.got == []
        newer.stop()                                # its connection closes: the flow is gone
        time.sleep(0.3)
        result = run(uac(cluster, "uac", calls=1, rate=1, hold_ms=200, service="flo").run(30))
        assert result.ok == 1 and result.failed == 0, result.log_tail
        assert older.got[:2] == ["INVITE", "ACK"]
        logged = "".join((cluster.dir / "logs" / f"{n}.log").read_text() for n in cluster.state["nodes"])
        assert "event=flow_failover " in logged and f' contact="{newer.contact}" ' in logged
    finally:
        for p in (older, newer):
            p.stop()


def test_a_gruu_reaches_that_phone_of_the_user_only(cluster):
    """RFC 5627: each of gina's two phones, registered with its instance
    and `Supported: gruu`, gets its public and its temporary GRUU. A call
    to either rings that phone and not the other; a forged temporary GRUU
    gets 404, the GRUU of a phone that unregistered 480."""
    desk, soft = Phone("gina", cluster.proxy_addr), Phone("gina", cluster.proxy_addr)
    carl = Phone("carl", cluster.proxy_addr)
    gruus = {}
    try:
        for phone, n in ((desk, 1), (soft, 2)):
            instance = f'+sip.instance="<urn:uuid:00000000-0000-1000-8000-00000000000{n}>"'
            resp = phone.register(300, contacts=f"<{phone.contact}>;{instance}", call_id=f"gruu-{n}",
                                  extra="Supported: gruu\r\n")
            mine, = (c for c in resp.contacts if c.uri == phone.contact)
            assert mine.params["pub-gruu"] == f'"sip:gina@127.0.0.1;gr=urn:uuid:00000000-0000-1000-8000-00000000000{n}"'
            gruus[phone] = mine.params["pub-gruu"].strip('"'), mine.params["temp-gruu"].strip('"')
            assert gruus[phone][1].startswith("sip:tgruu.") and gruus[phone][1].endswith("@127.0.0.1;gr")
            assert "gina" not in gruus[phone][1]
        desk.start()
        soft.start()
        assert carl.call("gina", uri=gruus[desk][0]) == [200, 200]
        assert carl.call("gina", uri=gruus[soft][1]) == [200, 200]
        assert desk.got.count("INVITE") == 1 and soft.got.count("INVITE") == 1, (desk.got, soft.got)
        forged = gruus[soft][1].replace("sip:tgruu.", "sip:tgruu.a", 1)
        assert carl.call("gina", uri=forged) == [404]
        elsewhere = Phone("gina", cluster.proxy_addr)       # soft's un-REGISTER (soft reads its own socket)
        resp = elsewhere.register(0, contacts=f"<{soft.contact}>", call_id="gruu-2", cseq=2)
        elsewhere.stop()
        assert [c.uri for c in resp.contacts] == [desk.contact]
        assert carl.call("gina", uri=gruus[soft][0]) == [480] and carl.call("gina", uri=gruus[soft][1]) == [480]
        assert soft.got.count("INVITE") == 1
    finally:
        for p in (desk, soft, carl):
            p.stop()


def carl_calls(cluster, user: str) -> list[int]:
    carl = Phone("carl", cluster.proxy_addr)
    try:
        return carl.call(user)
    finally:
        carl.stop()


def test_sipha_users_shows_who_is_registered_where(cluster):
    """`sipha users` (Kamailio's `kamctl ul show`): each AOR's contacts,
    expiry, instance, reg-id and flow, and the node holding it; `--aor`
    for one, asked of any node, which finds it wherever it lives, also
    once its node died; an AOR nobody registered exits 1, one that is no
    SIP URI is an error naming --aor. `--remove` (kamctl ul rm) unbinds
    one contact or all: a call then finds nobody."""
    def users(*args):
        return subprocess.run([sys.executable, "-m", "sipha.cli", "users", "--dir", str(cluster.dir), *args],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    instance = '+sip.instance="<urn:uuid:00000000-0000-1000-8000-0000000a11ce>"'
    alice, bob = Phone("alice", cluster.proxy_addr), Phone("bob", cluster.proxy_addr, transport="tcp")
    try:
        assert alice.register(300, contacts=f"<{alice.contact}>;{instance};reg-id=1").status == 200
        assert bob.register(120).status == 200
        listed = json.loads(users("--json").stdout)
        assert [r["aor"] for r in listed] == ["sip:alice@127.0.0.1", "sip:bob@127.0.0.1"]
        a, b = (r["contacts"][0] for r in listed)
        assert (a["contact"], a["instance"], a["reg_id"]) == (alice.contact, "<urn:uuid:00000000-0000-1000-8000-0000000a11ce>", "1")
        assert 290 <= a["expires_in"] <= 300 and 110 <= b["expires_in"] <= 120
        assert f"flow=tcp:127.0.0.1:{bob.port}" in b["path"][0] and b["contact"] == bob.contact
        holder = listed[1]["held_by"]
        table = users().stdout
        assert f"udp:127.0.0.1:{alice.port}" in table and f"tcp:127.0.0.1:{bob.port}" in table, table
        one = users("--aor", f"sip:bob@127.0.0.1:{cluster.proxy_addr[1]};transport=tcp", "--json")
        assert [r["aor"] for r in json.loads(one.stdout)] == ["sip:bob@127.0.0.1"]
        # kamctl ul rm: alice's second phone, then all of hers
        second = Phone("alice", cluster.proxy_addr)
        assert second.register(300).status == 200
        gone = users("--aor", "sip:alice@127.0.0.1", "--remove", second.contact)
        assert gone.returncode == 0 and f"removed {second.contact} of sip:alice@127.0.0.1" in gone.stdout, gone
        left = json.loads(users("--aor", "sip:alice@127.0.0.1", "--json").stdout)
        assert [b["contact"] for b in left[0]["contacts"]] == [alice.contact]
        assert users("--aor", "sip:alice@127.0.0.1", "--remove").returncode == 0
        assert users("--aor", "sip:alice@127.0.0.1").returncode == 1
        assert carl_calls(cluster, "alice") == [404]
        again = users("--remove")
        assert again.returncode == 2 and "--remove needs --aor" in again.stderr
        second.stop()
        cluster.kill(holder)
        time.sleep(0.5)
        after = json.loads(users("--aor", "sip:bob@127.0.0.1", "--json").stdout)
        assert after[0]["held_by"].split()[0] != holder and after[0]["contacts"][0]["contact"] == bob.contact
        nobody = users("--aor", "sip:nobody@127.0.0.1")
        assert nobody.returncode == 1 and "sip:nobody@127.0.0.1 is not registered" in nobody.stderr
        bad = users("--aor", "alice")
        assert bad.returncode == 2 and "--aor: 'alice' is not a SIP URI" in bad.stderr
    finally:
        alice.stop()
        bob.stop()


def test_unregistered_user_without_upstream_gets_404(cluster):
    result = run(uac(cluster, "uac", calls=1, rate=1, service="nobody").run(30))
    assert result.failed == 1
    assert "404 Not Found" in result.log_tail


def test_phone_registered_over_tcp_is_called_over_its_own_connection(cluster):
    phone = Phone("tina", cluster.proxy_addr, transport="tcp")
    try:
        resp = phone.register(300)
        assert resp.status == 200
        assert "flow=tcp:127.0.0.1:" in resp.get("Path")
        calls_reach(cluster, phone, 3)
        assert phone.invite.top_via.transport == "TCP"
    finally:
        phone.stop()


def test_a_phone_whose_connection_closed_is_not_waited_for(cluster):
    """A softphone registered over TCP quits without un-REGISTERing: its
    binding stays, but the connection the proxy reached it over is gone.
    The proxy dialled the phone's old port (refused, or lost behind its
    NAT) and dropped the INVITE; the caller heard 408 after 32 s. The
    proxy now answers 430 Flow Failed at once (RFC 5626 §5.3) and the
    caller hears 480, as from a registrar whose user is away."""
    phone = Phone("uma", cluster.proxy_addr, transport="tcp")
    assert phone.register(300).status == 200
    phone.stop()
    time.sleep(0.2)                       # the proxy sees the connection close
    result = run(uac(cluster, "uac", calls=1, rate=1, service="uma").run(10))
    assert result.failed == 1 and result.ok == 0, result.log_tail
    assert "480 Temporarily Unavailable (flow failed)" in result.log_tail


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_chat_message_reaches_a_registered_phone(cluster, transport):
    """Softphones chat with MESSAGE (RFC 3428): it reaches the phone over
    the flow it registered on, and the sender hears the phone's 200."""
    phone = Phone("molly", cluster.proxy_addr, transport=transport)
    try:
        assert phone.register(300).status == 200
        phone.start()
        result = run(uac(cluster, "message", calls=3, rate=5, service="molly").run(30))
        assert result.ok == 3 and result.failed == 0, result.log_tail
        assert sorted(phone.messages) == [b"hello 1\r\n", b"hello 2\r\n", b"hello 3\r\n"]
    finally:
        phone.stop()



def confirmed_calls(cluster) -> list[dict]:
    return [rec for spaces in all_keys(cluster).values() for rec in spaces["active"].values()
            if rec.get("k") == "call" and rec["st"] == "confirmed"]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_an_attended_transfer_replaces_the_transferors_call(cluster, transport):
    """Bob (SIPp) called Carol (a registered phone) and transfers Alice to
    her, attended: Alice's INVITE carries the Replaces from Bob's REFER,
    Bob's dialog as Bob has it. Through the B2BUA it reaches Carol naming
    Carol's own dialog, so she answers it and hangs up on Bob, who hears
    the BYE: the call Alice-Carol replaced Bob-Carol (RFC 3891, 5589)."""
    carol = Phone("carol", cluster.proxy_addr, transport=transport)
    try:
        assert carol.register(300).status == 200
        carol.start()
        bob = uac(cluster, "uac_wait_bye", calls=1, service="carol", transport=transport, timeout_s=30)

        async def go():
            await bob.start()
            for _ in range(200):
                calls = confirmed_calls(cluster)
                if calls:
                    break
                await asyncio.sleep(0.05)
            a = calls[0]["a"]               # Bob's side: his Call-ID, his tag (rt), ours (lt)
            alice = uac(cluster, "uac_replaces", calls=1, service="carol", transport=transport, hold_ms=200,
                        keys={"replaces": f"{a['cid']};to-tag={a['lt']};from-tag={a['rt']}"})
            return await alice.run(30), await bob.wait(30), a["cid"]

        alice, bob, bob_call = run(go())
        assert alice.ok == 1 and alice.failed == 0, alice.log_tail
        assert bob.ok == 1 and bob.failed == 0, bob.log_tail
        first, = [m for m in carol.replaced]
        assert first != bob_call and carol.invite.get("Replaces").startswith(f"{first};to-tag={carol.tag}")
        assert carol.got.count("INVITE") == 2 and carol.got.count("BYE") == 1     # Alice's
    finally:
        carol.stop()
    time.sleep(0.5)
    assert not confirmed_calls(cluster)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_presence_subscription_reaches_a_registered_phone(cluster, transport):
    """A softphone subscribes to a buddy's presence (RFC 3856): the node
    answered 405; it now sends the SUBSCRIBE on to the buddy's phone, over
    the flow it registered on, and relays its NOTIFYs back, until the
    subscriber ends it; then nothing is left in Redis."""
    phone = Phone("nina", cluster.proxy_addr, transport=transport)
    try:
        assert phone.register(300).status == 200
        phone.start()
        result = run(uac(cluster, "subscribe", calls=3, rate=5, hold_ms=300, service="nina").run(30))
        assert result.ok == 3 and result.failed == 0, result.log_tail
        assert phone.got.count("SUBSCRIBE") == 6 and len(phone.subscriptions) == 3
    finally:
        phone.stop()
    time.sleep(0.3)
    assert not [rec for spaces in all_keys(cluster).values() for rec in spaces["active"].values()
                if rec.get("k") == "call"]


def nat_register(sock, proxy, expires: int, cseq: int, via: str) -> int:
    """A REGISTER whose Via and Contact name `via` (HOST:PORT: a private
    address when the phone is behind NAT) -> the status of its answer."""
    sock.sendto((f"REGISTER sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {via};branch=z9hG4bKnat{cseq};rport\r\n"
                 f"Max-Forwards: 70\r\nFrom: <sip:nat@127.0.0.1>;tag=n1\r\nTo: <sip:nat@127.0.0.1>\r\n"
                 f"Call-ID: nat-{via}\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:nat@{via}>\r\n"
                 f"Expires: {expires}\r\nContent-Length: 0\r\n\r\n").encode(), proxy)
    while True:
        data = sock.recv(65535)
        if data.strip(b"\r\n"):
            return int(data.split(b" ", 2)[1])


def keepalives(sock, seconds: float) -> int:
    """How many CRLF keep-alives arrive within `seconds`."""
    n, deadline = 0, time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            n += sock.recv(65535) == b"\r\n\r\n"
        except TimeoutError:
            break
    return n


def test_a_phone_registered_from_behind_nat_is_kept_reachable_by_keepalives(make_cluster, monkeypatch):
    """A router closes a UDP binding after 30 s or so of silence, and a
    phone registers again only every hour or so: the calls for it would
    reach nobody. The proxy pings the flows registered from behind NAT
    (their Via names another address than they come from), until they
    unregister; not the others."""
    monkeypatch.setenv("SIPHA_PROXY_NAT_PING", "0.4")
    c = make_cluster(nodes=2, trunk=None)
    natted, direct = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    try:
        for s in (natted, direct):
            s.bind(("127.0.0.1", 0))
            s.settimeout(5)
        assert nat_register(natted, c.proxy_addr, 300, 1, "192.168.1.20:5060") == 200
        assert nat_register(direct, c.proxy_addr, 300, 1, f"127.0.0.1:{direct.getsockname()[1]}") == 200
        assert keepalives(natted, 1.5) >= 2
        assert keepalives(direct, 0.1) == 0
        assert admin_get(c.state["proxy"]["admin"])["nat_flows"] == 1
        assert nat_register(natted, c.proxy_addr, 0, 2, "192.168.1.20:5060") == 200
        keepalives(natted, 0.5)                 # one may have been on its way
        assert keepalives(natted, 1.2) == 0
        assert admin_get(c.state["proxy"]["admin"])["nat_flows"] == 0
    finally:
        natted.close()
        direct.close()


def test_a_restarted_proxy_pings_again_the_phones_registered_behind_nat(make_cluster, monkeypatch):
    """The flows to ping live in the proxy's memory; the registrations
    live on in the nodes' Redis. A proxy restarted (an upgrade, a crash)
    asks each node for the flows registered from behind NAT as the node
    first answers it, and pings them again: else each phone would be
    unreachable from when its router forgets the binding until its next
    REGISTER, often an hour on."""
    monkeypatch.setenv("SIPHA_PROXY_NAT_PING", "0.4")
    c = make_cluster(nodes=2, trunk=None)
    natted, direct, gone = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3))
    try:
        for s in (natted, direct, gone):
            s.bind(("127.0.0.1", 0))
            s.settimeout(5)
        assert nat_register(natted, c.proxy_addr, 300, 1, "192.168.1.20:5060") == 200
        assert nat_register(gone, c.proxy_addr, 300, 1, "192.168.1.21:5060") == 200
        assert nat_register(gone, c.proxy_addr, 0, 2, "192.168.1.21:5060") == 200     # unregistered
        assert nat_register(direct, c.proxy_addr, 300, 1, f"127.0.0.1:{direct.getsockname()[1]}") == 200
        flows = {}
        for nid, node in c.state["nodes"].items():
            flows.update(admin_get(node["admin"], "/nat_flows")["flows"])
        assert len(flows) == 1 and f"flow=udp:127.0.0.1:{natted.getsockname()[1]}" in next(iter(flows))
        assert 290 <= next(iter(flows.values())) <= 300

        c.kill("proxy")
        keepalives(natted, 0.3)                 # one may have been on its way
        c.restart_proxy()
        assert keepalives(natted, 1.5) >= 2
        assert keepalives(direct, 0.1) == 0 and keepalives(gone, 0.1) == 0
        assert admin_get(c.state["proxy"]["admin"])["nat_flows"] == 1
        assert "event=nat_flows_learned" in open(c.procs()["proxy"]["log"]).read()
    finally:
        for s in (natted, direct, gone):
            s.close()
