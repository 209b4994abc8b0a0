"""SIP over TLS (RFC 3261 §26) at the proxy: phones that register and call
over TLS, a trunk the proxy dials over TLS and verifies, and what a bad
peer or a bad setting gets. SIPp here has no TLS: a scripted phone speaks it."""
from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

from clusterkit import all_keys, calls_reach, first_read, run, uac
from phone import Phone
from sipha.cluster import Cluster
from sipha.sipp import free_port

pytestmark = pytest.mark.e2e


def tls_phone(c, user: str) -> Phone:
    return Phone(user, c.proxy_tls_addr, transport="tls", cafile=str(c.dir / "tls" / "cert.pem"))


def tls_call_goes_through(c, user: str) -> str:
    """A phone calls the trunk over TLS, answered and hung up. -> the proxy's log."""
    phone = tls_phone(c, user)
    try:
        assert phone.call("service", hold=0.1) == [200, 200]
    finally:
        phone.stop()
    return (c.dir / "logs" / "proxy.log").read_text()


def test_a_phone_registered_over_tls_is_called_over_its_connection(make_cluster):
    c = make_cluster(nodes=2, trunk=None, tls=True)
    phone = tls_phone(c, "tess")
    try:
        resp = phone.register(300)
        assert resp.status == 200, resp.reason
        path = resp.get("Path")
        assert path.startswith(f"<sip:127.0.0.1:{c.proxy_tls_addr[1]};transport=tls;lr;flow=tls:127.0.0.1:"), path
        calls_reach(c, phone, 2)
        assert phone.invite.top_via.transport == "TLS"
        assert ";transport=tls;lr" in phone.invite.values("Record-Route")[0]
    finally:
        phone.stop()


def test_a_phone_calls_over_tls_to_a_udp_trunk(make_cluster):
    c = make_cluster(nodes=2, tls=True)
    phone = tls_phone(c, "tom")
    try:
        assert phone.call("service", hold=0.3) == [200, 200]      # INVITE answered, BYE answered
        assert phone.call("service", hold=0.1) == [200, 200]
    finally:
        phone.stop()
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(c).values())


def test_a_peer_that_does_not_speak_tls_is_dropped_and_the_port_goes_on(make_cluster):
    c = make_cluster(nodes=2, tls=True)
    with socket.create_connection(c.proxy_tls_addr, timeout=5) as s:     # plain SIP to the TLS port
        s.sendall(b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nContent-Length: 0\r\n\r\n" * 3)
        got = first_read(s, 5)
        # closed, or a TLS alert record (content type 21): never a SIP answer in clear
        assert got is not None and (got == b"" or got[0] == 21), got
    raw = socket.create_connection(c.proxy_tls_addr, timeout=5)
    raw.close()                                                           # a handshake that never starts
    log = tls_call_goes_through(c, "tim")
    assert "level=error" not in log and "Traceback" not in log


class TlsTrunk:
    """A trunk that takes SIP over TLS on 127.0.0.1, as localhost, with a
    certificate of its own: it answers the calls on the connection the
    proxy opens (the scripted phone on the server side of it)."""

    def __init__(self, folder):
        made = Cluster(str(folder))
        made.make_certificate()
        self.cert = str(made.dir / "tls" / "cert.pem")
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(self.cert, str(made.dir / "tls" / "key.pem"))
        self.listener = self.ctx.wrap_socket(socket.create_server(("127.0.0.1", free_port())), server_side=True)
        self.port = self.listener.getsockname()[1]
        self.phones: list[Phone] = []
        self.listener.settimeout(0.2)
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, ssl.SSLError, OSError):
                continue
            self.phones.append(Phone("service", ("127.0.0.1", 0), transport="tls", sock=conn).start())

    def require_client_certificate(self, ca: str) -> None:
        """From now on a peer must present a certificate `ca` signed."""
        self.ctx.load_verify_locations(ca)
        self.ctx.verify_mode = ssl.CERT_REQUIRED

    def stop(self) -> None:
        self._stop = True
        self._thread.join(2)
        for p in self.phones:
            p.stop()
        self.listener.close()


