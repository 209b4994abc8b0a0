"""`sipha` command line: proxy, node, and the local-cluster tools."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from typing import Callable

from sipcore import heap
from sipcore.config import Config, ConfigError, load_config
from sipcore.logfmt import event, setup_logging

from .cluster import ClusterError
from .sipp import SippError


log = logging.getLogger("sipha")
KEPT = "kept the running configuration"


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="cluster.toml (every key also from SIPHA_* environment variables)")
    p.add_argument("--node", action="append", metavar="ID=HOST:PORT[,REDIS_URL]",
                   help="a cluster node (repeat); replaces the file's node list")
    p.add_argument("--secret", help="cluster secret for BEKey stamps (cluster.secret)")
    p.add_argument("--log-level", help="debug, info, warning, error (log.level)")
    p.add_argument("--log-format", help="logfmt or json (log.format)")
    p.add_argument("--log-file", metavar="PATH", help="log to this file, reopened when rotated (log.file)")


def _overrides(args: argparse.Namespace) -> dict:
    o = {
        "cluster.secret": args.secret,
        "log.level": args.log_level,
        "log.format": args.log_format,
        "log.file": args.log_file,
    }
    if getattr(args, "workers", None) is not None:
        o["proxy.workers"] = args.workers
    if getattr(args, "listen", None):
        o["proxy.listen"] = ",".join(args.listen)
    if getattr(args, "no_probe", False):
        o["health.probe"] = False
    if getattr(args, "admin", None) is not None:
        o["node.admin" if args.command == "node" else "proxy.admin"] = args.admin
    if getattr(args, "upstream", None) is not None:
        o["node.upstream"] = args.upstream
    if getattr(args, "proxy", None) is not None:
        o["proxy.internal"] = args.proxy
    return o


async def _serve(app, load: Callable[[], Config] | None = None, missed: Callable[[], bool] | None = None) -> None:
    """Run `app` until SIGINT / SIGTERM. SIGHUP: `load()` the configuration
    again and hand it to app.reload; one that does not load, or that the
    app refuses, is logged (reload_failed) and the running one kept.
    `missed()`: whether a SIGHUP came before this loop handled them."""
    stop = asyncio.Event()
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if load is not None:
        lock = asyncio.Lock()

        async def reload() -> None:
            await started.wait()   # one that comes while starting: once started
            async with lock:       # one after the other, as the signals came
                try:
                    cfg = load()
                    await app.reload(cfg)
                except Exception as exc:   # noqa: BLE001 - a reload never ends the process
                    app.stats.inc("reloads", "failed")
                    event(log, "reload_failed", logging.ERROR,
                          error=str(exc) if isinstance(exc, ConfigError) else repr(exc), action=KEPT)
                    return
                app.stats.inc("reloads", "ok")
                _set_log_level(cfg)

        pending: set[asyncio.Task] = set()      # held: the loop keeps only weak references

        def hangup() -> None:
            task = loop.create_task(reload())
            pending.add(task)
            task.add_done_callback(pending.discard)

        loop.add_signal_handler(signal.SIGHUP, hangup)
        if missed is not None and missed():
            hangup()
    await app.start()
    heap.settle()       # after start: what it made is not scanned again (sipcore/heap.py)
    started.set()
    try:
        await stop.wait()
        if hasattr(app, "drain"):
            await app.drain()        # a node hands its calls over before it goes
    finally:
        await app.close()


def _set_log_level(cfg: Config) -> None:
    """log.level of a reload (SIGHUP), as kamcmd's debug level: in place."""
    level = cfg["log.level"].upper()
    root = logging.getLogger()
    if logging.getLevelName(root.level) != level:
        event(log, "log_level", logging.WARNING, was=logging.getLevelName(root.level).lower(), now=level.lower())
        root.setLevel(level)


def _loader(args) -> Callable[[], Config]:
    """The configuration as the command line gave it, read again."""
    def load() -> Config:
        cfg = load_config(args.config, overrides=_overrides(args), nodes=args.node)
        if not cfg.nodes:
            raise ConfigError("nodes: the node list is empty (give --node ID=HOST:PORT or [[nodes]] in --config)")
        return cfg
    return load


def cmd_proxy(args) -> int:
    load = _loader(args)
    cfg = load()
    # files that do not load: an error now, naming the key
    cfg.tls_server_context(verify_clients=cfg["proxy.tls_verify_client"]), cfg.tls_client_context()
    setup_logging("proxy", level=cfg["log.level"], fmt=cfg["log.format"], path=cfg["log.file"])
    from proxy.server import Proxy
    workers = cfg["proxy.workers"]
    if workers == 1:
        _install_uvloop()
        asyncio.run(_serve(Proxy(cfg), load))
        return 0
    from proxy.workers import supervise

    for host, port in cfg.listen:   # a clear error now rather than N failing workers
        _check_bindable(host, port)

    latest = [cfg]      # what a worker (re)started now runs with

    def run_worker(role) -> int:
        setup_logging("proxy", level=cfg["log.level"], fmt=cfg["log.format"], path=cfg["log.file"],
                      worker=role.index)
        _install_uvloop()
        asyncio.run(_serve(Proxy(latest[0], role), load, lambda: role.hangup_missed))
        return 0

    def reload() -> None:
        """The supervisor's part: the configuration a worker restarted from
        now on runs with. Each worker reads the file itself, and says
        (and counts) whether it took it."""
        try:
            latest[0] = load()
        except ConfigError:
            return
        _set_log_level(latest[0])

    return supervise(workers, run_worker, reload)


def _check_bindable(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(family, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if kind == socket.SOCK_DGRAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise OSError(f"proxy.listen: cannot bind {host}:{port}: {exc.strerror}") from None


def cmd_node(args) -> int:
    load = _loader(args)
    cfg = load()
    node_cfg = cfg.node(args.id)
    setup_logging(args.id, level=cfg["log.level"], fmt=cfg["log.format"], path=cfg["log.file"])
    from node.app import Node
    _install_uvloop()
    asyncio.run(_serve(Node(cfg, node_cfg.id), load))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sipha", description="A highly available SIP cluster.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("proxy", help="run the front proxy (converged load balancer)")
    _common(p)
    p.add_argument("--listen", action="append", metavar="HOST:PORT", help="SIP address, UDP and TCP (repeat; proxy.listen)")
    p.add_argument("--no-probe", action="store_true", help="do not OPTIONS-probe the nodes; treat them all as up")
    p.add_argument("--admin", metavar="HOST:PORT", help="admin HTTP address (proxy.admin)")
    p.add_argument("--workers", type=int, metavar="N", help="processes sharing the UDP port (proxy.workers)")
    p.set_defaults(func=cmd_proxy)

    p = sub.add_parser("node", help="run a backend node (registrar + B2BUA)")
    _common(p)
    p.add_argument("--id", required=True, help="this node's id in the node list")
    p.add_argument("--upstream", metavar="URI", help="trunk for unregistered callees (node.upstream)")
    p.add_argument("--proxy", metavar="HOST:PORT", help="the proxy address nodes send to (proxy.internal)")
    p.add_argument("--admin", metavar="HOST:PORT", help="admin HTTP address (node.admin)")
    p.set_defaults(func=cmd_node)

    from . import cluster, compiler, demo, logs
    cluster.add_commands(sub)
    compiler.add_commands(sub)
    logs.add_commands(sub)
    demo.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, ClusterError, SippError, FileNotFoundError) as exc:
        print(f"sipha {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"sipha {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
