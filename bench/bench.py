"""sipha benchmark: SIPp at stepped call rates over UDP, two paths, and
the registrar.

    floor     SIPp UAC -> bench/null_relay.py (forwards datagrams, no SIP) -> SIPp UAS:
              the cost of Python's datagram I/O alone, under the proxy path
    proxy     SIPp UAC -> proxy -> two SIPp UAS as backends
    ha        SIPp UAC -> proxy -> nodes (B2BUA, Redis mirror) -> proxy -> SIPp UAS trunk,
              with 4 nodes and with 2 (--ha-nodes)
    register  SIPp (register_many.xml: REGISTER, then un-REGISTER, one AOR per
              SIPp call) -> proxy -> nodes (registrar, Redis mirror), on the
              first HA cluster; its rate is in REGISTER pairs per second

With several proxy workers the proxy path runs twice: from one SIPp UAC (one
flow, so one worker takes all its requests) and from --uacs UACs at once
(several flows, which the kernel spreads over the workers, as phones would be).

Per step: offered and achieved rate, calls ok / failed, retransmissions,
response-time percentiles (from SIPp's -trace_rtt), and the CPU of each
part (proxy, nodes, Redis, SIPp) as a share of one core and in ms per
completed call, the figure to size a deployment by. The headline per path
is the highest offered rate with 0 failed calls. Also measured: Redis bytes
per dialog (MEMORY USAGE), node RSS with N concurrent held calls, and
failover detection time (node killed -> out of the ring, and -> first call
routed to its partner), for a crash (SIGKILL: the kernel refuses) and for a
hang (SIGSTOP: nothing answers).

Writes <out>/bench.json and <out>/bench.png and prints a summary.

    .venv/bin/python bench/bench.py                      # full run, several minutes
    .venv/bin/python bench/bench.py --quick              # one low step per path, seconds
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sipcore.bekey import rank  # noqa: E402
from sipcore.logfmt import parse_logfmt  # noqa: E402
from sipha.cluster import Cluster, stop_on_sigterm  # noqa: E402
from sipha.sipp import Sipp, free_port  # noqa: E402

BUFFERS = ["-buff_size", str(4 * 1024 * 1024)]
RAMP_SECONDS = 5.0      # a node back in the ring reaches its full share in this long


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def read_rtt(workdir: str, since: float) -> list[float]:
    out: list[float] = []
    for path in glob.glob(os.path.join(workdir, "*_rtt.csv")):
        if os.path.getmtime(path) < since:
            continue
        with open(path) as fh:
            for line in fh:
                parts = line.strip().split(";")
                if len(parts) >= 2 and parts[1].replace(".", "", 1).isdigit():
                    out.append(float(parts[1]))
        os.unlink(path)
    return out


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def step(target, rate: float, seconds: float, workdir: str, watch: dict[str, list[int]],
               uacs: int = 1, scenario: str = "uac") -> dict:
    """One step of `seconds` at `rate`, offered by `uacs` SIPp UACs (each
    its own socket: one flow apiece) sharing the rate; `watch` names the
    processes whose CPU use is reported (share of one core, averaged over
    the step)."""
    per_uac = max(1, int(rate * seconds / uacs))
    calls = per_uac * uacs
    started = time.time()
    sipps = [Sipp(scenario, target=target, calls=per_uac, rate=rate / uacs, workdir=workdir,
                  extra=BUFFERS + ["-trace_rtt", "-rtt_freq", "1", "-recv_timeout", "10000"])
             for _ in range(uacs)]
    for sipp in sipps:
        await sipp.start()
    before = {name: sum(cpu_seconds(p) or 0 for p in pids) for name, pids in watch.items()}
    t0 = time.monotonic()
    waiting = [asyncio.ensure_future(sipp.wait(seconds + 60)) for sipp in sipps]
    uac_cpu = [0.0] * uacs
    while not all(w.done() for w in waiting):   # the UACs' CPU time, sampled until they exit
        uac_cpu = [cpu_seconds(sipp.proc.pid) or c for sipp, c in zip(sipps, uac_cpu)]
        await asyncio.wait(waiting, timeout=0.5)
    results = [w.result() for w in waiting]
    wall = time.monotonic() - t0
    used = {name: sum(cpu_seconds(p) or 0 for p in pids) - before[name] for name, pids in watch.items()}
    used["sipp_uac"] = sum(uac_cpu)
    cpu = {name: round(100 * seconds_used / wall) for name, seconds_used in used.items()}
    rtt = read_rtt(workdir, started)
    ok = sum(r.ok for r in results)
    failed = sum(r.failed for r in results)
    elapsed = max(r.elapsed for r in results)
    achieved = ok / elapsed if elapsed else 0.0
    return {"offered_cps": rate, "calls": calls, "ok": ok, "failed": failed + max(0, calls - ok - failed),
            "retransmissions": sum(r.retransmissions for r in results), "achieved_cps": round(achieved, 1),
            "success_ratio": round(ok / calls, 4),
            "rt_p50_ms": percentile(rtt, 50), "rt_p99_ms": percentile(rtt, 99),
            "rt_mean_ms": round(statistics.mean(rtt), 2) if rtt else None,
            "cpu_percent": cpu,
            # what sizing needs: CPU each part spends on one completed call
            "cpu_ms_per_call": {name: round(1000 * seconds_used / ok, 2) if ok else None
                                for name, seconds_used in used.items()}}


async def run_steps(name: str, target, rates: list[float], seconds: float, workdir: str,
                    watch: dict[str, list[int]], uacs: int = 1, scenario: str = "uac") -> list[dict]:
    out = []
    failing = 0
    for rate in rates:
        r = await step(target, rate, seconds, workdir, watch, uacs, scenario)
        print(f"  {name:5s} offered {rate:>6g}/s  achieved {r['achieved_cps']:>7.1f}/s  ok {r['ok']:>6}  "
              f"failed {r['failed']:>5}  retrans {r['retransmissions']:>5}  "
              f"p50 {r['rt_p50_ms']} ms  p99 {r['rt_p99_ms']} ms  "
              f"cpu% {' '.join(f'{k}={v}' for k, v in r['cpu_percent'].items())}  "
              f"ms/call {' '.join(f'{k}={v}' for k, v in r['cpu_ms_per_call'].items())}", flush=True)
        out.append(r)
        failing = failing + 1 if r["failed"] else 0
        if r["success_ratio"] < 0.5 or failing >= 2:
            break   # past saturation: further steps only measure collapse
        await asyncio.sleep(2)
    return out


def headline(steps: list[dict]) -> float | None:
    """Highest offered rate with 0 failed calls that was also carried at that
    rate (a step that completes every call only after minutes of
    retransmissions does not count)."""
    ok = [s["offered_cps"] for s in steps
          if s["failed"] == 0 and s["ok"] == s["calls"] and s["achieved_cps"] >= 0.95 * s["offered_cps"]]
    return max(ok) if ok else None


async def proxy_path(rates, seconds, workdir, workers: int = 1, uacs: int = 1,
                     log_level: str = "info") -> list[dict]:
    backends = []
    proc = None
    try:
        ports = [free_port(), free_port()]
        for p in ports:
            b = Sipp("uas", local=("127.0.0.1", p), auto_answer=True, workdir=workdir, extra=BUFFERS)
            await b.start()
            backends.append(b)
        port = free_port()
        log = os.path.join(workdir, "proxy-only.log")
        cmd = [sys.executable, "-m", "sipha.cli", "proxy", "--listen", f"127.0.0.1:{port}", "--log-file", log,
               "--log-level", log_level, "--admin", "off", "--node", f"b1=127.0.0.1:{ports[0]}", "--node", f"b2=127.0.0.1:{ports[1]}",
               "--workers", str(workers)]
        proc = await asyncio.create_subprocess_exec(*cmd, cwd=str(ROOT))
        await asyncio.sleep(1.5)
        watch = {"proxy": [proc.pid, *child_pids(proc.pid)], "sipp_uas": [b.proc.pid for b in backends]}
        return await run_steps("proxy", ("127.0.0.1", port), rates, seconds, workdir, watch, uacs)
    finally:
        if proc and proc.returncode is None:
            proc.terminate()
            await proc.wait()
        for b in backends:
            await b.stop(0.5)


async def floor_path(rates, seconds, workdir) -> list[dict]:
    """SIPp UAC -> bench/null_relay.py (forwards datagrams, no SIP) -> SIPp
    UAS: what Python's datagram I/O costs on this box, under the proxy."""
    uas = Sipp("uas", local=("127.0.0.1", free_port()), auto_answer=True, workdir=workdir, extra=BUFFERS)
    proc = None
    try:
        await uas.start()
        port = free_port()
        proc = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "bench" / "null_relay.py"), str(port),
                                                    str(uas.local[1]))
        await asyncio.sleep(1.0)
        watch = {"relay": [proc.pid], "sipp_uas": [uas.proc.pid]}
        return await run_steps("floor", ("127.0.0.1", port), rates, seconds, workdir, watch)
    finally:
        if proc and proc.returncode is None:
            proc.terminate()
            await proc.wait()
        await uas.stop(0.5)


