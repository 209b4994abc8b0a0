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
    shared = SharedHealth(["a", "b"])
    # before the first publish every node reads up at full load factor,
    # as a freshly started proxy sees them
    assert shared.read() == [(True, False, 1.0, None), (True, False, 1.0, None)]
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
    shared = SharedHealth(["a"])
    view = nodes("a")
    view["a"].load_factor = 0.5
    shared.publish(view)
    struct.pack_into("<Q", shared.mem, 0, 5)     # sequence left odd: a write under way, forever
    assert shared.read() == [(True, False, 0.5, None)]   # returns, does not spin
    view["a"].up = False
    shared.publish(view)                          # the restarted worker 0 writes again
    assert struct.unpack_from("<Q", shared.mem, 0)[0] % 2 == 0
    assert shared.read() == [(False, False, 0.5, None)]
