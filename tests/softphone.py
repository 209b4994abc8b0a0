"""baresip, a real softphone, driven through its ctrl_tcp module: the
end-to-end tests' check that what users point at the proxy works with
it (registration, calls, holds, hang-ups), as SIPp checks the load.

Each phone gets its own config folder, a free loopback SIP port and a
free control port; its audio is a tone file (no sound device) and its
events (REGISTER_OK, CALL_ESTABLISHED, CALL_CLOSED...) are collected by a
reader thread. Loopback only: baresip 1.0 binds its RTP (and DNS)
sockets to every address, so it runs with a small LD_PRELOAD shim,
compiled here, that turns a bind to 0.0.0.0 or :: into one to loopback.
"""
from __future__ import annotations

import json
import math
import shutil
import socket
import struct
import subprocess
import threading
import time
import wave
from pathlib import Path

from sipha.sipp import free_port

MODULES = Path("/usr/lib/baresip/modules")


def installed() -> bool:
    return shutil.which("baresip") is not None and shutil.which("gcc") is not None and MODULES.is_dir()


# bind() to the wildcard address becomes bind() to loopback, for a
# program that offers no setting for where it listens
LOOPBACK_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

int bind(int fd, const struct sockaddr *sa, socklen_t len)
{
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real)
        real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    if (sa && sa->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in in;
        memcpy(&in, sa, sizeof in);
        if (in.sin_addr.s_addr == htonl(INADDR_ANY)) {
            in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real(fd, (const struct sockaddr *)&in, sizeof in);
        }
    } else if (sa && sa->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6;
        memcpy(&in6, sa, sizeof in6);
        if (IN6_IS_ADDR_UNSPECIFIED(&in6.sin6_addr)) {
            in6.sin6_addr = in6addr_loopback;
            return real(fd, (const struct sockaddr *)&in6, sizeof in6);
        }
    }
    return real(fd, sa, len);
}
"""


def loopback_shim(folder: Path) -> Path:
    """The shim above, built with gcc (which sipha compile needs too)."""
    source, lib = folder / "loopback_bind.c", folder / "loopback_bind.so"
    if not lib.exists():
        source.write_text(LOOPBACK_SHIM)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(lib), str(source), "-ldl"],
                       check=True, capture_output=True)
    return lib


def tone(path: Path, seconds: int = 20) -> None:
    """A 440 Hz tone at 8 kHz, what the phones send as their voice."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / 8000)))
                               for i in range(8000 * seconds)))


class Baresip:
    def __init__(self, procs, user: str, proxy: tuple[str, int], transport: str = "udp", answer: str = "auto",
                 device: str = "", password: str | None = None, sipnat: str | None = None):
        """`device`: tells apart two phones of one user; `password`: the
        user's, for digest authentication; `sipnat="outbound"`: SIP
        outbound (RFC 5626: +sip.instance and reg-id, keep-alives)."""
        self.user, self.procs = user, procs
        self.name = f"baresip-{user}{device}"
        self.folder = procs.tmp / self.name
        self.folder.mkdir()
        self.sip_port, self.ctrl_port = free_port(), free_port()
        tone(self.folder / "tone.wav")
        (self.folder / "config").write_text(
            "poll_method epoll\nnet_interface 127.0.0.1\n"
            f"sip_listen 127.0.0.1:{self.sip_port}\n"
            f"audio_source aufile,{self.folder / 'tone.wav'}\n"
            f"audio_alert aufile,{self.folder / 'tone.wav'}\n"
            f"module_path {MODULES}\n"
            "module g711.so\nmodule aufile.so\nmodule rtcpsummary.so\n"
            f"{'module uuid.so' if sipnat else ''}\n"   # outbound needs the phone's +sip.instance
            "module_app account.so\nmodule_app menu.so\nmodule_app ctrl_tcp.so\n"
            f"ctrl_tcp_listen 127.0.0.1:{self.ctrl_port}\n"
            "rtp_ports 40000-40999\n")
        outbound = f"sip:{proxy[0]}:{proxy[1]};transport={transport}"
        (self.folder / "accounts").write_text(
            f"<sip:{user}@{proxy[0]};transport={transport}>;regint=600;"
            f"{f'auth_pass={password};' if password else ''}"
            f"{f'sipnat={sipnat};' if sipnat else ''}"
            f"outbound=\"{outbound}\";answermode={answer}\n")
        (self.folder / "contacts").write_text("")
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.proc = procs.start(self.name, ["baresip", "-4", "-s", "-f", str(self.folder)],
                                ready="baresip is ready.", env={"LD_PRELOAD": str(loopback_shim(procs.tmp))})
        self.ctrl = socket.create_connection(("127.0.0.1", self.ctrl_port), timeout=5)
        self.ctrl.settimeout(None)      # the reader waits for events as long as the phone runs
        self.replies: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.ctrl.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b":" in buf:
                size, _, rest = buf.partition(b":")
                if len(rest) < int(size) + 1:
                    break
                msg = json.loads(rest[:int(size)])
                buf = rest[int(size) + 1:]
                with self.lock:
                    (self.events if msg.get("event") else self.replies).append(msg)

    def command(self, name: str, params: str = "") -> dict:
        """Run a menu command (dial, hangup, hold...) -> baresip's reply."""
        with self.lock:
            n = len(self.replies)
        body = json.dumps({"command": name, "params": params, "token": name}).encode()
        self.ctrl.sendall(str(len(body)).encode() + b":" + body + b",")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.replies) > n:
                    return self.replies[n]
            time.sleep(0.02)
        raise AssertionError(f"{self.user}: no reply to {name} {params}\n{self.proc.text()[-3000:]}")

    def wait(self, kind: str, seconds: float = 10.0, since: int = 0) -> dict:
        """The first event of `kind` after the first `since` events."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with self.lock:
                for e in self.events[since:]:
                    if e.get("type") == kind:
                        return e
            time.sleep(0.02)
        with self.lock:
            seen = [e.get("type") for e in self.events]
        raise AssertionError(f"{self.user}: no {kind} in {seconds} s (events: {seen})\n{self.proc.text()[-4000:]}")

    def registered(self, seconds: float = 10.0) -> str:
        """Wait until the phone's registration is up (it registers at
        start, before the control connection: polled, not an event)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            info = self.command("reginfo").get("data", "")
            if "OK " in info:
                return info
            if "ERR" in info:
                break
            time.sleep(0.1)
        raise AssertionError(f"{self.user}: not registered ({info!r})\n{self.proc.text()[-4000:]}")

    def mark(self) -> int:
        """How many events so far, for wait(since=...)."""
        with self.lock:
            return len(self.events)

    def calls(self) -> str:
        """baresip's list of the phone's calls and their states."""
        return self.command("listcalls").get("data", "")

    def media(self, calls: int = 1, seconds: float = 5.0) -> list[dict[str, str]]:
        """What the rtcpsummary module logged of each ended call, once
        there are `calls`: {"PR": packets received, "PS": sent, ...}."""
        deadline = time.monotonic() + seconds
        while True:
            found = [dict(f.split("=", 1) for f in line.split("EX=BareSip;", 1)[1].split(";") if "=" in f)
                     for line in self.proc.lines("EX=BareSip;")]
            if len(found) >= calls or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def close(self) -> None:
        self.ctrl.close()
