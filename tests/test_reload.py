"""What a SIGHUP reads again in place: the node list (the proxy's ring,
health view and address index change in one step), the proxy's TLS
files, a node's users."""
from __future__ import annotations

import asyncio
import dataclasses
import ssl
import time

import pytest

from proxy.server import Proxy
from sipcore.bekey import rank
from nodekit import UDP, register, settled, with_nodes
from sipcore.config import ConfigError, load_config, node_list_change
from sipcore.message import make_response, parse_message
from sipha.cluster import Cluster
from sipha.sipp import free_port


class Answers(asyncio.DatagramProtocol):
    """A node as its probes see it: 200 to every OPTIONS."""

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(make_response(parse_message(data), 200, "OK").to_bytes(), addr)


class Counted(Answers):
    """... counting the probes."""
    probes = 0

    def datagram_received(self, data, addr):
        self.probes += 1
        super().datagram_received(data, addr)


class Captured(asyncio.DatagramProtocol):
    """A HEP capture server: what it got."""

    def __init__(self):
        self.got: list[bytes] = []

    def datagram_received(self, data, addr):
        self.got.append(data)


def config(nodes: list[str], **settings):
    return load_config(None, overrides={"proxy.listen": f"127.0.0.1:{free_port()}", "proxy.admin": "off",
                                        **settings}, nodes=nodes)


@pytest.mark.parametrize("probe", [True, False])
def test_a_reload_adds_removes_and_moves_nodes_in_place(probe, caplog):
    """A node gone leaves the ring, the probes and the address index at
    once, even for a key whose owner the router remembered (one still
    up is named in a warning: it should have been stopped first); a new
    node waits for its probes (up at once when nothing probes); a moved
    node keeps its state at its new address."""
    a, b, c = free_port(), free_port(), free_port()

    async def go():
        loop = asyncio.get_running_loop()
        # n1 and n2 answer where they are at first; n2 at its new address
        # too; nothing answers where n3 comes
        answering = [(await loop.create_datagram_endpoint(Answers, local_addr=("127.0.0.1", port)))[0]
                     for port in (a, b, c)]
        proxy = Proxy(config([f"n1=127.0.0.1:{a}", f"n2=127.0.0.1:{b}"], **{"health.probe": probe}))
        await proxy.start()
        try:
            await asyncio.sleep(0.4)
            key = next(k for k in (f"{i:016x}" for i in range(1000)) if rank(k, ["n1", "n2"])[0] == "n1")
            assert proxy._owner(key)[0] == "n1"           # remembered
            new = [f"n2=127.0.0.1:{c}", f"n3=127.0.0.1:{a}"]
            await proxy.reload(config(new, **{"health.probe": probe}))
            seen = {"ids": proxy.node_ids, "health": list(proxy.health.nodes), "probes": sorted(proxy.health._probes),
                    "index": dict(proxy.node_by_addr), "owner": proxy._owner(key)[0],
                    "n2": proxy.health.nodes["n2"].addr, "n3_up": proxy.health.nodes["n3"].up,
                    "rank": rank(key, ["n2", "n3"])}
        finally:
            await proxy.close()
            for t in answering:
                t.close()
        return seen

    seen = asyncio.run(go())
    assert seen["ids"] == ["n2", "n3"] and seen["health"] == ["n2", "n3"]
    # n1 still answered its probes: taken out without a drain, which the log says
    warned = [r for r in caplog.records if getattr(r, "event", None) == "node_removed_while_up"]
    assert len(warned) == (1 if probe else 0)
    assert seen["probes"] == (["n2", "n3"] if probe else [])
    assert seen["index"] == {("127.0.0.1", c): "n2", ("127.0.0.1", a): "n3"}
    assert seen["n2"] == ("127.0.0.1", c)
    # probed: n3 is out until it answers (nothing does there), so n2 owns
    # the key; unprobed, n3 counts as up, and the ring of the new list decides
    assert seen["n3_up"] is (not probe)
    assert seen["owner"] == ("n2" if probe else seen["rank"][0])