def test_the_proxy_dials_a_tls_trunk_by_name_and_verifies_it(make_cluster, monkeypatch, tmp_path):
    """node.upstream = sip:localhost:PORT;transport=tls: the proxy opens
    TLS to it, checks its certificate against proxy.tls_ca and the name
    localhost, and the call's requests all go over that connection."""
    trunk = TlsTrunk(tmp_path / "trunk")
    try:
        monkeypatch.setenv("SIPHA_NODE_UPSTREAM", f"sip:localhost:{trunk.port};transport=tls")
        monkeypatch.setenv("SIPHA_PROXY_TLS_CA", trunk.cert)
        c = make_cluster(nodes=2, trunk=None, tls=True)
        result = run(uac(c, "uac", calls=3, rate=5, hold_ms=200).run(30))
        assert result.ok == 3 and result.failed == 0, result.log_tail
        deadline = time.monotonic() + 3
        while sum(p.got.count("BYE") for p in trunk.phones) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(trunk.phones) == 1                       # one connection, reused
        assert trunk.phones[0].got.count("INVITE") == 3 and trunk.phones[0].got.count("BYE") == 3
    finally:
        trunk.stop()


def test_a_tls_trunk_whose_certificate_does_not_verify_gets_no_call(make_cluster, monkeypatch, tmp_path):
    trunk = TlsTrunk(tmp_path / "trunk")
    try:
        monkeypatch.setenv("SIPHA_NODE_UPSTREAM", f"sip:localhost:{trunk.port};transport=tls")
        c = make_cluster(nodes=2, trunk=None, tls=True)       # no proxy.tls_ca: the system's CAs
        result = run(uac(c, "uac", calls=1, rate=1).run(30))
        assert result.failed == 1 and "503 Service Unavailable (next hop unreachable)" in result.log_tail
        assert trunk.phones == []
        log = (c.dir / "logs" / "proxy.log").read_text()
        assert "event=tcp_connect_failed" in log and "CERTIFICATE_VERIFY_FAILED" in log
    finally:
        trunk.stop()


def test_a_trunk_that_asks_for_a_client_certificate_gets_the_proxys(make_cluster, monkeypatch, tmp_path):
    """Mutual TLS towards a trunk (as Microsoft Teams Direct Routing and
    many carriers ask): the proxy presents proxy.tls_cert when it dials.
    It used to present none, so such a trunk refused the handshake and
    the caller got 503."""
    trunk = TlsTrunk(tmp_path / "trunk")
    try:
        monkeypatch.setenv("SIPHA_NODE_UPSTREAM", f"sip:localhost:{trunk.port};transport=tls")
        monkeypatch.setenv("SIPHA_PROXY_TLS_CA", trunk.cert)
        c = make_cluster(nodes=2, trunk=None, tls=True)
        trunk.require_client_certificate(str(c.dir / "tls" / "cert.pem"))
        result = run(uac(c, "uac", calls=2, rate=5, hold_ms=200).run(30))
        assert result.ok == 2 and result.failed == 0, result.log_tail
        assert len(trunk.phones) == 1
        assert trunk.phones[0].sock.getpeercert()["subject"] == ((("commonName", "localhost"),),)
    finally:
        trunk.stop()


def refused_without_a_good_certificate(addr, cafile: str, cert: tuple[str, str] | None) -> bool:
    """A TLS connection to `addr` presenting `cert` (or none), then a
    REGISTER: True when the proxy closes it with no SIP answer."""
    ctx = ssl.create_default_context(cafile=cafile)
    if cert:
        ctx.load_cert_chain(*cert)
    try:
        with ctx.wrap_socket(socket.create_connection(addr, timeout=5), server_hostname="localhost") as s:
            s.sendall(b"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:1;branch=z9hG4bKm1\r\n"
                      b"From: <sip:x@example.com>;tag=1\r\nTo: <sip:x@example.com>\r\nCall-ID: m1\r\n"
                      b"CSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n")
            return first_read(s, 3.0) == b""
    except (ssl.SSLError, ConnectionError):
        return True                                     # refused in the handshake (TLS 1.2) or by its alert


