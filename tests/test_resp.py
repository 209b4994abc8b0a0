"""node.resp, the store's pipelined Redis client, against a real
redis-server: replies matched to their commands under concurrency and
cancellation, error replies, a Redis that stops answering, goes away or
comes back, and URLs it cannot use."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from node.resp import Redis, RedisConnectionError, RedisError, RedisTimeout, parse_url
from procs import start_redis
from sipha.sipp import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(tmp_path):
    port = free_port()
    procs = [start_redis(port, tmp_path)]
    yield port, procs
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
            p.wait()


def test_concurrent_commands_each_get_their_own_reply(server):
    port, _ = server

    async def go():
        r = Redis(f"redis://127.0.0.1:{port}/0")
        await asyncio.gather(*(r.set(f"k{i}", f"v{i}", ex=60) for i in range(2000)))
        got = await asyncio.gather(*(r.get(f"k{i}") for i in range(2000)))
        many = await r.mget([f"k{i}" for i in range(5)] + ["nope"])
        scanned = {k async for k in r.scan_iter(match="k1*", count=100)}
        await r.aclose()
        return got, many, scanned
    got, many, scanned = asyncio.run(go())
    assert got == [f"v{i}".encode() for i in range(2000)]
    assert many == [b"v0", b"v1", b"v2", b"v3", b"v4", None]
    assert scanned == {f"k{i}".encode() for i in range(2000) if str(i).startswith("1")}


def test_set_nx_getdel_renamenx_and_an_error_reply_keep_the_connection_usable(server):
    port, _ = server

    async def go():
        r = Redis(f"redis://127.0.0.1:{port}/3")
        first = await r.set("once", b"1", ex=60, nx=True)
        again = await r.set("once", b"1", ex=60, nx=True)
        with pytest.raises(RedisError, match="no such key"):
            await r.renamenx("missing", "other")
        await r.set("a", b"x")
        moved = await r.renamenx("a", "b")
        taken = await r.getdel("b")
        gone = await r.get("b")
        deleted = await r.delete("once")
        await r.aclose()
        return first, again, moved, taken, gone, deleted
    assert asyncio.run(go()) == (b"OK", None, 1, b"x", None, 1)


def test_a_cancelled_caller_does_not_shift_the_replies_of_the_others(server):
    port, _ = server

    async def go():
        r = Redis(f"redis://127.0.0.1:{port}/0")
        await r.set("x", b"X")
        await r.set("y", b"Y")
        doomed = asyncio.ensure_future(r.get("x"))
        await asyncio.sleep(0)            # written, not answered yet
        doomed.cancel()
        after = await r.get("y")
        await r.aclose()
        return after
    assert asyncio.run(go()) == b"Y"


def test_commands_past_the_pending_limit_fail_at_once_and_the_rest_are_answered(server):
    """A connected client hands back each reply's future; past max_pending
    waiting commands the future carries the error instead of queueing."""
    port, _ = server

    async def go():
        r = Redis(f"redis://127.0.0.1:{port}/0", max_pending=3)
        await r.set("k", b"v")
        first = [r.get("k") for _ in range(5)]     # none answered yet: all sent this tick
        results = await asyncio.gather(*first, return_exceptions=True)
        after = await r.get("k")
        await r.aclose()
        return results, after
    results, after = asyncio.run(go())
    assert results[:3] == [b"v"] * 3 and after == b"v"
    assert all(isinstance(e, RedisConnectionError) and "3 commands already waiting" in str(e) for e in results[3:])


def test_a_stalled_redis_times_out_everything_waiting_and_the_next_command_reconnects(server):
    port, procs = server

    async def go():
        r = Redis(f"redis://127.0.0.1:{port}/0", timeout=0.3)
        await r.ping()
        os.kill(procs[0].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        results = await asyncio.gather(*(r.get(f"k{i}") for i in range(50)), return_exceptions=True)
        waited = time.monotonic() - t0
        os.kill(procs[0].pid, signal.SIGCONT)
        back = await r.ping()
        await r.aclose()
        return results, waited, back
    results, waited, back = asyncio.run(go())
    assert all(isinstance(e, RedisTimeout) for e in results), results
    assert "did not answer within 0.3 s" in str(results[0])
    assert 0.25 < waited < 2.0
    assert back == b"PONG"


def test_a_redis_that_dies_fails_fast_and_is_used_again_when_it_returns(server, tmp_path):
    port, procs = server

    async def go():
        r = Redis(f"redis://127.0.0.1:{port}/0")
        await r.set("k", b"v")
        procs[0].kill()
        procs[0].wait()
        with pytest.raises(RedisConnectionError) as lost:
            await r.get("k")
        with pytest.raises(RedisConnectionError) as refused:
            await r.get("k")
        procs.append(start_redis(port, tmp_path))
        back = await r.set("k", b"w")
        await r.aclose()
        return str(lost.value) + " | " + str(refused.value), back
    errors, back = asyncio.run(go())
    assert f"127.0.0.1:{port}" in errors and "cannot connect" in errors
    assert back == b"OK"


def test_a_password_is_sent_and_a_wrong_one_is_named_but_not_shown(server, tmp_path):
    port = free_port()
    proc = start_redis(port, tmp_path, "--requirepass", "s3cret-pw")
    try:
        async def go():
            good = Redis(f"redis://:s3cret-pw@127.0.0.1:{port}/0")
            pong = await good.ping()
            await good.aclose()
            bad = Redis(f"redis://:wrong-pw@127.0.0.1:{port}/0")
            with pytest.raises(RedisConnectionError) as exc:
                await bad.ping()
            none = Redis(f"redis://127.0.0.1:{port}/0")
            with pytest.raises(RedisError, match="NOAUTH"):
                await none.ping()
            await none.aclose()
            return pong, str(exc.value)
        pong, reason = asyncio.run(go())
        assert pong == b"PONG"
        assert "password" in reason and "wrong-pw" not in reason
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("url, says", [
    ("http://127.0.0.1:6379/0", "scheme must be redis, rediss or unix"),
    ("redis://127.0.0.1:99999/0", "bad port"),
    ("redis://127.0.0.1:6379/zero", "database must be a number"),
    ("redis://127.0.0.1:6379/0?sl_ca_certs=x", "unknown option(s) sl_ca_certs"),
    ("redis://127.0.0.1:6379/0?ssl_ca_certs=x", "need a rediss:// URL"),
    ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be"),
    ("rediss://127.0.0.1:6379/0?ssl_ca_certs=/nonexistent/ca.pem", "TLS files"),
    ("redis:///0", "no host"),
    ("unix://", "needs a socket path"),
])
def test_urls_it_cannot_use_are_refused_with_the_reason(url, says):
    with pytest.raises(ValueError) as exc:
        parse_url(url.replace("://", "://user:hunter2@", 1) if "@" not in url and url.startswith("redis") else url)
    assert says in str(exc.value) and "hunter2" not in str(exc.value)


def test_urls_it_can_use():
    ep = parse_url("redis://sipha:p%40ss@redis1:6380/2")
    assert (ep.host, ep.port, ep.db, ep.username, ep.password, ep.tls) == ("redis1", 6380, 2, "sipha", "p@ss", None)
    assert parse_url("redis://localhost").port == 6379
    assert parse_url("unix:///run/redis.sock?db=4").path == "/run/redis.sock"
    assert parse_url("rediss://h:1/0?ssl_cert_reqs=none").tls is not None