def test_what_a_reload_changes_is_named():
    old = config(["n1=127.0.0.1:5070", "n2=127.0.0.1:5071"])
    new = dataclasses.replace(config(["n1=127.0.0.1:5070", "n2=127.0.0.1:5072", "n3=127.0.0.1:5073"],
                                     **{"limits.rate": 5, "log.level": "debug", "limits.tcp_idle": 60,
                                        "proxy.nat_ping": 10}))
    change = node_list_change(old, new)
    assert (change.added, change.removed, change.moved) == (["n3"], [], ["n2"])
    # proxy.listen differs too (a free port each time); log.level, the
    # flood and connection limits are applied live
    assert change.restart_only == ["proxy.listen", "proxy.nat_ping"] and change.restart_hint is None
    assert not node_list_change(old, old)
    # one file for both: each process names only what it reads
    both = dataclasses.replace(old, values={**old.values, "proxy.nat_ping": 10.0, "node.redis_prefix": "x",
                                            "cluster.secret": "another"})
    assert node_list_change(old, both, "proxy").restart_only == ["cluster.secret", "proxy.nat_ping"]
    assert node_list_change(old, both, "node").restart_only == ["cluster.secret", "node.redis_prefix"]
    rekeyed = node_list_change(old, config(["n1=127.0.0.1:5070"], **{"cluster.secret": "another"}))
    assert "cluster.secret" in rekeyed.restart_only and "stamps of every call" in rekeyed.restart_hint


def test_a_reload_serves_a_renewed_certificate_and_a_broken_one_changes_nothing(tmp_path):
    """kamcmd tls.reload: the certificate files read again, for the
    connections from then on (an open one goes on with its own); a key
    that does not load is refused, with the node list of the same reload
    left as it was."""
    Cluster(str(tmp_path)).make_certificate()
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    cfg = config(["n1=127.0.0.1:5070"], **{"proxy.tls_listen": f"127.0.0.1:{free_port()}", "health.probe": False,
                                           "proxy.tls_cert": str(cert), "proxy.tls_key": str(key)})

    async def connect(addr):
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        return await asyncio.open_connection(*addr, ssl=ctx)

    async def served(addr) -> bytes:
        _, writer = await connect(addr)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return der

    async def pong(reader, writer) -> bytes:
        writer.write(b"\r\n\r\n")          # RFC 5626 keep-alive: a CRLF back
        return await asyncio.wait_for(reader.read(2), 2)

    async def go():
        proxy = Proxy(cfg)
        await proxy.start()
        try:
            addr = proxy.listen_streams["tls"][0]
            first = await served(addr)
            phone = await connect(addr)                       # a phone's connection, open throughout
            Cluster(str(tmp_path)).make_certificate()        # renewed in place
            await proxy.reload(cfg)
            renewed = await served(addr)
            assert await pong(*phone) == b"\r\n"           # still up, on its first certificate
            assert phone[1].get_extra_info("ssl_object").getpeercert(binary_form=True) == first
            key.write_text("not a key\n")
            with pytest.raises(ConfigError, match="proxy.tls_cert / proxy.tls_key: cannot load"):
                await proxy.reload(dataclasses.replace(cfg, nodes=[]))
            return first, renewed, await served(addr), proxy.node_ids
        finally:
            await proxy.close()

    first, renewed, after_refusal, node_ids = asyncio.run(go())
    assert renewed != first and renewed == ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert after_refusal == renewed and node_ids == ["n1"]


def test_a_node_reads_its_users_again_and_refuses_a_broken_file_whole(tmp_path):
    """A user added on a running node (auth.users_file read again on
    SIGHUP); a file that no longer parses changes nothing, not even the
    node list of the same reload."""
    users = tmp_path / "users"
    users.write_text("alice:secret1\n")

    async def scenario(nodes, sent):
        n1, n2 = nodes
        users.write_text("alice:secret1\nbob:secret2\n")
        await n1.reload(n1.cfg)
        got = dict(n1.auth.users)
        users.write_text("no colon here\n")
        with pytest.raises(ConfigError, match="auth.users_file: line 1"):
            await n1.reload(dataclasses.replace(n1.cfg, nodes=n1.cfg.nodes[:1]))
        return got, dict(n1.auth.users), n1.node_ids

    got, kept, node_ids = with_nodes(tmp_path, 2, scenario, {"auth.users_file": str(users)})
    assert got == {"alice": "secret1", "bob": "secret2"} and kept == got
    assert node_ids == ["node1", "node2"]


