"""A node added to, and one taken out of, a running cluster under load
(`sipha add-node`, `sipha remove-node`): the proxy and each node read the
new node list on SIGHUP, in place, the cluster's secret kept."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
import tomllib

import pytest

from clusterkit import all_keys, logged, run, uac
from node.store import encode
from nodekit import with_nodes
from sipcore.config import ConfigError, load_config
from sipha.cluster import Cluster, ClusterError

pytestmark = pytest.mark.e2e


def test_a_node_added_and_one_removed_under_load_lose_no_call(make_cluster):
    """Over one TCP connection from SIPp to the proxy, which a restart of
    the proxy would end (and every call on it)."""
    c = make_cluster(nodes=3)
    secret = next(line for line in (c.dir / "cluster.toml").read_text().splitlines() if line.startswith("secret"))
    proxy_pid = c.procs()["proxy"]["pid"]

    async def scenario():
        s = uac(c, "uac", calls=300, rate=15, hold_ms=2000, transport="tcp")
        await s.start()
        await asyncio.sleep(2)
        added = await asyncio.to_thread(c.add_node)
        await asyncio.sleep(1)
        await asyncio.to_thread(c.remove_node, "node1")
        return await s.wait(90), added

    result, added = run(scenario())
    assert result.ok == 300 and result.failed == 0, result.log_tail
    assert added == "node4" and list(c.state["nodes"]) == ["node2", "node3", "node4"]
    config = (c.dir / "cluster.toml").read_text()
    assert secret in config.splitlines() and 'id = "node1"' not in config and 'id = "node4"' in config
    assert not c.running("node1") and not c.running("redis-node1") and "node1" not in c.procs()
    logs = {n: (c.dir / "logs" / f"{n}.log").read_text() for n in c.state["nodes"]}
    assert "event=dialog_created" in logs["node4"]          # its share of the new calls
    assert not any("level=error" in text for text in logs.values())
    assert c.procs()["proxy"]["pid"] == proxy_pid
    proxy_log = (c.dir / "logs" / "proxy.log").read_text()
    reloads = [line for line in proxy_log.splitlines() if "event=nodes_reloaded" in line]
    assert len(reloads) == 2 and "added=node4" in reloads[0] and "removed=node1" in reloads[1], reloads
    assert 'nodes="node2=' in reloads[1] and "node4=" in reloads[1]
    assert "event=node_up node=node4" in proxy_log
    for n in ("node2", "node3"):
        assert "event=nodes_reloaded node=" + n + " added=node4" in logs[n]
        assert "removed=node1" in logs[n]
    time.sleep(0.5)                                         # the last ACKs and deletes
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(c).values())
    # `sipha reload` after an edit by hand: the log level changes in place
    toml = c.dir / "cluster.toml"
    assert 'level = "debug"' in toml.read_text()
    toml.write_text(toml.read_text().replace('level = "debug"', 'level = "warning"')
                    .replace("interval = 0.3", "interval = 0.25").replace("[proxy]\n", "[proxy]\nnat_ping = 10\n"))
    r = subprocess.run([sys.executable, "-m", "sipha.cli", "reload", "--dir", str(c.dir)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "reloaded proxy, node2, node3, node4" in r.stdout, r.stdout + r.stderr
    # what each process took, as it logged it
    assert "  node3    applied health.interval, log.level\n" in r.stdout, r.stdout
    assert "  proxy    applied health.interval, log.level; needs a restart for proxy.nat_ping\n" in r.stdout, r.stdout
    assert "was=debug now=warning" in logged(c.dir / "logs" / "node3.log", "now=warning")
    toml.write_text("[cluster\n")
    with pytest.raises(ClusterError, match="proxy kept its configuration: --config: "):
        c.reload()
    assert c.running("proxy")


def test_a_restarted_node_mirrors_again_what_was_mirrored_to_a_removed_node(tmp_path):
    """Restarted with the shorter list (its Redis kept), a node saves again,
    to a partner of the list, each record whose only copy elsewhere is on
    a node removed from the cluster: a call of it then outlives this node
    dying next. A record mirrored to a listed node is left as it is."""
    gone, kept = "00000000000000aa", "00000000000000bb"

    async def scenario(nodes, sent):
        n1, n2 = nodes
        for bekey, partner in ((gone, "node9"), (kept, "node2")):
            record = {"k": "call", "st": "confirmed", "a": {"cid": f"{bekey}@x"}, "o": "node1", "p": partner, "v": 3}
            await n1.store.own.set(n1.store.key("active", bekey), encode(record))
        await n1.mirror_again(None)
        replicas = [await n2.store.own.get(n2.store.key("replica", bekey)) for bekey in (gone, kept)]
        return replicas, json.loads(await n1.store.own.get(n1.store.key("active", gone)))

    (replica_gone, replica_kept), record = with_nodes(tmp_path, 2, scenario)
    assert replica_gone is not None and json.loads(replica_gone)["p"] == "node2" and record["p"] == "node2"
    assert replica_kept is None


def test_a_cluster_toml_that_does_not_parse_is_named(tmp_path):
    (tmp_path / "cluster.toml").write_text("[cluster\nsecret = 1\n")
    with pytest.raises(ClusterError, match="cluster.toml: "):
        Cluster(str(tmp_path)).write_config()


def test_a_node_reloaded_with_a_new_list_mirrors_to_it_and_refuses_to_drop_itself(tmp_path):
    """SIGHUP on a node (Node.reload): the Redis of a node gone is no
    longer asked, a new node's is; what was mirrored to the node gone is
    mirrored again at once, to a node of the new list. A list without
    this node, or with its own entry changed, is refused and the running
    one kept."""
    bekey = "00000000000000cc"

    async def scenario(nodes, sent):
        n1, n2, n3 = nodes
        first = dataclasses.replace(n1.cfg, nodes=n1.cfg.nodes[:2])     # node1 and node2
        n1.cfg, n1.node_ids = first, ["node1", "node2"]
        await n1.store.set_urls({n.id: n.redis for n in first.nodes})
        assert set(n1.store.clients) == {"node1", "node2"}
        record = {"k": "call", "st": "confirmed", "a": {"cid": f"{bekey}@x"}, "o": "node1", "p": "node2", "v": 3}
        await n1.store.own.set(n1.store.key("active", bekey), encode(record))
        swapped = dataclasses.replace(first, nodes=[first.nodes[0], n3.cfg.nodes[2]])    # node2 out, node3 in
        await n1.reload(swapped)
        refused = []
        for bad in (dataclasses.replace(first, nodes=[n3.cfg.nodes[2]]),
                    dataclasses.replace(first, nodes=[dataclasses.replace(first.nodes[0], port=7999),
                                                      n3.cfg.nodes[2]])):
            with pytest.raises(ConfigError) as exc:
                await n1.reload(bad)
            refused.append(str(exc.value))
        for _ in range(50):                       # the mirroring sweep runs in the background
            replica = await n3.store.own.get(n3.store.key("replica", bekey))
            if replica is not None:
                break
            await asyncio.sleep(0.02)
        return replica, n1, refused

    replica, n1, refused = with_nodes(tmp_path, 3, scenario)
    assert replica is not None and json.loads(replica)["p"] == "node3"
    assert n1.node_ids == ["node1", "node3"] and set(n1.store.clients) == {"node1", "node3"}
    assert set(n1.peer_addrs) == {"node3"}
    assert "node1 is not in the new list" in refused[0] and "entry of node1 itself changed" in refused[1]


def test_a_node_added_keeps_what_was_edited_in_cluster_toml(tmp_path):
    """`sipha add-node` writes cluster.toml again: what an operator changed
    or added in it by hand (and applied with `sipha reload`) stays, and the
    reload that follows does not take it back; the addresses the cluster
    wires are written anew."""
    c = Cluster(str(tmp_path))
    c.state = {"proxy": {"port": 5060, "admin": 6060}, "trunk": {"port": 5099},
               "nodes": {"node1": {"sip": 7001, "redis": 6391, "admin": 8001}}}
    c.write_config(fresh=True, ramp=5.0)
    toml = tmp_path / "cluster.toml"
    edited = (toml.read_text().replace("interval = 0.3", "interval = 0.25")
              .replace('[log]\nlevel = "info"', '[log]\nlevel = "debug"\nformat = "json"')
              + '[hep]\nserver = "127.0.0.1:9060"\npassword = "a \\"quoted\\" one"\n')
    toml.write_text(edited)
    c.state["nodes"]["node2"] = {"sip": 7002, "redis": 6392, "admin": 8002}
    c.state["proxy"]["port"] = 5070
    c.write_config()
    cfg = load_config(str(toml))
    assert (cfg["health.interval"], cfg["log.level"], cfg["log.format"]) == (0.25, "debug", "json")
    assert (cfg["hep.server"], cfg["hep.password"]) == ("127.0.0.1:9060", 'a "quoted" one')
    assert cfg["cluster.secret"] == tomllib.loads(edited)["cluster"]["secret"] and cfg["ramp.duration"] == 5.0
    assert [n.id for n in cfg.nodes] == ["node1", "node2"] and cfg["proxy.listen"] == "127.0.0.1:5070"
    assert cfg["node.upstream"] == "sip:127.0.0.1:5099"