def child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def redis_bytes_per_dialog(cluster: Cluster) -> dict:
    import redis
    sizes, lengths = [], []
    for n in cluster.state["nodes"].values():
        r = redis.Redis(port=n["redis"])
        for key in r.scan_iter(match="sipha:active:*", count=1000):
            sizes.append(r.memory_usage(key, samples=0) or 0)
            lengths.append(r.strlen(key))
            if len(sizes) >= 500:
                break
    return {"memory_usage_bytes_mean": round(statistics.mean(sizes)) if sizes else None,
            "value_bytes_mean": round(statistics.mean(lengths)) if lengths else None,
            "sampled": len(sizes)}


async def ha_path(rates, seconds, held, workdir, nodes: int = 4, extras: bool = True,
                  reg_rates=(), settle: float = 5.0) -> tuple[list[dict], dict]:
    """The HA path's steps with `nodes` nodes; with `extras`, then the
    registrar's steps (register_many.xml at `reg_rates`: a REGISTER and
    its un-REGISTER per SIPp call, one AOR each), held calls (memory),
    Redis per dialog and failover on the same cluster. The held calls
    are sampled `settle` seconds after the last is placed, and end
    2 x `settle` seconds after the sample."""
    cluster = Cluster(os.path.join(workdir, f"cluster-{nodes}"))
    cluster.up(nodes=nodes, port=free_port(), trunk="sipp", ramp=RAMP_SECONDS, log_level="info")
    extra: dict = {}
    try:
        procs = cluster.procs()
        watch = {"proxy": [procs["proxy"]["pid"]],
                 "nodes": [procs[nid]["pid"] for nid in cluster.state["nodes"]],
                 "redis": [procs[f"redis-{nid}"]["pid"] for nid in cluster.state["nodes"]
                           if f"redis-{nid}" in procs],
                 "sipp_uas": [procs["trunk"]["pid"]] if "trunk" in procs else []}
        steps = await run_steps("ha", cluster.proxy_addr, rates, seconds, workdir, watch)
        if not extras:
            return steps, extra
        if reg_rates:
            await asyncio.sleep(2)
            extra["register_steps"] = await run_steps("reg", cluster.proxy_addr, reg_rates, seconds, workdir,
                                                      {k: v for k, v in watch.items() if k != "sipp_uas"},
                                                      scenario="register_many")
        # memory: N concurrent held calls
        rate = max(50.0, min(400.0, (headline(steps) or 100) * 0.8))
        hold_s = held / rate + 3 * settle
        sipp = Sipp("uac", target=cluster.proxy_addr, calls=held, rate=rate, hold_ms=int(hold_s * 1000),
                    workdir=workdir, extra=BUFFERS)
        await sipp.start()
        rss_before = {nid: rss_kib(cluster.procs()[nid]["pid"]) for nid in cluster.state["nodes"]}  # after the steps
        await asyncio.sleep(held / rate + settle)
        st = sipp.progress()
        rss = {nid: rss_kib(cluster.procs()[nid]["pid"]) for nid in cluster.state["nodes"]}
        extra["held_calls"] = {"target": held, "running_at_sample": int(st.get("CurrentCall", 0) or 0),
                               "node_rss_kib": rss, "node_rss_kib_before_held": rss_before,
                               "proxy_rss_kib": rss_kib(cluster.procs()["proxy"]["pid"])}
        extra["redis_per_dialog"] = redis_bytes_per_dialog(cluster)
        res = await sipp.wait(hold_s + 120)
        extra["held_calls"].update({"ok": res.ok, "failed": res.failed})
        extra["failover"] = await failover_times(cluster, workdir)
    finally:
        cluster.down()
    return steps, extra


