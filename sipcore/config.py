"""cluster.toml: the one configuration shared by the proxy and the nodes.

Every setting has a dotted key (`health.interval`), a TOML location
(`[health] interval = 0.3`) and an environment variable
(`SIPHA_HEALTH_INTERVAL`). Precedence: defaults < file < environment <
command-line flags. The node list is `[[nodes]]` tables in the file, or
`SIPHA_NODES` / repeated `--node`, each entry `ID=HOST:PORT[,REDIS_URL]`.
A bad or missing setting raises ConfigError naming the key, before any
socket is opened.
"""
from __future__ import annotations

import ipaddress
import os
import re
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .headers import hostport, is_ip
from .websocket import origin_key


# what the proxy serves besides UDP and TCP, each on proxy.{kind}_listen
STREAM_KINDS = ("tls", "ws", "wss")


class ConfigError(ValueError):
    pass


def parse_hostport(text: str, key: str, default_port: int | None = None, *, ipv6: bool = False) -> tuple[str, int]:
    """`ipv6`: an IPv6 address ([::1]:5060) is accepted (returned without
    brackets); by default it is refused with a clear error, where only
    IPv4 is served: the nodes and the proxy's side facing them."""
    text = str(text).strip()
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::([0-9]+))?|([^:\[\]\s]+)(?::([0-9]+))?", text)
    if not m:
        raise ConfigError(f"{key}: expected HOST:PORT, got {text!r}")
    if m.group(1) and not ipv6:
        raise ConfigError(f"{key}: IPv6 addresses are not supported here, got {text!r} "
                          f"(the nodes and the proxy's address for them are IPv4; use an IPv4 address or a host name)")
    host = m.group(1) or m.group(3)
    port_text = m.group(2) or m.group(4)
    if port_text is None:
        if default_port is None:
            raise ConfigError(f"{key}: missing port in {text!r}")
        return host, default_port
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{key}: port out of range in {text!r}")
    return host, port


@dataclass(frozen=True)
class NodeConfig:
    id: str
    host: str
    port: int
    redis: str = ""
    admin: str = ""

    @property
    def sip(self) -> tuple[str, int]:
        return (self.host, self.port)


# the proxy's workers share the nodes' health in a page of this many slots
MAX_NODES = 256

