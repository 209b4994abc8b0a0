"""How the long-running processes (the proxy and its workers, the nodes)
set Python's cyclic garbage collector once they have started.

By default Python collects its youngest objects every 700 allocations,
and whatever is alive then moves to an older generation, which is
scanned again later, up to a collection of every object. A node handles
each message in a task whose objects (the parsed message, futures, the
call's record) live for a few event-loop turns; with many calls at once
most of them are alive at a collection, move on, and are scanned again.
In `bench/node_loop.py` (2,000 calls x 3, 50 at once) the collector took
670 ms, ~100 us of a call's ~1 ms, 320 ms of it in 16 collections of
everything; with the settings below, 100 ms. Under SIPp (HA, 2 nodes)
its share of a node's CPU was 0.6 % at 400 calls/s and 4.7 % at 600
offered (saturated), 1.3 % there with these settings.

- `gc.freeze()`: what was made while starting (modules, configuration,
  compiled patterns, the loop) is never garbage and is not scanned again.
- the youngest generation is collected every GEN0 (10,000) allocations:
  what one message leaves behind is gone by then.
- the older generations keep Python's 10 and 10 (collections of the
  generation below), and a collection of all objects still waits until
  a quarter of them are new: garbage in a reference cycle waits as long
  as before once it reaches them.

A setting the benchmark chose, not one an operator needs: there is no
option for it; `/status` shows it as "gc".
"""
from __future__ import annotations

import gc

GEN0 = 10_000


def settle() -> None:
    """Collect what starting left, keep the rest out of later
    collections, and collect the youngest generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0, 10, 10)


def view() -> dict:
    """For /status: the first generation's threshold (GEN0 once settled,
    700 before), how many objects were frozen, and the collections of
    each generation so far."""
    return {"gen0": gc.get_threshold()[0], "frozen": gc.get_freeze_count(),
            "collections": [g["collections"] for g in gc.get_stats()]}
