"""The proxy workers' shared health page (proxy/workers.py)."""
from __future__ import annotations

import os
import struct

from proxy.health import NodeHealth
from proxy.workers import SharedHealth
from sipcore.config import NodeConfig


def nodes(*ids):
    return {n: NodeHealth(NodeConfig(n, "127.0.0.1", 5070)) for n in ids}


def test_followers_see_what_worker_0_published_across_fork():
    shared = SharedHealth()
    # before the first publish there is nothing to copy: a follower keeps
    # every node up at full load factor, as a freshly started proxy sees them
    assert shared.read() == {}
    pid = os.fork()
    if pid == 0:   # worker 0 in a child process
        view = nodes("a", "b")
        view["a"].up, view["a"].last_status = False, 503
        view["b"].load_factor, view["b"].warm = 0.25, True
        shared.publish(view)
        os._exit(0)
    os.waitpid(pid, 0)
    follower = nodes("a", "b")
    shared.copy_into(follower)
    assert (follower["a"].up, follower["a"].last_status) == (False, 503)
    assert (follower["b"].up, follower["b"].load_factor, follower["b"].warm) == (True, 0.25, True)


def test_a_writer_that_died_mid_write_neither_hangs_readers_nor_the_next_writer():
    shared = SharedHealth()
    view = nodes("a")
    view["a"].load_factor = 0.5
    shared.publish(view)
    struct.pack_into("<Q", shared.mem, 0, 5)     # sequence left odd: a write under way, forever
    assert shared.read() == {"a": (True, False, 0.5, None)}   # returns, does not spin
    view["a"].up = False
    shared.publish(view)                          # the restarted worker 0 writes again
    assert struct.unpack_from("<Q", shared.mem, 0)[0] % 2 == 0
    assert shared.read() == {"a": (False, False, 0.5, None)}


def test_workers_that_reloaded_at_different_moments_copy_the_nodes_they_both_know():
    """After a SIGHUP each worker reads the node list itself: worker 0 may
    publish a node a follower does not know yet, and a follower may list
    one worker 0 has dropped. Each copies the nodes it knows, by id."""
    shared = SharedHealth()
    primary = nodes("a", "longer-node-id-of-32-characters")
    primary["longer-node-id-of-32-characters"].up = False
    primary["a"].load_factor = 0.5
    shared.publish(primary)
    follower = nodes("a", "gone")
    follower["gone"].up = False
    shared.copy_into(follower)
    assert follower["a"].load_factor == 0.5 and follower["gone"].up is False
    later = nodes("a", "longer-node-id-of-32-characters")
    shared.copy_into(later)
    assert later["longer-node-id-of-32-characters"].up is False
    del primary["a"]
    shared.publish(primary)                      # a shorter list: the old slot is not read
    assert list(shared.read()) == ["longer-node-id-of-32-characters"]