# key -> (type, default, what it changes). The README's configuration table
# lists the same keys.
SETTINGS: dict[str, tuple[type, Any, str]] = {
    "cluster.secret": (str, "sipha-change-me", "key of the BEKey stamp MAC; the same on proxy and nodes"),
    "proxy.listen": (str, "127.0.0.1:5060", "proxy SIP address(es), comma-separated, UDP and TCP on each; "
                     "IPv4 and IPv6 ([::1]:5060)"),
    "proxy.internal": (str, "", "proxy address the nodes send to, of a family proxy.listen has (default: the first IPv4 listen address, else the first one)"),
    "proxy.advertise": (str, "", "host:port written into Via/Record-Route/Path, one per address family, "
                        "comma-separated (default: the first listen address of each family)"),
    "proxy.tls_listen": (str, "", "proxy SIP-over-TLS address(es), comma-separated, e.g. 0.0.0.0:5061 "
                         "(each of a family proxy.listen has too); empty: no TLS"),
    "proxy.ws_listen": (str, "", "proxy SIP-over-WebSocket address(es) (RFC 7118, for WebRTC clients), "
                        "comma-separated, e.g. 0.0.0.0:8080; empty: none"),
    "proxy.wss_listen": (str, "", "the same over TLS (wss://, with proxy.tls_cert), e.g. 0.0.0.0:8443; empty: none"),
    "proxy.ws_origins": (str, "", "web origins whose pages may open a WebSocket to the proxy, comma-separated "
                         "(https://phone.example.com); a browser's upgrade from a page of any other gets 403; "
                         "empty: any (a client that sends no Origin, not a browser, is always let in)"),
    "proxy.tls_cert": (str, "", "PEM file: the certificate (chain) the proxy presents on TLS and WSS"),
    "proxy.tls_key": (str, "", "PEM file: the private key of proxy.tls_cert (empty: in that file)"),
    "proxy.tls_ca": (str, "", "PEM file of the CAs that TLS peers are verified against: those the proxy "
                     "connects to (trunks; empty: the system's), and with proxy.tls_verify_client those "
                     "that connect to it (one file for both: concatenate the CAs)"),
    "proxy.tls_verify_client": (bool, False, "mutual TLS: ask the peers that connect to proxy.tls_listen for a "
                                "certificate, and refuse those without one that verifies against proxy.tls_ca "
                                "(needed then); the proxy presents proxy.tls_cert when it connects, always"),
    "proxy.tls_crl": (str, "", "mutual TLS: PEM file of the certificate revocation lists of the CAs in "
                      "proxy.tls_ca that sign the peers' certificates (one each: a peer whose CA has none in it is "
                      "refused too); a peer connecting to proxy.tls_listen whose certificate one of them revokes "
                      "is refused; read again on SIGHUP (a CRL renewed); needs proxy.tls_verify_client; "
                      "empty: no revocation check"),
    "proxy.tls_peers": (str, "", "mutual TLS: the names a peer connecting to proxy.tls_listen must have in its "
                        "certificate (a DNS or sip: URI subjectAltName, else its common name), comma-separated; "
                        "*.example.com for any one label there (sip.pstnhub.microsoft.com for Teams Direct "
                        "Routing); needs proxy.tls_verify_client; empty: any certificate proxy.tls_ca signed"),
    "proxy.dns_servers": (str, "", "DNS servers asked for the SRV records of named trunks (RFC 3263), comma-separated "
                          "IP[:PORT]; empty: those of /etc/resolv.conf"),
    "proxy.dns_failover": (float, 3.0, "seconds a request to a named trunk with several servers (SRV or A records) "
                           "may go unanswered before its next retransmission goes to the next server (which "
                           "is then tried last for 60 s); 0: never"),
    "proxy.nat_ping": (float, 25.0, "seconds between the CRLF keep-alives the proxy sends to each phone "
                       "registered over UDP from behind NAT, so its router keeps the binding open for the "
                       "calls to it (Kamailio's natping_interval); 0: none"),
    "proxy.admin": (str, "auto", "admin HTTP for /status and /metrics: HOST:PORT, off, or auto = 127.0.0.1 at SIP port + 1000"),
    "proxy.workers": (int, 1, "proxy processes sharing each UDP port (SO_REUSEPORT: one flow stays on one worker); worker 0 also serves TCP, probes the nodes and the admin HTTP"),
    "health.probe": (bool, True, "send OPTIONS probes to the nodes; off treats every node as up"),
    "health.interval": (float, 0.3, "seconds between OPTIONS probes to each node (a hung node is out of the ring after at most interval x (down_after + 1): 0.9 s by default)"),
    "health.timeout": (float, 0.3, "seconds to wait for a probe answer (at most health.interval)"),
    "health.down_after": (int, 2, "missed probes before a node is out of the ring"),
    "health.up_after": (int, 2, "answered probes before a node is back in the ring"),
    "ramp.start": (float, 0.1, "load factor of a node that comes back"),
    "ramp.duration": (float, 30.0, "seconds for the load factor to grow from ramp.start to 1"),
    "ramp.steps": (int, 10, "load-factor steps over ramp.duration"),
    "limits.rate": (float, 0.0, "requests per second one source address may send; 0 turns the flood limit off"),
    "limits.burst": (int, 0, "requests a source may send at once before its rate applies (0: twice the rate)"),
    "limits.ban": (float, 30.0, "seconds a source that exceeded its rate is ignored"),
    "limits.overload_delay": (float, 0.04, "seconds a message may wait in the UDP receive queue of the proxy or a node (it is falling behind) before new INVITEs, REGISTERs, SUBSCRIBEs and MESSAGEs get 503: a growing share of them, all at twice this, once it has lasted 0.5 s; 0 turns this off"),
    "limits.drop_scanners": (bool, True, "silently drop requests whose User-Agent is a known scanner (sipvicious, sipcli, ...)"),
    "limits.tcp_connections": (int, 4096, "most TCP connections the proxy keeps open"),
    "limits.tcp_per_source": (int, 64, "most TCP connections from one address"),
    "limits.tcp_message_timeout": (float, 10.0, "seconds a started message may take to arrive complete on TCP"),
    "limits.tcp_idle": (float, 300.0, "seconds before an idle TCP connection is closed"),
    "auth.users_file": (str, "", "digest users, one user:password a line; empty: no authentication"),
    "auth.realm": (str, "sipha", "digest realm in challenges"),
    "auth.nonce_ttl": (float, 300.0, "seconds a nonce is good for (then stale=true)"),
    "auth.algorithms": (str, "MD5", "digest algorithms the challenges offer, one challenge each, in this order "
                        "(MD5, SHA-256: RFC 8760, e.g. \"SHA-256, MD5\"); MD5 alone, as Kamailio offers, unless "
                        "every phone copes with SHA-256: some (baresip 1.0) give up on any challenge they do not "
                        "know, even after an MD5 one"),
    "auth.trusted": (str, "", "addresses and networks whose requests need no digest credentials, comma-separated "
                     "(e.g. 192.0.2.10, 198.51.100.0/24: the carrier's trunk, a PBX); Kamailio's allow_source_address"),
    "node.admin": (str, "auto", "node admin HTTP: HOST:PORT, off, or auto = the node's [[nodes]] admin, else loopback (::1 for a node on IPv6) at SIP port + 1000"),
    "node.upstream": (str, "", "trunk URI(s) for calls to AORs not registered here, comma-separated: tried in "
                      "order, the next when one answers 408 or 5xx or nothing (empty: 404)"),
    "node.upstream_timeout": (float, 3.0, "seconds a trunk with another after it in node.upstream may leave an "
                              "INVITE without any answer (not even 100 Trying) before the call goes to the next "
                              "(Kamailio's fr_timer in a failure route)"),
    "node.min_expires": (int, 60, "shortest registration accepted; shorter gets 423 Interval Too Brief"),
    "node.max_expires": (int, 86400, "longest registration granted; longer is shortened to this"),
    "node.flow_timer": (int, 0, "seconds between a SIP outbound phone's keep-alives (STUN over UDP, CRLF over TCP), sent as Flow-Timer in the REGISTER's 2xx (RFC 5626 §5.4); 0: none sent, the phone keeps its own pace (about 25 s over UDP, 2 minutes over TCP); keep it under limits.tcp_idle"),
    "node.max_contacts": (int, 10, "most contacts one address of record may have bound (a phone's own, each desk phone's, each softphone's): a REGISTER that would bind more gets 403 and binds nothing (refreshing or removing is always accepted); 0: no limit"),
    "node.invite_timeout": (float, 180.0, "seconds a callee may ring, from its last provisional answer, before the node CANCELs it and the caller gets 408 (RFC 3261 Timer C; Kamailio's fr_inv_timer)"),
    "node.dialog_ttl": (int, 43200, "seconds a call may go without a request in its dialog (a re-INVITE or UPDATE session refresh counts; the ACK does not): past that the node sends each side a BYE and writes its call record with ended_by=timeout (12 h: Kamailio's and OpenSIPS's dialog default_timeout)"),
    "node.redis_prefix": (str, "sipha", "prefix of every Redis key"),
    "hep.server": (str, "", "IP:PORT of a HEP3 capture server (Homer's heplify-server, Kamailio's sipcapture) that gets a copy of every SIP message the process sends or receives, over UDP (Kamailio's siptrace); empty: off"),
    "hep.capture_id": (int, 2001, "capture agent id written into each copy (HEP chunk 12)"),
    "hep.password": (str, "", "HEP authentication key written into each copy (chunk 14); empty: none"),
    "log.level": (str, "info", "debug, info, warning or error"),
    "log.format": (str, "logfmt", "logfmt or json"),
    "log.file": (str, "", "log file path (reopened when rotated); empty: stderr"),
}


