"""Digest authentication on the registrar and for new calls (RFC 8760
SHA-256 and MD5), with nonces that expire and cannot be replayed."""
from __future__ import annotations

import socket
import time
import uuid

import pytest

from clusterkit import run, uac
from node.auth import digest, parse_credentials
from phone import Phone

pytestmark = pytest.mark.e2e


def with_users(make_cluster, monkeypatch, tmp_path, users: str, **settings: str):
    """A 2-node cluster with the digest `users` file and auth.* `settings`."""
    path = tmp_path / "users"
    path.write_text(users)
    monkeypatch.setenv("SIPHA_AUTH_USERS_FILE", str(path))
    for name, value in settings.items():
        monkeypatch.setenv(f"SIPHA_AUTH_{name.upper()}", value)
    return make_cluster(nodes=2)


@pytest.fixture
def cluster(make_cluster, monkeypatch, tmp_path):
    return with_users(make_cluster, monkeypatch, tmp_path, "# test users\nalice:wonderland\nbob:builder\n",
                      nonce_ttl="3")


def answer(challenge: str, user: str, password: str, method: str, uri: str, nc: str = "00000001") -> str:
    c = parse_credentials(challenge)
    alg = c["algorithm"]
    cnonce = uuid.uuid4().hex[:8]
    resp = digest(alg, user, c["realm"], password, method, uri, c["nonce"], nc, cnonce, "auth")
    return (f'Digest username="{user}", realm="{c["realm"]}", nonce="{c["nonce"]}", uri="{uri}", '
            f'response="{resp}", algorithm={alg}, qop=auth, nc={nc}, cnonce="{cnonce}"')


@pytest.mark.parametrize("algorithms, offered", [(None, ["MD5"]), ("sha-256, MD5", ["SHA-256", "MD5"])])
def test_register_is_challenged_with_the_algorithms_set_and_accepted(make_cluster, monkeypatch, tmp_path,
                                                                     algorithms, offered):
    """MD5 alone by default, as Kamailio offers it: baresip 1.0 gives up
    on any challenge it does not know, even after an MD5 one (see
    test_softphone_e2e); SHA-256 first when auth.algorithms says so."""
    settings = {"algorithms": algorithms} if algorithms else {}
    cluster = with_users(make_cluster, monkeypatch, tmp_path, "alice:wonderland\n", **settings)
    p = Phone("alice", cluster.proxy_addr)
    try:
        resp = p.register(300)
        assert resp.status == 401
        challenges = [f.value for f in resp.get_fields("WWW-Authenticate")]
        assert [parse_credentials(c)["algorithm"] for c in challenges] == offered
        # one nonce for both: each use needs its own nonce count
        for n, ch in enumerate(challenges, start=1):
            creds = answer(ch, "alice", "wonderland", "REGISTER", "sip:127.0.0.1", nc=f"{n:08d}")
            ok = p.register(300, cseq=n + 1, extra=f"Authorization: {creds}\r\n")
            assert ok.status == 200, ok.reason
    finally:
        p.stop()


def test_wrong_password_replay_and_stale_nonce_are_challenged_again(cluster):
    p = Phone("bob", cluster.proxy_addr)
    try:
        ch = [f.value for f in p.register(300).get_fields("WWW-Authenticate")][0]
        bad = p.register(300, cseq=2, extra=f"Authorization: {answer(ch, 'bob', 'wrong', 'REGISTER', 'sip:127.0.0.1')}\r\n")
        assert bad.status == 401
        creds = answer(ch, "bob", "builder", "REGISTER", "sip:127.0.0.1")
        assert p.register(300, cseq=3, extra=f"Authorization: {creds}\r\n").status == 200
        replay = p.register(300, cseq=4, extra=f"Authorization: {creds}\r\n")
        assert replay.status == 401                               # same nonce and nc again
        time.sleep(3.5)
        late = answer(ch, "bob", "builder", "REGISTER", "sip:127.0.0.1", nc="00000002")
        stale = p.register(300, cseq=5, extra=f"Authorization: {late}\r\n")
        assert stale.status == 401 and "stale=true" in stale.get("WWW-Authenticate")
        logs = "".join((cluster.dir / "logs" / f"{n}.log").read_text() for n in cluster.state["nodes"])
        assert "reason=\"wrong password or digest\"" in logs and "reason=\"replayed nonce\"" in logs
        assert "builder" not in logs and creds.split('response="')[1][:20] not in logs
    finally:
        p.stop()


def test_invite_without_credentials_gets_407(cluster):
    result = run(uac(cluster, "uac", calls=1, rate=1).run(30))
    assert result.failed == 1 and "407 Proxy Authentication Required" in result.log_tail


@pytest.fixture
def trusting(make_cluster, monkeypatch, tmp_path):
    """Digest users, and one trusted network: the test's phones on 127.0.0.1."""
    return with_users(make_cluster, monkeypatch, tmp_path, "alice:wonderland\n", trusted="192.0.2.0/24, 127.0.0.0/8")


def test_a_trusted_source_calls_and_registers_without_credentials(trusting):
    """A carrier's trunk or a PBX does not answer challenges: calls from
    auth.trusted addresses go through, as Kamailio's allow_source_address."""
    result = run(uac(trusting, "uac", calls=3, rate=3).run(30))
    assert result.ok == 3 and result.failed == 0, result.log_tail
    p = Phone("alice", trusting.proxy_addr)
    try:
        assert p.register(300).status == 200
    finally:
        p.stop()


def invite_from(sock: socket.socket, proxy, via: str) -> int:
    """A new INVITE whose top Via is `via` -> the status of its final answer."""
    tag = uuid.uuid4().hex[:8]
    sock.sendto((f"INVITE sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {via};branch=z9hG4bK{tag}\r\n"
                 f"Max-Forwards: 70\r\nFrom: <sip:mallory@127.0.0.1>;tag={tag}\r\nTo: <sip:bob@127.0.0.1>\r\n"
                 f"Call-ID: forged-{tag}\r\nCSeq: 1 INVITE\r\nContact: <sip:mallory@127.0.0.1>\r\n"
                 f"Content-Length: 0\r\n\r\n").encode(), proxy)
    while True:
        status = int(sock.recv(65535).split(b" ", 2)[1])
        if status >= 200:
            return status


def test_a_sender_cannot_claim_a_trusted_address_in_its_via(make_cluster, monkeypatch, tmp_path):
    """Where a request came from is what the proxy saw, not what its Via
    says: a Via naming a trusted host gets a received= of the real source,
    and a received= the sender wrote itself is replaced. (The trusted
    address is another loopback one: should the proxy believe the Via,
    its answer would go there, not off this machine.)"""
    c = with_users(make_cluster, monkeypatch, tmp_path, "alice:wonderland\n", trusted="127.0.0.2")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        port = s.getsockname()[1]
        assert invite_from(s, c.proxy_addr, "127.0.0.2:5060;rport") == 407
        assert invite_from(s, c.proxy_addr, f"127.0.0.1:{port};received=127.0.0.2") == 407
        assert invite_from(s, c.proxy_addr, f"127.0.0.1:{port};received=127.0.0.2;rport") == 407