def test_a_reload_applies_new_flood_limits_and_keeps_the_bans():
    async def go():
        cfg = config(["n1=127.0.0.1:5070"], **{"health.probe": False, "limits.rate": 20})
        proxy = Proxy(cfg)
        await proxy.start()
        try:
            for _ in range(60):                                   # a flood from one source: banned
                proxy.limiter.allow("192.0.2.7")
            read = dataclasses.replace(cfg, values={**cfg.values, "limits.rate": 200.0, "limits.ban": 5.0,
                                                    "limits.drop_scanners": False})
            await proxy.reload(read)
            return (proxy.limiter.rate, proxy.limiter.burst, proxy.limiter.ban, proxy.drop_scanners,
                    proxy.limiter.is_banned("192.0.2.7"), proxy.cfg["limits.rate"])
        finally:
            await proxy.close()

    assert asyncio.run(go()) == (200.0, 400.0, 5.0, False, True, 200.0)


def test_a_node_takes_new_trunks_on_reload_and_refuses_one_that_is_not_sip(tmp_path):
    async def scenario(nodes, sent):
        n1 = nodes[0]
        values = {**n1.cfg.values, "node.upstream": "sip:a.example.net:5060, sip:b.example.net:5080",
                  "node.upstream_timeout": 3.0}
        await n1.reload(dataclasses.replace(n1.cfg, values=values))
        got = ([str(u) for u in n1.upstreams], n1.upstream_timeout)
        with pytest.raises(ConfigError, match="node.upstream: not a SIP URI"):
            await n1.reload(dataclasses.replace(n1.cfg, values={**values, "node.upstream": "mailto:x@example.net"}))
        return got, [str(u) for u in n1.upstreams]

    got, kept = with_nodes(tmp_path, 1, scenario)
    assert got == (["sip:a.example.net:5060", "sip:b.example.net:5080"], 3.0) and kept == got[0]


def test_a_reload_applies_probe_timers_ramp_and_connection_limits_to_what_comes_next(caplog):
    """Probe timers (the next round's), the ramp (a node ramping when
    ramp.duration goes to 0 is in at once, not a division by zero), the
    overload guard (its threshold; off and on again), the TCP limits and
    WebSocket origins (the connections from then on), DNS failover; named
    in settings_applied, none in reload_restart_needed."""
    caplog.set_level("INFO")
    port = free_port()

    async def go():
        loop = asyncio.get_running_loop()
        node, answers = await loop.create_datagram_endpoint(Counted, local_addr=("127.0.0.1", port))
        cfg = config([f"n1=127.0.0.1:{port}"], **{"health.interval": 0.05, "health.timeout": 0.05,
                                                  "ramp.duration": 60.0, "limits.overload_delay": 0.04})
        proxy = Proxy(cfg)
        await proxy.start()
        try:
            await asyncio.sleep(0.3)
            h = proxy.health.nodes["n1"]
            h.load_factor, h.ramp_started = 0.1, loop.time()     # as a node back from a restart
            assert proxy.health.ramp_factor(h, time.monotonic()) < 1.0
            guard = proxy.guards[0][1]
            values = {**cfg.values, "health.interval": 0.5, "health.timeout": 0.2, "health.down_after": 5,
                      "ramp.duration": 0.0, "limits.overload_delay": 0.1, "limits.tcp_connections": 10,
                      "limits.tcp_per_source": 2, "limits.tcp_idle": 30.0, "limits.tcp_message_timeout": 4.0,
                      "proxy.dns_failover": 1.5, "proxy.ws_origins": "https://phone.example.com"}
            await proxy.reload(dataclasses.replace(cfg, values=values))
            seen = {"ramp": proxy.health.ramp_factor(h, time.monotonic()), "same_guard": proxy.guards[0][1] is guard,
                    "low": guard.low, "dns": proxy.dns_failover,
                    "tcp": [(t.max_connections, t.max_per_source, t.idle_timeout, t.header_timeout, t.ws_origins)
                            for t in proxy.transports]}
            await asyncio.sleep(0.05)                   # the round under way ends
            before = answers.probes
            await asyncio.sleep(0.6)                    # two rounds at most at 0.5 s (at 0.05: twelve)
            seen["rounds"] = answers.probes - before
            await proxy.reload(dataclasses.replace(cfg, values={**values, "limits.overload_delay": 0.0}))
            seen["off"] = (proxy.guards, proxy._overload_timer, proxy.refuse_share)
            await proxy.reload(dataclasses.replace(cfg, values={**values, "limits.overload_delay": 0.08}))
            seen["on"] = [g.low for _, g in proxy.guards]
            await asyncio.sleep(0.05)
            seen["watching"] = proxy._overload_timer is not None
        finally:
            await proxy.close()
            node.close()
        return seen

    seen = asyncio.run(go())
    assert seen["ramp"] == 1.0 and seen["same_guard"] and seen["low"] == 0.1 and seen["dns"] == 1.5
    assert seen["tcp"] == [(10, 2, 30.0, 4.0, frozenset({"https://phone.example.com"}))]
    assert 1 <= seen["rounds"] <= 2
    assert seen["off"] == ([], None, 0.0) and seen["on"] == [0.08] and seen["watching"]
    applied = [r for r in caplog.records if getattr(r, "event", None) == "settings_applied"]
    assert {"health.interval", "ramp.duration", "limits.overload_delay", "proxy.ws_origins"} <= set(applied[0].fields)
    assert not [r for r in caplog.records if getattr(r, "event", None) == "reload_restart_needed"]


