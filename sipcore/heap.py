"""How the long-running processes (the proxy and its workers, the nodes)
set Python's cyclic garbage collector once they have started.

Python collects its youngest objects every 700 allocations by default,
and every object that is still alive then is scanned again in the older
generations, up to all of them. A node handles each message in a task
whose objects (the parsed message, futures, the call's record) live for a
few event-loop turns: under load they are alive at most collections and
move on to be scanned again. In `bench/node_loop.py` (2,000 calls, 3
runs) the collector took 670 ms, about 100 us of each call's ~1 ms, of
which 320 ms in 16 collections of everything; with the settings below it
took 100 ms.

- `gc.freeze()`: what was made while starting (modules, configuration,
  compiled patterns, the loop) is never garbage and is not scanned again.
- the first generation is collected every GEN0 allocations (10,000):
  what a message leaves behind is gone by then, and cyclic garbage stays
  in memory for at most that many allocations (a few hundred KiB).
- the older generations keep Python's 10 and 10, and a collection of all
  objects still waits until a quarter of them are new.

A figure the benchmark gives, not a setting an operator needs: there is
no option for it.
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
