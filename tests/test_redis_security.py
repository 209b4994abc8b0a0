"""Redis behind a password, an ACL user and TLS: the dialog store works
through rediss:// URLs, and bad credentials fail clearly, without leaking
them."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import pytest
import redis

from node.store import DialogStore, StoreUnavailable
from sipha.sipp import free_port

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")]


@pytest.fixture
def tls_redis(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
                             str(cert), "--tls-auth-clients", "no", "--requirepass", "adm1n-pw",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://:adm1n-pw@127.0.0.1:{port}/0?ssl_ca_certs={cert}&ssl_cert_reqs=required"
    deadline = time.monotonic() + 10
    while True:
        try:
            r = redis.Redis.from_url(url)
            r.acl_setuser("sipha", enabled=True, passwords=["+n0de-pw"], keys=["sipha:*"], commands=["+@all"])
            break
        except redis.exceptions.ConnectionError:
            assert time.monotonic() < deadline, "TLS redis did not start"
            time.sleep(0.1)
    yield port, cert
    proc.terminate()
    proc.wait(5)


def store(port, cert, auth) -> DialogStore:
    url = f"rediss://{auth}@127.0.0.1:{port}/0?ssl_ca_certs={cert}&ssl_cert_reqs=required"
    return DialogStore("n1", "sipha", {"n1": url}, 60)


def test_dialog_store_over_tls_with_an_acl_user(tls_redis):
    port, cert = tls_redis

    async def go():
        s = store(port, cert, "sipha:n0de-pw")
        await s.save("0123456789abcdef", {"k": "call", "a": {"cid": "c1"}}, None)
        rec, how = await s.load("0123456789abcdef", [])
        await s.close()
        return rec, how
    rec, how = asyncio.run(go())
    assert how == "active" and rec["a"]["cid"] == "c1" and rec["o"] == "n1"


def test_wrong_credentials_make_the_store_unavailable_without_leaking_them(tls_redis):
    port, cert = tls_redis

    async def go():
        s = store(port, cert, "sipha:not-the-pw")
        assert not await s.ping()
        with pytest.raises(StoreUnavailable) as exc:
            await s.load("0123456789abcdef", [])
        await s.close()
        return str(exc.value)
    reason = asyncio.run(go())
    assert "password" in reason and "not-the-pw" not in reason
