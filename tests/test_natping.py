"""What a restarted proxy learns of the NAT flows from a node's admin
endpoint (proxy/natping.py NatPinger.ask), against a real admin HTTP
server on loopback: what it takes, what it leaves, and a node that does
not answer."""
from __future__ import annotations

import asyncio
import json
import logging

from proxy import natping
from proxy.natping import NatPinger
from proxy.server import Proxy
from sipcore.admin import AdminFetchError, AdminServer, fetch_json
from sipcore.config import load_config
from sipha.sipp import free_port

OURS = "<sip:127.0.0.1:5060;lr;flow=udp:127.0.0.1:{}>"


def flow_of(path: str):
    """Our Path entries name 127.0.0.1:5060; their flow is the phone's."""
    if not path.startswith("<sip:127.0.0.1:5060;"):
        return None
    return "127.0.0.1", int(path.split("flow=udp:127.0.0.1:")[1].rstrip(">"))


async def serve(body: str, status_ok: bool = True, port: int = 0) -> tuple[AdminServer, tuple[str, int]]:
    async def handler():
        return "application/json", body
    server = AdminServer({"/nat_flows": handler} if status_ok else {})
    return server, await server.start("127.0.0.1", port)


async def ask_and_wait(pinger: NatPinger, addr) -> None:
    pinger.ask("node1", addr, flow_of)
    await asyncio.gather(*pinger._asking)


def flows(pinger: NatPinger) -> set:
    return {f for slot in pinger.slots for f in slot}


def test_it_learns_our_udp_flows_and_keeps_what_a_register_said_since(caplog):
    async def go():
        body = json.dumps({"node": "node1", "flows": {
            OURS.format(7001): 300, OURS.format(7002): 60,
            "<sip:10.9.9.9:5060;lr;flow=udp:127.0.0.1:7003>": 300,     # not our Path
            OURS.format(7004): "soon",                                  # not a number of seconds
        }})
        server, addr = await serve(body)
        pinger = NatPinger(10, lambda data, flow: None)
        pinger.note(("127.0.0.1", 7002), 3000)          # a REGISTER since the restart
        before = pinger.slots[hash(("127.0.0.1", 7002)) % 10][("127.0.0.1", 7002)]
        try:
            with caplog.at_level(logging.INFO, logger="proxy"):
                await ask_and_wait(pinger, addr)
        finally:
            await server.close()
        assert flows(pinger) == {("127.0.0.1", 7001), ("127.0.0.1", 7002)}
        assert pinger.slots[hash(("127.0.0.1", 7002)) % 10][("127.0.0.1", 7002)] == before
        learned = [r.fields for r in caplog.records if getattr(r, "event", "") == "nat_flows_learned"]
        assert learned == [{"node": "node1", "flows": 1, "pinged": 2}]
    asyncio.run(go())


def test_a_node_that_does_not_answer_is_asked_again_then_named_in_a_warning(caplog, monkeypatch):
    monkeypatch.setattr(natping, "ASK_TRIES", (0.01, 0.01))

    async def go():
        pinger = NatPinger(10, lambda data, flow: None)
        with caplog.at_level(logging.INFO, logger="proxy"):
            await ask_and_wait(pinger, ("127.0.0.1", free_port()))
        assert not flows(pinger)
        warned = [r for r in caplog.records if getattr(r, "event", "") == "nat_flows_unknown"]
        assert len(warned) == 1 and warned[0].levelno == logging.WARNING
        assert warned[0].fields["node"] == "node1" and "http://127.0.0.1:" in warned[0].fields["error"]
    asyncio.run(go())


def test_fetch_json_names_the_address_and_what_went_wrong():
    async def go():
        for body, ok, expected in (("{}", False, "404 Not Found"), ("not json", True, "not JSON")):
            server, addr = await serve(body, status_ok=ok)
            try:
                try:
                    await fetch_json(*addr, "/nat_flows")
                except AdminFetchError as exc:
                    assert f"http://127.0.0.1:{addr[1]}/nat_flows" in str(exc) and expected in str(exc)
                else:
                    raise AssertionError("no error")
            finally:
                await server.close()
        server, addr = await serve('{"flows": {}}')
        try:
            assert await fetch_json(*addr, "/nat_flows") == {"flows": {}}
        finally:
            await server.close()
    asyncio.run(go())


def test_a_proxy_that_does_not_probe_asks_every_node_at_start():
    """With `--no-probe` no node ever answers a first probe, so the proxy
    asks each one for its flows when it starts (at the node's SIP port +
    1000, where `node.admin = auto` binds)."""
    async def go():
        proxy_port = free_port()
        path = f"<sip:127.0.0.1:{proxy_port};lr;flow=udp:127.0.0.1:7009>"
        admin_port = free_port()
        while admin_port < 2024:
            admin_port = free_port()
        server, _ = await serve(json.dumps({"node": "node1", "flows": {path: 300}}), port=admin_port)
        cfg = load_config(None, overrides={"proxy.listen": f"127.0.0.1:{proxy_port}", "proxy.admin": "off",
                                           "health.probe": False, "proxy.nat_ping": 10},
                          nodes=[f"node1=127.0.0.1:{admin_port - 1000}"])
        proxy = Proxy(cfg)
        await proxy.start()
        try:
            await asyncio.gather(*proxy.natping._asking)
            assert flows(proxy.natping) == {("127.0.0.1", 7009)}
        finally:
            await proxy.close()
            await server.close()
    asyncio.run(go())