def env_name(key: str) -> str:
    return "SIPHA_" + key.upper().replace(".", "_")


def _coerce(key: str, typ: type, value: Any) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            v = typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {'an integer' if typ is int else 'a number'}, got {value!r}") from None
        if v < 0:
            raise ConfigError(f"{key}: must not be negative, got {value!r}")
        return v
    if not isinstance(value, (str, int, float)):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return str(value)


def parse_node(text: str, key: str = "nodes") -> NodeConfig:
    ident, sep, rest = str(text).partition("=")
    ident = ident.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", ident):
        raise ConfigError(f"{key}: expected ID=HOST:PORT[,REDIS_URL], got {text!r}")
    addr, _, redis_url = rest.partition(",")
    host, port = parse_hostport(addr, key, ipv6=True)
    return NodeConfig(ident, host, port, redis_url.strip())


@dataclass
class Config:
    values: dict[str, Any]
    nodes: list[NodeConfig] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def secret(self) -> bytes:
        return self.values["cluster.secret"].encode()

    @property
    def listen(self) -> list[tuple[str, int]]:
        """The proxy's listen addresses, IPv6 ones without brackets."""
        found = [parse_hostport(p, "proxy.listen", ipv6=True)
                 for p in self.values["proxy.listen"].split(",") if p.strip()]
        for i, addr in enumerate(found):
            if addr in found[:i] and addr[1] != 0:
                raise ConfigError(f"proxy.listen: {hostport(addr)} is given twice")
        return found

    @property
    def ws_origins(self) -> frozenset[str]:
        found = frozenset(origin_key(o) for o in self.values["proxy.ws_origins"].split(",") if o.strip())
        for o in found:
            if not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", o):
                raise ConfigError(f"proxy.ws_origins: expected scheme://host[:port], got {o!r}")
        return found

    @property
    def tls_peers(self) -> tuple[str, ...]:
        found = tuple(n.strip().lower().rstrip(".") for n in self.values["proxy.tls_peers"].split(",") if n.strip())
        for n in found:
            if not re.fullmatch(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", n):
                raise ConfigError(f"proxy.tls_peers: expected host names (*.example.com for any one label), got {n!r}")
        return found

    @property
    def trusted(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        found = []
        for text in self.values["auth.trusted"].split(","):
            if text.strip():
                try:
                    found.append(ipaddress.ip_network(text.strip(), strict=False))
                except ValueError:
                    raise ConfigError(f"auth.trusted: expected IP addresses or networks (ADDR/BITS), "
                                      f"got {text.strip()!r}") from None
        return found

    @property
    def digest_algorithms(self) -> tuple[str, ...]:
        known = ("MD5", "SHA-256")
        found = tuple(a.strip().upper() for a in self.values["auth.algorithms"].split(",") if a.strip())
        if not found or any(a not in known for a in found) or len(set(found)) != len(found):
            raise ConfigError(f"auth.algorithms: expected one or both of {', '.join(known)}, in the order "
                              f"offered, got {self.values['auth.algorithms']!r}")
        return found

    @property
    def hep_server(self) -> tuple[str, int] | None:
        if not self.values["hep.server"]:
            return None
        found = parse_hostport(self.values["hep.server"], "hep.server", 9060, ipv6=True)
        if not is_ip(found[0]):
            raise ConfigError(f"hep.server: {found[0]!r} is not an IP address")
        return found

    @property
    def dns_servers(self) -> list[tuple[str, int]]:
        found = [parse_hostport(p, "proxy.dns_servers", 53, ipv6=True)
                 for p in self.values["proxy.dns_servers"].split(",") if p.strip()]
        for host, _ in found:
            if not is_ip(host):
                raise ConfigError(f"proxy.dns_servers: {host!r} is not an IP address")
        return found

    @property
    def internal(self) -> tuple[str, int]:
        """The proxy's address for the nodes: proxy.internal (of a family
        proxy.listen has), else its first IPv4 listen address, else (on
        IPv6 only) its first one. The nodes' addresses are of its family."""
        listen = self.listen
        if not listen:
            raise ConfigError("proxy.listen: no address given")
        found = min(listen, key=lambda a: ":" in a[0])
        if self.values["proxy.internal"]:
            found = parse_hostport(self.values["proxy.internal"], "proxy.internal", 5060, ipv6=True)
            if all((":" in h) != (":" in found[0]) for h, _ in listen):
                raise ConfigError(f"proxy.internal: {hostport(found)} is {'IPv6' if ':' in found[0] else 'IPv4'}, "
                                  f"and proxy.listen has no address of that family to take the nodes' messages on")
        for n in self.nodes:
            if is_ip(n.host) and (":" in n.host) != (":" in found[0]):
                raise ConfigError(f"nodes: {n.id} is at {hostport((n.host, n.port))}, and the proxy's address "
                                  f"for the nodes (proxy.internal) is {hostport(found)}: use one family for both")
        return found

    @property
    def advertise(self) -> dict[bool, tuple[str, int]]:
        """proxy.advertise by family (True: IPv6), one at most of each."""
        found: dict[bool, tuple[str, int]] = {}
        for text in self.values["proxy.advertise"].split(","):
            if text.strip():
                host, port = parse_hostport(text, "proxy.advertise", 5060, ipv6=True)
                v6 = ":" in host
                if v6 in found:
                    raise ConfigError(f"proxy.advertise: two {'IPv6' if v6 else 'IPv4'} addresses "
                                      f"(one of each family at most), got {self.values['proxy.advertise']!r}")
                found[v6] = (host, port)
        for v6 in found:
            if all((":" in h) != v6 for h, _ in self.listen):
                raise ConfigError(f"proxy.advertise: an {'IPv6' if v6 else 'IPv4'} address, but proxy.listen "
                                  f"has none, got {self.values['proxy.advertise']!r}")
        return found

    def stream_listen(self, kind: str) -> list[tuple[str, int]]:
        """proxy.{kind}_listen (STREAM_KINDS), each of a family proxy.listen has too."""
        key = f"proxy.{kind}_listen"
        found = [parse_hostport(p, key, 5061 if kind == "tls" else None, ipv6=True)
                 for p in self.values[key].split(",") if p.strip()]
        families = {":" in h for h, _ in self.listen}
        for host, port in found:
            if (":" in host) not in families:
                raise ConfigError(f"{key}: {hostport((host, port))} is {'IPv6' if ':' in host else 'IPv4'}, "
                                  f"and proxy.listen has no address of that family")
        return found

    def tls_server_context(self, *, verify_clients: bool = False) -> ssl.SSLContext | None:
        """The proxy's TLS server side (None without proxy.tls_listen or
        proxy.wss_listen); `verify_clients`: the one of proxy.tls_listen
        under proxy.tls_verify_client, which asks for a certificate and
        checks it against proxy.tls_ca."""
        if not self.stream_listen("tls") and not self.stream_listen("wss"):
            return None
        if not self.values["proxy.tls_cert"]:
            raise ConfigError("proxy.tls_cert: needed with proxy.tls_listen or proxy.wss_listen "
                              "(a PEM certificate file)")
        if verify_clients:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self._tls_ca())
            ctx.verify_mode = ssl.CERT_REQUIRED
            if self.values["proxy.tls_crl"]:
                self._load_crl(ctx)
        else:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.options |= ssl.OP_NO_RENEGOTIATION     # a write never waits on a read (sipcore.transport)
        return self._with_our_certificate(ctx)

    def tls_client_context(self) -> ssl.SSLContext:
        """For the TLS connections the proxy opens: peers verified against
        proxy.tls_ca, else the system's CAs, and their name; our
        certificate for a peer that asks for one (mutual TLS)."""
        ctx = ssl.create_default_context(cafile=self._tls_ca() if self.values["proxy.tls_ca"] else None)
        return self._with_our_certificate(ctx)

    def _load_crl(self, ctx: ssl.SSLContext) -> None:
        """proxy.tls_crl into the context that verifies the peers' certificates."""
        crl = self.values["proxy.tls_crl"]
        if not os.path.isfile(crl):
            raise ConfigError(f"proxy.tls_crl: no such file {crl!r}")
        try:
            if b"-----BEGIN X509 CRL-----" not in Path(crl).read_bytes():
                raise ConfigError(f"proxy.tls_crl: no PEM certificate revocation list in {crl!r}")
            ctx.load_verify_locations(cafile=crl)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"proxy.tls_crl: cannot load {crl!r}: {exc}") from None
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF

    def _tls_ca(self) -> str:
        ca = self.values["proxy.tls_ca"]
        if not os.path.isfile(ca):
            raise ConfigError(f"proxy.tls_ca: no such file {ca!r}")
        try:
            ssl.create_default_context(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"proxy.tls_ca: cannot load {ca!r}: {exc}") from None
        return ca

    def _with_our_certificate(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        """TLS 1.2 at least, and proxy.tls_cert / tls_key loaded (if set)."""
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        cert, key = self.values["proxy.tls_cert"], self.values["proxy.tls_key"]
        if not cert:
            return ctx
        for name, path in (("proxy.tls_cert", cert), ("proxy.tls_key", key)):
            if path and not os.path.isfile(path):
                raise ConfigError(f"{name}: no such file {path!r}")
        try:
            ctx.load_cert_chain(cert, key or None)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"proxy.tls_cert / proxy.tls_key: cannot load {cert!r}"
                              f"{f' with {key!r}' if key else ''}: {exc}") from None
        return ctx

    def node(self, ident: str) -> NodeConfig:
        for n in self.nodes:
            if n.id == ident:
                return n
        raise ConfigError(f"--id: no node {ident!r} in the node list ({', '.join(n.id for n in self.nodes) or 'empty'})")


