"""A local cluster on loopback: `sipha up / status / kill / start / down / load`.

`up` starts one redis-server per node, the nodes, the proxy and optionally
a SIPp UAS as the upstream trunk, each in its own session so they outlive
the command; writes `cluster.toml` and `cluster.json` (what runs where, by
PID) under --dir. `down` and `kill` act only on the PIDs recorded there,
and only while each PID still runs the command line recorded for it.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import urllib.error
import urllib.parse
import urllib.request

from sipcore.errors import SipParseError
from sipcore.headers import hostport, parse_uri
from sipcore.logfmt import parse_logfmt

from .sipp import Sipp, claim_port, free_port


class ClusterError(Exception):
    pass


def redis_command(port: int, datadir) -> list[str]:
    """A redis-server on loopback `port` that keeps nothing on disk (the
    cluster's, the tests' and the benchmarks')."""
    return [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(datadir), "--protected-mode", "yes"]


def wait_redis(port: int, timeout: float = 10.0) -> None:
    """Until the redis-server on loopback `port` answers PING (or says
    it wants a password first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                    return
        except OSError:
            pass
        time.sleep(0.05)        # refused, or not ready yet (-LOADING): not at once again
    raise ClusterError(f"redis on port {port} did not answer PING")


def spawn_redis(port: int, datadir, *extra: str) -> subprocess.Popen:
    """A throwaway redis-server (redis_command, and `extra` options) once
    it answers; stopped again if it does not (ClusterError)."""
    proc = subprocess.Popen(redis_command(port, datadir) + list(extra), stdout=subprocess.DEVNULL)
    try:
        wait_redis(port)
    except ClusterError:
        proc.kill()
        proc.wait()
        raise
    return proc


def admin_get(port: int, path: str = "/status", timeout: float = 2.0, post: bool = False) -> dict:
    """GET (or POST, an action) an admin endpoint on loopback (blocking:
    the cluster commands are plain scripts, and callers inside an event
    loop use a thread)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"" if post else None,
                                 method="POST" if post else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def stop_on_sigterm() -> None:
    """A foreground run (the demo, the benchmark) ended by SIGTERM (`timeout`,
    `kill`, a cancelled CI job) ends as Ctrl-C does: its `finally` blocks
    stop the cluster and the SIPp processes it started, instead of the
    default exit that leaves them running."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _toml(value) -> str:
    """A value of cluster.toml as TOML writes it (a JSON string is a TOML basic string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value) if isinstance(value, str) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    raise ClusterError(f"cluster.toml: cannot keep a value of type {type(value).__name__}: {value!r}")


def port_in_use(host: str, port: int) -> str | None:
    for kind, name in ((socket.SOCK_DGRAM, "udp"), (socket.SOCK_STREAM, "tcp")):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return name
    return None


def _alive(pid: int, cmd0: str) -> bool:
    """Whether `pid` still runs the program started as `cmd0` (not a pid
    the kernel has given to something else since)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    if argv == [b""]:
        # No arguments. Popen returns once exec has closed the close-on-exec
        # pipe, which is before the new program's arguments are laid out, so
        # our own child checked right after its start reads empty for a
        # moment: that one is alive. Anything else without arguments is not
        # ours: a zombie, or a kernel thread that was given the pid since.
        state, ppid = _stat(pid)
        return ppid == os.getpid() and state not in ("Z", "X")
    return os.path.basename(cmd0).encode() in b" ".join(argv[:3])


def _stat(pid: int) -> tuple[str | None, int | None]:
    """(state letter, parent pid) from /proc/<pid>/stat; (None, None) if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rpartition(b")")[2].split()
        return fields[0].decode(), int(fields[1])
    except (OSError, IndexError, ValueError):
        return None, None


class Cluster:
    def __init__(self, directory: str = ".sipha"):
        self.dir = Path(directory).resolve()
        self.state_path = self.dir / "cluster.json"
        self.state: dict = {}
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())

    # ---- state -----------------------------------------------------------
    def save(self) -> None:
        self.state_path.write_text(json.dumps(self.state, indent=1))

    def procs(self) -> dict:
        return self.state.get("procs", {})

    def running(self, name: str) -> bool:
        p = self.procs().get(name)
        return bool(p) and _alive(p["pid"], p["cmd"][0])

    @property
    def proxy_addr(self) -> tuple[str, int]:
        """Where a caller reaches the proxy: on 127.0.0.1, or [::1] with `up --ipv6-only`."""
        return (self.proxy_host, self.state["proxy"]["port"])

    @property
    def proxy_host(self) -> str:
        return "::1" if self.state["proxy"].get("ipv6_only") else "127.0.0.1"

    @property
    def proxy_addr6(self) -> tuple[str, int] | None:
        """The proxy's IPv6 address (`up --ipv6`), else None."""
        return ("::1", self.state["proxy"]["port"]) if self.state["proxy"].get("ipv6") else None

    @property
    def proxy_tls_addr(self) -> tuple[str, int] | None:
        """The proxy's TLS address (`up --tls`), else None."""
        port = self.state["proxy"].get("tls")
        return (self.proxy_host, port) if port else None

    @property
    def trunk_host(self) -> str:
        return "::1" if self.state["proxy"].get("ipv6") else "127.0.0.1"

    @property
    def node_host(self) -> str:
        """Where the nodes take SIP: [::1] with `up --ipv6-nodes`."""
        return "::1" if self.state["proxy"].get("ipv6_nodes") else "127.0.0.1"

    # ---- starting ----------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], log: Path) -> None:
        fh = open(log, "ab")
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                 cwd=self.dir, start_new_session=True)
        fh.close()
        self.state.setdefault("procs", {})[name] = {"pid": popen.pid, "cmd": cmd, "log": str(log)}
        self.save()

    def _wait_admin(self, name: str, port: int, timeout: float = 15.0) -> None:
        """Ready = its admin /status answers (whatever the log level)."""
        p = self.procs()[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                admin_get(port, timeout=1.0)
                return
            except (OSError, ValueError):
                pass
            if not _alive(p["pid"], p["cmd"][0]):
                break
            time.sleep(0.05)
        tail = Path(p["log"]).read_text(errors="replace")[-1500:] if Path(p["log"]).exists() else ""
        raise ClusterError(f"{name} did not start (see {p['log']}):\n{tail}")

    def up(self, *, nodes: int = 4, port: int = 5060, trunk: str | None = None,
           trunk_scenario: str = "uas", ramp: float = 30.0, log_level: str = "info", ipv6: bool = False,
           ipv6_nodes: bool = False, ipv6_only: bool = False, tls: bool = False) -> None:
        """`ipv6`: the proxy listens on [::1] as well (same port) and the
        SIPp trunk on [::1] only; the nodes stay on IPv4, unless
        `ipv6_nodes` (which implies `ipv6`): the nodes take SIP on [::1],
        and the proxy's address for them is [::1] too; `ipv6_only` (which
        implies both): the proxy listens on [::1] only. `tls`: the proxy
        takes SIP over TLS too, on port + 1 where it is free (`tls/cert.pem`,
        made here, is a self-signed certificate for localhost, 127.0.0.1 and ::1)."""
        if any(self.running(n) for n in self.procs()):
            raise ClusterError(f"a cluster already runs from {self.dir} (sipha down --dir {self.dir} first)")
        if nodes < 1 or nodes > 64:
            raise ClusterError(f"--nodes: expected 1..64, got {nodes}")
        ipv6_nodes = ipv6_nodes or ipv6_only
        ipv6 = ipv6 or ipv6_nodes
        if trunk not in (None, "sipp"):
            raise ClusterError(f"--trunk: only 'sipp' is supported, got {trunk!r}")
        for host in ("::1",) if ipv6_only else ("127.0.0.1", "::1") if ipv6 else ("127.0.0.1",):
            try:
                busy = port_in_use(host, port)
            except OSError as exc:      # no IPv6 on this host
                raise ClusterError(f"--ipv6: cannot use {host}: {exc.strerror}") from None
            if busy:
                raise ClusterError(f"--port: {hostport((host, port))}/{busy} is already in use")
        for tool in ["redis-server"] + (["sipp"] if trunk else []) + (["openssl"] if tls else []):
            if shutil.which(tool) is None:
                raise ClusterError(f"{tool} is not installed (run: bash .ci/install)")
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        claim_port(port)        # given, not bound yet: no node's port or admin address may be drawn on it
        self.state = {"procs": {}, "nodes": {}, "proxy": {"port": port, "admin": free_port(), "ipv6": ipv6,
                                                          "ipv6_nodes": ipv6_nodes, "ipv6_only": ipv6_only, "tls": None}}
        if tls:     # SIP's TLS port is the SIP port + 1 (5061), where that is free
            free = port < 65535 and not port_in_use(self.proxy_host, port + 1)
            self.state["proxy"]["tls"] = claim_port(port + 1) if free else free_port()
            self.make_certificate()
        for i in range(1, nodes + 1):
            nid = f"node{i}"
            self.state["nodes"][nid] = {"sip": free_port(self.node_host), "redis": free_port(), "admin": free_port()}
        if trunk:
            self.state["trunk"] = {"port": free_port("::1" if ipv6 else "127.0.0.1"), "scenario": trunk_scenario}
        self.write_config(ramp=ramp, log_level=log_level, fresh=True)
        self.save()
        try:
            for nid in self.state["nodes"]:
                self.start_redis(nid)
            for nid in self.state["nodes"]:
                self.start_node(nid, redis=False)
            self.start_proxy()
            if trunk:
                self.start_trunk()
        except Exception:
            self.down()
            raise

    def write_config(self, *, ramp: float | None = None, log_level: str | None = None, fresh: bool = False) -> None:
        """cluster.toml for the nodes in the state (`fresh`: a new cluster).
        Written again (a node added or removed), it keeps what was edited in
        it by hand (a setting changed or added, a section added: `sipha
        reload` applied them, and a node added must not take them back),
        the secret (a new one would void the stamps of the calls in
        progress) and the ramp and log level it had; only the addresses
        this cluster wires (listen, admin, TLS files, the trunk, the node
        list) are written anew."""
        st = self.state
        path = self.dir / "cluster.toml"
        try:
            was = tomllib.loads(path.read_text()) if path.exists() and not fresh else {}
        except (tomllib.TOMLDecodeError, OSError) as exc:
            raise ClusterError(f"{path}: {exc}") from None
        proxy = {"listen": self._listen(), "admin": f"127.0.0.1:{st['proxy']['admin']}"}
        if st["proxy"].get("ipv6_nodes"):
            proxy["internal"] = hostport((self.node_host, st["proxy"]["port"]))
        if st["proxy"].get("tls"):
            proxy.update(tls_listen=self._listen(st["proxy"]["tls"]), tls_cert=str(self.dir / "tls" / "cert.pem"),
                         tls_key=str(self.dir / "tls" / "key.pem"))
        node = {"upstream": f"sip:{hostport((self.trunk_host, st['trunk']['port']))}"} if "trunk" in st else {}
        wired = {"proxy": proxy, "node": node}
        sections = {"cluster": {"secret": secrets.token_hex(16)}, "proxy": {},
                    "health": {"interval": 0.3, "down_after": 2, "up_after": 2},
                    "ramp": {"start": 0.1, "duration": 30.0, "steps": 10}, "log": {"level": "info"}, "node": {}}
        for name, values in was.items():
            if isinstance(values, dict):
                sections.setdefault(name, {}).update(values)
        for name, values in wired.items():
            sections[name].update(values)
        if ramp is not None:
            sections["ramp"]["duration"] = ramp
        if log_level:
            sections["log"]["level"] = log_level
        lines = ["# written by sipha up; every key can also be set by SIPHA_* variables"]
        for name, values in sections.items():
            lines += [f"[{name}]", *(f"{k} = {_toml(v)}" for k, v in values.items()), ""]
        for nid, n in st["nodes"].items():
            lines += ["[[nodes]]", f'id = "{nid}"', f'sip = "{hostport((self.node_host, n["sip"]))}"',
                      f'redis = "redis://127.0.0.1:{n["redis"]}/0"', f'admin = "127.0.0.1:{n["admin"]}"', ""]
        path.write_text("\n".join(lines))

    def make_certificate(self) -> None:
        """A self-signed certificate for the local proxy's TLS (30 days)."""
        folder = self.dir / "tls"
        folder.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                            "-nodes", "-days", "30", "-subj", "/CN=localhost",
                            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
                            "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise ClusterError(f"--tls: openssl could not make a certificate: {r.stderr.strip()[-300:]}")

    def _listen(self, port: int | None = None) -> str:
        port = port or self.state["proxy"]["port"]
        if self.state["proxy"].get("ipv6_only"):
            return f"[::1]:{port}"
        return f"127.0.0.1:{port},[::1]:{port}" if self.state["proxy"].get("ipv6") else f"127.0.0.1:{port}"

    def start_redis(self, nid: str) -> None:
        port = self.state["nodes"][nid]["redis"]
        data = self.dir / f"redis-{nid}"
        data.mkdir(exist_ok=True)
        self._spawn(f"redis-{nid}", redis_command(port, data), self.dir / "logs" / f"redis-{nid}.log")
        wait_redis(port)

    def sipha_cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "sipha.cli", *args, "--config", str(self.dir / "cluster.toml")]

    def _known(self, nid: str) -> None:
        if nid not in self.state.get("nodes", {}):
            raise ClusterError(f"no node {nid!r} (nodes: {', '.join(self.state.get('nodes', {}))})")

    def start_node(self, nid: str, *, redis: bool = True, wait_proxy: bool = True) -> None:
        self._known(nid)
        if self.running(nid):
            raise ClusterError(f"{nid} is already running")
        if redis and not self.running(f"redis-{nid}"):
            self.start_redis(nid)
        log = self.dir / "logs" / f"{nid}.log"
        self._spawn(nid, self.sipha_cmd("node", "--id", nid, "--log-file", str(log)), log.with_suffix(".out"))
        self.state["procs"][nid]["log"] = str(log)
        self.save()
        self._wait_admin(nid, self.state["nodes"][nid]["admin"])
        if wait_proxy and self.running("proxy"):
            self._wait_proxy_sees(nid)

    def _wait_proxy_sees(self, nid: str, timeout: float = 10.0) -> None:
        """Return once the proxy has the node back in its ring (its probes
        need `health.up_after` answers), so the next call can reach it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                st = admin_get(self.state["proxy"]["admin"])
                if any(n["id"] == nid and n["up"] for n in st["nodes"]):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise ClusterError(f"{nid} runs, but the proxy did not see it up within {timeout:g}s")

    def start_proxy(self) -> None:
        if self.running("proxy"):
            raise ClusterError("the proxy is already running")
        log = self.dir / "logs" / "proxy.log"
        self._spawn("proxy", self.sipha_cmd("proxy", "--log-file", str(log)), log.with_suffix(".out"))
        self.state["procs"]["proxy"]["log"] = str(log)
        self.save()
        self._wait_admin("proxy", self.state["proxy"]["admin"])

    def restart_proxy(self) -> None:
        """Start the proxy again (after `kill proxy`), returning once it
        sees every running node up: it keeps no call state, so the calls
        in progress go on through it."""
        self.start_proxy()
        for nid in self.state["nodes"]:
            if self.running(nid):
                self._wait_proxy_sees(nid)

    def start_trunk(self) -> None:
        t = self.state["trunk"]
        sipp = Sipp(t["scenario"], local=(self.trunk_host, t["port"]), auto_answer=True, workdir=str(self.dir / "logs"))
        self._spawn("trunk", sipp.command(), self.dir / "logs" / "trunk.out")
        time.sleep(0.3)
        if not self.running("trunk"):
            raise ClusterError(f"the SIPp trunk did not start (see {self.dir / 'logs' / 'trunk.out'})")

    # ---- stopping ------------------------------------------------------------
    def _signal(self, name: str, sig: int) -> bool:
        p = self.procs().get(name)
        if not p or not _alive(p["pid"], p["cmd"][0]):
            return False
        try:
            os.kill(p["pid"], sig)
        except ProcessLookupError:
            return False
        return True

    def _wait_gone(self, names: list[str], timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        left = names
        while left and time.monotonic() < deadline:
            for n in left:
                p = self.procs()[n]
                try:
                    os.waitpid(p["pid"], os.WNOHANG)   # reap our own children
                except ChildProcessError:
                    pass
            left = [n for n in left if self.running(n)]
            if left:
                time.sleep(0.05)
        return left

    def kill(self, nid: str, *, process_only: bool = False) -> None:
        """SIGKILL the node and its Redis: a host failure (process_only: the
        node's process alone, a crash that leaves its Redis and data); or
        the proxy (nid "proxy")."""
        if nid == "proxy":
            if not self._signal("proxy", signal.SIGKILL):
                raise ClusterError("the proxy is not running")
            self._wait_gone(["proxy"], 5)
            return
        self._known(nid)
        victims = (nid,) if process_only else (nid, f"redis-{nid}")
        hit = [n for n in victims if self._signal(n, signal.SIGKILL)]
        if not hit:
            raise ClusterError(f"{nid} is not running")
        self._wait_gone(hit, 5)

    def stop(self, nid: str) -> None:
        """SIGTERM the node's process, its Redis staying: a planned stop
        (an upgrade); the node drains (its calls go to their partners)
        before it exits."""
        self._known(nid)
        if not self._terminate(nid, 10):
            raise ClusterError(f"{nid} is not running")

    def _terminate(self, name: str, grace: float) -> bool:
        """SIGTERM a process, SIGKILL it if it is still there `grace` s
        later -> whether it ran."""
        if not self._signal(name, signal.SIGTERM):
            return False
        if self._wait_gone([name], grace):
            self._signal(name, signal.SIGKILL)
            self._wait_gone([name], 2)
        return True

    def pause(self, nid: str) -> None:
        """SIGSTOP the node's process: a hang (a stalled VM, a swap
        storm), which nothing reports; resume() wakes it."""
        self._known(nid)
        if not self._signal(nid, signal.SIGSTOP):
            raise ClusterError(f"{nid} is not running")

    def resume(self, nid: str) -> None:
        self._known(nid)
        if not self._signal(nid, signal.SIGCONT):
            raise ClusterError(f"{nid} is not running")

    def add_node(self) -> str:
        """A node more in the running cluster, as an operator adds one: its
        Redis and process started with the longer node list, then the
        other nodes and the proxy told to read the list again (SIGHUP), in
        place: every call, transaction and phone connection goes on. The
        nodes first, so that each already mirrors to and looks in the new
        one when the proxy brings it into the ring, ramped, with its share
        of new calls; a call in progress whose key it now owns moves there
        at its next request. -> the new node's id."""
        nid = next(f"node{i}" for i in itertools.count(1) if f"node{i}" not in self.state["nodes"])
        others = [n for n in self.state["nodes"] if self.running(n)]
        self.state["nodes"][nid] = {"sip": free_port(self.node_host), "redis": free_port(), "admin": free_port()}
        self.write_config()
        self.save()
        self.start_redis(nid)
        self.start_node(nid, redis=False, wait_proxy=False)    # the proxy does not know it yet
        self.reload([*others, "proxy"])
        if self.running("proxy"):
            self._wait_proxy_sees(nid, 15)
        return nid

    def remove_node(self, nid: str) -> None:
        """A node out of the running cluster: stopped (it drains: its calls
        go on at their partners), the proxy and every other node told to
        read the shorter list again (SIGHUP; each node mirrors what it had
        mirrored there to a node of the list), then its Redis stopped."""
        self._known(nid)
        if len(self.state["nodes"]) == 1:
            raise ClusterError(f"{nid} is the last node")
        if self.running(nid):
            self.stop(nid)
        del self.state["nodes"][nid]
        self.write_config()
        self.save()
        self.reload(["proxy", *(n for n in self.state["nodes"] if self.running(n))])
        self._signal(f"redis-{nid}", signal.SIGTERM)
        self._wait_gone([f"redis-{nid}"], 5)
        for name in (nid, f"redis-{nid}"):
            self.state["procs"].pop(name, None)
        self.save()

    def reload(self, names: list[str] | None = None, timeout: float = 10.0) -> dict[str, dict[str, list[str]]]:
        """SIGHUP to each of these processes (default: the proxy and every
        node running), in turn, each awaited until its log says it reloaded
        (nodes_reloaded) or refused (reload_failed: a ClusterError naming
        why). -> for each one signalled, the nodes it took in or let go
        ("added", "removed", "moved": when some were), the settings it
        applied ("applied") and those that changed but need a restart
        ("restart")."""
        if names is None:
            names = ["proxy", *self.state["nodes"]]
        done = {}
        for name in names:
            log = self.dir / "logs" / f"{name}.log"

            def lines() -> list[str]:
                try:
                    return log.read_text(errors="replace").splitlines()
                except OSError:
                    return []

            seen = len(lines())
            if not self._signal(name, signal.SIGHUP):
                continue
            deadline = time.monotonic() + timeout
            while not (outcome := [line for line in lines()[seen:]
                                   if "event=nodes_reloaded" in line or "event=reload_failed" in line]):
                if time.monotonic() > deadline:
                    raise ClusterError(f"{name} did not say it reloaded within {timeout:g}s (see {log})")
                time.sleep(0.05)
            if "event=reload_failed" in outcome[0]:
                raise ClusterError(f"{name} kept its configuration: {parse_logfmt(outcome[0]).get('error')}")
            said = [parse_logfmt(line) for line in lines()[seen:]]
            nodes = parse_logfmt(outcome[0])
            done[name] = {
                **{what: nodes[what].split(",") for what in ("added", "removed", "moved") if nodes.get(what)},
                "applied": sorted({k for f in said if f.get("event") == "settings_applied" for k in f if "." in k}),
                "restart": sorted({k for f in said if f.get("event") == "reload_restart_needed"
                                   for k in f.get("keys", "").split(",") if k})}
        return done

    def kill_redis(self, nid: str) -> None:
        """SIGKILL only the node's Redis (the node keeps running)."""
        if not self._signal(f"redis-{nid}", signal.SIGKILL):
            raise ClusterError(f"redis-{nid} is not running")
        self._wait_gone([f"redis-{nid}"], 5)

    def down(self) -> list[str]:
        names = [n for n in self.procs() if self.running(n)]
        # front first, so no new traffic reaches what is stopping; the
        # Redis servers once the nodes are gone (a node whose Redis went
        # first logs redis_down, an error, at every `sipha down`)
        order = sorted(names, key=lambda n: (n != "proxy", n != "trunk"))
        for stage in ([n for n in order if not n.startswith("redis-")], [n for n in order if n.startswith("redis-")]):
            for n in stage:
                self._signal(n, signal.SIGTERM)
            left = self._wait_gone(stage, 5)
            for n in left:
                self._signal(n, signal.SIGKILL)
            self._wait_gone(left, 2)
        return names

    # ---- looking ---------------------------------------------------------------
    def call_records(self, at_least: int = 0, seconds: float = 3.0) -> list[dict[str, str]]:
        """The call records (event=cdr) every node wrote, parsed; once
        there are `at_least` (or as they are after `seconds`): a node
        answers a BYE before it deletes the call and writes its record, so
        a caller may be done a moment before the last one is written."""
        deadline = time.monotonic() + seconds
        while True:
            records = [parse_logfmt(line) for nid in self.state["nodes"]
                       for line in (self.dir / "logs" / f"{nid}.log").read_text(errors="replace").splitlines()
                       if "event=cdr " in line]
            if len(records) >= at_least or time.monotonic() > deadline:
                return records
            time.sleep(0.05)

    def status(self) -> dict:
        live: dict = {"proxy": None, "nodes": {}}
        try:
            live["proxy"] = admin_get(self.state["proxy"]["admin"])
        except (OSError, ValueError):
            pass
        for nid, n in self.state.get("nodes", {}).items():
            try:
                live["nodes"][nid] = admin_get(n["admin"]) if self.running(nid) else None
            except (OSError, ValueError):
                live["nodes"][nid] = None
        rows = []
        proxy_view = {n["id"]: n for n in (live["proxy"] or {}).get("nodes", [])}
        for nid, n in self.state.get("nodes", {}).items():
            st = live["nodes"].get(nid) or {}
            pv = proxy_view.get(nid, {})
            rows.append({"node": nid, "process": "running" if self.running(nid) else "stopped",
                         "sip": hostport((self.node_host, n['sip'])), "redis": f"redis://127.0.0.1:{n['redis']}/0",
                         "health": ("up" if pv.get("up") else "down") if pv else "unknown",
                         "load_factor": pv.get("load_factor"),
                         "active": (st.get("keys") or {}).get("active"),
                         "replica": (st.get("keys") or {}).get("replica"),
                         "promoted": (st.get("store") or {}).get("promotions"),
                         "migrated": (st.get("store") or {}).get("migrations")})
        return {"proxy": {"sip": hostport(self.proxy_addr), "running": self.running("proxy"),
                          "counters": (live["proxy"] or {}).get("counters", {})},
                "nodes": rows}

    def table(self) -> str:
        rows = [("part", "address", "redis", "log")]
        tls = self.state["proxy"].get("tls")
        rows.append(("proxy", f"{self._listen()} udp+tcp" + (f", {self._listen(tls)} tls" if tls else ""),
                     f"admin http://127.0.0.1:{self.state['proxy']['admin']}/status",
                     self.procs().get("proxy", {}).get("log", "")))
        for nid, n in self.state["nodes"].items():
            rows.append((nid, hostport((self.node_host, n['sip'])), f"redis://127.0.0.1:{n['redis']}/0",
                         str(self.dir / "logs" / f"{nid}.log")))
        if "trunk" in self.state:
            rows.append(("trunk", f"{hostport((self.trunk_host, self.state['trunk']['port']))} "
                                  f"(SIPp {self.state['trunk']['scenario']})",
                         "", str(self.dir / "logs" / "trunk.out")))
        return render(rows)