def mutual_tls(make_cluster, monkeypatch, good: tuple[str, str], **env: str) -> tuple[Cluster, str]:
    """A cluster whose proxy asks the peers of its TLS port for a
    certificate (with the SIPHA_* settings `env`), and a phone presenting
    `good` registered through it -> (the cluster, the proxy's certificate)."""
    monkeypatch.setenv("SIPHA_PROXY_TLS_VERIFY_CLIENT", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    c = make_cluster(nodes=2, trunk=None, tls=True)
    ours = str(c.dir / "tls" / "cert.pem")
    phone = Phone("tina", c.proxy_tls_addr, transport="tls", cafile=ours, cert=good)
    try:
        assert phone.register(300).status == 200
    finally:
        phone.stop()
    return c, ours


def tls_refusals(c) -> list[str]:
    return [line for line in (c.dir / "logs" / "proxy.log").read_text().splitlines() if "event=tls_refused" in line]


def test_with_tls_verify_client_only_phones_with_a_trusted_certificate_get_in(make_cluster, monkeypatch, tmp_path):
    phones_ca = Cluster(str(tmp_path / "phones"))
    phones_ca.make_certificate()                # the phone's certificate is its own CA here
    good = (str(phones_ca.dir / "tls" / "cert.pem"), str(phones_ca.dir / "tls" / "key.pem"))
    c, ours = mutual_tls(make_cluster, monkeypatch, good, SIPHA_PROXY_TLS_CA=good[0])
    assert refused_without_a_good_certificate(c.proxy_tls_addr, ours, None)
    untrusted = (ours, str(c.dir / "tls" / "key.pem"))          # a certificate, not signed by proxy.tls_ca
    assert refused_without_a_good_certificate(c.proxy_tls_addr, ours, untrusted)
    assert len(tls_refusals(c)) == 2, tls_refusals(c)


def named_certificate(folder, name: str) -> tuple[str, str]:
    """A self-signed certificate (its own CA) for `name` -> (cert, key) files."""
    folder.mkdir(parents=True)
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


def test_with_tls_peers_only_a_peer_of_those_names_gets_in(make_cluster, monkeypatch, tmp_path):
    """proxy.tls_peers, as an SBC facing Teams Direct Routing checks that
    it is Microsoft calling: of two peers with certificates proxy.tls_ca
    trusts, the one whose name is not in the list is closed after its
    handshake, with its names in the log."""
    ours_ca = named_certificate(tmp_path / "sbc", "sbc1.example.com")
    other = named_certificate(tmp_path / "other", "pbx.example.net")
    ca = tmp_path / "ca.pem"
    ca.write_text(open(ours_ca[0]).read() + open(other[0]).read())
    c, ours = mutual_tls(make_cluster, monkeypatch, ours_ca, SIPHA_PROXY_TLS_CA=str(ca),
                         SIPHA_PROXY_TLS_PEERS="*.example.com, trunk.example.org")
    assert refused_without_a_good_certificate(c.proxy_tls_addr, ours, other)
    refused = tls_refusals(c)
    assert len(refused) == 1 and "names=pbx.example.net" in refused[0], refused


class OwnCa:
    """A CA of its own (openssl), the certificates it signs and its CRL."""

    def __init__(self, folder):
        self.dir = folder
        folder.mkdir(parents=True)
        (folder / "index.txt").write_text("")
        (folder / "crlnumber").write_text("01\n")
        (folder / "ca.cnf").write_text(
            "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\ncrlnumber = crlnumber\n"
            "default_md = sha256\ndefault_crl_days = 2\ncertificate = ca.pem\nprivate_key = ca.key\n")
        self.openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                     "-days", "2", "-subj", "/CN=sipha test CA", "-keyout", "ca.key", "-out", "ca.pem",
                     "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self.ca = str(folder / "ca.pem")

    def openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], cwd=self.dir, check=True, capture_output=True)

    def issue(self, name: str) -> tuple[str, str]:
        """A certificate for `name` -> (cert, key) files."""
        (self.dir / f"{name}.ext").write_text(f"subjectAltName=DNS:{name}\n")
        self.openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                     "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        self.openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                     "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
        return str(self.dir / f"{name}.pem"), str(self.dir / f"{name}.key")

    def revoke(self, cert: str) -> str:
        """`cert` revoked -> the CRL file that says so."""
        self.openssl("ca", "-config", "ca.cnf", "-revoke", cert)
        self.openssl("ca", "-config", "ca.cnf", "-gencrl", "-out", "crl.pem")
        return str(self.dir / "crl.pem")