def test_a_node_applies_registration_limits_and_timers_on_reload(tmp_path):
    """node.max_contacts, Timer C, the dialog TTL (of the records saved
    from then on), the digest realm, the overload guard (on, off) and the
    HEP capture, on a running node."""
    async def scenario(nodes, sent):
        n, = nodes
        n.stamped = True                 # as a started node whose datagrams the kernel stamps
        n.on_message(register("hal", ["<sip:hal@192.0.2.60:5060>", "<sip:hal@192.0.2.61:5060>"]), *UDP)
        await settled(n)
        values = {**n.cfg.values, "node.max_contacts": 1, "node.invite_timeout": 30.0, "node.dialog_ttl": 600,
                  "auth.realm": "example.com", "limits.overload_delay": 0.1, "hep.server": "127.0.0.1:9060"}
        await n.reload(dataclasses.replace(n.cfg, values=values))
        n.on_message(register("ida", ["<sip:ida@192.0.2.70:5060>", "<sip:ida@192.0.2.71:5060>"]), *UDP)
        await settled(n)
        guard = n.guard
        seen = {"answers": [(a.status, a.reason) for a in sent[n]], "timer_c": n.tx.invite_timeout,
                "ttl": (n.store.ttl, n.store.grace), "low": guard and guard.low,
                "hep": n.transport.hep and n.transport.hep.server}
        await n.reload(dataclasses.replace(n.cfg, values={**values, "limits.overload_delay": 0.0}))
        await asyncio.sleep(0.05)
        seen["off"] = n.guard
        seen["watch_ended"] = all(t.done() for t in n._tasks)
        return seen

    seen = with_nodes(tmp_path, 1, scenario, {"node.max_contacts": "3"})
    assert seen["answers"] == [(200, "OK"), (403, "Forbidden (too many registered contacts, at most 1)")]
    assert seen["timer_c"] == 30.0 and seen["ttl"] == (600, 60) and seen["low"] == 0.1
    assert seen["hep"] == ("127.0.0.1", 9060)
    assert seen["off"] is None and seen["watch_ended"]


def test_a_reload_turns_the_hep_capture_on_and_off(caplog):
    """As Kamailio's siptrace.status: capture turned on for a while on a
    running proxy (every message from then on copied to the server, the
    password never in the log), then off (its socket closed)."""
    caplog.set_level("INFO")
    capture_port = free_port()

    async def go():
        loop = asyncio.get_running_loop()
        capture, server = await loop.create_datagram_endpoint(Captured, local_addr=("127.0.0.1", capture_port))
        got = server.got
        cfg = config(["n1=127.0.0.1:5070"], **{"health.probe": False})
        proxy = Proxy(cfg)
        await proxy.start()
        try:
            assert proxy.hep is None
            on = {**cfg.values, "hep.server": f"127.0.0.1:{capture_port}", "hep.password": "s3cret"}
            await proxy.reload(dataclasses.replace(cfg, values=on))
            mirror = proxy.hep
            proxy.transport.send(b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\n\r\n", ("127.0.0.1", free_port()))
            for _ in range(50):
                if got:
                    break
                await asyncio.sleep(0.01)
            await proxy.reload(dataclasses.replace(cfg, values={**on, "hep.server": ""}))
            return (mirror.server, all(t.hep is None for t in proxy.transports), proxy.hep, mirror.sock.fileno(),
                    [d[:4] for d in got])
        finally:
            await proxy.close()
            capture.close()

    server, off, hep, fileno, got = asyncio.run(go())
    assert server == ("127.0.0.1", capture_port) and got == [b"HEP3"]
    assert off and hep is None and fileno == -1
    lines = [r.fields for r in caplog.records if getattr(r, "event", None) == "settings_applied"]
    assert lines[0]["hep.password"] == "(changed)" and "s3cret" not in caplog.text