async def failover_times(cluster: Cluster, workdir: str) -> dict:
    """Kill (SIGKILL) then hang (SIGSTOP) a node under a light call load;
    time until the proxy marks it down and until the first call of one of
    its keys is routed to a partner."""
    out = {}
    log = Path(cluster.procs()["proxy"]["log"])
    for how, sig in (("crash_sigkill", signal.SIGKILL), ("hang_sigstop", signal.SIGSTOP)):
        nid = "node1" if how == "crash_sigkill" else "node2"
        sipp = Sipp("uac", target=cluster.proxy_addr, calls=400, rate=100, workdir=workdir, extra=BUFFERS)
        await sipp.start()
        await asyncio.sleep(1.0)
        t_kill = time.time()
        if sig == signal.SIGSTOP:
            cluster.pause(nid)
        else:
            cluster.kill(nid, process_only=True)
        res = await sipp.wait(90)
        down = first = None
        for line in log.read_text(errors="replace").splitlines():
            f = parse_logfmt(line)
            ts = f.get("ts")
            if not ts:
                continue
            t = time.mktime(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone + float("0." + ts[20:23])
            if t < t_kill:
                continue
            if down is None and f.get("event") == "node_down" and f.get("node") == nid:
                down = t - t_kill
            if (first is None and f.get("event") == "route" and f.get("reason") == "failover"
                    and f.get("bekey") and rank(f["bekey"], list(cluster.state["nodes"]))[0] == nid):
                first = t - t_kill
        out[how] = {"node": nid, "down_after_s": round(down, 3) if down is not None else None,
                    "first_failover_route_s": round(first, 3) if first is not None else None,
                    "calls_ok": res.ok, "calls_failed": res.failed}
        if sig == signal.SIGSTOP:
            cluster.resume(nid)
        else:
            # back before the next node is hung: on a 2-node cluster the
            # hang would otherwise leave no node at all
            await asyncio.to_thread(cluster.start_node, nid)
            await asyncio.sleep(RAMP_SECONDS + 1.5)
    return out


def plot(results: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return False
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for i, (name, steps) in enumerate(results["paths"].items()):
        x = [s["offered_cps"] for s in steps]
        color = f"C{i}"                 # one colour per path in both panels
        ax1.plot(x, [s["success_ratio"] * 100 for s in steps], marker="o", color=color, label=name)
        ax2.plot(x, [s["rt_p50_ms"] or 0 for s in steps], marker="o", color=color, label=f"{name} p50")
        ax2.plot(x, [s["rt_p99_ms"] or 0 for s in steps], marker="x", linestyle="--", color=color,
                 label=f"{name} p99")
    ax1.set_ylabel("successful calls (%)")
    ax1.set_title("sipha: SIPp over UDP, stepped rates (register: REGISTER pairs)")
    ax1.legend()
    ax1.grid(True, alpha=0.3)
    ax2.set_xlabel("offered rate (calls/s; register: REGISTER pairs/s)")
    ax2.set_ylabel("INVITE (REGISTER) -> 200 response time (ms)")
    ax2.set_yscale("symlog")
    ax2.legend()
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


async def main_async(args) -> dict:
    os.makedirs(args.out, exist_ok=True)
    workdir = args.workdir
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                     "step_seconds": args.seconds, "proxy_path_log_level": args.proxy_log_level, "paths": {}}
    if args.only in (None, "proxy"):
        print(f"floor (1 SIPp UAC -> a relay that only forwards datagrams -> 1 SIPp UAS), {args.seconds:g} s per step")
        results["paths"]["floor"] = await floor_path(args.proxy_rates, args.seconds, workdir)
        for n in args.workers:
            for uacs in sorted({1, args.uacs if n > 1 else 1}):
                name = ("proxy" if n == 1 else f"proxy_{n}_workers") + (f"_{uacs}_uacs" if uacs > 1 else "")
                print(f"proxy path ({uacs} SIPp UAC{'s' if uacs > 1 else ''} -> proxy ({n} worker"
                      f"{'s' if n > 1 else ''}) -> 2 SIPp UAS), {args.seconds:g} s per step")
                results["paths"][name] = await proxy_path(args.proxy_rates, args.seconds, workdir, n, uacs,
                                                          args.proxy_log_level)
    if args.only in (None, "ha"):
        for i, nodes in enumerate(args.ha_nodes):
            print(f"full HA path (SIPp -> proxy -> {nodes} nodes + Redis -> proxy -> SIPp UAS), "
                  f"{args.seconds:g} s per step")
            ha_steps, extra = await ha_path(args.ha_rates, args.seconds, args.held, workdir, nodes, extras=i == 0,
                                            reg_rates=args.register_rates, settle=2.0 if args.quick else 5.0)
            results["paths"]["ha" if i == 0 else f"ha_{nodes}_nodes"] = ha_steps
            if "register_steps" in extra:
                results["paths"]["register"] = extra.pop("register_steps")
            results.update(extra)
    results["headline_cps_zero_failed"] = {k: headline(v) for k, v in results["paths"].items()}
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds of calls per step")
    ap.add_argument("--proxy-rates", type=lambda s: [float(x) for x in s.split(",")],
                    default=[500, 1000, 1250, 1500, 2000, 2500, 3000, 4000])
    ap.add_argument("--ha-rates", type=lambda s: [float(x) for x in s.split(",")],
                    default=[100, 200, 250, 300, 400, 500, 700, 1000])
    ap.add_argument("--register-rates", type=lambda s: [float(x) for x in s.split(",")],
                    default=[250, 500, 750, 1000, 1500],
                    help="registrar path (on the first HA cluster): REGISTER + un-REGISTER pairs per second")
    ap.add_argument("--held", type=int, default=10000, help="concurrent held calls for the memory figure")
    ap.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                    help="proxy worker counts to run the proxy path with (default 1,2)")
    ap.add_argument("--uacs", type=int, default=4,
                    help="with several workers, also offer the calls from this many SIPp UACs (flows) at once")
    ap.add_argument("--ha-nodes", type=lambda s: [int(x) for x in s.split(",")], default=[4, 2],
                    help="node counts to run the HA path with (default 4,2; held calls and failover "
                         "are measured with the first)")
    ap.add_argument("--quick", action="store_true", help="one low step per path, 200 held calls")
    ap.add_argument("--only", choices=["proxy", "ha"], help="run one path only (ha includes register)")
    ap.add_argument("--proxy-log-level", default="info", choices=["debug", "info", "warning", "error"],
                    help="the proxy's log level on the proxy path (default info, as deployed: a line per "
                         "routed request; warning writes none of them)")
    ap.add_argument("--keep-workdir", action="store_true",
                    help="keep the SIPp and cluster logs of the run (removed at the end otherwise)")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.proxy_rates, args.ha_rates, args.held = 3.0, [50.0], [20.0], 200
        args.register_rates = [20.0]
        args.workers, args.ha_nodes = [1], [4]
    # SIPp's statistics and logs, the clusters' logs: tens of MB a run
    args.workdir = tempfile.mkdtemp(prefix="sipha-bench-")
    stop_on_sigterm()
    try:
        results = asyncio.run(main_async(args))
    finally:
        if args.keep_workdir:
            print(f"working files kept in {args.workdir}")
        else:
            shutil.rmtree(args.workdir, ignore_errors=True)
    jpath = os.path.join(args.out, "bench.json")
    with open(jpath, "w") as fh:
        json.dump(results, fh, indent=1)
    ppath = os.path.join(args.out, "bench.png")
    plotted = plot(results, ppath)
    print(json.dumps({k: results.get(k) for k in ("headline_cps_zero_failed", "redis_per_dialog", "failover")},
                     indent=1))
    held = results.get("held_calls", {})
    print(f"node RSS with {held.get('running_at_sample')} held calls (KiB): {held.get('node_rss_kib')}")
    print(f"results: {jpath}" + (f", plot: {ppath}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