def render(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# ---- command line -------------------------------------------------------------
def cmd_up(args) -> int:
    c = Cluster(args.dir)
    c.up(nodes=args.nodes, port=args.port, trunk=args.trunk, ramp=args.ramp, log_level=args.log_level,
         ipv6=args.ipv6, ipv6_nodes=args.ipv6_nodes, ipv6_only=args.ipv6_only, tls=args.tls)
    print(c.table())
    print(f"config: {c.dir / 'cluster.toml'}   stop with: sipha down --dir {args.dir}")
    return 0


def cmd_status(args) -> int:
    c = _existing(args.dir)
    st = c.status()
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    rows = [("node", "process", "health", "load", "active", "replica", "promoted", "migrated", "sip", "redis")]
    for r in st["nodes"]:
        rows.append((r["node"], r["process"], r["health"], "-" if r["load_factor"] is None else r["load_factor"],
                     _dash(r["active"]), _dash(r["replica"]), _dash(r["promoted"]), _dash(r["migrated"]),
                     r["sip"], r["redis"]))
    print(f"proxy {st['proxy']['sip']} {'running' if st['proxy']['running'] else 'stopped'}")
    print(render(rows))
    return 0


def cmd_users(args) -> int:
    """`kamctl ul show`: who is registered, where, over which flow."""
    c = _existing(args.dir)
    if args.remove is not None and args.aor is None:
        raise ClusterError("--remove needs --aor (whose bindings to remove)")
    query = ""
    if args.aor is not None:
        try:
            parse_uri(args.aor.strip().strip("<>"))
        except SipParseError as exc:
            raise ClusterError(f"--aor: {args.aor!r} is not a SIP URI ({exc.reason})") from None
        query = "?" + urllib.parse.urlencode({"aor": args.aor})
    found: dict[str, dict] = {}
    for nid, page in _node_pages(c, f"/registrations{query}"):
        if page.get("error"):
            raise ClusterError(f"{nid}: {page['error']}")
        for reg in page.get("registrations", []):
            newest = max(b["registered"] for b in reg["contacts"])
            kept = found.get(reg["aor"])
            # a registration moving home is briefly active on two nodes
            if kept is None or newest > max(b["registered"] for b in kept["contacts"]):
                found[reg["aor"]] = reg
    regs = [found[aor] for aor in sorted(found)]
    if args.remove:
        return _unregister(c, args, regs)
    if args.json:
        print(json.dumps(regs, indent=1))
    elif regs:
        rows = [("aor", "contact", "expires", "instance", "reg-id", "flow", "held by")]
        for reg in regs:
            for b in reg["contacts"]:
                flow = re.search(r";flow=([^;>]+)", b["path"][0]).group(1) if b["path"] and ";flow=" in b["path"][0] else "-"
                rows.append((reg["aor"], b["contact"], f"{b['expires_in']}s", b["instance"] or "-",
                             b["reg_id"] or "-", flow, reg["held_by"]))
        print(render(rows))
    if not regs and args.aor is not None:
        print(f"sipha users: {args.aor} is not registered", file=sys.stderr)
        return 1
    return 0


def _node_pages(c: "Cluster", path: str) -> list[tuple[str, dict]]:
    """(node, its answer) of every running node that answers `path`."""
    pages = []
    for nid, n in c.state["nodes"].items():
        if not c.running(nid):
            continue
        try:
            pages.append((nid, admin_get(n["admin"], path)))
        except (OSError, ValueError):
            continue
    if not pages:
        raise ClusterError("no node answered (is the cluster up? sipha status)")
    return pages


def _unregister(c: "Cluster", args, regs: list[dict]) -> int:
    """`sipha users --aor AOR --remove [CONTACT]`: kamctl ul rm."""
    if not regs:
        raise ClusterError(f"{args.aor} is not registered")
    holder = regs[0]["held_by"]
    if holder not in c.state["nodes"]:
        raise ClusterError(f"{args.aor} is held by {holder}: its node is down; try again once its partner took it")
    query = {"aor": args.aor, **({"contact": args.remove} if args.remove is not True else {})}
    answer = admin_get(c.state["nodes"][holder]["admin"], "/unregister?" + urllib.parse.urlencode(query), post=True)
    if answer.get("error"):
        raise ClusterError(answer["error"])
    for contact in answer["removed"]:
        print(f"removed {contact} of {regs[0]['aor']} on {holder}")
    return 0


def cmd_calls(args) -> int:
    """Kamailio's dlg.list: the calls in progress, by node."""
    c = _existing(args.dir)
    query = "?" + urllib.parse.urlencode({"call_id": args.call_id}) if args.call_id else ""
    found: dict[str, dict] = {}
    for nid, page in _node_pages(c, f"/calls{query}"):
        for call in page.get("calls", []):
            found.setdefault(call["bekey"], {**call, "held_by": nid})   # mid-move: the first node
    calls = sorted(found.values(), key=lambda call: call["started"])
    if args.json:
        print(json.dumps(calls, indent=1))
    elif calls:
        rows = [("call-id", "from", "to", "state", "since", "talking", "held by", "partner")]
        for call in calls:
            rows.append((call["call_id"], call["from"], call["to"],
                         call["state"] if call["kind"] == "call" else f"{call['state']} subscription",
                         call["started"], f"{call['duration_s']}s" if call["answered"] else "-",
                         call["held_by"], call["partner"] or "-"))
        print(render(rows))
    else:
        print("no call in progress" if not args.call_id else f"no call {args.call_id}", file=sys.stderr)
    return 0 if calls or not args.call_id else 1


def cmd_hangup(args) -> int:
    """Kamailio's dlg.end_dlg: end an answered call, a BYE to each side."""
    c = _existing(args.dir)
    query = "?" + urllib.parse.urlencode({"call_id": args.call_id})
    holders = [nid for nid, page in _node_pages(c, f"/calls{query}") if page.get("calls")]
    if not holders:
        raise ClusterError(f"no call {args.call_id} in progress (sipha calls lists them)")
    answer = admin_get(c.state["nodes"][holders[0]]["admin"], f"/hangup{query}", post=True)
    if answer.get("error"):
        raise ClusterError(answer["error"])
    print(f"ended {answer['ended']} on {holders[0]}: a BYE to each side")
    return 0


def _dash(v):
    return "-" if v is None else v


def _existing(directory: str) -> Cluster:
    c = Cluster(directory)
    if not c.state:
        raise ClusterError(f"--dir: no cluster was started from {c.dir} (run sipha up)")
    return c


def cmd_kill(args) -> int:
    _existing(args.dir).kill(args.node, process_only=args.process_only)
    if args.node == "proxy":
        print("killed the proxy (SIGKILL); `sipha start proxy` brings it back, and the calls go on")
        return 0
    print(f"killed {args.node}" + (" (SIGKILL; its Redis keeps running)" if args.process_only
                                   else " and its Redis (SIGKILL)"))
    return 0


def cmd_stop(args) -> int:
    _existing(args.dir).stop(args.node)
    print(f"stopped {args.node} (SIGTERM: it drained, its calls go on at their partners; its Redis keeps running)")
    return 0


def cmd_start(args) -> int:
    if args.node == "proxy":
        _existing(args.dir).restart_proxy()
        print("started the proxy; it sees the nodes up")
        return 0
    _existing(args.dir).start_node(args.node)
    print(f"started {args.node}; the proxy ramps traffic back onto it")
    return 0


def cmd_add_node(args) -> int:
    nid = _existing(args.dir).add_node()
    print(f"added {nid}; the proxy and every node run with it in the node list now")
    return 0


def cmd_remove_node(args) -> int:
    _existing(args.dir).remove_node(args.node)
    print(f"removed {args.node}: it drained, the proxy and every other node run without it, its Redis is stopped")
    return 0


def cmd_reload(args) -> int:
    done = _existing(args.dir).reload()
    print("reloaded " + (", ".join(done) or "nothing: nothing is running") + f" from {Path(args.dir) / 'cluster.toml'}")
    for name, what in done.items():
        said = [f"{how} {', '.join(what[how])}" for how in ("added", "removed", "moved") if what.get(how)]
        said.append(f"applied {', '.join(what['applied'])}" if what["applied"] else "no setting changed")
        if what["restart"]:
            said.append(f"needs a restart for {', '.join(what['restart'])}")
        print(f"  {name:<8} " + "; ".join(said))
    return 0


def cmd_down(args) -> int:
    stopped = _existing(args.dir).down()
    print("stopped: " + (", ".join(stopped) or "nothing was running"))
    return 0


def cmd_load(args) -> int:
    if args.target:
        from sipcore.config import parse_hostport
        target = parse_hostport(args.target, "--target", 5060, ipv6=True)
    else:
        target = _existing(args.dir).proxy_addr
    if args.calls < 1 or args.rate <= 0:
        raise ClusterError("--calls and --rate must be positive")
    if args.hold < 0:
        raise ClusterError(f"--hold: must not be negative, got {args.hold:g}")
    sipp = Sipp(args.scenario, target=target, transport=args.transport, calls=args.calls, rate=args.rate,
                hold_ms=int(args.hold * 1000) if args.hold else None, service=args.service)
    stop_on_sigterm()
    result = asyncio.run(run_load(sipp))
    print(f"calls attempted {result.created}, succeeded {result.ok}, failed {result.failed}, "
          f"retransmissions {result.retransmissions}, rate {result.rate:.1f}/s"
          + (f", response time {result.response_time_ms:.1f} ms" if result.response_time_ms is not None else ""))
    if result.failed or result.ok < args.calls:
        print(f"SIPp errors: {sipp.log_file}", file=sys.stderr)
        return 1
    return 0


async def run_load(sipp: Sipp, on_tick=None):
    """Run SIPp with a progress line every second; `on_tick(stats)` is an
    optional coroutine called with SIPp's latest statistics."""
    await sipp.start()
    tty = sys.stdout.isatty()
    try:
        while sipp.proc.returncode is None:
            try:
                await asyncio.wait_for(asyncio.shield(sipp.proc.wait()), 1.0)
            except asyncio.TimeoutError:
                pass
            st = sipp.progress()
            line = (f"calls done {st.get('SuccessfulCall(C)', 0)}  failed {st.get('FailedCall(C)', 0)}  "
                    f"running {st.get('CurrentCall', 0)}  rate {float(st.get('CallRate(C)', 0) or 0):.1f}/s")
            print(("\r" + line + "   ") if tty else line, end="" if tty else "\n", flush=True)
            if on_tick:
                await on_tick(st)
    finally:
        if tty:
            print()
        await sipp.stop(1.0)
    return await sipp.wait(30)


def add_commands(sub) -> None:
    def with_dir(p):
        p.add_argument("--dir", default=".sipha", help="the cluster's directory (default .sipha)")
        return p
    p = with_dir(sub.add_parser("up", help="start a local cluster: Redis per node, nodes, proxy, SIPp trunk"))
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--port", type=int, default=5060, help="proxy SIP port (UDP and TCP)")
    p.add_argument("--trunk", choices=["sipp"], help="start a SIPp UAS as the upstream trunk")
    p.add_argument("--ramp", type=float, default=30.0, help="seconds a returning node takes to reach load factor 1")
    p.add_argument("--log-level", default="info")
    p.add_argument("--ipv6", action="store_true",
                   help="the proxy listens on [::1] too (same port), the trunk on [::1]; nodes stay IPv4")
    p.add_argument("--ipv6-nodes", action="store_true",
                   help="--ipv6, and the nodes on [::1] too: the proxy speaks to them over IPv6")
    p.add_argument("--ipv6-only", action="store_true",
                   help="--ipv6-nodes, and the proxy listens on [::1] only: an IPv6-only network")
    p.add_argument("--tls", action="store_true",
                   help="the proxy takes SIP over TLS too, with a self-signed certificate made in DIR/tls")
    p.set_defaults(func=cmd_up)
    p = with_dir(sub.add_parser("status", help="nodes, health, load factor, dialog counts"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = with_dir(sub.add_parser("users", help="who is registered: contacts, expiry, instance, flow (kamctl ul show)"))
    p.add_argument("--aor", metavar="URI", help="one address of record, e.g. sip:alice@example.com")
    p.add_argument("--remove", nargs="?", const=True, metavar="CONTACT",
                   help="with --aor: remove its bindings, or the one of CONTACT (kamctl ul rm)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_users)
    p = with_dir(sub.add_parser("calls", help="the calls in progress: who, since when, on which node (dlg.list)"))
    p.add_argument("--call-id", help="one call, by either leg's Call-ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calls)
    p = with_dir(sub.add_parser("hangup", help="end an answered call: a BYE to each side (dlg.end_dlg)"))
    p.add_argument("call_id", metavar="CALL-ID", help="either leg's Call-ID (sipha calls lists them)")
    p.set_defaults(func=cmd_hangup)
    p = with_dir(sub.add_parser("kill", help="SIGKILL a node and its Redis (a host failure), or the proxy"))
    p.add_argument("node", help="a node id, or proxy")
    p.add_argument("--process-only", action="store_true",
                   help="kill only the node's process; its Redis and dialogs survive (a crash)")
    p.set_defaults(func=cmd_kill)
    p = with_dir(sub.add_parser("stop", help="stop a node as for an upgrade (SIGTERM: it drains first)"))
    p.add_argument("node")
    p.set_defaults(func=cmd_stop)
    p = with_dir(sub.add_parser("start", help="bring a killed node back (it ramps up), or the proxy"))
    p.add_argument("node", help="a node id, or proxy")
    p.set_defaults(func=cmd_start)
    p = with_dir(sub.add_parser("add-node", help="add a node to the running cluster (no call is lost)"))
    p.set_defaults(func=cmd_add_node)
    p = with_dir(sub.add_parser("remove-node", help="take a node out of the running cluster (it drains first)"))
    p.add_argument("node")
    p.set_defaults(func=cmd_remove_node)
    p = with_dir(sub.add_parser("reload", help="SIGHUP the proxy and every node: cluster.toml's node list, "
                                               "log level, TLS files and users read again in place"))
    p.set_defaults(func=cmd_reload)
    p = with_dir(sub.add_parser("down", help="stop everything `up` started"))
    p.set_defaults(func=cmd_down)
    p = with_dir(sub.add_parser("load", help="drive SIPp calls at the proxy"))
    p.add_argument("--rate", type=float, default=10.0, help="calls per second")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--hold", type=float, default=0.0, help="seconds each call is held before the BYE")
    p.add_argument("--scenario", default="uac", help="a file in sipp_scenarios/ or a SIPp built-in")
    p.add_argument("--transport", choices=["udp", "tcp"], default="udp")
    p.add_argument("--target", metavar="HOST:PORT", help="default: the proxy of the cluster in --dir")
    p.add_argument("--service", default=None, help="user part of the Request-URI (SIPp -s)")
    p.set_defaults(func=cmd_load)