def load_config(path: str | None = None, *, overrides: dict[str, Any] | None = None,
                nodes: list[str] | None = None, env: dict[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    values = {k: spec[1] for k, spec in SETTINGS.items()}
    node_list: list[NodeConfig] = []
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"--config: no such file {path!r}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config: {path}: {exc}") from None
        for section, table in data.items():
            if section == "nodes":
                if not isinstance(table, list):
                    raise ConfigError("nodes: expected [[nodes]] tables")
                for i, entry in enumerate(table):
                    k = f"nodes[{i}]"
                    if not isinstance(entry, dict) or "id" not in entry or "sip" not in entry:
                        raise ConfigError(f"{k}: needs id and sip")
                    node = parse_node(f"{entry['id']}={entry['sip']},{entry.get('redis', '')}", k)
                    if entry.get("admin"):
                        parse_hostport(entry["admin"], f"{k}.admin", ipv6=True)
                        node = NodeConfig(node.id, node.host, node.port, node.redis, str(entry["admin"]))
                    node_list.append(node)
                continue
            if not isinstance(table, dict):
                raise ConfigError(f"{section}: expected a [{section}] table")
            for name, value in table.items():
                key = f"{section}.{name}"
                if key not in SETTINGS:
                    raise ConfigError(f"{key}: unknown setting")
                values[key] = _coerce(key, SETTINGS[key][0], value)
    for key, (typ, _, _) in SETTINGS.items():
        if env_name(key) in env:
            values[key] = _coerce(env_name(key), typ, env[env_name(key)])
    if env.get("SIPHA_NODES"):
        node_list = [parse_node(e, "SIPHA_NODES") for e in env["SIPHA_NODES"].split()]
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, SETTINGS[key][0], value)
    if nodes:
        node_list = [parse_node(e, "--node") for e in nodes]
    ids = [n.id for n in node_list]
    if len(set(ids)) != len(ids):
        raise ConfigError("nodes: duplicate node id")
    cfg = Config(values, node_list)
    # validate (the listen addresses too)
    cfg.internal, cfg.advertise, cfg.dns_servers, cfg.ws_origins, cfg.hep_server, cfg.tls_peers
    for kind in STREAM_KINDS:
        cfg.stream_listen(kind)
    if values["proxy.tls_verify_client"] and not (cfg.stream_listen("tls") and values["proxy.tls_ca"]):
        raise ConfigError("proxy.tls_verify_client: needs proxy.tls_listen, and proxy.tls_ca (the CAs "
                          "the peers' certificates must be signed by)")
    for key in ("proxy.tls_peers", "proxy.tls_crl"):
        if values[key] and not values["proxy.tls_verify_client"]:
            raise ConfigError(f"{key}: needs proxy.tls_verify_client (it is about the certificates that asks "
                              "the peers for)")
    if values["log.format"] not in ("logfmt", "json"):
        raise ConfigError(f"log.format: expected logfmt or json, got {values['log.format']!r}")
    if values["log.level"].lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log.level: expected debug, info, warning or error, got {values['log.level']!r}")
    if not 0 < values["ramp.start"] <= 1:
        raise ConfigError("ramp.start: must be in (0, 1]")
    if not 1 <= values["proxy.workers"] <= 64:
        raise ConfigError(f"proxy.workers: expected 1 to 64, got {values['proxy.workers']}")
    if values["proxy.workers"] > 1 and any(port == 0 for kind in STREAM_KINDS
                                           for _, port in cfg.listen + cfg.stream_listen(kind)):
        raise ConfigError("proxy.workers: several workers need fixed ports in proxy.listen and "
                          "proxy.tls_listen/ws_listen/wss_listen, not 0")
    if not 0 <= values["limits.overload_delay"] <= 0.25:
        # past that, callers are retransmitting before anything is refused
        raise ConfigError(f"limits.overload_delay: expected 0 (off) up to 0.25 s, got {values['limits.overload_delay']}")
    if values["hep.capture_id"] >= 2 ** 32:
        raise ConfigError(f"hep.capture_id: expected 0 to {2 ** 32 - 1}, got {values['hep.capture_id']}")
    if values["health.interval"] <= 0:
        raise ConfigError("health.interval: must be positive")
    if values["node.invite_timeout"] < 1:
        raise ConfigError(f"node.invite_timeout: expected at least 1 s, got {values['node.invite_timeout']}")
    if values["node.dialog_ttl"] < 2:
        raise ConfigError(f"node.dialog_ttl: expected at least 2 s, got {values['node.dialog_ttl']}")
    if values["health.down_after"] < 1 or values["health.up_after"] < 1:
        raise ConfigError("health.down_after / health.up_after: must be at least 1")
    if len(node_list) > MAX_NODES:
        raise ConfigError(f"nodes: at most {MAX_NODES} nodes, got {len(node_list)}")
    return cfg


