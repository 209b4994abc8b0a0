"""Counters with labels, shared by proxy and node: cheap to bump on the
hot path (one dict update), rendered for /status (JSON) and /metrics
(Prometheus text, through prometheus-client collectors built at scrape
time)."""
from __future__ import annotations

from bisect import bisect_left
from collections import Counter


class Counters:
    """name -> label names; `inc(name, *label_values)`."""

    def __init__(self, schema: dict[str, tuple[str, ...]]):
        self.schema = schema
        self.values: Counter = Counter()

    def inc(self, name: str, *labels: str, n: int = 1) -> None:
        self.values[(name, *labels)] += n

    def get(self, name: str, *labels: str) -> int:
        return self.values.get((name, *labels), 0)

    def total(self, name: str) -> int:
        return sum(v for k, v in self.values.items() if k[0] == name)

    def as_dict(self) -> dict[str, int]:
        out = {}
        for key, v in sorted(self.values.items()):
            name, labels = key[0], key[1:]
            names = self.schema.get(name, ())
            lab = ",".join(f"{n}={val}" for n, val in zip(names, labels))
            out[f"{name}{{{lab}}}" if lab else name] = v
        return out

    def families(self, prefix: str):
        """prometheus-client CounterMetricFamily objects, one per name."""
        from prometheus_client.core import CounterMetricFamily
        fams = {}
        for name, labels in self.schema.items():
            fams[name] = CounterMetricFamily(f"{prefix}_{name}", f"{name.replace('_', ' ')}", labels=list(labels))
        for key, v in self.values.items():
            fam = fams.get(key[0])
            if fam is not None:
                fam.add_metric(list(key[1:]), v)
        return list(fams.values())


class Histogram:
    """A latency histogram for the hot path: observe() is one bisect and
    two additions (prometheus-client's takes a lock and costs several
    microseconds a call, more than routing a message should)."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]):
        self.name = name
        self.doc = doc
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)   # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def collect(self):
        from prometheus_client.core import HistogramMetricFamily
        cumulative, acc = [], 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts):
            acc += n
            cumulative.append((bound, acc))
        yield HistogramMetricFamily(self.name, self.doc, buckets=cumulative, sum_value=self.sum)


class _Registry:
    """What generate_latest() needs: something with collect()."""

    def __init__(self, collect):
        self.collect = collect


def prometheus(collect) -> tuple[str, str]:
    """(content type, exposition text) of the families `collect()` yields."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    return CONTENT_TYPE_LATEST, generate_latest(_Registry(collect)).decode()
