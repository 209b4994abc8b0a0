"""Digest authentication on the registrar and for new calls (RFC 8760
SHA-256 and MD5), with nonces that expire and cannot be replayed."""
from __future__ import annotations

import time
import uuid

import pytest

from clusterkit import run, uac
from node.auth import digest, parse_credentials
from phone import Phone

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(make_cluster, monkeypatch, tmp_path):
    users = tmp_path / "users"
    users.write_text("# test users\nalice:wonderland\nbob:builder\n")
    monkeypatch.setenv("SIPHA_AUTH_USERS_FILE", str(users))
    monkeypatch.setenv("SIPHA_AUTH_NONCE_TTL", "3")
    return make_cluster(nodes=2)


def answer(challenge: str, user: str, password: str, method: str, uri: str, nc: str = "00000001") -> str:
    c = parse_credentials(challenge)
    alg = c["algorithm"]
    cnonce = uuid.uuid4().hex[:8]
    resp = digest(alg, user, c["realm"], password, method, uri, c["nonce"], nc, cnonce, "auth")
    return (f'Digest username="{user}", realm="{c["realm"]}", nonce="{c["nonce"]}", uri="{uri}", '
            f'response="{resp}", algorithm={alg}, qop=auth, nc={nc}, cnonce="{cnonce}"')


def test_register_is_challenged_sha256_first_then_md5_and_accepted(cluster):
    p = Phone("alice", cluster.proxy_addr)
    try:
        resp = p.register(300)
        assert resp.status == 401
        challenges = [f.value for f in resp.get_fields("WWW-Authenticate")]
        assert [parse_credentials(c)["algorithm"] for c in challenges] == ["SHA-256", "MD5"]
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