# applied by a reload (SIGHUP) as well as the node list: the log level;
# the proxy's TLS files (a renewed certificate), flood and overload
# limits, TCP connection limits, probe timers and ramp; the nodes' users,
# trunks, registration and call timers; on both, the HEP capture. Each
# applies from the reload on: to the probes, connections, registrations,
# calls and messages that come next
PROXY_LIVE = ("log.level", "limits.rate", "limits.burst", "limits.ban", "limits.drop_scanners",
              "limits.overload_delay", "limits.tcp_connections", "limits.tcp_per_source",
              "limits.tcp_message_timeout", "limits.tcp_idle",
              "health.interval", "health.timeout", "health.down_after", "health.up_after",
              "ramp.start", "ramp.duration", "ramp.steps", "proxy.dns_failover", "proxy.ws_origins", "proxy.tls_peers",
              "hep.server", "hep.capture_id", "hep.password")
NODE_LIVE = ("log.level", "node.upstream", "node.upstream_timeout", "node.min_expires", "node.max_expires",
             "node.max_contacts", "node.flow_timer", "node.invite_timeout", "node.dialog_ttl", "auth.realm", "auth.nonce_ttl",
             "auth.algorithms", "limits.overload_delay", "health.interval", "health.down_after", "hep.server",
             "hep.capture_id", "hep.password")