def test_with_tls_crl_a_revoked_certificate_is_refused(make_cluster, monkeypatch, tmp_path):
    """proxy.tls_crl: of two peers whose certificates the same CA signed,
    the one its revocation list names is refused in the handshake."""
    ca = OwnCa(tmp_path / "ca")
    good, lost = ca.issue("desk1.example.com"), ca.issue("laptop7.example.com")
    c, ours = mutual_tls(make_cluster, monkeypatch, good, SIPHA_PROXY_TLS_CA=ca.ca,
                         SIPHA_PROXY_TLS_CRL=ca.revoke(lost[0]))
    assert refused_without_a_good_certificate(c.proxy_tls_addr, ours, lost)
    refused = tls_refusals(c)
    assert len(refused) == 1 and "revoked" in refused[0], refused


@pytest.mark.parametrize("env, said", [
    ({"SIPHA_PROXY_TLS_LISTEN": "127.0.0.1:5061"}, "proxy.tls_cert: needed with proxy.tls_listen"),
    ({"SIPHA_PROXY_TLS_LISTEN": "127.0.0.1:5061", "SIPHA_PROXY_TLS_CERT": "/nonexistent/cert.pem"},
     "proxy.tls_cert: no such file '/nonexistent/cert.pem'"),
    ({"SIPHA_PROXY_TLS_LISTEN": "[::1]:5061"}, "proxy.tls_listen: [::1]:5061 is IPv6"),
    ({"SIPHA_PROXY_TLS_LISTEN": "127.0.0.1:5061", "SIPHA_PROXY_TLS_CERT": __file__},
     "proxy.tls_cert / proxy.tls_key: cannot load"),
    ({"SIPHA_PROXY_TLS_VERIFY_CLIENT": "yes"}, "proxy.tls_verify_client: needs proxy.tls_listen, and proxy.tls_ca"),
    ({"SIPHA_PROXY_TLS_PEERS": "sbc.example.com"}, "proxy.tls_peers: needs proxy.tls_verify_client"),
    ({"SIPHA_PROXY_TLS_CRL": __file__}, "proxy.tls_crl: needs proxy.tls_verify_client"),
    ({"SIPHA_PROXY_TLS_PEERS": "sbc.example.com, bad name"}, "proxy.tls_peers: expected host names"),
])
def test_bad_tls_settings_are_cli_errors(env, said, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = subprocess.run([sys.executable, "-m", "sipha.cli", "proxy", "--listen", f"127.0.0.1:{free_port()}",
                        "--node", "node1=127.0.0.1:5070"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_tls_connections_count_against_the_limits_before_their_handshake(make_cluster, monkeypatch):
    """Connections that never handshake (a slowloris on the TLS port)
    are counted as they are accepted, as TCP ones are: past
    limits.tcp_per_source the next is closed at once, not held for a
    handshake; the idle ones are closed after limits.tcp_message_timeout,
    and then a phone from the same address gets in."""
    monkeypatch.setenv("SIPHA_LIMITS_TCP_PER_SOURCE", "4")
    monkeypatch.setenv("SIPHA_LIMITS_TCP_MESSAGE_TIMEOUT", "2")
    c = make_cluster(nodes=2, tls=True)
    idle = [socket.create_connection(c.proxy_tls_addr, timeout=5) for _ in range(4)]
    try:
        time.sleep(0.3)
        with socket.create_connection(c.proxy_tls_addr, timeout=5) as extra:
            assert first_read(extra, 1.0) == b""               # refused at once
        assert first_read(idle[0], 0.5) is None                # the others wait for their handshake...
        assert all(first_read(s, 4.0) == b"" for s in idle)    # ... for 2 s
    finally:
        for s in idle:
            s.close()
    log = tls_call_goes_through(c, "ted")
    assert "event=tcp_refused" in log and 'reason="TLS handshake not complete within 2s"' in log
