"""A node added to, and one taken out of, a running cluster under load
(`sipha add-node`, `sipha remove-node`): restarts of the proxy and of each
node with the new node list, the cluster's secret kept."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from clusterkit import all_keys, run, uac
from node.store import encode
from nodekit import with_nodes
from sipha.cluster import Cluster, ClusterError

pytestmark = pytest.mark.e2e


def test_a_node_added_and_one_removed_under_load_lose_no_call(make_cluster):
    c = make_cluster(nodes=3)
    secret = next(line for line in (c.dir / "cluster.toml").read_text().splitlines() if line.startswith("secret"))

    async def scenario():
        s = uac(c, "uac", calls=300, rate=15, hold_ms=2000)
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
    proxy_log = (c.dir / "logs" / "proxy.log").read_text()
    assert any("event=proxy_started" in line and 'nodes="node2=' in line and "node4=" in line
               for line in proxy_log.splitlines())
    time.sleep(0.5)                                         # the last ACKs and deletes
    assert all(s == {"active": {}, "replica": {}} for s in all_keys(c).values())


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