LIVE_SETTINGS = frozenset({"proxy.tls_cert", "proxy.tls_key", "proxy.tls_ca", "proxy.tls_crl",
                           "auth.users_file", "auth.trusted", *PROXY_LIVE, *NODE_LIVE})


# the counter of reloads, by result (ok, failed), in the proxy's and the nodes' metrics
RELOAD_COUNTER = {"reloads": ("result",)}


def changed_settings(old: Config, new: Config, keys) -> list[str]:
    return [k for k in keys if old.values[k] != new.values[k]]


def applied_fields(cfg: Config, keys) -> dict:
    """The settings `keys` of `cfg` for the settings_applied log line, a
    password shown as changed only."""
    return {k: "(changed)" if k.endswith("password") else cfg[k] for k in keys}


def with_live_settings(running: Config, read: Config) -> Config:
    """The running configuration with what a reload applies taken from the
    one just read: the node list and LIVE_SETTINGS."""
    return Config({**running.values, **{k: read.values[k] for k in LIVE_SETTINGS}}, list(read.nodes))


@dataclass
class NodeListChange:
    """What a reload (SIGHUP) finds in the configuration against what runs."""
    added: list[str]
    removed: list[str]
    moved: list[str]         # the same id at a new SIP address, Redis or admin address
    restart_only: list[str]  # other settings that differ: read at start only

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.moved)

    def fields(self) -> dict[str, str | None]:
        """For the log line that says what a reload changed."""
        return {what: ",".join(ids) or None
                for what, ids in (("added", self.added), ("removed", self.removed), ("moved", self.moved))}

    @property
    def restart_hint(self) -> str | None:
        """What to know before restarting for those settings."""
        if "cluster.secret" in self.restart_only:
            return ("cluster.secret signs the stamps of every call in progress: a process restarted with "
                    "another one, or a cluster that does not share it, loses them")
        return None


# what a node reads outside its node.*, auth.*, hep.* and log.* settings
_NODE_ALSO_READS = frozenset({"cluster.secret", "proxy.listen", "proxy.internal", "limits.overload_delay",
                              "health.interval", "health.down_after"})


def reads_setting(role: str, key: str) -> bool:
    """Whether a process of `role` ("proxy" or "node") uses setting `key`:
    one file serves both, and a change to the other role's settings is
    not the reloading process's to report."""
    section = key.split(".", 1)[0]
    if role == "proxy":
        return section not in ("node", "auth")
    return section in ("node", "auth", "hep", "log") or key in _NODE_ALSO_READS


def node_list_change(old: Config, new: Config, role: str | None = None) -> NodeListChange:
    """`role`: only the settings a proxy or a node reads are in restart_only."""
    before = {n.id: n for n in old.nodes}
    after = {n.id: n for n in new.nodes}
    return NodeListChange(
        added=[nid for nid in after if nid not in before],
        removed=[nid for nid in before if nid not in after],
        moved=[nid for nid, n in after.items() if nid in before and before[nid] != n],
        restart_only=sorted(k for k, v in new.values.items() if old.values.get(k) != v and k not in LIVE_SETTINGS
                            and (role is None or reads_setting(role, k))))
